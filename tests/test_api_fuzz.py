"""Generated requests against the API's own OpenAPI document (schemathesis + hypothesis, bounded), each
response judged by every response check schemathesis has (``ALL_CHECKS``: what ``st run --checks all``
runs) -- status codes, content types, headers and bodies as documented, schema-invalid input refused and
valid input not, a 405 with a complete ``Allow`` for an undeclared method, a 401 without the token, a
deleted resource gone -- and a refused request never makes a job (the job counter stays where it was).

One server, an admin token of one namespace, three runs:

* fuzzing: valid and invalid requests to every route, with the token and without; half aimed at the
  token's namespace, so they get past authorization; batches of launches that fit and operations on
  what they made; and input that must be refused at validation (issue 18): strings that can't be
  stored (lone surrogates, control characters) in tags, names, labels, paths and keys, and ranges with
  a huge bound or a huge size: a 422 every time;
* coverage: schemathesis's coverage phase -- every parameter and property at its bounds, missing, of the
  wrong type; undeclared methods and content types -- in the token's namespace;
* stateful: sequences linked by their responses (a host's name to its drain, a job's id to its cancel).

A check that is wrong for a deliberate design is left out for that operation only (``EXCLUDED``).
"""

from __future__ import annotations

import json
import os
import random
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given
from hypothesis import strategies as st
from hypothesis.errors import FlakyStrategyDefinition
from hypothesis.stateful import run_state_machine_as_test
from redis import Redis
from schemathesis.checks import CHECKS, CheckFunction, load_all_checks
from schemathesis.core.failures import FailureGroup
from schemathesis.generation import GenerationMode
from schemathesis.generation.meta import CoveragePhaseData

from orchestrator.model.names import MAX_TARGETS
from orchestrator.model.operation import Op
from orchestrator.model.settings import Settings
from orchestrator.services.client import RedisClient
from orchestrator.store import keys

from .apiserver import ApiServer, serve

#: examples per run; VMORCH_FUZZ_EXAMPLES raises it for a longer hunt
EXAMPLES = int(os.environ.get("VMORCH_FUZZ_EXAMPLES", "400"))
#: stateful scenarios (of up to STEPS requests each); VMORCH_FUZZ_SCENARIOS raises it
SCENARIOS = int(os.environ.get("VMORCH_FUZZ_SCENARIOS", "60"))
STEPS = 10
#: the run's seed, printed; VMORCH_FUZZ_SEED replays a run
SEED = int(os.environ.get("VMORCH_FUZZ_SEED", str(random.randrange(2**32))))
CHUNK = 500
#: of the EXAMPLES, those of input that must be refused with a 422
BAD = EXAMPLES // 8

load_all_checks()
ALL_CHECKS: list[CheckFunction] = CHECKS.get_all()

_PARAMS = "params are checked by each op's own model (orchestrator.model.operation.PARAMS); the document says object"
#: (method, path) -> {check: why it is wrong there}: deliberate designs that a check reads as a contract failure
EXCLUDED: dict[tuple[str, str], dict[str, str]] = {
    ("POST", "/api/v1/jobs"): {"positive_data_acceptance": _PARAMS},
    ("POST", "/api/v1/plan"): {"positive_data_acceptance": f"{_PARAMS}; and only launches can be planned"},
    ("POST", "/api/v1/namespaces/{ns}/vms/{target}/{op}"): {
        "positive_data_acceptance": f"{_PARAMS}; and a target is a range (web[1-10]) whose names are checked "
                                    "once it is expanded, which no pattern can say"},
    ("POST", "/api/v1/namespaces/{ns}/experiments"): {
        "positive_data_acceptance": "text is an experiment file (YAML, model.experiment): to the document, a string"},
    ("POST", "/api/v1/namespaces/{ns}/schedules"): {
        "positive_data_acceptance": "exactly one of cron, every and at, a cron expression, and an experiment or "
                                    "operations that are valid: to the document, strings and objects"},
    ("POST", "/api/v1/images"): {
        "positive_data_acceptance": "source is an http(s) URL with a host and no password, or file:///ABS/PATH "
                                    "(control.images.check_source): to the document, a string"},
    ("POST", "/api/v1/namespaces"): {
        "positive_data_acceptance": "hosts must be hosts of the cluster, which the document can't know"},
    ("POST", "/api/v1/namespaces/{ns}/networks"): {
        "positive_data_acceptance": "subnet is an IPv4 network, /16 to /29, host bits zero, overlapping none of the "
                                    "namespace's (model.network.check_subnet), and a gateway host must be up: to the "
                                    "document, a string"},
    ("POST", "/api/v1/namespaces/{ns}/networks/{name}/capture"): {
        "positive_data_acceptance": "a network without a gateway host is captured on a VM's NIC (vm), and the VM "
                                    "must have one on it: state the document can't know"},
    ("POST", "/api/v1/namespaces/{ns}/deletion"): {
        "positive_data_acceptance": "a namespace with VMs (without force), schedules or networks is kept, and says "
                                    "why: state the document can't know"},
    ("DELETE", "/api/v1/namespaces/{ns}/networks/{name}"): {
        "positive_data_acceptance": "a network with VMs on it is kept (the VMs are named): state the document "
                                    "can't know"},
}
#: a namespace that isn't there has empty collections (a first launch creates its namespace), so a list under
#: one just deleted is a 200 with [], not the 404 use_after_free expects
_UNDER_A_NAMESPACE = "/api/v1/namespaces/{ns}/"

pytestmark = pytest.mark.slow


def checks_for(case: schemathesis.Case) -> list[CheckFunction]:
    skip = set(EXCLUDED.get((case.method.upper(), case.path), {}))
    if case.path.startswith(_UNDER_A_NAMESPACE):
        skip.add("use_after_free")
    return [check for check in ALL_CHECKS if check.__name__ not in skip]


def _concerns(case: schemathesis.Case, name: str) -> bool:
    """Whether ``case`` is a coverage case about parameter ``name`` (its value, or its absence)."""
    data = case.meta.phase.data if case.meta is not None else None
    if not isinstance(data, CoveragePhaseData):
        return False
    return name.lower() in {p.lower() for p in (data.parameter, *(m.parameter for m in data.mutations)) if p}


def _in_namespace(case: schemathesis.Case, ns: str) -> schemathesis.Case:
    """``case`` in namespace ``ns``. Set on the drawn case, not as an override of the strategy: schemathesis
    then checks the case again, and one that only had an invalid namespace is no longer a negative case."""
    if case.path_parameters and "ns" in case.path_parameters:
        case.path_parameters["ns"] = ns
    return case


@dataclass
class Judge:
    """Sends cases and judges the answers: every check, and no job made by a refused request."""

    url: str
    redis: Redis
    session: requests.Session = field(default_factory=requests.Session)
    statuses: Counter[int] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    def call(self, case: schemathesis.Case) -> schemathesis.Response | None:
        before = self.redis.get(keys.JOB_NEXT)
        try:
            response = case.call(base_url=self.url, session=self.session, timeout=30)
        except (requests.exceptions.InvalidHeader, requests.exceptions.InvalidURL, UnicodeError, ValueError):
            self.statuses[0] += 1  # could not even be put on the wire (e.g. a NUL in a header)
            return None
        self.judge(case, response, before)
        return response

    def judge(self, case: schemathesis.Case, response: schemathesis.Response, before: str | None, *,
              recorder: Any = None) -> None:
        self.statuses[response.status_code] += 1
        where = f"{case.method} {case.formatted_path} -> {response.status_code} {response.text[:300]}"
        try:
            case.validate_response(response, checks=checks_for(case), headers=case.headers, recorder=recorder,
                                   transport_kwargs={"base_url": self.url, "session": self.session, "timeout": 30})
        except FailureGroup as exc:
            titles = "; ".join(dict.fromkeys(f.title for f in exc.exceptions))
            self.failures.append(f"{titles}: {where} (body {case.body!r:.200}, query {case.query!r:.100})")
        if response.status_code >= 400:
            if self.redis.get(keys.JOB_NEXT) != before:
                self.failures.append(f"refused yet made a job: {where}")
            if set(response.json()) != {"error"}:
                self.failures.append(f"not an error body: {where}")


@pytest.fixture
def fuzz_api(base_settings: Settings, cluster: object) -> Iterator[ApiServer]:
    # Its own server: long polls answer within half a second, so a generated wait can't stall the run.
    with serve(base_settings.model_copy(update={"api_wait_max": 0.5}), name="fuzz-admin") as api:
        yield api


def test_generated_requests_keep_the_documented_contract_and_refused_ones_change_nothing(
        client: RedisClient, fuzz_api: ApiServer, settings: Settings, redis: Redis) -> None:
    # client before fuzz_api: the server's tokens are revoked before the client's teardown looks for stray keys
    ns = settings.namespace
    token = fuzz_api.token(f"{ns}-fuzz", "admin", [ns])
    with httpx.Client(base_url=fuzz_api.url, timeout=30) as http:
        # The event stream never ends by itself: test_api.py checks it by hand.
        schema = schemathesis.openapi.from_dict(http.get("/openapi.json").json()).exclude(
            path="/api/v1/jobs/events")
    assert {"not_a_server_error", "status_code_conformance", "content_type_conformance",
            "response_headers_conformance", "response_schema_conformance", "negative_data_rejection",
            "positive_data_acceptance", "use_after_free", "ensure_resource_availability", "ignored_auth",
            "missing_required_header", "unsupported_method", "allow_header_conformance"} <= {
        c.__name__ for c in ALL_CHECKS}
    judge = Judge(fuzz_api.url, redis)
    try:
        fuzzed, bad_statuses = _fuzz(schema, judge, ns, token)
        covered = _coverage(schema, judge, ns, token)
        steps = _stateful(schema, judge, ns, token)
    finally:
        judge.session.close()
    statuses = judge.statuses
    print(f"\nfuzz (seed {SEED}): {fuzzed} generated, {covered} coverage, {steps} stateful requests; "
          f"statuses {dict(sorted(statuses.items()))}; bad input with the token: {dict(bad_statuses)}; "
          f"{len(ALL_CHECKS)} checks")
    assert not judge.failures, f"seed {SEED}:\n" + "\n".join(judge.failures[:20])
    assert fuzzed >= EXAMPLES * 0.9, statuses
    assert statuses[401] and statuses[403] and statuses[405] and statuses[422] and statuses[200], statuses
    assert bad_statuses[422] >= BAD * 0.9, bad_statuses  # the bad input did go on the wire


def _fuzz(schema: schemathesis.schemas.BaseSchema, judge: Judge, ns: str, token: str) -> tuple[int, Counter[int]]:
    """Generated requests, with the token and without: how many, and the statuses of the must-refuse ones."""
    modes = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]
    # Half the cases aim at the token's namespace, so they get past authorization and reach the handlers.
    # And batches of operations on a few VMs of that namespace, valid or not, so that mutations get
    # accepted too (launches that fit, then operations on what they made) next to refused ones.
    fits = st.fixed_dictionaries({"memory_mib": st.sampled_from([16, 32]), "disk_gib": st.just(0)})
    params = st.one_of(st.just({}), st.fixed_dictionaries({"memory_mib": st.integers(-10, 10**7)}), fits, fits,
                       st.fixed_dictionaries({"name": st.text(max_size=8)}),
                       st.dictionaries(st.text(max_size=6), st.one_of(st.integers(), st.text(max_size=6))))
    op_names = [Op.LAUNCH.value] * 4 + [o.value for o in Op]  # launches often: the others need a VM
    operation = st.fixed_dictionaries({"op": st.sampled_from(op_names), "namespace": st.just(ns),
                                       "vm": st.sampled_from(["f1", "f2", "f3"]), "params": params})
    batches = st.fixed_dictionaries({"operations": st.lists(operation, min_size=1, max_size=2)})
    submit = schema["/api/v1/jobs"]["POST"]
    # Chosen with sampled_from: one_of would flatten the schema's strategies (one per operation) into its own
    # branches, and the batches would be 3 branches of ~190.
    cases = st.sampled_from([*[schema.as_strategy(mode) for mode in modes],
                             *[schema.as_strategy(mode).map(lambda case: _in_namespace(case, ns)) for mode in modes],
                             *[batches.flatmap(lambda body: submit.as_strategy(body=body))] * 3],
                            ).flatmap(lambda strategy: strategy)
    bad_statuses: Counter[int] = Counter()
    tried = 0

    def send(case: schemathesis.Case, authenticated: bool) -> None:
        nonlocal tried
        tried += 1
        case.headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
        if authenticated:
            case.headers["Authorization"] = f"Bearer {token}"
        judge.call(case)

    def refused(case: schemathesis.Case) -> None:
        nonlocal tried
        tried += 1
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {token}"}
        response = judge.call(case)
        if response is not None:
            bad_statuses[response.status_code] += 1
            if response.status_code != 422:
                judge.failures.append(f"not refused with a 422: {case.method} {case.formatted_path} -> "
                                      f"{response.status_code} (body {case.body!r:.200})")

    _run(lambda: given(case=cases, authenticated=st.sampled_from([True, True, True, False]))(send),
         lambda: EXAMPLES - BAD - tried)
    # Input that must be refused with a 422 at validation: it used to become a 500, or eat memory.
    bad = refused_cases(schema, ns)
    _run(lambda: given(case=bad)(refused), lambda: EXAMPLES - tried)
    return tried, bad_statuses


def _run(test: Callable[[], Any], left: Callable[[], int]) -> None:
    """The hypothesis test ``test()`` makes, in rounds of at most CHUNK examples, until ``left()`` is 0."""
    for chunk in range(20):
        if left() <= 0:
            break
        run = hypothesis.settings(max_examples=min(left(), CHUNK), deadline=None, database=None,
                                  phases=[Phase.generate], suppress_health_check=list(HealthCheck))(test())
        try:
            hypothesis.seed(SEED + chunk)(run)()
        except FlakyStrategyDefinition:
            # schemathesis's strategies sometimes replay differently late in a long run: a quirk of
            # the generator, not a finding (every request made was checked); go on with a new round
            continue


def _coverage(schema: schemathesis.schemas.BaseSchema, judge: Judge, ns: str, token: str) -> int:
    """schemathesis's coverage phase over every operation, in the token's namespace: how many requests."""
    made = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        generation = schema.config.generation_for(operation=operation, phase="coverage")
        for case in schema.iter_coverage_cases(operation, generation_config=generation,
                                               generation_modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE]):
            # the token's namespace and the token, unless the case is about them (one invalid, or missing)
            if not _concerns(case, "ns"):
                _in_namespace(case, ns)
            if not _concerns(case, "authorization"):
                case.headers = {**{k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"},
                                "Authorization": f"Bearer {token}"}
            judge.call(case)
            made += 1
    return made


def _stateful(schema: schemathesis.schemas.BaseSchema, judge: Judge, ns: str, token: str) -> int:
    """Linked sequences of requests (schemathesis's state machine), in the token's namespace: how many."""
    steps = 0
    base: Any = schema.as_state_machine()

    class Workflow(base):  # type: ignore[misc,valid-type]
        def get_call_kwargs(self, case: schemathesis.Case) -> dict[str, Any]:
            return {"base_url": judge.url, "session": judge.session, "timeout": 30}

        def before_call(self, case: schemathesis.Case) -> None:
            nonlocal steps
            steps += 1
            _in_namespace(case, ns)
            case.headers = {**{k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"},
                            "Authorization": f"Bearer {token}"}
            self.jobs_before = judge.redis.get(keys.JOB_NEXT)

        def validate_response(self, response: schemathesis.Response, case: schemathesis.Case,
                              additional_checks: object = None, **kwargs: Any) -> None:
            # judged, not raised: one failure doesn't end the run, and hypothesis doesn't shrink it
            judge.judge(case, response, self.jobs_before, recorder=getattr(self, "recorder", None))

    run_state_machine_as_test(hypothesis.seed(SEED)(Workflow), settings=hypothesis.settings(
        max_examples=SCENARIOS, stateful_step_count=STEPS, deadline=None, database=None,
        suppress_health_check=list(HealthCheck)))
    return steps


#: characters no string of a request may hold: lone surrogates (JSON's "\ud800") and control characters
_UNSTORABLE = st.characters(categories=["Cs", "Cc"])


def _unstorable(text: str) -> bool:
    """Whether ``text`` is still bad once on the wire: two surrogates drawn side by side may form a
    valid pair ("\\ud879\\uddb2"), which JSON decodes to one good character (seed 3951746273)."""
    return not _valid_utf8(json.loads(json.dumps(text))) or any(unicodedata.category(c) == "Cc" for c in text)


def _valid_utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def refused_cases(schema: schemathesis.schemas.BaseSchema, ns: str) -> st.SearchStrategy[schemathesis.Case]:
    """Requests that must get a 422 from a token that covers ``ns``."""
    bad_text = st.builds(lambda a, b, c: a + b + c, st.text(max_size=4),
                         st.text(_UNSTORABLE, min_size=1, max_size=3), st.text(max_size=4)).filter(_unstorable)
    bad_tags = st.one_of(st.builds(lambda v: {"role": v}, bad_text), st.builds(lambda k: {k: "web"}, bad_text))
    vm = st.sampled_from(["f1", "f2"])

    def op(name: str, params: st.SearchStrategy[dict[str, object]], vm: st.SearchStrategy[str] = vm,
           ) -> st.SearchStrategy[dict[str, object]]:
        return st.fixed_dictionaries({"op": st.just(name), "namespace": st.just(ns), "vm": vm, "params": params})

    good = op("launch", st.just({"memory_mib": 16, "disk_gib": 0}))
    bodies = st.one_of(
        op("launch", st.builds(lambda t: {"tags": t}, bad_tags)).map(lambda o: {"operations": [o]}),
        op("launch", st.builds(lambda t: {"host_labels": t}, bad_tags)).map(lambda o: {"operations": [o]}),
        op("tag", st.builds(lambda t: {"set": t}, bad_tags)).map(lambda o: {"operations": [o]}),
        op("launch", st.builds(lambda p: {"image": f"/img/{p}"}, bad_text)).map(lambda o: {"operations": [o]}),
        op("pause", st.just({}), vm=st.builds(lambda t: f"f1{t}", bad_text)).map(lambda o: {"operations": [o]}),
        st.builds(lambda o, label: {"operations": [o], "options": {"label": label}}, good, bad_text),
        st.builds(lambda o, key: {"operations": [o], key: 1}, good, bad_text),
    )
    submit = schema["/api/v1/jobs"]["POST"]
    operate = schema["/api/v1/namespaces/{ns}/vms/{target}/{op}"]["POST"]
    targets = st.one_of(
        # a bound no C integer holds (range() of it was an OverflowError)
        st.builds(lambda lo, hi: f"x[{lo}-{hi}]", st.integers(0, 9), st.integers(2**63, 10**60)),
        # a range too large to expand (x[1-20000000] took ~700 MB before the limit refused it)
        st.builds(lambda lo, n: f"x[{lo}-{lo + n}]", st.integers(0, 10**9), st.integers(MAX_TARGETS, 10**12)),
        st.integers(1, MAX_TARGETS).map(lambda n: f"x[1-{n}],y[1-{MAX_TARGETS + 1 - n}]"),
        st.integers(1, 10).map(lambda n: f"x[{','.join(['1-1000'] * n)},1-{MAX_TARGETS + 1 - 1000 * n}]"),
        # more digits than a name can hold
        st.integers(64, 190).map(lambda n: f"x[{'9' * n}]"),
    )
    return st.one_of(
        bodies.flatmap(lambda body: submit.as_strategy(body=body)),
        st.tuples(targets, st.sampled_from(["launch", "start", "delete"])).flatmap(
            lambda t: operate.as_strategy(path_parameters={"ns": ns, "target": t[0], "op": t[1]})),
        bad_tags.flatmap(lambda tags: operate.as_strategy(path_parameters={"ns": ns, "target": "f1", "op": "tag"},
                                                          body={"set": tags})),
    )

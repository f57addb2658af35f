"""Who may do what through the HTTP API: the 401/403 matrix, cross-namespace probing, tokens.

The rule (orchestrator/api/auth.py): no or bad token -> 401 first; a namespace the token
doesn't cover -> 403 whether it exists or not; a job of such a namespace -> 404, as if it
didn't exist; a role too low -> 403.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from redis import Redis

from orchestrator.model.operation import Op
from orchestrator.model.settings import Settings
from orchestrator.services.client import RedisClient
from orchestrator.store import keys
from orchestrator.store.tokens import Role, Token, digest

from .apiserver import ApiServer
from .conftest import ops, run_cli

ROLES = [Role.READ, Role.OPERATE, Role.ADMIN]


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str  # {ns}, {vm}, {job} filled in per test
    role: Role
    #: "ns": names a namespace; "job": a job by id; "cluster": needs every namespace; "any": any token
    scope: str
    body: object = None


# Every request an allowed token makes here is refused after the authorization check, or
# changes nothing: the namespace exists (409), it has a VM (422/409), the host doesn't exist.
ENDPOINTS = [
    Endpoint("GET", "/api/v1/namespaces/{ns}/vms", Role.READ, "ns"),
    Endpoint("GET", "/api/v1/namespaces/{ns}/vms/{vm}", Role.READ, "ns"),
    Endpoint("GET", "/api/v1/namespaces/{ns}/vms/{vm}/queue", Role.READ, "ns"),
    Endpoint("GET", "/api/v1/namespaces/{ns}/jobs", Role.READ, "ns"),
    Endpoint("GET", "/api/v1/namespaces/{ns}/events", Role.READ, "ns"),
    Endpoint("GET", "/api/v1/namespaces/{ns}", Role.READ, "ns"),
    Endpoint("POST", "/api/v1/namespaces/{ns}/vms/{vm}/resume", Role.OPERATE, "ns"),
    Endpoint("POST", "/api/v1/jobs", Role.OPERATE, "ns",
             {"operations": [{"op": "resume", "namespace": "{ns}", "vm": "{vm}"}]}),
    Endpoint("POST", "/api/v1/plan", Role.OPERATE, "ns",
             {"operations": [{"op": "launch", "namespace": "{ns}", "vm": "other", "params": {"memory_mib": 16}}]}),
    Endpoint("POST", "/api/v1/namespaces", Role.ADMIN, "ns", {"name": "{ns}"}),
    Endpoint("POST", "/api/v1/namespaces/{ns}/deletion", Role.ADMIN, "ns"),
    Endpoint("DELETE", "/api/v1/namespaces/{ns}", Role.ADMIN, "ns"),
    Endpoint("GET", "/api/v1/jobs/{job}", Role.READ, "job"),
    Endpoint("GET", "/api/v1/jobs/{job}/wait?timeout=0", Role.READ, "job"),
    Endpoint("GET", "/api/v1/jobs/wait?ids={job}&timeout=0", Role.READ, "job"),
    Endpoint("POST", "/api/v1/jobs/{job}/cancel", Role.OPERATE, "job"),
    Endpoint("POST", "/api/v1/hosts/nohost/drain", Role.ADMIN, "cluster"),
    Endpoint("POST", "/api/v1/hosts/nohost/undrain", Role.ADMIN, "cluster"),
    Endpoint("GET", "/api/v1/hosts", Role.READ, "any"),
    Endpoint("GET", "/api/v1/hosts/t1", Role.READ, "any"),
    Endpoint("GET", "/api/v1/namespaces", Role.READ, "any"),
    Endpoint("GET", "/api/v1/whoami", Role.READ, "any"),
]


def _fill(value: object, subst: dict[str, str]) -> object:
    text = json.dumps(value)
    for k, v in subst.items():
        text = text.replace("{" + k + "}", v)
    return json.loads(text)


def expected_status(ep: Endpoint, token: Token, ns: str) -> int | None:
    """403/404 when refused; None when the token may make the request."""
    if ep.scope == "any":
        return None
    if ep.scope == "cluster":
        return None if token.allows(ep.role) else 403
    if not token.covers(ns):
        return 404 if ep.scope == "job" else 403
    return None if token.role.covers(ep.role) else 403


@pytest.fixture
def world(api_server: ApiServer, client: RedisClient, settings: Settings) -> Iterator[dict[str, object]]:
    """Namespace A (the test's) with a paused VM and a finished job; tokens of every role on A, on B, on all."""
    ns = settings.namespace
    [launch] = client.wait([j.id for j in client.submit(ops(Op.LAUNCH, ns, "v1", memory_mib=16, disk_gib=0))])
    [paused] = client.wait([j.id for j in client.submit(ops(Op.PAUSE, ns, "v1"))])
    assert paused.state.value == "succeeded"
    tokens: dict[str, tuple[str, Token]] = {}
    for role in ROLES:
        for where, namespaces in (("A", [ns]), ("B", [f"{ns}-b"]), ("all", ["*"])):
            name = f"{ns}-{role.value}-{where}"
            secret = api_server.token(name, role, namespaces)
            tokens[name] = (secret, Token(name=name, role=role, namespaces=namespaces))
    yield {"ns": ns, "vm": "v1", "job": str(launch.id), "tokens": tokens}
    for name in tokens:
        api_server.revoke(name)


def test_no_token_or_a_bad_one_is_401_everywhere_first(api_server: ApiServer, world: dict[str, object]) -> None:
    subst = {k: str(v) for k, v in world.items() if k != "tokens"}
    for secret in (None, "vmo_not-a-token", "garbage", ""):
        with api_server.http(secret) as http:
            for ep in ENDPOINTS:
                r = http.request(ep.method, str(_fill(ep.path, subst)), json=_fill(ep.body, subst))
                assert r.status_code == 401, (secret, ep, r.text)
                assert r.json()["error"]["code"] == "unauthorized" and r.headers["www-authenticate"] == "Bearer"
            # even a malformed body or parameter is not looked at before the token
            assert http.post("/api/v1/jobs", content=b"{not json").status_code == 401
            assert http.get("/api/v1/jobs/not-a-number").status_code == 401
    with api_server.http() as http:
        assert http.get("/api/v1/health").json() == {"status": "ok"}


def test_role_by_namespace_by_endpoint_matrix(api_server: ApiServer, world: dict[str, object], redis: Redis) -> None:
    subst = {k: str(v) for k, v in world.items() if k != "tokens"}
    tokens = world["tokens"]
    assert isinstance(tokens, dict)
    checked = 0
    for secret, token in tokens.values():
        with api_server.http(secret) as http:
            for ep in ENDPOINTS:
                before = redis.get(keys.JOB_NEXT)
                r = http.request(ep.method, str(_fill(ep.path, subst)), json=_fill(ep.body, subst))
                want = expected_status(ep, token, subst["ns"])
                where = f"{token.name} {ep.method} {ep.path}: {r.status_code} {r.text[:200]}"
                if want is None:
                    assert r.status_code not in (401, 403) and r.status_code < 500, where
                else:
                    assert r.status_code == want, where
                    assert r.json()["error"]["code"] == ("forbidden" if want == 403 else "not_found"), where
                    assert redis.get(keys.JOB_NEXT) == before, f"a refused request made a job: {where}"
                checked += 1
    assert checked == len(tokens) * len(ENDPOINTS)


def test_a_token_of_namespace_b_learns_nothing_about_namespace_a(api_server: ApiServer,
                                                                 world: dict[str, object]) -> None:
    ns, job = str(world["ns"]), int(str(world["job"]))
    tokens = world["tokens"]
    assert isinstance(tokens, dict)
    secret, _ = tokens[f"{ns}-admin-B"]
    with api_server.http(secret) as http:
        # a VM that exists and one that doesn't: the same answer, word for word
        exists = http.get(f"/api/v1/namespaces/{ns}/vms/v1")
        missing = http.get(f"/api/v1/namespaces/{ns}/vms/nosuch")
        assert exists.status_code == missing.status_code == 403
        assert exists.json() == missing.json()
        nowhere = http.get("/api/v1/namespaces/zz-never-made/vms/v1")
        assert nowhere.status_code == 403
        # a job of A and a job that doesn't exist: both "no job N"
        theirs = http.get(f"/api/v1/jobs/{job}")
        nojob = http.get("/api/v1/jobs/999999999")
        assert theirs.status_code == nojob.status_code == 404
        assert theirs.json()["error"] == {**nojob.json()["error"], "message": f"no job {job}"}
        assert http.post(f"/api/v1/jobs/{job}/cancel").status_code == 404
        assert http.get("/api/v1/jobs/wait", params={"ids": [job], "timeout": 0}).status_code == 404
        # namespace listings and whoami show only its own
        assert ns not in [n["name"] for n in http.get("/api/v1/namespaces").json()]
        assert http.get("/api/v1/whoami").json()["namespaces"] == [f"{ns}-b"]
        # one operation on A in a batch refuses the whole batch
        batch = {"operations": [{"op": "launch", "namespace": f"{ns}-b", "vm": "x", "params": {"memory_mib": 16}},
                                {"op": "kill", "namespace": ns, "vm": "v1"}]}
        assert http.post("/api/v1/jobs", json=batch).status_code == 403


def test_mutations_are_audited_with_the_token_name(api_server: ApiServer, world: dict[str, object],
                                                   client: RedisClient, redis: Redis) -> None:
    ns = str(world["ns"])
    tokens = world["tokens"]
    assert isinstance(tokens, dict)
    secret, _ = tokens[f"{ns}-operate-A"]
    with api_server.http(secret) as http:
        r = http.post(f"/api/v1/namespaces/{ns}/vms/v1/resume")
        assert r.status_code == 202 and r.headers["location"] == f"/api/v1/jobs/{r.json()[0]['id']}"
        job_id = r.json()[0]["id"]
        done = http.get(f"/api/v1/jobs/{job_id}/wait", params={"timeout": 20}).json()
        assert done["state"] == "succeeded"
    queued = [e for e in client.events(ns, job_id=job_id) if e.state == "queued"]
    assert [e.by for e in queued] == [f"token:{ns}-operate-A"]
    admin, _ = tokens[f"{ns}-admin-all"]
    with api_server.http(admin) as http:
        assert http.post("/api/v1/hosts/t1/drain").json()["state"] == "draining"
        assert http.post("/api/v1/hosts/t1/undrain").json()["state"] == "up"
    audit = [fields for _, fields in redis.xrevrange(keys.AUDIT, count=2)]
    assert [(f["state"], f["by"]) for f in audit] == [("undrained", f"token:{ns}-admin-all"),
                                                     ("draining", f"token:{ns}-admin-all")]


def test_tokens_are_stored_as_hashes_only_and_revocation_is_immediate(api_server: ApiServer, redis: Redis,
                                                                      settings: Settings) -> None:
    name = f"{settings.namespace}-tmp"
    secret = api_server.token(name, "read", [settings.namespace])
    stored = redis.hgetall(keys.token(digest(secret)))
    assert stored["name"] == name and secret not in json.dumps(stored)
    assert not any(secret in str(redis.dump(k)) for k in redis.scan_iter(f"{keys.PREFIX}:token*"))
    with api_server.http(secret) as http:
        assert http.get("/api/v1/whoami").status_code == 200
        api_server.revoke(name)
        assert http.get("/api/v1/whoami").status_code == 401


def test_token_commands(api_server: ApiServer, settings: Settings, redis: Redis) -> None:
    name = f"{settings.namespace}-cli"
    made = run_cli(settings, "--json", "token", "create", name, "--role", "operate")
    assert made.returncode == 0, made.stderr
    data = json.loads(made.stdout)
    assert (data["role"], data["namespaces"]) == ("operate", [settings.namespace])
    with api_server.http(data["secret"]) as http:
        assert http.get("/api/v1/whoami").json()["name"] == name
    listed = run_cli(settings, "token", "list")
    assert name in listed.stdout and data["secret"] not in listed.stdout
    again = run_cli(settings, "token", "create", name)
    assert again.returncode == 2 and "already exists" in again.stderr
    assert run_cli(settings, "token", "revoke", name).returncode == 0
    assert run_cli(settings, "token", "revoke", name).returncode == 3
    bad = run_cli(settings, "token", "create", "x", "--namespace", "Bad_NS")
    assert bad.returncode == 2 and "invalid namespace" in bad.stderr


def test_api_refuses_to_listen_beyond_loopback_without_auth(settings: Settings) -> None:
    proc = run_cli(settings, "api", "--host", "0.0.0.0", "--no-auth")
    assert proc.returncode == 2 and "refusing to serve without authentication" in proc.stderr


def test_the_cli_over_http_with_a_read_token_can_look_but_not_touch(api_server: ApiServer, world: dict[str, object],
                                                                   settings: Settings) -> None:
    ns = str(world["ns"])
    tokens = world["tokens"]
    assert isinstance(tokens, dict)
    secret, _ = tokens[f"{ns}-read-A"]
    http = settings.model_copy(update={"api_url": api_server.url, "token": secret})
    listed = run_cli(http, "--json", "vm", "list")
    assert listed.returncode == 0 and [v["name"] for v in json.loads(listed.stdout)] == ["v1"]
    refused = run_cli(http, "vm", "resume", "v1")
    assert refused.returncode == 2 and "has role read" in refused.stderr and "hint:" in refused.stderr
    other = run_cli(http.model_copy(update={"namespace": f"{ns}-b"}), "vm", "list")
    assert other.returncode == 2 and "no access to namespace" in other.stderr
    missing = run_cli(http.model_copy(update={"token": "vmo_wrong"}), "vm", "list")
    assert missing.returncode == 2 and "unknown or revoked API token" in missing.stderr

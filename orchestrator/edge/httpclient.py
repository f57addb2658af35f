"""``HttpClient``: the ``Client`` interface over the HTTP API, for users who don't reach Redis.

Errors come back as the API's JSON body ``{"error": {"code", "message", "hint"}}`` and are
raised again as the very ``VmorchError`` class the ``RedisClient`` raises, so the CLI prints
the same line, hint and exit code whichever client it uses.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

import httpx
from pydantic import TypeAdapter

from orchestrator.model.errors import ClusterUnavailable, InvalidInput, NotFound, OperationTimeout, VmorchError
from orchestrator.model.network import Network, NetworkSpec
from orchestrator.model.operation import Op, Operation, SubmitOptions
from orchestrator.model.records import Event, Host, Job, JobState, Namespace, Quota, Vm
from orchestrator.model.settings import Settings
from orchestrator.services.client import OnUpdate
from orchestrator.services.schedules import Schedule, ScheduleSpec
from orchestrator.store.history import History
from orchestrator.store.images import Image
from orchestrator.store.retention import PruneReport
from orchestrator.store.runs import ExperimentRun

_LIST_JOB = TypeAdapter(list[Job])
_LIST_VM = TypeAdapter(list[Vm])
_LIST_HOST = TypeAdapter(list[Host])
_LIST_EVENT = TypeAdapter(list[Event])
_LIST_NAMESPACE = TypeAdapter(list[Namespace])
_LIST_RUN = TypeAdapter(list[ExperimentRun])
_LIST_SCHEDULE = TypeAdapter(list[Schedule])
_LIST_IMAGE = TypeAdapter(list[Image])
_LIST_NETWORK = TypeAdapter(list[Network])

#: the longest one long-poll request asks the server to hold (the server may cap it lower)
WAIT_CHUNK = 30.0
#: with a progress display, the client asks again at least this often
PROGRESS_CHUNK = 2.0


class HttpClient:
    def __init__(self, settings: Settings, *, transport: httpx.BaseTransport | None = None) -> None:
        if not settings.api_url:
            raise InvalidInput("no API URL", hint="pass --api-url or set VMORCH_API_URL")
        self.settings = settings
        self.url = settings.api_url.rstrip("/")
        token = settings.resolved_token()
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=httpx.Timeout(30.0, connect=5.0),
                                 transport=transport)

    def close(self) -> None:
        self.http.close()

    # -- the wire ---------------------------------------------------------------------------

    def _call(self, method: str, path: str, *, timeout: float | None = None, **kwargs: Any) -> Any:
        extra: dict[str, Any] = {"timeout": httpx.Timeout(timeout, connect=5.0)} if timeout else {}
        try:
            response = self.http.request(method, path, **kwargs, **extra)
        except httpx.TransportError as exc:
            raise ClusterUnavailable(f"cannot reach the vmorch API at {self.url}: {exc}",
                                     hint="check --api-url / VMORCH_API_URL, and that 'vmorch api' runs") from None
        if response.is_success:
            return response.json() if response.content else None
        raise _error(response)

    # -- Client -----------------------------------------------------------------------------

    def submit(self, ops: Sequence[Operation], options: SubmitOptions | None = None) -> list[Job]:
        body: dict[str, Any] = {"operations": [o.model_dump(mode="json") for o in ops]}
        if options is not None:
            body["options"] = options.model_dump(mode="json")
        return _LIST_JOB.validate_python(self._call("POST", "/api/v1/jobs", json=body))

    def children(self, job_id: int) -> list[Job]:
        return _LIST_JOB.validate_python(self._call("GET", f"/api/v1/jobs/{int(job_id)}/children"))

    def retry(self, job_id: int) -> list[Job]:
        return _LIST_JOB.validate_python(self._call("POST", f"/api/v1/jobs/{int(job_id)}/retry"))

    def run_experiment(self, text: str, *, namespace: str, source: str = "") -> ExperimentRun:
        data = self._call("POST", f"{_ns(namespace)}/experiments", json={"text": text, "source": source})
        return ExperimentRun.model_validate(data)

    def experiment_run(self, run_id: int) -> ExperimentRun:
        # a run id alone doesn't say its namespace: the client's namespace is where it is looked for
        ns = self.settings.namespace
        return ExperimentRun.model_validate(self._call("GET", f"{_ns(ns)}/experiments/{int(run_id)}"))

    def experiment_runs(self, namespace: str, *, limit: int = 20) -> list[ExperimentRun]:
        return _LIST_RUN.validate_python(self._call("GET", f"{_ns(namespace)}/experiments", params={"limit": limit}))

    def add_schedule(self, spec: ScheduleSpec) -> Schedule:
        body = spec.model_dump(mode="json", exclude={"namespace"})
        return Schedule.model_validate(self._call("POST", f"{_ns(spec.namespace)}/schedules", json=body))

    def schedule(self, namespace: str, name: str, *, history: int = 10) -> Schedule:
        return Schedule.model_validate(self._call("GET", f"{_sched(namespace, name)}", params={"history": history}))

    def schedules(self, namespace: str) -> list[Schedule]:
        return _LIST_SCHEDULE.validate_python(self._call("GET", f"{_ns(namespace)}/schedules"))

    def pause_schedule(self, namespace: str, name: str, paused: bool) -> Schedule:
        action = "pause" if paused else "resume"
        return Schedule.model_validate(self._call("POST", f"{_sched(namespace, name)}/{action}"))

    def remove_schedule(self, namespace: str, name: str) -> None:
        self._call("DELETE", _sched(namespace, name))

    def plan(self, ops: Sequence[Operation]) -> dict[str, str]:
        body = {"operations": [o.model_dump(mode="json") for o in ops]}
        data = self._call("POST", "/api/v1/plan", json=body)
        return {entry["vm"]: entry["host"] for entry in data["plan"]}

    def job(self, job_id: int) -> Job:
        return Job.model_validate(self._call("GET", f"/api/v1/jobs/{int(job_id)}"))

    def jobs(self, namespace: str, *, vm: str | None = None, state: JobState | None = None,
             op: Op | None = None, limit: int = 50, before: int | None = None) -> list[Job]:
        params = _query(vm=vm, state=state.value if state else None, op=op.value if op else None, limit=limit,
                        before=before)
        return _LIST_JOB.validate_python(self._call("GET", f"{_ns(namespace)}/jobs", params=params))

    def wait(self, ids: Sequence[int], *, timeout: float | None = None,
             on_update: OnUpdate | None = None) -> list[Job]:
        """Long polls until every job is final; on_update after each answer."""
        if not ids:
            return []
        deadline = None if timeout is None else time.monotonic() + timeout
        chunk = PROGRESS_CHUNK if on_update else WAIT_CHUNK
        while True:
            left = chunk if deadline is None else max(0.0, min(chunk, deadline - time.monotonic()))
            jobs = _LIST_JOB.validate_python(self._call("GET", "/api/v1/jobs/wait", timeout=left + 30.0,
                                                params={"ids": [int(i) for i in ids], "timeout": f"{left:.3f}"}))
            if on_update:
                on_update(jobs)
            if all(j.state.final for j in jobs) or (deadline is not None and time.monotonic() >= deadline):
                return jobs

    def cancel(self, job_id: int) -> Job:
        return Job.model_validate(self._call("POST", f"/api/v1/jobs/{int(job_id)}/cancel"))

    def vm(self, namespace: str, name: str) -> Vm:
        return Vm.model_validate(self._call("GET", f"{_ns(namespace)}/vms/{quote(name, safe='')}"))

    def vms(self, namespace: str) -> list[Vm]:
        return _LIST_VM.validate_python(self._call("GET", f"{_ns(namespace)}/vms"))

    def hosts(self) -> list[Host]:
        return _LIST_HOST.validate_python(self._call("GET", "/api/v1/hosts"))

    def drain(self, host: str, draining: bool) -> Host:
        action = "drain" if draining else "undrain"
        return Host.model_validate(self._call("POST", f"/api/v1/hosts/{quote(host, safe='')}/{action}"))

    def events(self, namespace: str, *, vm: str | None = None, job_id: int | None = None,
               limit: int = 100) -> list[Event]:
        params = _query(vm=vm, job_id=job_id, limit=limit)
        return _LIST_EVENT.validate_python(self._call("GET", f"{_ns(namespace)}/events", params=params))

    def history(self, namespace: str, *, vm: str | None = None, job_id: int | None = None,
                limit: int = 100) -> History:
        params = _query(vm=vm, job_id=job_id, limit=limit)
        return History.model_validate(self._call("GET", f"{_ns(namespace)}/history", params=params))

    def prune(self, namespace: str | None, *, older_than: float | None = None) -> PruneReport:
        params = _query(namespace=namespace, older_than=older_than)
        return PruneReport.model_validate(self._call("POST", "/api/v1/jobs/prune", params=params, timeout=600.0))

    def namespaces(self) -> list[Namespace]:
        return _LIST_NAMESPACE.validate_python(self._call("GET", "/api/v1/namespaces"))

    def create_namespace(self, name: str, hosts: list[str] | None) -> Namespace:
        return Namespace.model_validate(self._call("POST", "/api/v1/namespaces", json={"name": name, "hosts": hosts}))

    def set_quota(self, name: str, quota: Quota) -> Namespace:
        return Namespace.model_validate(self._call("PUT", f"{_ns(name)}/quota",
                                                   json=quota.model_dump()))

    def update_quota(self, name: str, changes: Quota) -> Namespace:
        return Namespace.model_validate(self._call("PATCH", f"{_ns(name)}/quota",
                                                   json=changes.model_dump(exclude_none=True)))

    def delete_namespace(self, name: str, *, force: bool) -> list[Job]:
        return _LIST_JOB.validate_python(self._call("POST", f"{_ns(name)}/deletion",
                                            params={"force": "true" if force else "false"}))

    def finish_namespace_delete(self, name: str) -> int:
        return int(self._call("DELETE", _ns(name))["removed_keys"])

    def images(self) -> list[Image]:
        return _LIST_IMAGE.validate_python(self._call("GET", "/api/v1/images"))

    def image(self, name: str) -> Image:
        return Image.model_validate(self._call("GET", f"/api/v1/images/{quote(name, safe='')}"))

    def import_image(self, name: str, source: str, *, sha256: str | None = None,
                     hosts: Sequence[str] | None = None, allow_file: bool = True) -> list[Job]:
        """``allow_file`` is the server's to decide: it goes by the token's role."""
        body = {"name": name, "source": source, "sha256": sha256, "hosts": list(hosts) if hosts else None}
        return _LIST_JOB.validate_python(self._call("POST", "/api/v1/images", json=body))

    def remove_image(self, name: str) -> list[Job]:
        return _LIST_JOB.validate_python(self._call("DELETE", f"/api/v1/images/{quote(name, safe='')}"))

    def networks(self, namespace: str) -> list[Network]:
        return _LIST_NETWORK.validate_python(self._call("GET", f"{_ns(namespace)}/networks"))

    def network(self, namespace: str, name: str) -> Network:
        return Network.model_validate(self._call("GET", _net(namespace, name)))

    def create_network(self, namespace: str, spec: NetworkSpec) -> Network:
        return Network.model_validate(self._call("POST", f"{_ns(namespace)}/networks",
                                                 json=spec.model_dump(mode="json")))

    def delete_network(self, namespace: str, name: str) -> Network:
        return Network.model_validate(self._call("DELETE", _net(namespace, name)))

    def wait_network(self, namespace: str, name: str, *, gone: bool, timeout: float) -> Network | None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                net = self.network(namespace, name)
            except NotFound:
                if gone:
                    return None
                raise
            if not gone and net.state == "ready":
                return net
            if time.monotonic() >= deadline:
                raise OperationTimeout(f"network {name!r} is still {net.state} after {timeout:g}s, waiting for its "
                                       f"gateway host {net.gateway_host!r}" + (f": {net.error}" if net.error else ""),
                                       hint=f"see 'vmorch host list' and 'vmorch net show {name}'")
            time.sleep(0.3)

    def capture(self, namespace: str, name: str, *, vm: str | None, seconds: float) -> bytes:
        try:
            response = self.http.post(f"{_net(namespace, name)}/capture", params=_query(vm=vm, seconds=seconds),
                                      timeout=httpx.Timeout(seconds + 60, connect=5.0))
        except httpx.TransportError as exc:
            raise ClusterUnavailable(f"cannot reach the vmorch API at {self.url}: {exc}",
                                     hint="check --api-url / VMORCH_API_URL, and that 'vmorch api' runs") from None
        if response.is_success:
            return response.content
        raise _error(response)


def _ns(namespace: str) -> str:
    return f"/api/v1/namespaces/{quote(namespace, safe='')}"


def _net(namespace: str, name: str) -> str:
    return f"{_ns(namespace)}/networks/{quote(name, safe='')}"


def _sched(namespace: str, name: str) -> str:
    return f"{_ns(namespace)}/schedules/{quote(name, safe='')}"


def _query(**params: Any) -> dict[str, Any]:
    return {k: v for k, v in params.items() if v is not None}


def _error(response: httpx.Response) -> VmorchError:
    """The API's error body as the error class it names; anything else as a plain VmorchError."""
    try:
        detail = response.json()["error"]
        if not isinstance(detail, dict) or "code" not in detail:
            raise ValueError(detail)
    except (ValueError, KeyError, TypeError):
        text = response.text.strip().splitlines()[0][:200] if response.text.strip() else response.reason_phrase
        if response.status_code >= 500:
            return ClusterUnavailable(f"the vmorch API answered {response.status_code}: {text}",
                                      hint="see the API's log")
        return VmorchError(f"the vmorch API answered {response.status_code}: {text}",
                           hint="is --api-url the vmorch API?")
    return VmorchError.from_dict(detail)

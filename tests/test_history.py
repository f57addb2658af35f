"""History: every job state change and VM change lands in the namespace's event stream."""

from __future__ import annotations

import json

from redis import Redis

from orchestrator.edge.httpclient import HttpClient
from orchestrator.model.operation import Op
from orchestrator.model.settings import Settings
from orchestrator.services.client import RedisClient
from orchestrator.store import keys

from .apiserver import ApiServer
from .conftest import WorkerProc, ops, run_cli


def test_vm_history_and_job_timeline(cluster: list[WorkerProc], client: RedisClient, settings: Settings) -> None:
    ns = settings.namespace
    jobs = client.submit(ops(Op.LAUNCH, ns, "hist", memory_mib=32))
    jobs += client.submit(ops(Op.PAUSE, ns, "hist") + ops(Op.KILL, ns, "hist") + ops(Op.PAUSE, ns, "hist"))
    launch, pause, kill, refused = client.wait([j.id for j in jobs])

    events = client.events(ns, vm="hist")
    job_states = [(e.job, e.state) for e in events if e.kind == "job"]
    for job in (launch, pause, kill, refused):
        mine = [state for job_id, state in job_states if job_id == job.id]
        assert mine[0] == "queued" and mine[-1] == job.state.value and "running" in mine, (job.id, mine)
        assert set(mine) <= {"queued", "waiting", "running", job.state.value}
    # the jobs ran in seq order, so their "running" events are in seq order too
    running = [job_id for job_id, state in job_states if state == "running"]
    assert running == [launch.id, pause.id, kill.id, refused.id]
    vm_states = [e.state for e in events if e.kind == "vm"]
    assert vm_states == ["missing", "running", "paused", "shutoff", "shutoff"]
    failed = next(e for e in events if e.job == refused.id and e.state == "failed")
    assert "invalid_state" in failed.detail and failed.by.startswith(refused.host)

    shown = run_cli(settings, "--json", "job", "show", str(kill.id))
    timeline = json.loads(shown.stdout)["events"]
    assert [e["state"] for e in timeline if e["kind"] == "job"][-1] == "succeeded"
    human = run_cli(settings, "vm", "history", "hist")
    assert human.returncode == 0 and "invalid_state" in human.stdout and "registered on host" in human.stdout
    assert run_cli(settings, "vm", "history", "nohist").returncode == 3


def test_history_shows_a_launch_registering_its_vm_as_launching(cluster: list[WorkerProc], client: RedisClient,
                                                                 settings: Settings) -> None:
    """A launch registers its VM record (libvirt has no domain yet: state ``missing``) before its job runs."""
    [launch] = client.submit(ops(Op.LAUNCH, settings.namespace, "fresh", memory_mib=32))
    client.wait([launch.id])
    human = run_cli(settings, "vm", "history", "fresh")
    assert human.returncode == 0, human.stderr
    [registered] = [line for line in human.stdout.splitlines() if "registered on host" in line]
    assert "launching" in registered and "missing" not in registered, registered
    assert "missing" not in human.stdout
    as_json = json.loads(run_cli(settings, "--json", "vm", "history", "fresh").stdout)
    assert next(e["state"] for e in as_json if e["kind"] == "vm") == "missing"  # the JSON keeps the record's


def test_a_busy_vm_does_not_push_out_another_vms_history(cluster: list[WorkerProc], client: RedisClient,
                                                          settings: Settings, redis: Redis,
                                                          api_server: ApiServer) -> None:
    """Each VM has a history of its own size: the busiest VM trims its own, not another's; and a VM's
    or a job's history is read from its own key, never found by scanning the namespace's stream."""
    ns = settings.namespace
    jobs = client.submit(ops(Op.LAUNCH, ns, "quiet", memory_mib=32) + ops(Op.LAUNCH, ns, "busy", memory_mib=32))
    client.wait([j.id for j in jobs])
    [pause] = client.submit(ops(Op.PAUSE, ns, "quiet"))
    client.wait([pause.id])
    before = client.history(ns, vm="quiet")
    assert before.trimmed == 0
    assert [e.state for e in before.events if e.kind == "vm"] == ["missing", "running", "paused"]
    timeline = client.history(ns, job_id=pause.id)

    for i in range(keys.VM_HISTORY_MAX + 300):  # far more than the busy VM keeps (it trims in nodes of 100)
        client.store.add_event(ns, kind="vm", vm="busy", state="running", by="test", detail=f"change {i}")
    redis.xtrim(keys.events(ns), maxlen=0)  # the namespace's stream holds nothing now

    after = client.history(ns, vm="quiet")
    assert after == before  # intact: its history never was in the busy VM's way
    assert client.history(ns, job_id=pause.id) == timeline
    assert [e.state for e in timeline.events if e.kind == "job"][-1] == "succeeded"
    busy = client.history(ns, vm="busy", limit=5)
    assert busy.trimmed >= 200 and [e.detail for e in busy.events][-1] == f"change {keys.VM_HISTORY_MAX + 299}"
    assert len(busy.events) == 5

    shown = run_cli(settings, "vm", "history", "quiet")
    assert shown.returncode == 0 and "registered on host" in shown.stdout, shown.stderr
    timeline_json = json.loads(run_cli(settings, "--json", "job", "show", str(pause.id)).stdout)["events"]
    assert [e["state"] for e in timeline_json if e["kind"] == "job"][-1] == "succeeded"
    # the API says what was trimmed, over the HTTP client too
    with api_server.http(api_server.admin_token) as http:
        answer = http.get(f"/api/v1/namespaces/{ns}/history", params={"vm": "busy", "limit": 3}).json()
        assert answer["trimmed"] == busy.trimmed and len(answer["events"]) == 3
        assert http.get(f"/api/v1/namespaces/{ns}/history", params={"vm": "quiet"}).json()["trimmed"] == 0
        events = http.get(f"/api/v1/namespaces/{ns}/events", params={"vm": "quiet"}).json()
        assert [e["id"] for e in events] == [e.id for e in before.events]
    http_client = HttpClient(settings.model_copy(update={"api_url": api_server.url, "token": api_server.admin_token}))
    try:
        assert http_client.history(ns, job_id=pause.id) == timeline
    finally:
        http_client.close()

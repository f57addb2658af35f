"""History: every job state change and VM change lands in the namespace's event stream."""

from __future__ import annotations

import json

from orchestrator.model.operation import Op
from orchestrator.model.settings import Settings
from orchestrator.services.client import RedisClient

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

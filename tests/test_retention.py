"""Retention: old finished jobs go with their history (archived first if asked), and nothing that an
unfinished job still needs goes with them. Real Redis, real workers; ``prune_once`` is what the
workers' janitors call, ``vmorch job prune`` what people run."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from redis import Redis

from cli.prune import parse_duration
from orchestrator.control.queue import enqueue
from orchestrator.edge.httpclient import HttpClient
from orchestrator.model.errors import InvalidInput
from orchestrator.model.operation import Op, SubmitOptions
from orchestrator.model.records import JobState
from orchestrator.model.settings import Settings
from orchestrator.services.client import RedisClient
from orchestrator.store import keys
from orchestrator.store.jobstore import BatchEntry
from orchestrator.store.retention import prune_once

from .apiserver import ApiServer
from .conftest import PYTHON, ROOT, WorkerProc, accept, ops, run_cli, settings_env


def run(client: RedisClient, op: Op, target: str, **params: object) -> list[int]:
    """Submit and wait; the ids of the jobs made, the parent's first."""
    jobs = client.submit(ops(op, client.settings.namespace, target, **params))
    done = client.wait([j.id for j in jobs], timeout=60)
    assert all(j.state is JobState.SUCCEEDED for j in done), done
    parents = sorted({j.parent for j in jobs if j.parent is not None})
    return parents + [j.id for j in jobs]


def gone(redis: Redis, ns: str, job_id: int) -> bool:
    return not redis.exists(keys.job(job_id), keys.job_history(job_id), keys.job_children(job_id)) \
        and redis.zscore(keys.jobs(ns), job_id) is None


def test_old_finished_jobs_go_archived_first_and_unfinished_ones_stay(
        cluster: list[WorkerProc], client: RedisClient, settings: Settings, redis: Redis, tmp_path: Path) -> None:
    ns = settings.namespace
    bulk = run(client, Op.LAUNCH, "r[1-2]", memory_mib=32, disk_gib=0)  # a parent and its two children
    [pause] = run(client, Op.PAUSE, "r1")
    queued = accept(client, ops(Op.PAUSE, ns, "r2")[0])  # accepted, its wake-up never sent: unfinished
    archive = tmp_path / "archive"
    keeping = settings.model_copy(update={"job_archive_dir": archive})
    now = client.store.redis_time() + 1

    fresh = prune_once(client.store, keeping, now, namespace=ns)  # the default retention: a week
    assert fresh.removed == 0 and not (archive / f"{ns}.jsonl").exists()
    # a batch stops once full, but a parent never goes without its children
    first = prune_once(client.store, keeping, now, namespace=ns, older_than=0, limit=1)
    assert (first.removed, first.archived, first.more) == (3, 3, True)
    rest = prune_once(client.store, keeping, now, namespace=ns, older_than=0)
    assert (rest.removed, rest.archived, rest.namespaces.get(ns)) == (1, 1, 1)

    assert all(gone(redis, ns, i) for i in [*bulk, pause])
    assert client.job(queued.id).state is JobState.QUEUED and redis.zscore(keys.vm_mailbox(ns, "r2"), queued.id)
    lines = [json.loads(line) for line in (archive / f"{ns}.jsonl").read_text().splitlines()]
    assert [line["id"] for line in lines] == [*bulk, pause]
    archived = lines[-1]
    assert [archived[f] for f in ("op", "vm", "state", "namespace")] == ["pause", "r1", "succeeded", ns]
    states = [e["state"] for e in archived["events"] if e["kind"] == "job"]
    assert states[0] == "queued" and states[-1] == "succeeded" and "running" in states
    assert lines[0]["op"] == "bulk" and lines[0]["events"][-1]["state"] == "succeeded"
    # the VM's history stays with the VM (its stream has a size of its own), jobs gone or not
    assert any(e.job == pause and e.state == "succeeded" for e in client.history(ns, vm="r1").events)

    client.cancel(queued.id)  # final now: it goes at the next pass, appended to the same file
    assert prune_once(client.store, keeping, client.store.redis_time() + 1, namespace=ns, older_than=0).removed == 1
    last = json.loads((archive / f"{ns}.jsonl").read_text().splitlines()[-1])
    assert (last["id"], last["state"]) == (queued.id, "canceled") and gone(redis, ns, queued.id)


def test_what_an_unfinished_job_needs_stays(cluster: list[WorkerProc], client: RedisClient, settings: Settings,
                                            redis: Redis) -> None:
    ns = settings.namespace
    launches = run(client, Op.LAUNCH, "k[1-4]", memory_mib=32, disk_gib=0)
    app = client.celery
    # c stays unfinished; b waits for a and c; a finishes: an unfinished job (b) depends on it
    c = accept(client, ops(Op.PAUSE, ns, "k1")[0])
    a = accept(client, ops(Op.PAUSE, ns, "k2")[0])
    [b] = client.submit(ops(Op.RESUME, ns, "k2"), SubmitOptions(after=[a.id, c.id]))
    enqueue(app, a.host, ns, "k2", a.id)
    # a parent with one child finished and one not
    parent, [done_child, open_child] = client.store.submit_batch(
        [BatchEntry(ops(Op.PAUSE, ns, "k3")[0]), BatchEntry(ops(Op.PAUSE, ns, "k4")[0])],
        parent={"namespace": ns, "params": {}})
    assert parent is not None
    enqueue(app, done_child.host, ns, "k3", done_child.id)
    assert [j.state for j in client.wait([a.id, done_child.id], timeout=30)] == [JobState.SUCCEEDED] * 2
    assert client.job(b.id).state is JobState.QUEUED and client.job(parent).state is JobState.RUNNING

    report = prune_once(client.store, settings, client.store.redis_time() + 1, namespace=ns, older_than=0)
    assert report.removed == len(launches) and report.kept == 1  # a: b needs it
    assert all(gone(redis, ns, i) for i in launches)
    for kept in (a.id, b.id, c.id, parent, done_child.id, open_child.id):
        assert redis.exists(keys.job(kept)) and redis.zscore(keys.jobs(ns), kept), kept
    assert redis.exists(keys.job_history(a.id))

    client.cancel(c.id)  # b needed c to succeed: it fails at once
    client.cancel(open_child.id)  # the parent is final with its last child
    assert all(j.state.final for j in client.wait([b.id, parent], timeout=30))
    report = prune_once(client.store, settings, client.store.redis_time() + 1, namespace=ns, older_than=0)
    assert report.removed == 6 and report.kept == 0
    assert all(gone(redis, ns, i) for i in (a.id, b.id, c.id, parent, done_child.id, open_child.id))


def test_a_deleted_vms_history_stays_until_its_last_job_goes(cluster: list[WorkerProc], client: RedisClient,
                                                              settings: Settings, redis: Redis) -> None:
    ns = settings.namespace
    run(client, Op.LAUNCH, "gone", memory_mib=32, disk_gib=0)
    run(client, Op.DELETE, "gone")
    run(client, Op.LAUNCH, "back", memory_mib=32, disk_gib=0)
    run(client, Op.DELETE, "back")
    run(client, Op.LAUNCH, "back", memory_mib=32, disk_gib=0)  # the name launched again
    history = client.history(ns, vm="gone")
    assert [e.state for e in history.events if e.kind == "vm"][-1] == "deleted"  # a deleted VM's history is kept
    later = client.store.redis_time() + 5
    assert prune_once(client.store, settings, later, namespace=ns).removed == 0  # a week, by default
    assert prune_once(client.store, settings, later, namespace=ns, older_than=0).removed == 5
    assert not redis.exists(keys.vm_history(ns, "gone"))
    back = client.history(ns, vm="back").events
    assert [e.state for e in back if e.kind == "vm"].count("deleted") == 1 and client.vm(ns, "back")


@pytest.mark.parametrize(("text", "seconds"), [("90", 90), ("90s", 90), ("30m", 1800), ("12h", 43200),
                                               ("7d", 604800), ("2w", 1209600), ("1d12h", 129600), ("0", 0),
                                               ("1.5h", 5400), (" 7D ", 604800)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "7x", "-5", "d7", "1d 2h", "h", "1e9", "99999999999"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(InvalidInput, match="--older-than") as caught:
        parse_duration(text)
    assert caught.value.exit_code == 2


def test_job_prune_on_the_command_line(cluster: list[WorkerProc], client: RedisClient, settings: Settings,
                                       redis: Redis, tmp_path: Path) -> None:
    ns = settings.namespace
    ids = run(client, Op.LAUNCH, "cli1", memory_mib=32, disk_gib=0) + run(client, Op.PAUSE, "cli1")
    bad = run_cli(settings, "job", "prune", "--older-than", "soon")
    assert bad.returncode == 2 and "--older-than: 'soon' is not a duration" in bad.stderr, bad.stderr
    assert run_cli(settings, "job", "prune", "--older-than", "-1").returncode == 2

    recent = run_cli(settings, "job", "prune", "--older-than", "1h")
    assert recent.returncode == 0 and "removed 0 jobs finished before" in recent.stdout, recent.stderr
    assert all(redis.exists(keys.job(i)) for i in ids)

    archive = tmp_path / "archive"
    env = {**settings_env(settings), "VMORCH_JOB_ARCHIVE_DIR": str(archive)}
    done = subprocess.run([PYTHON, "-m", "cli", "--namespace", ns, "--json", "job", "prune", "--older-than", "0s"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["removed"], report["archived"], report["namespaces"]) == (2, 2, {ns: 2})
    assert report["archive_dir"] == str(archive) and report["more"] is False
    assert [json.loads(line)["id"] for line in (archive / f"{ns}.jsonl").read_text().splitlines()] == ids
    assert all(gone(redis, ns, i) for i in ids)
    human = run_cli(settings, "job", "prune", "--older-than", "0")
    assert human.returncode == 0 and "removed 0 jobs" in human.stdout


def test_prune_over_the_api_needs_admin(cluster: list[WorkerProc], client: RedisClient, settings: Settings,
                                        redis: Redis, api_server: ApiServer) -> None:
    ns = settings.namespace
    ids = run(client, Op.LAUNCH, "api1", memory_mib=32, disk_gib=0)
    operator = api_server.token(f"{ns}-operate", "operate", [ns])
    with api_server.http(operator) as http:
        assert http.post("/api/v1/jobs/prune", params={"namespace": ns, "older_than": 0}).status_code == 403
    admin = api_server.token(f"{ns}-admin", "admin", [ns])
    with api_server.http(admin) as http:
        assert http.post("/api/v1/jobs/prune", params={"older_than": 0}).status_code == 403  # every namespace
        assert http.post("/api/v1/jobs/prune", params={"namespace": ns, "older_than": -1}).status_code == 422
    over_http = HttpClient(settings.model_copy(update={"api_url": api_server.url, "token": admin}))
    try:
        report = over_http.prune(ns, older_than=0)
    finally:
        over_http.close()
    assert (report.removed, report.namespaces, report.archive_dir) == (1, {ns: 1}, None)
    assert all(gone(redis, ns, i) for i in ids)

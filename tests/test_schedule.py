"""Schedules with the real scheduler (celery beat + RedBeat): firings, history, dedup, failover."""

from __future__ import annotations

import itertools
import json
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from orchestrator.model.errors import AlreadyExists, InvalidInput, NotFound
from orchestrator.model.operation import Op, StopParams, TagParams, TargetedOp
from orchestrator.model.records import JobState
from orchestrator.model.settings import Settings
from orchestrator.services import firing, schedules
from orchestrator.services.client import RedisClient
from orchestrator.services.schedules import ScheduleSpec
from orchestrator.store import keys

from .conftest import PYTHON, WorkerProc, ops, run_cli, settings_env, wait_until
from .helpers import process

EXPERIMENT = """\
name: tiny
vms:
  - name: tiny1
    memory: 32
    disk: 0
steps:
  - op: pause
    target: tiny1
teardown: delete
"""


@contextmanager
def scheduler(settings: Settings, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    env = {**settings_env(settings), "VMORCH_SCHEDULER_LOCK_TIMEOUT": "3", "VMORCH_SCHEDULER_TICK": "0.5"}
    with process([PYTHON, "-m", "cli", "scheduler"], env, log) as proc:
        yield proc


def pause(target: str) -> TargetedOp:
    return TargetedOp(op=Op.PAUSE, target=target)


def tag(target: str, **tags: str) -> TargetedOp:
    return TargetedOp(op=Op.TAG, target=target, params=TagParams(set=tags))


def fired(client: RedisClient, name: str) -> list[schedules.Firing]:
    return client.schedule(client.settings.namespace, name, history=100).history[::-1]  # oldest first


def test_bad_schedules_are_refused_and_nothing_is_written(client: RedisClient, settings: Settings) -> None:
    ns = settings.namespace
    for args, message in [
        (["--cron", "61 * * * *", "--", "vm", "pause", "x"], "bad cron expression"),
        (["--every", "10 parsecs", "--", "vm", "pause", "x"], "bad interval"),
        (["--at", "2001-01-01T00:00:00", "--", "vm", "pause", "x"], "in the past"),
        (["--every", "1h", "--", "vm", "pause", "x", "--bogus"], "No such option"),
        (["--every", "1h", "--", "vm", "list"], "can't schedule"),
        (["--every", "1h"], "either --experiment FILE or a vm command"),
        (["--every", "1h", "--cron", "* * * * *", "--", "vm", "pause", "x"], "exactly one of"),
    ]:
        proc = run_cli(settings, "schedule", "add", "bad", *args)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)
    assert client.schedules(ns) == []
    with pytest.raises(InvalidInput, match="bad experiment"):
        client.add_schedule(ScheduleSpec(name="bad", namespace=ns, every="1h", experiment="name: x\nsteps: 3\n"))
    with pytest.raises(NotFound):
        client.schedule(ns, "bad")


def test_two_firings_of_one_slot_at_once_make_one_set_of_jobs(cluster: list[WorkerProc], client: RedisClient) -> None:
    """Two schedulers fire the same slot at the same moment: one records it, both see the same jobs."""
    ns = client.settings.namespace
    client.wait([j.id for j in client.submit(ops(Op.LAUNCH, ns, "fx", memory_mib=16))])
    client.add_schedule(ScheduleSpec(name="race", namespace=ns, every="1s", operations=[
        TargetedOp(op=Op.TAG, target="fx", params=TagParams(set={"fired": "yes"}))]))
    try:
        raw = client._schedules.raw(ns, "race")
        wait_until(lambda: schedules.current_slot(raw, client.store.redis_time()) is not None, what="the first slot")
        now = client.store.redis_time()
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(lambda who: firing.fire(client, ns, "race", by=who, now=now), ["a", "b"]))
        recorded = [r for r in results if r is not None]
        assert len(recorded) == 1 and recorded[0].state == "fired", results
        tags = [j for j in client.jobs(ns, op=Op.TAG)]
        assert len(tags) == 1, tags  # one job, though both firings submitted
        assert len(fired(client, "race")) == 1
    finally:
        client.remove_schedule(ns, "race")


def test_a_firing_whose_scheduler_died_after_submitting_is_recorded_once_with_its_jobs(
        cluster: list[WorkerProc], client: RedisClient) -> None:
    """The scheduler died between making a slot's jobs and recording them: the firing, delivered again,
    finds those jobs (same idempotency key), makes none, and records the slot once."""
    ns = client.settings.namespace
    client.wait([j.id for j in client.submit(ops(Op.LAUNCH, ns, "fy", memory_mib=16))])
    client.add_schedule(ScheduleSpec(name="crash", namespace=ns, every="1s", operations=[
        TargetedOp(op=Op.TAG, target="fy", params=TagParams(set={"fired": "yes"}))]))
    try:
        store = client._schedules
        raw = store.raw(ns, "crash")
        wait_until(lambda: schedules.current_slot(raw, client.store.redis_time()) is not None, what="the first slot")
        now = client.store.redis_time()
        with store.locked(ns, "crash"):
            due = store.due(ns, "crash", now)
        assert due is not None
        h, slot, _ = due
        # what the dead scheduler did: the jobs, under the slot's key; no claim, no record
        made = firing.submit(client, ns, schedules.operations(h) or [],
                             idempotency_key=f"schedule/{ns}/crash/{slot:.6f}")
        again = firing.fire(client, ns, "crash", by="standby", now=now)
        assert again is not None and again.jobs == made
        assert [j.id for j in client.jobs(ns, op=Op.TAG)] == made
        assert firing.fire(client, ns, "crash", by="late", now=now) is None  # recorded: not again
        assert [f.jobs for f in fired(client, "crash")] == [made]
    finally:
        client.remove_schedule(ns, "crash")


def test_a_slot_fires_once_even_when_two_firings_race(cluster: list[WorkerProc], client: RedisClient) -> None:
    ns = client.settings.namespace
    sched = client.add_schedule(ScheduleSpec(name="exp", namespace=ns, every="1s", experiment=EXPERIMENT,
                                             source="inline"))
    try:
        assert sched.next_at is not None and sched.what == "experiment inline" and sched.when == "every 1s"
        with pytest.raises(AlreadyExists):
            client.add_schedule(ScheduleSpec(name="exp", namespace=ns, every="1s", operations=[pause("x")]))
        raw = client._schedules.raw(ns, "exp")
        wait_until(lambda: schedules.current_slot(raw, client.store.redis_time()) is not None, what="the first slot")
        first = firing.fire(client, ns, "exp", by="a")
        second = firing.fire(client, ns, "exp", by="b")  # the same slot: a duplicate
        assert first is not None and first.state == "fired" and first.run is not None and second is None
        run = client.experiment_run(first.run)
        assert run.source == "schedule:exp" and [s.job for s in run.steps] == first.jobs
        done = client.wait(first.jobs, timeout=60)
        assert [j.state for j in done] == [JobState.SUCCEEDED] * 3
        assert [f.run for f in fired(client, "exp")] == [first.run]

        client.pause_schedule(ns, "exp", True)
        time.sleep(1.2)
        assert firing.fire(client, ns, "exp") is None  # paused
        assert client.schedule(ns, "exp").next_at is None
    finally:
        client.remove_schedule(ns, "exp")


def test_a_recurring_schedule_fires_repeatedly_through_the_scheduler(cluster: list[WorkerProc], client: RedisClient,
                                                                     settings: Settings, tmp_path: Path) -> None:
    ns = settings.namespace
    client.wait([j.id for j in client.submit(ops(Op.LAUNCH, ns, "s1", memory_mib=32, disk_gib=0))], timeout=30)
    added = run_cli(settings, "--json", "schedule", "add", "tagger", "--every", "2s", "--", "vm", "tag", "s1", "k=v")
    assert added.returncode == 0, added.stderr
    try:
        with scheduler(settings, tmp_path / "scheduler.log") as proc:
            start = time.monotonic()
            wait_until(lambda: len(fired(client, "tagger")) >= 3, timeout=15,
                       what=f"three firings; log:\n{(tmp_path / 'scheduler.log').read_text()[-3000:]}")
            assert proc.poll() is None
            assert time.monotonic() - start < 15
        history = fired(client, "tagger")
        slots = [f.slot for f in history]
        assert len(set(slots)) == len(slots) and all(f.state == "fired" for f in history)
        assert all((b - a) % timedelta(seconds=2) == timedelta(0) for a, b in itertools.pairwise(slots))
        jobs = client.wait([i for f in history for i in f.jobs], timeout=30)
        assert jobs and all(j.op is Op.TAG and j.vm == "s1" and j.state is JobState.SUCCEEDED for j in jobs)
        shown = json.loads(run_cli(settings, "--json", "schedule", "show", "tagger").stdout)
        assert shown["next_at"] is not None and len(shown["history"]) >= 3
        listed = run_cli(settings, "schedule", "list")
        assert "tagger" in listed.stdout and "every 2s" in listed.stdout
    finally:
        assert run_cli(settings, "schedule", "remove", "tagger").returncode == 0


def test_a_standby_scheduler_takes_over_after_a_sigkill_and_no_slot_runs_twice(
        cluster: list[WorkerProc], client: RedisClient, settings: Settings, tmp_path: Path) -> None:
    ns = settings.namespace
    client.wait([j.id for j in client.submit(ops(Op.LAUNCH, ns, "fo1", memory_mib=32, disk_gib=0))], timeout=30)
    client.add_schedule(ScheduleSpec(name="fo", namespace=ns, every="1s", operations=[tag("fo1", k="v")]))
    try:
        with scheduler(settings, tmp_path / "a.log") as a:
            wait_until(lambda: len(fired(client, "fo")) >= 1, timeout=15, what="a's first firing")
            with scheduler(settings, tmp_path / "b.log") as b:
                time.sleep(3)  # b runs, as a standby, while a fires
                before = len(fired(client, "fo"))
                a.send_signal(signal.SIGKILL)
                a.wait()
                killed = datetime.now(UTC)
                wait_until(lambda: any(f.fired_at > killed for f in fired(client, "fo")), timeout=15,
                           what=f"b to take over; log:\n{(tmp_path / 'b.log').read_text()[-3000:]}")
                takeover = min(f.fired_at for f in fired(client, "fo") if f.fired_at > killed) - killed
                wait_until(lambda: len(fired(client, "fo")) >= before + 3, timeout=15, what="b to keep firing")
                assert b.poll() is None
        history = fired(client, "fo")
        slots = [f.slot for f in history]
        assert len(set(slots)) == len(slots), "a slot ran twice"
        assert all(f.state == "fired" for f in history)
        print(f"scheduler failover after SIGKILL: {takeover.total_seconds():.1f}s")
        assert takeover < timedelta(seconds=3 + 0.5 + 3)  # the lock's timeout, a tick, and a firing's own time
        client.wait([i for f in history for i in f.jobs], timeout=30)
    finally:
        client.remove_schedule(ns, "fo")


@pytest.mark.parametrize("missed", ["once", "skip"])
def test_a_late_firing_runs_once_or_is_skipped_as_asked(client: RedisClient, missed: str) -> None:
    """After downtime RedBeat fires a late schedule once; the slot it stands for is the last one due."""
    ns = client.settings.namespace
    client.add_schedule(ScheduleSpec(name="late", namespace=ns, every="1h", operations=[pause("x")],
                                     missed=missed))  # type: ignore[arg-type]
    try:
        store = client._schedules
        raw = store.raw(ns, "late")
        anchor = float(int(float(raw["created_at"])))
        with client.locks.hold(schedules.lock(ns, "late"), timeout=5):
            due = store.due(ns, "late", anchor + 3 * 3600 + 120)  # 3 slots missed, 2 min after the last
            assert due is not None
            _, slot, skip = due
            assert slot == anchor + 3 * 3600 and skip is (missed == "skip")
            assert store.claim(ns, "late", slot) is True
            assert store.due(ns, "late", anchor + 3 * 3600 + 121) is None  # that slot is taken now
            assert store.claim(ns, "late", slot) is False  # and not twice
            assert store.claim(ns, "late", anchor + 3600) is False  # nor an older one after it
    finally:
        client.remove_schedule(ns, "late")


def test_cron_and_one_off_schedules_say_when_they_fire_next(client: RedisClient) -> None:
    ns = client.settings.namespace
    at = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=2)
    try:
        stop = TargetedOp(op=Op.STOP, target="x", params=StopParams(force=True))
        cron = client.add_schedule(ScheduleSpec(name="nightly", namespace=ns, cron="0 2 * * *", operations=[stop]))
        assert cron.when == "cron 0 2 * * *" and cron.what == "vm stop x force=true" and cron.next_at is not None
        assert (cron.next_at.hour, cron.next_at.minute) == (2, 0) and cron.next_at > datetime.now(UTC)
        once = client.add_schedule(ScheduleSpec(name="once", namespace=ns, at=at, experiment=EXPERIMENT))
        assert once.next_at == at and once.what == "experiment (inline)"
        paused = client.pause_schedule(ns, "once", True)
        assert paused.paused and paused.next_at is None
        assert client.pause_schedule(ns, "once", False).next_at == at
        assert [s.name for s in client.schedules(ns)] == ["nightly", "once"]
    finally:
        for name in ("nightly", "once"):
            client.remove_schedule(ns, name)
    assert client.schedules(ns) == []


def test_a_scheduler_whose_lock_was_lost_exits_to_be_restarted(client: RedisClient, settings: Settings,
                                                                tmp_path: Path) -> None:
    """Beat stops when its lock is taken from it; the process must not go on as a consumer only."""
    lock_key = f"{keys.REDBEAT_PREFIX}:lock"
    with scheduler(settings, tmp_path / "s.log") as proc:
        wait_until(lambda: client.redis.exists(lock_key), timeout=15, what="the scheduler to take its lock")
        client.redis.delete(lock_key)
        # 1 after a warm shutdown; -SIGTERM if Celery's consumer had not yet set its signal handlers
        assert proc.wait(timeout=20) in (1, -signal.SIGTERM), (tmp_path / "s.log").read_text()[-2000:]
    assert "beat stopped unexpectedly" in (tmp_path / "s.log").read_text()


def test_a_namespace_with_schedules_is_not_deleted(client: RedisClient) -> None:
    ns = client.settings.namespace
    client.create_namespace(ns, None)
    client.add_schedule(ScheduleSpec(name="keep", namespace=ns, every="1h", operations=[pause("x")]))
    with pytest.raises(InvalidInput, match="has schedules: keep"):
        client.delete_namespace(ns, force=True)
    client.remove_schedule(ns, "keep")
    assert client.delete_namespace(ns, force=True) == []
    client.finish_namespace_delete(ns)


@pytest.mark.parametrize(("command", "expected"), [
    (["vm", "launch", "w[1-2]", "-m", "64", "--disk", "0", "--host-label", "rack=a", "-t", "role=web"],
     {"op": "launch", "target": "w[1-2]", "tag": {}, "params": {
         "memory_mib": 64, "vcpus": 1, "disk_gib": 0, "image": None, "cloud_init": None, "ssh_keys": [],
         "host": None, "host_labels": {"rack": "a"}, "colocate": None, "spread": False, "tags": {"role": "web"},
         "nets": []}}),
    (["vm", "start", "web1"], {"op": "start", "target": "web1", "tag": {}, "params": {}}),
    (["vm", "kill", "--tag", "role=web"], {"op": "kill", "target": None, "tag": {"role": "web"}, "params": {}}),
    (["vm", "pause", "a,b"], {"op": "pause", "target": "a,b", "tag": {}, "params": {}}),
    (["vm", "resume", "web[1-3]", "-t", "k=v"], {"op": "resume", "target": "web[1-3]", "tag": {"k": "v"},
                                                 "params": {}}),
    (["vm", "reboot", "x"], {"op": "reboot", "target": "x", "tag": {}, "params": {"force": False, "timeout_s": 60.0}}),
    (["vm", "delete", "x"], {"op": "delete", "target": "x", "tag": {}, "params": {}}),
    (["vm", "stop", "x", "--force", "--timeout", "5"],
     {"op": "stop", "target": "x", "tag": {}, "params": {"force": True, "timeout_s": 5.0,
                                                          "force_after_timeout": False}}),
    (["vm", "set", "x", "-m", "256"],
     {"op": "set", "target": "x", "tag": {}, "params": {"memory_mib": 256, "vcpus": None, "nic": None,
                                                        "shaping": None}}),
    (["vm", "set", "x", "--nic", "1", "--rate", "1mbit", "--loss", "0.5%"],
     {"op": "set", "target": "x", "tag": {}, "params": {"memory_mib": None, "vcpus": None, "nic": 1, "shaping": {
         "delay_ms": None, "loss_pct": 0.5, "rate_kbit": 1000}}}),
    (["vm", "snapshot", "web[1-3]", "hourly"],
     {"op": "snapshot", "target": "web[1-3]", "tag": {}, "params": {"name": "hourly"}}),
    (["vm", "revert", "-", "s1", "--tag", "role=db"],
     {"op": "revert", "target": None, "tag": {"role": "db"}, "params": {"name": "s1"}}),
    (["vm", "tag", "s1", "k=v", "--remove", "old"],
     {"op": "tag", "target": "s1", "tag": {}, "params": {"set": {"k": "v"}, "remove": ["old"]}}),
    (["vm", "move", "x", "--to", "h2"], {"op": "move-out", "target": "x", "tag": {}, "params": {"to": "h2",
                                                                                               "live": False}}),
])
def test_a_vm_command_is_parsed_into_the_operation_it_makes(command: list[str], expected: dict[str, object]) -> None:
    """Parsed once, when the schedule is added; what is stored is the operation, never the command line."""
    from cli.schedules import parse_vm_command

    op = parse_vm_command(command)
    assert op.model_dump(mode="json") == expected
    assert TargetedOp.model_validate(expected) == op  # as the schedule stores and reads it back


def test_every_vm_command_that_makes_jobs_can_be_scheduled() -> None:
    import cli.app  # noqa: F401  (registers the guest commands on 'vm', as running 'vmorch' does)
    from cli.schedules import parse_vm_command
    from orchestrator.model.operation import COMMANDS

    args = {"snapshot": ["s"], "revert": ["s"], "snapshot-delete": ["s"], "tag": ["k=v"], "set": ["-m", "64"],
            "move": ["--to", "h"], "exec": ["--", "uptime", "-p"]}
    for op, word in COMMANDS.items():
        if word == "cp":
            with pytest.raises(InvalidInput, match="can't schedule 'vm cp'"):
                parse_vm_command(["vm", "cp", "x:/etc/hostname", "/tmp/h"])
            continue
        assert parse_vm_command(["vm", word, "x", *args.get(word, [])]).op is op
    scheduled = parse_vm_command(["vm", "exec", "x", "--", "uptime", "-p"])
    assert scheduled.params.model_dump()["command"] == ["uptime", "-p"]


@pytest.mark.parametrize(("command", "message"), [
    (["vm", "pause", "x", "--wait"], "doesn't take --wait"),
    (["vm", "pause", "x", "--after", "3"], "doesn't take --after"),
    (["vm", "launch", "x", "--dry-run"], "doesn't take --dry-run"),
    (["vm", "list"], "can't schedule 'vm list'"),
    (["job", "list"], "can't schedule"),
    (["vm", "pause"], "give a target"),
    (["vm", "set", "x"], "give --memory, --vcpus and/or --nic"),
    (["vm", "pause", "web[1-"], "invalid target"),
    (["vm", "launch", "x", "-m", "1"], "memory_mib"),
])
def test_a_bad_vm_command_is_refused_when_the_schedule_is_added(command: list[str], message: str) -> None:
    from cli.schedules import parse_vm_command

    with pytest.raises(InvalidInput, match=re.escape(message)):
        parse_vm_command(command)


def test_a_firing_submits_its_operations_in_process(cluster: list[WorkerProc], client: RedisClient,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """No subprocess, so no command line carrying the Redis URL (and its password)."""
    ns = client.settings.namespace
    client.wait([j.id for j in client.submit(ops(Op.LAUNCH, ns, "ip[1-2]", memory_mib=32, disk_gib=0))], timeout=30)

    def no_subprocess(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a firing started a process: {args}")

    monkeypatch.setattr(subprocess.Popen, "__init__", no_subprocess)
    sched = client.add_schedule(ScheduleSpec(name="ip", namespace=ns, every="1s", operations=[tag("ip[1-2]", k="v")]))
    assert sched.what == 'vm tag ip[1-2] set={"k": "v"}'
    assert json.loads(client.redis.hget(keys.schedule(ns, "ip"), "target")) == {  # type: ignore[arg-type]
        "operations": [{"op": "tag", "target": "ip[1-2]", "tag": {}, "params": {"set": {"k": "v"}, "remove": []}}]}
    try:
        raw = client._schedules.raw(ns, "ip")
        wait_until(lambda: schedules.current_slot(raw, client.store.redis_time()) is not None, what="the first slot")
        done = firing.fire(client, ns, "ip", by="test")
        assert done is not None and done.state == "fired", done
        parent, *children = client.wait(done.jobs, timeout=30)
        assert parent.is_parent and parent.state is JobState.SUCCEEDED
        assert [(j.op, j.vm, j.params["set"]) for j in children] == [(Op.TAG, "ip1", {"k": "v"}),
                                                                     (Op.TAG, "ip2", {"k": "v"})]
        assert client.vm(ns, "ip2").tags == {"k": "v"}
    finally:
        client.remove_schedule(ns, "ip")

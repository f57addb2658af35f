"""``vmorch doctor`` against real Redis servers, real workers and a real libvirtd."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.edge import doctor as d
from orchestrator.model.settings import Settings

from .conftest import RedisServer, free_port, run_cli, running_hosts, start_worker, wait_until
from .helpers import private_libvirtd


def doctor(settings: Settings, *args: str) -> tuple[int, dict[str, Any], str]:
    """Exit code, the --json report, and the text report."""
    as_json = run_cli(settings, "--json", "doctor", *args)
    text = run_cli(settings, "doctor", *args)
    assert as_json.returncode == text.returncode, (as_json.stderr, text.stderr)
    return text.returncode, json.loads(as_json.stdout), text.stdout


def doctor_fails(settings: Settings) -> bool:
    return run_cli(settings, "doctor").returncode == 1


def check(report: dict[str, Any], name: str) -> dict[str, Any]:
    found = [c for c in report["checks"] if c["name"] == name]
    assert found, f"no check {name!r} in {report}"
    return dict(found[0])


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[Settings]:
    """Settings for a Redis of this test's own (AOF on, appendfsync always, noeviction: as vmorch wants it)."""
    server = RedisServer(free_port(), tmp_path / "redis", extra=("--appendfsync", "always"))
    server.start()
    (tmp_path / "home").mkdir()
    yield Settings(redis_url=server.url, home=tmp_path / "home", namespace="doc", lock_expire=4,
                   heartbeat_interval=0.5, host_down_after=3.0)
    server.stop()


def test_healthy_cluster_then_a_dead_worker(fresh: Settings) -> None:
    worker = start_worker(fresh, "doc1")
    with running_hosts(fresh, worker):
        # The host registers before its first heartbeat has measured its clock: "pending" till then.
        wait_until(lambda: check(doctor(fresh)[1], "clock")["status"] != "pending", timeout=15,
                   what="the first heartbeat's clock offset")
        code, report, text = doctor(fresh)
        assert code == 0, text
        assert report["ok"] is True
        assert {c["status"] for c in report["checks"]} == {"ok"}, text
        assert {"redis", "persistence", "eviction", "host doc1", "clock", "versions"} <= {
            c["name"] for c in report["checks"]}
        assert "libvirt test:///default answers" in check(report, "host doc1")["message"]
        assert "all good" in text
        worker.stop(signal.SIGKILL)
        wait_until(lambda: doctor_fails(fresh), timeout=15, what="the doctor to notice the dead worker")
    code, report, text = doctor(fresh)
    host = check(report, "host doc1")
    assert host["status"] == "fail" and "no heartbeat since" in host["message"]
    assert "systemctl status vmorch-worker@doc1" in host["fix"]
    assert "FAIL" in text and "fix: " in text


def test_doctor_warns_of_a_host_that_heartbeats_but_runs_nothing(fresh: Settings) -> None:
    """A worker whose Celery consumer died while its heartbeat thread goes on: its VMs' jobs never start."""
    from orchestrator.model.operation import Op, Operation
    from orchestrator.services.client import RedisClient

    client = RedisClient(fresh)
    store = client.store
    store.register_host("mute1", {"libvirt_uri": "test:///default", "cpus": 8, "memory_mib": 8192, "pid": 1,
                                  "version": "0.1.0", "libvirt_ok": "1"})
    beating = threading.Event()

    def beat() -> None:
        while not beating.wait(0.5):
            store.heartbeat("mute1", {"libvirt_ok": "1"})

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        job = client.submit([Operation.build(Op.LAUNCH, "doc", "stuck1", memory_mib=64, host="mute1")])[0]
        wait_until(lambda: check(doctor(fresh, "--stuck-after", "1")[1], "jobs")["status"] == "warn",
                   timeout=15, what="the doctor to see the stuck job")
        code, report, _ = doctor(fresh, "--stuck-after", "1")
        jobs = check(report, "jobs")
        assert f"job {job.id} (launch doc/stuck1 on mute1" in jobs["message"]
        assert "systemctl restart vmorch-worker@mute1" in jobs["fix"]
        assert code == 0  # a warning: the job may be legitimately slow
        assert check(doctor(fresh)[1], "jobs")["status"] == "ok"  # not stuck by the default 120 s
        client.cancel(job.id)
    finally:
        beating.set()
        thread.join(timeout=5)


def test_doctor_catches_an_evicting_redis_without_aof(tmp_path: Path) -> None:
    server = RedisServer(free_port(), tmp_path / "redis",
                         extra=("--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru", "--appendonly", "no"))
    server.start()
    try:
        settings = Settings(redis_url=server.url, home=tmp_path, namespace="doc")
        code, report, text = doctor(settings)
        assert code == 1
        assert report["ok"] is False
        eviction = check(report, "eviction")
        assert eviction["status"] == "fail" and "allkeys-lru" in eviction["message"]
        assert "CONFIG SET maxmemory-policy noeviction" in eviction["fix"]
        assert check(report, "persistence")["status"] == "fail"
        assert check(report, "hosts")["status"] == "warn"  # nobody registered yet
        assert "maxmemory-policy is allkeys-lru" in text
    finally:
        server.stop()


def test_doctor_warns_of_appendfsync_everysec_and_fails_no_on_a_real_redis(fresh: Settings) -> None:
    from redis import Redis

    assert check(doctor(fresh)[1], "persistence")["status"] == "ok"
    with Redis.from_url(fresh.resolved_redis_url()) as redis:
        redis.config_set("appendfsync", "everysec")
        code, report, text = doctor(fresh)
        persistence = check(report, "persistence")
        assert persistence["status"] == "warn" and code == 0
        assert "a power loss can lose up to 1 s of accepted jobs" in persistence["message"]
        assert "CONFIG SET appendfsync always" in persistence["fix"] and "1 s of accepted jobs" in text
        redis.config_set("appendfsync", "no")
        code, report, _ = doctor(fresh)
        assert check(report, "persistence")["status"] == "fail" and code == 1


def test_doctor_without_redis_says_so(tmp_path: Path) -> None:
    settings = Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0", home=tmp_path, namespace="doc")
    code, report, _ = doctor(settings)
    assert code == 1
    assert check(report, "redis")["status"] == "fail"
    assert "cannot reach Redis" in check(report, "redis")["message"]


# -- a host whose libvirtd goes away ------------------------------------------------------

@pytest.fixture
def libvirtd() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A real libvirtd of this test's own (private mount namespace, own socket): its qemu:///system URI."""
    with private_libvirtd("vmd") as daemon:
        yield daemon


def plan(settings: Settings, *args: str) -> dict[str, str]:
    """Where ``vm launch --dry-run`` would put VMs: {vm: host}."""
    done = run_cli(settings, "--json", "vm", "launch", *args, "--memory", "32", "--disk", "0", "--dry-run")
    assert done.returncode == 0, done.stderr
    return {p["vm"]: p["host"] for p in json.loads(done.stdout)["plan"]}


@pytest.mark.slow
def test_a_host_whose_libvirt_is_unreachable_fails_the_doctor_and_gets_no_new_vms(
        fresh: Settings, libvirtd: tuple[str, subprocess.Popen[bytes]]) -> None:
    uri, daemon = libvirtd
    with running_hosts(fresh, start_worker(fresh, "lv1", uri), start_worker(fresh, "lv2")):
        code, report, text = doctor(fresh)
        assert code == 0, text
        assert set(plan(fresh, "p[1-4]", "--spread").values()) == {"lv1", "lv2"}
        daemon.terminate()
        daemon.wait(timeout=15)
        wait_until(lambda: doctor_fails(fresh), timeout=20, what="the doctor to notice libvirtd is gone")
        code, report, text = doctor(fresh)
        host = check(report, "host lv1")
        assert host["status"] == "fail"
        assert "its worker is up but libvirt" in host["message"] and "does not answer" in host["message"]
        assert "systemctl status libvirtd" in host["fix"]
        assert check(report, "redis")["status"] == "ok"

        # Placement leaves lv1 out: its worker is up, but every launch sent there would fail.
        listed = {line.split()[0]: line for line in run_cli(fresh, "host", "list").stdout.splitlines()[1:]}
        assert "(not answering)" in listed["lv1"] and "(not answering)" not in listed["lv2"]
        assert set(plan(fresh, "p[1-4]", "--spread").values()) == {"lv2"}
        pinned = run_cli(fresh, "vm", "launch", "p1", "--host", "lv1", "--memory", "32", "--disk", "0")
        assert pinned.returncode == 2, pinned.stderr
        assert "host 'lv1' can't reach its libvirt" in pinned.stderr and "vmorch doctor" in pinned.stderr
        assert json.loads(run_cli(fresh, "--json", "job", "list").stdout) == []  # nothing was accepted
        launched = run_cli(fresh, "--json", "vm", "launch", "p1", "--memory", "32", "--disk", "0", "--wait")
        assert launched.returncode == 0, launched.stderr
        assert json.loads(run_cli(fresh, "--json", "vm", "show", "p1").stdout)["host"] == "lv2"
        assert run_cli(fresh, "vm", "delete", "p1", "--wait").returncode == 0


# -- the judgements themselves, on host records as workers write them ----------------------

def _host(name: str, **fields: str) -> Any:
    from orchestrator.model.records import Host

    record = {"name": name, "heartbeat_at": "1000", "pid": "1", "libvirt_uri": "qemu:///system",
              "version": "0.1.0", "libvirt_ok": "1", **fields}
    return Host.from_hash(record, now=1000.5, down_after=6, vms=0)


def test_a_host_whose_clock_is_not_measured_yet_shows_the_check_pending() -> None:
    pending = d._clock_checks([_host("h0", clock_offset="0.001"), _host("h1", clock_offset="")])
    assert [(c.name, c.status) for c in pending] == [("clock", d.Status.PENDING)]
    assert "h1" in pending[0].message


def test_no_cluster_to_talk_to_is_one_failed_check_not_a_default_address(tmp_path: Path) -> None:
    [only] = d.examine(Settings(home=tmp_path))
    assert only.status is d.Status.FAIL and "vmorch up" in only.fix and "6379" not in only.message


def test_persistence_is_judged_by_aof_and_appendfsync() -> None:
    aof = {"aof_enabled": 1, "aof_last_write_status": "ok"}
    always = d._persistence(aof, "always")
    assert always.status is d.Status.OK and "appendfsync always" in always.message
    everysec = d._persistence(aof, "everysec")
    assert everysec.status is d.Status.WARN
    assert "a power loss can lose up to 1 s of accepted jobs" in everysec.message
    assert "CONFIG SET appendfsync always" in everysec.fix and "VMORCH_REDIS_APPENDFSYNC" in everysec.fix
    never = d._persistence(aof, "no")
    assert never.status is d.Status.FAIL and "CONFIG SET appendfsync always" in never.fix
    unknown = d._persistence(aof, None)  # CONFIG refused (renamed, or an ACL without it)
    assert unknown.status is d.Status.WARN and "appendfsync always" in unknown.fix
    off = d._persistence({"aof_enabled": 0}, "always")
    assert off.status is d.Status.FAIL and "CONFIG SET appendonly yes" in off.fix
    broken = d._persistence({**aof, "aof_last_write_status": "err"}, "always")
    assert broken.status is d.Status.FAIL and "disk is full" in broken.fix


def test_clock_skew_between_hosts_is_judged_by_the_spread() -> None:
    def clock(*offsets: str) -> Any:
        return d._clock_checks([_host(f"h{i}", clock_offset=o) for i, o in enumerate(offsets)])[0]

    assert clock("0.001", "-0.002").status is d.Status.OK
    assert clock("0.2", "-0.2").status is d.Status.WARN  # each close to Redis, 0.4 s apart
    bad = clock("0.0", "3.5")
    assert bad.status is d.Status.FAIL and "h1 is the furthest off" in bad.fix


def test_versions_and_an_unprobed_libvirt_are_warnings() -> None:
    versions = d._versions({"redis_version": "7.0.15"}, [_host("h1"), _host("h2", version="0.0.9")])
    assert versions.status is d.Status.WARN and "h2 0.0.9" in versions.message
    assert _host("h3").libvirt_ok is True
    unprobed = d._host_check(_host("h4").model_copy(update={"libvirt_ok": None}))
    assert unprobed.status is d.Status.WARN

"""Structured logs: one line per event, with the job, VM, namespace, host and lock level."""

from __future__ import annotations

import io
import json
import logging

import pytest

from orchestrator.control.locks import LockManager, vm_lock
from orchestrator.model import logs
from orchestrator.model.errors import InvalidInput
from orchestrator.model.operation import Op
from orchestrator.model.settings import Settings
from orchestrator.services.client import RedisClient

from .conftest import ops, run_cli, running_hosts, start_worker


def test_json_worker_log_is_one_object_per_line_with_job_fields(base_settings: Settings, settings: Settings,
                                                                client: RedisClient) -> None:
    worker = start_worker(base_settings, "log1", args=["--log-format", "json"])
    with running_hosts(base_settings, worker):
        jobs = client.submit(ops(Op.LAUNCH, settings.namespace, "l1", memory_mib=64, host="log1"))
        jobs += client.submit(ops(Op.PAUSE, settings.namespace, "l1") + ops(Op.DELETE, settings.namespace, "l1"))
        client.wait([j.id for j in jobs], timeout=30)
    lines = [line for line in worker.log.read_text().splitlines() if line.strip()]
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not a JSON line in the worker's log: {line!r}")
    assert all({"time", "level", "logger", "message", "host"} <= r.keys() for r in records)
    assert all(r["host"] == "log1" for r in records)
    pause = jobs[1]
    running = [r for r in records if r.get("job") == pause.id and r["message"].endswith(": running")]
    assert running, "no 'running' line for the pause job"
    assert running[0]["vm"] == "l1" and running[0]["namespace"] == settings.namespace and running[0]["op"] == "pause"
    # every line logged while the job ran, by whatever logger, carries all of its fields
    during = [r for r in records if r.get("job") == pause.id]
    assert len(during) >= 2 and all(r["vm"] == "l1" and r["namespace"] == settings.namespace for r in during)


def test_text_format_appends_the_fields() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.formatter("text"))
    handler.addFilter(logs.ContextFilter())
    log = logging.getLogger("vmorch-test-text")
    log.addHandler(handler)
    log.propagate = False
    try:
        with logs.bound(job=7, namespace="ns1", vm="web1"):
            log.warning("something %s", "happened", extra={"lock": "vmorch:vm:ns1:web1", "lock_level": "vm"})
        log.warning("outside")
    finally:
        log.removeHandler(handler)
    first, second = stream.getvalue().splitlines()
    assert first.endswith("something happened [namespace=ns1 vm=web1 job=7 lock=vmorch:vm:ns1:web1 lock_level=vm]")
    assert second.endswith("outside")


def test_lock_lines_carry_the_lock_level(redis_server: object, base_settings: Settings,
                                         caplog: pytest.LogCaptureFixture) -> None:
    locks = LockManager(base_settings.resolved_redis_url(), expire=4)
    try:
        with caplog.at_level(logging.DEBUG, logger="orchestrator.control.locks"), \
                locks.hold(vm_lock("logtest", "v1"), timeout=5):
            pass
    finally:
        locks.close()
    took = [r for r in caplog.records if r.getMessage().startswith("took lock vmorch:vm:logtest:v1")]
    assert took and took[0].lock_level == "vm" and took[0].lock == "vmorch:vm:logtest:v1"  # type: ignore[attr-defined]


def test_unknown_format_is_refused() -> None:
    with pytest.raises(InvalidInput, match="unknown log format"):
        logs.formatter("xml")


def test_worker_refuses_an_unknown_log_format(settings: Settings) -> None:
    out = run_cli(settings, "worker", "--host", "nolog", "--log-format", "xml")
    assert out.returncode == 2
    assert "unknown log format 'xml'" in out.stderr and "json" in out.stderr

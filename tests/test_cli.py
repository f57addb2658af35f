"""The user-facing contract of DESIGN.md, through the real ``vmorch`` command in subprocesses.

Every test runs twice: the CLI talking to Redis directly, and the CLI talking to the HTTP API
(``VMORCH_API_URL`` + ``VMORCH_TOKEN``, an admin token) -- the same output and exit codes.
"""

from __future__ import annotations

import json
from datetime import datetime

import pytest
from redis import Redis

from orchestrator.model.settings import Settings
from orchestrator.services.client import RedisClient
from orchestrator.store import keys

from .conftest import WorkerProc, run_cli

JOB_FIELDS = {"id", "op", "namespace", "vm", "host", "state", "seq", "submitted_at", "started_at", "finished_at",
              "attempts", "error", "result"}
VM_FIELDS = {"name", "namespace", "host", "state", "memory_mib", "vcpus", "tags"}
HOST_FIELDS = {"name", "state", "heartbeat_at", "pid", "libvirt_uri", "cpus", "memory_mib", "vms"}


@pytest.fixture(params=["redis", "http"])
def settings(request: pytest.FixtureRequest, base_settings: Settings, ns: str) -> Settings:
    """The test's settings; for "http", the CLI goes through the API (the session's ``api_server``)."""
    settings = base_settings.model_copy(update={"namespace": ns})
    if request.param == "http":
        api = request.getfixturevalue("api_server")
        settings = settings.model_copy(update={"api_url": api.url, "token": api.admin_token})
    return settings


def cli_json(settings: Settings, *args: str, code: int = 0) -> object:
    proc = run_cli(settings, "--json", *args)
    assert proc.returncode == code, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    return json.loads(proc.stdout)


def iso_or_null(value: object) -> bool:
    return value is None or (isinstance(value, str) and value.endswith("Z") and bool(datetime.fromisoformat(value)))


def test_json_contract_of_jobs_vms_and_hosts(cluster: list[WorkerProc], client: RedisClient,
                                             settings: Settings) -> None:
    job = cli_json(settings, "vm", "launch", "c1", "--memory", "64", "--tag", "role=db", "--wait")
    assert isinstance(job, dict) and set(job) >= JOB_FIELDS
    assert isinstance(job["id"], int) and job["op"] == "launch" and job["state"] == "succeeded"
    assert job["namespace"] == settings.namespace and job["vm"] == "c1" and job["seq"] == 1
    assert job["error"] is None and job["attempts"] == 1
    assert all(iso_or_null(job[k]) for k in ("submitted_at", "started_at", "finished_at"))
    assert job["submitted_at"] <= job["started_at"] <= job["finished_at"]

    queued = cli_json(settings, "vm", "pause", "c1")
    assert isinstance(queued, dict) and queued["state"] in ("queued", "waiting", "running", "succeeded")
    waited = cli_json(settings, "job", "wait", str(queued["id"]))
    assert isinstance(waited, list) and waited[0]["state"] == "succeeded" and waited[0]["seq"] == 2

    shown = cli_json(settings, "job", "show", str(queued["id"]))
    assert isinstance(shown, dict) and shown["id"] == queued["id"] and set(shown) >= JOB_FIELDS

    vm = cli_json(settings, "vm", "show", "c1")
    assert isinstance(vm, dict) and set(vm) >= VM_FIELDS
    assert (vm["state"], vm["memory_mib"], vm["vcpus"], vm["tags"]) == ("paused", 64, 1, {"role": "db"})
    vms = cli_json(settings, "vm", "list")
    assert isinstance(vms, list) and [v["name"] for v in vms] == ["c1"]

    hosts = cli_json(settings, "host", "list")
    assert isinstance(hosts, list) and {"t1", "t2"} <= {h["name"] for h in hosts}
    for host in hosts:
        assert set(host) >= HOST_FIELDS and host["state"] in ("up", "down", "draining")
    up = {h["name"]: h for h in hosts}
    assert up["t1"]["state"] == "up" and up["t1"]["pid"] == cluster[0].proc.pid

    jobs = cli_json(settings, "job", "list", "--vm", "c1")
    assert isinstance(jobs, list) and [j["seq"] for j in jobs] == [2, 1]


def test_a_failed_job_exits_1_with_the_reason(cluster: list[WorkerProc], client: RedisClient,
                                              settings: Settings) -> None:
    cli_json(settings, "vm", "launch", "f1", "--memory", "32", "--wait")
    cli_json(settings, "vm", "kill", "f1", "--wait")
    failed = cli_json(settings, "vm", "pause", "f1", "--wait", code=1)
    assert isinstance(failed, dict) and failed["state"] == "failed"
    assert failed["error"]["code"] == "invalid_state" and "shut off" in failed["error"]["message"]
    human = run_cli(settings, "vm", "pause", "f1", "--wait")
    assert human.returncode == 1 and "failed" in human.stdout and "shut off" in human.stdout


@pytest.mark.parametrize(("args", "code", "message"), [
    (["vm", "pause", "nosuch"], 3, "no VM 'nosuch'"),
    (["vm", "show", "nosuch"], 3, "no VM 'nosuch'"),
    (["job", "show", "999999999"], 3, "no job 999999999"),
    (["vm", "launch", "bad.name"], 2, "invalid VM name 'bad.name'"),
    (["vm", "launch", "neg", "--memory", "-5"], 2, "memory_mib"),
    (["vm", "launch", "nohost", "--host", "atlantis"], 2, "unknown host 'atlantis'"),
    (["vm", "launch", "r[3-1]"], 2, "empty range"),
    (["vm", "set", "x"], 2, "give --memory and/or --vcpus"),
    (["vm", "tag", "x", "novalue"], 2, "key=value"),
    (["--namespace", "Bad_NS", "vm", "list"], 2, "invalid namespace"),
    (["vm", "frobnicate", "x"], 2, "No such command"),
])
def test_bad_input_exits_2_or_3_with_a_reason_and_a_hint_and_enqueues_nothing(
        cluster: list[WorkerProc], client: RedisClient, settings: Settings, redis: Redis,
        args: list[str], code: int, message: str) -> None:
    before = redis.get(keys.JOB_NEXT)
    proc = run_cli(settings, *args)
    assert proc.returncode == code, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    if code in (2, 3) and "No such command" not in message:
        assert "hint:" in proc.stderr
    assert redis.get(keys.JOB_NEXT) == before, "a job was accepted"


def test_unreachable_redis_or_api_is_a_clear_error(settings: Settings) -> None:
    if settings.api_url:
        proc = run_cli(settings.model_copy(update={"api_url": "http://127.0.0.1:1"}), "vm", "list")
        expected = "cannot reach the vmorch API"
    else:
        proc = run_cli(settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"}), "vm", "list")
        expected = "cannot reach Redis"
    assert proc.returncode == 1
    assert expected in proc.stderr and "hint:" in proc.stderr and "Traceback" not in proc.stderr

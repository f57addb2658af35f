"""The user-facing contract of DESIGN.md, through the real ``vmorch`` command in subprocesses.

Every test runs twice: the CLI talking to Redis directly, and the CLI talking to the HTTP API
(``VMORCH_API_URL`` + ``VMORCH_TOKEN``, an admin token) -- the same output and exit codes.
"""

from __future__ import annotations

import json
import subprocess
from datetime import datetime
from pathlib import Path

import pytest
from redis import Redis

from orchestrator.model.settings import Settings
from orchestrator.services.client import RedisClient
from orchestrator.store import keys

from .conftest import PYTHON, ROOT, WorkerProc, run_cli, settings_env

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
    (["vm", "set", "x"], 2, "give --memory, --vcpus and/or --nic"),
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


def test_no_cluster_configured_is_said_and_nothing_guessed(settings: Settings, tmp_path: Path) -> None:
    """No --redis-url, no VMORCH_REDIS_URL, no local cluster: say so (exit 1), never fall back to a
    Redis that happens to listen on the default port, and write nothing anywhere."""
    env = {k: v for k, v in settings_env(settings).items() if k not in ("VMORCH_REDIS_URL", "VMORCH_API_URL")}
    env["VMORCH_HOME"] = str(tmp_path)
    for args in (["vm", "list"], ["vm", "launch", "x1"], ["host", "list"]):
        proc = subprocess.run([PYTHON, "-m", "cli", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 1, proc
        assert "no cluster" in proc.stderr and "vmorch up" in proc.stderr and "6379" not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) <= 2 and "Traceback" not in proc.stderr


def no_trailing_space(proc: subprocess.CompletedProcess[str]) -> list[str]:
    """The lines of a command's output (stdout and stderr) that end in whitespace."""
    assert proc.returncode == 0, proc.stderr
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line != line.rstrip()]


def test_host_show_is_the_whole_record_and_its_vms(cluster: list[WorkerProc], client: RedisClient,
                                                   settings: Settings) -> None:
    cli_json(settings, "vm", "launch", "hs1", "--memory", "32", "--host", "t1", "--wait")
    shown = cli_json(settings, "host", "show", "t1")
    assert isinstance(shown, dict) and set(shown) >= HOST_FIELDS | {
        "labels", "committed_mib", "committed_vcpus", "hostname", "migrate_uri", "shared_storage", "version",
        "clock_offset", "libvirt_ok", "started_at"}
    assert "hs1" in shown["vms_by_namespace"][settings.namespace]
    human = run_cli(settings, "host", "show", "t1")
    assert human.returncode == 0, human.stderr
    rows = {line.split(maxsplit=1)[0]: line for line in human.stdout.splitlines() if line.strip()}
    for row in ("hostname", "pid", "version", "heartbeat", "clock", "libvirt", "migrate", "storage", "memory",
                "vcpus", "labels", "vms"):
        assert row in rows, human.stdout
    assert "answers" in human.stdout and "test:///default" in human.stdout
    assert f"{shown['committed_mib']}/{shown['memory_mib']} MiB" in rows["memory"]
    assert settings.namespace in human.stdout and "hs1" in human.stdout
    assert run_cli(settings, "host", "show", "atlantis").returncode == 3


def test_no_line_of_output_ends_in_a_space(cluster: list[WorkerProc], client: RedisClient,
                                           settings: Settings) -> None:
    job = cli_json(settings, "vm", "launch", "ws1", "--memory", "32", "--wait")
    assert isinstance(job, dict)
    cli_json(settings, "vm", "launch", "wsr[1-2]", "--memory", "32", "--wait")
    for args in (["vm", "show", "ws1"], ["vm", "list"], ["vm", "history", "ws1"], ["job", "show", str(job["id"])],
                 ["job", "list"], ["host", "list"], ["host", "show", "t1"], ["ns", "list"],
                 ["vm", "start", "ws1", "--wait"], ["job", "wait", str(job["id"])]):
        assert no_trailing_space(run_cli(settings, *args)) == [], args


def test_a_parent_job_lists_no_seq_and_no_tries(cluster: list[WorkerProc], client: RedisClient,
                                                settings: Settings) -> None:
    jobs = cli_json(settings, "vm", "launch", "pj[1-2]", "--memory", "32", "--wait")
    assert isinstance(jobs, list)
    parent_id = jobs[0]["parent"]
    listed = run_cli(settings, "job", "list")
    header, *rows = listed.stdout.splitlines()
    assert header.split()[3] == "SEQ" and header.split()[9] == "TRIES"
    [parent] = [r.split() for r in rows if r.split()[0] == str(parent_id)]
    assert parent[1] == "bulk" and parent[3] == "-" and parent[9] == "-", parent
    children = [r.split() for r in rows if r.split()[0] in {str(j["id"]) for j in jobs}]
    assert [c[3] for c in children] == ["1", "1"] and [c[9] for c in children] == ["1", "1"]
    # the JSON contract: seq is an integer, 0 for a parent (it has no place in any VM's order)
    as_json = cli_json(settings, "job", "list")
    assert isinstance(as_json, list)
    assert [j["seq"] for j in as_json if j["id"] == parent_id] == [0]


@pytest.mark.parametrize("args", [
    ["host", "show", "bad name!"],
    ["host", "drain", "bad name!"],
    ["host", "undrain", "bad name!"],
    ["vm", "launch", "hn1", "--host", "x y"],
    ["vm", "move", "hn1", "--to", "x y"],
])
def test_a_bad_host_name_is_called_a_host_name(cluster: list[WorkerProc], client: RedisClient, settings: Settings,
                                               args: list[str]) -> None:
    proc = run_cli(settings, *args)
    assert proc.returncode == 2, proc.stderr
    assert "invalid host name" in proc.stderr and "VM name" not in proc.stderr, proc.stderr
    assert "hint:" in proc.stderr and "Traceback" not in proc.stderr


def test_the_readme_says_where_the_token_is_and_what_down_stops(tmp_path: Path) -> None:
    from orchestrator.localcluster.home import Paths

    readme = (ROOT / "README.md").read_text()
    assert Paths(tmp_path).token == tmp_path / "token"
    assert "~/.vmorch" not in readme and readme.count("$VMORCH_HOME/token") >= 2
    assert "stops workers, QEMU domains and Redis" not in readme  # it doesn't stop a system libvirtd's
    down = readme[readme.index("- **`vmorch down`**"):]
    down = down[:down.index("\n- ")]
    assert "qemu:///system" in down and "left running" in down and "vmorch vm delete" in down

"""Bulk commands, dependencies, experiments and schedules through the HTTP API: the real CLI
with ``VMORCH_API_URL``, and the API's rules for tokens that don't cover a namespace."""

from __future__ import annotations

import json
from pathlib import Path

from redis import Redis

from orchestrator.model.settings import Settings
from orchestrator.services.client import RedisClient
from orchestrator.store import keys

from .apiserver import ApiServer
from .conftest import ROOT, WorkerProc, run_cli

START_X = {"op": "start", "target": "x"}


def _over_http(settings: Settings, api: ApiServer, token: str | None = None) -> Settings:
    return settings.model_copy(update={"api_url": api.url, "token": token or api.admin_token})


def _json(settings: Settings, *args: str, code: int = 0) -> object:
    proc = run_cli(settings, "--json", *args)
    assert proc.returncode == code, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    return json.loads(proc.stdout) if proc.stdout.strip() else None


def test_bulk_retry_and_dependencies_over_http(cluster: list[WorkerProc], api_server: ApiServer,
                                               client: RedisClient, settings: Settings) -> None:
    http = _over_http(settings, api_server)
    launched = _json(http, "vm", "launch", "hb[1-3]", "--memory", "32", "--disk", "0", "--wait")
    assert isinstance(launched, list) and len({j["parent"] for j in launched}) == 1
    parent = _json(http, "job", "show", str(launched[0]["parent"]))
    assert isinstance(parent, dict) and parent["op"] == "bulk" and parent["children"]["succeeded"] == 3

    # hb3 is shut off: 'pause' fails there only; the retry re-runs only that child, under a new parent
    _json(http, "vm", "kill", "hb3", "--wait")
    paused = run_cli(http, "--json", "vm", "pause", "hb[1-3]", "--wait")
    assert paused.returncode == 1, paused.stderr
    first_parent = json.loads(paused.stdout)[0]["parent"]
    _json(http, "vm", "start", "hb3", "--wait")
    again = _json(http, "job", "retry", str(first_parent), "--wait")
    assert isinstance(again, list) and [j["vm"] for j in again[1:]] == ["hb3"] and again[0]["retry_of"] == first_parent
    assert again[0]["state"] == "succeeded"

    # --after over HTTP: held until the kill succeeded, then run in the VM's order
    kill = _json(http, "vm", "kill", "hb1")
    assert isinstance(kill, dict)
    start = _json(http, "vm", "start", "hb1", "--after", str(kill["id"]), "--wait")
    assert isinstance(start, dict) and start["state"] == "succeeded"
    killed = client.job(kill["id"])
    assert killed.finished_at is not None and start["started_at"] >= killed.finished_at.isoformat()[:19]


def test_experiments_and_schedules_over_http(cluster: list[WorkerProc], api_server: ApiServer,
                                            client: RedisClient, settings: Settings, tmp_path: Path) -> None:
    http = _over_http(settings, api_server)
    text = (ROOT / "examples" / "web-smoke.yaml").read_text().replace("disk: 1", "disk: 0")
    path = tmp_path / "smoke.yaml"
    path.write_text(text)
    run = _json(http, "experiment", "run", str(path), "--wait", code=0)
    assert isinstance(run, dict) and run["state"] == "succeeded", run
    status = _json(http, "experiment", "status", str(run["id"]))
    assert isinstance(status, dict) and status["id"] == run["id"] and set(status["jobs"]) >= {"launch", "teardown"}
    runs = _json(http, "experiment", "list")
    assert isinstance(runs, list) and [r["id"] for r in runs] == [run["id"]]

    added = _json(http, "schedule", "add", "nightly", "--cron", "0 2 * * *", "--", "vm", "snapshot", "web1", "s1")
    assert isinstance(added, dict) and added["next_at"] is not None and not added["paused"]
    assert added["what"] == "vm snapshot web1 name=s1"  # parsed by the CLI, stored as an operation
    assert _json(http, "schedule", "pause", "nightly")["paused"] is True  # type: ignore[index]
    assert _json(http, "schedule", "resume", "nightly")["paused"] is False  # type: ignore[index]
    listed = _json(http, "schedule", "list")
    assert isinstance(listed, list) and [s["name"] for s in listed] == ["nightly"]
    removed = run_cli(http, "schedule", "remove", "nightly")
    assert removed.returncode == 0, removed.stderr
    assert _json(http, "schedule", "list") == []


def test_tokens_reach_no_further_through_experiments_and_dependencies(
        cluster: list[WorkerProc], api_server: ApiServer, client: RedisClient, settings: Settings,
        redis: Redis) -> None:
    ns = settings.namespace
    other = f"{ns}-o"
    with api_server.http(api_server.token(f"{ns}-op", "operate", [ns])) as op, \
            api_server.http(api_server.token(f"{ns}-r", "read", [ns])) as read, \
            api_server.http(api_server.admin_token) as admin:
        outsider = admin.post(f"/api/v1/namespaces/{other}/vms/x1/launch", json={"memory_mib": 16, "disk_gib": 0})
        assert outsider.status_code == 202, outsider.text
        other_job = outsider.json()[0]["id"]
        try:
            before = redis.get(keys.JOB_NEXT), redis.get(keys.RUN_NEXT)
            exp = f"name: e\nnamespace: {other}\nvms:\n  - name: z1\n    memory: 16\n"
            assert op.post(f"/api/v1/namespaces/{ns}/experiments", json={"text": exp}).status_code == 403
            schedule = {"name": "s", "every": "1h", "experiment": exp}
            assert op.post(f"/api/v1/namespaces/{ns}/schedules", json=schedule).status_code == 403
            dep = {"operations": [{"op": "launch", "namespace": ns, "vm": "y1", "params": {"memory_mib": 16}}],
                   "options": {"after": [other_job]}}
            answer = op.post("/api/v1/jobs", json=dep)
            assert answer.status_code == 404 and answer.json()["error"]["code"] == "not_found"
            assert op.post(f"/api/v1/jobs/{other_job}/retry").status_code == 404
            assert op.get(f"/api/v1/jobs/{other_job}/children").status_code == 404
            assert read.post(f"/api/v1/namespaces/{ns}/experiments", json={"text": "name: e\n"}).status_code == 403
            start_a = {"name": "s", "every": "1h", "operations": [{"op": "start", "target": "a"}]}
            assert read.post(f"/api/v1/namespaces/{ns}/schedules", json=start_a).status_code == 403
            assert read.get(f"/api/v1/namespaces/{ns}/schedules").status_code == 200
            bad = op.post(f"/api/v1/namespaces/{ns}/schedules", json={**start_a, "every": "soon"})
            assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_input"
            assert (redis.get(keys.JOB_NEXT), redis.get(keys.RUN_NEXT)) == before, "a refused request made something"
        finally:
            client.wait([other_job], timeout=30)
            gone = admin.post(f"/api/v1/namespaces/{other}/deletion", params={"force": "true"}).json()
            client.wait([j["id"] for j in gone], timeout=30)
            admin.delete(f"/api/v1/namespaces/{other}")


def test_a_schedule_the_body_schema_lets_through_but_the_spec_refuses_is_a_422(
        api_server: ApiServer, settings: Settings, redis: Redis) -> None:
    """Found by the fuzzer: a bad 'at' time, or two of cron/every/at, were a 500."""
    ns = settings.namespace
    before = sorted(redis.scan_iter(f"*schedule*{ns}*"))
    with api_server.http(api_server.admin_token) as http:
        for body, field in (({"name": "s1", "at": "\U000a1338 not a time", "operations": [START_X]}, "at"),
                            ({"name": "s1", "cron": "0 2 * * *", "every": "10m", "operations": [START_X]},
                             None)):
            r = http.post(f"/api/v1/namespaces/{ns}/schedules", json=body)
            assert r.status_code == 422, r.text
            error = r.json()["error"]
            assert error["code"] == "invalid_input" and error["message"], error
            if field:
                assert error["field"].endswith(field), error
        bad_op = {"name": "s1", "every": "1h", "operations": [{"op": "set", "target": "x", "params": {}}]}
        r = http.post(f"/api/v1/namespaces/{ns}/schedules", json=bad_op)
        assert r.status_code == 422 and "give --memory, --vcpus and/or --nic" in r.json()["error"]["message"], r.text
        schema = http.get("/openapi.json").json()["components"]["schemas"]
        body = schema["ScheduleIn"]["properties"]
        assert "operations" in body and "command" not in body
        assert set(schema["ScheduledOpIn"]["properties"]) == {"op", "target", "tag", "params"}
    assert sorted(redis.scan_iter(f"*schedule*{ns}*")) == before  # nothing written

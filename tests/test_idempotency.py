"""Submitting twice: an idempotency key makes a repeated submit return the first one's jobs and make
none, through the Redis client, the CLI (separate processes, at the same moment) and the API."""

from __future__ import annotations

import json

import pytest
from redis import Redis

from orchestrator.model.errors import AlreadyExists
from orchestrator.model.operation import Op, SubmitOptions
from orchestrator.model.records import JobState
from orchestrator.model.settings import Settings
from orchestrator.services.client import RedisClient
from orchestrator.store import keys

from .apiserver import ApiServer
from .conftest import WorkerProc, ops, run_cli
from .test_ordering import submit_together


def test_a_repeated_submit_gets_the_first_jobs_back_and_makes_none(
        cluster: list[WorkerProc], client: RedisClient) -> None:
    ns = client.settings.namespace
    once = SubmitOptions(idempotency_key=f"{ns}-launch")
    first = client.submit(ops(Op.LAUNCH, ns, "i[1-2]", memory_mib=16), once)
    client.wait([j.id for j in first])
    # the VMs exist now: judged again, the launch would be refused; repeated, it is the same launch
    again = client.submit(ops(Op.LAUNCH, ns, "i[1-2]", memory_mib=16), once)
    assert [j.id for j in again] == [j.id for j in first] and again[0].parent == first[0].parent
    with pytest.raises(AlreadyExists):
        client.submit(ops(Op.LAUNCH, ns, "i[1-2]", memory_mib=16))  # without the key it is refused
    gone = SubmitOptions(idempotency_key=f"{ns}-delete")
    deletes = client.submit(ops(Op.DELETE, ns, "i1"), gone)
    client.wait([j.id for j in deletes])
    assert [j.id for j in client.submit(ops(Op.DELETE, ns, "i1"), gone)] == [j.id for j in deletes]
    assert len(client.jobs(ns, op=Op.LAUNCH)) == 2 and len(client.jobs(ns, op=Op.DELETE)) == 1


def test_the_key_expires_after_a_day(cluster: list[WorkerProc], client: RedisClient, redis: Redis) -> None:
    ns = client.settings.namespace
    client.submit(ops(Op.LAUNCH, ns, "ttl", memory_mib=16), SubmitOptions(idempotency_key=f"{ns}-ttl"))
    assert 0 < redis.ttl(keys.idempotency(f"{ns}-ttl")) <= keys.IDEMPOTENCY_TTL


def test_two_processes_submitting_with_one_key_at_the_same_moment_make_one_job(
        cluster: list[WorkerProc], client: RedisClient, settings: Settings, redis: Redis) -> None:
    ns = settings.namespace
    client.wait([j.id for j in client.submit(ops(Op.LAUNCH, ns, "race", memory_mib=16))])
    for round_ in range(3):
        cmd = ["--idempotency-key", f"{ns}-race-{round_}", "vm", "tag", "race", f"round={round_}"]
        a, b = submit_together(settings, redis, cmd, cmd)
        assert a.id == b.id
    tags = client.jobs(ns, op=Op.TAG)
    assert len(tags) == 3 and all(j.state is not JobState.FAILED for j in client.wait([j.id for j in tags]))


def test_the_cli_prints_the_first_jobs_again_and_refuses_a_bad_key(
        cluster: list[WorkerProc], client: RedisClient, settings: Settings) -> None:
    ns = settings.namespace
    client.wait([j.id for j in client.submit(ops(Op.LAUNCH, ns, "c1", memory_mib=16))])
    runs = [run_cli(settings, "--json", "--idempotency-key", f"{ns}-pause", "vm", "pause", "c1") for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), [r.stderr for r in runs]
    assert json.loads(runs[0].stdout)["id"] == json.loads(runs[1].stdout)["id"]
    bad = run_cli(settings, "--idempotency-key", "has space", "vm", "pause", "c1")
    assert bad.returncode == 2 and "bad --idempotency-key" in bad.stderr
    assert len(client.jobs(ns, op=Op.PAUSE)) == 1


def test_the_api_takes_the_header_and_keeps_one_token_from_another_token_jobs(
        api_server: ApiServer, client: RedisClient, settings: Settings) -> None:
    ns = settings.namespace
    client.wait([j.id for j in client.submit(ops(Op.LAUNCH, ns, "h1", memory_mib=16))])
    mine = api_server.token(f"{ns}-idem-a", "operate", [ns])
    theirs = api_server.token(f"{ns}-idem-b", "operate", [ns])
    with api_server.http(mine) as http:
        first = http.post(f"/api/v1/namespaces/{ns}/vms/h1/pause", headers={"Idempotency-Key": "k1"})
        again = http.post(f"/api/v1/namespaces/{ns}/vms/h1/pause", headers={"Idempotency-Key": "k1"})
        assert first.status_code == again.status_code == 202, first.text
        assert first.json()[0]["id"] == again.json()[0]["id"]
        body = {"operations": [{"op": "resume", "namespace": ns, "vm": "h1"}], "options": {"idempotency_key": "k2"}}
        clash = http.post("/api/v1/jobs", json=body, headers={"Idempotency-Key": "k3"})
        assert clash.status_code == 422 and "differ" in clash.json()["error"]["message"], clash.text
        bad = http.post(f"/api/v1/namespaces/{ns}/vms/h1/resume", headers={"Idempotency-Key": "a b"})
        assert bad.status_code == 422, bad.text
    with api_server.http(theirs) as http:
        other = http.post(f"/api/v1/namespaces/{ns}/vms/h1/pause", headers={"Idempotency-Key": "k1"})
        assert other.status_code == 202 and other.json()[0]["id"] != first.json()[0]["id"]
    client.wait([j.id for j in client.jobs(ns)])

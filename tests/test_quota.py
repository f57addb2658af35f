"""Namespace quotas: set and shown by the CLI and the API, checked atomically by the submit script."""

from __future__ import annotations

import json
import re
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor

from redis import Redis

from orchestrator.edge.httpclient import HttpClient
from orchestrator.model.operation import Op
from orchestrator.model.records import Quota
from orchestrator.model.settings import Settings
from orchestrator.services.client import RedisClient
from orchestrator.store import keys

from .apiserver import ApiServer
from .conftest import WorkerProc, ops, run_cli
from .test_ordering import submit_together


def test_two_launches_that_fit_alone_but_not_together_race_and_one_wins(
        cluster: list[WorkerProc], client: RedisClient, settings: Settings, redis: Redis) -> None:
    ns = settings.namespace
    client.wait([j.id for j in client.submit(ops(Op.LAUNCH, ns, "q0", memory_mib=16, disk_gib=0))])
    client.set_quota(ns, Quota(vms=2, memory_mib=200))
    for round_ in range(3):
        a, b = f"a{round_}", f"b{round_}"
        results = submit_together(settings, redis, ["vm", "launch", a, "--memory", "16", "--disk", "0"],
                                  ["vm", "launch", b, "--memory", "16", "--disk", "0"], refusal_ok=True)
        codes = sorted(r.returncode for r in results)
        assert codes == [0, 2], [(r.returncode, r.stdout, r.stderr) for r in results]
        refused = next(r for r in results if r.returncode == 2)
        assert "quota: namespace" in refused.stderr and "allows 2 VMs; it has 2 and this asks for 1" in refused.stderr
        assert redis.scard(keys.vms(ns)) == 2
        winner = a if results[0].returncode == 0 else b
        done = client.wait([j.id for j in client.submit(ops(Op.DELETE, ns, winner))])
        assert done[0].state.value == "succeeded"


def test_cli_sets_shows_clears_and_refuses(cluster: list[WorkerProc], client: RedisClient,
                                           settings: Settings, redis: Redis) -> None:
    ns = settings.namespace
    client.wait([j.id for j in client.submit(ops(Op.LAUNCH, ns, "c[1-3]", memory_mib=16, disk_gib=1))])
    proc = run_cli(settings, "--json", "ns", "quota", ns, "--vms", "4", "--memory", "1024", "--disk", "10")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["quota"] == {"vms": 4, "memory_mib": 1024, "vcpus": None, "disk_gib": 10}
    assert redis.hget(keys.namespace(ns), "quota_vms") == "4"
    refused = run_cli(settings, "vm", "launch", "d[1-2]", "--memory", "16", "--disk", "0")
    assert refused.returncode == 2, refused.stderr
    assert f"quota: namespace {ns} allows 4 VMs; it has 3 and this asks for 2" in refused.stderr
    refused = run_cli(settings, "vm", "launch", "d1", "--memory", "16", "--disk", "8")
    assert refused.returncode == 2 and "allows 10 GiB of disk; it has 3 GiB and this asks for 8 GiB" in refused.stderr
    assert redis.scard(keys.vms(ns)) == 3
    shown = run_cli(settings, "ns", "quota", ns)
    assert shown.returncode == 0 and "4 VMs" in shown.stdout and "10 GiB disk" in shown.stdout
    listed = run_cli(settings, "--json", "ns", "list")
    [mine] = [n for n in json.loads(listed.stdout) if n["name"] == ns]
    assert mine["quota"]["vms"] == 4
    proc = run_cli(settings, "--json", "ns", "quota", ns, "--vms", "none", "--disk", "0")
    assert json.loads(proc.stdout)["quota"] == {"vms": None, "memory_mib": 1024, "vcpus": None, "disk_gib": None}
    assert run_cli(settings, "ns", "quota", ns, "--vms", "-1").returncode == 2
    ok = run_cli(settings, "vm", "launch", "d[1-2]", "--memory", "16", "--disk", "0")
    assert ok.returncode == 0, ok.stderr


def test_api_sets_the_quota_and_refuses_with_409(api_server: ApiServer, client: RedisClient,
                                                 settings: Settings) -> None:
    ns = settings.namespace
    client.wait([j.id for j in client.submit(ops(Op.LAUNCH, ns, "e1", memory_mib=16, disk_gib=0))])
    reader = api_server.token(f"{ns}-reader", "read", [ns])
    with api_server.http(reader) as http:
        assert http.put(f"/api/v1/namespaces/{ns}/quota", json={"vcpus": 1}).status_code == 403
    with api_server.http(api_server.admin_token) as http:
        r = http.put(f"/api/v1/namespaces/{ns}/quota", json={"vcpus": 2})
        assert r.status_code == 200 and r.json()["quota"]["vcpus"] == 2, r.text
        assert http.get(f"/api/v1/namespaces/{ns}").json()["quota"]["vcpus"] == 2
        assert http.put(f"/api/v1/namespaces/{ns}/quota", json={"cpus": 2}).status_code == 422
        body = {"operations": [{"op": "launch", "namespace": ns, "vm": "e2",
                                "params": {"memory_mib": 16, "disk_gib": 0, "vcpus": 2}}]}
        r = http.post("/api/v1/jobs", json=body)
        assert r.status_code == 409 and r.json()["error"]["code"] == "no_capacity", r.text
        assert "allows 2 vCPUs; it has 1 and this asks for 2" in r.json()["error"]["message"]
        assert http.put("/api/v1/namespaces/nosuch-ns/quota", json={}).status_code == 404
        # PATCH changes only the limits it names (0 clears one); PUT replaced them all
        r = http.patch(f"/api/v1/namespaces/{ns}/quota", json={"vms": 5})
        assert r.status_code == 200 and r.json()["quota"] == {"vms": 5, "memory_mib": None, "vcpus": 2,
                                                              "disk_gib": None}, r.text
        r = http.patch(f"/api/v1/namespaces/{ns}/quota", json={"vcpus": 0, "disk_gib": None})
        assert r.status_code == 200 and r.json()["quota"]["vcpus"] is None and r.json()["quota"]["vms"] == 5
        for bad in ({"cpus": 2}, {"vms": "5"}, {"vms": -1}):
            assert http.patch(f"/api/v1/namespaces/{ns}/quota", json=bad).status_code == 422, bad
        assert http.patch("/api/v1/namespaces/nosuch-ns/quota", json={"vms": 1}).status_code == 404
    with api_server.http(reader) as http:
        assert http.patch(f"/api/v1/namespaces/{ns}/quota", json={"vms": 1}).status_code == 403
    # the CLI's client over the API changes the limits it is given, and only them
    over_http = HttpClient(settings.model_copy(update={"api_url": api_server.url, "token": api_server.admin_token}))
    try:
        assert over_http.update_quota(ns, Quota(disk_gib=7)).quota == Quota(vms=5, disk_gib=7)
    finally:
        over_http.close()


def test_a_launch_whose_disk_no_store_has_room_for_is_refused_naming_the_host(
        cluster: list[WorkerProc], client: RedisClient, settings: Settings, redis: Redis) -> None:
    assert all(h.store_free_bytes for h in client.hosts() if h.name in ("t1", "t2"))
    proc = run_cli(settings, "vm", "launch", "huge", "--memory", "16", "--disk", "16384", "--host", "t1")
    assert proc.returncode == 2, proc.stderr
    assert re.search(r"host t1 has \d+\.\d GiB free in its store; the disk needs 16384 GiB \+ 1 GiB", proc.stderr)
    assert not redis.exists(keys.vm(settings.namespace, "huge"))


def test_a_resize_is_checked_against_the_quota_too(cluster: list[WorkerProc], client: RedisClient,
                                                   settings: Settings) -> None:
    ns = settings.namespace
    client.wait([j.id for j in client.submit(ops(Op.LAUNCH, ns, "r[1-2]", memory_mib=64, vcpus=1, disk_gib=0))])
    client.set_quota(ns, Quota(memory_mib=256, vcpus=3))
    refused = run_cli(settings, "vm", "set", "r1", "--memory", "256")  # 64 + 256 > 256
    assert refused.returncode == 2, refused.stderr
    assert f"quota: namespace {ns} allows 256 MiB" in refused.stderr
    assert run_cli(settings, "vm", "set", "r1", "--vcpus", "3").returncode == 2  # 1 + 3 > 3
    grow = client.wait([j.id for j in client.submit(ops(Op.SET, ns, "r1", memory_mib=192))])  # 64 + 192 = 256
    assert grow[0].state.value == "succeeded", grow[0].error
    client.set_quota(ns, Quota(memory_mib=100))  # lowered below what is used: shrinking still goes
    shrink = client.wait([j.id for j in client.submit(ops(Op.SET, ns, "r1", memory_mib=32))])
    assert shrink[0].state.value == "succeeded", shrink[0].error


FIELDS = ("vms", "memory_mib", "vcpus", "disk_gib")


def test_concurrent_changes_of_different_limits_all_hold(client: RedisClient, settings: Settings) -> None:
    """Four writers, one limit each, released together round after round: the server merges each
    change in one step, so after every round all four hold (a client that read the quota, changed its
    field and wrote the whole quota back would lose the others' changes made in between)."""
    ns = settings.namespace
    client.create_namespace(ns, None)
    rounds, seen = 30, []
    clients = [RedisClient(settings) for _ in FIELDS]
    start = threading.Barrier(len(FIELDS))
    done = threading.Barrier(len(FIELDS), action=lambda: seen.append(client.store.namespace(ns)))

    def writer(i: int) -> None:
        for r in range(1, rounds + 1):
            start.wait(timeout=30)
            clients[i].update_quota(ns, Quota(**{FIELDS[i]: 100 * r + i}))
            done.wait(timeout=30)

    with ThreadPoolExecutor(len(FIELDS)) as pool:
        list(pool.map(writer, range(len(FIELDS))))
    expected = [Quota(**{f: 100 * r + i for i, f in enumerate(FIELDS)}) for r in range(1, rounds + 1)]
    assert [n.quota if n else None for n in seen] == expected


def test_concurrent_cli_quota_changes_all_hold(client: RedisClient, settings: Settings) -> None:
    """The same through ``vmorch ns quota``, one process per limit, all started at once."""
    ns = settings.namespace
    client.create_namespace(ns, None)
    client.set_quota(ns, Quota(vms=1, memory_mib=1, vcpus=1, disk_gib=1))
    options = {"vms": "--vms", "memory_mib": "--memory", "vcpus": "--vcpus", "disk_gib": "--disk"}
    for r in (2, 3):
        with ThreadPoolExecutor(len(FIELDS)) as pool:
            procs = list(pool.map(lambda args: run_cli(settings, *args),
                                  [("ns", "quota", ns, options[f], str(r)) for f in FIELDS]))
        assert all(p.returncode == 0 for p in procs), [p.stderr for p in procs]
        found = client.store.namespace(ns)
        assert found is not None and found.quota == Quota(vms=r, memory_mib=r, vcpus=r, disk_gib=r)
    missing = run_cli(settings, "ns", "quota", f"{ns}-none", "--vms", "1")
    assert isinstance(missing, subprocess.CompletedProcess) and missing.returncode == 3, missing.stderr


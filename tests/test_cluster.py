"""The cluster: three hosts with separate hypervisors, placement, namespaces."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator

import pytest
from redis import Redis

from orchestrator.model.errors import InvalidInput, NoCapacity
from orchestrator.model.operation import Op
from orchestrator.model.records import JobState
from orchestrator.model.settings import Settings
from orchestrator.services.client import RedisClient
from orchestrator.store import keys

from .conftest import (
    ROOT,
    WorkerProc,
    cleanup_namespace,
    ops,
    run_cli,
    running_hosts,
    settings_env,
    start_worker,
    wait_hosts_up,
)
from .test_ordering import BARRIER_SUBMIT

HOSTS = {"c1": {"rack": "a"}, "c2": {"rack": "a"}, "c3": {"rack": "b"}}


@pytest.fixture(scope="module")
def three_hosts(base_settings: Settings) -> Iterator[list[WorkerProc]]:
    workers = [start_worker(base_settings, name, args=[f"--label={k}={v}" for k, v in labels.items()])
               for name, labels in HOSTS.items()]
    with running_hosts(base_settings, *workers) as ws:
        yield ws


@pytest.fixture
def limited(client: RedisClient, settings: Settings, three_hosts: list[WorkerProc]) -> str:
    """The test's namespace, limited to the three hosts of this module."""
    client.create_namespace(settings.namespace, list(HOSTS))
    return settings.namespace


def launched(client: RedisClient, ns: str, target: str, **params: object) -> dict[str, str]:
    jobs = client.wait([j.id for j in client.submit(ops(Op.LAUNCH, ns, target, **params))], timeout=60)
    assert all(j.state is JobState.SUCCEEDED for j in jobs), [(j.vm, j.error) for j in jobs]
    return {j.vm: j.host for j in jobs}


def test_placement_fills_the_least_committed_host_and_follows_labels_colocation_and_spread(
        limited: str, client: RedisClient, settings: Settings) -> None:
    ns = limited
    first = launched(client, ns, "p1", memory_mib=512)
    second = launched(client, ns, "p2", memory_mib=64)
    assert first["p1"] != second["p2"], "the second VM should go to a host with less committed"
    assert launched(client, ns, "rb", memory_mib=32, host_labels={"rack": "b"}) == {"rb": "c3"}
    assert launched(client, ns, "near", memory_mib=32, colocate="p1") == {"near": first["p1"]}
    spread = launched(client, ns, "s[1-6]", memory_mib=16, spread=True)
    assert Counter(spread.values()) == {"c1": 2, "c2": 2, "c3": 2}

    dry = run_cli(settings, "--json", "vm", "launch", "d[1-3]", "--memory", "32", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    plan = json.loads(dry.stdout)["plan"]
    assert [p["vm"] for p in plan] == ["d1", "d2", "d3"] and {p["host"] for p in plan} <= set(HOSTS)
    assert client.store.vm_names(ns) == sorted([*first, *second, "rb", "near", *spread]), "a dry run changed things"

    with pytest.raises(NoCapacity, match="labels rack=z"):
        client.submit(ops(Op.LAUNCH, ns, "nowhere", host_labels={"rack": "z"}))
    with pytest.raises(NoCapacity, match="not enough memory"):
        client.submit(ops(Op.LAUNCH, ns, "huge", memory_mib=100_000))


def test_reservations_follow_launch_set_and_delete(limited: str, client: RedisClient) -> None:
    def committed(host: str) -> tuple[int, int]:
        h = client.store.host(host)
        return h.committed_mib, h.committed_vcpus

    before = committed("c3")
    launched(client, limited, "r1", memory_mib=100, vcpus=2, host="c3")
    assert committed("c3") == (before[0] + 100, before[1] + 2)
    [grow] = client.submit(ops(Op.SET, limited, "r1", memory_mib=150, vcpus=3))
    client.wait([grow.id])
    assert committed("c3") == (before[0] + 150, before[1] + 3)
    [delete] = client.submit(ops(Op.DELETE, limited, "r1"))
    client.wait([delete.id])
    assert committed("c3") == before


def test_twenty_concurrent_launches_race_for_room_for_ten(
        three_hosts: list[WorkerProc], base_settings: Settings, redis: Redis) -> None:
    """Two namespaces (so two different cmd locks) race for two hosts' memory: exactly 10 win."""
    spaces = [f"race{random.getrandbits(20)}a", f"race{random.getrandbits(20)}b"]
    client = RedisClient(base_settings)
    for ns in spaces:
        client.create_namespace(ns, ["c1", "c2"])
    try:
        free = min(client.store.host(h).memory_mib - client.store.host(h).committed_mib for h in ("c1", "c2"))
        size = free // 5 - 1  # five fit on each host: room for exactly ten
        barrier = f"test:race:{random.getrandbits(32)}"
        procs = [subprocess.Popen(
            [sys.executable, str(BARRIER_SUBMIT), base_settings.resolved_redis_url(), barrier, "--", "--json",
             "--namespace", spaces[i % 2], "vm", "launch", f"racer{i}", "--memory", str(size), "--disk", "0"],
            cwd=ROOT, env=settings_env(base_settings), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(20)]
        for _ in procs:
            assert redis.blpop([f"{barrier}:ready"], timeout=60)
        redis.rpush(barrier, *[1] * len(procs))
        results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
        redis.delete(barrier, f"{barrier}:ready")
        accepted = [json.loads(out) for code, out, _ in results if code == 0]
        refused = [err for code, _, err in results if code != 0]
        assert len(accepted) == 10 and len(refused) == 10, (len(accepted), refused[:2])
        assert all("not enough memory" in err for err in refused), refused[:2]
        for h in ("c1", "c2"):
            host = client.store.host(h)
            assert host.committed_mib <= host.memory_mib, f"{h} overcommitted"
        client.wait([j["id"] for j in accepted], timeout=60)
    finally:
        for ns in spaces:
            cleanup_namespace(client, redis, ns)


def test_a_host_that_goes_down_between_placement_and_launch(
        three_hosts: list[WorkerProc], limited: str, client: RedisClient, redis: Redis) -> None:
    c3 = next(w for w in three_hosts if w.host == "c3")
    before = client.store.host("c3").committed_mib
    c3.proc.send_signal(signal.SIGSTOP)  # frozen: it still looks up for a few seconds
    try:
        [job] = client.submit(ops(Op.LAUNCH, limited, "late", memory_mib=64, host="c3"))
        assert client.store.host("c3").committed_mib == before + 64  # reserved at placement
        [done] = client.wait([job.id], timeout=30)
        assert done.state is JobState.FAILED and done.error is not None and done.error.code == "host_down"
    finally:
        c3.proc.send_signal(signal.SIGCONT)
    # the launch that never ran gave its name and its reservation back
    assert "late" not in client.store.vm_names(limited)
    assert client.store.host("c3").committed_mib == before
    wait_hosts_up(client.settings, c3)
    assert client.job(job.id).state is JobState.FAILED  # the resumed worker did not run it after all
    assert launched(client, limited, "late", memory_mib=64, host="c3") == {"late": "c3"}


def test_namespaces_are_isolated_even_on_one_host(three_hosts: list[WorkerProc], client: RedisClient,
                                                  base_settings: Settings, redis: Redis) -> None:
    other = base_settings.model_copy(update={"namespace": f"iso{random.getrandbits(20)}"})
    theirs = RedisClient(other)
    try:
        ns = client.settings.namespace
        client.create_namespace(ns, ["c1"])
        theirs.create_namespace(other.namespace, ["c1"])
        launched(client, ns, "same", memory_mib=32)
        launched(theirs, other.namespace, "same", memory_mib=48)
        [pause] = client.submit(ops(Op.PAUSE, ns, "same"))
        client.wait([pause.id])
        mine, yours = client.vm(ns, "same"), theirs.vm(other.namespace, "same")
        assert (mine.host, yours.host) == ("c1", "c1") and mine.domain != yours.domain
        assert (mine.state.value, yours.state.value) == ("paused", "running")
        assert (mine.memory_mib, yours.memory_mib) == (32, 48)
        assert [v.name for v in client.vms(ns)] == ["same"] and len(theirs.vms(other.namespace)) == 1
        with pytest.raises(InvalidInput, match="not in this namespace's hosts"):
            client.submit(ops(Op.LAUNCH, ns, "outside", host="c2"))
        listed = run_cli(client.settings, "--json", "job", "list")
        assert all(j["namespace"] == ns for j in json.loads(listed.stdout))
    finally:
        cleanup_namespace(theirs, redis, other.namespace)


def test_namespace_delete_removes_its_vms_through_jobs_and_leaves_nothing(
        three_hosts: list[WorkerProc], base_settings: Settings, redis: Redis) -> None:
    doomed = base_settings.model_copy(update={"namespace": f"gone{random.getrandbits(20)}"})
    client = RedisClient(doomed)
    launched(client, doomed.namespace, "g[1-4]", memory_mib=16)
    refused = run_cli(doomed, "ns", "delete", doomed.namespace)
    assert refused.returncode == 2 and "has 4 VMs" in refused.stderr and "--force" in refused.stderr
    done = run_cli(doomed, "--json", "ns", "delete", doomed.namespace, "--force")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["deleted_vms"] == 4
    assert client.store.namespace(doomed.namespace) is None
    left = [k for k in redis.scan_iter(f"*{doomed.namespace}*")
            if not k.startswith((f"{keys.PREFIX}:fence:", "lock-signal:"))]  # counters stay; signals expire in 1 s
    assert not left, f"namespace keys left behind: {left}"
    assert run_cli(doomed, "ns", "delete", doomed.namespace).returncode == 3

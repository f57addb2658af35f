"""Networks, the records and the contract: CLI and API, checks, VNIs, NICs of VMs, refusals.

These run on the session's test-driver hosts (no kernel devices: those hosts plug their domains
into nothing, see ``worker.vmnet``); the kernel side, with real guests on hosts in their own
network namespaces, is ``tests/test_network_guests.py``.
"""

from __future__ import annotations

import json
import threading

from redis import Redis

from orchestrator.model.network import NetworkSpec, nic_mac
from orchestrator.model.operation import Op
from orchestrator.model.records import JobState
from orchestrator.model.settings import Settings
from orchestrator.services.client import RedisClient
from orchestrator.store import keys
from orchestrator.store.tokens import Role

from .apiserver import ApiServer
from .conftest import WorkerProc, ops, run_cli


def test_cli_creates_lists_shows_and_deletes_a_network(cluster: list[WorkerProc], client: RedisClient,
                                                       settings: Settings, redis: Redis) -> None:
    made = run_cli(settings, "--json", "net", "create", "lan", "--subnet", "10.20.0.0/24", "--no-dhcp")
    assert made.returncode == 0, made.stderr
    net = json.loads(made.stdout)
    assert (net["name"], net["subnet"], net["state"], net["dhcp"], net["gateway_host"]) == \
        ("lan", "10.20.0.0/24", "ready", False, "")
    assert net["vni"] >= 4096
    listed = run_cli(settings, "net", "list")
    assert listed.returncode == 0 and "lan" in listed.stdout and "10.20.0.0/24" in listed.stdout
    shown = run_cli(settings, "net", "show", "lan")
    assert shown.returncode == 0 and str(net["vni"]) in shown.stdout
    gone = run_cli(settings, "net", "delete", "lan")
    assert gone.returncode == 0, gone.stderr
    assert not redis.exists(keys.net(settings.namespace, "lan"))
    assert not redis.hexists(keys.NET_VNIS, str(net["vni"]))
    missing = run_cli(settings, "net", "show", "lan")
    assert missing.returncode == 3 and "no network 'lan'" in missing.stderr


def test_bad_networks_are_refused_with_a_reason_and_change_nothing(cluster: list[WorkerProc], client: RedisClient,
                                                                   settings: Settings, redis: Redis) -> None:
    client.create_network(settings.namespace, NetworkSpec(name="a", subnet="10.30.0.0/16", dhcp=False))
    vni_next = redis.get(keys.NET_VNI_NEXT)
    cases = [
        (["net", "create", "b", "--subnet", "10.30.5.0/24", "--no-dhcp"], "overlaps network 'a' (10.30.0.0/16)"),
        (["net", "create", "a", "--subnet", "10.40.0.0/24", "--no-dhcp"], "already exists"),
        (["net", "create", "b", "--subnet", "10.40.0.1/24"], "has host bits set"),
        (["net", "create", "b", "--subnet", "10.40.0.0/30"], "outside /16 to /29"),
        (["net", "create", "b", "--subnet", "127.0.0.0/24"], "special-purpose"),
        (["net", "create", "b", "--subnet", "fd00::/64"], "IPv6"),
        (["net", "create", "b", "--subnet", "nonsense"], "not an IPv4 network"),
        (["net", "create", "../etc", "--subnet", "10.50.0.0/24"], "network name"),
        (["net", "create", "b", "--subnet", "10.50.0.0/24", "--host", "nosuchhost"], "unknown host"),
        (["vm", "launch", "v1", "--disk", "0", "--net", "nosuch"], "no network 'nosuch'"),
        (["vm", "launch", "v1", "--disk", "0", "--net", "../../x"], "net"),
    ]
    for argv, reason in cases:
        proc = run_cli(settings, *argv)
        assert proc.returncode in (2, 3), (argv, proc.returncode, proc.stderr)
        assert reason in proc.stderr, (argv, proc.stderr)
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) <= 2, proc.stderr
    assert client.store.vm_names(settings.namespace) == []
    assert [n.name for n in client.networks(settings.namespace)] == ["a"]
    assert redis.get(keys.NET_VNI_NEXT) == vni_next  # no VNI spent on a refusal
    client.delete_network(settings.namespace, "a")


def test_vnis_are_unique_under_concurrent_creates(cluster: list[WorkerProc], client: RedisClient,
                                                  settings: Settings) -> None:
    names = [f"n{i}" for i in range(12)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(names))

    def create(i: int) -> None:
        c = RedisClient(settings)
        try:
            barrier.wait(timeout=10)
            c.create_network(settings.namespace, NetworkSpec(name=names[i], subnet=f"10.60.{i}.0/24", dhcp=False))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(len(names))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    nets = client.networks(settings.namespace)
    assert sorted(n.name for n in nets) == sorted(names)
    assert len({n.vni for n in nets}) == len(names)
    for n in names:
        client.delete_network(settings.namespace, n)


def test_overlapping_creates_race_and_exactly_one_wins(cluster: list[WorkerProc], client: RedisClient,
                                                       settings: Settings) -> None:
    results: list[str] = []
    barrier = threading.Barrier(4)

    def create(i: int) -> None:
        c = RedisClient(settings)
        barrier.wait(timeout=10)
        try:
            c.create_network(settings.namespace, NetworkSpec(name=f"o{i}", subnet="10.70.0.0/24", dhcp=False))
            results.append("ok")
        except Exception as exc:
            results.append(type(exc).__name__)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(results) == ["InvalidInput"] * 3 + ["ok"], results
    [net] = client.networks(settings.namespace)
    client.delete_network(settings.namespace, net.name)


def test_a_vm_gets_one_nic_per_network_in_order_and_the_network_outlives_no_vm(
        cluster: list[WorkerProc], client: RedisClient, settings: Settings, redis: Redis) -> None:
    ns = settings.namespace
    for name, subnet in (("front", "10.80.0.0/24"), ("back", "10.81.0.0/24")):
        client.create_network(ns, NetworkSpec(name=name, subnet=subnet, dhcp=False))
    proc = run_cli(settings, "vm", "launch", "r1", "--disk", "0", "--net", "front", "--net", "back", "--wait")
    assert proc.returncode == 0, proc.stderr
    vm = client.vm(ns, "r1")
    assert [(n.net, n.mac) for n in vm.nics] == [("front", nic_mac(ns, "r1", 0)), ("back", nic_mac(ns, "r1", 1))]
    shown = run_cli(settings, "vm", "show", "r1")
    assert f"nic 0   front {nic_mac(ns, 'r1', 0)}" in " ".join(shown.stdout.split("  ")) or "front" in shown.stdout
    as_json = json.loads(run_cli(settings, "--json", "vm", "show", "r1").stdout)
    assert [n["net"] for n in as_json["nics"]] == ["front", "back"]
    refused = run_cli(settings, "net", "delete", "front")
    assert refused.returncode == 2 and "has VMs on it: r1" in refused.stderr
    # a NIC it doesn't have, and link emulation its (test-driver) host can't do: refused before a job
    for argv, reason in ((["vm", "set", "r1", "--nic", "2", "--rate", "1mbit"], "there is no NIC 2"),
                         (["vm", "set", "r1", "--nic", "0", "--delay", "20ms"], "can't emulate delay"),
                         (["vm", "set", "r1", "--delay", "20ms"], "give --nic N"),
                         (["vm", "set", "r1", "--nic", "0", "--delay", "soon"], "not a duration")):
        bad = run_cli(settings, *argv)
        assert bad.returncode == 2 and reason in bad.stderr, (argv, bad.stderr)
    assert [j.op for j in client.jobs(ns, vm="r1")] == [Op.LAUNCH]
    # a live move of a VM with NICs is refused (its target's bridges come with a start)
    moved = run_cli(settings, "vm", "move", "r1", "--to", "t2" if vm.host == "t1" else "t1", "--live")
    assert moved.returncode == 2 and "can only move shut off" in moved.stderr
    done = client.wait([j.id for j in client.submit(ops(Op.DELETE, ns, "r1"))])
    assert done[0].state is JobState.SUCCEEDED
    for name in ("front", "back"):
        assert run_cli(settings, "net", "delete", name).returncode == 0


def test_the_api_serves_networks_and_keeps_nat_for_admins(cluster: list[WorkerProc], client: RedisClient,
                                                          settings: Settings, api_server: ApiServer) -> None:
    ns = settings.namespace
    operate = api_server.token(f"{ns}-op", Role.OPERATE, [ns])
    reader = api_server.token(f"{ns}-ro", Role.READ, [ns])
    with api_server.http(operate) as http, api_server.http(reader) as ro:
        made = http.post(f"/api/v1/namespaces/{ns}/networks", json={"name": "w", "subnet": "10.90.0.0/24",
                                                                      "dhcp": False})
        assert made.status_code == 201, made.text
        assert made.json()["state"] == "ready"
        nat = http.post(f"/api/v1/namespaces/{ns}/networks", json={"name": "x", "subnet": "10.91.0.0/24",
                                                                     "nat": True})
        assert nat.status_code == 403 and "admin" in nat.json()["error"]["message"]
        for body in ({"name": "y", "subnet": "10.90.0.128/25", "dhcp": False},
                     {"name": "y", "subnet": "/etc/passwd"}, {"name": "y/../z", "subnet": "10.92.0.0/24"},
                     {"name": "y", "subnet": "10.92.0.0/24", "bridge": "eth0"}):
            bad = http.post(f"/api/v1/namespaces/{ns}/networks", json=body)
            assert 400 <= bad.status_code < 500 and "error" in bad.json(), (body, bad.status_code, bad.text)
        assert [n["name"] for n in ro.get(f"/api/v1/namespaces/{ns}/networks").json()] == ["w"]
        assert ro.delete(f"/api/v1/namespaces/{ns}/networks/w").status_code == 403
        assert ro.get(f"/api/v1/namespaces/{ns}/networks/nope").status_code == 404
        capture = http.post(f"/api/v1/namespaces/{ns}/networks/w/capture", params={"seconds": 1})
        assert capture.status_code == 422 and "no gateway host" in capture.json()["error"]["message"]
        assert http.delete(f"/api/v1/namespaces/{ns}/networks/w").status_code == 200
    assert client.networks(ns) == []


def test_a_network_with_dhcp_waits_for_its_gateway_host(cluster: list[WorkerProc], client: RedisClient,
                                                        settings: Settings) -> None:
    """Test-driver hosts have no kernel side: a network that needs a gateway stays 'creating', and
    'net create' says what it waits for once its timeout passes."""
    proc = run_cli(settings, "net", "create", "g", "--subnet", "10.95.0.0/24", "--timeout", "1")
    assert proc.returncode == 1, proc.stderr
    assert "still creating after 1s, waiting for its gateway host" in proc.stderr
    net = client.network(settings.namespace, "g")
    assert net.gateway_host in {w.host for w in cluster} and net.gateway == "10.95.0.1"
    client.delete_network(settings.namespace, "g")
    # marked deleting; nobody tears down a gateway on these hosts: drop the record as its host would
    client.net_records.forget(client.network(settings.namespace, "g"))


def test_an_experiment_checks_its_networks(settings: Settings, tmp_path_factory: object) -> None:
    from orchestrator.model.experiment import parse

    text = """
name: topo
networks:
  - {name: a, subnet: 10.1.0.0/24}
  - {name: b, subnet: 10.1.0.0/25}
  - {name: c, subnet: 10.300.0.0/24}
vms:
  - {name: r, nets: [a, b]}
"""
    _, problems = parse(text)
    messages = [str(p) for p in problems]
    assert any("overlaps network 'a'" in m for m in messages), messages
    assert any("not an IPv4 network" in m for m in messages), messages


def test_the_cli_through_the_api_manages_networks(cluster: list[WorkerProc], client: RedisClient,
                                                   settings: Settings, api_server: ApiServer) -> None:
    ns = settings.namespace
    token = api_server.token(f"{ns}-cli", Role.OPERATE, [ns])
    via_api = settings.model_copy(update={"api_url": api_server.url, "token": token})
    made = run_cli(via_api, "--json", "net", "create", "viaapi", "--subnet", "10.99.0.0/24", "--no-dhcp")
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["state"] == "ready"
    assert "viaapi" in run_cli(via_api, "net", "list").stdout
    nat = run_cli(via_api, "net", "create", "out", "--subnet", "10.98.0.0/24", "--nat")
    assert nat.returncode == 2 and "role operate; this request needs admin" in nat.stderr, nat.stderr
    gone = run_cli(via_api, "net", "delete", "viaapi")
    assert gone.returncode == 0, gone.stderr
    assert client.networks(ns) == []

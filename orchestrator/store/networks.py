"""Network records in Redis (keys: ``keys.net*``).

Who writes what: the submit side creates a record and marks it deleting (holding ``cmd:<ns>`` and
``net:<ns>:<name>``: so a launch onto a network, which holds ``cmd:<ns>``, never races its
deletion); the gateway host's worker moves it from creating to ready and forgets it once torn
down (holding ``net:<ns>:<name>``); every host writes only its own field of ``:hosts`` and the
gateway host only ``leases`` and ``error``.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterable
from typing import Any, cast

from redis import Redis

from orchestrator.model.errors import AlreadyExists, InvalidInput, NoCapacity, NotFound
from orchestrator.model.network import (
    VNI_MAX,
    VNI_MIN,
    Network,
    NetworkSpec,
    gateway_address,
    parse_nics,
    subnets_overlap,
)
from orchestrator.store import keys


class NetworkRecords:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    def names(self, namespace: str) -> list[str]:
        return sorted(cast(set[str], self.redis.smembers(keys.nets(namespace))))

    def get(self, namespace: str, name: str) -> Network | None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(keys.net(namespace, name))
        pipe.hgetall(keys.net_hosts(namespace, name))
        h, hosts = pipe.execute()
        return Network.from_hash(namespace, h, hosts) if h else None

    def require(self, namespace: str, name: str) -> Network:
        net = self.get(namespace, name)
        if net is None:
            raise NotFound(f"no network {name!r} in namespace {namespace!r}",
                           hint="see 'vmorch net list'; create one with 'vmorch net create NAME --subnet CIDR'")
        return net

    def all(self, namespace: str) -> list[Network]:
        return [n for n in (self.get(namespace, name) for name in self.names(namespace)) if n is not None]

    def everywhere(self) -> list[Network]:
        """Every network of every namespace (a worker's sweep: a handful, found by their VNIs)."""
        out = []
        for owner in cast(dict[str, str], self.redis.hgetall(keys.NET_VNIS)).values():
            namespace, _, name = owner.partition("/")
            net = self.get(namespace, name)
            if net is not None:
                out.append(net)
        return out

    def by_vni(self) -> dict[int, tuple[str, str]]:
        return {int(vni): cast(tuple[str, str], tuple(owner.split("/", 1)))
                for vni, owner in cast(dict[str, str], self.redis.hgetall(keys.NET_VNIS)).items()}

    def create(self, namespace: str, spec: NetworkSpec, *, gateway_host: str, by: str) -> Network:
        """A new network's record, its VNI allocated. # LOCK: cmd:<ns>, net:<ns>:<name>."""
        if self.redis.exists(keys.net(namespace, spec.name)):
            raise AlreadyExists(f"network {spec.name!r} already exists in namespace {namespace!r}",
                                hint="pick another name, or delete it first with 'vmorch net delete'")
        for other in self.all(namespace):
            if subnets_overlap(other.subnet, spec.subnet):
                raise InvalidInput(f"subnet {spec.subnet} overlaps network {other.name!r} ({other.subnet})",
                                   hint="networks of one namespace need separate subnets; pick another range")
        vni = int(self.redis.incr(keys.NET_VNI_NEXT))
        if vni < VNI_MIN:
            # A cluster's first network starts at a random VNI above those people hand-configure: two
            # clusters whose hosts share a kernel (a test run beside a local cluster) then don't meet on
            # one bridge name. Collisions are still possible; one cluster per host is the design.
            start = VNI_MIN + secrets.randbelow((VNI_MAX - VNI_MIN) // 2)
            vni = int(self.redis.incrby(keys.NET_VNI_NEXT, start - vni))
        if vni > VNI_MAX:
            raise NoCapacity("no VXLAN network identifier left (2^24 handed out)",
                             hint="an operator can reset vmorch:net-vni:next below a range of free ones")
        record: dict[str, str | int | float] = {
                  "name": spec.name, "subnet": spec.subnet, "vni": vni, "dhcp": int(spec.dhcp), "nat": int(spec.nat),
                  "state": "creating" if gateway_host else "ready", "gateway_host": gateway_host,
                  "gateway": gateway_address(spec.subnet) if gateway_host else "", "created_at": time.time(),
                  "by": by, "leases": "{}", "error": ""}
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(keys.net(namespace, spec.name), mapping=cast("dict[Any, Any]", record))
        pipe.sadd(keys.nets(namespace), spec.name)
        pipe.hset(keys.NET_VNIS, str(vni), f"{namespace}/{spec.name}")
        pipe.execute()
        return self.require(namespace, spec.name)

    def users(self, namespace: str, name: str) -> list[str]:
        """The VMs of the namespace with a NIC on this network (any state)."""
        vms = sorted(cast(set[str], self.redis.smembers(keys.vms(namespace))))
        pipe = self.redis.pipeline(transaction=False)
        for vm in vms:
            pipe.hget(keys.vm(namespace, vm), "nics")
        return [vm for vm, nics in zip(vms, pipe.execute(), strict=True)
                if nics and any(n.net == name for n in parse_nics(nics))]

    def mark_deleting(self, namespace: str, name: str) -> None:
        """# LOCK: cmd:<ns>, net:<ns>:<name>. A network without a gateway goes at once."""
        net = self.require(namespace, name)
        if not net.gateway_host:
            self.forget(net)
        else:
            self.redis.hset(keys.net(namespace, name), "state", "deleting")

    def forget(self, net: Network) -> None:
        """The record gone, its VNI free. # LOCK: net:<ns>:<name>."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(keys.net(net.namespace, net.name), keys.net_hosts(net.namespace, net.name))
        pipe.srem(keys.nets(net.namespace), net.name)
        pipe.hdel(keys.NET_VNIS, str(net.vni))
        pipe.execute()

    def delete_after(self, namespace: str, name: str, job_id: int) -> None:
        """Delete the network once job ``job_id`` is final and no VM is on it (an experiment's teardown):
        its gateway host's worker (any worker, for a network without one) does it."""
        self.redis.hset(keys.net(namespace, name), "delete_after", job_id)

    def set_ready(self, net: Network) -> None:
        """# LOCK: net:<ns>:<name> (the gateway host's worker)."""
        self.redis.hset(keys.net(net.namespace, net.name), mapping={"state": "ready", "error": ""})

    def set_error(self, net: Network, error: str) -> None:
        self.redis.hset(keys.net(net.namespace, net.name), "error", error[:500])

    def set_leases(self, net: Network, leases: dict[str, str]) -> None:
        if leases != net.leases and self.redis.exists(keys.net(net.namespace, net.name)):
            self.redis.hset(keys.net(net.namespace, net.name), "leases", json.dumps(leases, sort_keys=True))

    def host_up(self, namespace: str, name: str, host: str, underlay: str) -> None:
        if self.redis.exists(keys.net(namespace, name)):
            self.redis.hset(keys.net_hosts(namespace, name), host, underlay)

    def host_down(self, namespace: str, name: str, host: str) -> None:
        self.redis.hdel(keys.net_hosts(namespace, name), host)

    def gateways(self, hosts: Iterable[str]) -> dict[str, int]:
        """How many networks each host is the gateway of (placement of a new one)."""
        count = dict.fromkeys(hosts, 0)
        for net in self.everywhere():
            if net.gateway_host in count:
                count[net.gateway_host] += 1
        return count

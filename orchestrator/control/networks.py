"""Networks, the submit side: ``vmorch net create|list|show|delete|capture``.

A network's record is created and marked for deletion here, under ``cmd:<ns>`` (the namespace's
structure: a launch onto the network holds it too, so no VM joins a network being deleted) and
``net:<ns>:<name>`` (level 4, a short section). Its devices are the hosts' business: the gateway
host's worker brings the gateway up and marks the network ready, and tears it down once it is
marked deleting (``worker.netsync``); a host's bridge comes and goes with its VMs on the network.
"""

from __future__ import annotations

import contextlib
import time
import uuid

from orchestrator.control.connection import Connection
from orchestrator.control.locks import LockName, cmd_lock, other_lock
from orchestrator.model.errors import ClusterUnavailable, ExecError, InvalidInput, NotFound, OperationTimeout
from orchestrator.model.network import Network, NetworkSpec, check_net_name, parse_nics, subnets_overlap
from orchestrator.model.records import HostState
from orchestrator.store import keys
from orchestrator.store.networks import NetworkRecords
from orchestrator.store.redisconn import connect

#: the Celery task that captures packets on one host (args: capture id, device, seconds)
CAPTURE_TASK = "vmorch.net-capture"
#: the Celery task that wakes a host's network sweep (a gateway to bring up or tear down now)
WAKE_TASK = "vmorch.net-wake"
CAPTURE_MAX_S = 300
#: a capture's file is cut there (it travels through Redis)
CAPTURE_MAX_BYTES = 16 * 1024 * 1024
_POLL_S = 0.2


def net_lock(namespace: str, name: str) -> LockName:
    """One network's record and its gateway (level 4: short sections only)."""
    return other_lock(f"net:{namespace}:{name}")


class Networks(Connection):
    @property
    def net_records(self) -> NetworkRecords:
        return NetworkRecords(self.redis)

    def networks(self, namespace: str) -> list[Network]:
        return self.net_records.all(namespace)

    def network(self, namespace: str, name: str) -> Network:
        return self.net_records.require(namespace, check_net_name(name))

    def create_network(self, namespace: str, spec: NetworkSpec) -> Network:
        """The record, its VNI and its gateway host; the gateway host brings it up (state ``creating``
        until then; ``wait_network`` waits for ``ready``)."""
        records = self.net_records
        timeout = self.settings.submit_lock_timeout
        with self.locks.hold(cmd_lock(namespace), net_lock(namespace, spec.name), timeout=timeout):
            info = self.store.namespace(namespace)
            if info is not None and info.state == "deleting":
                raise InvalidInput(f"namespace {namespace!r} is being deleted", hint="use another namespace, or wait")
            gateway = self._gateway_host(namespace, spec, (info.hosts or []) if info is not None else []) \
                if spec.needs_gateway else ""
            net = records.create(namespace, spec, gateway_host=gateway, by=self.actor)  # LOCK: cmd, net
            pipe = self.redis.pipeline(transaction=True)
            pipe.sadd(keys.NAMESPACES, namespace)
            pipe.hsetnx(keys.namespace(namespace), "created_at", time.time())
            pipe.execute()
        self._wake(net)
        return net

    def _wake(self, net: Network) -> None:
        """Its gateway host sweeps now rather than within its interval (best effort: the sweep comes anyway)."""
        if net.gateway_host:
            with contextlib.suppress(Exception):
                self.celery.send_task(WAKE_TASK, queue=keys.queue(net.gateway_host), expires=30)

    def _gateway_host(self, namespace: str, spec: NetworkSpec, allowed: list[str]) -> str:
        """The host for the network's gateway: up, allowed to the namespace, and not sharing a kernel with
        the gateway of an overlapping subnet (two gateways there would route each other's addresses)."""
        hosts = {h.name: h for h in self.store.hosts()}
        others = [n for n in self.net_records.everywhere() if n.gateway_host and subnets_overlap(n.subnet, spec.subnet)]

        def clash(name: str) -> Network | None:
            kernel = hosts[name].underlay or name
            return next((n for n in others if n.gateway_host in hosts
                         and (hosts[n.gateway_host].underlay or n.gateway_host) == kernel), None)

        if spec.host is not None:
            host = hosts.get(spec.host)
            if host is None:
                known = ", ".join(sorted(hosts)) or "none"
                raise InvalidInput(f"unknown host {spec.host!r}", hint=f"known hosts: {known}")
            if host.state is not HostState.UP:
                raise InvalidInput(f"host {spec.host!r} is {host.state.value}", hint="pick a host that is up")
            if (other := clash(spec.host)) is not None:
                raise InvalidInput(f"host {spec.host!r} holds the gateway of {other.namespace}/{other.name} "
                                   f"({other.subnet}), which overlaps {spec.subnet}",
                                   hint="pick another subnet or gateway host, or give --no-dhcp without --nat")
            return spec.host
        up = [h for h in hosts.values() if h.state is HostState.UP and (not allowed or h.name in allowed)]
        if not up:
            raise ClusterUnavailable("no host is up to hold the network's gateway (DHCP, NAT)",
                                     hint="start a worker ('vmorch worker HOST'), or give --no-dhcp without --nat")
        free = [h for h in up if clash(h.name) is None]
        if not free:
            raise InvalidInput(f"every host that could hold the gateway of {spec.subnet} holds one of an overlapping "
                               "subnet already", hint="pick another subnet, or give --no-dhcp without --nat")
        count = self.net_records.gateways(h.name for h in free)
        return min(free, key=lambda h: (count[h.name], h.name)).name

    def delete_network(self, namespace: str, name: str) -> Network:
        """Marked deleting (gone at once without a gateway); refused while a VM has a NIC on it."""
        records = self.net_records
        check_net_name(name)
        with self.locks.hold(cmd_lock(namespace), net_lock(namespace, name), timeout=self.settings.submit_lock_timeout):
            net = records.require(namespace, name)
            users = records.users(namespace, name)
            if users:
                more = f" (and {len(users) - 5} more)" if len(users) > 5 else ""
                raise InvalidInput(f"network {name!r} has VMs on it: {', '.join(users[:5])}{more}",
                                   hint="delete those VMs first ('vmorch vm delete NAME')")
            records.mark_deleting(namespace, name)  # LOCK: cmd, net
        self._wake(net)
        return net

    def wait_network(self, namespace: str, name: str, *, gone: bool, timeout: float) -> Network | None:
        """Until the network is ready (or gone, ``gone``); OperationTimeout says what it waits for."""
        deadline = time.monotonic() + timeout
        while True:
            net = self.net_records.get(namespace, name)
            if gone and net is None:
                return None
            if net is None:
                raise NotFound(f"network {name!r} is gone", hint="it was deleted meanwhile")
            if not gone and net.state == "ready":
                return net
            if time.monotonic() >= deadline:
                why = f": {net.error}" if net.error else ""
                raise OperationTimeout(f"network {name!r} is still {net.state} after {timeout:g}s, waiting for its "
                                       f"gateway host {net.gateway_host!r}{why}",
                                       hint=f"see 'vmorch host list' and 'vmorch net show {name}'")
            time.sleep(_POLL_S)

    def capture(self, namespace: str, name: str, *, vm: str | None, seconds: float) -> bytes:
        """Packets on the network for ``seconds``, as pcap: on ``vm``'s NIC(s) on it, on its host;
        otherwise on the network's bridge on its gateway host (what crosses it: broadcasts, DHCP, NAT'd
        traffic and its own VMs')."""
        if not 0 < seconds <= CAPTURE_MAX_S:
            raise InvalidInput(f"seconds: {seconds:g} is not between 0 and {CAPTURE_MAX_S}", hint="give --seconds 10")
        net = self.network(namespace, name)
        if vm is not None:
            record = self.store.get_vm(namespace, vm)
            indexes = [i for i, nic in enumerate(parse_nics(record.nics)) if nic.net == name]
            if not indexes:
                raise InvalidInput(f"VM {vm!r} has no NIC on network {name!r}", hint=f"see 'vmorch vm show {vm}'")
            host, target = record.host, {"domain": record.domain, "nic": indexes[0]}
        elif net.gateway_host:
            host, target = net.gateway_host, {"vni": net.vni}
        else:
            raise InvalidInput(f"network {name!r} has no gateway host to capture on",
                               hint="give --vm VM to capture on that VM's NIC")
        capture_id = uuid.uuid4().hex
        self.celery.send_task(CAPTURE_TASK, args=[capture_id, target, seconds], queue=keys.queue(host))
        blobs = connect(self.url, retries=2, decode=False)
        try:
            deadline = time.monotonic() + seconds + 30
            while time.monotonic() < deadline:
                data = blobs.getdel(keys.capture(capture_id))
                if data is not None:
                    return _capture_result(data if isinstance(data, bytes) else data.encode())
                time.sleep(_POLL_S)
        finally:
            blobs.close()
        raise OperationTimeout(f"no capture came back from host {host!r} within {seconds + 30:g}s",
                               hint="see 'vmorch host list': is its worker up?")


def _capture_result(data: bytes) -> bytes:
    """A worker writes ``ok:<pcap>`` or ``error:<message>``."""
    kind, _, rest = data.partition(b":")
    if kind == b"ok":
        return rest
    raise ExecError(f"capture failed: {rest.decode(errors='replace')[:300]}")

"""The store's VM registry and namespaces: VM records as users see them, and a namespace's life."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any, cast

from orchestrator.model.records import QUOTA_FIELDS, HostState, Namespace, Quota, Vm, vms_from_json
from orchestrator.store import keys
from orchestrator.store.entries import Fence, as_hash, no_vm, pairs
from orchestrator.store.hosts import HostStore
from orchestrator.store.scripts import Keys


def field(value: Any) -> str:
    """A record field as stored: a string as it is, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


class VmStore(HostStore):
    # -- VMs ----------------------------------------------------------------------------

    def get_vm(self, namespace: str, name: str, *, as_stored: bool = False) -> Vm:
        """The VM; its state is ``unknown`` while its host is down, unless ``as_stored``."""
        found = self._read_vms([keys.vm(namespace, name)])
        if not found:
            raise no_vm(namespace, name)
        vm = found[0]
        return vm if as_stored or self._host_up(vm.host) else vm.on_down_host()

    def vm_names(self, namespace: str) -> list[str]:
        return sorted(cast(set[str], self.redis.smembers(keys.vms(namespace))))

    def list_vms(self, namespace: str) -> list[Vm]:
        up = {h.name for h in self.hosts() if h.state is not HostState.DOWN}
        vms = self._read_vms([keys.vm(namespace, name) for name in self.vm_names(namespace)])
        return [vm if vm.host in up else vm.on_down_host() for vm in vms]

    def _read_vms(self, vm_keys: list[str], batch: int = 1000) -> list[Vm]:
        """VM records (missing ones left out), read and built as JSON ``batch`` keys per script call."""
        out: list[Vm] = []
        for start in range(0, len(vm_keys), batch):
            out += vms_from_json(self.scripts.vms_json(vm_keys[start:start + batch]))
        return out

    def update_vm(self, namespace: str, name: str, fence: Fence, fields: Mapping[str, Any], by: str = "") -> bool:
        """Change fields of a VM record; False if the VM no longer exists.

        # LOCK: the caller holds vm:<ns>:<name> with ``fence``.
        """
        stored = {k: field(v) for k, v in fields.items()}
        done = self.scripts.run("update_vm", Keys(vm=keys.vm(namespace, name), fence=fence.key,
                                                  events=keys.events(namespace)),
                                {"token": fence.token, "fields": stored, "fields_text": json.dumps(stored),
                                 "vm": name, "by": by})
        return bool(done)

    # -- namespaces ---------------------------------------------------------------------

    def schedule_names(self, namespace: str) -> list[str]:
        return sorted(cast(set[str], self.redis.smembers(keys.schedules(namespace))))

    def namespace(self, name: str) -> Namespace | None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(keys.namespace(name))
        pipe.scard(keys.vms(name))
        data, count = pipe.execute()
        return Namespace.from_hash(name, as_hash(data), vms=int(count)) if data else None

    def namespaces(self) -> list[Namespace]:
        names = sorted(cast(set[str], self.redis.smembers(keys.NAMESPACES)))
        found = (self.namespace(n) for n in names)
        return [ns for ns in found if ns is not None]

    def create_namespace(self, name: str, hosts: list[str] | None) -> Namespace:
        """# LOCK: the caller holds cmd:<name>."""
        pipe = self.redis.pipeline()
        pipe.sadd(keys.NAMESPACES, name)
        pipe.hset(keys.namespace(name), mapping={"created_at": f"{self.redis_time():.6f}",
                                                 "hosts": json.dumps(sorted(hosts)) if hosts else "",
                                                 "state": "active"})
        pipe.execute()
        created = self.namespace(name)
        assert created is not None
        return created

    def change_namespace_quota(self, name: str, changes: Quota, *, replace: bool = False) -> Namespace:
        """Change a namespace's limits (``quota_<field>``) in one atomic step (``lua/namespace_quota.lua``)
        and return the namespace as that step left it. A field of ``changes`` that is None stays as it
        is (``replace``: is cleared too); 0 clears it (no limit). NotFound if there is no such namespace.

        No lock: the script is the whole change, and it reads nothing the client sent back. The submit
        script reads the limits atomically at acceptance.
        """
        given = {f"quota_{f}": getattr(changes, f) for f in QUOTA_FIELDS}
        res = self.scripts.run("namespace_quota", Keys(namespace=keys.namespace(name), vms=keys.vms(name)), {
            "name": name, "set": {f: v for f, v in given.items() if v},
            "clear": [f for f, v in given.items() if v == 0 or (v is None and replace)]})
        return Namespace.from_hash(name, pairs(res[0]), vms=int(res[1]))

    def mark_namespace_deleting(self, name: str) -> None:
        """# LOCK: the caller holds cmd:<name>."""
        self.redis.hset(keys.namespace(name), "state", "deleting")

    def purge_namespace(self, name: str) -> int:
        """Remove an empty namespace and its history. Returns how many keys went.

        # LOCK: the caller holds cmd:<name> and has checked the registry is empty.
        Fencing counters stay: a lock's tokens must never go backwards, even if the name comes back.
        """
        ids = [int(i) for i in cast(list[str], self.redis.zrange(keys.jobs(name), 0, -1))]
        doomed = [k for i in ids
                  for k in (keys.job(i), keys.job_children(i), keys.job_dependents(i), keys.job_history(i))]
        doomed += [keys.jobs(name), keys.events(name), keys.namespace(name), keys.vms(name), keys.runs(name)]
        doomed += [keys.run(int(i)) for i in cast(list[str], self.redis.zrange(keys.runs(name), 0, -1))]
        doomed += list(cast(Iterable[str], self.redis.scan_iter(keys.vm(name, "*"), count=1000)))
        removed = 0
        for start in range(0, len(doomed), 1000):
            removed += int(self.redis.delete(*doomed[start:start + 1000]))
        self.redis.srem(keys.NAMESPACES, name)
        return removed

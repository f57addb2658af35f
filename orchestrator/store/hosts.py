"""The store's hosts: registration, heartbeats, draining, and the VMs placed on each."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, cast

from orchestrator.model.errors import NotFound
from orchestrator.model.records import Host, HostState, host_state
from orchestrator.store import keys
from orchestrator.store.base import StoreBase
from orchestrator.store.entries import as_hash


class HostStore(StoreBase):
    def hosts(self) -> list[Host]:
        names = sorted(cast(set[str], self.redis.smembers(keys.HOSTS)))
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(keys.host(name))
            pipe.scard(keys.host_vms(name))
        raw = pipe.execute()
        now = self.redis_time()
        return [Host.from_hash(as_hash(data), now=now, down_after=self.host_down_after, vms=int(count))
                for data, count in zip(raw[::2], raw[1::2], strict=True) if data]

    def host(self, name: str) -> Host:
        for host in self.hosts():
            if host.name == name:
                return host
        known = ", ".join(h.name for h in self.hosts()) or "none registered"
        raise NotFound(f"unknown host {name!r}", hint=f"known hosts: {known} (see 'vmorch host list')")

    def _host_up(self, name: str) -> bool:
        data = as_hash(self.redis.hgetall(keys.host(name)))
        return bool(data) and host_state(data, now=self.redis_time(),
                                         down_after=self.host_down_after) is not HostState.DOWN

    def register_host(self, name: str, fields: Mapping[str, Any]) -> None:
        now = self.redis_time()
        pipe = self.redis.pipeline()
        pipe.sadd(keys.HOSTS, name)
        pipe.hset(keys.host(name), mapping={"name": name, "started_at": f"{now:.6f}",
                                            "heartbeat_at": f"{now:.6f}", "stopped": "",
                                            **{k: str(v) for k, v in fields.items()}})
        pipe.execute()

    def heartbeat(self, name: str, fields: Mapping[str, str] | None = None) -> None:
        """Record a heartbeat (Redis's clock), this host's clock offset to it, and ``fields``."""
        before = time.time()
        now = self.redis_time()
        offset = (before + time.time()) / 2 - now  # off by at most half a round trip
        mapping: dict[str, str] = {"heartbeat_at": f"{now:.6f}", "clock_offset": f"{offset:.6f}", **(fields or {})}
        self.redis.hset(keys.host(name), mapping=mapping)  # type: ignore[arg-type]

    def set_draining(self, name: str, draining: bool) -> Host:
        """A draining host gets no new VMs; its VMs and their jobs carry on."""
        self.host(name)  # NotFound for an unknown host
        self.redis.hset(keys.host(name), "draining", "1" if draining else "")
        return self.host(name)

    def host_stopped(self, name: str) -> None:
        """A clean worker shutdown: the host is down now, not after the heartbeat times out."""
        self.redis.hset(keys.host(name), "stopped", "1")

    def vms_on_host(self, name: str) -> list[tuple[str, str]]:
        members = cast(set[str], self.redis.smembers(keys.host_vms(name)))
        return sorted((ns, vm) for ns, _, vm in (m.partition("/") for m in members))

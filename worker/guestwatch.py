"""What the guest agents of this host's VMs say, written on their VM records every few seconds.

Each round asks the agent of every running vmorch domain here for its network interfaces
(``guest-network-get-interfaces``, a short timeout) and writes ``agent`` (``connected`` or
``absent``) and ``addresses`` (JSON ``[{ip, mac}]``) on the VM's record -- only when they
changed, so a quiet cluster costs no writes.

Why on the record, and unfenced: these fields are observations, like a heartbeat, that no job
writes; every reader of VM records (``vm show``/``list``, the API, the dashboard) then has them
with nothing more to read, and they go with the record when the VM is deleted. Taking each VM's
lock every few seconds to write them would make this thread queue behind (and hold up) jobs. The
write is a WATCH on the record, then MULTI/EXEC only if the record exists and names this host
as the VM's: a VM deleted or moved meanwhile aborts it, so no stale host or deleted VM is written.
"""

from __future__ import annotations

import json
import logging
from typing import cast

import libvirt
from redis import Redis
from redis.exceptions import RedisError, WatchError

from orchestrator.model.errors import VmorchError
from orchestrator.store import keys

from . import agent, domxml
from .background import Background
from .libvirtconn import LibvirtConnection

log = logging.getLogger(__name__)

Seen = tuple[str, str]  # (agent, addresses as JSON)
ABSENT: Seen = ("absent", "[]")


class GuestWatch(Background):
    thread_name = "guestwatch"
    join_timeout = 10.0

    def __init__(self, driver: LibvirtConnection, redis: Redis, host: str, *, interval: float = 3.0) -> None:
        self.driver = driver
        self.redis = redis
        self.host = host
        self.interval = interval
        #: what each VM's record says (as this thread last wrote or read it), by (namespace, vm)
        self.written: dict[tuple[str, str], Seen] = {}
        super().__init__()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.round()
            except (RedisError, VmorchError, libvirt.libvirtError) as exc:
                log.warning("guest agent watch: %s", exc)

    def round(self) -> None:
        """Look at every vmorch domain of this host once; write what changed."""
        present: set[tuple[str, str]] = set()
        for dom in self.driver.conn.listAllDomains(0):
            try:
                # only vmorch's element, not the whole definition: this runs every few seconds
                meta = domxml.parse_fragment(str(dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, domxml.NS,
                                                              libvirt.VIR_DOMAIN_AFFECT_CONFIG)))
                running = dom.isActive() and dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
            except libvirt.libvirtError:
                continue  # not vmorch's (no metadata), or undefined meanwhile
            vm = (meta.namespace, meta.vm)
            present.add(vm)
            seen = self._look(dom) if running else ABSENT
            if self.written.get(vm) != seen:
                self._write(vm, seen)
        for vm in set(self.written) - present:
            del self.written[vm]  # gone from this host: its record is someone else's now, or gone

    def _look(self, dom: libvirt.virDomain) -> Seen:
        try:
            found = agent.addresses(dom)
        except (agent.AgentAbsent, agent.AgentCommandFailed, VmorchError):
            return ABSENT
        return ("connected", json.dumps([a.model_dump() for a in found]))

    def _write(self, vm: tuple[str, str], seen: Seen) -> None:
        key = keys.vm(*vm)
        with self.redis.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(key)  # type: ignore[no-untyped-call]
                host, agent_now, addresses_now = cast(list[str | None], pipe.hmget(key, "host", "agent", "addresses"))
                if host != self.host:
                    return  # deleted, or not this host's VM (any more)
                if (agent_now or "absent", addresses_now or "[]") != seen:
                    pipe.multi()
                    pipe.hset(key, mapping={"agent": seen[0], "addresses": seen[1]})
                    pipe.execute()
                self.written[vm] = seen
            except WatchError:
                pass  # changed meanwhile: the next round looks again

"""A VM's serial console for users: ``ConsoleClient``, the interface ``vm log`` and ``vm console`` use.

``RedisConsole`` reads and writes Redis (``orchestrator.store.console``);
``orchestrator.edge.guestclient.HttpConsole`` is the same over the HTTP API. Either checks that
the VM exists first, so a mistyped name is "not found", not an empty console.
"""

from __future__ import annotations

from typing import Protocol

from orchestrator.store import console
from orchestrator.store.console import ConsoleChunk
from orchestrator.store.jobstore import Store

__all__ = ["ConsoleChunk", "ConsoleClient", "RedisConsole"]


class ConsoleClient(Protocol):
    def read(self, namespace: str, vm: str, *, after: str = "0", count: int = console.READ_MAX,
             block_ms: int = 0) -> ConsoleChunk: ...
    def tail(self, namespace: str, vm: str, *, lines: int) -> ConsoleChunk: ...
    def claim(self, namespace: str, vm: str, session: str) -> bool: ...
    def writer(self, namespace: str, vm: str) -> str | None: ...
    def release(self, namespace: str, vm: str, session: str) -> None: ...
    def send(self, namespace: str, vm: str, session: str, text: str) -> bool: ...


class RedisConsole:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.redis = store.redis

    def _exists(self, namespace: str, vm: str) -> None:
        self.store.get_vm(namespace, vm)  # NotFound, with the hint to list VMs

    def read(self, namespace: str, vm: str, *, after: str = "0", count: int = console.READ_MAX,
             block_ms: int = 0) -> ConsoleChunk:
        if after in ("0", "$"):
            self._exists(namespace, vm)  # the first read of a session; later ones need not ask again
        return console.read(self.redis, namespace, vm, after=after, count=count, block_ms=block_ms)

    def tail(self, namespace: str, vm: str, *, lines: int) -> ConsoleChunk:
        self._exists(namespace, vm)
        return console.tail(self.redis, namespace, vm, lines=lines)

    def claim(self, namespace: str, vm: str, session: str) -> bool:
        self._exists(namespace, vm)
        return console.claim_writer(self.redis, namespace, vm, session)

    def writer(self, namespace: str, vm: str) -> str | None:
        return console.writer(self.redis, namespace, vm)

    def release(self, namespace: str, vm: str, session: str) -> None:
        console.release_writer(self.redis, namespace, vm, session)

    def send(self, namespace: str, vm: str, session: str, text: str) -> bool:
        return console.send(self.redis, namespace, vm, session, text)

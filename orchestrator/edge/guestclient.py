"""``HttpConsole``: ``orchestrator.services.console.ConsoleClient`` over the HTTP API (``api/guest.py``)."""

from __future__ import annotations

from urllib.parse import quote

from orchestrator.edge.httpclient import HttpClient
from orchestrator.store.console import READ_MAX, ConsoleChunk


class HttpConsole:
    def __init__(self, http: HttpClient) -> None:
        self.http = http

    @staticmethod
    def _path(namespace: str, vm: str, rest: str = "") -> str:
        return f"/api/v1/namespaces/{quote(namespace, safe='')}/vms/{quote(vm, safe='')}/console{rest}"

    def read(self, namespace: str, vm: str, *, after: str = "0", count: int = READ_MAX,
             block_ms: int = 0) -> ConsoleChunk:
        data = self.http._call("GET", self._path(namespace, vm), timeout=block_ms / 1000 + 30,
                               params={"after": after, "count": count, "block_ms": block_ms})
        return ConsoleChunk.model_validate(data)

    def tail(self, namespace: str, vm: str, *, lines: int) -> ConsoleChunk:
        return ConsoleChunk.model_validate(self.http._call("GET", self._path(namespace, vm, "/tail"),
                                                          params={"lines": lines}))

    def claim(self, namespace: str, vm: str, session: str) -> bool:
        data = self.http._call("PUT", self._path(namespace, vm, "/writer"), json={"session": session})
        return bool(data["writer"])

    def writer(self, namespace: str, vm: str) -> str | None:
        holder = self.http._call("GET", self._path(namespace, vm, "/writer"))["holder"]
        return str(holder) if holder else None

    def release(self, namespace: str, vm: str, session: str) -> None:
        self.http._call("DELETE", self._path(namespace, vm, "/writer"), params={"session": session})

    def send(self, namespace: str, vm: str, session: str, text: str) -> bool:
        data = self.http._call("POST", self._path(namespace, vm, "/input"), json={"session": session, "text": text})
        return bool(data["sent"])

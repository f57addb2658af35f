"""The HTTP API for tests: uvicorn serving ``create_app`` in a thread of the test process, on a free port."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx
import uvicorn
from fastapi import FastAPI

from orchestrator.edge.api import create_app
from orchestrator.model.settings import Settings
from orchestrator.store.redisconn import connect
from orchestrator.store.tokens import Role, Token, TokenStore


@dataclass
class ApiServer:
    url: str
    settings: Settings
    #: the secret of an admin token covering every namespace, made for the test session
    admin_token: str
    tokens: TokenStore
    made: list[str] = field(default_factory=list)

    def token(self, name: str, role: Role | str, namespaces: list[str]) -> str:
        """A new token's secret; revoked when the server's fixture ends."""
        secret, _ = self.tokens.create(name, Role(role), namespaces)
        self.made.append(name)
        return secret

    def revoke(self, name: str) -> Token:
        self.made.remove(name)
        return self.tokens.revoke(name)

    def http(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)


@contextmanager
def running(app: FastAPI) -> Iterator[str]:
    """``app`` served by uvicorn in a thread on a free loopback port; yields its base URL."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="vmorch-api", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise AssertionError("the API did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)


@contextmanager
def serve(settings: Settings, *, name: str = "test-admin") -> Iterator[ApiServer]:
    """The API on a free loopback port, with an admin token ``name``; everything undone at the end."""
    with running(create_app(settings)) as url:
        redis = connect(settings.resolved_redis_url())
        tokens = TokenStore(redis)
        admin, _ = tokens.create(name, Role.ADMIN, ["*"])
        api = ApiServer(url, settings, admin, tokens, [name])
        try:
            yield api
        finally:
            for made in list(api.made):
                tokens.revoke(made)
            redis.close()

"""The layout version (``vmorch:layout``): written by the first to connect, and every part refuses
another one, with one line that says what was found, what is needed and the fix.

Each test has a Redis of its own: changing the layout of the session's Redis would stop every
other test's client.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis

from orchestrator.model.errors import LayoutMismatch
from orchestrator.model.settings import Settings
from orchestrator.store import keys, layout

from .conftest import RedisServer, free_port, run_cli, start_worker

OTHER = keys.LAYOUT_VERSION + 1
LINE = (f"this Redis holds vmorch layout {OTHER}; this vmorch needs {keys.LAYOUT_VERSION}: "
        "upgrade every host to the same vmorch, or use an empty Redis")


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(free_port(), tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_settings(settings: Settings, own_redis: RedisServer) -> Settings:
    return settings.model_copy(update={"redis_url": own_redis.url})


def test_the_first_to_connect_writes_the_layout(own_settings: Settings, own_redis: RedisServer) -> None:
    done = run_cli(own_settings, "vm", "list")
    assert done.returncode == 0, done.stderr
    with Redis.from_url(own_redis.url, decode_responses=True) as r:
        assert r.get(keys.LAYOUT) == str(keys.LAYOUT_VERSION)
        layout.check(r)  # the same version: accepted


def test_another_layout_stops_the_cli_the_api_and_a_worker(own_settings: Settings, own_redis: RedisServer) -> None:
    with Redis.from_url(own_redis.url, decode_responses=True) as r:
        r.set(keys.LAYOUT, OTHER)
        with pytest.raises(LayoutMismatch, match=LINE):
            layout.check(r)

        done = run_cli(own_settings, "vm", "list")
        assert done.returncode == 2
        assert done.stderr.strip() == f"error: {LINE}"

        from orchestrator.edge.api import create_app

        with pytest.raises(LayoutMismatch, match=LINE):
            create_app(own_settings)

        worker = start_worker(own_settings, "layout-w")
        try:
            assert worker.proc.wait(timeout=60) == 2, worker.log_tail()
        finally:
            worker.stop()
        assert LINE in worker.log.read_text()
        assert not r.sismember(keys.HOSTS, "layout-w") and not r.exists(keys.host("layout-w"))
        assert r.get(keys.LAYOUT) == str(OTHER)  # nobody overwrote it


def test_a_redis_written_by_a_vmorch_before_versions_is_refused_not_adopted(own_redis: RedisServer) -> None:
    with Redis.from_url(own_redis.url, decode_responses=True) as r:
        r.set(keys.JOB_NEXT, 41)  # an older vmorch's cluster: keys, but no layout version
        with pytest.raises(LayoutMismatch, match=f"holds vmorch layout {keys.UNVERSIONED_LAYOUT};"):
            layout.check(r)
        assert r.get(keys.LAYOUT) is None  # refused, and nothing written

"""Shell completion from the cluster: VM names, job ids, host names and namespaces.

Typer runs these while the user presses TAB, before any command runs, so they read the
global options themselves. They must answer fast or not at all: a short socket timeout,
no retry, and any error means "no suggestions" (a traceback in the middle of a prompt is
worse than nothing). Install with ``vmorch --install-completion``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import typer

from orchestrator.model.settings import Settings

if TYPE_CHECKING:
    from orchestrator.store.jobstore import Store

TIMEOUT_S = 0.3
MAX_JOBS = 50


def _with_store(ctx: typer.Context, read: Callable[[Store, str], list[str]], incomplete: str) -> list[str]:
    try:
        # imported here: only TAB needs Redis, not every command's start-up
        from orchestrator.store.jobstore import Store
        from orchestrator.store.redisconn import connect_quick

        params = ctx.find_root().params
        overrides: dict[str, object] = {}
        if params.get("redis_url"):
            overrides["redis_url"] = params["redis_url"]
        settings = Settings(**overrides)  # type: ignore[arg-type]
        namespace = params.get("namespace") or settings.namespace
        redis = connect_quick(settings.resolved_redis_url(), timeout=TIMEOUT_S)
        try:
            found = read(Store(redis), str(namespace))
        finally:
            redis.close()
    except Exception:
        return []
    return [v for v in found if v.startswith(incomplete)]


def vm_names(ctx: typer.Context, incomplete: str) -> list[str]:
    return _with_store(ctx, lambda store, ns: store.vm_names(ns), incomplete)


def job_ids(ctx: typer.Context, incomplete: str) -> list[str]:
    """The namespace's newest jobs, unfinished ones first."""
    def read(store: Store, ns: str) -> list[str]:
        jobs = store.list_jobs(ns, limit=MAX_JOBS)
        return [str(j.id) for j in sorted(jobs, key=lambda j: (j.state.final, -j.id))]

    return _with_store(ctx, read, incomplete)


def host_names(ctx: typer.Context, incomplete: str) -> list[str]:
    return _with_store(ctx, lambda store, _ns: [h.name for h in store.hosts()], incomplete)


def namespace_names(ctx: typer.Context, incomplete: str) -> list[str]:
    return _with_store(ctx, lambda store, _ns: [n.name for n in store.namespaces()], incomplete)

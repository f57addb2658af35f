"""Retention: finished jobs older than ``Settings.job_retention`` go, with their history, so Redis
stays bounded (a job is about 1 KB; Redis runs with ``noeviction`` and refuses writes when full).

A job goes when it is final and finished at or before the cutoff (``now - retention``), with its
children if it is a parent (all or none), never while an unfinished job depends on it or it is still
in a mailbox. ``lua/prune.lua`` checks all of that at the moment it deletes, atomically, so pruning
can run beside busy workers. A VM's history stays with its VM (its stream has a size of its own); a
deleted VM's goes with the last of its jobs.

With ``Settings.job_archive_dir`` each job is first appended to ``<dir>/<namespace>.jsonl`` (one
JSON object a line: the job as the API shows it, with its ``events``), and the file is fsynced before
the delete. The archive is at least once: a pruner that dies between the two, or a lease lost
meanwhile, may leave a line written twice (read it by ``id``). Janitors hold a lease per namespace
(``keys.prune_lease``) while they archive, so two of them don't write the same jobs.

The workers' janitors call ``prune_once`` on every pass (a bounded batch: ``job_prune_batch`` jobs);
``vmorch job prune`` calls ``prune`` (every batch, until nothing old is left).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from pydantic import BaseModel, ConfigDict, Field

from orchestrator.model.records import Job
from orchestrator.model.settings import Settings
from orchestrator.store import keys
from orchestrator.store.base import StoreBase
from orchestrator.store.history import event_from_row
from orchestrator.store.scripts import Keys

log = logging.getLogger(__name__)

#: jobs ``prune.lua`` looks at in one call (each call is a few milliseconds of Redis)
SCAN = 2000
#: how long a pruner's lease on a namespace lasts unless renewed (each batch renews it)
LEASE_S = 60


class PruneReport(BaseModel):
    """What a prune did."""

    model_config = ConfigDict(frozen=True)

    #: jobs finished at or before this went (None: retention is off, nothing was looked at)
    cutoff: datetime | None = None
    #: jobs removed (parents and children each count), with their history
    removed: int = 0
    #: of them, written to the archive first
    archived: int = 0
    #: old finished jobs kept because an unfinished job still depends on them
    kept: int = 0
    #: jobs removed per namespace
    namespaces: dict[str, int] = Field(default_factory=dict)
    #: the batch was full (or a namespace was busy with another pruner): call again
    more: bool = False
    #: where the jobs were archived (None: not archived)
    archive_dir: str | None = None


class _Step(BaseModel):
    cursor: int
    done: bool
    kept: int
    ids: list[int]


def prune_once(store: StoreBase, settings: Settings, now: float | None = None, *, namespace: str | None = None,
               older_than: float | None = None, limit: int | None = None, lease_wait: float = 0.0) -> PruneReport:
    """Remove up to ``limit`` (``settings.job_prune_batch``) finished jobs older than ``older_than`` seconds
    (``settings.job_retention``; 0 there: retention is off) as of ``now`` (Redis's clock), in ``namespace`` or
    every namespace (image jobs' included). ``lease_wait``: how long to wait for a namespace another pruner
    is archiving (else it is skipped this time, and ``more`` says so).

    Raises OSError when the archive can't be written (nothing is removed then) and RedisError.
    """
    retention = settings.job_retention if older_than is None else older_than
    if older_than is None and retention <= 0:
        return PruneReport()
    now = store.redis_time() if now is None else now
    cutoff = now - retention
    budget = limit if limit is not None else settings.job_prune_batch
    archive = settings.job_archive_dir
    names = [namespace] if namespace is not None else \
        sorted(cast(set[str], store.redis.smembers(keys.NAMESPACES)) | {keys.IMAGES_NS})
    removed: dict[str, int] = {}
    archived = kept = 0
    more = False
    for ns in names:
        if budget <= 0:
            more = True
            break
        gone, saved, still, busy = _prune_namespace(store, ns, cutoff, budget, archive, lease_wait)
        if gone:
            removed[ns] = gone
        budget -= gone
        archived += saved
        kept += still
        more = more or busy
    more = more or budget <= 0
    total = sum(removed.values())
    if total:
        log.info("pruned %d jobs finished before %s%s", total, _iso(cutoff),
                 f" (archived to {archive})" if archive else "")
    return PruneReport(cutoff=datetime.fromtimestamp(cutoff, UTC), removed=total, archived=archived, kept=kept,
                       namespaces=removed, more=more, archive_dir=str(archive) if archive else None)


def prune(store: StoreBase, settings: Settings, *, namespace: str | None = None, older_than: float | None = None,
          now: float | None = None) -> PruneReport:
    """Every old finished job, batch after batch (``vmorch job prune``); waits for a janitor archiving
    a namespace to finish its batch."""
    now = store.redis_time() if now is None else now
    total: dict[str, int] = {}
    archived = 0
    while True:
        report = prune_once(store, settings, now, namespace=namespace, older_than=older_than,
                            lease_wait=LEASE_S + 1)
        for ns, n in report.namespaces.items():
            total[ns] = total.get(ns, 0) + n
        archived += report.archived
        if not report.more or report.removed == 0:
            return report.model_copy(update={"removed": sum(total.values()), "archived": archived,
                                             "namespaces": total, "more": report.more})


def _prune_namespace(store: StoreBase, ns: str, cutoff: float, budget: int, archive: Path | None,
                     lease_wait: float) -> tuple[int, int, int, bool]:
    """(removed, archived, kept, busy: another pruner holds the namespace) for one namespace."""
    if archive is None:
        return (*_sweep(store, ns, cutoff, budget, None), False)
    # Look before taking the lease: most passes find nothing to do, and then cost one script call.
    first = _step(store, ns, cutoff, dry=True, limit=1)
    if not first.ids:
        return 0, 0, first.kept, False
    with _lease(store, ns, lease_wait) as held:
        if not held:
            return 0, 0, 0, True
        return (*_sweep(store, ns, cutoff, budget, archive), False)


def _sweep(store: StoreBase, ns: str, cutoff: float, budget: int, archive: Path | None) -> tuple[int, int, int]:
    """Remove (archiving first, if asked) up to ``budget`` old jobs of ``ns``: (removed, archived, kept)."""
    removed = archived = kept = 0
    after = 0
    while removed < budget:
        step = _step(store, ns, cutoff, dry=archive is not None, limit=budget - removed, after=after)
        kept += step.kept
        if archive is not None and step.ids:
            archived += _archive(store, archive, step.ids)
            store.redis.expire(keys.prune_lease(ns), LEASE_S)
            step = step.model_copy(update={"ids": _step(store, ns, cutoff, roots=step.ids).ids})
        removed += len(step.ids)
        if step.done:
            break
        after = step.cursor
    return removed, archived, kept


def _step(store: StoreBase, ns: str, cutoff: float, *, dry: bool = False, limit: int = 1_000_000, after: int = 0,
          roots: list[int] | None = None) -> _Step:
    """One call of ``lua/prune.lua``."""
    args: dict[str, Any] = {"cutoff": f"{cutoff:.6f}", "limit": limit, "dry": dry, "after": after, "scan": SCAN,
                            "vm_histories": ns != keys.IMAGES_NS}  # an image job's vm is its image
    if roots is not None:
        args["roots"] = roots
    out = store.scripts.run("prune", Keys(jobs=keys.jobs(ns), delayed=keys.DELAYED, released=keys.RELEASED), args)
    return _Step(cursor=int(out[0]), done=bool(int(out[1])), kept=int(out[2]), ids=[int(i) for i in out[3:]])


def _archive(store: StoreBase, folder: Path, roots: list[int]) -> int:
    """Append the jobs of these groups (each root and its children) to ``<folder>/<namespace>.jsonl``,
    each with its history, and fsync them. Returns how many lines were written."""
    pipe = store.redis.pipeline(transaction=False)
    for root in roots:
        pipe.zrange(keys.job_children(root), 0, -1)
    ids = [i for root, children in zip(roots, pipe.execute(), strict=True) for i in (root, *map(int, children))]
    for i in ids:
        pipe.hgetall(keys.job(i))
        pipe.lrange(keys.job_history(i), 0, -1)
    replies = pipe.execute()
    lines: dict[str, list[str]] = {}
    for record, rows in zip(replies[::2], replies[1::2], strict=True):
        if not record:
            continue  # gone meanwhile (another pruner, or the namespace was purged)
        try:
            shown: dict[str, Any] = Job.from_hash(record).model_dump(mode="json")
        except (KeyError, ValueError):  # a record this vmorch can't read: archived as it is stored
            shown = dict(record)
        events = [event_from_row(json.loads(row)).model_dump(mode="json") for row in rows]
        line = json.dumps({**shown, "events": events, "history_trimmed": int(record.get("history_trimmed") or 0)},
                          separators=(",", ":"))
        lines.setdefault(str(record.get("namespace", "")), []).append(line + "\n")
    folder.mkdir(parents=True, exist_ok=True)
    for ns, text in lines.items():
        _append(folder, ns, "".join(text).encode())
    return sum(len(t) for t in lines.values())


def _append(folder: Path, ns: str, data: bytes) -> None:
    """Append and fsync (and fsync the folder when the file is new, so its name survives a crash too)."""
    if not ns or "/" in ns or ns.startswith("."):
        raise OSError(f"refusing to archive namespace {ns!r} as a file name")
    path = folder / f"{ns}.jsonl"
    created = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


@contextmanager
def _lease(store: StoreBase, ns: str, wait: float) -> Iterator[bool]:
    """Hold the namespace's pruning lease (``keys.prune_lease``), waiting up to ``wait`` seconds for it."""
    key, me = keys.prune_lease(ns), secrets.token_hex(8)
    deadline = time.monotonic() + wait
    while not (held := bool(store.redis.set(key, me, nx=True, ex=LEASE_S))) and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        yield held
    finally:
        if held and store.redis.get(key) == me:
            store.redis.delete(key)


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")

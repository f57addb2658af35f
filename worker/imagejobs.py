"""Image jobs on one host: the task ``vmorch.image`` (``control.images.IMAGE_TASK``) and its steps.

An image job is no VM's operation (see ``orchestrator.control.images``): it takes ``image:<name>``
(level 4) for two short sections only, to start (fenced) and to finish (fenced, with the host's
entry of the image), and fetches, converts and checks in between without any lock, polling for a
cancel request. The work is idempotent: a file with the image's sha256 is the same image.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from collections.abc import Callable
from typing import Any

from celery import Celery, Task
from redis.exceptions import ConnectionError as RedisConnectionError

from orchestrator.control.images import IMAGE_TASK, image_lock
from orchestrator.model.errors import Canceled, ExecError, LockError, NotFound, VmorchError
from orchestrator.model.records import ImageOp, Job, JobState
from orchestrator.store import keys
from orchestrator.store.images import ImageRecords

from .disks import qemu_img
from .images import HostImages
from .runner import Worker

log = logging.getLogger(__name__)
CANCEL_POLL_S = 0.5


def register(app: Celery, worker: Worker) -> Any:
    @app.task(name=IMAGE_TASK, bind=True, max_retries=None, acks_late=True,  # type: ignore[untyped-decorator]
              reject_on_worker_lost=True)
    def image(self: Task[Any, Any], job_id: int) -> dict[str, Any]:
        try:
            run_image_job(worker, job_id)
        except (LockError, RedisConnectionError) as exc:
            log.warning("image job %s: %s; retrying", job_id, exc)
            raise self.retry(exc=exc, countdown=1) from None
        return {"job": job_id}

    return image


def kick(app: Celery, worker: Worker) -> int:
    """Wake this host's unfinished image jobs (a message lost with a submitter that died, say)."""
    records = ImageRecords(worker.store.redis, worker.store.scripts)
    sent = 0
    for image in records.all():
        job = image.jobs.get(worker.host)
        if job and image.hosts.get(worker.host) in ("importing", "removing"):
            app.send_task(IMAGE_TASK, args=[job], queue=keys.queue(worker.host))
            sent += 1
    return sent


def run_image_job(w: Worker, job_id: int) -> None:
    try:
        job = w.store.get_job(job_id)
    except NotFound:
        return
    if not isinstance(job.op, ImageOp) or job.host != w.host:
        log.warning("job %s is not an image job of host %s; ignored", job_id, w.host)
        return
    records = ImageRecords(w.store.redis, w.store.scripts)
    lock = image_lock(job.vm)
    with w.locks.hold(lock, timeout=w.settings.lock_wait_timeout) as holding:
        # LOCK: image:<name> -- starting is fenced
        if w.store.begin(job, holding.fence(lock), w.name) is None:
            return  # final already: a duplicate message, or canceled before it ran
    log.info("job %s %s %s on %s: running", job.id, job.op.value, job.vm, w.host)
    store = HostImages(w.driver.storage_dir)
    check = _cancel_check(w, job)
    record: dict[str, str] = {}
    result: dict[str, Any] = {}
    error: VmorchError | None = None
    try:
        if job.op is ImageOp.IMPORT:
            record, result = _import(w, job, store, check)
    except VmorchError as exc:
        error = exc
    except Exception as exc:  # a bug: the job fails, it does not stay running
        log.error("image job %s crashed:\n%s", job.id, traceback.format_exc())
        error = ExecError(f"internal error: {type(exc).__name__}: {exc}", hint="see the worker's log")
    with w.locks.hold(lock, timeout=w.settings.lock_wait_timeout) as holding:
        # LOCK: image:<name> -- what the catalog says of this host, and the job's end, in one fenced step
        if error is None and job.op is ImageOp.IMPORT:
            error = _agree(records, job, record["sha256"])
            if error is not None:
                _discard(records, store, job, record["sha256"])
        elif error is None:
            image = records.get(job.vm)
            if image is not None and image.sha256:
                removed = _discard(records, store, job, image.sha256)
                result = {"note": "removed from this host's store" if removed else "kept: another image uses it"}
        state = JobState.SUCCEEDED if error is None else (
            JobState.CANCELED if isinstance(error, Canceled) else JobState.FAILED)
        host_state = ("ready" if job.op is ImageOp.IMPORT else "") if error is None else "failed"
        records.done(job, holding.fence(lock), state, host_state=host_state, by=w.name, result=result or None,
                     error=error, record=record if error is None else None)
    log.info("job %s %s %s on %s: %s", job.id, job.op.value, job.vm, w.host,
             state.value if error is None else f"{error.code}: {error.message}")


def _import(w: Worker, job: Job, store: HostImages, check: Callable[[], None]) -> tuple[dict[str, str], dict[str, Any]]:
    source, expected = str(job.params.get("source", "")), str(job.params.get("sha256") or "")
    max_bytes = w.settings.image_max_mib * 1024 * 1024
    started = time.monotonic()
    converted_from = "qcow2"
    with store.scratch() as fetched, store.scratch() as converted:
        digest = store.fetch(source, fetched, max_bytes=max_bytes, check=check)
        if expected and digest != expected:
            raise ExecError(f"the image's sha256 is {digest}, not {expected} as given",
                            hint="check the source and the --sha256 given")
        check()
        if not store.exists(digest):  # else: the same bytes, checked when they came in under another name
            prepared = store.prepare(fetched, digest, converted, max_bytes=max_bytes)
            converted_from = prepared.source_format
            check()
            store.publish(prepared)
    path = store.resolve(digest)
    virtual = int(json.loads(qemu_img("info", "-U", "--output=json", "-f", "qcow2", str(path)))["virtual-size"])
    size = path.stat().st_size
    record = {"sha256": digest, "format": "qcow2", "size_bytes": str(size), "virtual_size_bytes": str(virtual)}
    return record, {"sha256": digest, "source_format": converted_from, "size_bytes": size,
                    "virtual_size_bytes": virtual, "seconds": round(time.monotonic() - started, 3),
                    "note": f"ready on {w.host}"}


def _agree(records: ImageRecords, job: Job, digest: str) -> VmorchError | None:
    """Every host holds the same image: the first sets the sha256 (when none was given), the others match it.

    # LOCK: image:<name>.
    """
    image = records.get(job.vm)
    if image is None:
        return ExecError(f"image {job.vm!r} left the catalog while it was imported")
    if image.sha256 and image.sha256 != digest:
        return ExecError(f"this host fetched other bytes ({digest[:12]}) than the image's ({image.sha256[:12]})",
                         hint="the source changed: remove the image and import it again, with --sha256")
    return None


def _discard(records: ImageRecords, store: HostImages, job: Job, digest: str) -> bool:
    """Remove the file unless another catalog entry of this host needs the same bytes (or may: an import
    whose sha256 is not known yet). # LOCK: image:<name>."""

    def still_needed() -> bool:
        return any(other.name != job.vm and other.hosts.get(job.host) in ("ready", "importing")
                   and other.sha256 in (digest, "") for other in records.all())

    return store.discard(digest, still_needed)


def _cancel_check(w: Worker, job: Job) -> Callable[[], None]:
    last = time.monotonic()

    def check() -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= CANCEL_POLL_S:
            last = now
            by = w.store.cancel_requested_by(job.id)
            if by:
                raise Canceled(f"canceled by {by} while running")

    return check

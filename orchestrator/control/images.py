"""The image catalog's submit side: ``vmorch image import|list|show|remove``.

How image jobs fit the job model: they are jobs of the job store (ids, states, a parent over the
hosts, ``job show|wait|cancel``, history) filed under the namespace ``_images`` (``keys.IMAGES_NS``,
which no user can name) with the image's name as their ``vm``; but they are no VM's operations and
have no mailbox: each is one host's work on its own image store, woken by a message of its own task
(``IMAGE_TASK``) on that host's queue. What a mailbox would order, the catalog refuses instead: under
``image:<name>`` (level 4, a short section) an import is refused on a host where the image is ready,
importing or being removed, and a removal while an import is unfinished or a VM uses the image. So
the operations on one image that could conflict never run at once, and no order is left to keep;
meanwhile a slow download holds up nobody (a VM's mailbox would hold up that VM's every job).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from urllib.parse import unquote, urlsplit

from orchestrator.control import locks
from orchestrator.control.connection import Connection
from orchestrator.control.locks import LockName, other_lock
from orchestrator.model.errors import AlreadyExists, EnqueueFailed, Forbidden, InvalidInput, NoCapacity
from orchestrator.model.guestdata import check_image_name
from orchestrator.model.names import check_host_name, check_text
from orchestrator.model.records import HostState, ImageOp, Job, JobState
from orchestrator.store import keys
from orchestrator.store.images import Image, ImageRecords

#: the Celery task of an image job (its one argument: the job's id)
IMAGE_TASK = "vmorch.image"
SOURCE_MAX = 2048
_SHA256 = re.compile(r"[0-9a-f]{64}")


def image_lock(name: str) -> LockName:
    """The catalog entry of one image (level 4: short sections only)."""
    return other_lock(f"image:{name}")


def check_source(source: str, *, allow_file: bool) -> str:
    """An image's source: an http(s) URL, or ``file:///ABS/PATH`` for an admin (the worker reads it)."""
    check_text(source, "source")
    if len(source) > SOURCE_MAX:
        raise InvalidInput(f"source: longer than {SOURCE_MAX} characters", hint="give a shorter URL")
    try:
        parts = urlsplit(source)
        scheme, _ = parts.scheme.lower(), parts.hostname  # hostname parses the host part: "[x" raises
    except ValueError as exc:
        raise InvalidInput(f"source: not a URL: {exc}", hint="give http://HOST/PATH or https://HOST/PATH") from None
    if scheme in ("http", "https"):
        if not parts.hostname:
            raise InvalidInput(f"source: {source!r} names no host", hint="give http://HOST/PATH or https://HOST/PATH")
        if parts.username or parts.password:
            raise InvalidInput("source: a URL with a user or password is refused (it would be stored and shown)",
                               hint="serve the image without credentials, or import it from a file as an admin")
        return source
    if scheme == "file":
        if not allow_file:
            raise Forbidden("source: file:// sources read the worker's own files; only an admin may import one",
                            hint="give an http:// or https:// URL, or ask an admin")
        path = unquote(parts.path)
        if parts.netloc not in ("", "localhost") or not path.startswith("/") or parts.query or parts.fragment:
            raise InvalidInput(f"source: {source!r} is not file:///ABSOLUTE/PATH", hint="write file:///srv/img.qcow2")
        return source
    raise InvalidInput(f"source: {source[:80]!r} is not an http://, https:// or file:/// URL",
                       hint="give the image's URL; file:///PATH is for admins only")


def check_sha256(value: str | None) -> str:
    if value is None or value == "":
        return ""
    digest = value.strip().lower()
    if not _SHA256.fullmatch(digest):
        raise InvalidInput("sha256: not 64 hexadecimal digits", hint="give the output of 'sha256sum FILE'")
    return digest


class Images(Connection):
    @property
    def image_records(self) -> ImageRecords:
        return ImageRecords(self.redis, self.store.scripts)

    def images(self) -> list[Image]:
        return self.image_records.all()

    def image(self, name: str) -> Image:
        return self.image_records.require(check_image_name(name))

    def import_image(self, name: str, source: str, *, sha256: str | None = None,
                     hosts: Sequence[str] | None = None, allow_file: bool = True) -> list[Job]:
        """One import job per host (one parent over them); ``allow_file``: the asker is an admin."""
        check_image_name(name)
        source = check_source(source, allow_file=allow_file)
        digest = check_sha256(sha256)
        targets = self._targets(hosts)
        lock = image_lock(name)
        records = self.image_records
        with self.locks.hold(lock, timeout=self.settings.submit_lock_timeout):
            locks.require(lock)  # LOCK: image:<name> -- the record and its hosts' entries
            existing = records.get(name)
            record = None
            if existing is None:
                record = {"source": source, "sha256": digest, "format": "qcow2"}
            else:
                digest = _same_image(existing, source, digest)
                targets = _still_to_import(existing, targets)
            _, jobs = records.submit(name, ImageOp.IMPORT, targets, params={"source": source, "sha256": digest},
                                     by=self.actor, record=record)
        self._send_image_jobs(jobs)
        return jobs

    def remove_image(self, name: str) -> list[Job]:
        """Refused while a VM uses the image or an import of it is unfinished; else one removal job per
        host that has it (none: the record goes at once)."""
        check_image_name(name)
        lock = image_lock(name)
        records = self.image_records
        with self.locks.hold(lock, timeout=self.settings.submit_lock_timeout):
            locks.require(lock)  # LOCK: image:<name> -- serialized with launches from it (submit.py)
            image = records.require(name)
            users = records.users(name)
            if users:
                shown = ", ".join(users[:10]) + (f" and {len(users) - 10} more" if len(users) > 10 else "")
                raise InvalidInput(f"image {name!r} is used by {len(users)} VM(s): {shown}",
                                   hint="delete those VMs first ('vmorch vm delete'), then remove the image")
            for host, state in sorted(image.hosts.items()):
                if state in ("importing", "removing"):
                    job = image.jobs.get(host)
                    raise InvalidInput(f"image {name!r} is {state} on host {host} (job {job})",
                                       hint=f"wait for it ('vmorch job wait {job}') or cancel it")
            registered = self.redis.smembers(keys.HOSTS)
            gone = [h for h in image.hosts if h not in registered]
            targets = sorted(h for h in image.hosts if h in registered)
            pipe = self.redis.pipeline(transaction=True)
            if gone:  # hosts that no longer exist keep nothing to remove
                pipe.hdel(keys.image_hosts(name), *gone)
            if not targets:  # the image goes at once, with its history (as image_done.lua does)
                pipe.delete(keys.image(name), keys.image_hosts(name), keys.image_history(name))
                pipe.srem(keys.IMAGES, name)
            pipe.execute()
            if not targets:
                return []
            _, jobs = records.submit(name, ImageOp.REMOVE, targets, params={}, by=self.actor)
        self._send_image_jobs(jobs)
        return jobs

    def _targets(self, hosts: Sequence[str] | None) -> list[str]:
        known = {h.name: h for h in self.store.hosts()}
        if hosts:
            for h in hosts:
                check_host_name(h)
                if h not in known:
                    raise InvalidInput(f"host: unknown host {h!r}",
                                       hint=f"known hosts: {', '.join(sorted(known)) or 'none registered'}")
            return sorted(set(hosts))
        up = sorted(n for n, h in known.items() if h.state is HostState.UP)
        if not up:
            raise NoCapacity("no host is up to import the image to", hint="start a worker, or name hosts with --host")
        return up

    def _send_image_jobs(self, jobs: list[Job]) -> None:
        """Wake each job's host; a job whose message can't be sent fails at once (no worker has it)."""
        app = self.celery
        unsent: list[tuple[Job, Exception]] = []
        try:
            with app.producer_or_acquire() as producer:
                for job in jobs:
                    try:
                        app.send_task(IMAGE_TASK, args=[job.id], queue=keys.queue(job.host), producer=producer)
                    except Exception as exc:  # the job must not stay queued for ever
                        unsent.append((job, exc))
        except Exception as exc:  # no producer at all
            sent = {j.id for j, _ in unsent}
            unsent += [(j, exc) for j in jobs if j.id not in sent]
        for job, why in unsent:
            self.image_records.done(job, None, JobState.FAILED, host_state="failed", by=self.actor,
                                    error=EnqueueFailed(f"could not enqueue: {why}"))


def _same_image(existing: Image, source: str, digest: str) -> str:
    """An import of a name in the catalog adds hosts to it: the same source (and sha256) only."""
    if existing.source != source:
        raise AlreadyExists(f"image {existing.name!r} exists with another source ({existing.source})",
                            hint="import under another name, or remove it first")
    if digest and existing.sha256 and digest != existing.sha256:
        raise AlreadyExists(f"image {existing.name!r} exists with sha256 {existing.sha256}, not {digest}",
                            hint="import under another name, or remove it first")
    return digest or existing.sha256


def _still_to_import(existing: Image, targets: list[str]) -> list[str]:
    removing = sorted(h for h in targets if existing.hosts.get(h) == "removing")
    if removing:
        raise InvalidInput(f"image {existing.name!r} is being removed from {', '.join(removing)}",
                           hint=f"wait for job {existing.jobs[removing[0]]}, then import it again")
    todo = [h for h in targets if existing.hosts.get(h) not in ("ready", "importing")]
    if not todo:
        raise AlreadyExists(f"image {existing.name!r} is already ready or importing on {', '.join(targets)}",
                            hint="see 'vmorch image show " + existing.name + "'")
    return todo

"""The image catalog in Redis: one record per image, and where it is ready.

``P:image:<name>`` holds what the image is (its source, its sha256, its format and sizes);
``P:image:<name>:hosts`` holds, per host, its state in that host's image store (``importing``,
``ready``, ``failed``, ``removing``), the job that last changed it and why it failed. Image jobs are
filed under the namespace ``_images`` (``keys.IMAGES_NS``), with the image's name as their ``vm``:
so ``job show``, ``job wait`` and a parent job over the hosts work as for VMs. Each change is one
Lua script (``lua/image_submit.lua``, ``lua/image_done.lua``); a worker's is fenced by the lock
``image:<name>``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Literal, cast

from pydantic import BaseModel, ConfigDict
from redis import Redis

from orchestrator.model.errors import NotFound, VmorchError
from orchestrator.model.records import ImageOp, Job, JobState, ts
from orchestrator.store import keys
from orchestrator.store.entries import Fence, Released, pairs, released_from
from orchestrator.store.scripts import Keys, Scripts, settle_keys

HostState = Literal["importing", "ready", "failed", "removing"]
#: a host's entry whose job is final but still says importing/removing: that job was canceled (or
#: never sent); the entry counts as failed
_PENDING = ("importing", "removing")


class Image(BaseModel):
    """A catalog image as users see it (``vmorch image show --json``)."""

    model_config = ConfigDict(frozen=True)

    name: str
    #: where it was imported from (an http(s) URL, or file:// for an admin)
    source: str
    #: of the fetched bytes (as given with --sha256, or as the first host measured them); "" until known
    sha256: str
    #: what the stores hold: always qcow2 (a raw source is converted)
    format: str = "qcow2"
    size_bytes: int = 0
    virtual_size_bytes: int = 0
    created_at: datetime | None = None
    #: host -> state (``ready`` where a VM can be launched from it)
    hosts: dict[str, str] = {}
    #: host -> the job that last changed it there
    jobs: dict[str, int] = {}
    #: host -> why it failed there
    errors: dict[str, str] = {}

    def ready_on(self) -> list[str]:
        return sorted(h for h, s in self.hosts.items() if s == "ready")


def image_from(h: Mapping[str, str], hosts: Mapping[str, str], finals: Mapping[int, bool]) -> Image:
    """An image from its two hashes; ``finals`` says which of their jobs are final."""
    states, jobs, errors = {}, {}, {}
    for host, raw in hosts.items():
        entry = json.loads(raw)
        job, state = int(entry.get("job") or 0), str(entry.get("state", ""))
        if state in _PENDING and finals.get(job, False):
            state, entry["error"] = "failed", entry.get("error") or f"its job {job} ended before it ran"
        states[host], jobs[host] = state, job
        if entry.get("error"):
            errors[host] = str(entry["error"])
    return Image(name=h["name"], source=h.get("source", ""), sha256=h.get("sha256", ""),
                 format=h.get("format") or "qcow2", size_bytes=int(h.get("size_bytes") or 0),
                 virtual_size_bytes=int(h.get("virtual_size_bytes") or 0), created_at=ts(h.get("created_at")),
                 hosts=states, jobs=jobs, errors=errors)


class ImageRecords:
    """Reads and changes the catalog. The caller holds ``image:<name>`` for a change (see each)."""

    def __init__(self, redis: Redis, scripts: Scripts) -> None:
        self.redis = redis
        self.scripts = scripts

    def names(self) -> list[str]:
        return sorted(cast(set[str], self.redis.smembers(keys.IMAGES)))

    def get(self, name: str) -> Image | None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(keys.image(name))
        pipe.hgetall(keys.image_hosts(name))
        record, hosts = cast(list[dict[str, str]], pipe.execute())
        if not record:
            return None
        jobs = {int(json.loads(v).get("job") or 0) for v in hosts.values()} - {0}
        return image_from(record, hosts, self._finals(jobs))

    def require(self, name: str) -> Image:
        image = self.get(name)
        if image is None:
            raise NotFound(f"no image {name!r} in the catalog",
                           hint="see 'vmorch image list'; an admin adds one with 'vmorch image import'")
        return image

    def all(self) -> list[Image]:
        return [i for i in (self.get(n) for n in self.names()) if i is not None]

    def _finals(self, ids: set[int]) -> dict[int, bool]:
        ordered = sorted(ids)
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ordered:
            pipe.hget(keys.job(job_id), "state")
        return {i: (s is None or JobState(s).final) for i, s in zip(ordered, pipe.execute(), strict=True)}

    def users(self, name: str) -> list[str]:
        """``ns/vm`` of every VM whose record names this image (any namespace, any state)."""
        found: list[str] = []
        for ns in sorted(cast(set[str], self.redis.smembers(keys.NAMESPACES))):
            vms = sorted(cast(set[str], self.redis.smembers(keys.vms(ns))))
            pipe = self.redis.pipeline(transaction=False)
            for vm in vms:
                pipe.hget(keys.vm(ns, vm), "image")
            found += [f"{ns}/{vm}" for vm, image in zip(vms, pipe.execute(), strict=True) if image == name]
        return found

    def submit(self, name: str, op: ImageOp, hosts: Sequence[str], *, params: Mapping[str, Any], by: str,
               record: Mapping[str, str] | None = None, label: str = "") -> tuple[int | None, list[Job]]:
        """One job per host (under one parent job when there are several), each host's entry marked.

        ``record``: the image's fields, for a new image. # LOCK: the caller holds image:<name>.
        """
        ks = Keys(job_next=keys.JOB_NEXT, updates=keys.UPDATES, image=keys.image(name),
                  image_hosts=keys.image_hosts(name), images=keys.IMAGES, jobs=keys.jobs(keys.IMAGES_NS),
                  events=keys.events(keys.IMAGES_NS))
        res = self.scripts.run("image_submit", ks, {
            "by": by, "name": name, "op": op.value, "params": json.dumps(dict(params)), "hosts": list(hosts),
            "state": "importing" if op is ImageOp.IMPORT else "removing", "record": dict(record or {}),
            "label": label or name})
        parent = int(res[0]) or None
        return parent, [Job.from_hash(pairs(flat)) for flat in res[1:]]

    def done(self, job: Job, fence: Fence | None, state: JobState, *, host_state: str, by: str,
             result: Mapping[str, Any] | None = None, error: VmorchError | None = None,
             record: Mapping[str, str] | None = None) -> list[Released] | None:
        """Make an image job final and set its host's entry (``host_state`` "": the entry goes, and the
        image with the last one, its history included, for a removal). Fenced by ``fence``; None only
        for a job whose wake-up could not be sent (no worker has it). Returns the released jobs, or
        None if it was final already.

        # LOCK: the caller holds image:<name> (``fence``).
        """
        ks = Keys(job=keys.job(job.id), image=keys.image(job.vm), image_hosts=keys.image_hosts(job.vm),
                  image_history=keys.image_history(job.vm), images=keys.IMAGES, events=keys.events(keys.IMAGES_NS),
                  **settle_keys())
        if fence is not None:
            ks.name(fence=fence.key)
        res = self.scripts.run("image_done", ks, {
            "token": fence.token if fence is not None else 0, "id": job.id, "name": job.vm, "host": job.host,
            "state": state.value, "host_state": host_state, "by": by, "record": dict(record or {}),
            "error": json.dumps(error.to_dict()) if error else "", "result": json.dumps(dict(result or {})),
            "detail": f"{error.code}: {error.message}" if error else str((result or {}).get("note", ""))})
        return released_from(res[1:]) if int(res[0]) else None

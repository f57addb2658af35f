"""Carrying a VM's definition and disk from one host to another through Redis (``vm move``).

Hosts share nothing but Redis, so the source streams the disk vmorch created into a list
of chunks and the target reads it back. Fine for the small qcow2 disks of experiments;
the size is capped (``VMORCH_MOVE_MAX_DISK_MIB``) because Redis holds it meanwhile.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

from redis import Redis

from orchestrator.model.errors import InvalidState
from orchestrator.store import keys

CHUNK = 4 * 1024 * 1024
#: an unfinished transfer (a move-in that never ran) frees Redis's memory after a week
TTL_S = 7 * 24 * 3600


def put(redis: Redis, job_id: int, xml: str, disk: Path | None, *, max_mib: int) -> int:
    """Store the definition and disk; returns the disk's size in bytes."""
    size = disk.stat().st_size if disk else 0
    if size > max_mib * 1024 * 1024:
        raise InvalidState(f"the disk is {size // 2**20} MiB, more than 'vm move' carries ({max_mib} MiB)",
                           hint="raise VMORCH_MOVE_MAX_DISK_MIB if Redis has the memory")
    head, body = keys.transfer(job_id), f"{keys.transfer(job_id)}:disk"
    redis.delete(head, body)  # a re-run after a crash starts over
    if disk:
        with disk.open("rb") as f:
            while chunk := f.read(CHUNK):
                redis.rpush(body, chunk)
        redis.expire(body, TTL_S)
    # written last: its presence means the transfer is complete
    redis.hset(head, mapping={"xml": xml, "disk_size": size, "has_disk": "1" if disk else ""})
    redis.expire(head, TTL_S)
    return size


def get(redis: Redis, job_id: int, disk: Path) -> tuple[str, bool]:
    """Write the disk to ``disk``; returns (definition, whether there was a disk)."""
    head = cast(dict[bytes, bytes], redis.hgetall(keys.transfer(job_id)))
    if not head:
        raise InvalidState(f"nothing to import: the transfer of job {job_id} is gone",
                           hint="the move-out job failed or its transfer expired; move the VM again")
    has_disk = bool(head.get(b"has_disk"))
    if has_disk:
        body = f"{keys.transfer(job_id)}:disk"
        tmp = disk.with_suffix(".part")
        with tmp.open("wb") as f:
            for i in range(int(redis.llen(body))):
                f.write(cast(bytes, redis.lindex(body, i)))
        if tmp.stat().st_size != int(head[b"disk_size"]):
            raise InvalidState(f"the transfer of job {job_id} is incomplete", hint="move the VM again")
        tmp.replace(disk)
    return head[b"xml"].decode(), has_disk


def drop(redis: Redis, job_id: int) -> None:
    redis.delete(keys.transfer(job_id), f"{keys.transfer(job_id)}:disk")

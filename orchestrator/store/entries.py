"""What the store's methods take and give besides records: fences, batch entries, accepted and
released jobs. ``orchestrator.store.jobstore`` exports them with ``Store``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from orchestrator.model.errors import NotFound
from orchestrator.model.operation import Operation
from orchestrator.model.records import Job, Vm


@dataclass(frozen=True)
class Fence:
    """Proof of holding a lock: the fencing counter's key and the token this holder got."""

    key: str
    token: int


@dataclass(frozen=True)
class Submitted:
    id: int
    seq: int  # 0: held until its dependencies are met
    host: str
    #: the job as it was accepted
    job: Job


@dataclass(frozen=True)
class Turn:
    """What a worker reads first under a VM's lock, in one round trip."""

    #: (job id, seq) of the VM's unfinished jobs up to the message's, in sequence order
    pending: list[tuple[int, int]]
    #: the message's job, read again under the lock (None if it is gone)
    job: Job | None
    #: the VM record as stored, or a NotFound if there is none
    vm: Vm | NotFound


@dataclass(frozen=True)
class Released:
    """A job whose dependencies were just met: it is in its VM's mailbox and needs a wake-up."""

    id: int
    host: str
    namespace: str
    vm: str


@dataclass(frozen=True)
class Finished:
    """What ``Store.finish`` did: whether the job became final now, and the jobs that released."""

    done: bool
    released: list[Released]

    def __bool__(self) -> bool:
        return self.done


@dataclass(frozen=True)
class BatchEntry:
    """One entry of ``Store.submit_batch``: a job on an existing VM, a launch (with its placement) or a move."""

    op: Operation
    host: str = ""  # launch: the chosen host; move: the target
    source: str = ""  # move: the VM's current host
    retry_of: int | None = None


def pairs(flat: list[str]) -> dict[str, str]:
    """A hash as a Lua script returns it: its fields and values, flat."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


def released_from(flat: list[Any]) -> list[Released]:
    """The released jobs as ``settle.lua`` returns them: id, host, namespace, vm, flat."""
    return [Released(int(flat[i]), str(flat[i + 1]), str(flat[i + 2]), str(flat[i + 3]))
            for i in range(0, len(flat), 4)]


def as_hash(value: object) -> dict[str, str]:
    return cast(dict[str, str], value)  # every client vmorch makes decodes responses to str


def no_vm(namespace: str, name: str) -> NotFound:
    return NotFound(f"no VM {name!r} in namespace {namespace!r}",
                    hint="list VMs with 'vmorch vm list' (and check --namespace)")


class AlreadyAccepted(Exception):
    """A submission whose idempotency key was used before: these are the jobs it made then.

    Raised by ``Store.submit_batch`` and caught by the submit path; never reaches a user."""

    def __init__(self, job_ids: list[int]) -> None:
        super().__init__(job_ids)
        self.job_ids = job_ids

"""The one error tree of vmorch.

Split by who must act (after Ganeti's OpPrereqError / OpExecError):

* ``RequestError`` -- refused before anything changed; the user must fix the request.
* ``ExecError``    -- failed midway; someone must look at the VM or the cluster.
* ``LockError``    -- the lock machinery refused or lost a lock.

Every error has a stable ``code`` and can cross Redis as ``{"code", "message"}``
(``to_dict`` / ``from_dict``), so a worker's failure is raised again, with its class,
on the client side.
"""

from __future__ import annotations

from typing import Any, ClassVar


class VmorchError(Exception):
    """Root of every error vmorch raises on purpose."""

    code: ClassVar[str] = "error"
    #: the CLI's exit code for this error (0 ok, 1 a job failed, 2 bad input, 3 not found)
    exit_code: ClassVar[int] = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.hint:
            data["hint"] = self.hint
        return data

    @staticmethod
    def from_dict(data: dict[str, Any]) -> VmorchError:
        cls = _BY_CODE.get(str(data.get("code")), VmorchError)
        return cls(str(data.get("message", "")), hint=data.get("hint"))


# -- refused before acting ------------------------------------------------------------


class RequestError(VmorchError):
    """The request was refused before anything changed."""

    code = "bad_request"
    exit_code = 2


class InvalidInput(RequestError):
    code = "invalid_input"


class NotFound(RequestError):
    code = "not_found"
    exit_code = 3


class AlreadyExists(RequestError):
    code = "already_exists"


class NoCapacity(RequestError):
    code = "no_capacity"


class Unauthorized(RequestError):
    """No API token, or one that is unknown or revoked."""

    code = "unauthorized"


class Forbidden(RequestError):
    """The API token is valid but its role or namespaces don't cover the request."""

    code = "forbidden"


class ClusterUnavailable(RequestError):
    """No cluster to talk to (Redis unreachable, no host up)."""

    code = "cluster_unavailable"
    exit_code = 1


class LayoutMismatch(ClusterUnavailable):
    """The Redis holds vmorch's keys in another layout than this vmorch's (``orchestrator.store.layout``)."""

    code = "layout_mismatch"
    exit_code = 2


# -- failed midway --------------------------------------------------------------------


class ExecError(VmorchError):
    """An operation started and failed; the VM may need a look."""

    code = "exec_failed"


class InvalidState(ExecError):
    """The VM is in a state the operation can't start from (e.g. pause a shut-off VM)."""

    code = "invalid_state"


class HypervisorError(ExecError):
    """libvirt refused or failed the call."""

    code = "libvirt_error"


class OperationTimeout(ExecError):
    code = "timeout"


class Canceled(ExecError):
    code = "canceled"


class HostDown(ExecError):
    """The VM's host stopped heartbeating and didn't come back before the deadline."""

    code = "host_down"


class VmGone(ExecError):
    """The VM was deleted before this job's turn came."""

    code = "vm_gone"


class DependencyFailed(ExecError):
    """A job this one waited for (``--after``) did not succeed: this one never ran."""

    code = "dependency_failed"


class ChildrenFailed(ExecError):
    """A parent job (a bulk command): some of its children failed."""

    code = "children_failed"


class EnqueueFailed(ExecError):
    """The job was accepted but its message could not be sent to its host: it never ran."""

    code = "enqueue_failed"


# -- locks ----------------------------------------------------------------------------


class LockError(VmorchError):
    code = "lock_error"


class LockOrderError(LockError):
    """A lock was requested out of hierarchy order. A programming error: never caught."""

    code = "lock_order"


class LockTimeout(LockError):
    code = "lock_timeout"


class LockLost(LockError):
    """A held lock expired or was taken over; the holder must stop before its next side effect."""

    code = "lock_lost"


class FencedOut(LockLost):
    """A write under a lock was refused because a newer fencing token was issued (in Redis, or in the
    domain's own metadata: another holder acted on it)."""

    code = "fenced_out"


class LeaseExpired(LockLost):
    """The holder can no longer *know* that its lock is its own: its lease (counted locally from its last
    successful renewal, with a margin) ran out, or a Redis call under the lock could not end within it.
    It stops before touching libvirt or Redis again; the lock may still exist, or be someone else's."""

    code = "lease_expired"


def _all_subclasses(cls: type[VmorchError]) -> list[type[VmorchError]]:
    out = [cls]
    for sub in cls.__subclasses__():
        out.extend(_all_subclasses(sub))
    return out


_BY_CODE: dict[str, type[VmorchError]] = {c.code: c for c in _all_subclasses(VmorchError)}

"""What the driver reads of a domain (``DomainStatus``, ``state_of``), and libvirt's errors as vmorch
errors (``vmorch_error``, ``translate``). Re-exported by ``worker.libvirtconn``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import libvirt

from orchestrator.model.errors import (
    AlreadyExists,
    HypervisorError,
    InvalidState,
    NotFound,
    OperationTimeout,
    VmGone,
    VmorchError,
)
from orchestrator.model.records import VmState

_STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: VmState.UNKNOWN,
    libvirt.VIR_DOMAIN_RUNNING: VmState.RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: VmState.RUNNING,
    libvirt.VIR_DOMAIN_PAUSED: VmState.PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN: VmState.RUNNING,  # "being shut down": still running
    libvirt.VIR_DOMAIN_SHUTOFF: VmState.SHUTOFF,
    libvirt.VIR_DOMAIN_CRASHED: VmState.CRASHED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: VmState.PAUSED,
}
INSTALL_HINT = "run scripts/install.sh as root on this host (it creates the libvirt-qemu user)"


@dataclass(frozen=True)
class DomainStatus:
    domain: str
    state: VmState
    memory_mib: int  # current memory of the persistent definition
    vcpus: int
    snapshots: list[str]
    metadata: dict[str, Any]


def vmorch_error(exc: libvirt.libvirtError, domain: str, action: str) -> VmorchError:
    code = exc.get_error_code()
    message = f"cannot {action} {domain}: {exc.get_error_message() or exc}"
    if code == libvirt.VIR_ERR_NO_DOMAIN:
        return VmGone(f"{domain} does not exist on this host", hint="it was deleted, or never launched here")
    if code == libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT:
        return NotFound(message)
    if code == libvirt.VIR_ERR_OPERATION_INVALID:
        return InvalidState(message)
    if code == libvirt.VIR_ERR_DOM_EXIST:
        return AlreadyExists(message)
    if code in (libvirt.VIR_ERR_OPERATION_TIMEOUT, libvirt.VIR_ERR_AGENT_UNRESPONSIVE):
        return OperationTimeout(message)
    return HypervisorError(message)


@contextlib.contextmanager
def translate(domain: str, action: str) -> Iterator[None]:
    """Translate libvirt errors raised inside into vmorch errors."""
    try:
        yield
    except libvirt.libvirtError as exc:
        raise vmorch_error(exc, domain, action) from exc


def state_of(dom: libvirt.virDomain) -> VmState:
    state, reason = dom.state()
    if state == libvirt.VIR_DOMAIN_SHUTOFF and reason == libvirt.VIR_DOMAIN_SHUTOFF_CRASHED:
        return VmState.CRASHED
    return _STATES.get(state, VmState.UNKNOWN)

"""The network side of the VM handlers (``worker.handlers``): NICs up around a QEMU start, idle
bridges let go after a stop, and ``vm set --nic``'s link emulation."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

from orchestrator.model.errors import VmorchError
from orchestrator.model.network import Shaping
from orchestrator.model.operation import SetParams
from orchestrator.model.records import Vm, VmState
from orchestrator.store.networks import NetworkRecords

from . import vmnet
from .domxml import NicDevice
from .driver import Driver
from .results import Shaped


@contextlib.contextmanager
def nics_up(vm: Vm) -> Iterator[None]:
    """Around a call that starts the VM's QEMU process (launch, start, revert)."""
    host_net = vmnet.current()
    if host_net is None or not vm.nics:
        yield
        return
    with host_net.attached(vm):
        yield


def released(vm: Vm) -> None:
    """After the VM's QEMU process stopped here, or its domain left this host."""
    host_net = vmnet.current()
    if host_net is not None and vm.nics:
        try:
            host_net.release(vm)
        except (VmorchError, OSError) as exc:  # the periodic sweep tries again; the job did its part
            vmnet.log.warning("releasing the bridges of %s: %s", vm.domain, exc)


def devices(records: NetworkRecords, vm: Vm) -> tuple[NicDevice, ...]:
    return vmnet.devices(records, vm) if vm.nics else ()


def set_nic(driver: Driver, vm: Vm, p: SetParams) -> tuple[Shaped, dict[str, Any]]:
    """A NIC's link emulation: recorded (its next start applies it) and, if the VM runs, applied now."""
    assert p.nic is not None and p.shaping is not None
    nic = vmnet.check_nic(vm, p.nic)
    shaping: Shaping = nic.shaping.merged(p.shaping)
    state = driver.status(vm.domain).state
    host_net = vmnet.current()
    live = state in (VmState.RUNNING, VmState.PAUSED) and host_net is not None
    if live:
        assert host_net is not None
        host_net.shape(vm, p.nic, shaping)
    nics = [n.model_dump(exclude={"ip"}) for n in vm.nics]
    nics[p.nic] = nic.model_copy(update={"shaping": shaping}).model_dump(exclude={"ip"})
    result = Shaped(state, shaping != nic.shaping, "" if live else "applies at next start", nic=p.nic,
                    shaping=shaping.model_dump(), live=live)
    return result, {"nics": json.dumps(nics)}

"""Which hosts a local cluster runs, and on which hypervisor each."""

from __future__ import annotations

import pwd
import shutil
from pathlib import Path

from orchestrator.localcluster.environment import OnEvent
from orchestrator.model.errors import InvalidInput

TEST_URI = "test:///default"
MAX_EMBED_ROOT = 50  # characters; see default_libvirt_uri


def default_libvirt_uri(home: Path, host: str) -> tuple[str, str | None]:
    """The hypervisor of a local host: embedded QEMU when it can run here, else libvirt's test driver."""
    fallback = "using libvirt's test driver (no real VMs)"
    root = Path(home).expanduser().resolve() / "hosts" / host / "libvirt"
    if shutil.which("qemu-system-x86_64") is None:
        return TEST_URI, f"qemu-system-x86_64 not found: {fallback}; install qemu-system-x86 for real VMs"
    if not _user_exists("libvirt-qemu"):
        # libvirt's embedded QEMU driver resolves its compiled-in default user before it
        # reads qemu.conf, so it refuses to open without this account even as root.
        return TEST_URI, (f"system user libvirt-qemu not found (embedded QEMU needs it): {fallback}; "
                          "run scripts/install.sh as root to create it")
    if len(str(root)) > MAX_EMBED_ROOT:
        # QEMU's monitor socket lives at <root>/lib/qemu/domain-<id>-<name, 20 chars>/monitor.sock
        # and a UNIX socket path has at most 107 bytes: every VM would fail to start.
        return TEST_URI, (f"{root} is too long for QEMU's UNIX sockets ({len(str(root))} > {MAX_EMBED_ROOT} "
                          f"characters): {fallback}; set VMORCH_HOME to a shorter path for real VMs")
    return f"qemu:///embed?root={root}", None


def plan_hosts(home: Path, count: int, libvirt_uri: str | None, on_event: OnEvent) -> list[tuple[str, str]]:
    """(name, libvirt URI) of each host. A given URI serves every host: test:///default keeps
    its state per process, so each worker is still its own hypervisor."""
    if libvirt_uri and is_embedded(libvirt_uri) and count > 1:
        # libvirt locks an embedded root to the one process that opened it.
        raise InvalidInput(f"{count} hosts cannot share one embedded QEMU root ({libvirt_uri})",
                           hint="omit --libvirt-uri: each host then gets an embedded root of its own")
    plan = []
    warned: set[str] = set()
    for k in range(1, count + 1):
        name = f"host{k}"
        if libvirt_uri:
            plan.append((name, libvirt_uri))
            continue
        uri, warning = default_libvirt_uri(home, name)
        if warning and warning not in warned:
            on_event(f"warning: {warning}")
            warned.add(warning)
        plan.append((name, uri))
    return plan


def is_embedded(uri: str) -> bool:
    return uri.startswith("qemu:///embed")


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True

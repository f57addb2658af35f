"""The QEMU guest agent of a domain, through libvirt (``libvirt_qemu.qemuAgentCommand``).

Every domain has the agent's virtio-serial channel (``domxml.AGENT_CHANNEL``); libvirt connects
to its host end and relays one command at a time (it serializes the agent commands of a domain).
Until ``qemu-ga`` runs in the guest, libvirt answers "agent is not connected" at once:
:func:`wait_ready` retries ``guest-ping`` until a deadline. An agent that stopped answering
costs each command its timeout, so every call here has a short one.

The commands vmorch uses: ``guest-ping``, ``guest-exec`` and ``guest-exec-status``
(``worker.execs``), ``guest-file-open``/``-read``/``-write``/``-close`` (``vm cp``) and
``guest-network-get-interfaces`` (``worker.guestwatch``).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import libvirt
import libvirt_qemu  # type: ignore[import-untyped]

from orchestrator.model.errors import ExecError, HypervisorError, OperationTimeout
from orchestrator.model.records import Address

#: libvirt's answers that mean "no agent to talk to (yet)": worth waiting for
_ABSENT = (libvirt.VIR_ERR_AGENT_UNRESPONSIVE, libvirt.VIR_ERR_AGENT_UNSYNCED,
           libvirt.VIR_ERR_OPERATION_TIMEOUT, libvirt.VIR_ERR_NO_SUPPORT, libvirt.VIR_ERR_OPERATION_INVALID)
#: seconds one agent command may take (an answer is immediate; a dead agent costs this much)
COMMAND_TIMEOUT = 5
_POLL_S = 0.25
#: the longest embedded root whose default agent socket paths fit (see ``socket_dir``)
_ROOT_MAX = 25


class AgentAbsent(OperationTimeout):
    """The guest agent does not answer (not running yet, or not installed in the guest)."""


class AgentCommandFailed(ExecError):
    """The agent answered with an error (a file that does not exist, a program not found, ...)."""


def socket_dir(libvirt_uri: str) -> Path | None:
    """Where this worker's domains get their agent sockets (``domxml.use_agent_socket_dir``).

    libvirt's default, ``<root>/lib/qemu/channel/target/domain-<id>-<name>/org.qemu.guest_agent.0``,
    fits a socket's 107 bytes only for a root of at most ``_ROOT_MAX`` characters (``qemu:///system``:
    ``/var/lib/libvirt``). An embedded root deeper than that gets a short directory of its own, made
    mode 0700 for this user: ``/run/vmorch/qga-<hash of the root>``, or the same under the temp dir.
    """
    parsed = urlparse(libvirt_uri)
    root = parse_qs(parsed.query).get("root", [""])[0]
    if parsed.scheme != "qemu" or parsed.path != "/embed" or len(root) <= _ROOT_MAX:
        return None
    name = f"qga-{hashlib.sha256(root.encode()).hexdigest()[:12]}"
    for base in (Path("/run/vmorch"), Path(tempfile.gettempdir()) / f"vmorch-{os.getuid()}"):
        path = base / name
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = path.stat()
        except OSError:
            continue
        if st.st_uid == os.getuid() and not st.st_mode & 0o077:
            return path
    raise HypervisorError(f"no short directory for the guest agents' sockets of {libvirt_uri}",
                          hint="use an embedded root of at most 25 characters, or make /run/vmorch writable")


def command(dom: libvirt.virDomain, execute: str, arguments: dict[str, Any] | None = None, *,
            timeout: int = COMMAND_TIMEOUT) -> Any:
    """Run one agent command and return its ``return`` value."""
    message: dict[str, Any] = {"execute": execute}
    if arguments:
        message["arguments"] = arguments
    try:
        reply = libvirt_qemu.qemuAgentCommand(dom, json.dumps(message), max(1, int(timeout)), 0)
    except libvirt.libvirtError as exc:
        text = exc.get_error_message() or str(exc)
        if exc.get_error_code() in _ABSENT:
            raise AgentAbsent(f"the guest agent of {dom.name()} does not answer: {text}",
                              hint="the guest may still be booting, or have no qemu-guest-agent") from None
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            raise HypervisorError(f"{dom.name()} is gone: {text}") from None
        # libvirt words the agent's own error "unable to execute QEMU agent command 'x': why"
        raise AgentCommandFailed(text.split(": ", 1)[-1] if "agent command" in text else text) from None
    if reply is None:
        raise AgentAbsent(f"the guest agent of {dom.name()} gave no answer to {execute}")
    return json.loads(reply).get("return")


def wait_ready(dom: libvirt.virDomain, deadline: float, check: Callable[[], None]) -> float:
    """Wait until the agent answers ``guest-ping`` (``deadline``: a ``time.monotonic()``); the seconds waited."""
    start = time.monotonic()
    while True:
        check()
        if not dom.isActive():
            raise ExecError(f"{dom.name()} is not running", hint="start it first")
        left = deadline - time.monotonic()
        try:
            command(dom, "guest-ping", timeout=max(1, min(COMMAND_TIMEOUT, int(left))))
            return time.monotonic() - start
        except AgentAbsent as exc:
            if time.monotonic() + _POLL_S >= deadline:
                raise AgentAbsent(f"the guest agent of {dom.name()} did not answer within "
                                  f"{deadline - start:.0f}s ({exc.message})", hint=exc.hint) from None
        time.sleep(_POLL_S)


def addresses(dom: libvirt.virDomain, *, timeout: int = 2) -> list[Address]:
    """The guest's addresses, loopback and IPv6 link-local left out (``AgentAbsent`` if it has no agent)."""
    found: list[Address] = []
    for iface in command(dom, "guest-network-get-interfaces", timeout=timeout) or []:
        mac = str(iface.get("hardware-address", ""))
        for entry in iface.get("ip-addresses", []) or []:
            ip = str(entry.get("ip-address", ""))
            if not ip or ip.startswith(("127.", "fe80:")) or ip == "::1":
                continue
            found.append(Address(ip=ip, mac=mac))
    return found

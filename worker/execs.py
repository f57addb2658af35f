"""``exec`` and ``cp``: a command run in the guest, a file copied in or out, through its agent.

Both are ordered jobs like every other operation (a ``set --memory`` before an ``exec free`` has
run when the command starts). Each waits for the agent (``guest-ping``) within its timeout.

``exec`` starts the command with ``guest-exec`` (``capture-output``) and polls
``guest-exec-status`` until it exits. Its result has ``exit_code``, ``stdout`` and ``stderr``
(UTF-8, undecodable bytes replaced), each cut to ``EXEC_OUTPUT_MAX`` bytes with
``stdout_truncated``/``stderr_truncated`` saying so. A command still running at the timeout fails
the job, and keeps running in the guest: the agent has no way to stop what it started. An exec
is never run twice: a job found running after its worker died fails instead (the command may
or may not have run).

``cp`` writes ``content`` (base64) to a guest path, or reads a guest file into its result, in
chunks of ``_CHUNK`` bytes; either way at most ``CP_MAX_BYTES``.
"""

from __future__ import annotations

import base64
import contextlib
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import libvirt

from orchestrator.model.errors import ExecError, InvalidInput, InvalidState, OperationTimeout
from orchestrator.model.operation import CP_MAX_BYTES, EXEC_OUTPUT_MAX, CpParams, ExecParams
from orchestrator.model.records import VmState

from . import agent
from .libvirtconn import LibvirtConnection, state_of, translate
from .results import DriverResult

_CHUNK = 48 * 1024
# A short command has often exited by the first re-poll: at 50 ms that wait was most of an exec's
# round trip (bench B8); from 10 ms, growing by half each time, a long one costs few polls more.
POLL_MIN_S, POLL_MAX_S = 0.01, 0.5


@dataclass(frozen=True, kw_only=True)
class Executed(DriverResult):
    exit_code: int
    stdout: str
    stderr: str
    stdout_truncated: bool
    stderr_truncated: bool
    #: the command's process id in the guest
    pid: int
    #: the signal that ended it, if one did (``exit_code`` is then 128 + it, as a shell says)
    signal: int | None = None


@dataclass(frozen=True, kw_only=True)
class Copied(DriverResult):
    path: str
    bytes: int
    #: "in" (into the guest) or "out"
    direction: str
    #: base64 of what was read (``out`` only)
    content: str | None = None


def _running_domain(driver: LibvirtConnection, domain: str, verb: str) -> libvirt.virDomain:
    with translate(domain, "look up"):
        dom = driver.conn.lookupByName(domain)
        state = state_of(dom)
    if state is not VmState.RUNNING:
        raise InvalidState(f"cannot {verb} in {domain}: it is {state.value}", hint="start (or resume) it first")
    return dom


def _output(status: dict[str, Any], stream: str) -> tuple[str, bool]:
    data = base64.b64decode(status.get(f"{stream}-data", "") or "")
    cut = bool(status.get(f"{stream}-truncated")) or len(data) > EXEC_OUTPUT_MAX
    return data[:EXEC_OUTPUT_MAX].decode("utf-8", errors="replace"), cut


def run_exec(driver: LibvirtConnection, domain: str, vm: str, p: ExecParams, *, attempts: int,
             check: Callable[[], None]) -> Executed:
    """Run ``p.command`` in the guest of ``domain`` (the VM ``vm``); ``attempts``: the job's earlier runs."""
    shown = shlex.join(p.command)
    if attempts > 0:
        raise ExecError(f"not run again: the worker running {shown!r} stopped (attempt {attempts + 1})",
                        hint="it may or may not have run; submit the exec again if it should")
    deadline = time.monotonic() + p.timeout_s
    dom = _running_domain(driver, domain, "exec")
    agent.wait_ready(dom, deadline, check)
    args: dict[str, Any] = {"path": p.command[0], "arg": p.command[1:], "capture-output": True}
    if p.input is not None:
        args["input-data"] = base64.b64encode(p.input.encode()).decode()
    check()
    try:
        pid = int(agent.command(dom, "guest-exec", args)["pid"])
    except agent.AgentCommandFailed as exc:
        raise ExecError(f"cannot run {shown!r} in the guest: {exc.message}") from None
    poll = POLL_MIN_S
    while True:
        check()
        status = agent.command(dom, "guest-exec-status", {"pid": pid})
        if status.get("exited"):
            break
        if time.monotonic() + poll > deadline:
            raise OperationTimeout(f"{shown!r} did not finish within {p.timeout_s:g}s; it still runs in the guest "
                                   f"(pid {pid}): the agent cannot stop it",
                                   hint=f"give more --timeout, or end it: vmorch vm exec {vm} -- kill {pid}")
        time.sleep(poll)
        poll = min(poll * 1.5, POLL_MAX_S)
    stdout, stdout_cut = _output(status, "out")
    stderr, stderr_cut = _output(status, "err")
    signal = int(status["signal"]) if status.get("signal") is not None else None
    exit_code = 128 + signal if signal is not None else int(status.get("exitcode", -1))
    if p.check and exit_code != 0:
        said = (stderr or stdout).strip().splitlines()
        raise ExecError(f"{shown!r} exited with {exit_code}" + (f": {said[-1][:200]}" if said else ""),
                        hint="the step checks its command's exit code ('check: true')")
    return Executed(VmState.RUNNING, True, exit_code=exit_code, stdout=stdout, stderr=stderr,
                    stdout_truncated=stdout_cut, stderr_truncated=stderr_cut, pid=pid, signal=signal)


def run_cp(driver: LibvirtConnection, domain: str, p: CpParams, *, check: Callable[[], None]) -> Copied:
    """Write ``p.content`` to ``p.path`` in the guest of ``domain``, or read that file (no content)."""
    dom = _running_domain(driver, domain, "copy files")
    agent.wait_ready(dom, time.monotonic() + p.timeout_s, check)
    check()
    mode = "r" if p.content is None else "w"
    try:
        handle = int(agent.command(dom, "guest-file-open", {"path": p.path, "mode": mode}))
    except agent.AgentCommandFailed as exc:
        raise ExecError(f"cannot open {p.path} in the guest: {exc.message}") from None
    try:
        if p.content is None:
            data = _read(check, dom, handle, p.path)
            result = Copied(VmState.RUNNING, False, path=p.path, bytes=len(data), direction="out",
                            content=base64.b64encode(data).decode())
        else:
            data = base64.b64decode(p.content)
            _write(check, dom, handle, data)
            result = Copied(VmState.RUNNING, True, path=p.path, bytes=len(data), direction="in")
    finally:
        with contextlib.suppress(agent.AgentAbsent, agent.AgentCommandFailed):  # it forgets them when restarted
            agent.command(dom, "guest-file-close", {"handle": handle})
    return result


def _read(check: Callable[[], None], dom: libvirt.virDomain, handle: int, path: str) -> bytes:
    data = bytearray()
    while True:
        check()
        chunk = agent.command(dom, "guest-file-read", {"handle": handle, "count": _CHUNK})
        data += base64.b64decode(chunk.get("buf-b64", "") or "")
        if len(data) > CP_MAX_BYTES:
            raise InvalidInput(f"{path} in the guest is larger than {CP_MAX_BYTES // 1024} KiB, the most vm cp copies",
                               hint="compress or split it in the guest (vmorch vm exec)")
        if chunk.get("eof") or not chunk.get("count"):
            return bytes(data)


def _write(check: Callable[[], None], dom: libvirt.virDomain, handle: int, data: bytes) -> None:
    for start in range(0, len(data), _CHUNK):
        check()
        piece = data[start:start + _CHUNK]
        written = agent.command(dom, "guest-file-write",
                                {"handle": handle, "buf-b64": base64.b64encode(piece).decode()})
        if int(written.get("count", -1)) != len(piece):
            raise ExecError(f"the guest agent wrote {written.get('count')} of {len(piece)} bytes",
                            hint="is the guest's disk full?")

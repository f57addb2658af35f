"""``vmorch vm log|console|exec|cp``: into the guest, through its serial console and its agent.

``log`` and ``console`` read the VM's console stream (over Redis, or the API with an API URL);
``console`` types through the one writer lease. ``exec`` and ``cp`` are ordered jobs.
"""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import select
import sys
import termios
import threading
import time
import tty
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from orchestrator.model.errors import InvalidInput, VmorchError
from orchestrator.model.names import check_name
from orchestrator.model.operation import CP_MAX_BYTES, Op, Operation, SubmitOptions
from orchestrator.model.records import Job, JobState, VmState

from . import render
from .context import State, state
from .vms import After, Select, Target, VmName, _dash, parse_tags
from .waiting import wait as wait_for

if TYPE_CHECKING:
    from orchestrator.services.console import ConsoleClient

#: Ctrl-] leaves ``vm console``, as in telnet and virsh
ESCAPE = b"\x1d"
#: a terminal answers "where is the cursor?" (ESC [ 6 n) by typing into the shell: never pass it on
_CURSOR_QUERY = "\x1b[6n"
RENEW_S = 3.0


def register(app: typer.Typer) -> None:
    for name, command in (("log", log), ("console", console), ("exec", exec_), ("cp", cp)):
        app.command(name=name)(command)


def console_client(st: State) -> ConsoleClient:
    if st.settings.api_url:
        from orchestrator.edge.guestclient import HttpConsole
        from orchestrator.edge.httpclient import HttpClient

        assert isinstance(st.client, HttpClient)
        return HttpConsole(st.client)
    from orchestrator.services.client import RedisClient
    from orchestrator.services.console import RedisConsole

    assert isinstance(st.client, RedisClient)
    return RedisConsole(st.client.store)


def _write(text: str) -> None:
    sys.stdout.buffer.write(text.replace(_CURSOR_QUERY, "").encode())
    sys.stdout.buffer.flush()


def log(ctx: typer.Context, name: VmName,
        follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing what comes, until Ctrl-C")] = False,
        tail: Annotated[int | None, typer.Option("--tail", "-n", min=0, help="only the last N lines")] = None) -> None:
    """Print a VM's serial console output (the newest ~4 MiB of it), from any machine."""
    st = state(ctx)
    con = console_client(st)
    name = check_name(name)
    if tail is not None:
        chunk = con.tail(st.namespace, name, lines=tail)
        text = "".join(chunk.text.splitlines(keepends=True)[-tail:]) if tail else ""
        last = chunk.last
    else:
        text, last = "", "0"
        while True:
            chunk = con.read(st.namespace, name, after=last)
            text += chunk.text
            if not chunk.entries:
                break
            last = chunk.last
    if st.json and not follow:
        render.dump_json({"vm": name, "text": text, "last": last})
        return
    _write(text)
    try:
        while follow:
            chunk = con.read(st.namespace, name, after=last, block_ms=5_000)
            _write(chunk.text)
            last = chunk.last
    except KeyboardInterrupt:
        return


def console(ctx: typer.Context, name: VmName,
            read_only: Annotated[bool, typer.Option("--read-only", help="watch only; never type")] = False) -> None:
    """Attach to a VM's serial console: type into it (one writer at a time; others watch). Ctrl-] leaves."""
    st = state(ctx)
    con = console_client(st)
    name = check_name(name)
    last = con.read(st.namespace, name, after="$").last
    vm = st.client.vm(st.namespace, name)
    if vm.state is not VmState.RUNNING:
        render.err.print(f"note: {name} is {vm.state.value}: nothing shows until it runs")
    session = secrets.token_hex(8)
    writer = not read_only and con.claim(st.namespace, name, session)
    if not writer and not read_only:
        render.err.print(f"read-only: someone else is typing on {name}'s console (session "
                         f"{con.writer(st.namespace, name) or '?'})")
    render.err.print(f"attached to {name}'s serial console{'' if writer else ' (read-only)'}; Ctrl-] leaves")
    stop = threading.Event()
    failed: list[BaseException] = []

    def show() -> None:
        nonlocal last
        try:
            while not stop.is_set():
                chunk = con.read(st.namespace, name, after=last, block_ms=500)
                _write(chunk.text)
                last = chunk.last
        except (VmorchError, OSError) as exc:
            failed.append(exc)
            stop.set()

    shower = threading.Thread(target=show, name="console-output", daemon=True)
    shower.start()
    try:
        with _raw(sys.stdin.fileno()):
            writer = _type(con, st.namespace, name, session, writer, stop)
    finally:
        stop.set()
        shower.join(timeout=5)
        if writer:
            with contextlib.suppress(VmorchError):
                con.release(st.namespace, name, session)
    render.err.print(f"\r\nleft {name}'s console")
    if failed:
        raise failed[0]


def _type(con: ConsoleClient, namespace: str, name: str, session: str, writer: bool, stop: threading.Event) -> bool:
    """Send what is typed until Ctrl-] (or the end of input); whether the lease is still ours at the end."""
    fd = sys.stdin.fileno()
    renewed = time.monotonic()
    while not stop.is_set():
        if writer and time.monotonic() - renewed >= RENEW_S:
            writer, renewed = con.claim(namespace, name, session), time.monotonic()
            if not writer:
                render.err.print("\r\nthe writer lease was lost: read-only now\r")
        ready, _, _ = select.select([fd], [], [], 0.5)
        if not ready:
            continue
        data = os.read(fd, 1024)
        if not data:
            return writer
        typed, escaped, _ = data.partition(ESCAPE)
        if typed and writer and not con.send(namespace, name, session, typed.decode(errors="replace")):
            writer = False
            render.err.print("\r\nthe writer lease was lost: read-only now\r")
        if escaped:
            return writer
    return writer


@contextlib.contextmanager
def _raw(fd: int) -> Iterator[None]:
    """The terminal in raw mode (every key goes to the guest, Ctrl-C included), restored after."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def exec_(
    ctx: typer.Context, target: Target,
    command: Annotated[list[str], typer.Argument(help="the command and its arguments, after --")],
    timeout: Annotated[float, typer.Option("--timeout", help="seconds the command may take, agent wait included")
                       ] = 60.0,
    stdin: Annotated[str | None, typer.Option("--input", help="text given to the command on its stdin")] = None,
    select_: Select = None, after: After = None,
) -> None:
    """Run a command in VMs through their guest agents: an ordered job. One VM: its output, and its exit code."""
    st = state(ctx)
    jobs = _run(st, Op.EXEC, _dash(target), select_, after, command=command, timeout_s=timeout, input=stdin)
    if st.json:
        render.dump_json(jobs[0] if len(jobs) == 1 else jobs)
        raise typer.Exit(_exit_code(jobs))
    if len(jobs) == 1:
        job = jobs[0]
        if job.state is not JobState.SUCCEEDED or job.result is None:
            render.err.print(render.job_line(job))
            raise typer.Exit(1)
        sys.stdout.write(job.result["stdout"])
        sys.stdout.flush()
        sys.stderr.write(job.result["stderr"])
        for stream in ("stdout", "stderr"):
            if job.result.get(f"{stream}_truncated"):
                render.err.print(f"[yellow]warning:[/yellow] {stream} was cut to its first 64 KiB")
        raise typer.Exit(int(job.result["exit_code"]))
    table = render.new_table()
    for col in ("VM", "JOB", "EXIT", "OUTPUT"):
        table.add_column(col, no_wrap=col != "OUTPUT")
    for job in jobs:
        if job.state is JobState.SUCCEEDED and job.result is not None:
            lines = (job.result["stdout"] or job.result["stderr"]).splitlines()
            table.add_row(job.vm, str(job.id), str(job.result["exit_code"]), render.escape(lines[0] if lines else ""))
        else:
            table.add_row(job.vm, str(job.id), render.styled(job.state.value),
                          render.escape(job.error.message if job.error else ""))
    render.out.print(table)
    raise typer.Exit(_exit_code(jobs))


def _exit_code(jobs: list[Job]) -> int:
    if len(jobs) == 1 and jobs[0].state is JobState.SUCCEEDED and jobs[0].result is not None:
        return int(jobs[0].result["exit_code"])
    ok = all(j.state is JobState.SUCCEEDED and j.result is not None and j.result.get("exit_code") == 0 for j in jobs)
    return 0 if ok else 1


def _run(st: State, op: Op, target: str | None, select_: list[str] | None, after: str | None,
         **params: Any) -> list[Job]:
    from orchestrator.control.targets import resolve

    from .vms import parse_ids

    params = {k: v for k, v in params.items() if v is not None}
    names = resolve(st.client, st.namespace, target, parse_tags(select_))
    ops = [Operation.build(op, st.namespace, n, **params) for n in names]
    jobs = st.client.submit(ops, SubmitOptions(after=parse_ids(after), label=target or ",".join(select_ or [])))
    parent = st.client.job(jobs[0].parent) if jobs[0].parent is not None else None
    return wait_for(st.client, jobs, parent=parent)


def guest_path(spec: str) -> tuple[str, str] | None:
    """``vm1:/etc/hosts`` as ``("vm1", "/etc/hosts")``; None for a local path (write ``./a:/b`` for one)."""
    vm, sep, path = spec.partition(":")
    if not sep or not path.startswith("/"):
        return None
    try:
        return check_name(vm), path
    except InvalidInput:
        return None


def cp(ctx: typer.Context,
       src: Annotated[str, typer.Argument(help="a local file, or VM:/path in a guest")],
       dst: Annotated[str, typer.Argument(help="a local file or directory, or VM:/path (a path ending in / is a dir)")],
       timeout: Annotated[float, typer.Option("--timeout", help="seconds to wait for the guest agent")] = 60.0,
       ) -> None:
    """Copy a file into or out of a guest (VM:/path), through its agent: an ordered job (at most 1 MiB)."""
    st = state(ctx)
    source, target = guest_path(src), guest_path(dst)
    if (source is None) == (target is None):
        raise InvalidInput("give one side as VM:/path and the other as a local path",
                           hint="vmorch vm cp ./notes.txt web1:/tmp/  or  vmorch vm cp web1:/etc/hosts .")
    if target is not None:
        local = Path(src)
        if not local.is_file():
            raise InvalidInput(f"{src} is not a file")
        if local.stat().st_size > CP_MAX_BYTES:
            raise InvalidInput(f"{src} is larger than {CP_MAX_BYTES // 1024} KiB, the most vm cp copies")
        vm, path = target
        path = path + local.name if path.endswith("/") else path
        content = base64.b64encode(local.read_bytes()).decode()
        job = _run(st, Op.CP, vm, None, None, path=path, content=content, timeout_s=timeout)[0]
    else:
        assert source is not None
        vm, path = source
        job = _run(st, Op.CP, vm, None, None, path=path, timeout_s=timeout)[0]
    if st.json:
        render.dump_json(job)
    if job.state is not JobState.SUCCEEDED or job.result is None:
        if not st.json:
            render.err.print(render.job_line(job))
        raise typer.Exit(1)
    if source is not None:
        out = Path(dst)
        out = out / Path(source[1]).name if out.is_dir() else out
        out.write_bytes(base64.b64decode(job.result["content"]))
    if not st.json:
        render.err.print(f"copied {job.result['bytes']} bytes {'into' if target else 'out of'} {vm}:{path}")

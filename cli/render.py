"""Printing: rich tables for people, JSON on stdout for scripts, progress on stderr.

rich is imported on first use: it takes about 50 ms, which '--help' and usage errors don't need.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from functools import cache, lru_cache
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from orchestrator.model.errors import VmorchError
from orchestrator.model.records import Event, Host, Job, JobState, Namespace, Vm

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

#: stdout and stderr, made on first use (see __getattr__)
out: Console
err: Console

STATE_STYLE = {
    "succeeded": "green", "failed": "red", "canceled": "yellow", "running": "cyan", "waiting": "magenta",
    "queued": "dim", "paused": "yellow", "shutoff": "dim", "crashed": "red", "missing": "red",
    "unknown": "red", "up": "green", "down": "red", "draining": "yellow",
}


def __getattr__(name: str) -> Console:
    if name == "out":
        return _console(stderr=False)
    if name == "err":
        return _console(stderr=True)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@cache
def _console(*, stderr: bool) -> Console:
    from rich.console import Console

    # Piped output keeps whole lines (rich would cut tables at 80 columns) so scripts can grep them.
    width = None if stderr or sys.stdout.isatty() else 200
    return Console(stderr=stderr, highlight=False, soft_wrap=True, width=width)


def new_table(*, show_header: bool = True) -> Table:
    """A borderless table, as every listing prints."""
    from rich.table import Table

    return Table(box=None, show_header=show_header, pad_edge=False)


def escape(text: str) -> str:
    """``text`` with rich markup escaped."""
    from rich.markup import escape as escape_markup

    return escape_markup(text)


def dump_json(value: BaseModel | Sequence[BaseModel] | dict[str, Any]) -> None:
    if isinstance(value, BaseModel):
        data: Any = value.model_dump(mode="json")
    elif isinstance(value, dict):
        data = value
    else:
        data = [v.model_dump(mode="json") for v in value]
    sys.stdout.write(json.dumps(data, indent=2) + "\n")
    sys.stdout.flush()


def listing(items: Sequence[BaseModel], table: Callable[[Any], Table], *, as_json: bool, empty: str) -> None:
    """A list command's output: JSON for scripts, a table for people, a hint when there is nothing."""
    if as_json:
        dump_json(items)
    elif len(items) > PLAIN_ROWS or not sys.stdout.isatty():
        sys.stdout.write(plain(table(items)) + "\n")
    elif items:
        _console(stderr=False).print(table(items))
    else:
        _console(stderr=True).print(empty)


#: past this many rows, or into a pipe or file, a list is printed as plain aligned text: rich lays
#: out every cell (seconds for 10,000 VMs, a tenth of a second for 50 jobs: bench B5), and into a
#: pipe it would wrap long cells at 80 columns, which grep and awk don't want either
PLAIN_ROWS = 300


def plain(table: Table) -> str:
    """A borderless table as aligned text without styles, columns two spaces apart as rich puts them."""
    columns = [[str(c.header)] + [_plain_cell(x) for x in c.cells]
               for c in table.columns]
    widths = [max(map(len, col)) for col in columns]
    return "\n".join("  ".join(col[i].ljust(w) for col, w in zip(columns, widths, strict=True)).rstrip()
                     for i in range(len(columns[0])))


def styled(value: str) -> str:
    style = STATE_STYLE.get(value)
    return f"[{style}]{value}[/{style}]" if style else value


def when(value: datetime | None) -> str:
    if value is None:
        return "-"
    return value.astimezone(UTC).strftime("%H:%M:%S.%f")[:-3]


def took(job: Job) -> str:
    if job.started_at and job.finished_at:
        return f"{(job.finished_at - job.started_at).total_seconds():.2f}s"
    return "-"


def by_state(jobs: Sequence[Job]) -> dict[str, int]:
    """Counts by state, in the order of JobState, states with none left out."""
    return {s.value: n for s in JobState if (n := sum(j.state is s for j in jobs))}


def job_line(job: Job) -> str:
    if job.is_parent and job.children is not None:
        c = job.children
        label = escape(str(job.params.get("label", "")))
        line = (f"job {job.id} {styled(job.state.value)}: {'/'.join(job.params.get('ops', []))} "
                f"{job.namespace}/{label} ({c['total']} jobs: {c['succeeded']} succeeded, "
                f"{c['failed']} failed, {c['canceled']} canceled, {c['pending']} pending)")
        return line + (f" - {escape(job.error.message)}" if job.error else "")
    what = f"{job.op.value} {job.namespace}/{job.vm}"
    where = f"seq {job.seq}, host {job.host}"
    if job.held:
        where = f"starts at {when(job.not_before)}" if job.not_before else \
            f"waits for jobs {', '.join(map(str, job.after))}"
    line = f"job {job.id} {styled(job.state.value)}: {what} ({where})"
    if job.error:
        line += f" - {job.error.code}: {escape(job.error.message)}"
        if job.error.hint:
            line += f" (hint: {escape(job.error.hint)})"
    elif job.result and job.result.get("note"):
        line += f" - {escape(str(job.result['note']))}"
    return line


def jobs_table(jobs: Sequence[Job]) -> Table:
    table = new_table()
    for col in ("ID", "OP", "VM", "SEQ", "HOST", "STATE", "SUBMITTED", "STARTED", "FINISHED", "TRIES", "ERROR"):
        table.add_column(col, no_wrap=col != "ERROR")
    for j in jobs:
        error = escape(f"{j.error.code}: {j.error.message}") if j.error else ""
        vm = escape(f"({j.params.get('label', '')})") if j.is_parent else j.vm
        table.add_row(str(j.id), j.op.value, vm, str(j.seq), j.host, styled(j.state.value), when(j.submitted_at),
                      when(j.started_at), when(j.finished_at), str(j.attempts), error)
    return table


def job_detail(job: Job) -> Table:
    table = new_table(show_header=False)
    table.add_column(style="bold")
    table.add_column()
    rows: list[tuple[str, str]] = [
        ("id", str(job.id)), ("op", job.op.value), ("vm", f"{job.namespace}/{job.vm}"), ("host", job.host),
        ("state", styled(job.state.value)), ("seq", str(job.seq)), ("submitted", _iso(job.submitted_at)),
        ("started", _iso(job.started_at)), ("finished", _iso(job.finished_at)), ("took", took(job)),
        ("attempts", str(job.attempts)), ("params", escape(json.dumps(job.params))),
    ]
    links = [("parent", job.parent), ("retry of", job.retry_of)]
    rows += [(k, str(v)) for k, v in links if v is not None]
    if job.after:
        rows.append(("after", ", ".join(map(str, job.after)) + (" (not all met yet)" if job.held else "")))
    if job.error:
        rows.append(("error", f"[red]{job.error.code}[/red]: {escape(job.error.message)}"))
    if job.result is not None:
        rows.append(("result", escape(json.dumps(job.result))))
    if job.cancel_requested_by:
        rows.append(("cancel", f"requested by {escape(job.cancel_requested_by)}"))
    for k, v in rows:
        table.add_row(k, v)
    return table


def events_table(events: Sequence[Event]) -> Table:
    table = new_table()
    for col in ("AT", "WHAT", "JOB", "OP", "STATE", "BY", "DETAIL"):
        table.add_column(col, no_wrap=col != "DETAIL")
    for e in events:
        table.add_row(when(e.at), e.kind, str(e.job or ""), e.op, styled(e.state), escape(e.by), escape(e.detail))
    return table


def vms_table(vms: Sequence[Vm]) -> Table:
    table = new_table()
    for col in ("NAME", "HOST", "STATE", "MEMORY", "VCPUS", "TAGS", "NOTE"):
        table.add_column(col, no_wrap=col not in ("TAGS", "NOTE"))
    for v in vms:
        tags = escape(",".join(f"{k}={val}" for k, val in sorted(v.tags.items())))
        table.add_row(v.name, v.host, styled(v.state.value), f"{v.memory_mib} MiB", str(v.vcpus), tags,
                      escape(v.note or ""))
    return table


def vm_detail(vm: Vm) -> Table:
    table = new_table(show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for k, v in [("name", vm.name), ("namespace", vm.namespace), ("host", vm.host), ("state", styled(vm.state.value)),
                 ("memory", f"{vm.memory_mib} MiB"), ("vcpus", str(vm.vcpus)),
                 ("disk", f"{vm.disk_gib} GiB" if vm.disk_gib else "none"), ("image", escape(vm.image or "-")),
                 ("tags", escape(", ".join(f"{k}={val}" for k, val in sorted(vm.tags.items())) or "-")),
                 ("snapshots", escape(", ".join(vm.snapshots) or "-")), ("domain", vm.domain),
                 ("created", _iso(vm.created_at)), ("updated", _iso(vm.updated_at)),
                 ("note", escape(vm.note or "-"))]:
        table.add_row(k, v)
    return table


def hosts_table(hosts: Sequence[Host]) -> Table:
    table = new_table()
    for col in ("NAME", "STATE", "HEARTBEAT", "PID", "LIBVIRT", "MEMORY USED", "VCPUS USED", "VMS", "LABELS"):
        table.add_column(col, no_wrap=True)
    for h in hosts:
        labels = escape(",".join(f"{k}={v}" for k, v in sorted(h.labels.items())))
        # placement skips such a host: the list says why it gets no new VM
        libvirt = h.libvirt_uri if h.libvirt_ok is not False else f"{h.libvirt_uri} (not answering)"
        table.add_row(h.name, styled(h.state.value), when(h.heartbeat_at), str(h.pid or "-"), libvirt,
                      f"{h.committed_mib}/{h.memory_mib} MiB", f"{h.committed_vcpus}/{h.cpus}", str(h.vms), labels)
    return table


def namespaces_table(namespaces: Sequence[Namespace]) -> Table:
    table = new_table()
    for col in ("NAME", "STATE", "VMS", "HOSTS", "CREATED"):
        table.add_column(col, no_wrap=True)
    for ns in namespaces:
        table.add_row(ns.name, ns.state, str(ns.vms), ",".join(ns.hosts) if ns.hosts else "(all)",
                      _iso(ns.created_at))
    return table


def error(exc: VmorchError, *, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps({"error": exc.to_dict()}) + "\n")
    err = _console(stderr=True)
    err.print(f"[red]error:[/red] {escape(exc.message)}", markup=True)  # it may quote what the user typed
    if exc.hint:
        err.print(f"[dim]hint: {escape(exc.hint)}[/dim]")


def any_failed(jobs: Sequence[Job]) -> bool:
    return any(j.state in (JobState.FAILED, JobState.CANCELED) for j in jobs)


def iso(value: datetime | None) -> str:
    """A full ISO 8601 UTC timestamp, or '-'."""
    return _iso(value)


def _iso(value: datetime | None) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z") if value else "-"


def _plain_cell(cell: object) -> str:
    if isinstance(cell, str):
        return _unmarked(cell) if "[" in cell else cell
    return str(cell)


@lru_cache(maxsize=4096)
def _unmarked(cell: str) -> str:
    """A cell's text without its markup; the same few styled states fill most cells of a long list,
    and parsing their markup again for each of 10,000 rows took most of the listing's time."""
    from rich.text import Text

    return Text.from_markup(cell).plain

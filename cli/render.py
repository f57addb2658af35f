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
from orchestrator.model.records import Event, Host, Job, JobState, Namespace, Vm, VmState

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

#: stdout and stderr, made on first use (see __getattr__)
out: Console
err: Console

STATE_STYLE = {
    "succeeded": "green", "failed": "red", "canceled": "yellow", "running": "cyan", "waiting": "magenta",
    "queued": "dim", "paused": "yellow", "shutoff": "dim", "crashed": "red", "missing": "red",
    "unknown": "red", "up": "green", "down": "red", "draining": "yellow", "launching": "cyan",
}


def __getattr__(name: str) -> Console:
    if name == "out":
        return _console(stderr=False)
    if name == "err":
        return _console(stderr=True)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@cache
def _console(*, stderr: bool) -> Console:
    # Piped output keeps whole lines (rich would cut tables at 80 columns) so scripts can grep them.
    width = None if stderr or sys.stdout.isatty() else 200
    return _console_class()(stderr=stderr, highlight=False, soft_wrap=True, width=width)


@cache
def _console_class() -> type[Console]:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    class Stripped(Console):
        """A console that prints tables without the spaces rich pads their last cells with:
        no line of any command's output ends in whitespace."""

        def print(self, *objects: Any, **kwargs: Any) -> None:
            if len(objects) == 1 and isinstance(objects[0], Table):
                lines = self.render_lines(objects[0], self.options, pad=False)
                texts = [Text.assemble(*((s.text, s.style or "") for s in line if not s.control)) for line in lines]
                for text in texts:
                    text.rstrip()
                objects = (Text("\n").join(texts),)
            super().print(*objects, **kwargs)

    return Stripped


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
        table.add_row(str(j.id), j.op.value, vm, seq(j), j.host or "-", styled(j.state.value), when(j.submitted_at),
                      when(j.started_at), when(j.finished_at), tries(j), error)
    return table


def seq(job: Job) -> str:
    """A job's place in its VM's order; '-' for a parent (it has no VM) or a held job (no place yet).
    The JSON keeps 0 there: ``seq`` is an integer in the job's contract."""
    return "-" if job.is_parent or job.seq == 0 else str(job.seq)


def tries(job: Job) -> str:
    """How many times a worker started the job; '-' for a parent, which no worker runs."""
    return "-" if job.is_parent else str(job.attempts)


def job_detail(job: Job) -> Table:
    table = new_table(show_header=False)
    table.add_column(style="bold")
    table.add_column()
    rows: list[tuple[str, str]] = [
        ("id", str(job.id)), ("op", job.op.value),
        ("vm", f"{job.namespace}/({escape(str(job.params.get('label', '')))})" if job.is_parent
         else f"{job.namespace}/{job.vm}"),
        ("host", job.host or "-"), ("state", styled(job.state.value)), ("seq", seq(job)),
        ("submitted", _iso(job.submitted_at)), ("started", _iso(job.started_at)), ("finished", _iso(job.finished_at)),
        ("took", took(job)), ("attempts", tries(job)), ("params", escape(json.dumps(job.params))),
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
        table.add_row(when(e.at), e.kind, str(e.job or ""), e.op, styled(event_state(e)), escape(e.by),
                      escape(e.detail))
    return table


#: the note a launch gives the VM record it registers (submit_batch.lua), until its job runs
LAUNCH_QUEUED = "launch queued"


def event_state(event: Event) -> str:
    """An event's state as people read it. A launch registers its VM record in state ``missing``
    (libvirt has no domain yet) before its job runs: that VM is launching, not lost."""
    if event.kind == "vm" and event.op == "launch" and event.state == "missing":
        return "launching"
    return event.state


def vm_state(vm: Vm) -> str:
    """A VM's state as people read it: ``launching`` while its launch has not run (the record says
    ``missing``: libvirt has no domain yet), else the record's state. The JSON keeps the record's."""
    if vm.state is VmState.MISSING and vm.note == LAUNCH_QUEUED:
        return "launching"
    return vm.state.value


def vm_note(vm: Vm) -> str:
    """The note beside a VM's state: one about the VM that still holds (a change that applies at
    the next boot, a queued launch, a move). A no-op's answer ("already running") is never written
    on the VM record (``worker/handlers.py``): it is in that job's result."""
    return vm.note or ""


def vms_table(vms: Sequence[Vm]) -> Table:
    table = new_table()
    for col in ("NAME", "HOST", "STATE", "MEMORY", "VCPUS", "TAGS", "NOTE"):
        table.add_column(col, no_wrap=col not in ("TAGS", "NOTE"))
    for v in vms:
        tags = escape(",".join(f"{k}={val}" for k, val in sorted(v.tags.items())))
        table.add_row(v.name, v.host, styled(vm_state(v)), f"{v.memory_mib} MiB", str(v.vcpus), tags,
                      escape(vm_note(v)))
    return table


def vm_detail(vm: Vm) -> Table:
    table = new_table(show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for k, v in [("name", vm.name), ("namespace", vm.namespace), ("host", vm.host), ("state", styled(vm_state(vm))),
                 ("memory", f"{vm.memory_mib} MiB{_live(vm, vm.memory_mib_live, ' MiB')}"),
                 ("vcpus", f"{vm.vcpus}{_live(vm, vm.vcpus_live)}"),
                 ("disk", f"{vm.disk_gib} GiB" if vm.disk_gib else "none"), ("image", escape(vm.image or "-")),
                 ("tags", escape(", ".join(f"{k}={val}" for k, val in sorted(vm.tags.items())) or "-")),
                 ("snapshots", escape(", ".join(f"{d.name} ({_iso(d.created_at)}{_snapshot_size(d.size_bytes)})"
                                                for d in vm.snapshot_details) or ", ".join(vm.snapshots) or "-")),
                 ("domain", vm.domain),
                 ("created", _iso(vm.created_at)), ("updated", _iso(vm.updated_at)),
                 ("note", escape(vm_note(vm) or "-")), ("agent", vm.agent),
                 ("addresses", escape(", ".join(f"{a.ip} ({a.mac})" for a in vm.addresses) or "-")),
                 *((f"nic {i}", escape(f"{n.net} {n.mac} {n.ip or '-'}" + (
                     f" ({n.shaping.describe()})" if not n.shaping.empty else ""))) for i, n in enumerate(vm.nics))]:
        table.add_row(k, v)
    return table


def _snapshot_size(size: int | None) -> str:
    """A snapshot's saved guest state (RAM and devices); none for a snapshot of a VM that was off."""
    if size is None:  # not known: libvirt's test driver keeps no snapshot in a file
        return ""
    return f", {size / 2**20:.1f} MiB of guest state" if size else ", disk only"


def _live(vm: Vm, live: int | None, unit: str = "") -> str:
    """What the running VM has, beside what is set (the next boot's), where they differ."""
    if live is None or vm.state not in (VmState.RUNNING, VmState.PAUSED):
        return ""
    return f" set, {live}{unit} live (the set value applies at the next boot)"


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


def host_detail(h: Host, vms: dict[str, list[str]]) -> Table:
    """The whole host record, and its VMs by namespace (``vms``: those the caller can see)."""
    table = new_table(show_header=False)
    table.add_column(style="bold")
    table.add_column()
    if h.libvirt_ok is None:
        probe = "not probed yet"
    elif h.libvirt_ok:
        probe = "answers"
    else:
        probe = f"[red]not answering[/red]: {escape(h.libvirt_error or '?')}"
    rows = [
        ("name", h.name), ("state", styled(h.state.value) + (" (its worker was stopped)" if h.stopped else "")),
        ("hostname", escape(h.hostname or "-")), ("pid", str(h.pid or "-")), ("version", escape(h.version or "-")),
        ("started", _iso(h.started_at)), ("heartbeat", _iso(h.heartbeat_at)),
        ("clock offset", "not measured yet" if h.clock_offset is None else f"{h.clock_offset * 1000:+.1f} ms"),
        ("libvirt", escape(h.libvirt_uri or "-")), ("libvirt probe", probe),
        ("accel", f"{h.accel or '-'}" + (f" ({escape(h.accel_reason)})" if h.accel_reason else "")),
        ("migrate uri", escape(h.migrate_uri) if h.migrate_uri else "- (no live moves to this host)"),
        ("storage", "shared (every host sees its disks at the same path)" if h.shared_storage else "local"),
        ("memory", f"{h.committed_mib}/{h.memory_mib} MiB committed{_share(h.committed_mib, h.memory_mib)}"),
        ("vcpus", f"{h.committed_vcpus}/{h.cpus} committed{_share(h.committed_vcpus, h.cpus)}"),
        ("labels", escape(", ".join(f"{k}={v}" for k, v in sorted(h.labels.items())) or "-")),
        ("networks", f"underlay {h.underlay}, link emulation: {h.shaping or '-'}" if h.underlay else "- (none here)"),
        ("vms", str(h.vms))]
    rows += [(f"  {escape(ns)}", escape(", ".join(names))) for ns, names in sorted(vms.items())]
    hidden = h.vms - sum(map(len, vms.values()))
    if hidden > 0:
        rows.append(("  (others)", f"{hidden} in namespaces not listed here"))
    for k, v in rows:
        table.add_row(k, v)
    return table


def _share(used: int, total: int) -> str:
    return f" ({used / total:.0%})" if total else ""


def namespaces_table(namespaces: Sequence[Namespace]) -> Table:
    table = new_table()
    for col in ("NAME", "STATE", "VMS", "HOSTS", "QUOTA", "CREATED"):
        table.add_column(col, no_wrap=True)
    for ns in namespaces:
        q = ns.quota
        limits = [f"{q.vms} VMs" if q.vms else "", f"{q.memory_mib} MiB" if q.memory_mib else "",
                  f"{q.vcpus} vCPUs" if q.vcpus else "", f"{q.disk_gib} GiB disk" if q.disk_gib else ""]
        table.add_row(ns.name, ns.state, str(ns.vms), ",".join(ns.hosts) if ns.hosts else "(all)",
                      ", ".join(x for x in limits if x) or "-", _iso(ns.created_at))
    return table


def error(exc: VmorchError, *, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps({"error": exc.to_dict()}) + "\n")
    # click's styling, not rich's console: two lines don't need the ~50 ms rich takes to import, and
    # the text goes out as is (it may quote what the user typed: no markup to escape)
    import typer

    typer.echo(typer.style("error:", fg="red") + f" {exc.message}", err=True)
    if exc.hint:
        typer.secho(f"hint: {exc.hint}", err=True, dim=True)


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

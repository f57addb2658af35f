"""``vmorch doctor``: check the cluster and say how to fix what is wrong."""

from __future__ import annotations

from typing import Annotated

import typer

from . import render
from .context import state

#: by the value of orchestrator.edge.doctor.Status: that module imports redis, which "--help" must not (start-up time)
MARK = {"ok": "[green]ok  [/green]", "pending": "[cyan]wait[/cyan]", "warn": "[yellow]warn[/yellow]",
        "fail": "[red]FAIL[/red]"}


def doctor(
    ctx: typer.Context,
    stuck_after: Annotated[float | None, typer.Option(
        "--stuck-after", min=1, show_default=False,
        help="seconds after which a VM's next job not yet started on an up host is stuck "
             "[default: VMORCH_DOCTOR_STUCK_AFTER, 120]")] = None,
) -> None:
    """Check the cluster and say how to fix what is wrong.

    Checks Redis (version, persistence, eviction policy), every host's worker, its libvirt
    connection and clock, and versions. Exits 1 if something is wrong (a warning alone exits 0).
    """
    from orchestrator.edge import doctor as checks

    st = state(ctx)
    found = checks.examine(st.settings, stuck_after=stuck_after)
    failed = [c for c in found if c.status is checks.Status.FAIL]
    if st.json:
        render.dump_json({"ok": not failed, "checks": [c.to_dict() for c in found]})
    else:
        width = max(len(c.name) for c in found)
        for c in found:
            render.out.print(f"{MARK[c.status]}  {c.name:<{width}}  {render.escape(c.message)}", markup=True)
            if c.fix and c.status not in (checks.Status.OK, checks.Status.PENDING):
                render.out.print(f"      {'':<{width}}  fix: {c.fix}", markup=False)
        warned = sum(c.status is checks.Status.WARN for c in found)
        render.out.print(f"{len(failed)} problem(s), {warned} warning(s)" if failed or warned else "all good")
    if failed:
        raise typer.Exit(1)

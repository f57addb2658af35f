"""Long lists print as plain aligned text (rich lays out every cell: seconds for 10,000 rows)."""

from __future__ import annotations

import json

import pytest

from cli import render
from orchestrator.model.errors import InvalidInput
from orchestrator.model.records import Event, Job, Vm, VmState


def vm(i: int) -> Vm:
    return Vm.model_validate({"name": f"vm{i}", "namespace": "ns", "host": "h1" if i % 2 else "host-two",
                              "state": "running" if i % 3 else "paused", "memory_mib": 64, "vcpus": 1,
                              "tags": {"role": "web"}, "domain": f"ns.vm{i}"})


def test_a_long_list_is_plain_aligned_text(capsys: pytest.CaptureFixture[str]) -> None:
    vms = [vm(i) for i in range(render.PLAIN_ROWS + 1)]
    render.listing(vms, render.vms_table, as_json=False, empty="none")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(vms) + 1
    assert lines[0].split() == ["NAME", "HOST", "STATE", "MEMORY", "VCPUS", "TAGS", "NOTE"]
    assert lines[1].split() == ["vm0", "host-two", "paused", "64", "MiB", "1", "role=web"]  # no markup left
    state_at = lines[0].index("STATE")
    assert {line[state_at:].split()[0] for line in lines[1:]} == {"running", "paused"}  # columns line up


def test_a_short_list_into_a_pipe_is_plain_text_too(capsys: pytest.CaptureFixture[str]) -> None:
    vms = [vm(i) for i in range(3)]
    render.listing(vms, render.vms_table, as_json=False, empty="none")  # capsys is no terminal
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "HOST", "STATE", "MEMORY", "VCPUS", "TAGS", "NOTE"]
    assert [line.split()[0] for line in lines[1:]] == ["vm0", "vm1", "vm2"]
    assert "[" not in "".join(lines)  # no markup left


def test_brackets_in_users_text_are_printed_as_they_are(capsys: pytest.CaptureFixture[str]) -> None:
    """Tag values, notes and error messages are text, never rich markup (a pydantic error says '[type=...]')."""
    odd = Vm.model_validate({"name": "odd", "namespace": "ns", "host": "h1", "state": "running", "memory_mib": 64,
                             "vcpus": 1, "tags": {"role": "[red]web[/red]"}, "domain": "ns.odd",
                             "note": "1 validation error [type=int_parsing, input_value='lots']"})
    for vms in ([odd], [odd] * (render.PLAIN_ROWS + 1)):  # the short and the long way
        render.listing(vms, render.vms_table, as_json=False, empty="none")
        line = capsys.readouterr().out.splitlines()[1]
        assert "role=[red]web[/red]" in line and "[type=int_parsing, input_value='lots']" in line, line
    render.out.print(render.vm_detail(odd))
    assert "[type=int_parsing, input_value='lots']" in capsys.readouterr().out


def test_an_error_quoting_brackets_prints_them(capsys: pytest.CaptureFixture[str]) -> None:
    render.error(InvalidInput("no VM '[red]x' in namespace 'ns'", hint="names are [a-z0-9-]"), as_json=False)
    err = capsys.readouterr().err
    assert "no VM '[red]x'" in err and "names are [a-z0-9-]" in err, err


def event(**fields: object) -> Event:
    return Event.model_validate({"id": "1-0", "at": None, "kind": "vm", "job": None, "vm": "v", "op": "", "state": "",
                                 "by": "cli", "detail": "", **fields})


def test_a_vm_whose_launch_has_not_run_is_launching_not_missing(capsys: pytest.CaptureFixture[str]) -> None:
    """A launch registers the VM record (state ``missing``, note ``launch queued``) before its job runs."""
    registered = event(op="launch", state="missing", detail="registered on host h1")
    lost = event(op="", state="missing", detail='{"state": "missing"}')  # reconciliation: really gone
    render.out.print(render.events_table([registered, lost]))
    rows = capsys.readouterr().out.splitlines()[1:]
    assert "launching" in rows[0] and "missing" not in rows[0], rows[0]
    assert "missing" in rows[1]

    queued = vm(1).model_copy(update={"state": VmState.MISSING, "note": "launch queued"})
    gone = vm(2).model_copy(update={"state": VmState.MISSING, "note": ""})
    render.listing([queued, gone], render.vms_table, as_json=False, empty="none")
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[2] == "launching" and lines[2].split()[2] == "missing", lines
    render.out.print(render.vm_detail(queued))
    assert "launching" in capsys.readouterr().out
    render.listing([queued], render.vms_table, as_json=True, empty="none")
    assert json.loads(capsys.readouterr().out)[0]["state"] == "missing"  # the JSON keeps the record's state


def test_no_printed_table_line_ends_in_whitespace(capsys: pytest.CaptureFixture[str]) -> None:
    short = vm(1).model_copy(update={"note": "", "tags": {}})
    for table in (render.vm_detail(short), render.vms_table([short, vm(2)]),
                  render.events_table([event(op="launch", state="missing", detail="")])):
        render.out.print(table)
        lines = capsys.readouterr().out.splitlines()
        assert len(lines) >= 2 and not [line for line in lines if line != line.rstrip()], lines


def job(**fields: object) -> Job:
    return Job.model_validate({"id": 7, "op": "start", "namespace": "ns", "vm": "v", "host": "h1",
                               "state": "succeeded", "seq": 3, "submitted_at": None, "started_at": None,
                               "finished_at": None, "attempts": 1, "error": None, "result": None, "params": {},
                               **fields})


def test_a_parent_job_shows_no_seq_and_no_tries() -> None:
    parent = job(id=8, op="bulk", vm="", host="", seq=0, attempts=0, params={"label": "w[1-2]", "ops": ["start"]},
                 children={"total": 2, "pending": 0, "succeeded": 2, "failed": 0, "canceled": 0})
    lines = render.plain(render.jobs_table([job(), parent])).splitlines()
    assert lines[0].split()[:4] == ["ID", "OP", "VM", "SEQ"] and lines[0].split()[9] == "TRIES"
    assert lines[1].split()[3] == "3" and lines[1].split()[9] == "1"
    assert lines[2].split()[3] == "-" and lines[2].split()[9] == "-", lines[2]
    detail = dict(line.split(maxsplit=1) for line in render.plain(render.job_detail(parent)).splitlines() if line)
    assert (detail["seq"], detail["attempts"], detail["vm"]) == ("-", "-", "ns/(w[1-2])"), detail
    held = job(id=9, state="queued", seq=0, attempts=0, after=[7])
    assert render.plain(render.jobs_table([held])).splitlines()[1].split()[3] == "-"  # no place in the order yet

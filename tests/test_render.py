"""Long lists print as plain aligned text (rich lays out every cell: seconds for 10,000 rows)."""

from __future__ import annotations

import pytest

from cli import render
from orchestrator.model.errors import InvalidInput
from orchestrator.model.records import Vm


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

"""The CLI's start-up: simple commands must not pay for what they don't use.

Celery, libvirt and the HTTP server stack take a large share of a short command's time;
only the commands that need them may import them. A help text needs no Redis client either
(redis-py imports asyncio), no YAML, cron or rich.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from cli import doctor as doctor_cli
from orchestrator.edge import doctor
from orchestrator.model.settings import Settings
from orchestrator.services.client import RedisClient

from .conftest import PYTHON, ROOT, settings_env

HEAVY = ("celery", "kombu", "libvirt", "fastapi", "uvicorn", "starlette")
#: what a help text doesn't need on top: Redis, pydantic-settings (gone), experiments' YAML, schedules' cron,
#: rich (typer prints help without it)
NOT_FOR_HELP = ("redis", "asyncio", "pydantic_settings", "yaml", "croniter", "rich")
#: experiments and schedules only: reading commands don't parse YAML or cron
NOT_FOR_READING = ("yaml", "croniter")

# Runs the CLI in-process, then reports on stderr's last line every module it imported and the
# records whose pydantic validators it built.
PROBE = """
import json, sys
from cli.app import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
from pydantic import BaseModel
from orchestrator.model import records
built = [n for n, c in vars(records).items()
         if isinstance(c, type) and issubclass(c, BaseModel) and c.__pydantic_complete__]
sys.stderr.write("\\n" + json.dumps({"modules": sorted(sys.modules), "built": sorted(built)}))
"""


def probe(settings: Settings, *args: str) -> dict[str, list[str]]:
    done = subprocess.run([PYTHON, "-c", PROBE, "--namespace", settings.namespace, *args], cwd=ROOT,
                          env=settings_env(settings), capture_output=True, text=True, timeout=60)
    result: dict[str, list[str]] = json.loads(done.stderr.strip().splitlines()[-1])
    return result


def imported(settings: Settings, *args: str) -> set[str]:
    return set(probe(settings, *args)["modules"])


def heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in HEAVY)


@pytest.mark.parametrize("args", [("--help",), ("job", "list", "--help"), ("vm", "list", "--help"),
                                  ("vm", "pause", "--help")])
def test_help_imports_nothing_heavy(settings: Settings, args: tuple[str, ...]) -> None:
    modules = imported(settings, *args)
    assert heavy(modules) == []
    assert "orchestrator.services.client" not in modules  # no Redis client for a help text
    assert sorted(m for m in modules if m.split(".")[0] in NOT_FOR_HELP) == []


def test_read_commands_import_nothing_heavy(client: RedisClient, settings: Settings) -> None:
    for args in (("job", "list"), ("vm", "list"), ("host", "list")):
        modules = imported(settings, *args)
        assert "orchestrator.services.client" in modules, f"{args} did not run"  # the probe really ran the command
        assert heavy(modules) == [], args
        assert sorted(m for m in modules if m.split(".")[0] in NOT_FOR_READING) == [], args


def test_an_error_is_printed_without_rich(client: RedisClient, settings: Settings) -> None:
    """Its two lines went through a rich console: ~50 ms of imports, a sixth of ``vm show``'s start-up."""
    modules = imported(settings, "vm", "show", "no-such-vm")
    assert "orchestrator.services.client" in modules  # it did look the VM up
    assert sorted(m for m in modules if m.split(".")[0] == "rich") == []


def test_a_command_builds_only_the_validators_it_uses(client: RedisClient, settings: Settings) -> None:
    """Building every record's validator at import cost each command 0.02-0.06 s (defer_build).

    The test's namespace is empty: its lists validate no job and no VM (hosts, which other
    tests' workers register in the same Redis, may be read).
    """
    assert probe(settings, "--help")["built"] == []
    for args in (("job", "list"), ("vm", "list")):
        built = probe(settings, *args)["built"]
        assert "Job" not in built and "Vm" not in built, (args, built)


def test_the_doctor_marks_every_status() -> None:
    """The CLI's marks are keyed by value, to keep orchestrator.edge.doctor (and redis) out of '--help'."""
    assert set(doctor_cli.MARK) == {s.value for s in doctor.Status}

"""Experiment files: every problem with its line; a run is a job graph whose teardown runs after a failure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.model.errors import InvalidInput, NotFound
from orchestrator.model.experiment import parse
from orchestrator.model.records import JobState
from orchestrator.model.settings import Settings
from orchestrator.services.client import RedisClient

from .conftest import ROOT, WorkerProc, run_cli

BAD = """\
name: bad
vms:
  - name: web[1-3]
    memory: 32
  - name: db
    count: 2
steps:
  - name: pause
    op: pause
    target: web[1-
  - op: set
    target: web1
  - name: snap
    op: snapshot
    target: web1
    params: {name: s1}
    after: [nope]
teardown: delete
"""

FAILING = """\
name: failing
vms:
  - name: f[1-2]
    memory: 32
    disk: 0
    tags: {role: f}
steps:
  - name: kill
    op: kill
    target: f1
  - name: pause            # fails: f1 is shut off
    op: pause
    target: f[1-2]
  - name: resume           # fails at once: its dependency failed
    op: resume
    tag: {role: f}
teardown: delete
"""


def test_validate_reports_every_problem_with_its_line(tmp_path: Path, settings: Settings) -> None:
    _, problems = parse(BAD)
    assert [(p.line, p.field) for p in problems] == [(10, "steps[0].target"), (11, "steps[1].params"),
                                                     (17, "steps[2].after[0]")]
    _, structural = parse("name: x\nvms:\n  - name: a\n    memroy: 32\nsteps:\n  - op: fly\n    target: a\n")
    assert [(p.line, p.field) for p in structural] == [(4, "vms[0].memroy"), (6, "steps[0].op")]
    _, mixed = parse("name: x\nvms:\n  - name: a\n    memroy: 32\nsteps:\n  - op: fly\n    target: a\n"
                     "  - op: pause\n    target: b[1-\n")
    assert [(p.line, p.field) for p in mixed] == [(4, "vms[0].memroy"), (6, "steps[0].op"), (9, "steps[1].target")]
    _, broken = parse("name: x\nsteps: [\n")
    assert broken[0].line is not None and "not valid YAML" in broken[0].message

    path = tmp_path / "bad.yaml"
    path.write_text(BAD)
    proc = run_cli(settings, "experiment", "validate", str(path))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith(f"{path}:10: steps[0].target: invalid target") and len(lines) == 3
    assert run_cli(settings, "experiment", "validate", str(ROOT / "examples" / "web-smoke.yaml")).returncode == 0


def test_an_invalid_or_unmatched_experiment_changes_nothing(cluster: list[WorkerProc], client: RedisClient) -> None:
    ns = client.settings.namespace
    with pytest.raises(InvalidInput, match="line 10"):
        client.run_experiment(BAD, namespace=ns)
    unmatched = FAILING.replace("tag: {role: f}", "tag: {role: nobody}")
    with pytest.raises(NotFound, match="role=nobody"):
        client.run_experiment(unmatched, namespace=ns)
    # what the run had accepted before the refusal is canceled; the launches end canceled or rolled back
    jobs = client.jobs(ns, limit=100)
    assert jobs and client.wait([j.id for j in jobs], timeout=60)
    assert client.experiment_runs(ns) == []


def test_an_example_runs_to_the_end(cluster: list[WorkerProc], client: RedisClient, settings: Settings) -> None:
    proc = run_cli(settings, "--json", "experiment", "run", str(ROOT / "examples" / "lab-resize.yaml"), "--wait",
                   timeout=120)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    run = json.loads(proc.stdout)
    assert run["state"] == "succeeded" and [s["name"] for s in run["steps"]] == [
        "launch", "stop", "grow", "start", "tag", "kill", "delete"]
    assert all(j["state"] == "succeeded" for j in run["jobs"].values())
    grown = max(j.finished_at for j in client.children(run["jobs"]["grow"]["id"]) if j.finished_at)
    started = min(j.started_at for j in client.children(run["jobs"]["start"]["id"]) if j.started_at)
    assert (started - grown).total_seconds() >= 2  # the step's wait: 2s
    assert client.vms(settings.namespace) == []  # torn down
    listed = run_cli(settings, "--json", "experiment", "list")
    assert [r["id"] for r in json.loads(listed.stdout)] == [run["id"]]


def test_a_failing_step_fails_what_follows_and_the_teardown_still_runs(cluster: list[WorkerProc],
                                                                      client: RedisClient, settings: Settings,
                                                                      tmp_path: Path) -> None:
    path = tmp_path / "failing.yaml"
    path.write_text(FAILING)
    proc = run_cli(settings, "experiment", "run", str(path), "--wait", timeout=120)
    assert proc.returncode == 1, proc.stderr + proc.stdout
    run_id = int(proc.stdout.split()[1])
    run = client.experiment_run(run_id)
    states = {name: job.state for name, job in run.jobs.items()}
    assert states == {"launch": JobState.SUCCEEDED, "kill": JobState.SUCCEEDED, "pause": JobState.FAILED,
                      "resume": JobState.FAILED, "teardown": JobState.SUCCEEDED}
    assert run.state is JobState.FAILED
    resume = client.children(run.jobs["resume"].id)
    assert all(j.error is not None and j.error.code == "dependency_failed" for j in resume)
    assert client.vms(settings.namespace) == []
    status = run_cli(settings, "experiment", "status", str(run_id))
    assert status.returncode == 0 and "teardown" in status.stdout and "1 of 2 jobs failed" in status.stdout


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_experiment_is_valid(path: Path) -> None:
    from orchestrator.model.experiment import load

    exp = load(path.read_text())
    assert exp.vms and exp.steps, path

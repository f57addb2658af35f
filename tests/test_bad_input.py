"""Bad input that used to become a 500 or eat memory (issue 18, item 2), through the real API and CLI.

Three classes: a string that is not UTF-8 (a lone surrogate: JSON's ``"\\ud800"``, or an undecodable
byte of ``argv``) or holds a control character; a range bound too large for a C integer
(``x[0-9999999999999999999999]``); a range too large to expand (``x[1-20000000]``). Each is refused
at validation: 422 naming the field from the API, exit 2 with one line from the CLI, no job made,
and a range's size is counted before it is expanded, so memory stays flat.
"""

from __future__ import annotations

import json
import subprocess
import time
import tracemalloc
from typing import Any

import httpx
import pytest
from redis import Redis

from orchestrator.model.settings import Settings
from orchestrator.services.client import RedisClient
from orchestrator.store import keys

from .apiserver import ApiServer
from .conftest import PYTHON, ROOT, WorkerProc, run_cli, settings_env

HUGE_BOUND = "x[0-9999999999999999999999]"
HUGE_RANGE = "x[1-20000000]"
TOO_MANY = f"target '{HUGE_RANGE}' names more than 10000 VMs"
MB = 1024 * 1024


@pytest.fixture(params=["redis", "http"])
def cli_settings(request: pytest.FixtureRequest, settings: Settings) -> Settings:
    """The CLI talking to Redis, or to the HTTP API (the session's ``api_server``)."""
    if request.param == "http":
        api = request.getfixturevalue("api_server")
        return settings.model_copy(update={"api_url": api.url, "token": api.admin_token})
    return settings


def post(api: ApiServer, path: str, body: Any) -> httpx.Response:
    """POST ``body`` as JSON with ``\\uXXXX`` escapes, so that a lone surrogate goes on the wire as JSON
    allows (httpx's ``json=`` would fail to encode it)."""
    with api.http(api.admin_token) as http:
        return http.post(path, content=json.dumps(body).encode(), headers={"Content-Type": "application/json"})


def refused(response: httpx.Response, field: str | None, *in_message: str) -> dict[str, Any]:
    assert response.status_code == 422, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == "invalid_input", body
    error: dict[str, Any] = body["error"]
    assert error["field"] == field, error
    for text in in_message:
        assert text in error["message"], error
    assert error["hint"], error
    return error


def one_line_refusal(proc: subprocess.CompletedProcess[str], *in_message: str) -> str:
    """Exit 2, nothing on stdout, one ``error:`` line (and its ``hint:`` line) on stderr."""
    assert proc.returncode == 2, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    lines = proc.stderr.splitlines()
    assert not proc.stdout and len(lines) == 2, proc.stderr
    assert lines[0].startswith("error: ") and lines[1].startswith("hint: "), proc.stderr
    for text in in_message:
        assert text in lines[0], lines[0]
    return lines[0]


def job_count(redis: Redis) -> str | None:
    return redis.get(keys.JOB_NEXT)


# -- the API ------------------------------------------------------------------------------------------


def _jobs_body(ns: str, params: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"operations": [{"op": "launch", "namespace": ns, "vm": "b1", "params": params}], **extra}


@pytest.mark.parametrize(("path", "body", "field", "message"), [
    # a tag value, through POST /jobs and through the one-operation route
    ("/jobs", lambda ns: _jobs_body(ns, {"tags": {"role": "\ud800"}}),
     "body.operations.0.params.tags.role", "not valid UTF-8: lone surrogate '\\ud800' at character 0"),
    ("/vms/b1/tag", lambda ns: {"set": {"role": "web\udfff"}},
     "body.params.set.role", "not valid UTF-8: lone surrogate '\\udfff' at character 3"),
    ("/vms/b1/launch", lambda ns: {"host_labels": {"rack": "\udc80"}},
     "body.params.host_labels.rack", "lone surrogate"),
    # a tag key, a label, a path, a key of the body
    ("/jobs", lambda ns: _jobs_body(ns, {"tags": {"\ud800": "v"}}),
     "body.operations.0.params.tags", "key '\\ud800': not valid UTF-8"),
    ("/jobs", lambda ns: _jobs_body(ns, {}, options={"label": "nightly \ud83d"}),
     "body.options.label", "lone surrogate '\\ud83d' at character 8"),
    ("/jobs", lambda ns: _jobs_body(ns, {"image": "/img/\udead.qcow2"}),
     "body.operations.0.params.image", "lone surrogate"),
    ("/jobs", lambda ns: {**_jobs_body(ns, {}), "\ud800": 1}, "body", "key '\\ud800'"),
    # control characters where names and tags allow none
    ("/jobs", lambda ns: _jobs_body(ns, {"tags": {"role": "a\nb"}}),
     "body.operations.0.params.tags.role", "control character '\\n' at character 1"),
    ("/jobs", lambda ns: {"operations": [{"op": "pause", "namespace": ns, "vm": "b1\n"}]},
     "body.operations.0.vm", "control character '\\n'"),
    ("/jobs", lambda ns: _jobs_body(ns, {}, options={"label": "a\x1b[31mred"}),
     "body.options.label", "control character '\\x1b'"),
    ("/vms/b1/tag", lambda ns: {"set": {"role": "x\x7f"}}, "body.params.set.role", "control character '\\x7f'"),
], ids=["tag-value", "tag-route", "host-label", "tag-key", "label", "image", "body-key", "tag-newline",
        "name-newline", "label-escape", "tag-del"])
def test_the_api_refuses_strings_it_cannot_store_naming_the_field(
        api_server: ApiServer, client: RedisClient, redis: Redis, ns: str,
        path: str, body: Any, field: str, message: str) -> None:
    url = "/api/v1/jobs" if path == "/jobs" else f"/api/v1/namespaces/{ns}{path}"
    before = job_count(redis)
    error = refused(post(api_server, url, body(ns)), field, message)
    assert error["message"].startswith(f"{field}: "), error
    assert client.jobs(ns) == [] and job_count(redis) == before


def test_the_api_refuses_a_namespace_body_it_cannot_store(api_server: ApiServer, redis: Redis) -> None:
    before = job_count(redis)
    refused(post(api_server, "/api/v1/namespaces", {"name": "bad-input-ns", "\udc00x": []}), "body", "lone surrogate")
    refused(post(api_server, "/api/v1/namespaces", {"name": "bad-input-ns", "hosts": ["h1\udc00"]}),
            "body.hosts.0", "lone surrogate")
    with api_server.http(api_server.admin_token) as http:
        assert http.get("/api/v1/namespaces/bad-input-ns").status_code == 404
    assert job_count(redis) == before


@pytest.mark.parametrize(("target", "message"), [
    (HUGE_BOUND, f"target '{HUGE_BOUND}' names more than 10000 VMs"),
    (HUGE_RANGE, TOO_MANY),
    ("x[1-5000],y[1-5001]", "names more than 10000 VMs"),
    ("x[1-2-3]", "invalid range '1-2-3' in 'x[1-2-3]'"),  # int("2-3") was a 500 too
    ("x[" + "9" * 64 + "]", "a bound of more than 63 digits"),
])
def test_the_api_refuses_huge_ranges_before_expanding_them(
        api_server: ApiServer, client: RedisClient, redis: Redis, ns: str, target: str, message: str) -> None:
    before = job_count(redis)
    with api_server.http(api_server.admin_token) as http:
        # warm up (the route's first request builds validators); then trace the refusal alone
        refused(http.post(f"/api/v1/namespaces/{ns}/vms/x[3-1]/launch", json={}), "path.target", "empty range")
        tracemalloc.start()  # the API serves from a thread of this process: its allocations are traced too
        try:
            started = time.monotonic()
            response = http.post(f"/api/v1/namespaces/{ns}/vms/{target}/launch", json={"memory_mib": 16})
            elapsed = time.monotonic() - started
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    # the target is a path segment: the error names it as the field path.target
    refused(response, "path.target", message)
    print(f"\n{target[:30]}: refused in {elapsed * 1000:.0f} ms, {peak / 1024:.0f} KiB traced at the peak")
    assert elapsed < 2, f"took {elapsed:.2f}s"
    assert peak < 5 * MB, f"peak {peak / MB:.1f} MB traced while refusing {target}"  # expanded: ~700 MB
    assert client.jobs(ns) == [] and job_count(redis) == before


# -- the CLI ------------------------------------------------------------------------------------------

# An undecodable byte of argv (here 0xff) reaches Python as the lone surrogate '\udcff'.
BAD_ARGV = "\udcff"


@pytest.mark.parametrize(("args", "message"), [
    (("vm", "tag", "b1", f"role=web{BAD_ARGV}"),
     "invalid value for tag 'role': not valid UTF-8: lone surrogate '\\udcff' at character 3"),
    (("vm", "launch", "b1", "--tag", f"role={BAD_ARGV}"), "invalid value for tag 'role': not valid UTF-8"),
    (("vm", "pause", "--tag", f"role={BAD_ARGV}"), "invalid value for tag 'role': not valid UTF-8"),
    (("vm", "launch", "b1", "--tag", f"ro{BAD_ARGV}le=web"), "invalid tag key 'ro\\udcffle'"),
    (("vm", "launch", "b1", "--image", f"/img/{BAD_ARGV}.qcow2"), "invalid --image: not valid UTF-8"),
    (("vm", "launch", f"b{BAD_ARGV}1"), "invalid VM name 'b\\udcff1'"),
    (("vm", "launch", "b1", "--tag", "role=a\nb"), "invalid value for tag 'role': control character '\\n'"),
    (("vm", "launch", "b1\n"), "invalid VM name 'b1\\n'"),
    (("vm", "launch", HUGE_BOUND), f"target '{HUGE_BOUND}' names more than 10000 VMs"),
    (("vm", "launch", HUGE_RANGE), TOO_MANY),
    (("vm", "start", "x[1-2-3]"), "invalid range '1-2-3'"),
    (("vm", "pause", "b1", "--after", "\u00b2"), "bad job id '\u00b2' in --after"),
], ids=["tag", "launch-tag", "select-tag", "tag-key", "image", "name", "tag-newline", "name-newline",
        "huge-bound", "huge-range", "bad-span", "after-digit"])
def test_the_cli_refuses_with_one_line_and_exit_2(
        cluster: list[WorkerProc], client: RedisClient, redis: Redis, cli_settings: Settings,
        args: tuple[str, ...], message: str) -> None:
    before = job_count(redis)
    one_line_refusal(run_cli(cli_settings, *args), message)
    assert client.jobs(cli_settings.namespace) == [] and job_count(redis) == before


def _cli_peak(settings: Settings, target: str) -> tuple[subprocess.CompletedProcess[str], int, float]:
    """The CLI refusing ``vm launch TARGET``, its peak RSS in bytes (``getrusage`` of a parent that waits
    for it alone) and how long it took."""
    measure = ("import resource, subprocess, sys, time\n"
               "t = time.monotonic()\n"
               "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
               "t = time.monotonic() - t\n"
               "sys.stderr.write(p.stderr)\n"
               "print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, t)\n")
    proc = subprocess.run([PYTHON, "-c", measure, PYTHON, "-m", "cli", "--namespace", settings.namespace,
                           "vm", "launch", target], cwd=ROOT, env=settings_env(settings), capture_output=True,
                          text=True, timeout=120)
    code, maxrss_kib, elapsed = proc.stdout.split()
    return (subprocess.CompletedProcess(proc.args, int(code), "", proc.stderr), int(maxrss_kib) * 1024,
            float(elapsed))


def test_the_cli_refuses_a_huge_range_quickly_in_flat_memory(
        cluster: list[WorkerProc], client: RedisClient, redis: Redis, settings: Settings) -> None:
    before = job_count(redis)
    # the baseline: the same command refused for a small range (the CLI's own imports and start-up)
    small, small_rss, small_s = _cli_peak(settings, "x[3-1]")
    one_line_refusal(small, "empty range '3-1'")
    for target, message in [(HUGE_RANGE, TOO_MANY), (HUGE_BOUND, "names more than 10000 VMs")]:
        proc, rss, seconds = _cli_peak(settings, target)
        one_line_refusal(proc, message)
        print(f"\n{target}: peak RSS {rss / MB:.1f} MB (baseline {small_rss / MB:.1f} MB), "
              f"{seconds:.2f}s (baseline {small_s:.2f}s)")
        assert rss - small_rss < 50 * MB, f"{target}: {(rss - small_rss) / MB:.1f} MB more than the baseline"
        assert seconds < small_s + 2, f"{target}: {seconds:.2f}s, baseline {small_s:.2f}s"
    assert client.jobs(settings.namespace) == [] and job_count(redis) == before

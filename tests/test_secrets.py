"""Secrets stay secret: neither the Redis password nor an API token's secret shows anywhere a user or a
Flower login can read.

One cluster whose Redis needs a password (given in a 0600 config file, as ``vmorch up`` does): a worker,
the scheduler, the API (``vmorch api``) and Flower, each a process of its own. Jobs run through the API
with an admin token, one of them fails, a schedule fires. Then everything is collected and searched:

* the command line of every process the test started and of their children (``/proc/<pid>/cmdline``:
  any local user can read it);
* their log files;
* the workers' and the scheduler's config as ``celery inspect conf`` / ``report`` / ``stats`` give it;
* Flower's ``/api/workers`` (with each worker's config), ``/api/tasks`` and its worker page;
* the API's ``/metrics``, ``/api/v1/health`` and its error bodies (a bad request, a 401 for a wrong
  token, a 404);
* ``vmorch doctor --json``, and the output of failing CLI commands (a wrong password, a Redis that is
  not there, a wrong token).

Not searched: the processes' environment. It is how the secrets are passed (``VMORCH_REDIS_URL``,
``VMORCH_TOKEN``, Flower's ``CELERY_BROKER_URL``), and ``/proc/<pid>/environ``, unlike the command line,
is readable only by the process's own user and root. The one output meant to show a secret,
``vmorch token create``'s, is not searched either.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from orchestrator.control.queue import make_app
from orchestrator.model.settings import Settings

from .conftest import PYTHON, free_port, run_cli, running_hosts, settings_env, start_worker, wait_until
from .helpers import process, redis_url_pings

PASSWORD = "s3cret-p@ss/word"  # characters a URL must quote
QUOTED = quote(PASSWORD, safe="")
WRONG_TOKEN = "vmorch-wrong-token-0123456789abcdef"

pytestmark = pytest.mark.slow


class Evidence:
    """Everything collected, by where it came from."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def add(self, where: str, value: Any) -> None:
        text = value if isinstance(value, str) else json.dumps(value, default=repr, sort_keys=True)
        self.items.append((where, text))

    def leaks(self, secrets: dict[str, str]) -> list[str]:
        found = []
        for where, text in self.items:
            for what, secret in secrets.items():
                at = text.find(secret)
                if at >= 0:
                    found.append(f"{what} in {where}: ...{text[max(0, at - 80):at + len(secret) + 20]!r}...")
        return found


def descendants(pids: list[int]) -> list[int]:
    """The processes and all their children, by /proc's parent links."""
    parent: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent[int(entry.name)] = int(stat.rpartition(")")[2].split()[1])
    found, todo = set(pids), list(pids)
    while todo:
        pid = todo.pop()
        for child, ppid in parent.items():
            if ppid == pid and child not in found:
                found.add(child)
                todo.append(child)
    return sorted(found)


def cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def get(url: str, token: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except OSError as exc:  # not listening yet
        return 0, str(exc)


def test_no_password_or_token_secret_in_any_output(tmp_path: Path) -> None:
    port = free_port()
    conf = tmp_path / "redis.conf"
    conf.write_text(f'port {port}\nbind 127.0.0.1\ndir {tmp_path}\nsave ""\nappendonly no\n'
                    f'logfile {tmp_path / "redis.log"}\nrequirepass "{PASSWORD}"\n')
    conf.chmod(0o600)
    url = f"redis://:{QUOTED}@127.0.0.1:{port}/0"
    home = tmp_path / "home"
    home.mkdir()
    settings = Settings(redis_url=url, home=home, namespace="sec", lock_expire=4, heartbeat_interval=0.5,
                        host_down_after=3.0, wait_poll_interval=0.5)
    env = settings_env(settings)
    api_port, flower_port = free_port(), free_port()
    evidence = Evidence()
    with ExitStack() as stack:
        redis = stack.enter_context(process(["redis-server", str(conf)], env, tmp_path / "redis.out"))
        wait_until(lambda: redis_url_pings(url), timeout=10, what="redis-server with a password")
        assert not redis_url_pings(f"redis://127.0.0.1:{port}/0")
        worker = start_worker(settings, "sec1")
        stack.enter_context(running_hosts(settings, worker))
        scheduler = stack.enter_context(process(
            [PYTHON, "-m", "cli", "scheduler"],
            {**env, "VMORCH_SCHEDULER_LOCK_TIMEOUT": "3", "VMORCH_SCHEDULER_TICK": "0.5"}, home / "scheduler.log"))
        api = stack.enter_context(process([PYTHON, "-m", "cli", "api", "--port", str(api_port)], env,
                                          home / "api.log"))
        flower = stack.enter_context(process(
            [str(Path(PYTHON).parent / "celery"), "flower", f"--port={flower_port}", "--address=127.0.0.1"],
            # the broker URL from the environment: on the command line ('celery --broker URL') anyone sees it
            {**env, "CELERY_BROKER_URL": url, "FLOWER_UNAUTHENTICATED_API": "true"}, home / "flower.log"))
        api_url, flower_url = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{flower_port}"

        made = run_cli(settings, "--json", "token", "create", "sec-admin", "--role", "admin", "--namespace", "*")
        assert made.returncode == 0, made.stderr
        secret = json.loads(made.stdout)["secret"]
        over_http = settings.model_copy(update={"api_url": api_url, "token": secret})
        wait_until(lambda: get(f"{api_url}/api/v1/health")[0] == 200, timeout=20, what="the API")
        wait_until(lambda: get(f"{flower_url}/api/workers")[0] == 200, timeout=30, what="Flower")

        # Work through the API: jobs that succeed, one that fails, a schedule that fires.
        outputs = [run_cli(over_http, "vm", "launch", "v1", "--memory", "16", "--disk", "0", "--wait"),
                   run_cli(over_http, "vm", "kill", "v1", "--wait")]
        assert all(p.returncode == 0 for p in outputs), [p.stderr for p in outputs]
        failed = run_cli(over_http, "vm", "pause", "v1", "--wait")  # a shut-off VM: the job fails
        assert failed.returncode != 0 and "failed" in failed.stdout + failed.stderr, failed.stdout + failed.stderr
        outputs.append(failed)
        added = run_cli(over_http, "schedule", "add", "tagger", "--every", "1s", "--", "vm", "tag", "v1", "k=v")
        assert added.returncode == 0, added.stderr
        outputs.append(added)
        wait_until(lambda: '"fired"' in run_cli(over_http, "--json", "schedule", "show", "tagger").stdout,
                   timeout=30, what="the schedule to fire")
        outputs.append(run_cli(over_http, "schedule", "remove", "tagger"))
        for i, p in enumerate(outputs):
            evidence.add(f"CLI command #{i} {p.args[3:]} (stdout+stderr)", p.stdout + p.stderr)

        # Config dumps, as 'celery inspect conf' and 'celery inspect report' print them.
        app = make_app(settings)
        inspect = app.control.inspect(timeout=3)
        confs = inspect.conf(with_defaults=True) or {}
        assert {n.split("@")[0] for n in confs} >= {"sec1", "scheduler"}, f"not every node answered: {list(confs)}"
        for name, reply in confs.items():
            evidence.add(f"'celery inspect conf' of {name}", reply)
        for method in ("report", "stats", "registered", "active_queues"):
            for name, reply in (getattr(inspect, method)() or {}).items():
                evidence.add(f"'celery inspect {method}' of {name}", reply)
        app.close()

        # Flower: what a Flower login shows.
        status, workers = get(f"{flower_url}/api/workers?refresh=1")
        assert status == 200 and '"conf"' in workers, workers[:500]
        evidence.add("Flower /api/workers?refresh=1", workers)
        for name in json.loads(workers):
            status, page = get(f"{flower_url}/worker/{name}")
            evidence.add(f"Flower's page /worker/{name} (HTTP {status})", page)
        evidence.add("Flower /api/tasks", get(f"{flower_url}/api/tasks")[1])
        evidence.add("Flower /", get(f"{flower_url}/")[1])

        # The API: metrics and error bodies.
        evidence.add("API /metrics", get(f"{api_url}/metrics")[1])
        evidence.add("API / (the dashboard)", get(f"{api_url}/")[1])
        for path in ("/api/v1/health", "/api/v1/whoami"):
            evidence.add(f"API {path}", get(f"{api_url}{path}", secret)[1])
        with httpx.Client(base_url=api_url, timeout=10) as http:
            for what, response in [
                ("a 401 for a wrong token", http.get("/api/v1/namespaces/sec/vms",
                                                     headers={"Authorization": f"Bearer {WRONG_TOKEN}"})),
                ("a 401 for no token", http.get("/api/v1/namespaces/sec/vms")),
                ("a 422 for a bad request", http.post("/api/v1/jobs", content=b'{"bogus": ',
                                                      headers={"Authorization": f"Bearer {secret}",
                                                               "Content-Type": "application/json"})),
                ("a 404", http.get("/api/v1/jobs/987654321", headers={"Authorization": f"Bearer {secret}"})),
            ]:
                assert response.status_code >= 400, (what, response.status_code)
                evidence.add(f"API error body: {what} (HTTP {response.status_code})", response.text)

        # The CLI: doctor, and commands that fail.
        doctor = run_cli(settings, "--json", "doctor")
        evidence.add("vmorch --json doctor", doctor.stdout + doctor.stderr)
        for what, variant in [
            ("a wrong Redis password", settings.model_copy(
                update={"redis_url": f"redis://:wrong-{QUOTED}-wrong@127.0.0.1:{port}/0"})),
            ("a Redis that is not there", settings.model_copy(
                update={"redis_url": f"redis://:{QUOTED}@127.0.0.1:{free_port()}/0"})),
            ("a wrong token", over_http.model_copy(update={"token": WRONG_TOKEN})),
        ]:
            proc = run_cli(variant, "vm", "list")
            assert proc.returncode != 0, (what, proc.stdout)
            evidence.add(f"'vmorch vm list' with {what} (stdout+stderr)", proc.stdout + proc.stderr)
        wrong = run_cli(settings.model_copy(update={"redis_url": f"redis://:wrong-{QUOTED}-wrong@127.0.0.1:{port}/0"}),
                        "vm", "list")
        assert "***" in wrong.stderr, f"the URL of a refused password is not shown redacted: {wrong.stderr}"

        # Command lines, while every process still runs.
        started = [redis.pid, worker.proc.pid, scheduler.pid, api.pid, flower.pid]
        assert all(p.poll() is None for p in (redis, worker.proc, scheduler, api, flower))
        for pid in descendants(started):
            evidence.add(f"the command line of pid {pid} ({cmdline(pid)[:60]})", cmdline(pid))
        assert run_cli(settings, "vm", "delete", "v1", "--wait").returncode == 0
    # Logs, once every process has written its last line.
    for log in [*home.glob("*.log"), tmp_path / "redis.log"]:
        evidence.add(f"the log {log.name}", log.read_text(errors="replace"))
    assert {where.split(" ")[0] for where, _ in evidence.items} >= {"CLI", "'celery", "Flower", "API", "the"}

    leaks = evidence.leaks({"the Redis password": PASSWORD, "the Redis password (URL-quoted)": QUOTED,
                            "the admin token's secret": secret, "the wrong token": WRONG_TOKEN})
    assert not leaks, "secrets leaked:\n" + "\n".join(leaks)


@pytest.mark.parametrize("url", [
    f"redis://:{QUOTED}@127.0.0.1:6379/0",
    f"rediss://:{QUOTED}@127.0.0.1:6380/0?ssl_cert_reqs=none",
    f"sentinel://:{QUOTED}@10.0.0.1:26379,10.0.0.2:26379/0?master=main&sentinel_password={QUOTED}",
])
def test_config_dumps_mask_every_form_of_redis_url(url: str, tmp_path: Path) -> None:
    """What 'celery inspect conf' and 'report' print, for the workers' app and the scheduler's, for each URL form."""
    from orchestrator.services.schedules import redbeat_app

    settings = Settings(redis_url=url, home=tmp_path)
    for app in (make_app(settings), redbeat_app(settings)):
        dumps = json.dumps(app.conf.table(with_defaults=True), default=repr) + app.conf.humanize(with_defaults=True)
        assert PASSWORD not in dumps and QUOTED not in dumps, dumps


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_log_lines_never_carry_a_url_password(fmt: str) -> None:
    """What a library or an exception quotes (a URL with its password) is scrubbed from every log line."""
    import io
    import logging

    from orchestrator.model import logs

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.formatter(fmt))
    log = logging.getLogger("test_secrets.scrub")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("cannot connect to redis://:%s@10.0.0.1:6379/0", QUOTED)
        log.warning("sentinel://:%s@h1:26379,h2:26379/0?master=m&sentinel_password=%s", QUOTED, QUOTED)
        try:
            raise ConnectionError(f"rediss://admin:{QUOTED}@h:6380/0 refused")
        except ConnectionError:
            log.exception("failed")
    finally:
        log.removeHandler(handler)
    out = stream.getvalue()
    assert QUOTED not in out and PASSWORD not in out, out
    assert "redis://:***@10.0.0.1:6379/0" in out and "rediss://admin:***@h:6380/0" in out, out

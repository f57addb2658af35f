"""Metrics appear and move when jobs run: a worker's own port, and the cluster's at the API's /metrics."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import threading
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.control.queue import RUN_TASK, make_app
from orchestrator.edge.clustermetrics import asgi_app
from orchestrator.model.operation import Op
from orchestrator.model.settings import Settings
from orchestrator.services.client import RedisClient

from .conftest import PYTHON, ROOT, WorkerProc, free_port, ops, running_hosts, settings_env, start_worker, wait_until

if TYPE_CHECKING:
    from celery import Celery


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus's text format; None if there is no such series."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return None


def scrape_worker(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def scrape_cluster(settings: Settings) -> str:
    app = asgi_app(settings)

    async def get() -> str:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as c:
            r = await c.get("/metrics")
            assert r.status_code == 200
            return r.text

    return asyncio.run(get())


@contextmanager
def task_events(app: Celery) -> Iterator[dict[str, dict[str, Any]]]:
    """Celery's task events as a receiver in a thread of this process captures them: {task id: {event type:
    event}}, filled in as they come. The receiver listens once this is entered, and stops at its end."""
    seen: dict[str, dict[str, Any]] = defaultdict(dict)
    ready = threading.Event()

    def on_event(event: dict[str, Any]) -> None:
        if "uuid" in event:
            seen[event["uuid"]][event["type"]] = event

    with app.connection_for_read() as conn:
        receiver = app.events.Receiver(conn, handlers={"*": on_event})

        def capture() -> None:
            ready.set()
            receiver.capture(limit=None, timeout=None, wakeup=False)

        thread = threading.Thread(target=capture, daemon=True)
        thread.start()
        ready.wait(5)
        try:
            yield seen
        finally:
            receiver.should_stop = True
            thread.join(timeout=10)


def test_worker_metrics_move_when_jobs_run(base_settings: Settings, settings: Settings, client: RedisClient) -> None:
    port = free_port()
    ns = settings.namespace
    with running_hosts(base_settings, start_worker(base_settings, "met1", args=["--metrics-port", str(port)])):
        before = scrape_worker(port)
        assert sample(before, "vmorch_jobs_finished_total", op="launch") is None
        jobs = client.submit(ops(Op.LAUNCH, ns, "m1", memory_mib=64, host="met1"))
        jobs += client.submit(ops(Op.PAUSE, ns, "m1"))
        jobs += client.submit(ops(Op.KILL, ns, "m1"))
        jobs += client.submit(ops(Op.PAUSE, ns, "m1"))  # fails: the VM is shut off
        done = client.wait([j.id for j in jobs], timeout=30)
        assert [j.state.value for j in done] == ["succeeded", "succeeded", "succeeded", "failed"]

        def counted() -> bool:
            # A worker counts a job and its lock hold just after it published the job's final state.
            now = scrape_worker(port)
            return sample(now, "vmorch_jobs_finished_total", op="pause", state="failed") == 1 and \
                (sample(now, "vmorch_lock_hold_seconds_count", level="vm") or 0) >= 4

        wait_until(counted, timeout=5, what="the last job and lock release counted")
        after = scrape_worker(port)
        assert sample(after, "vmorch_jobs_finished_total", op="launch", state="succeeded") == 1
        assert sample(after, "vmorch_jobs_finished_total", op="pause", state="succeeded") == 1
        assert sample(after, "vmorch_jobs_finished_total", op="pause", state="failed") == 1
        assert sample(after, "vmorch_jobs_started_total", op="kill") == 1
        assert sample(after, "vmorch_job_queued_seconds_count", op="pause") == 2
        assert sample(after, "vmorch_job_run_seconds_count", op="kill", state="succeeded") == 1
        # every job held its VM's lock once; the launch also the host lock (level "other")
        assert (sample(after, "vmorch_lock_wait_seconds_count", level="vm") or 0) >= 4
        assert (sample(after, "vmorch_lock_hold_seconds_count", level="vm") or 0) >= 4
        assert (sample(after, "vmorch_lock_hold_seconds_sum", level="vm") or 0) > 0
        assert sample(after, "vmorch_fencing_rejections_total") == 0
        client.wait([j.id for j in client.submit(ops(Op.DELETE, ns, "m1"))], timeout=30)


def test_cluster_metrics_show_hosts_queues_and_waiting_jobs(base_settings: Settings, settings: Settings,
                                                          client: RedisClient) -> None:
    ns = settings.namespace
    with running_hosts(base_settings, start_worker(base_settings, "met2")) as (worker,):
        client.wait([j.id for j in client.submit(ops(Op.LAUNCH, ns, "q1", memory_mib=64, host="met2"))], timeout=30)
        up = scrape_cluster(settings)
        assert sample(up, "vmorch_redis_up") == 1
        assert sample(up, "vmorch_host_up", host="met2") == 1
        assert sample(up, "vmorch_host_libvirt_up", host="met2") == 1
        assert sample(up, "vmorch_host_vms", host="met2") == 1
        assert abs(sample(up, "vmorch_host_clock_offset_seconds", host="met2") or 0) < 1
        assert sample(up, "vmorch_queue_depth", host="met2") == 0
        assert (sample(up, "vmorch_jobs_submitted_total") or 0) >= 1
        worker.stop()
    # The host is down: jobs for its VM wait in its mailbox and their wake-ups in its Celery queue.
    waiting = client.submit(ops(Op.PAUSE, ns, "q1") + ops(Op.RESUME, ns, "q1"))
    down = scrape_cluster(settings)
    assert sample(down, "vmorch_host_up", host="met2") == 0
    assert sample(down, "vmorch_queue_depth", host="met2") == 2
    assert sample(down, "vmorch_jobs", host="met2", op="pause", state="queued") == 1
    assert sample(down, "vmorch_jobs", host="met2", op="resume", state="queued") == 1
    # The host comes back (a new test hypervisor: the VM is missing now); its jobs run and the gauges drop.
    with running_hosts(base_settings, start_worker(base_settings, "met2")):
        client.wait([j.id for j in waiting], timeout=30)
        wait_until(lambda: sample(scrape_cluster(settings), "vmorch_queue_depth", host="met2") == 0,
                   what="the queue to drain")
        back = scrape_cluster(settings)
        assert sample(back, "vmorch_host_up", host="met2") == 1
        assert sample(back, "vmorch_jobs", host="met2", op="pause") is None
        client.wait([j.id for j in client.submit(ops(Op.DELETE, ns, "q1"))], timeout=30)


def test_cluster_metrics_say_redis_is_down_instead_of_failing(tmp_path: Path) -> None:
    text = scrape_cluster(Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0", home=tmp_path))
    assert sample(text, "vmorch_redis_up") == 0


def test_celery_task_events_are_sent_while_a_monitor_asks_for_them(cluster: list[WorkerProc], settings: Settings,
                                                                   client: RedisClient) -> None:
    """What Flower and 'celery events' consume: received/succeeded from the worker, once a monitor turned them on
    (they cost a third of a worker's busy time while nobody watches). Never task-sent (see queue.py)."""
    app = make_app(settings)

    def ours() -> list[dict[str, Any]]:
        return [e for e in seen.values() if e.get("task-received", {}).get("name") == RUN_TASK]

    def run_one(op: Op, **params: object) -> None:
        client.wait([j.id for j in client.submit(ops(op, settings.namespace, "ev1", **params))], timeout=30)

    with task_events(app) as seen:
        try:
            run_one(Op.LAUNCH, memory_mib=64)
            for _ in range(3):
                run_one(Op.START)
            time.sleep(0.5)  # an absence has no condition to wait for: events come within this of a job's end
            assert ours() == [], "task events while no monitor asked for them"
            app.control.enable_events()  # what Flower does, and 'celery control enable_events'
            for _ in range(10):  # the workers' control threads take the broadcast a moment later
                run_one(Op.START)
                try:
                    wait_until(lambda: any("task-succeeded" in e for e in ours()), timeout=3,
                               what="task events of vmorch.run")
                    break
                except AssertionError:
                    continue
            event = next(e for e in ours() if "task-succeeded" in e)
            assert event["task-received"]["hostname"].split("@")[0] in ("t1", "t2"), event["task-received"]
            assert "task-sent" not in event  # a second broker write per job on the submitter's path
        finally:
            app.control.disable_events()


def test_flower_sees_vmorch_tasks_and_their_jobs_outcome(cluster: list[WorkerProc], settings: Settings,
                                                         client: RedisClient) -> None:
    """A job's task shows in Flower with the job's outcome: SUCCESS and the job's state as its result, or
    FAILURE with the job's error when the job failed (the message is not retried for it)."""
    port = free_port()
    flower = subprocess.Popen(
        [str(Path(PYTHON).parent / "celery"), "flower", f"--port={port}", "--address=127.0.0.1"],
        cwd=ROOT,
        # the broker URL from the environment, as the README says: a command line is readable by every user
        env={**settings_env(settings), "CELERY_BROKER_URL": settings.resolved_redis_url(),
             "FLOWER_UNAUTHENTICATED_API": "true"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def api(path: str) -> Any:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                return json.loads(r.read())

        def flower_up() -> bool:
            try:
                api("/api/tasks")
                return True
            except OSError:
                return False

        def task_of(job_id: int) -> dict[str, Any] | None:
            args = str([settings.namespace, "fl1", job_id])
            return next((t for t in api("/api/tasks").values() if t.get("name") == RUN_TASK
                         and t.get("args") == args and t.get("state") in ("SUCCESS", "FAILURE")), None)

        wait_until(flower_up, timeout=20, what="Flower's API")
        client.wait([j.id for j in client.submit(ops(Op.LAUNCH, settings.namespace, "fl1", memory_mib=64))], timeout=30)
        # Flower's API answers a moment before its event receiver listens: submit until one is seen.
        for _ in range(10):
            job = client.submit(ops(Op.START, settings.namespace, "fl1"))[0]  # a no-op on a running VM
            client.wait([job.id], timeout=30)
            try:
                wait_until(lambda j=job.id: task_of(j) is not None, timeout=3, what="Flower to list a job's task")
                break
            except AssertionError:
                continue
        else:
            raise AssertionError(f"Flower never listed our tasks; it lists: {api('/api/tasks')}")
        ok = task_of(job.id)
        assert ok is not None and ok["state"] == "SUCCESS" and "succeeded" in str(ok["result"]), ok

        client.wait([j.id for j in client.submit(ops(Op.KILL, settings.namespace, "fl1"))], timeout=30)
        failing = client.submit(ops(Op.PAUSE, settings.namespace, "fl1"))[0]  # the VM is shut off: the job fails
        [done] = client.wait([failing.id], timeout=30)
        assert done.state.value == "failed" and done.error is not None
        wait_until(lambda: task_of(failing.id) is not None, timeout=10, what="Flower to list the failed job's task")
        bad = task_of(failing.id)
        assert bad is not None and bad["state"] == "FAILURE", bad
        assert f"job {failing.id} failed: {done.error.code}" in str(bad["exception"]), bad
        assert not bad.get("retries"), bad  # a report, not an error to retry: the message was acked once
    finally:
        flower.terminate()
        flower.wait(timeout=10)


def test_task_events_stop_when_no_monitor_asks_any_more(base_settings: Settings, settings: Settings,
                                                       client: RedisClient) -> None:
    """A worker turns task events off again once nobody asked for them for VMORCH_TASK_EVENTS_LEASE seconds
    (Flower asks every 5 s; the lease is 300 s by default, 2 s here)."""
    worker = start_worker(base_settings, "lease1", env={"VMORCH_TASK_EVENTS_LEASE": "2"})
    app = make_app(settings)

    def events_of(job_id: int) -> list[str]:
        args = str([settings.namespace, "ls1", job_id])
        return [t for e in seen.values() if e.get("task-received", {}).get("args") == args for t in e]

    def run_one(op: Op) -> int:
        [job] = client.submit(ops(op, settings.namespace, "ls1"))
        client.wait([job.id], timeout=30)
        return job.id

    with running_hosts(base_settings, worker), task_events(app) as seen:
        node = [f"lease1@{socket.gethostname()}"]  # not the session's workers: their lease is the default
        try:
            client.wait([j.id for j in client.submit(ops(Op.LAUNCH, settings.namespace, "ls1", memory_mib=16,
                                                          host="lease1"))], timeout=30)
            app.control.enable_events(destination=node)
            for _ in range(10):  # the worker's control thread takes the broadcast a moment later
                job_id = run_one(Op.START)
                try:
                    wait_until(lambda j=job_id: "task-succeeded" in events_of(j), timeout=2, what="task events")
                    break
                except AssertionError:
                    continue
            else:
                raise AssertionError("no task events after enable_events")
            # A monitor that keeps asking keeps them on past the lease.
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                app.control.enable_events(destination=node)
                time.sleep(0.5)
            job_id = run_one(Op.START)
            wait_until(lambda: "task-succeeded" in events_of(job_id), timeout=3, what="task events while asked")
            # Nobody asks any more: off within the lease and one check (a half second here).
            wait_until(lambda: "task events off" in worker.log.read_text(errors="replace"), timeout=10,
                       what="the worker to turn task events off")
            job_id = run_one(Op.START)
            time.sleep(0.5)  # an absence has no condition to wait for: events come within this of a job's end
            assert events_of(job_id) == [], "task events after the lease ran out"
            client.wait([j.id for j in client.submit(ops(Op.DELETE, settings.namespace, "ls1"))], timeout=30)
        finally:
            app.control.disable_events(destination=node)

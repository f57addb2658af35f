"""Stopping a local cluster in reverse order of need: workers, their QEMU domains, Redis."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Sequence

from redis.exceptions import RedisError

from orchestrator.localcluster.environment import OnEvent, child_env, own_command
from orchestrator.localcluster.home import Paths
from orchestrator.localcluster.plan import is_embedded
from orchestrator.localcluster.processes import Process, Recorded, terminate, wait_dead
from orchestrator.localcluster.state import load_state
from orchestrator.localcluster.timeouts import DOMAINS_STOP_TIMEOUT, DOWN_TIMEOUT, WORKER_STOP_TIMEOUT
from orchestrator.model.settings import Settings
from orchestrator.store.redisconn import connect


def stop_all(settings: Settings, workers: Sequence[Process], hosts: Sequence[tuple[str, str]],
             redis_url: str, redis: Process | None, on_event: OnEvent) -> None:
    """Stop a cluster's processes in reverse order of need: the API and workers, QEMU, Redis."""
    terminate(workers, WORKER_STOP_TIMEOUT, on_event)
    _destroy_domains(settings, hosts, on_event)
    if redis is not None:
        _stop_redis(redis_url, redis, on_event)


def stop_leftovers(settings: Settings, paths: Paths, on_event: OnEvent) -> None:
    """Stop what a dead supervisor left running (by recorded PIDs), then forget it."""
    state = load_state(paths)
    if state is not None:
        hosts = [(h.name, h.libvirt_uri) for h in state.info.hosts]
        stop_all(settings, [*state.scheduler(), *state.api(), *state.workers()], hosts, state.info.redis_url,
                 state.redis(), on_event)
    paths.state.unlink(missing_ok=True)


def stop_supervisor(settings: Settings, paths: Paths, supervisor: Recorded, on_event: OnEvent) -> None:
    on_event(f"stopping the local cluster under {paths.home} (supervisor pid {supervisor.pid})")
    supervisor.signal(signal.SIGTERM)
    if not wait_dead([supervisor], DOWN_TIMEOUT):
        on_event(f"the supervisor did not stop within {DOWN_TIMEOUT:.0f}s: killing it and what it started")
        supervisor.signal(signal.SIGKILL)
        wait_dead([supervisor], 5.0)
    # A supervisor that stopped cleanly removed cluster.json; otherwise its children may still run.
    stop_leftovers(settings, paths, on_event)
    on_event("local cluster stopped")


def _destroy_domains(settings: Settings, hosts: Sequence[tuple[str, str]], on_event: OnEvent) -> None:
    """Power off the QEMU domains of embedded hosts, whose workers have exited.

    QEMU processes outlive their worker. Definitions are persistent and stay, so the next
    ``up`` finds the VMs shut off. libvirt allows one embedded root per process for the
    process's lifetime, so each host gets a short-lived helper process of its own
    (``destroy-domains`` in ``__main__.py``).
    """
    helpers = []
    for name, uri in hosts:
        if is_embedded(uri):
            argv = own_command("destroy-domains", "--host", name, "--libvirt-uri", uri)
            helpers.append((name, subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                                   stderr=subprocess.PIPE, env=child_env(settings),
                                                   cwd=settings.home)))
    for name, helper in helpers:
        try:
            out, err = helper.communicate(timeout=DOMAINS_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            helper.kill()
            out, err = helper.communicate()
        count = out.decode(errors="replace").strip()
        if helper.returncode != 0:
            on_event(f"could not stop the QEMU domains of {name}: {err.decode(errors='replace').strip()[-2000:]}")
        elif count != "0":
            on_event(f"{name}: powered off {count} running VM(s)")


def _stop_redis(url: str, redis: Process, on_event: OnEvent) -> None:
    if not redis.alive():
        return
    try:
        # SHUTDOWN flushes and fsyncs the AOF before exiting: nothing accepted is lost.
        with connect(url, retries=0) as client:
            client.shutdown()
    except (RedisError, OSError) as exc:
        on_event(f"Redis SHUTDOWN failed ({exc}): sending SIGTERM")
    if not wait_dead([redis], 10.0):
        terminate([redis], 5.0, on_event)

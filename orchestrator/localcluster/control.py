"""``up``, ``down`` and ``status``: what ``vmorch up`` and ``vmorch down`` call."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

from orchestrator.localcluster.environment import OnEvent, child_env, own_command, redis_server, resolved
from orchestrator.localcluster.home import Paths, prepare_home, purge_home
from orchestrator.localcluster.homelock import already_running, running_supervisor
from orchestrator.localcluster.plan import plan_hosts
from orchestrator.localcluster.processes import Recorded, keep_reaping, start_ticks
from orchestrator.localcluster.readiness import wait_ready
from orchestrator.localcluster.state import ClusterInfo, load_state
from orchestrator.localcluster.stopping import stop_leftovers, stop_supervisor
from orchestrator.localcluster.supervisor import Supervisor
from orchestrator.model.errors import ClusterUnavailable, InvalidInput
from orchestrator.model.settings import Settings


def up(settings: Settings, *, hosts: int = 2, libvirt_uri: str | None = None, api_port: int | None = None,
       detach: bool = False, on_event: OnEvent = print) -> ClusterInfo:
    """Start a local cluster under ``settings.home``.

    Foreground (``detach=False``): supervise in this process until SIGINT/SIGTERM, then stop
    everything and return. Detached: start the supervisor as its own session and return once
    every host heartbeats.
    """
    if hosts < 1:
        raise InvalidInput(f"--hosts must be at least 1, not {hosts}")
    redis_server()
    settings = resolved(settings)
    paths = Paths(settings.home)
    prepare_home(paths)
    if running_supervisor(paths) is not None:
        raise already_running(paths)
    if paths.state.exists():
        _clean_up_after_crash(settings, paths, on_event)
    plan = plan_hosts(settings.home, hosts, libvirt_uri, on_event)
    if not detach:
        return Supervisor(settings, plan, api_port=api_port, on_event=on_event).run()
    return _start_detached(settings, paths, plan, api_port, on_event)


def down(settings: Settings, *, purge: bool = False, on_event: OnEvent = print) -> None:
    """Stop the local cluster under ``settings.home``; with ``purge``, delete its directory too."""
    settings = resolved(settings)
    paths = Paths(settings.home)
    supervisor = running_supervisor(paths)
    if supervisor is not None:
        stop_supervisor(settings, paths, supervisor, on_event)
    elif paths.state.exists():
        _clean_up_after_crash(settings, paths, on_event)
    else:
        on_event(f"no local cluster is running under {paths.home}")
    if purge:
        purge_home(paths, on_event)


def status(settings: Settings) -> ClusterInfo | None:
    """The running local cluster under ``settings.home``, or None."""
    paths = Paths(resolved(settings).home)
    if running_supervisor(paths) is None:
        return None
    state = load_state(paths)
    return state.info if state else None


def _clean_up_after_crash(settings: Settings, paths: Paths, on_event: OnEvent) -> None:
    on_event(f"cleaning up after a local cluster under {paths.home} that did not stop cleanly")
    stop_leftovers(settings, paths, on_event)


def _start_detached(settings: Settings, paths: Paths, plan: Sequence[tuple[str, str]], api_port: int | None,
                    on_event: OnEvent) -> ClusterInfo:
    argv = own_command("supervise")
    for name, uri in plan:
        argv += ["--host", f"{name}={uri}"]
    if api_port is not None:
        argv += ["--api-port", str(api_port)]
    with paths.supervisor_log.open("ab") as log:
        # A session of its own: it survives this process and the terminal it runs in.
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=child_env(settings), cwd=paths.home, start_new_session=True)
    keep_reaping(proc)
    ticks = start_ticks(proc.pid)
    on_event(f"started the supervisor (pid {proc.pid}); waiting for {len(plan)} hosts")
    try:
        return wait_ready(settings, paths, proc)
    except ClusterUnavailable:
        # A cluster that failed to start must not linger. Only while the supervisor runs is
        # the home ours: one that exited early may have lost the lock to another cluster.
        if proc.poll() is None:
            stop_supervisor(settings, paths, Recorded(f"supervisor (pid {proc.pid})", proc.pid, ticks), on_event)
        raise

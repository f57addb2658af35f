"""Whether a local cluster is up: every host heartbeats from the worker the supervisor started."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Mapping, Sequence

from redis.exceptions import RedisError

from orchestrator.localcluster.api import api_answers
from orchestrator.localcluster.home import Paths
from orchestrator.localcluster.processes import describe_exit, tail
from orchestrator.localcluster.state import ClusterInfo, load_state
from orchestrator.localcluster.timeouts import POLL, READY_TIMEOUT
from orchestrator.model.errors import ClusterUnavailable
from orchestrator.model.records import HostState
from orchestrator.model.settings import Settings
from orchestrator.store.jobstore import Store
from orchestrator.store.redisconn import connect


def hosts_up(redis_url: str, expected: Mapping[str, int], down_after: float) -> set[str]:
    """The hosts of ``expected`` (name -> worker pid) that heartbeat from that very worker."""
    try:
        with connect(redis_url, retries=0) as client:
            hosts = Store(client, host_down_after=down_after).hosts()
    except (RedisError, OSError):
        return set()
    # A host record survives its worker (AOF): only a heartbeat from the current pid counts.
    return {h.name for h in hosts if h.state is HostState.UP and expected.get(h.name) == h.pid}


def wait_ready(settings: Settings, paths: Paths, proc: subprocess.Popen[bytes]) -> ClusterInfo:
    """The cluster that supervisor ``proc`` runs, once every host is up."""
    deadline = time.monotonic() + READY_TIMEOUT
    missing: list[str] = []
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            raise ClusterUnavailable(
                f"the local cluster's supervisor exited during start-up ({describe_exit(code)}); "
                f"last lines of {paths.supervisor_log}:\n{tail(paths.supervisor_log)}",
                hint=f"see the logs in {paths.logs}")
        state = load_state(paths)
        if state is not None and state.info.supervisor_pid == proc.pid:
            expected = {h.name: h.pid for h in state.info.hosts}
            up_now = hosts_up(state.info.redis_url, expected, settings.host_down_after)
            missing = sorted(set(expected) - up_now)
            if state.info.api_url and not api_answers(state.info.api_url):
                missing.append("API")
            if not missing:
                return state.info
        time.sleep(POLL)
    raise ClusterUnavailable(f"not up within {READY_TIMEOUT:.0f}s: {_not_up_report(paths, missing)}",
                             hint=f"see the logs in {paths.logs}")


def _not_up_report(paths: Paths, missing: Sequence[str]) -> str:
    if not missing:
        return f"the supervisor did not record the cluster; last lines of {paths.supervisor_log}:\n" + \
            tail(paths.supervisor_log)
    parts = [f"the API never answered; last lines of {paths.logs / 'api.log'}:\n{tail(paths.logs / 'api.log')}"
             if name == "API" else
             f"host {name} never heartbeat; last lines of {paths.host_log(name)}:\n{tail(paths.host_log(name))}"
             for name in missing]
    return "\n".join(parts)

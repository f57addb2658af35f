"""``<home>/cluster.json``: the running cluster, as every ``vmorch`` command with that home finds it."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from orchestrator.localcluster.home import CLUSTER_FILE, Paths
from orchestrator.localcluster.processes import Recorded


class ClusterHost(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    libvirt_uri: str
    pid: int
    restarts: int = 0


class ClusterInfo(BaseModel):
    """The running local cluster, as recorded in ``<home>/cluster.json``."""

    model_config = ConfigDict(frozen=True)

    home: Path
    redis_url: str
    redis_pid: int
    supervisor_pid: int
    hosts: tuple[ClusterHost, ...]
    started_at: datetime
    api_port: int | None = None
    #: the HTTP API (``VMORCH_API_URL``); its admin token is in ``<home>/token``
    api_url: str | None = None
    api_pid: int | None = None
    logs: Path
    #: the 'vmorch scheduler' process (celery beat with RedBeat)
    scheduler_pid: int | None = None


@dataclass(frozen=True)
class State:
    """cluster.json: the public ClusterInfo plus the start ticks that prove a PID is still ours."""

    info: ClusterInfo
    ticks: Mapping[int, int | None]

    def proc(self, name: str, pid: int) -> Recorded:
        return Recorded(name, pid, self.ticks.get(pid))

    def supervisor(self) -> Recorded:
        return self.proc(f"supervisor (pid {self.info.supervisor_pid})", self.info.supervisor_pid)

    def workers(self) -> list[Recorded]:
        return [self.proc(f"{h.name} worker (pid {h.pid})", h.pid) for h in self.info.hosts]

    def scheduler(self) -> list[Recorded]:
        pid = self.info.scheduler_pid
        return [self.proc(f"scheduler (pid {pid})", pid)] if pid else []

    def api(self) -> list[Recorded]:
        pid = self.info.api_pid
        return [self.proc(f"API (pid {pid})", pid)] if pid else []

    def redis(self) -> Recorded:
        return self.proc(f"redis-server (pid {self.info.redis_pid})", self.info.redis_pid)


def write_state(paths: Paths, state: State) -> None:
    data = state.info.model_dump(mode="json")
    data["proc_start_ticks"] = {str(pid): ticks for pid, ticks in state.ticks.items()}
    # Readers (every vmorch command) must never see a half-written file: write, then rename.
    tmp = paths.state.with_name(f".{CLUSTER_FILE}.{os.getpid()}.tmp")
    # 0600: the Redis URL in it carries the cluster's password.
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, paths.state)


def load_state(paths: Paths) -> State | None:
    """cluster.json, or None when it is missing or unreadable (then nothing in it can be trusted)."""
    try:
        data = json.loads(paths.state.read_text())
        info = ClusterInfo.model_validate(data)
        ticks = {int(pid): t for pid, t in data.get("proc_start_ticks", {}).items()}
    except (OSError, ValueError, ValidationError, AttributeError):
        return None
    return State(info, ticks)

"""The directory a local cluster lives in (``VMORCH_HOME``) and the files in it."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from orchestrator.localcluster.environment import OnEvent
from orchestrator.model.errors import InvalidInput

CLUSTER_FILE = "cluster.json"
LOCK_FILE = "supervisor.lock"
MARKER_FILE = ".vmorch-home"


@dataclass(frozen=True)
class Paths:
    home: Path

    @property
    def state(self) -> Path:
        return self.home / CLUSTER_FILE

    @property
    def lock(self) -> Path:
        return self.home / LOCK_FILE

    @property
    def marker(self) -> Path:
        return self.home / MARKER_FILE

    @property
    def token(self) -> Path:
        """The local admin token of the API (mode 0600)."""
        return self.home / "token"

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    @property
    def redis_dir(self) -> Path:
        return self.home / "redis"

    @property
    def supervisor_log(self) -> Path:
        return self.logs / "supervisor.log"

    def host_log(self, host: str) -> Path:
        return self.logs / f"{host}.log"


def prepare_home(paths: Paths) -> None:
    # The marker goes only into a directory vmorch creates (or finds empty): 'down --purge'
    # deletes a directory only if it carries it, never one the user pointed us at.
    fresh = not paths.home.exists() or not any(paths.home.iterdir())
    for directory in (paths.home, paths.logs, paths.redis_dir):
        directory.mkdir(parents=True, exist_ok=True)
    if fresh:
        paths.marker.write_text("created by 'vmorch up'; 'vmorch down --purge' deletes this directory\n")


def purge_home(paths: Paths, on_event: OnEvent) -> None:
    if not paths.home.exists():
        return
    if not paths.marker.exists():
        raise InvalidInput(f"not deleting {paths.home}: vmorch did not create it (no {MARKER_FILE} in it)",
                           hint="delete what you don't need in it yourself")
    shutil.rmtree(paths.home)
    on_event(f"deleted {paths.home}")

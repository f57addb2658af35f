"""One settings object, made at the edge (CLI, worker entry, API) and passed down."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from orchestrator.model.errors import ClusterUnavailable

ENV_PREFIX = "VMORCH_"


def default_home() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "vmorch"


class Settings(BaseModel):
    """Everything configurable, from ``VMORCH_*`` environment variables or keywords.

    A plain model that reads the environment itself, as pydantic-settings would: importing
    pydantic-settings (asyncio, argparse...) took a fifth of a second of every CLI command.
    """

    model_config = ConfigDict(frozen=True, extra="ignore", validate_default=True)

    #: None means: the local cluster under ``home`` ('vmorch up'); never a guessed default address.
    #: never in a repr: it may hold the password
    redis_url: str | None = Field(default=None, repr=False)
    namespace: str = "default"
    home: Path = Field(default_factory=default_home)

    #: seconds; python-redis-lock takes whole seconds. Locks are renewed every expire/3.
    lock_expire: int = Field(default=10, ge=2)
    #: how long a worker waits for a VM lock held by another worker before giving up
    lock_wait_timeout: float = Field(default=3600.0, gt=0)
    #: how long a submitter waits for the cmd/vms locks
    submit_lock_timeout: float = Field(default=30.0, gt=0)
    heartbeat_interval: float = Field(default=1.0, gt=0)
    #: a host whose last heartbeat is older than this is ``down``
    host_down_after: float = Field(default=6.0, gt=0)
    #: placement may commit a host's memory and CPUs up to these multiples of its size (as Nova's ratios)
    memory_allocation_ratio: float = Field(default=1.0, gt=0)
    cpu_allocation_ratio: float = Field(default=8.0, gt=0)
    #: a disk is made only where the host's store has room for its full size plus this (GiB)
    disk_margin_gib: float = Field(default=1.0, ge=0)
    #: the largest image source 'vmorch image import' fetches (MiB), and what its conversion may write
    image_max_mib: int = Field(default=16384, gt=0)
    #: the largest disk 'vm move' carries through Redis (Redis must have the memory for it meanwhile)
    move_max_disk_mib: int = Field(default=4096, gt=0)
    #: an operation past this many seconds fails with ``timeout`` at its next step
    job_soft_time_limit: float = Field(default=1800.0, gt=0)
    #: past this, a job stuck inside libvirt is failed and its worker process exits (a thread can't be
    #: killed; the supervisor or systemd restarts the worker, which frees the dead process's locks)
    job_hard_time_limit: float = Field(default=2400.0, gt=0)
    #: how long jobs of a VM whose host is down wait for it before failing with "host <name> is down"
    host_down_deadline: float = Field(default=300.0, gt=0)
    #: must be longer than any operation: Celery redelivers an unacked message after it
    visibility_timeout: int = Field(default=4 * 3600, ge=60)
    #: how often (s) a waiting client re-reads a job when no notification arrived
    wait_poll_interval: float = Field(default=1.0, gt=0)
    #: the active scheduler's lock lasts this long unless renewed: a standby takes over within it
    scheduler_lock_timeout: int = Field(default=5, ge=2)
    #: how often (s) the scheduler looks at its schedules (and renews its lock)
    scheduler_tick: float = Field(default=1.0, gt=0)
    #: the HTTP API to talk to instead of Redis (``vmorch --api-url``); None: Redis directly
    api_url: str | None = None
    #: the API token (secret); None: the file ``<home>/token`` (``vmorch up`` writes one)
    token: str | None = Field(default=None, repr=False)
    #: the API checks tokens; ``vmorch api --no-auth`` turns it off (loopback only)
    api_auth: bool = True
    #: the longest (s) one long-poll request of the API holds before answering
    api_wait_max: float = Field(default=30.0, gt=0, le=300)
    #: ``vmorch doctor``: a VM's next job not started after this long (s), on a host that is up, is stuck
    doctor_stuck_after: float = Field(default=120.0, ge=1)
    #: how often (s) a worker compares its host's VM records with libvirt (state, memory, vCPUs,
    #: snapshots) and corrects them; libvirt's lifecycle events correct state changes at once; 0: never
    drift_sync_interval: float = Field(default=10.0, ge=0)
    #: finished jobs older than this (s, by ``finished_at``) are removed with their history by the workers'
    #: janitors (``orchestrator.store.retention``); 0: kept for ever (Redis then grows about 1 KB a job)
    job_retention: float = Field(default=7 * 86400.0, ge=0)
    #: where removed jobs are archived first, one JSON line each in ``<dir>/<namespace>.jsonl``; None: not archived
    job_archive_dir: Path | None = None
    #: the most jobs one janitor pass removes (a pass stays short: Redis runs each batch of it atomically)
    job_prune_batch: int = Field(default=1000, ge=1, le=100_000)

    @field_validator("job_archive_dir", mode="before")
    @classmethod
    def _no_empty_dir(cls, value: Any) -> Any:
        """``VMORCH_JOB_ARCHIVE_DIR=`` (empty) means no archive, not the current directory."""
        return None if value == "" else value

    @model_validator(mode="before")
    @classmethod
    def _from_environment(cls, data: Any) -> Any:
        """Each field not given as a keyword from ``VMORCH_<FIELD>`` (any case); pydantic converts the strings."""
        if not isinstance(data, dict):
            return data
        env = {k.lower(): v for k, v in os.environ.items()}
        found = {name: env[key] for name in cls.model_fields
                 if name not in data and (key := (ENV_PREFIX + name).lower()) in env}
        return {**data, **found}

    def resolved_token(self) -> str | None:
        """The API token: explicit setting, else ``<home>/token``, else None."""
        if self.token:
            return self.token
        try:
            return (self.home / "token").read_text().strip() or None
        except OSError:
            return None

    def resolved_redis_url(self) -> str:
        """The Redis URL to use: the explicit setting, else the local cluster's.

        Never a default address: a Redis that happens to listen on 6379 (Debian's package starts
        one) is not a vmorch cluster, and writing into it, or naming an address the user never
        set, would mislead."""
        if self.redis_url:
            return self.redis_url
        state = self.home / "cluster.json"
        try:
            url = json.loads(state.read_text())["redis_url"]
        except (OSError, ValueError, KeyError):
            raise ClusterUnavailable(
                f"no cluster: no --redis-url, no VMORCH_REDIS_URL, and no local cluster under {self.home}",
                hint="start one with 'vmorch up --detach', or give --redis-url redis://HOST:PORT/0") from None
        return str(url)

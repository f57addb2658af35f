"""Host registration and heartbeat: how the cluster knows this host is up."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

from redis.exceptions import RedisError

from orchestrator import __version__
from orchestrator.store.jobstore import Store

log = logging.getLogger(__name__)


class Heartbeat:
    def __init__(self, store: Store, host: str, *, libvirt_uri: str, cpus: int, memory_mib: int,
                 interval: float, labels: dict[str, str] | None = None, migrate_uri: str = "",
                 shared_storage: bool = False, status: Callable[[], Mapping[str, str]] | None = None,
                 extra: Mapping[str, str] | None = None, storage_dir: Path | None = None) -> None:
        """``extra``: more fields registered once (the accelerator its guests get, and why);
        ``storage_dir``: the store whose free bytes every beat reports (``store_free_bytes``)."""
        self.store = store
        self.host = host
        self.fields = {"libvirt_uri": libvirt_uri, "cpus": cpus, "memory_mib": memory_mib, "pid": os.getpid(),
                       "hostname": socket.gethostname(), "version": __version__,
                       "labels": json.dumps(labels or {}, sort_keys=True), "migrate_uri": migrate_uri,
                       "shared_storage": "1" if shared_storage else "", **(extra or {})}
        self.interval = interval
        #: fields refreshed with every beat (the libvirt probe's verdict)
        self.status = status or dict
        self.storage_dir = storage_dir
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="vmorch-heartbeat", daemon=True)

    def start(self) -> None:
        self.store.register_host(self.host, {**self.fields, **self._beat_fields()})
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.store.heartbeat(self.host, self._beat_fields())
            except RedisError as exc:  # Redis restarting: keep trying; the host shows down meanwhile
                log.warning("heartbeat failed: %s", exc)

    def _beat_fields(self) -> dict[str, str]:
        """What every beat refreshes: the libvirt probe's verdict and the store's free bytes (placement
        only puts a disk where it fits)."""
        fields = dict(self.status())
        if self.storage_dir is not None:
            try:
                fields["store_free_bytes"] = str(shutil.disk_usage(self.storage_dir).free)
            except OSError as exc:
                log.warning("could not measure %s: %s", self.storage_dir, exc)
        return fields

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():  # stop() also runs when start-up failed before start()
            self._thread.join(timeout=5)
        try:
            self.store.host_stopped(self.host)
        except RedisError as exc:
            log.warning("could not mark host %s stopped: %s", self.host, exc)

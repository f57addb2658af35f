"""Cluster-wide metrics, read from Redis at scrape time (see ``orchestrator.metrics``)."""

from __future__ import annotations

import logging
from collections import Counter as Tally
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, cast

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from redis.exceptions import RedisError

from . import keys
from .records import FINAL_STATES, Host, HostState

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from .store import Store

log = logging.getLogger(__name__)


#: kombu's Redis transport keeps a queue's priority levels in lists named "<queue>", "<queue>\x06\x163", ...
_PRIORITY_SUFFIXES = ("", *(f"\x06\x16{p}" for p in (3, 6, 9)))


class ClusterCollector(Collector):
    """Reads jobs not yet final, host records and Celery queue lengths from Redis at each scrape.

    The cost is a few pipelined round trips, proportional to the VMs and their unfinished jobs.
    If Redis can't be reached, ``vmorch_redis_up`` is 0 and nothing else is reported.
    """

    def __init__(self, store: Store) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("vmorch_redis_up", "Whether the cluster's Redis answered this scrape")
        try:
            families = list(self._families())
        except RedisError as exc:
            log.warning("metrics: cannot read the cluster from Redis: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _families(self) -> Iterator[Metric]:
        hosts = self.store.hosts()
        yield from _host_families(self.store, hosts)
        yield _queue_depth(self.store, [h.name for h in hosts])
        yield _unfinished_jobs(self.store)
        submitted = CounterMetricFamily("vmorch_jobs_submitted", "Jobs ever accepted by the cluster")
        submitted.add_metric([], float(self.store.redis.get(keys.JOB_NEXT) or 0))
        yield submitted


def _host_families(store: Store, hosts: list[Host]) -> Iterator[Metric]:
    up = GaugeMetricFamily("vmorch_host_up", "1 if the host's worker heartbeats (up or draining)", labels=["host"])
    draining = GaugeMetricFamily("vmorch_host_draining", "1 if the host takes no new VMs", labels=["host"])
    libvirt_up = GaugeMetricFamily("vmorch_host_libvirt_up", "1 if the worker's last libvirt probe worked",
                                   labels=["host"])
    age = GaugeMetricFamily("vmorch_host_heartbeat_age_seconds", "Seconds since the host's last heartbeat",
                            labels=["host"])
    offset = GaugeMetricFamily("vmorch_host_clock_offset_seconds", "The host's clock minus Redis's clock",
                               labels=["host"])
    vms = GaugeMetricFamily("vmorch_host_vms", "VMs placed on the host", labels=["host"])
    now = store.redis_time()
    for h in hosts:
        up.add_metric([h.name], 0 if h.state is HostState.DOWN else 1)
        draining.add_metric([h.name], 1 if h.state is HostState.DRAINING else 0)
        if h.libvirt_ok is not None:
            libvirt_up.add_metric([h.name], 1 if h.libvirt_ok and h.state is not HostState.DOWN else 0)
        if h.heartbeat_at is not None:
            age.add_metric([h.name], max(0.0, now - h.heartbeat_at.timestamp()))
        if h.clock_offset is not None:
            offset.add_metric([h.name], h.clock_offset)
        vms.add_metric([h.name], h.vms)
    yield from (up, draining, libvirt_up, age, offset, vms)


def _queue_depth(store: Store, hosts: list[str]) -> Metric:
    depth = GaugeMetricFamily("vmorch_queue_depth", "Celery messages waiting in the host's queue", labels=["host"])
    pipe = store.redis.pipeline(transaction=False)
    for host in hosts:
        for suffix in _PRIORITY_SUFFIXES:
            pipe.llen(keys.queue(host) + suffix)
    lengths = cast(list[int], pipe.execute())
    n = len(_PRIORITY_SUFFIXES)
    for i, host in enumerate(hosts):
        depth.add_metric([host], sum(lengths[i * n:(i + 1) * n]))
    return depth


def _unfinished_jobs(store: Store) -> Metric:
    """Every job not yet final is in its VM's mailbox: count them by host, op and state."""
    jobs = GaugeMetricFamily("vmorch_jobs", "Jobs not yet final (queued, waiting, running)",
                             labels=["host", "op", "state"])
    namespaces = cast(set[str], store.redis.smembers(keys.NAMESPACES))
    vms = [(ns, vm) for ns in namespaces for vm in store.vm_names(ns)]
    pipe = store.redis.pipeline(transaction=False)
    for ns, vm in vms:
        pipe.zrange(keys.vm_mailbox(ns, vm), 0, -1)
    ids = [int(i) for box in pipe.execute() for i in box]
    for job_id in ids:
        pipe.hmget(keys.job(job_id), "host", "op", "state")
    tally = Tally(_rows(pipe.execute() if ids else []))
    for (host, op, state_), count in sorted(tally.items()):
        jobs.add_metric([host, op, state_], count)
    return jobs


_FINAL = {s.value for s in FINAL_STATES}


def _rows(rows: Iterable[list[str | None]]) -> Iterator[tuple[str, str, str]]:
    for host, op, state in rows:
        if op and state and state not in _FINAL:
            yield host or "", op, state


class _ThisProcess(Collector):
    """The default registry's metrics, re-exported beside the cluster's in one registry."""

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()


def cluster_registry(store: Store) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ClusterCollector(store))
    registry.register(_ThisProcess())
    return registry

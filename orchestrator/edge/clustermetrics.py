"""Cluster-wide metrics, read from Redis at scrape time (see ``orchestrator.model.metrics``)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from redis.exceptions import RedisError

from orchestrator.model import metrics
from orchestrator.model.records import FINAL_STATES, Host, HostState
from orchestrator.store import keys

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from orchestrator.model.settings import Settings
    from orchestrator.store.jobstore import Store

log = logging.getLogger(__name__)


#: kombu's Redis transport keeps a queue's priority levels in lists named "<queue>", "<queue>\x06\x163", ...
_PRIORITY_SUFFIXES = ("", *(f"\x06\x16{p}" for p in (3, 6, 9)))


class ClusterCollector(Collector):
    """Reads jobs not yet final, host records and Celery queue lengths from Redis at each scrape.

    The cost is two pipelines (hosts, queue lengths) and one read-only Lua call that walks the
    VM registry inside Redis (``bench.scrape``: ~40 ms of Redis and client time for 50 hosts and
    2,000 VMs). If Redis can't be reached, ``vmorch_redis_up`` is 0 and nothing else is reported.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self._count_unfinished = store.redis.register_script(_UNFINISHED)

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
        yield _unfinished_jobs(cast(list[str | int], self._count_unfinished(args=_template_args())))
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


# Counts the jobs not yet final, by host, op and state, inside Redis: one call instead of
# two commands per VM from here (2,000 VMs: ~0.5 s of client round trips, ~2 ms in Lua).
# Read-only; it derives keys from names as the Lua scripts of orchestrator/store/lua do (one Redis,
# not Redis Cluster). ARGV: the namespaces set, then each key template split around its names.
_UNFINISHED = """
local counts = {}
for _, ns in ipairs(redis.call('SMEMBERS', ARGV[1])) do
  for _, vm in ipairs(redis.call('SMEMBERS', ARGV[2] .. ns)) do
    for _, id in ipairs(redis.call('ZRANGE', ARGV[3] .. ns .. ARGV[4] .. vm .. ARGV[5], 0, -1)) do
      local f = redis.call('HMGET', ARGV[6] .. id, 'host', 'op', 'state')
      if f[2] and f[3] then
        local k = (f[1] or '') .. '\t' .. f[2] .. '\t' .. f[3]
        counts[k] = (counts[k] or 0) + 1
      end
    end
  end
end
local out = {}
for k, n in pairs(counts) do
  out[#out + 1] = k
  out[#out + 1] = n
end
return out
"""


def _template_args() -> list[str]:
    ns, vm = "\x00", "\x01"
    vms_head = keys.vms(ns).split(ns)[0]
    box_head, rest = keys.vm_mailbox(ns, vm).split(ns)
    box_mid, box_tail = rest.split(vm)
    return [keys.NAMESPACES, vms_head, box_head, box_mid, box_tail, keys.JOB_PREFIX]


def _unfinished_jobs(raw: list[str | int]) -> Metric:
    """Every job not yet final is in its VM's mailbox: their counts by host, op and state, from _UNFINISHED."""
    jobs = GaugeMetricFamily("vmorch_jobs", "Jobs not yet final (queued, waiting, running)",
                             labels=["host", "op", "state"])
    rows = sorted((str(k).split("\t"), int(n)) for k, n in zip(raw[::2], raw[1::2], strict=True))
    for (host, op, state), count in rows:
        if state not in _FINAL:
            jobs.add_metric([host, op, state], count)
    return jobs


_FINAL = {s.value for s in FINAL_STATES}


class _ThisProcess(Collector):
    """The default registry's metrics, re-exported beside the cluster's in one registry."""

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()


def cluster_registry(store: Store) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ClusterCollector(store))
    registry.register(_ThisProcess())
    return registry


def asgi_app(settings: Settings) -> Any:
    """An ASGI app serving the cluster's metrics and this process's, for the API to mount at ``/metrics``."""
    from prometheus_client import make_asgi_app

    from orchestrator.store.jobstore import Store
    from orchestrator.store.redisconn import connect_quick

    metrics.enable()
    # One retry (for an idle connection Redis closed) and short timeouts: a scrape must answer,
    # with vmorch_redis_up 0 if need be, within Prometheus's scrape timeout.
    redis = connect_quick(settings.resolved_redis_url(), timeout=3.0, retries=1)
    store = Store(redis, host_down_after=settings.host_down_after)
    return make_asgi_app(registry=cluster_registry(store))

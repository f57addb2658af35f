"""``vmorch doctor``: what is wrong with a cluster, and how to fix it.

Each check reads what the cluster already records -- Redis's ``INFO``, the host records
that workers refresh with every heartbeat (libvirt probe, clock offset, version) -- so
the doctor needs no access to the hosts themselves.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from redis.exceptions import RedisError

from orchestrator import __version__
from orchestrator.model.records import Host, HostState, JobState
from orchestrator.model.settings import Settings
from orchestrator.store.jobstore import Store
from orchestrator.store.redisconn import connect_quick, is_sentinel, redact

#: vmorch's Lua scripts and streams need Redis 6.2 (XADD with MAXLEN, ZRANGE options, GETDEL)
MIN_REDIS = (6, 2)
#: a host's clock this far from Redis's skews latencies and log times (warn) or breaks comparisons (fail)
SKEW_WARN_S = 0.25
SKEW_FAIL_S = 2.0


def _conf_fix(name: str, value: str) -> str:
    return f"redis-cli CONFIG SET {name} {value}, and put '{name} {value}' in redis.conf (or the compose file)"


class Status(StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    message: str
    fix: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def examine(settings: Settings, *, stuck_after: float | None = None) -> list[Check]:
    """Run every check against the cluster of ``settings``; never raises for a sick cluster."""
    url = settings.resolved_redis_url()
    redis = connect_quick(url, timeout=3.0)
    try:
        try:
            info = redis.info("all")
        except RedisError as exc:
            return [Check("redis", Status.FAIL, f"cannot reach Redis at {redact(url)}: {exc}",
                          "start Redis (or 'vmorch up --detach'), check --redis-url / VMORCH_REDIS_URL, "
                          "the password and the firewall")]
        checks = [*_redis_checks(url, info)]
        store = Store(redis, host_down_after=settings.host_down_after)
        try:
            hosts = store.hosts()
            checks += _host_checks(hosts)
            checks += _clock_checks(hosts)
            stuck = settings.doctor_stuck_after if stuck_after is None else stuck_after
            checks.append(_stuck_jobs(store, hosts, stuck))
            checks.append(_versions(info, hosts))
        except RedisError as exc:
            checks.append(Check("hosts", Status.FAIL, f"cannot read the host records: {exc}",
                                "check that Redis answers (see above)"))
        return checks
    finally:
        redis.close()


def _redis_checks(url: str, info: dict[str, Any]) -> list[Check]:
    version = str(info.get("redis_version", "?"))
    where = redact(url)
    if is_sentinel(url):
        where += " (master found through Sentinel)"
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    checks = [Check("redis", Status.OK, f"Redis {version} at {where}") if parts >= MIN_REDIS else
              Check("redis", Status.FAIL, f"Redis {version} is too old: vmorch needs {'.'.join(map(str, MIN_REDIS))}+",
                    "upgrade Redis (Debian 12's redis-server is 7.0)")]
    if int(info.get("aof_enabled", 0)) != 1:
        checks.append(Check("persistence", Status.FAIL,
                            "append-only file is off: a Redis restart loses the jobs accepted since the last "
                            "snapshot", _conf_fix("appendonly", "yes")))
    elif str(info.get("aof_last_write_status", "ok")) != "ok":
        checks.append(Check("persistence", Status.FAIL, "Redis could not write its append-only file",
                            "look at Redis's log: the disk is full or read-only"))
    else:
        checks.append(Check("persistence", Status.OK, "append-only file on"))
    policy = str(info.get("maxmemory_policy", "?"))
    if policy != "noeviction":
        checks.append(Check("eviction", Status.FAIL,
                            f"maxmemory-policy is {policy}: when memory runs short Redis deletes keys, "
                            "jobs and locks among them",
                            _conf_fix("maxmemory-policy", "noeviction")))
    else:
        checks.append(_memory(info))
    return checks


def _memory(info: dict[str, Any]) -> Check:
    limit, used = int(info.get("maxmemory", 0)), int(info.get("used_memory", 0))
    if limit and used > 0.9 * limit:
        return Check("eviction", Status.WARN,
                     f"maxmemory-policy noeviction, but {used / limit:.0%} of maxmemory is used: "
                     "new jobs will be refused when it is full",
                     "raise maxmemory, or delete old namespaces' history")
    return Check("eviction", Status.OK, "maxmemory-policy noeviction")


def _host_checks(hosts: list[Host]) -> list[Check]:
    if not hosts:
        return [Check("hosts", Status.WARN, "no host has registered: nothing can run a job",
                      "start a worker on each hypervisor host: vmorch worker --host NAME --libvirt-uri qemu:///system "
                      "(or systemctl start vmorch-worker@NAME)")]
    return [_host_check(h) for h in hosts]


def _host_check(h: Host) -> Check:
    name = f"host {h.name}"
    where = f"pid {h.pid} on {h.hostname}" if h.hostname else f"pid {h.pid}"
    restart = (f"on {h.hostname or h.name}: systemctl status vmorch-worker@{h.name} "
               f"(journalctl -u vmorch-worker@{h.name}), or start 'vmorch worker --host {h.name}'")
    if h.state is HostState.DOWN:
        if h.stopped and not h.vms:
            return Check(name, Status.WARN, f"down: its worker ({where}) was stopped; no VMs on it",
                         f"start its worker again if the host is still in use: {restart}")
        since = f"{h.heartbeat_at:%Y-%m-%d %H:%M:%S} UTC" if h.heartbeat_at else "ever"
        why = f"its worker ({where}) was stopped" if h.stopped else \
            f"no heartbeat since {since} from its worker ({where})"
        return Check(name, Status.FAIL, f"down: {why}; its {h.vms} VMs' jobs wait, then fail", restart)
    if h.libvirt_ok is False:
        return Check(name, Status.FAIL, f"its worker is up but libvirt {h.libvirt_uri} does not answer: "
                     f"{h.libvirt_error}",
                     f"on {h.hostname or h.name}: systemctl status libvirtd (the worker reconnects by itself)")
    if h.libvirt_ok is None:
        return Check(name, Status.WARN, f"{h.state.value}; its worker does not report its libvirt connection",
                     "upgrade the worker to this vmorch version")
    drain = ", draining (no new VMs)" if h.state is HostState.DRAINING else ""
    return Check(name, Status.OK, f"up{drain}: worker {where}, libvirt {h.libvirt_uri} answers, {h.vms} VMs")


def _clock_checks(hosts: list[Host]) -> list[Check]:
    offsets = {h.name: h.clock_offset for h in hosts if h.state is not HostState.DOWN and h.clock_offset is not None}
    if not offsets:
        return []
    spread = max(offsets.values()) - min(offsets.values())
    worst_name, worst = max(offsets.items(), key=lambda kv: abs(kv[1]))
    detail = ", ".join(f"{n} {o * 1000:+.1f} ms" for n, o in sorted(offsets.items()))
    skew = max(spread, abs(worst))
    fix = f"run NTP on every host (timedatectl set-ntp true, or chrony); {worst_name} is the furthest off"
    if skew >= SKEW_FAIL_S:
        return [Check("clock", Status.FAIL, f"host clocks disagree by up to {skew:.2f}s with Redis ({detail})", fix)]
    if skew >= SKEW_WARN_S:
        return [Check("clock", Status.WARN, f"host clocks disagree by up to {skew:.2f}s with Redis ({detail})", fix)]
    return [Check("clock", Status.OK, f"host clocks within {skew * 1000:.1f} ms of Redis's ({detail})")]


def _versions(info: dict[str, Any], hosts: list[Host]) -> Check:
    workers = {h.name: h.version or "?" for h in hosts if h.state is not HostState.DOWN}
    others = sorted({v for v in workers.values() if v != __version__})
    summary = f"vmorch {__version__} here, Redis {info.get('redis_version', '?')}"
    if others:
        behind = ", ".join(f"{n} {v}" for n, v in sorted(workers.items()) if v != __version__)
        return Check("versions", Status.WARN, f"{summary}; workers on another version: {behind}",
                     "upgrade every host to the same vmorch version (a rolling upgrade may mix them briefly)")
    return Check("versions", Status.OK, f"{summary}; every worker the same")


def _stuck_jobs(store: Store, hosts: list[Host], stuck_after: float) -> Check:
    """Each VM's next job should start soon when its host is up: if not, that host's consumer is stuck.

    Only the head of each VM's mailbox is looked at: the jobs behind it wait for it, by design.
    """
    up = {h.name: h for h in hosts if h.state is not HostState.DOWN}
    now = store.redis_time()
    stuck = []
    for ns in store.namespaces():
        for job in store.next_jobs(ns.name):
            if job.host in up and job.state in (JobState.QUEUED, JobState.WAITING) and job.submitted_at \
                    and now - job.submitted_at.timestamp() > stuck_after:
                stuck.append((now - job.submitted_at.timestamp(), job))
    if not stuck:
        return Check("jobs", Status.OK, f"no VM's next job has waited more than {stuck_after:.0f}s on an up host")
    stuck.sort(key=lambda pair: pair[0], reverse=True)
    age, job = stuck[0]
    return Check("jobs", Status.WARN,
                 f"{len(stuck)} VM(s) have a next job not started after {stuck_after:.0f}s on an up host; oldest: "
                 f"job {job.id} ({job.op.value} {job.namespace}/{job.vm} on {job.host}, {age:.0f}s, {job.state.value})",
                 f"see 'vmorch job show {job.id}'; if its host's worker heartbeats but runs nothing, restart it: "
                 f"systemctl restart vmorch-worker@{job.host}")

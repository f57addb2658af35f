"""``vmorch doctor``: what is wrong with a cluster, and how to fix it.

Each check reads what the cluster already records -- Redis's ``INFO``, the host records
that workers refresh with every heartbeat (libvirt probe, clock offset, version) -- so
the doctor needs no access to the hosts themselves.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from redis import Redis
from redis.exceptions import RedisError

from orchestrator import __version__
from orchestrator.model.errors import ClusterUnavailable
from orchestrator.model.records import Host, HostState, JobState, VmState
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
    #: not known yet (a host that registered but whose first heartbeat has not come): neither good nor bad
    PENDING = "pending"
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
    try:
        url = settings.resolved_redis_url()
    except ClusterUnavailable as exc:
        return [Check("redis", Status.FAIL, exc.message, exc.hint or "")]
    redis = connect_quick(url, timeout=3.0)
    try:
        try:
            info = redis.info("all")
        except RedisError as exc:
            return [Check("redis", Status.FAIL, f"cannot reach Redis at {redact(url)}: {exc}",
                          "start Redis (or 'vmorch up --detach'), check --redis-url / VMORCH_REDIS_URL, "
                          "the password and the firewall")]
        checks = [*_redis_checks(url, info, _appendfsync(redis))]
        store = Store(redis, host_down_after=settings.host_down_after)
        try:
            hosts = store.hosts()
            checks += _host_checks(hosts)
            checks += _clock_checks(hosts)
            checks += _system_qemu_storage(settings, hosts)
            stuck = settings.doctor_stuck_after if stuck_after is None else stuck_after
            checks.append(_stuck_jobs(store, hosts, stuck))
            checks.append(_missing_vms(store))
            checks.append(_versions(info, hosts))
        except RedisError as exc:
            checks.append(Check("hosts", Status.FAIL, f"cannot read the host records: {exc}",
                                "check that Redis answers (see above)"))
        return checks
    finally:
        redis.close()


def _appendfsync(redis: Redis) -> str | None:
    """Redis's ``appendfsync`` (it is not in INFO); None where CONFIG is refused (renamed, an ACL)."""
    try:
        return str(redis.config_get("appendfsync").get("appendfsync") or "") or None
    except RedisError:
        return None


def _redis_checks(url: str, info: dict[str, Any], appendfsync: str | None = None) -> list[Check]:
    version = str(info.get("redis_version", "?"))
    where = redact(url)
    if is_sentinel(url):
        where += " (master found through Sentinel)"
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    checks = [Check("redis", Status.OK, f"Redis {version} at {where}") if parts >= MIN_REDIS else
              Check("redis", Status.FAIL, f"Redis {version} is too old: vmorch needs {'.'.join(map(str, MIN_REDIS))}+",
                    "upgrade Redis (Debian 12's redis-server is 7.0)")]
    checks.append(_persistence(info, appendfsync))
    policy = str(info.get("maxmemory_policy", "?"))
    if policy != "noeviction":
        checks.append(Check("eviction", Status.FAIL,
                            f"maxmemory-policy is {policy}: when memory runs short Redis deletes keys, "
                            "jobs and locks among them",
                            _conf_fix("maxmemory-policy", "noeviction")))
    else:
        checks.append(_memory(info))
    return checks


def _persistence(info: dict[str, Any], appendfsync: str | None) -> Check:
    """Whether a job a client was told was accepted survives a crash of Redis, and of its machine."""
    if int(info.get("aof_enabled", 0)) != 1:
        return Check("persistence", Status.FAIL,
                     "append-only file is off: a Redis restart loses the jobs accepted since the last snapshot",
                     _conf_fix("appendonly", "yes"))
    if str(info.get("aof_last_write_status", "ok")) != "ok":
        return Check("persistence", Status.FAIL, "Redis could not write its append-only file",
                     "look at Redis's log: the disk is full or read-only")
    fix = _conf_fix("appendfsync", "always") + "; for 'vmorch up', unset VMORCH_REDIS_APPENDFSYNC"
    if appendfsync == "always":
        return Check("persistence", Status.OK, "append-only file on, fsynced before Redis answers (appendfsync always)")
    if appendfsync == "everysec":
        return Check("persistence", Status.WARN,
                     "append-only file on, but appendfsync everysec: a power loss can lose up to 1 s of accepted "
                     "jobs (a crash of Redis alone loses none)", fix)
    if appendfsync == "no":
        return Check("persistence", Status.FAIL,
                     "append-only file on, but appendfsync no: Redis never fsyncs it, so a power loss can lose "
                     "the last 30 s or so of accepted jobs (whatever the kernel has not written yet)", fix)
    return Check("persistence", Status.WARN,
                 f"append-only file on, but its appendfsync is unknown ({appendfsync or 'CONFIG GET refused'}): "
                 "unless it is always, a power loss can lose accepted jobs",
                 "check that redis.conf says 'appendfsync always'")


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
    live = [h for h in hosts if h.state is not HostState.DOWN]
    offsets = {h.name: h.clock_offset for h in live if h.clock_offset is not None}
    waiting = sorted(h.name for h in live if h.clock_offset is None)
    if waiting:
        # A worker registers before its first heartbeat measures the offset: say so rather than
        # judge the others alone, or leave the check out as if there were nothing to check.
        return [Check("clock", Status.PENDING, f"not measured yet on {', '.join(waiting)} (its first heartbeat "
                      "brings it)", "run 'vmorch doctor' again in a few seconds")]
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


def _system_qemu_storage(settings: Settings, hosts: list[Host]) -> list[Check]:
    """Each host of this machine whose worker uses the system libvirtd (``qemu:///system``): can that
    libvirtd's QEMU user (``libvirt-qemu``) traverse every directory down to the host's disks? If
    not, every launch fails "Permission denied" (VMORCH_HOME under /root, mode 0700, say).

    Host records don't say which ``--storage-dir`` a worker was given: the default one,
    ``$VMORCH_HOME/hosts/<host>/disks``, is judged, if it exists (the worker creates the one it uses).
    """
    import socket

    from orchestrator.edge import qemuaccess

    here = socket.gethostname()
    mine = [h for h in hosts if h.hostname == here and qemuaccess.is_system_qemu(h.libvirt_uri)]
    user = qemuaccess.qemu_user() if mine else None
    checks = []
    for h in mine:
        disks = settings.home / "hosts" / h.name / "disks"
        if user is None or not disks.is_dir():
            continue
        blocked = qemuaccess.untraversable(disks, user)
        if not blocked:
            checks.append(Check(f"storage {h.name}", Status.OK, f"{user.name} (QEMU of {h.libvirt_uri}) can reach "
                                f"its disks in {disks}"))
            continue
        checks.append(Check(
            f"storage {h.name}", Status.FAIL,
            f"{user.name}, the user QEMU of {h.libvirt_uri} runs as, can't traverse {', '.join(map(str, blocked))} "
            f"on the way to its disks in {disks}: every launch fails with 'Permission denied'",
            "; ".join(qemuaccess.chmod_for(d, user) for d in blocked)
            + "; or put VMORCH_HOME where QEMU can reach it (e.g. VMORCH_HOME=/var/lib/vmorch) and restart the worker"))
    return checks


def _missing_vms(store: Store, show: int = 5) -> Check:
    """VMs vmorch knows and their host's libvirt doesn't (undefined behind vmorch's back): they use a
    name and a reservation, and every operation but delete fails on them. Their workers mark them
    ``missing`` (``worker.sync``); a VM on a down host shows ``unknown`` and is not judged here."""
    missing = [vm for ns in store.namespaces() for vm in store.list_vms(ns.name) if vm.state is VmState.MISSING]
    if not missing:
        return Check("vms", Status.OK, "no VM is missing from its host's libvirt")
    named = ", ".join(f"{vm.namespace}/{vm.name} (on {vm.host})" for vm in missing[:show])
    more = f" and {len(missing) - show} more" if len(missing) > show else ""
    first = missing[0]
    return Check("vms", Status.WARN,
                 f"{len(missing)} VM(s) missing: vmorch knows them, their host's libvirt does not (undefined "
                 f"outside vmorch?): {named}{more}",
                 f"forget each: vmorch --namespace {first.namespace} vm delete {first.name}; or delete it and "
                 "launch it again; 'vmorch vm list' shows them all")

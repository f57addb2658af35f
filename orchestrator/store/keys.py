"""Every Redis key vmorch uses, in one place, under one prefix.

Keys (``P`` = ``vmorch``):

==============================  =======  ===================================================
key                             type     holds
==============================  =======  ===================================================
P:job:next                      string   the last job id handed out (INCR)
P:job:<id>                      hash     one job record
P:jobs:<ns>                     zset     job ids of a namespace, score = id
P:job:<id>:children             zset     a parent job's children, score = id
P:job:<id>:dependents           hash     jobs waiting for this one: id -> "ok" (needs it
                                         succeeded) or "final" (any final state)
P:delayed                       zset     held jobs whose dependencies are met, waiting out a
                                         delay, score = when they start (a janitor releases them)
P:released                      zset     jobs whose dependencies were just met, score = when;
                                         removed once their wake-up is sent (the janitor
                                         re-sends those left behind by a crash)
P:ns                            set      the namespaces
P:namespace:<ns>                hash     a namespace: its hosts (JSON list; empty = all), state, and its
                                         quota: quota_vms, quota_memory_mib, quota_vcpus, quota_disk_gib
                                         (absent = no limit; submit_batch.lua checks them against the
                                         sums of the namespace's VM records, atomically)
P:vms:<ns>                      set      the VM registry of a namespace (names)
P:vm:<ns>:<name>                hash     one VM record; its fields ``agent`` and ``addresses`` (JSON) are
                                         what its host's worker last saw of the guest agent, written
                                         unfenced by that worker only (``worker.guestwatch``)
P:vm:<ns>:<name>:seq            string   the VM's last sequence number (INCR); outlives
                                         the VM so a re-launched name keeps counting up
P:vm:<ns>:<name>:mailbox        zset     the VM's unfinished job ids, score = seq
P:vm:<ns>:<name>:console        stream   the VM's serial console output, as its host's worker reads it
                                         from QEMU's log (``worker.console``): entries ``d`` (text, up to
                                         ``CONSOLE_CHUNK`` bytes), ``o`` (offset in the log file after
                                         it), ``f`` (which file: host and inode); the newest
                                         ``CONSOLE_MAX`` (about). ``vm log`` and ``vm console`` read it
                                         (XREAD BLOCK to follow). Goes with the VM (its delete job)
P:vm:<ns>:<name>:console:in     list     keystrokes for the VM's serial console, pushed only by the
                                         holder of ``:console:writer`` (WATCH + MULTI), popped by the
                                         VM's host's worker; expires ``CONSOLE_INPUT_TTL_MS`` after a push
P:vm:<ns>:<name>:console:writer string   who may type on the console now (``vm console``): a session
                                         id, SET NX PX ``CONSOLE_WRITER_TTL_MS``, renewed while attached
P:hosts                         set      host names that ever registered
P:host:<name>                   hash     one host record (heartbeat, capacity, pid, labels,
                                         committed_mib/vcpus: what placement reserved: each VM's larger
                                         of set and live (lua/reserve.lua), and a move's room on its
                                         target from acceptance (the move-out job's reserved_on,
                                         reserved_mib, reserved_vcpus), accel and accel_reason: kvm or
                                         tcg, and why; underlay: its address for networks' VXLAN, and
                                         shaping: the link emulation its kernel can do, written by its
                                         network sweep once started)
P:host:<name>:vms               set      "<ns>/<name>" of the VMs placed on that host
P:transfer:<job id>             hash     a VM on its way to another host: definition, disk size
P:transfer:<job id>:disk        list     its disk, in chunks (deleted once imported; expires)
P:run:next                      string   the last experiment run id handed out (INCR)
P:run:<id>                      hash     one experiment run: its file, its steps' parent jobs
P:runs:<ns>                     zset     experiment run ids of a namespace, score = id
P:schedules:<ns>                set      schedule names of a namespace
P:schedule:<ns>:<name>          hash     a schedule: when, what (an experiment's text or its
                                         operations), paused, missed-slot policy, last slot fired
P:schedule:<ns>:<name>:history  list     its firings, newest first (JSON: slot, jobs, run, error)
P:redbeat:<ns>/<name>           hash     celery-redbeat's entry of a schedule (RedBeat's own)
P:redbeat::schedule, ::lock     zset,str RedBeat's due times, and the active scheduler's lock
P:events:<ns>                   stream   the namespace's recent history: every job state change and VM
                                         change, and namespace events; the newest ``EVENTS_MAX`` (about)
P:vm:<ns>:<name>:history        stream   one VM's history (its jobs' changes and its record's), the
                                         newest ``VM_HISTORY_MAX`` (about): ``vm history`` reads it, so
                                         a busy VM can't push out another's. Outlives the VM; goes with
                                         the namespace, or with the job that deleted the VM once that
                                         job passes retention (``orchestrator.store.retention``)
P:job:<id>:history              list     one job's own history, oldest first, the newest
                                         ``JOB_HISTORY_MAX`` (JSON arrays: ``HISTORY_FIELDS``); goes
                                         with the job. The job's ``history_trimmed`` counts what went
P:prune:<ns>                    string   who prunes the namespace's old jobs now (a lease, expires),
                                         so two janitors don't archive the same jobs twice
P:images                        set      the catalog's image names
P:image:<name>                  hash     one catalog image: source, sha256, format, size_bytes,
                                         virtual_size_bytes, created_at, by, seq (its jobs' count)
P:image:<name>:hosts            hash     host -> JSON {state, job, error}: the image on that host's
                                         store (state importing, ready, failed or removing)
P:jobs:_images                  zset     image jobs' ids (``IMAGES_NS``: a namespace no user can name)
P:events:_images                stream   image jobs' history (as a namespace's); P:vm:_images:<image>:history
                                         is one image's (``vm history``'s key, with the image's name), and
                                         goes with the image's record (``image_history``)
P:nets:<ns>                     set      the network names of a namespace
P:net:<ns>:<name>               hash     one network: subnet, vni, dhcp, nat, state (creating, ready,
                                         deleting), gateway_host, gateway, leases (JSON MAC -> IP, as the
                                         gateway host's DHCP server leased them), error, created_at, by
P:net:<ns>:<name>:hosts         hash     host -> underlay address, for each host whose bridge of the
                                         network is up (each host writes its own field only)
P:net-vnis                      hash     VNI -> "<ns>/<name>": the VNIs in use (a worker finds the network
                                         of a bridge it has by it)
P:net-vni:next                  string   the last VNI handed out (INCR, from ``VNI_MIN``)
P:capture:<id>                  string   a finished packet capture (pcap bytes), for its asker to take
                                         (GETDEL); expires ``CAPTURE_TTL`` after it was written
P:fence:<lock name>             string   the lock's fencing counter (INCR on every acquire)
P:updates                       pubsub   channel: "<job id> <state>" on every job change
P:token:<sha256 hex>            hash     one API token: name, role, namespaces (JSON), created_at
                                         (the secret itself is never stored, only its SHA-256)
P:tokens                        hash     token name -> its SHA-256 (for list and revoke)
P:audit                         stream   cluster-wide requests (host drain, tokens), by whom
P:idem:<sha256 hex>             string   a submission's idempotency key (its SHA-256): the JSON list of
                                         the job ids it made (or a run's id), for IDEMPOTENCY_TTL; a
                                         repeated submit with the key gets those jobs back
P:layout                        string   the layout version of these keys (``LAYOUT_VERSION``): written
                                         once (SET NX) by whoever connects first; a worker, the API
                                         or a client finding another one refuses to start
                                         (``orchestrator.store.layout``)
lock:<lock name>                string   python-redis-lock's lock key (its own prefix)
lock-signal:<lock name>         list     python-redis-lock's wake-up list
==============================  =======  ===================================================

Lock names are themselves ``P:<level>:...`` (see ``orchestrator.control.locks``), so every key
vmorch writes contains ``vmorch:``. Celery's broker keys (``host.<name>`` queues,
``unacked``, ``_kombu.*``) live in the same database and are Celery's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

PREFIX = "vmorch"

#: The version of the key layout in this table. Bump it whenever a key's name, type or meaning
#: changes, so hosts running different layouts refuse to share one Redis (``orchestrator.store.layout``).
#: 1: every vmorch before the version existed (schedules held CLI arguments);
#: 2: schedules hold operations (``{"operations": [...]}``).
LAYOUT_VERSION = 2
#: the layout of a Redis that has vmorch's keys but no version: what vmorch wrote before versions
UNVERSIONED_LAYOUT = 1
LAYOUT = f"{PREFIX}:layout"

JOB_NEXT = f"{PREFIX}:job:next"
NAMESPACES = f"{PREFIX}:ns"
HOSTS = f"{PREFIX}:hosts"
UPDATES = f"{PREFIX}:updates"
RELEASED = f"{PREFIX}:released"
DELAYED = f"{PREFIX}:delayed"
TOKENS = f"{PREFIX}:tokens"
AUDIT = f"{PREFIX}:audit"


def job(job_id: int) -> str:
    return f"{PREFIX}:job:{job_id}"


def job_children(job_id: int) -> str:
    return f"{job(job_id)}:children"


def job_dependents(job_id: int) -> str:
    return f"{job(job_id)}:dependents"


def job_history(job_id: int) -> str:
    return f"{job(job_id)}:history"


RUN_NEXT = f"{PREFIX}:run:next"


def run(run_id: int) -> str:
    return f"{PREFIX}:run:{run_id}"


def runs(namespace: str) -> str:
    return f"{PREFIX}:runs:{namespace}"


def schedules(namespace: str) -> str:
    return f"{PREFIX}:schedules:{namespace}"


def schedule(namespace: str, name: str) -> str:
    return f"{PREFIX}:schedule:{namespace}:{name}"


def schedule_history(namespace: str, name: str) -> str:
    return f"{schedule(namespace, name)}:history"


#: celery-redbeat's key prefix (its entries are ``<prefix><ns>/<name>``)
REDBEAT_PREFIX = f"{PREFIX}:redbeat:"
#: the queue of schedule firings, consumed by ``vmorch scheduler``
SCHEDULE_QUEUE = f"{PREFIX}.schedules"


def namespace(name: str) -> str:
    return f"{PREFIX}:namespace:{name}"


def jobs(namespace: str) -> str:
    return f"{PREFIX}:jobs:{namespace}"


def events(namespace: str) -> str:
    return f"{PREFIX}:events:{namespace}"


def vms(namespace: str) -> str:
    return f"{PREFIX}:vms:{namespace}"


def vm(namespace: str, name: str) -> str:
    return f"{PREFIX}:vm:{namespace}:{name}"


def vm_seq(namespace: str, name: str) -> str:
    return f"{vm(namespace, name)}:seq"


def vm_mailbox(namespace: str, name: str) -> str:
    return f"{vm(namespace, name)}:mailbox"


def vm_history(namespace: str, name: str) -> str:
    return f"{vm(namespace, name)}:history"


def vm_console(namespace: str, name: str) -> str:
    return f"{vm(namespace, name)}:console"


def vm_console_input(namespace: str, name: str) -> str:
    return f"{vm_console(namespace, name)}:in"


def vm_console_writer(namespace: str, name: str) -> str:
    return f"{vm_console(namespace, name)}:writer"


#: a console stream's size in entries (trimmed approximately) and the most text one entry holds:
#: at most about 4 MiB a VM, usually far less (a boot's whole console is a few KiB)
CONSOLE_MAX = 1_000
CONSOLE_CHUNK = 4096
#: the console writer lease, renewed by ``vm console`` while attached; keystrokes not taken expire
CONSOLE_WRITER_TTL_MS = 10_000
CONSOLE_INPUT_TTL_MS = 30_000


def prune_lease(namespace: str) -> str:
    return f"{PREFIX}:prune:{namespace}"


#: how many entries each history keeps (the streams trim approximately, in whole nodes of 100):
#: about 115 bytes an entry in a VM's stream, about 130 in a job's list (``docs/benchmarks.md``, M1)
EVENTS_MAX = 10_000
VM_HISTORY_MAX = 1_000
JOB_HISTORY_MAX = 100
#: the fields of a history entry, in the order a job's history list stores them
HISTORY_FIELDS = ("id", "at", "kind", "job", "vm", "op", "state", "by", "detail")


def host(name: str) -> str:
    return f"{PREFIX}:host:{name}"


def host_vms(name: str) -> str:
    return f"{host(name)}:vms"


def transfer(job_id: int) -> str:
    return f"{PREFIX}:transfer:{job_id}"


def token(digest: str) -> str:
    return f"{PREFIX}:token:{digest}"


#: the catalog's image names
IMAGES = f"{PREFIX}:images"
#: the namespace image jobs are filed under: not a valid namespace name, so no user's
IMAGES_NS = "_images"


def image(name: str) -> str:
    return f"{PREFIX}:image:{name}"


def image_hosts(name: str) -> str:
    return f"{image(name)}:hosts"


def image_history(name: str) -> str:
    """One image's own history: a VM's history key under ``IMAGES_NS``. Deleted in the same step as
    the image's record (``lua/image_done.lua`` with its last host's entry, or ``control.images``)."""
    return vm_history(IMAGES_NS, name)


NET_VNIS = f"{PREFIX}:net-vnis"
NET_VNI_NEXT = f"{PREFIX}:net-vni:next"
CAPTURE_TTL = 600


def nets(namespace: str) -> str:
    return f"{PREFIX}:nets:{namespace}"


def net(namespace: str, name: str) -> str:
    return f"{PREFIX}:net:{namespace}:{name}"


def net_hosts(namespace: str, name: str) -> str:
    return f"{net(namespace, name)}:hosts"


def capture(capture_id: str) -> str:
    return f"{PREFIX}:capture:{capture_id}"


def fence(lock_name: str) -> str:
    return f"{PREFIX}:fence:{lock_name}"


def lock_key(lock_name: str) -> str:
    """python-redis-lock's key for a lock name (the library fixes the ``lock:`` prefix)."""
    return f"lock:{lock_name}"


def lock_signal(lock_name: str) -> str:
    """python-redis-lock's wake-up list for a lock name: a release pushes to it, waiters BLPOP it."""
    return f"lock-signal:{lock_name}"


def queue(host_name: str) -> str:
    """The Celery queue that one host's worker consumes."""
    return f"host.{host_name}"


#: a host's keys start with this (tests and the cluster metrics tell a host's keys apart by it)
HOST_PREFIX = f"{PREFIX}:host:"
#: a job's keys start with this
JOB_PREFIX = f"{PREFIX}:job:"


def pattern(build: Callable[..., str], arity: int) -> list[str]:
    """``build``'s key split around its ``arity`` names: ``vm`` gives ``["vmorch:vm:", ":", ""]``.

    For the Lua scripts that can only name a key once they run (a dependent job's id, read from
    a hash): they join these pieces with the names (``lua/key.lua``), so the layout stays here.
    """
    marks = [chr(i) for i in range(1, arity + 1)]  # characters no name may contain
    pieces, rest = [], build(*marks)
    for mark in marks:
        head, found, rest = rest.partition(mark)
        assert found, f"{build.__name__} does not use each of its names once"
        pieces.append(head)
    return [*pieces, rest]


def lua_patterns() -> dict[str, list[str]]:
    """The patterns of the keys the scripts derive at run time (vmorch targets a single Redis, not
    Redis Cluster, so a script may touch keys it did not declare)."""
    return {"job": pattern(job, 1), "job_children": pattern(job_children, 1),
            "job_dependents": pattern(job_dependents, 1), "vm": pattern(vm, 2), "vm_seq": pattern(vm_seq, 2),
            "vm_mailbox": pattern(vm_mailbox, 2), "events": pattern(events, 1), "host": pattern(host, 1),
            "host_vms": pattern(host_vms, 1), "jobs": pattern(jobs, 1), "job_history": pattern(job_history, 1),
            "vm_history": pattern(vm_history, 2)}


def lua_history_caps() -> dict[str, int]:
    """What ``lua/event.lua`` needs besides the patterns: each history's size."""
    return {"events": EVENTS_MAX, "vm": VM_HISTORY_MAX, "job": JOB_HISTORY_MAX}


#: how long a submission's idempotency key is remembered (a client retrying a timed-out submit)
IDEMPOTENCY_TTL = 86400


def idempotency(key: str) -> str:
    """The key of a client's idempotency key: hashed, so any printable key makes one safe key name."""
    return f"{PREFIX}:idem:{hashlib.sha256(key.encode()).hexdigest()}"

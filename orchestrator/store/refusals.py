"""The scripts' refusals as vmorch's error tree.

A script that refuses writes nothing and returns the error reply ``VMORCH <json>`` (``lua/refuse.lua``):
a code of the error tree, what was refused (``what``) and the details. ``decode`` raises the class of
that code -- the very class ``VmorchError.from_dict`` gives for it, so the HTTP client raises what
the Redis client raises -- with the message users see. Any other error reply (a bug, Redis out of
memory) is raised as it is.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from redis.exceptions import ResponseError

from orchestrator.model import metrics
from orchestrator.model.errors import AlreadyExists, FencedOut, InvalidInput, NoCapacity, NotFound, VmorchError

#: how a script's error reply starts (a Redis error reply's first word is its kind)
MARK = "VMORCH "

_VM_HINT = "list VMs with 'vmorch vm list' (and check --namespace)"
_JOB_HINT = "list jobs with 'vmorch job list'"


def _fenced_out(d: dict[str, Any]) -> VmorchError:
    metrics.fenced_out()
    return FencedOut("a newer holder took this lock; this write was refused",
                     hint="the job is retried by the new holder")


def _moved(d: dict[str, Any]) -> VmorchError:
    return InvalidInput(f"VM {d['vm']!r} is no longer on host {d['host']!r}",
                        hint="it moved meanwhile; see 'vmorch vm show'")


def _dependency_failed(d: dict[str, Any]) -> VmorchError:
    return InvalidInput(f"job {d['job']} to wait for is already {d['state']}",
                        hint=f"retry it first ('vmorch job retry {d['job']}'), or drop it from --after")


_QUOTA_UNITS = {"vms": ("VMs", ""), "memory_mib": ("MiB of memory", " MiB"), "vcpus": ("vCPUs", ""),
                "disk_gib": ("GiB of disk", " GiB")}


def _quota(d: dict[str, Any]) -> VmorchError:
    what, unit = _QUOTA_UNITS.get(str(d["resource"]), (str(d["resource"]), ""))
    return NoCapacity(f"quota: namespace {d['namespace']} allows {d['limit']} {what}; it has {d['has']}{unit} "
                      f"and this asks for {d['asks']}{unit}",
                      hint=f"delete VMs, or have an admin raise it ('vmorch ns quota {d['namespace']}')")


#: every (code, what) a script refuses with, and the error it becomes
REFUSALS: dict[tuple[str, str], Callable[[dict[str, Any]], VmorchError]] = {
    ("fenced_out", "lock"): _fenced_out,
    ("not_found", "job"): lambda d: NotFound(f"no job {d['job']}", hint=_JOB_HINT),
    ("not_found", "vm"): lambda d: NotFound(f"no VM {d['vm']!r} in namespace {d['namespace']!r}", hint=_VM_HINT),
    ("not_found", "dependency"): lambda d: NotFound(f"no job {d['job']} to wait for", hint=_JOB_HINT),
    ("not_found", "namespace"): lambda d: NotFound(f"no namespace {d['namespace']!r}", hint="see 'vmorch ns list'"),
    ("already_exists", "vm"): lambda d: AlreadyExists(
        f"VM {d['vm']!r} already exists in namespace {d['namespace']!r}",
        hint="pick another name, or delete it first with 'vmorch vm delete'"),
    ("invalid_input", "moved"): _moved,
    ("invalid_input", "dependency_failed"): _dependency_failed,
    ("no_capacity", "quota"): _quota,
}


def decode(exc: ResponseError) -> Exception:
    """The error a script's error reply stands for: a refusal's class, or ``exc`` itself."""
    text = str(exc)
    if not text.startswith(MARK):
        return exc
    details = json.loads(text[len(MARK):])
    build = REFUSALS.get((str(details.get("code")), str(details.get("what"))))
    return build(details) if build else exc

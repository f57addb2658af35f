"""The lock hierarchy's names and order: levels, lock names, what this context holds, and the checks
(``require``, ``check_order``) that run before anything touches Redis.

The levels and the rules are described in ``orchestrator.control.locks``, which takes the locks
(``LockManager``) and re-exports every name here.
"""

from __future__ import annotations

import contextvars
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum

from orchestrator.model.errors import LockOrderError
from orchestrator.store import keys


class Level(IntEnum):
    CMD = 1
    VMS = 2
    VM = 3
    OTHER = 4


@dataclass(frozen=True, order=True)
class LockName:
    level: Level
    name: str

    def __str__(self) -> str:
        return self.name


def cmd_lock(namespace: str) -> LockName:
    return LockName(Level.CMD, f"{keys.PREFIX}:cmd:{namespace}")


def vms_lock(namespace: str) -> LockName:
    return LockName(Level.VMS, f"{keys.PREFIX}:vms:{namespace}")


def vm_lock(namespace: str, vm: str) -> LockName:
    return LockName(Level.VM, f"{keys.PREFIX}:vm:{namespace}:{vm}")


def host_lock(host: str) -> LockName:
    return LockName(Level.OTHER, f"{keys.PREFIX}:host:{host}")


def other_lock(name: str) -> LockName:
    return LockName(Level.OTHER, f"{keys.PREFIX}:{name}")


# What the current context (thread, or asyncio task) holds, in acquisition order.
_held: contextvars.ContextVar[tuple[LockName, ...]] = contextvars.ContextVar("vmorch_held_locks", default=())


def _log_fields(name: LockName) -> dict[str, str]:
    return {"lock": name.name, "lock_level": name.level.name.lower()}


def held() -> tuple[LockName, ...]:
    return _held.get()


def require(*names: LockName) -> None:
    """For internal functions that assume locks (minimega's ``// LOCK:`` made checkable).

    Cheap: it reads this context's held set, no Redis round trip. Raises ``LockOrderError`` if one is not held.
    """
    current = _held.get()
    for name in names:
        if name not in current:
            raise LockOrderError(f"{name} must be held here", hint="call the exported function that takes it")


#: the locks one handler needs, by level (Ganeti's ``needed_locks``): ``{Level.VM: [vm_lock(ns, vm)], ...}``
Declared = Mapping[Level, Sequence[LockName]]


def declared_names(declared: Declared) -> list[LockName]:
    """The declared locks in the order they are taken: level by level, names sorted within a level."""
    names: set[LockName] = set()
    for level, at_level in declared.items():
        for name in at_level:
            if name.level is not level:
                raise LockOrderError(f"{name} is a lock of level {name.level.name.lower()}, declared at "
                                     f"{Level(level).name.lower()}", hint="declare each lock at its own level")
            names.add(name)
    return sorted(names)


def check_order(wanted: list[LockName]) -> None:
    """Raise ``LockOrderError`` unless ``wanted`` (sorted) may be taken after what is held."""
    current = _held.get()
    if not current or not wanted:
        return
    top = max(current)
    first = wanted[0]
    if first <= top:
        why = "is already held" if first in current else f"sorts before {top} ({top.level.name.lower()}), which is held"
        raise LockOrderError(
            f"lock order violation: {first} ({first.level.name.lower()}) {why}",
            hint="declare every lock up front; the hierarchy is cmd > vms > vm > other, names sorted",
        )

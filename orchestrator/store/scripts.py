"""The Lua scripts behind every multi-key change to the job store, and how they are called.

Each runs atomically in Redis, so a job's id, its per-VM sequence number and its place in the
VM's mailbox are assigned together; and every write a worker makes under a lock first checks the
lock's fencing token (guarantee 3): a holder whose lock expired and was taken over finds a newer
token and is refused.

Each script is a file in ``lua/`` (package data). The helpers several scripts share (``args``,
``now``, ``key``, ``event``, ``refuse``, ``fence``, ``reserve``, ``settle``, ``vm_json``) are files of
their own, concatenated in front of the script at load time (``HELPERS``): Lua has no ``require`` in
Redis, and helpers are ``local`` functions of the one chunk Redis runs.

A call passes its keys by name (``Keys``: KEYS, and their indices in the arguments) and one JSON
object as ARGV[1]: the script's fields, the key indices, the final job states (``FINAL_STATES``:
the one list of them) and the patterns of the keys a script can only name once it runs
(``keys.lua_patterns()``). A refusal comes back as a structured error reply and is raised as its
class of the error tree (``orchestrator.store.refusals``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import cache
from importlib.resources import files
from typing import Any

from redis import Redis
from redis.commands.core import Script
from redis.exceptions import ResponseError

from orchestrator.model.records import FINAL_STATES
from orchestrator.store import keys, refusals

#: each script and the shared files put in front of it, in this order
HELPERS: dict[str, tuple[str, ...]] = {
    "mark_waiting": ("args", "now", "key", "event"),
    "begin": ("args", "now", "key", "event", "refuse", "fence"),
    "finish": ("args", "now", "key", "event", "refuse", "fence", "reserve", "settle"),
    "cancel": ("args", "now", "key", "event", "refuse", "settle"),
    "update_vm": ("args", "now", "key", "event", "refuse", "fence", "reserve"),
    "vms_json": ("vm_json",),
    "turn": ("args", "vm_json"),
    "submit_batch": ("args", "now", "key", "event", "refuse", "reserve", "settle"),
    "fail_unsent": ("args", "now", "key", "event", "settle"),
    "release_due": ("args", "now", "key", "event", "settle"),
    "prune": ("args", "key"),
    "image_submit": ("args", "now", "key", "event"),
    "image_done": ("args", "now", "key", "event", "refuse", "fence", "settle"),
    "namespace_quota": ("args", "refuse"),
}


@cache
def source(name: str) -> str:
    """The text Redis runs for script ``name``: its helpers, then the script (read once per process)."""
    folder = files("orchestrator.store") / "lua"
    return "\n".join((folder / f"{part}.lua").read_text() for part in (*HELPERS[name], name))


@cache
def _constants() -> dict[str, Any]:
    return {"final": sorted(s.value for s in FINAL_STATES), "p": keys.lua_patterns(), "caps": keys.lua_history_caps()}


class Keys:
    """The KEYS of one call, each key once. Named ones reach the script as ``K.<name>``; ``at``
    gives a key's index into KEYS for the arguments that list keys (a batch's VMs, say)."""

    def __init__(self, **named: str) -> None:
        self.list: list[str] = []
        self._index: dict[str, int] = {}
        self.named: dict[str, int] = {}
        self.name(**named)

    def name(self, **named: str) -> None:
        for name, key in named.items():
            self.named[name] = self.at(key)

    def at(self, key: str) -> int:
        """The key's index into KEYS (1-based, as in Lua)."""
        if key not in self._index:
            self.list.append(key)
            self._index[key] = len(self.list)
        return self._index[key]


def settle_keys() -> dict[str, str]:
    """The keys ``settle.lua`` writes whatever the job: the scripts that include it declare them."""
    return {"updates": keys.UPDATES, "released": keys.RELEASED, "delayed": keys.DELAYED}


class Scripts:
    """Every script, registered with one client: redis-py sends EVALSHA, and the text on NOSCRIPT."""

    def __init__(self, redis: Redis) -> None:
        self._scripts: dict[str, Script] = {name: redis.register_script(source(name)) for name in HELPERS}

    def run(self, name: str, keys_: Keys, args: Mapping[str, Any] | None = None) -> Any:
        """Run script ``name``; a refusal is raised as its error-tree class (nothing was written)."""
        return call(self._scripts[name], keys_, args)

    def vms_json(self, vm_keys: list[str]) -> str:
        """VM records as one JSON array (``vms_json.lua``): KEYS only, no arguments."""
        return str(self._scripts["vms_json"](keys=vm_keys))


def call(script: Script, keys_: Keys, args: Mapping[str, Any] | None = None) -> Any:
    """Run one registered script with its keys and its arguments as the one JSON object (``args.lua``);
    a refusal is raised as its error-tree class (nothing was written)."""
    argv = json.dumps({**(args or {}), **_constants(), "keys": keys_.named})
    try:
        return script(keys=keys_.list, args=[argv])
    except ResponseError as exc:
        raise refusals.decode(exc) from None

"""The version of vmorch's key layout in a Redis (``keys.LAYOUT``), checked before anything is used.

Whoever connects first to an empty Redis writes this vmorch's ``keys.LAYOUT_VERSION`` (SET NX). A
Redis with vmorch's keys but no version was written by a vmorch older than versions
(``keys.UNVERSIONED_LAYOUT``). A worker, the API or a client that
finds another version refuses to start, rather than read keys it would misunderstand or write keys
the other hosts would. One GET per client, remembered for the client's life.
"""

from __future__ import annotations

import weakref

from redis import Redis

from orchestrator.model.errors import LayoutMismatch
from orchestrator.store import keys

_checked: weakref.WeakSet[Redis] = weakref.WeakSet()


def check(redis: Redis) -> None:
    """Raise ``LayoutMismatch`` (one line: what was found, what is needed, the fix) unless the Redis
    holds this vmorch's layout; write it if the Redis holds none yet."""
    if redis in _checked:
        return
    found = redis.get(keys.LAYOUT)
    if found is None and redis.exists(keys.JOB_NEXT, keys.NAMESPACES, keys.HOSTS):
        found = str(keys.UNVERSIONED_LAYOUT)
    elif found is None and not redis.set(keys.LAYOUT, keys.LAYOUT_VERSION, nx=True):
        found = redis.get(keys.LAYOUT)  # another process wrote it in between
    if found is not None:
        text = found.decode(errors="replace") if isinstance(found, bytes) else str(found)
        if text != str(keys.LAYOUT_VERSION):
            raise LayoutMismatch(f"this Redis holds vmorch layout {text}; this vmorch needs {keys.LAYOUT_VERSION}: "
                                 "upgrade every host to the same vmorch, or use an empty Redis")
    _checked.add(redis)

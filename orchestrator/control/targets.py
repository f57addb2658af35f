"""Which VMs a command is about: a TARGET (name, list, range) and/or ``--tag key=value`` selectors."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

from orchestrator.model.errors import InvalidInput, NotFound
from orchestrator.model.names import check_tag, expand_target

if TYPE_CHECKING:
    from orchestrator.model.records import Vm


class Client(Protocol):
    """What resolving tags needs of a client (the Redis or the HTTP one)."""

    def vms(self, namespace: str) -> list[Vm]: ...


def resolve(client: Client, namespace: str, target: str | None, tags: Mapping[str, str]) -> list[str]:
    """The VM names: those of ``target`` (all of them, checked at submit), narrowed to those that
    carry every tag of ``tags``; with tags only, every VM of the namespace that carries them.

    Everything is checked before the store is asked: a range's size before it is expanded, and the
    tags (a lone surrogate or a control character is refused here, not by Redis)."""
    for key, value in tags.items():
        check_tag(key, value)
    names = expand_target(target) if target else None
    if not tags:
        if names is None:
            raise InvalidInput("no VM given", hint="give a TARGET (web1, web[1-10], a,b) or --tag key=value")
        return names
    tagged = [vm.name for vm in client.vms(namespace) if all(vm.tags.get(k) == v for k, v in tags.items())]
    chosen = tagged if names is None else [n for n in names if n in set(tagged)]
    if not chosen:
        wanted = ",".join(f"{k}={v}" for k, v in sorted(tags.items()))
        raise NotFound(f"no VM with tags {wanted} in namespace {namespace!r}" + (f" among {target}" if target else ""),
                       hint="see the VMs' tags with 'vmorch vm list'")
    return chosen

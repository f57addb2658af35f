"""Names users give things, and TARGET ranges such as ``web[1-10]``.

Names are strict on purpose: a VM's libvirt domain is ``<namespace>.<name>``, so neither
part may contain a dot, and names travel in Redis keys, queue names and file paths.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator

from orchestrator.model.errors import InvalidInput

NAME_MAX = 63
_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?$")
_NAMESPACE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?$")
_TAG_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./-]{0,62}$")
RANGE_HINT = "write ranges as name[1-10] or name[1,3,5-7]"
_RANGE = re.compile(r"^(?P<prefix>[^\[\]]*)\[(?P<spec>[0-9,\- ]+)\](?P<suffix>[^\[\]]*)$")
MAX_TARGETS = 10_000
TAG_VALUE_MAX = 256


def check_name(value: str, what: str = "VM name") -> str:
    if not _NAME.match(value):
        raise InvalidInput(
            f"invalid {what} {value!r}",
            hint="use 1-63 letters, digits, '-' or '_', starting and ending with a letter or digit",
        )
    return value


def check_namespace(value: str) -> str:
    if not _NAMESPACE.match(value):
        raise InvalidInput(
            f"invalid namespace {value!r}",
            hint="use 1-32 lowercase letters, digits or '-', starting and ending with a letter or digit",
        )
    return value


def check_tag(key: str, value: str) -> tuple[str, str]:
    if not _TAG_KEY.match(key):
        raise InvalidInput(
            f"invalid tag key {key!r}",
            hint="use 1-63 letters, digits, '_', '.', '/' or '-', starting with a letter or digit",
        )
    if len(value) > TAG_VALUE_MAX or any(ord(c) < 32 for c in value):
        raise InvalidInput(
            f"invalid value for tag {key!r}",
            hint=f"tag values are at most {TAG_VALUE_MAX} printable characters",
        )
    return key, value


def _as_value_error(check: object) -> object:
    def validate(value: str) -> str:
        try:
            return check(value)  # type: ignore[operator,no-any-return]
        except InvalidInput as exc:
            raise ValueError(f"{exc.message} ({exc.hint})") from None

    return validate


Name = Annotated[str, AfterValidator(_as_value_error(check_name))]
Namespace = Annotated[str, AfterValidator(_as_value_error(check_namespace))]


def expand_target(target: str) -> list[str]:
    """minimega's syntax: ``web[1-3,7]`` -> ``[web1, web2, web3, web7]``; a plain name -> ``[name]``;
    a comma-separated list of those (``db1,web[1-2]``) -> all of them, in order, once each."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(target):
        depth += (c == "[") - (c == "]")
        if c == "," and depth == 0:
            parts.append(target[start:i])
            start = i + 1
    parts.append(target[start:])
    if len(parts) == 1:
        return _expand_one(target)
    names: list[str] = []
    for part in parts:
        if not part.strip():
            raise InvalidInput(f"empty name in {target!r}", hint="separate names with single commas: a,b,web[1-3]")
        names.extend(_expand_one(part.strip()))
        if len(names) > MAX_TARGETS:
            raise InvalidInput(f"target {target!r} names more than {MAX_TARGETS} VMs", hint="split it")
    return list(dict.fromkeys(names))


def _expand_one(target: str) -> list[str]:
    match = _RANGE.match(target)
    if match is None:
        if "[" in target or "]" in target:
            raise InvalidInput(f"invalid target {target!r}", hint=RANGE_HINT)
        return [check_name(target)]
    numbers: list[int] = []
    for part in match["spec"].replace(" ", "").split(","):
        lo, sep, hi = part.partition("-")
        if not lo or (sep and not hi):
            raise InvalidInput(f"invalid range {part!r} in {target!r}", hint=RANGE_HINT)
        start, stop = int(lo), int(hi or lo)
        if stop < start:
            raise InvalidInput(f"empty range {part!r} in {target!r}", hint="the lower bound comes first: name[1-10]")
        numbers.extend(range(start, stop + 1))
        if len(numbers) > MAX_TARGETS:
            raise InvalidInput(f"target {target!r} names more than {MAX_TARGETS} VMs", hint="split it")
    names = list(dict.fromkeys(f"{match['prefix']}{n}{match['suffix']}" for n in numbers))
    return [check_name(n) for n in names]

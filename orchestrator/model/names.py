"""Names users give things, and TARGET ranges such as ``web[1-10]``.

Names are strict on purpose: a VM's libvirt domain is ``<namespace>.<name>``, so neither
part may contain a dot, and names travel in Redis keys, queue names and file paths.

Free-form strings (tag values, labels, paths) must be encodable as UTF-8 -- JSON's ``"\\ud800"``
and an undecodable byte of ``argv`` both arrive as a lone surrogate, which Redis can't store --
and hold no control character. A range's size is counted before it is expanded.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Annotated, Any

from pydantic import AfterValidator, ValidationError
from pydantic_core import PydanticCustomError

from orchestrator.model.errors import InvalidInput

NAME_MAX = 63
# fullmatch, not match with "$": "$" also matches before a final newline
_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?")
_NAMESPACE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?")
_TAG_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_./-]{0,62}")
RANGE_HINT = "write ranges as name[1-10] or name[1,3,5-7]"
_RANGE = re.compile(r"(?P<prefix>[^\[\]]*)\[(?P<spec>[0-9,\- ]+)\](?P<suffix>[^\[\]]*)")
_SPAN = re.compile(r"(?P<lo>[0-9]+)(?:-(?P<hi>[0-9]+))?")
MAX_TARGETS = 10_000
TAG_VALUE_MAX = 256
#: C0, DEL and C1 control characters (Unicode category Cc)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
UTF8_HINT = "send text as UTF-8; in JSON, a \\ud800-\\udfff escape must be half of a surrogate pair"


def text_problem(value: str) -> str | None:
    """Why ``value`` can't be taken as text, or None: a lone surrogate (not encodable as UTF-8, so
    Redis can't store it), or a control character."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"not valid UTF-8: lone surrogate {value[exc.start]!r} at character {exc.start}"
    if bad := _CONTROL.search(value):
        return f"control character {bad[0]!r} at character {bad.start()}"
    return None


def _text_hint(problem: str) -> str:
    return UTF8_HINT if problem.startswith("not valid UTF-8") else "use printable characters"


def check_text(value: str, what: str, *, hint: str | None = None) -> str:
    """A free-form string (a tag value, a label, a path): refused, naming ``what``, if it is not
    encodable as UTF-8 or holds a control character."""
    problem = text_problem(value)
    if problem is not None:
        raise InvalidInput(f"invalid {what}: {problem}",
                           hint=hint if hint and not problem.startswith("not valid") else _text_hint(problem))
    return value


def _bad_text(data: object, path: tuple[str | int, ...] = ()) -> Iterator[tuple[tuple[str | int, ...], str]]:
    if isinstance(data, str):
        if (problem := text_problem(data)) is not None:
            yield path, problem
    elif isinstance(data, dict):
        for key, value in data.items():
            if isinstance(key, str) and (problem := text_problem(key)) is not None:
                yield path, f"key {_short(key)}: {problem}"
            else:
                yield from _bad_text(value, (*path, key))
    elif isinstance(data, list | tuple):
        for i, value in enumerate(data):
            yield from _bad_text(value, (*path, i))


def refuse_bad_text(data: Any, title: str = "input") -> Any:
    """``data`` (parsed JSON) as it is, or a ``ValidationError`` located at its first string or dict
    key that :func:`text_problem` refuses. For ``mode="before"`` validators of request bodies whose
    strings are all names, tags, labels or paths: it runs before anything quotes the input back."""
    for path, problem in _bad_text(data):
        raise ValidationError.from_exception_data(title, [{
            "type": PydanticCustomError("invalid_text", "{problem} ({hint})",
                                        {"problem": problem, "hint": _text_hint(problem)}),
            "loc": path, "input": "",
        }])
    return data


def check_name(value: str, what: str = "VM name") -> str:
    if not _NAME.fullmatch(value):
        raise InvalidInput(
            f"invalid {what} {_short(value)}",
            hint="use 1-63 letters, digits, '-' or '_', starting and ending with a letter or digit",
        )
    return value


def check_host_name(value: str) -> str:
    """A host's name: the same rules as a VM's, and errors that say "host name"."""
    return check_name(value, "host name")


def check_namespace(value: str) -> str:
    if not _NAMESPACE.fullmatch(value):
        raise InvalidInput(
            f"invalid namespace {_short(value)}",
            hint="use 1-32 lowercase letters, digits or '-', starting and ending with a letter or digit",
        )
    return value


def check_tag(key: str, value: str) -> tuple[str, str]:
    if not _TAG_KEY.fullmatch(key):
        raise InvalidInput(
            f"invalid tag key {_short(key)}",
            hint="use 1-63 letters, digits, '_', '.', '/' or '-', starting with a letter or digit",
        )
    printable = f"tag values are at most {TAG_VALUE_MAX} printable characters"
    check_text(value, f"value for tag {key!r}", hint=printable)
    if len(value) > TAG_VALUE_MAX:
        raise InvalidInput(f"invalid value for tag {key!r}: longer than {TAG_VALUE_MAX} characters", hint=printable)
    return key, value


def _short(value: str, limit: int = 80) -> str:
    """``value`` quoted for a message (``repr`` escapes surrogates and control characters), cut if long."""
    return repr(value) if len(value) <= limit else f"{value[:limit]!r}... ({len(value)} characters)"


def _as_value_error(check: object) -> object:
    def validate(value: str) -> str:
        try:
            return check(value)  # type: ignore[operator,no-any-return]
        except InvalidInput as exc:
            raise ValueError(f"{exc.message} ({exc.hint})") from None

    return validate


Name = Annotated[str, AfterValidator(_as_value_error(check_name))]
HostName = Annotated[str, AfterValidator(_as_value_error(check_host_name))]
Namespace = Annotated[str, AfterValidator(_as_value_error(check_namespace))]


def expand_target(target: str) -> list[str]:
    """minimega's syntax: ``web[1-3,7]`` -> ``[web1, web2, web3, web7]``; a plain name -> ``[name]``;
    a comma-separated list of those (``db1,web[1-2]``) -> all of them, in order, once each.

    How many names a target makes is counted before any is made, so ``x[1-20000000]`` or a
    22-digit bound is refused at once, in constant memory.
    """
    ranges = _ranges(target)
    if sum(r.size for r in ranges) > MAX_TARGETS:
        raise _too_many(target)
    return list(dict.fromkeys(name for r in ranges for name in r.names()))


def target_size(target: str) -> int:
    """How many names ``target`` makes, without making them (a name given twice counts twice,
    as for the limit); refuses a malformed target, or a list of more than ``MAX_TARGETS``, as
    :func:`expand_target` does."""
    return sum(r.size for r in _ranges(target))


def _ranges(target: str) -> list[_Range]:
    parts, depth, start = [], 0, 0
    for i, c in enumerate(target):
        depth += (c == "[") - (c == "]")
        if c == "," and depth == 0:
            parts.append(target[start:i])
            start = i + 1
            if len(parts) > MAX_TARGETS:
                raise _too_many(target)
    parts.append(target[start:])
    if len(parts) == 1:
        return [_parse(target)]
    if not all(p.strip() for p in parts):
        raise InvalidInput(f"empty name in {_short(target)}", hint="separate names with single commas: a,b,web[1-3]")
    return [_parse(p.strip()) for p in parts]


def _too_many(target: str) -> InvalidInput:
    return InvalidInput(f"target {_short(target)} names more than {MAX_TARGETS} VMs", hint="split it")


class _Range:
    """One name or one ``prefix[spans]suffix``: its size is known before any name is made."""

    def __init__(self, prefix: str, spans: list[tuple[int, int]] | None, suffix: str = "") -> None:
        self.prefix, self.spans, self.suffix = prefix, spans, suffix
        self.size = 1 if spans is None else sum(hi - lo + 1 for lo, hi in spans)

    def names(self) -> list[str]:
        if self.spans is None:
            return [self.prefix]
        names = dict.fromkeys(f"{self.prefix}{n}{self.suffix}" for lo, hi in self.spans for n in range(lo, hi + 1))
        return [check_name(n) for n in names]


def _parse(target: str) -> _Range:
    match = _RANGE.fullmatch(target)
    if match is None:
        if "[" in target or "]" in target:
            raise InvalidInput(f"invalid target {_short(target)}", hint=RANGE_HINT)
        return _Range(check_name(target), None)
    spans = []
    for part in match["spec"].replace(" ", "").split(","):
        span = _SPAN.fullmatch(part)
        if span is None:
            raise InvalidInput(f"invalid range {_short(part)} in {_short(target)}", hint=RANGE_HINT)
        lo, hi = span["lo"], span["hi"] or span["lo"]
        if max(len(lo), len(hi)) > NAME_MAX:  # no name that long is valid; and int() of it costs
            raise InvalidInput(f"invalid range {_short(part)} in {_short(target)}: a bound of more than "
                               f"{NAME_MAX} digits", hint=RANGE_HINT)
        start, stop = int(lo), int(hi)
        if stop < start:
            raise InvalidInput(f"empty range {_short(part)} in {_short(target)}",
                               hint="the lower bound comes first: name[1-10]")
        spans.append((start, stop))
    return _Range(match["prefix"], spans, match["suffix"])

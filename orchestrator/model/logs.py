"""Structured logs: one line per event, with the job, VM, namespace, host and lock it concerns.

Every vmorch process (worker, API, scheduler) calls ``setup(fmt, level)`` once at start.
Code that works on a job says so once with ``bound(job=..., namespace=..., vm=...)``; every
line logged inside (by vmorch, Celery or the lock module) then carries those fields. A
process-wide field (the worker's ``host``) is set with ``bind_process``. Lock messages
carry ``lock`` and ``lock_level`` as ``extra``.

``json`` gives one JSON object per line (python-json-logger), for Loki, Elasticsearch or
``jq``; ``text`` appends the same fields as ``key=value`` to a classic line.

Either way a URL's password never reaches a log line (``scrub``): code should log URLs
redacted (``redisconn.redact``) anyway; this catches what a library or an exception quotes.
"""

from __future__ import annotations

import contextvars
import logging
import re
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any, TextIO

from pythonjsonlogger.json import JsonFormatter

from orchestrator.model.errors import InvalidInput

FORMATS = ("text", "json")
#: the context fields, in the order the text format prints them
FIELDS = ("host", "namespace", "vm", "job", "op", "lock", "lock_level")

_context: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "vmorch_log_context", default=MappingProxyType({}))
_process: dict[str, Any] = {}
_format = "text"


@contextmanager
def bound(**fields: Any) -> Iterator[None]:
    """Attach ``fields`` to every line logged in this context (thread or task) until the block ends."""
    token = _context.set({**_context.get(), **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _context.reset(token)


def bind(**fields: Any) -> None:
    """Add ``fields`` to the current context; undone when the enclosing ``bound`` block ends."""
    _context.set({**_context.get(), **{k: v for k, v in fields.items() if v is not None}})


def bind_process(**fields: Any) -> None:
    """Fields of the whole process, such as the worker's host."""
    _process.update({k: v for k, v in fields.items() if v is not None})


class ContextFilter(logging.Filter):
    """Copies the process's and the context's fields onto each record (a record's own ``extra`` wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in {**_process, **_context.get()}.items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


#: ``scheme://[user]:PASSWORD@`` in a URL (a password in a URL is quoted: no '@', '/' or space in it)
_URL_PASSWORD = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)[^@/\s]+@")
#: ``?password=...`` and ``&sentinel_password=...`` in a URL's query
_QUERY_PASSWORD = re.compile(r"([?&](?:sentinel_)?password=)[^&\s'\"]+")


def scrub(text: str) -> str:
    """``text`` with every URL's password replaced by ``***``."""
    if "://" not in text:
        return text
    return _QUERY_PASSWORD.sub(r"\1***", _URL_PASSWORD.sub(r"\1***@", text))


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = scrub(super().format(record))
        pairs = " ".join(f"{k}={getattr(record, k)}" for k in FIELDS if getattr(record, k, None) not in (None, ""))
        if not pairs:
            return line
        head, newline, rest = line.partition("\n")  # a traceback stays below the line, not after it
        return f"{head} [{pairs}]{newline}{rest}"


class _ScrubbedJsonFormatter(JsonFormatter):
    def format(self, record: logging.LogRecord) -> str:
        return scrub(super().format(record))


def formatter(fmt: str) -> logging.Formatter:
    if fmt == "json":
        return _ScrubbedJsonFormatter("%(levelname)s %(name)s %(message)s", timestamp="time",
                                      rename_fields={"levelname": "level", "name": "logger"})
    if fmt == "text":
        return TextFormatter()
    raise InvalidInput(f"unknown log format {fmt!r}", hint=f"use one of: {', '.join(FORMATS)}")


def structured() -> bool:
    """Whether logs are JSON lines (then nothing else may be printed, such as Celery's banner)."""
    return _format == "json"


def setup(fmt: str = "text", level: str = "INFO", stream: TextIO | None = None) -> None:
    """Send every logger's records (and Python warnings), one line each, to ``stream`` (stderr) as ``fmt``."""
    global _format
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter(fmt))
    _format = fmt
    logging.captureWarnings(True)
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    try:
        root.setLevel(level.upper())
    except ValueError:
        raise InvalidInput(f"unknown log level {level!r}", hint="use DEBUG, INFO, WARNING or ERROR") from None

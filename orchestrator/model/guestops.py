"""The params of the operations that reach into a guest through its agent: ``vm exec`` and ``vm cp``."""

from __future__ import annotations

import base64

from pydantic import Field, field_validator

from orchestrator.model.params import Params

#: what ``exec`` brings back of each of stdout and stderr (the rest is cut, and the result says so),
#: what it may feed the command on stdin, and the largest file ``cp`` copies either way
EXEC_OUTPUT_MAX = 64 * 1024
EXEC_INPUT_MAX = 64 * 1024
CP_MAX_BYTES = 1024 * 1024
_GUEST_TEXT_MAX = 4096


def _guest_text(value: str, what: str) -> str:
    if "\0" in value:
        raise ValueError(f"{what} contains a NUL character")
    if len(value) > _GUEST_TEXT_MAX:
        raise ValueError(f"{what} is longer than {_GUEST_TEXT_MAX} characters")
    return value


class ExecParams(Params):
    #: the program (looked up in the guest's PATH) and its arguments
    command: list[str] = Field(min_length=1, max_length=1000)
    #: fail the job if the command has not finished by then (waiting for the agent included)
    timeout_s: float = Field(default=60.0, gt=0, le=3600)
    #: given to the command on its standard input
    input: str | None = Field(default=None, max_length=EXEC_INPUT_MAX)
    #: a non-zero exit fails the job (an experiment step that checks something); else it is the result
    check: bool = False

    @field_validator("command")
    @classmethod
    def _command(cls, command: list[str]) -> list[str]:
        if not command[0]:
            raise ValueError("the command is empty")
        return [_guest_text(arg, "the command") for arg in command]


class CpParams(Params):
    #: the file in the guest (an absolute path)
    path: str = Field(min_length=2)
    #: base64 of the bytes to write there; None: read the file out of the guest (the job's result has it)
    content: str | None = Field(default=None, max_length=(CP_MAX_BYTES + 2) // 3 * 4)
    timeout_s: float = Field(default=60.0, gt=0, le=3600)

    @field_validator("path")
    @classmethod
    def _path(cls, path: str) -> str:
        if not path.startswith("/"):
            raise ValueError("the path in the guest must be absolute")
        return _guest_text(path, "the path")

    @field_validator("content")
    @classmethod
    def _content(cls, content: str | None) -> str | None:
        if content is not None:
            try:
                base64.b64decode(content, validate=True)
            except ValueError:
                raise ValueError("content must be base64") from None
        return content

"""The operation: what a user asked for, one frozen value passed from CLI to worker.

An ``Operation`` is the request (Ganeti's opcode, dramatiq's ``Message``); the ``Job``
beside it (``orchestrator.job``) is its execution record.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from enum import StrEnum
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator, model_validator

from orchestrator.model.errors import InvalidInput
from orchestrator.model.guestdata import (
    SSH_KEYS_MAX,
    USER_DATA_MAX,
    check_image_name,
    check_ssh_key,
    check_user_data,
)
from orchestrator.model.guestops import CP_MAX_BYTES as CP_MAX_BYTES  # re-exported: every op's params are here
from orchestrator.model.guestops import EXEC_INPUT_MAX as EXEC_INPUT_MAX
from orchestrator.model.guestops import EXEC_OUTPUT_MAX as EXEC_OUTPUT_MAX
from orchestrator.model.guestops import CpParams as CpParams
from orchestrator.model.guestops import ExecParams as ExecParams
from orchestrator.model.names import HostName, Name, Namespace, check_name, check_tag, expand_target
from orchestrator.model.network import NICS_MAX, Shaping
from orchestrator.model.params import Params

MIB_MIN, MIB_MAX = 16, 4 * 1024 * 1024
VCPUS_MAX = 256


class Op(StrEnum):
    LAUNCH = "launch"
    START = "start"
    STOP = "stop"
    KILL = "kill"
    PAUSE = "pause"
    RESUME = "resume"
    REBOOT = "reboot"
    DELETE = "delete"
    SET = "set"
    SNAPSHOT = "snapshot"
    REVERT = "revert"
    #: delete one snapshot (``vm snapshot-delete``); a missing one is already deleted (changed=false)
    SNAPSHOT_DELETE = "snapshot-delete"
    TAG = "tag"
    #: ``vm move`` is two jobs in the VM's order: out on the source host, in on the target
    MOVE_OUT = "move-out"
    MOVE_IN = "move-in"
    #: run a command in the guest through its agent (``vm exec``), and copy a file in or out (``vm cp``)
    EXEC = "exec"
    CP = "cp"


class NoParams(Params):
    pass


class LaunchParams(Params):
    memory_mib: int = Field(default=128, ge=MIB_MIN, le=MIB_MAX)
    vcpus: int = Field(default=1, ge=1, le=VCPUS_MAX)
    #: size of the qcow2 disk vmorch creates; 0 = no disk
    disk_gib: int = Field(default=1, ge=0, le=16 * 1024)
    #: a catalog image's name (``vmorch image list``): the disk is a copy-on-write overlay of it
    image: str | None = Field(default=None, max_length=4096)
    #: cloud-init user-data (its content, never a path), on the VM's NoCloud seed
    cloud_init: str | None = Field(default=None, max_length=USER_DATA_MAX)
    #: OpenSSH public keys for the guest (cloud-init's ``ssh_authorized_keys``)
    ssh_keys: list[str] = Field(default_factory=list, max_length=SSH_KEYS_MAX)
    #: pin to this host; None lets placement choose
    host: HostName | None = None
    #: placement only considers hosts with all these labels
    host_labels: dict[str, str] = Field(default_factory=dict)
    #: place on the host of this VM
    colocate: Name | None = None
    #: a range goes round the hosts instead of filling the emptiest first
    spread: bool = False
    tags: dict[str, str] = Field(default_factory=dict)
    #: one NIC on each of these networks of the namespace, in order (none: a user-mode NIC)
    nets: list[Name] = Field(default_factory=list, max_length=NICS_MAX)

    @model_validator(mode="after")
    def _one_placement(self) -> LaunchParams:
        if self.host is not None and self.colocate is not None:
            raise ValueError("give --host or --colocate, not both")
        if self.image is not None and self.disk_gib == 0:
            raise ValueError("image: a catalog image needs a disk (give --disk 1 or more)")
        if (self.cloud_init is not None or self.ssh_keys) and self.image is None:
            raise ValueError("cloud_init: user-data and SSH keys need --image (a guest that reads them)")
        return self

    @field_validator("tags", "host_labels")
    @classmethod
    def _tags(cls, tags: dict[str, str]) -> dict[str, str]:
        for key, value in tags.items():
            _check_tag(key, value)
        return tags

    @field_validator("image")
    @classmethod
    def _image(cls, image: str | None) -> str | None:
        return None if image is None else _as_value_error(check_image_name, image)

    @field_validator("cloud_init")
    @classmethod
    def _cloud_init(cls, text: str | None) -> str | None:
        return None if text is None else _as_value_error(check_user_data, text)

    @field_validator("ssh_keys")
    @classmethod
    def _ssh_keys(cls, lines: list[str]) -> list[str]:
        return [_as_value_error(check_ssh_key, line, f"SSH key {i}") for i, line in enumerate(lines, 1)]


class RebootParams(Params):
    force: bool = False  # at once: a reboot resets, a stop powers off (no request, no wait)
    timeout_s: float = Field(default=60.0, ge=0, le=3600)  # the request repeated every few s till then; 0: once


class StopParams(RebootParams):
    force_after_timeout: bool = False  # once timeout_s passed: power off instead of failing


class SetParams(Params):
    memory_mib: int | None = Field(default=None, ge=MIB_MIN, le=MIB_MAX)
    vcpus: int | None = Field(default=None, ge=1, le=VCPUS_MAX)
    #: a NIC's link emulation (its index in ``vm show``): the values given replace those set, 0 clears one
    nic: int | None = Field(default=None, ge=0, lt=NICS_MAX)
    shaping: Shaping | None = None

    @model_validator(mode="after")
    def _something(self) -> SetParams:
        if (self.nic is None) != (self.shaping is None) or (self.shaping is not None and self.shaping.empty):
            raise ValueError("give --nic N with --delay, --loss and/or --rate")
        if self.memory_mib is None and self.vcpus is None and self.nic is None:
            raise ValueError("give --memory, --vcpus and/or --nic N with --delay, --loss, --rate")
        return self


class SnapshotParams(Params):
    name: Name


class TagParams(Params):
    set: dict[str, str] = Field(default_factory=dict)
    remove: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _something(self) -> TagParams:
        if not self.set and not self.remove:
            raise ValueError("give tags to set (key=value) and/or to remove (--remove key)")
        for key, value in self.set.items():
            _check_tag(key, value)
        for key in self.remove:
            _check_tag(key, "")
        return self


class MoveOutParams(Params):
    to: HostName
    live: bool = False


class MoveInParams(Params):
    source: HostName


def _typed_params(data: Any) -> Any:
    """``params`` as the model of ``op`` (a dict is validated by it; another model is refused)."""
    if isinstance(data, dict) and "op" in data:
        try:
            model = PARAMS[Op(data["op"])]
        except ValueError:
            return data  # the field validator reports the unknown op
        raw = data.get("params")
        if raw is None or isinstance(raw, dict):
            data = {**data, "params": model.model_validate(raw or {})}
        elif type(raw) is not model:  # exactly: a StopParams is a RebootParams too
            raise ValueError(f"params of {data['op']} must be {model.__name__}")
    return data


def _as_value_error(check: Callable[..., str], *args: str) -> str:
    try:
        return check(*args)
    except InvalidInput as exc:
        raise ValueError(f"{exc.message} ({exc.hint})" if exc.hint else exc.message) from None


def _check_tag(key: str, value: str) -> None:
    try:
        check_tag(key, value)
    except InvalidInput as exc:
        raise ValueError(f"{exc.message} ({exc.hint})") from None


PARAMS: dict[Op, type[Params]] = {
    Op.LAUNCH: LaunchParams,
    Op.START: NoParams,
    Op.STOP: StopParams,
    Op.KILL: NoParams,
    Op.PAUSE: NoParams,
    Op.RESUME: NoParams,
    Op.REBOOT: RebootParams,
    Op.DELETE: NoParams,
    Op.SET: SetParams,
    Op.SNAPSHOT: SnapshotParams,
    Op.REVERT: SnapshotParams,
    Op.SNAPSHOT_DELETE: SnapshotParams,
    Op.TAG: TagParams,
    Op.MOVE_OUT: MoveOutParams,
    Op.MOVE_IN: MoveInParams,
    Op.EXEC: ExecParams,
    Op.CP: CpParams,
}


class Operation(BaseModel):
    """One operation on one VM. Frozen; encodes and decodes itself as JSON."""

    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)
    encoding: ClassVar[str] = "json"

    op: Op
    namespace: Namespace
    vm: Name
    params: SerializeAsAny[Params] = Field(default_factory=NoParams)

    @model_validator(mode="before")
    @classmethod
    def _typed_params(cls, data: Any) -> Any:
        return _typed_params(data)

    @classmethod
    def build(cls, op: Op | str, namespace: str, vm: str, **params: Any) -> Operation:
        """Build and validate; any problem becomes one ``InvalidInput`` naming the field."""
        try:
            return cls.model_validate({"op": op, "namespace": namespace, "vm": vm, "params": params})
        except ValidationError as exc:
            raise invalid_input(exc) from None

    def encode(self) -> str:
        return self.model_dump_json()

    @classmethod
    def decode(cls, data: str | bytes) -> Operation:
        return cls.model_validate_json(data)


#: the ``vmorch vm`` command of each operation a user can ask for (a move-in is made by ``vm move``)
COMMANDS: dict[Op, str] = {**{o: o.value for o in Op if o not in (Op.MOVE_OUT, Op.MOVE_IN)}, Op.MOVE_OUT: "move"}


class TargetedOp(BaseModel):
    """One operation over a TARGET and/or tags, as ``vmorch vm OP TARGET --tag k=v`` asks for it.

    What a schedule stores: its VMs are resolved, and its ``Operation``s built (one per VM, with these
    very params), each time it fires, through the same submit path as the CLI.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    op: Op
    #: a name, a list a,b or a range web[1-10]; None: every VM with the tags of ``tag``
    target: str | None = Field(default=None, min_length=1, max_length=1000)
    #: only VMs with all these tags
    tag: dict[str, str] = Field(default_factory=dict)
    params: SerializeAsAny[Params] = Field(default_factory=NoParams)

    @model_validator(mode="before")
    @classmethod
    def _typed_params(cls, data: Any) -> Any:
        return _typed_params(data)

    @model_validator(mode="after")
    def _targets(self) -> TargetedOp:
        if self.op is Op.MOVE_IN:
            raise ValueError("move-in jobs are made by a move (op move-out)")
        if self.target is None and not self.tag:
            raise ValueError("give a target (web1, web[1-10], a,b) and/or tags")
        if self.op is Op.LAUNCH and (self.target is None or self.tag):
            raise ValueError("a launch names its new VMs in target, and selects none by tag")
        for key, value in self.tag.items():
            _check_tag(key, value)
        if self.target is not None:
            try:
                expand_target(self.target)
            except InvalidInput as exc:
                raise ValueError(f"{exc.message} ({exc.hint})" if exc.hint else exc.message) from None
        return self

    def operations(self, namespace: str, names: list[str]) -> list[Operation]:
        """The operations on ``names`` (what the target and tags resolved to), with these params."""
        try:
            return [Operation(op=self.op, namespace=namespace, vm=name, params=self.params) for name in names]
        except ValidationError as exc:
            raise invalid_input(exc) from None

    @property
    def label(self) -> str:
        """What it covers, for people: the target and the tags."""
        return " ".join([self.target or "", *(f"--tag {k}={v}" for k, v in self.tag.items())]).strip()

    def describe(self) -> str:
        """In words, as a command line: ``vm snapshot web[1-3] name=hourly``."""
        given = self.params.model_dump(mode="json", exclude_defaults=True)
        words = [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in given.items()]
        return " ".join(["vm", COMMANDS[self.op], self.label, *words])


def invalid_input(exc: ValidationError) -> InvalidInput:
    """A pydantic error as one line a user can act on."""
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in first["loc"] if p not in ("params",)) or "input"
    msg = first["msg"].removeprefix("Value error, ")
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return InvalidInput(f"{loc}: {msg}{more}", hint="see 'vmorch vm --help' for valid values")


__all__ = ["COMMANDS", "PARAMS", "Op", "Operation", "Params", "TargetedOp", "check_name"]


class SubmitOptions(BaseModel):
    """How a batch of operations is accepted (plain JSON, as the HTTP API takes it)."""

    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)
    #: run only once these jobs succeeded; fail at once ("dependency <id> failed") if one does not
    after: list[int] = Field(default_factory=list)
    #: run once these jobs are final, whatever their state (a teardown)
    after_final: list[int] = Field(default_factory=list)
    #: one parent job over the batch; None: when it has more than one operation
    parent: bool | None = None
    #: what the parent covers, for people (the command's target); default: made from the VM names
    label: str = Field(default="", max_length=200)
    #: the job these re-run (``job retry``)
    retry_of: int | None = None
    #: once their dependencies are met (or at once), wait this many seconds for their turn
    delay_s: float = Field(default=0.0, ge=0, le=7 * 86400)
    #: a job of ``after`` that already failed: "refuse" the batch, or "fail" its jobs at once (a graph
    #: submitted piece by piece, whose first piece may fail before the last is accepted)
    if_dependency_failed: Literal["refuse", "fail"] = "refuse"
    #: a key the client chose for this submission: a repeated submit with it (after a timeout, say)
    #: gets the jobs of the first back and makes none (remembered for a day)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=200, pattern=r"^[!-~]+$")

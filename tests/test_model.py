"""The operation type, the error tree, targets, and the completeness of the dispatch table."""

from __future__ import annotations

import pytest

from orchestrator.model.errors import (
    AlreadyExists,
    FencedOut,
    InvalidInput,
    InvalidState,
    LockOrderError,
    NotFound,
    VmorchError,
)
from orchestrator.model.names import expand_target
from orchestrator.model.operation import PARAMS, LaunchParams, Op, Operation
from worker.handlers import HANDLERS


def test_every_operation_has_params_and_a_handler() -> None:
    assert set(PARAMS) == set(Op)
    assert set(HANDLERS) == set(Op), f"missing handlers: {set(Op) - set(HANDLERS)}"


@pytest.mark.parametrize("op", list(Op))
def test_operation_round_trips_through_json(op: Op) -> None:
    params = {Op.LAUNCH: {"memory_mib": 64, "tags": {"role": "web"}}, Op.SET: {"memory_mib": 256},
              Op.SNAPSHOT: {"name": "s1"}, Op.REVERT: {"name": "s1"}, Op.TAG: {"set": {"a": "b"}},
              Op.STOP: {"force": True}, Op.MOVE_OUT: {"to": "h2"}, Op.MOVE_IN: {"source": "h1"}}.get(op, {})
    operation = Operation.build(op, "default", "web1", **params)
    decoded = Operation.decode(operation.encode())
    assert decoded == operation
    assert type(decoded.params) is PARAMS[op]


def test_operation_is_frozen() -> None:
    operation = Operation.build(Op.PAUSE, "default", "web1")
    with pytest.raises(Exception, match="frozen"):
        operation.vm = "other"  # type: ignore[misc]


@pytest.mark.parametrize(("op", "vm", "params", "field"), [
    (Op.LAUNCH, "web1", {"memory_mib": -5}, "memory_mib"),
    (Op.LAUNCH, "web1", {"vcpus": 0}, "vcpus"),
    (Op.LAUNCH, "web1", {"image": "relative.qcow2"}, "image"),
    (Op.LAUNCH, "web1", {"tags": {"bad key": "v"}}, "tags"),
    (Op.PAUSE, "a.b", {}, "vm"),
    (Op.PAUSE, "-x", {}, "vm"),
    (Op.PAUSE, "x" * 64, {}, "vm"),
    (Op.SET, "web1", {}, "memory"),
    (Op.SNAPSHOT, "web1", {"name": "a b"}, "name"),
    (Op.PAUSE, "web1", {"force": True}, "force"),
])
def test_bad_operations_are_refused_naming_the_field(op: Op, vm: str, params: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidInput) as info:
        Operation.build(op, "default", vm, **params)
    assert field in info.value.message
    assert info.value.exit_code == 2


def test_launch_defaults() -> None:
    params = Operation.build(Op.LAUNCH, "default", "web1").params
    assert isinstance(params, LaunchParams)
    assert (params.memory_mib, params.vcpus, params.disk_gib) == (128, 1, 1)


@pytest.mark.parametrize(("target", "names"), [
    ("web1", ["web1"]),
    ("web[1-3]", ["web1", "web2", "web3"]),
    ("web[1,3,5-7]", ["web1", "web3", "web5", "web6", "web7"]),
    ("n[8-10]x", ["n8x", "n9x", "n10x"]),
    ("web[2,2,1]", ["web2", "web1"]),
])
def test_targets(target: str, names: list[str]) -> None:
    assert expand_target(target) == names


@pytest.mark.parametrize("target", ["web[3-1]", "web[1-]", "web[a-b]", "web[1-3", "we]b", "web[1-20000]", "a.b[1-2]"])
def test_bad_targets(target: str) -> None:
    with pytest.raises(InvalidInput):
        expand_target(target)


@pytest.mark.parametrize("cls", [InvalidInput, NotFound, AlreadyExists, InvalidState, FencedOut, LockOrderError])
def test_errors_cross_redis_with_their_class(cls: type[VmorchError]) -> None:
    error = cls("something", hint="do this")
    again = VmorchError.from_dict(error.to_dict())
    assert type(again) is cls
    assert (again.message, again.hint, again.exit_code) == ("something", "do this", cls.exit_code)


def test_exit_codes() -> None:
    assert InvalidInput("x").exit_code == 2
    assert NotFound("x").exit_code == 3
    assert InvalidState("x").exit_code == 1

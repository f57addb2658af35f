"""The operation type, the error tree, targets, and the completeness of the dispatch table."""

from __future__ import annotations

import time
import tracemalloc

import pytest
from pydantic import ValidationError

from orchestrator.model.errors import (
    AlreadyExists,
    FencedOut,
    InvalidInput,
    InvalidState,
    LockOrderError,
    NotFound,
    VmorchError,
)
from orchestrator.model.names import (
    MAX_TARGETS,
    check_name,
    check_namespace,
    check_tag,
    expand_target,
    refuse_bad_text,
    target_size,
)
from orchestrator.model.operation import PARAMS, LaunchParams, Op, Operation
from worker.handlers import HANDLERS


def test_every_operation_has_params_and_a_handler() -> None:
    assert set(PARAMS) == set(Op)
    assert set(HANDLERS) == set(Op), f"missing handlers: {set(Op) - set(HANDLERS)}"


@pytest.mark.parametrize("op", list(Op))
def test_operation_round_trips_through_json(op: Op) -> None:
    params = {Op.LAUNCH: {"memory_mib": 64, "tags": {"role": "web"}}, Op.SET: {"memory_mib": 256},
              Op.SNAPSHOT: {"name": "s1"}, Op.REVERT: {"name": "s1"}, Op.SNAPSHOT_DELETE: {"name": "s1"},
              Op.TAG: {"set": {"a": "b"}},
              Op.STOP: {"force": True}, Op.MOVE_OUT: {"to": "h2"}, Op.MOVE_IN: {"source": "h1"},
              Op.EXEC: {"command": ["uname", "-a"], "timeout_s": 5}, Op.CP: {"path": "/tmp/x", "content": "aGk="},
              }.get(op, {})
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
    (Op.LAUNCH, "web1", {"tags": {"role": "\ud800"}}, "tags"),
    (Op.TAG, "web1", {"set": {"role": "a\x00b"}}, "tag"),
    (Op.PAUSE, "web1\n", {}, "vm"),
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


@pytest.mark.parametrize("target", ["web[3-1]", "web[1-]", "web[a-b]", "web[1-3", "we]b", "web[1-20000]", "a.b[1-2]",
                                    "web[1-2-3]", "web[-3]", "web[\u0663]", "web1\n", "a,,b", "x[1-2][3-4]"])
def test_bad_targets(target: str) -> None:
    with pytest.raises(InvalidInput):
        expand_target(target)


@pytest.mark.parametrize(("target", "size"), [
    ("web1", 1), ("web[1-3]", 3), ("web[1,3,5-7]", 5), ("a,b,web[1-2]", 4), ("x[1-20000000]", 20_000_000),
    ("x[0-9999999999999999999999]", 10**22), ("x[1-5000],y[1-5001]", 10_001),
])
def test_a_target_is_counted_without_expanding_it(target: str, size: int) -> None:
    assert target_size(target) == size


@pytest.mark.parametrize("target", [
    "x[0-9999999999999999999999]",  # range() of it was an OverflowError
    "x[1-20000000]",  # expanded, ~700 MB, before the limit refused it
    "x[1-5000],y[1-5001]",
    ",".join(["a"] * (MAX_TARGETS + 1)),
    "x[1-10000,1-10000]",  # a name given twice counts twice, as it always did
])
def test_too_many_targets_are_refused_before_any_is_made(target: str) -> None:
    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(InvalidInput, match=f"names more than {MAX_TARGETS} VMs") as info:
            expand_target(target)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.monotonic() - started < 0.5
    assert peak < 2 * 1024 * 1024, peak  # (expanding x[1-20000000] took ~700 MB)
    assert info.value.hint == "split it" and "\n" not in info.value.message and len(info.value.message) < 200


def test_a_bound_is_at_most_as_long_as_a_name() -> None:
    with pytest.raises(InvalidInput, match="a bound of more than 63 digits"):
        expand_target("x[" + "9" * 5000 + "]")  # int() of it is a ValueError (and quadratic)
    assert expand_target("x[" + "9" * 18 + "]") == ["x" + "9" * 18]


@pytest.mark.parametrize(("key", "value", "message"), [
    ("role", "\ud800", "invalid value for tag 'role': not valid UTF-8: lone surrogate '\\ud800' at character 0"),
    ("role", "web\udcff", "lone surrogate '\\udcff' at character 3"),
    ("ro\ud800", "web", "invalid tag key 'ro\\ud800'"),
    ("role", "a\nb", "invalid value for tag 'role': control character '\\n' at character 1"),
    ("role", "a\x7f", "control character '\\x7f'"),
    ("role", "\x85", "control character '\\x85'"),
    ("role\n", "web", "invalid tag key 'role\\n'"),  # "$" of a regex matches before a final newline
    ("role", "x" * 257, "longer than 256 characters"),
])
def test_tags_that_cannot_be_stored_are_refused(key: str, value: str, message: str) -> None:
    with pytest.raises(InvalidInput) as info:
        check_tag(key, value)
    assert message in info.value.message and info.value.hint
    info.value.message.encode()  # the message itself can be printed and stored


def test_names_refuse_a_final_newline() -> None:
    for check in (check_name, check_namespace):
        with pytest.raises(InvalidInput, match="\\\\n"):
            check("web1\n")
    assert check_tag("role", "web, db: \u00e9\U0001f600") == ("role", "web, db: \u00e9\U0001f600")


def test_a_request_body_is_refused_at_its_first_string_that_cannot_be_stored() -> None:
    body = {"operations": [{"vm": "ok", "params": {"tags": {"role": "\ud800"}}}], "options": {"label": "ok"}}
    with pytest.raises(ValidationError) as info:
        refuse_bad_text(body)
    [error] = info.value.errors()
    assert error["loc"] == ("operations", 0, "params", "tags", "role") and "lone surrogate" in error["msg"]
    with pytest.raises(ValidationError) as info:
        refuse_bad_text({"params": {"\udc80": 1}})
    assert info.value.errors()[0]["loc"] == ("params",) and "key '\\udc80'" in info.value.errors()[0]["msg"]
    assert refuse_bad_text(body | {"operations": []}) is not None


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

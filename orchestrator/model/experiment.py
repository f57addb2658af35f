"""Experiment files (YAML): VMs to launch, ordered steps, a teardown; checked with their line numbers.

An experiment runs as a job graph (``RedisClient.run_experiment``): the launches are one
parent job; each step is one parent job over its VMs, submitted ``--after`` the steps it
follows (by default the one before it), so a step whose dependency failed fails at once;
the teardown steps wait for every other step to be *final* (whatever its state), so they
run even when a step failed.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from orchestrator.model.errors import InvalidInput
from orchestrator.model.names import Name, Namespace, check_name, check_tag, expand_target
from orchestrator.model.operation import Op, Operation

#: ops a step may run (launches are the ``vms:`` section; a move is two jobs made by ``vm move``)
STEP_OPS = sorted(o.value for o in Op if o not in (Op.LAUNCH, Op.MOVE_OUT, Op.MOVE_IN))
MAX_VMS = 1000
_DURATION = re.compile(r"^(\d+)\s*([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration_seconds(value: str) -> int:
    """``"30s"``, ``"10m"``, ``"1h"``, ``"1d"`` in seconds (at least one)."""
    match = _DURATION.match(value.strip())
    if not match or int(match[1]) == 0:
        raise InvalidInput(f"bad duration {value!r}", hint="write a number and a unit: 30s, 10m, 1h, 1d")
    return int(match[1]) * _UNITS[match[2]]


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class VmSpec(_Strict):
    #: a name or a range (``web[1-3]``); with ``count``, the prefix of ``name1``..``nameN``
    name: str
    count: int | None = Field(default=None, ge=1, le=MAX_VMS)
    memory: int = Field(default=64, ge=16)
    vcpus: int = Field(default=1, ge=1)
    disk: int = Field(default=0, ge=0)
    #: a catalog image's name
    image: str | None = None
    #: cloud-init user-data, inline (a ``|`` block), and OpenSSH public keys, one per item
    cloud_init: str | None = None
    ssh_keys: list[str] = Field(default_factory=list)
    host: str | None = None
    tags: dict[str, str] = Field(default_factory=dict)
    #: one NIC on each of these networks, in order (the file's ``networks:`` or existing ones)
    nets: list[str] = Field(default_factory=list)

    def names(self) -> list[str]:
        if self.count is not None:
            return [check_name(f"{self.name}{i}") for i in range(1, self.count + 1)]
        return expand_target(self.name)

    def launch_params(self) -> dict[str, Any]:
        return {"memory_mib": self.memory, "vcpus": self.vcpus, "disk_gib": self.disk, "image": self.image,
                "cloud_init": self.cloud_init, "ssh_keys": self.ssh_keys, "host": self.host, "tags": self.tags,
                "nets": self.nets}


class NetSpec(_Strict):
    """A network the experiment uses: created before its VMs if missing (an existing one with the same
    subnet is used as it is), deleted once its teardown is final if the experiment created it."""

    name: Name
    subnet: str
    dhcp: bool = True
    nat: bool = False


class Step(_Strict):
    name: str | None = None
    op: str
    #: the VMs: a name, a list a,b or a range; and/or tags they must carry
    target: str | None = None
    tag: dict[str, str] = Field(default_factory=dict)
    params: dict[str, Any] = Field(default_factory=dict)
    #: names of the steps to wait for (they must succeed); default: the step before
    after: list[str] | None = None
    #: then wait this long before starting ("30s", "5m"): to let a workload run, say
    wait: str | None = None

    @field_validator("wait")
    @classmethod
    def _wait(cls, wait: str | None) -> str | None:
        if wait is not None:
            try:
                duration_seconds(wait)
            except InvalidInput as exc:
                raise ValueError(exc.message) from None
        return wait

    @property
    def wait_s(self) -> float:
        return float(duration_seconds(self.wait)) if self.wait else 0.0

    @field_validator("op")
    @classmethod
    def _op(cls, op: str) -> str:
        if op not in STEP_OPS:
            raise ValueError(f"unknown step op {op!r}; one of: {', '.join(STEP_OPS)}")
        return op


class Experiment(_Strict):
    name: Name
    namespace: Namespace | None = None
    description: str = ""
    networks: list[NetSpec] = Field(default_factory=list)
    vms: list[VmSpec] = Field(default_factory=list)
    steps: list[Step] = Field(default_factory=list)
    #: steps that run once every other step is final, or "delete": delete all the experiment's VMs
    teardown: list[Step] | Literal["delete"] = Field(default_factory=list)

    def vm_names(self) -> list[str]:
        return [n for spec in self.vms for n in spec.names()]

    def teardown_steps(self) -> list[Step]:
        if self.teardown == "delete":
            names = self.vm_names()
            return [Step(name="teardown", op="delete", target=",".join(names))] if names else []
        return list(self.teardown)


class Problem(BaseModel):
    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line else ""
        return f"{where}{self.field}: {self.message}" if self.field else f"{where}{self.message}"


def step_name(step: Step, index: int, prefix: str = "step") -> str:
    return step.name or f"{prefix}{index + 1}"


def parse(text: str) -> tuple[Experiment | None, list[Problem]]:
    """The experiment and every problem found in it, each with its line (1-based) where known."""
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        return None, [Problem(line=mark.line + 1 if mark else None, field="",
                              message=f"not valid YAML: {getattr(exc, 'problem', exc)}")]
    if not isinstance(data, dict):
        return None, [Problem(line=1, field="", message="an experiment is a mapping (name:, vms:, steps:, ...)")]
    try:
        exp = Experiment.model_validate(data)
    except ValidationError as exc:
        problems = []
        for e in exc.errors():
            loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith(("list[", "literal["))))
            problems.append(Problem(line=_line(root, loc), field=_dotted(loc),
                                    message=e["msg"].removeprefix("Value error, ")))
        # the entries that are well-formed on their own can still be checked on their own
        problems += [Problem(line=_line(root, loc), field=_dotted(loc), message=msg) for loc, msg in _piecewise(data)]
        return None, sorted(_dedupe(problems), key=lambda p: p.line or 0)
    problems = [Problem(line=_line(root, loc), field=_dotted(loc), message=msg) for loc, msg in _semantics(exp)]
    return (exp if not problems else None), sorted(problems, key=lambda p: p.line or 0)


def load(text: str) -> Experiment:
    """The experiment, or ``InvalidInput`` naming its first problem (and how many there are)."""
    exp, problems = parse(text)
    if exp is None:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise InvalidInput(f"bad experiment: {problems[0]}{more}",
                           hint="see every problem with 'vmorch experiment validate FILE'")
    return exp


def _semantics(exp: Experiment) -> list[tuple[tuple[Any, ...], str]]:
    """What the models can't see alone: names, ranges, step references, each op's parameters, subnets."""
    out = _vm_problems(exp) + _net_problems(exp)
    for section, steps in (("steps", exp.steps), ("teardown", exp.teardown_steps())):
        names_so_far: list[str] = []
        for i, step in enumerate(steps):
            loc: tuple[Any, ...] = (section, i) if section == "steps" or exp.teardown != "delete" else ("teardown",)
            name = step_name(step, i, "step" if section == "steps" else "teardown")
            if name in names_so_far:
                out.append(((*loc, "name"), f"step name {name!r} is used twice"))
            out += [((*loc, *sub), msg) for sub, msg in _step_problems(step)]
            for j, dep in enumerate(step.after or []):
                if dep not in names_so_far:
                    what = "step" if section == "steps" else "teardown step"
                    out.append(((*loc, "after", j), f"no earlier {what} named {dep!r}"))
            names_so_far.append(name)
    return out


def _piecewise(data: dict[str, Any]) -> list[tuple[tuple[Any, ...], str]]:
    """The checks of each entry that validates on its own (when the whole file doesn't)."""
    out: list[tuple[tuple[Any, ...], str]] = []
    for section in ("vms", "steps", "teardown"):
        items = data.get(section)
        for i, raw in enumerate(items if isinstance(items, list) else []):
            try:
                if section == "vms":
                    problem = _spec_problem(VmSpec.model_validate(raw))
                    out += [((section, i), problem)] if problem else []
                else:
                    out += [((section, i, *sub), msg) for sub, msg in _step_problems(Step.model_validate(raw))]
            except ValidationError:
                continue  # reported already
    return out


def _spec_problem(spec: VmSpec) -> str | None:
    try:
        Operation.build(Op.LAUNCH, "default", spec.names()[0], **spec.launch_params())
    except InvalidInput as exc:
        return exc.message
    return None


def _net_problems(exp: Experiment) -> list[tuple[tuple[Any, ...], str]]:
    from orchestrator.model.network import check_subnet, subnets_overlap

    out: list[tuple[tuple[Any, ...], str]] = []
    seen: dict[str, str] = {}
    for i, net in enumerate(exp.networks):
        try:
            subnet = check_subnet(net.subnet)
        except InvalidInput as exc:
            out.append((("networks", i, "subnet"), exc.message))
            continue
        if net.name in seen:
            out.append((("networks", i, "name"), f"network {net.name!r} is declared twice"))
        clash = next((n for n, other in seen.items() if subnets_overlap(other, subnet)), None)
        if clash is not None and clash != net.name:
            out.append((("networks", i, "subnet"), f"subnet {subnet} overlaps network {clash!r}"))
        seen[net.name] = subnet
    return out


def _vm_problems(exp: Experiment) -> list[tuple[tuple[Any, ...], str]]:
    out: list[tuple[tuple[Any, ...], str]] = []
    seen: set[str] = set()
    for i, spec in enumerate(exp.vms):
        problem = _spec_problem(spec)
        if problem:
            out.append((("vms", i), problem))
            continue
        names = spec.names()
        for n in names:
            if n in seen:
                out.append((("vms", i, "name"), f"VM {n!r} is declared twice"))
            seen.add(n)
    return out


def _step_problems(step: Step) -> list[tuple[tuple[Any, ...], str]]:
    out: list[tuple[tuple[Any, ...], str]] = []
    if step.target is None and not step.tag:
        out.append(((), "give a target (a name, a list a,b or a range) and/or tag: {key: value}"))
    try:
        if step.target is not None:
            expand_target(step.target)
    except InvalidInput as exc:
        out.append((("target",), exc.message))
    try:
        for key, value in step.tag.items():
            check_tag(key, value)
    except InvalidInput as exc:
        out.append((("tag",), exc.message))
    try:
        Operation.build(step.op, "default", "x", **step.params)
    except InvalidInput as exc:
        out.append((("params",), exc.message.removeprefix("input: ")))
    return out


def _line(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """The line of the deepest YAML node on the path ``loc`` (1-based)."""
    best = node
    for part in loc:
        if isinstance(best, yaml.MappingNode):
            found = None
            for key, value in best.value:
                if key.value == part:
                    found = value if value is not None else key
                    break
            if found is None:
                break
            best = found
        elif isinstance(best, yaml.SequenceNode) and isinstance(part, int) and part < len(best.value):
            best = best.value[part]
        else:
            break
    return best.start_mark.line + 1 if best is not None else None


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _dedupe(problems: list[Problem]) -> list[Problem]:
    seen: set[tuple[int | None, str, str]] = set()
    out = []
    for p in problems:
        if (p.line, p.field, p.message) not in seen:
            seen.add((p.line, p.field, p.message))
            out.append(p)
    return out


__all__ = ["STEP_OPS", "Experiment", "Problem", "Step", "VmSpec", "load", "parse", "step_name"]

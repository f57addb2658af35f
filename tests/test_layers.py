"""The layer rule, as a test: every import in orchestrator/, worker/ and cli/ goes down a layer or
stays in its own, and no set of modules imports itself in a circle.

Every import counts: at the top of a module, inside a function (imported late for start-up time),
and under ``TYPE_CHECKING``. A late or type-only import still makes the lower module know the
upper one, which is what the rule is about.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("orchestrator", "worker", "cli")

#: bottom to top; a module may import its own layer and those before it
LAYERS = (
    "orchestrator.model",     # the operation, records, errors, names, settings: no Redis, no libvirt
    "orchestrator.store",     # Redis: keys, Lua scripts, the job/VM/host store, connections, tokens
    "orchestrator.control",   # the submit path, locks, placement, dependencies, the queue
    "orchestrator.services",  # experiments and schedules, built on the submit path
    "worker",                 # the host agent: uses the layers above, never the edge or the CLI
    "orchestrator.edge",      # the HTTP API and its client, dashboard, cluster metrics, doctor
    "orchestrator.localcluster",  # 'vmorch up': starts every other part as processes
    "cli",
)
#: modules outside every layer that anything may import
SHARED = ("orchestrator",)  # the package itself: __version__


def layer_of(module: str) -> int | None:
    if module.endswith(".__main__"):
        return len(LAYERS) - 1  # an entry point (python -m ...) is imported by nothing: it stands on top
    best: tuple[int, int] | None = None
    for i, prefix in enumerate(LAYERS):
        if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
            best = (i, len(prefix))
    return None if best is None else best[0]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def sources() -> Iterator[tuple[str, Path]]:
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            yield module_name(path), path


def imports_of(module: str, path: Path) -> set[str]:
    """The project modules ``module`` imports (a name imported from a package counts as its module
    when it is one)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] in PACKAGES}


def graph() -> dict[str, set[str]]:
    known = dict(sources())
    edges: dict[str, set[str]] = {}
    for module, path in known.items():
        edges[module] = {m for m in imports_of(module, path) if m in known and m != module}
    return edges


def test_every_module_has_a_layer() -> None:
    loose = [m for m, _ in sources() if m not in SHARED and layer_of(m) is None]
    assert not loose, f"modules outside every layer (add them to a layer folder): {loose}"


def test_no_import_goes_up_a_layer() -> None:
    upward = []
    for module, targets in graph().items():
        here = layer_of(module)
        for target in sorted(targets):
            there = layer_of(target)
            if here is not None and there is not None and there > here:
                upward.append(f"{module} ({LAYERS[here]}) imports {target} ({LAYERS[there]})")
    assert not upward, "imports that go up a layer:\n" + "\n".join(upward)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle() -> None:
    # A package's __init__ that re-exports its modules is not a circle of its own making.
    edges = {m: {t for t in ts if not (m.startswith(t + ".") and t not in SHARED)} for m, ts in graph().items()}
    assert cycles(edges) == []


@pytest.mark.parametrize("edges, expected", [
    ({"a": {"b"}, "b": {"a"}}, [["a", "b"]]),
    ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
])
def test_the_circle_finder_finds_circles(edges: dict[str, set[str]], expected: list[list[str]]) -> None:
    assert cycles(edges) == expected


def test_the_layer_check_sees_an_upward_import(tmp_path: Path) -> None:
    module = tmp_path / "bad.py"
    module.write_text("from orchestrator.edge import doctor\nfrom . import keys\n")
    found = imports_of("orchestrator.store.bad", module)
    assert "orchestrator.edge.doctor" in found and "orchestrator.store.keys" in found
    assert layer_of("orchestrator.edge.doctor") > layer_of("orchestrator.store.bad")  # type: ignore[operator]

"""Imports run down the package's layers (docs/development.md, "Layers"), read from the source."""
from __future__ import annotations

import ast
import collections
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "bids_app"

#: Lowest first; a module may import its own layer and those below it, never one above.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("bids_app", "errors", "killpoints", "settings"),
    ("io", "weights", "compute", "distributed", "interruption", "runlog", "workspace"),
    ("models", "schedulers"),
    ("preprocessing", "synthetic"),
    ("bids", "data", "model_card", "model_store", "image_outputs"),
    ("segmentation",),
    ("pipelines",),
    ("reports",),
    ("participant", "training"),
    ("levels", "demo"),
    ("cli",),
)
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit(module: str) -> str:
    """The layer unit of a module: its sub-package or top-level module (``bids_app`` for the package)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def imports(path: Path) -> set[str]:
    """The bids_app modules a file imports (anywhere in it, functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "bids_app":
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "bids_app")
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges = {}
    for name, path in modules.items():
        # "from bids_app.x import y": y is a module when bids_app.x.y is one, else a name in bids_app.x.
        edges[name] = {m if m in modules else m.rsplit(".", 1)[0] for m in imports(path)}
        edges[name] = {m for m in edges[name] if m in modules and m != name}
    return edges


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    faults = []
    for source, targets in edges.items():
        for target in targets:
            if RANK[unit(target)] > RANK[unit(source)]:
                faults.append(f"{source} imports {target} ({unit(source)} is below {unit(target)})")
    return sorted(faults)


def reachable(edges: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), collections.deque([start])
    while todo:
        for target in edges.get(todo.popleft(), ()):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_every_unit_has_a_layer() -> None:
    assert {unit(m) for m in graph()} <= set(RANK), "a new module or sub-package needs a layer in LAYERS"


def test_imports_run_down_the_layers() -> None:
    assert upward_imports(graph()) == []


def test_the_participant_level_never_reaches_training() -> None:
    reached = reachable(graph(), "bids_app.participant")
    assert not {m for m in reached if unit(m) == "training"}


def test_the_command_line_and_the_participant_level_load_no_training_code() -> None:
    """What a participant run imports before and while it runs (the group level imports training
    inside ``run_group``)."""
    code = ("import sys; from bids_app import cli, levels, participant, pipelines; "
            "print(sorted(m for m in sys.modules if m.startswith('bids_app.training')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=PACKAGE.parent).stdout.strip()
    assert loaded == "[]"


@pytest.mark.parametrize("low", ["models", "schedulers", "preprocessing"])
def test_the_lowest_packages_import_no_app_layer_above(low: str) -> None:
    edges = graph()
    targets = {unit(t) for s, ts in edges.items() if unit(s) == low for t in ts}
    assert not targets & {"bids", "training", "pipelines"}


def test_the_check_sees_an_arrow_up() -> None:
    edges = {"bids_app.io": {"bids_app.bids.derivatives"}, "bids_app.bids.derivatives": {"bids_app.io"}}
    assert upward_imports(edges) == ["bids_app.io imports bids_app.bids.derivatives (io is below bids)"]
    assert reachable({"a": {"b"}, "b": {"c"}}, "a") == {"b", "c"}

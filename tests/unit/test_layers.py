"""The package's import graph: no loops, and every import points down the declared layers.

The order is written down here and in ARCHITECTURE.md (keep them the same). A unit is a top-level
folder of the package (`train`, `data`, ...) or a top-level module (`config`, `pipeline`, ...).
Every import counts, the lazy ones inside functions too: a loop through a function-level import
is still a loop a reader has to untangle.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "platform" / "frugalray"

# Bottom to top. A unit may import units of its own layer or of lower ones, never higher.
LAYERS: list[tuple[str, ...]] = [
    ("config", "config_help", "paths", "stats", "budget", "devices"),  # typed configs (and their --help), paths, statistics, FLOPs, the ledger, hardware
    ("examples",),  # example I/O: loaders, formatting, built-in tasks, the answer rule
    ("models", "ray_utils"),  # finding and loading models; connecting to Ray
    ("train",),  # training sessions, Ray Train fine-tuning, FSDP, memory planning
    ("data",),  # curation: scoring, selection, proxies (uses training)
    ("tune",),  # Ray Tune sweeps under a FLOP cap (uses training)
    ("serve",),  # Ray Serve LLM + vLLM with per-request compute budgets
    ("report", "local_cluster", "benchmarking"),  # reading runs, loopback clusters, bench results
    ("pipeline",),  # the main job: every stage in order
    ("stages",),  # the one stage registry
    ("submit",),  # stages as Ray Jobs (Jobs SDK)
    ("cli", "__main__"),  # the command line
]


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> package modules it imports (top-level and function-level, absolute and relative)."""
    modules = {module_name(p, package): p for p in package.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")[: len(here.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                # `from frugalray.x import y` imports the submodule y when there is one
                targets = [source] + [f"{source}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in targets:
                # `import frugalray.a.b` also imports frugalray.a: count the deepest package module named
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and target != "frugalray":
                    graph[name].add(target)
    return graph


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one member (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def unit_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    units: dict[str, set[str]] = defaultdict(set)
    for src, targets in graph.items():
        units[unit_of(src)]
        for dst in targets:
            if unit_of(dst) != unit_of(src):
                units[unit_of(src)].add(unit_of(dst))
    return dict(units)


def layer_violations(graph: dict[str, set[str]], layers: list[tuple[str, ...]] = LAYERS) -> list[str]:
    level = {unit: i for i, group in enumerate(layers) for unit in group}
    problems = []
    for src, targets in sorted(graph.items()):
        for dst in sorted(targets):
            a, b = unit_of(src), unit_of(dst)
            if a in level and b in level and level[b] > level[a]:
                problems.append(f"{src} imports {dst}: '{b}' is a higher layer than '{a}'")
    return problems


# -- the package ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_every_unit_of_the_package_has_a_declared_layer(graph):
    declared = {unit for group in LAYERS for unit in group}
    undeclared = sorted({unit_of(m) for m in graph} - declared - {"frugalray"})
    assert not undeclared, f"add these to LAYERS (and ARCHITECTURE.md): {undeclared}"


def test_no_import_loop_between_files(graph):
    assert cycles(graph) == []


def test_no_import_loop_between_top_level_folders(graph):
    assert cycles(unit_graph(graph)) == []


def test_imports_point_down_the_layers(graph):
    assert layer_violations(graph) == []


def test_architecture_md_states_the_same_order():
    text = (PACKAGE.parents[1] / "ARCHITECTURE.md").read_text()
    positions = [min(text.index(f"`{u}`") for u in group) for group in LAYERS]
    assert positions == sorted(positions), "ARCHITECTURE.md lists the layers in another order than LAYERS"


# -- the checker itself, on small made-up packages ---------------------------------------------
def _write(root: Path, files: dict[str, str]) -> Path:
    pkg = root / "frugalray"
    for rel, text in files.items():
        path = pkg / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return pkg


def test_checker_finds_a_loop_through_a_function_level_import(tmp_path):
    pkg = _write(tmp_path, {
        "__init__.py": "",
        "data/__init__.py": "",
        "data/select.py": "from frugalray.data.auto import settings\n",
        "data/auto.py": "def run():\n    from frugalray.data.select import select_rows\n",
    })
    assert cycles(import_graph(pkg)) == [["frugalray.data.auto", "frugalray.data.select"]]


def test_checker_finds_a_relative_import_loop_and_a_folder_loop(tmp_path):
    pkg = _write(tmp_path, {
        "__init__.py": "",
        "train/__init__.py": "",
        "train/loop.py": "from ..data import loaders\n",
        "data/__init__.py": "",
        "data/loaders.py": "",
        "data/proxy.py": "from frugalray.train.loop import Session\n",
    })
    graph = import_graph(pkg)
    assert cycles(graph) == []  # no loop between files ...
    assert cycles(unit_graph(graph)) == [["data", "train"]]  # ... but train and data use each other


def test_checker_flags_an_import_from_a_lower_layer_into_a_higher_one(tmp_path):
    pkg = _write(tmp_path, {
        "__init__.py": "",
        "config.py": "",
        "train/__init__.py": "",
        "train/loop.py": "import frugalray.config\nfrom frugalray import pipeline\n",
        "pipeline.py": "from frugalray.train.loop import run\n",
    })
    problems = layer_violations(import_graph(pkg))
    assert problems == ["frugalray.train.loop imports frugalray.pipeline: 'pipeline' is a higher layer than 'train'"]

"""The layering rule of docs/architecture.md, read from every import statement with ``ast``.

    tokenizer  <-  mllm  <-  training  <-  eval  <-  entry points (the CLI, the tiny recipes)  <-  scripts

A module may import its own layer and the layers to its left, never one to its right; DeepSpeed
is imported only by ``training/distributed.py``; and no package has an import cycle. Imports
inside functions count as much as those at the top of a file.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("tokenizer", "mllm", "training", "eval")
LAYERS = {"tokenizer": 0, "mllm": 1, "training": 2, "eval": 3}
# Applications that train and then evaluate, and the command that dispatches to everything:
# they sit above both training and eval.
ENTRY_POINTS = {"training.cli": 4, "training.tiny_pipeline": 4, "training.tiny_mllm": 4}
SCRIPTS_LAYER = 5
DEEPSPEED_HOME = "training.distributed"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int | None:
    if module.split(".")[0] == "scripts":
        return SCRIPTS_LAYER
    for entry, layer in ENTRY_POINTS.items():
        if module == entry or module.startswith(entry + "."):
            return layer
    return LAYERS.get(module.split(".")[0])


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in (*PACKAGES, "scripts"):
        for path in sorted((REPO / package).rglob("*.py")):
            modules[module_name(path)] = path
    return modules


def imported_modules(source: str, importer: str, known: set[str]) -> list[tuple[int, str]]:
    """``(line, module)`` for every import in ``source``; ``from pkg import sub`` resolves to
    ``pkg.sub`` when that is a module of the project."""
    found = []
    package = importer if f"{importer}.__init__" in known else importer.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.append((node.lineno, candidate if candidate in known else base))
    return found


def violations(modules: dict[str, str]) -> list[str]:
    """Every broken rule, one line each, for ``{module name: source}``."""
    known = set(modules) | {f"{name}.__init__" for name in modules}
    problems = []
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for importer, source in modules.items():
        importer_layer = layer_of(importer)
        for line, imported in imported_modules(source, importer, known):
            top = imported.split(".")[0]
            if top == "deepspeed" and importer != DEEPSPEED_HOME:
                problems.append(f"{importer}:{line} imports deepspeed (only {DEEPSPEED_HOME} may)")
            if top not in (*PACKAGES, "scripts"):
                continue
            imported_layer = layer_of(imported)
            if importer_layer is not None and imported_layer is not None and imported_layer > importer_layer:
                problems.append(f"{importer}:{line} imports {imported}, a layer above it")
            if top == importer.split(".")[0] and imported in modules and imported != importer:
                graph[importer].add(imported)
    problems += [f"import cycle: {' -> '.join(cycle)}" for cycle in cycles(graph)]
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected group of modules (depth-first search)."""
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_the_project_keeps_its_layers() -> None:
    modules = {name: path.read_text() for name, path in project_modules().items()}
    assert len(modules) > 40, "the walk found too few modules: is REPO right?"
    assert violations(modules) == []


@pytest.mark.parametrize(
    ("modules", "expected"),
    [
        ({"tokenizer.model": "from training.common import setup_logging", "training.common": ""}, "a layer above"),
        ({"mllm.inference": "def f():\n    import eval.harness", "eval.harness": ""}, "a layer above"),
        ({"training.evaluation": "from eval import harness", "eval.harness": ""}, "a layer above"),
        ({"eval.harness": "from training import tiny_mllm", "training.tiny_mllm": ""}, "a layer above"),
        ({"training.train_mllm": "import deepspeed"}, "imports deepspeed"),
        (
            {"eval.a": "from eval.b import x", "eval.b": "from eval.a import y"},
            "import cycle: eval.a -> eval.b -> eval.a",
        ),
    ],
)
def test_each_kind_of_violation_is_caught(modules: dict[str, str], expected: str) -> None:
    problems = violations(modules)
    assert any(expected in problem for problem in problems), problems


def test_allowed_directions_pass() -> None:
    modules = {
        "tokenizer.model": "",
        "mllm.inference": "from tokenizer.model import DualTokenizer",
        "training.train_mllm": "from mllm.inference import Pipeline\nfrom training import distributed",
        "training.distributed": "import deepspeed",
        "eval.harness": "from training.data.shapes import ShapesWorld",
        "training.cli": "import eval.harness",
        "scripts.report": "from training import cli",
    }
    assert violations(modules) == []


MAX_LINES = 500  # one concept per file (docs/architecture.md): a longer file holds several


def test_no_source_file_holds_more_than_one_concepts_worth_of_lines() -> None:
    long_files = {
        str(path.relative_to(REPO)): count
        for package in PACKAGES
        for path in sorted((REPO / package).rglob("*.py"))
        if (count := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long_files == {}, f"split these by responsibility: {long_files}"

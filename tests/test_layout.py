"""The package keeps its shape: imports point one way between its rooms (read with ast, no
execution), there is no import cycle, and the model imports nothing else of the project."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("p2s_jax", "weights_conversion")

# room -> the rooms it may import. A room is a subpackage of p2s_jax, a top-level module of
# p2s_jax, or weights_conversion. The cli (and aot, the compiler of every room's programs) sit on
# top; nothing imports the cli.
ALLOWED = {
    "model": set(),
    "keypoints": {"utils"},
    "parallel": set(),
    "hardware": set(),
    "runtime": {"utils"},
    "utils": set(),
    "weights_conversion": {"model", "utils"},
    "data": {"keypoints", "utils"},
    "inference": {"model", "keypoints", "parallel", "utils", "weights_conversion", "data"},
    "evaluation": {"model", "keypoints", "parallel", "utils", "weights_conversion", "data",
                   "inference"},
    "train": {"model", "keypoints", "parallel", "hardware", "utils", "weights_conversion",
              "data", "inference", "evaluation"},
    "review": {"keypoints", "utils", "data", "inference"},
    "aot": {"model", "keypoints", "parallel", "hardware", "utils", "weights_conversion", "data",
            "inference", "evaluation", "train"},
    "cli": {"model", "keypoints", "parallel", "hardware", "runtime", "utils",
            "weights_conversion", "data", "inference", "evaluation", "train", "aot", "review"},
}
# Finer rules inside a room's allowance: (importing room, imported module prefix) pairs that
# are the only way in. Training uses inference's preprocessing and prompting, not the predictor
# (evaluation while training goes through the evaluator, `evaluation.evaluate`).
ONLY = {("train", "p2s_jax.inference"): ("p2s_jax.inference.preprocess",
                                         "p2s_jax.inference.prompting"),
        ("review", "p2s_jax.inference"): ("p2s_jax.inference.overlay",)}
# Modules outside the project that a room must not import (at module level or anywhere).
FORBIDDEN_EXTERNAL = {"model": ("torch", "tensorflow_datasets", "pycocotools", "orbax"),
                      "keypoints": ("jax", "torch"), "utils": ("torch", "jax"),
                      "review": ("jax", "torch", "tensorflow_datasets")}


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def _room(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "weights_conversion":
        return "weights_conversion"
    if parts[0] != "p2s_jax" or len(parts) == 1:
        return None  # the package's lazy public API is no room
    return parts[1]


def _imports(path: Path, module: str) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every import of the file."""
    tree = ast.parse(path.read_text(), str(path))
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                assert not child.level, f"{path}:{child.lineno}: use absolute imports"
                base = child.module or ""
                found.append((base, child.lineno, in_function))
                found.extend((f"{base}.{a.name}", child.lineno, in_function) for a in child.names)
            visit(child, nested)

    visit(tree, False)
    return found


def _edges():
    modules = _modules()
    edges = []
    for module, path in modules.items():
        for target, line, in_function in _imports(path, module):
            if target in modules:
                edges.append((module, target, line, in_function))
    return modules, edges


def test_imports_point_one_way():
    _, edges = _edges()
    wrong = []
    for source, target, line, _ in edges:
        a, b = _room(source), _room(target)
        if a is None or b is None or a == b:
            continue
        if b not in ALLOWED[a]:
            wrong.append(f"{source}:{line} imports {target} ({a} may import {sorted(ALLOWED[a])})")
        for (room, prefix), only in ONLY.items():
            if a == room and target.startswith(prefix) and not target.startswith(only):
                wrong.append(f"{source}:{line} imports {target} (only {only} of {prefix})")
    assert not wrong, "\n".join(wrong)


def test_no_project_import_inside_functions():
    _, edges = _edges()
    inside = [f"{s}:{line} imports {t}" for s, t, line, f in edges if f]
    assert not inside, "\n".join(inside)


def test_no_import_cycle():
    modules, edges = _edges()
    graph = {m: set() for m in modules}
    for source, target, _, _ in edges:
        if source != target and not target.startswith(source + "."):
            graph[source].add(target)
    state, cycle = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycle.extend(stack[stack.index(nxt):] + [nxt])
                return True
            if nxt not in state and visit(nxt, stack + [nxt]):
                return True
        state[node] = "done"
        return False

    for module in sorted(graph):
        if module not in state and visit(module, [module]):
            break
    assert not cycle, " -> ".join(cycle)


@pytest.mark.parametrize("room", sorted(FORBIDDEN_EXTERNAL))
def test_rooms_do_not_import_heavy_libraries(room):
    modules = _modules()
    wrong = [f"{m}:{line} imports {target}" for m, path in modules.items() if _room(m) == room
             for target, line, _ in _imports(path, m)
             if target.split(".")[0] in FORBIDDEN_EXTERNAL[room]]
    assert not wrong, "\n".join(wrong)


def test_model_imports_nothing_else_when_run():
    """`import p2s_jax.model` in a fresh interpreter loads no other room and no torch."""
    code = ("import sys, p2s_jax.model; "
            "print(sorted(m for m in sys.modules if m.startswith(('p2s_jax.', 'weights_conversion',"
            " 'torch', 'tensorflow_datasets', 'pycocotools'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout
    loaded = eval(out)  # a list of module names printed by the child
    assert loaded and all(m.startswith("p2s_jax.model") for m in loaded), loaded


def test_the_rules_see_every_room():
    rooms = {_room(m) for m in _modules()} - {None}
    assert rooms == set(ALLOWED), rooms ^ set(ALLOWED)

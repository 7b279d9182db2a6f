"""The package's shape: stages import downward only, no cycles, pure modules stay pure, private APIs stay in compat.

Layers, lowest first: the shared core (contract, config, compat, console, storage, tracking, the model sources),
then the stages (data; train, which reads data's stream; serve; eval), then what composes them (pipeline, iterate,
sweep, cli, report). A module
may import its own layer's modules and lower layers, never a higher or a sibling stage, at module level or
inside a function.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

PKG = ROOT / "cpo_ray"
CORE = {
    "contract",
    "config",
    "compat",
    "console",
    "embedded",
    "gguf",
    "model_source",
    "storage",
    "devcluster",
    "tracking",
}
TOP = {"pipeline", "cli", "report", "iterate", "sweep"}
# stage -> the stages it may import besides the core
STAGES = {"data": set(), "train": {"data"}, "serve": set(), "eval": set()}


def modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        out[".".join(["cpo_ray", *parts])] = path
    return out


def imports(path: Path) -> set[str]:
    """Every cpo_ray module a file imports, at module level or in a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cpo_ray"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # `from cpo_ray.train import heads`
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("cpo_ray"))
    return found & set(modules())


def unit(module: str) -> str:
    """core / top / a stage's name."""
    part = module.split(".")[1] if module.count(".") else ""
    if part in STAGES:
        return part
    return "top" if part in TOP else "core"


def allowed(src: str, dst: str) -> bool:
    a, b = unit(src), unit(dst)
    if b == "core" or a == "top" or a == b:
        return True
    return a in STAGES and b in STAGES[a]


def test_every_module_belongs_to_a_known_layer():
    flat = {m.split(".")[1] for m in modules() if m.count(".") == 1}
    assert flat <= CORE | TOP | set(STAGES), flat - (CORE | TOP | set(STAGES))


def test_imports_go_downward_only():
    bad = [f"{src} -> {dst}" for src, path in modules().items() for dst in imports(path) if not allowed(src, dst)]
    assert not bad, bad


def test_core_never_imports_a_stage():
    core = [m for m in modules() if unit(m) == "core"]
    bad = [f"{m} -> {d}" for m in core for d in imports(modules()[m]) if unit(d) != "core"]
    assert not bad, bad


def test_no_import_cycles():
    graph = {m: {d for d in imports(p) if d != m} for m, p in modules().items()}
    state: dict[str, int] = {}

    def visit(m, trail):
        if state.get(m) == 1:
            pytest.fail("import cycle: " + " -> ".join([*trail[trail.index(m) :], m]))
        if state.get(m) == 2:
            return
        state[m] = 1
        for d in sorted(graph[m]):
            if d in graph and not d.startswith(m + "."):  # a package importing its own submodule is no cycle
                visit(d, [*trail, m])
        state[m] = 2

    for m in sorted(graph):
        visit(m, [])


@pytest.mark.parametrize(
    "module",
    [
        "cpo_ray.config",
        "cpo_ray.contract",
        "cpo_ray.data.readers",
        "cpo_ray.data.formats",
        "cpo_ray.data.tokenize",
        "cpo_ray.train.loss",
        "cpo_ray.train.collate",
        "cpo_ray.train.logps",
        "cpo_ray.eval.stats",
        "cpo_ray.eval.scorer",
    ],
)
def test_pure_logic_imports_without_ray_deepspeed_or_vllm(module):
    code = (
        f"import sys, {module}; heavy = [m for m in ('ray', 'deepspeed', 'vllm') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_private_dependency_apis_only_in_compat():
    offenders = []
    for m, path in modules().items():
        if m == "cpo_ray.compat":
            continue
        text = path.read_text()
        offenders += [
            f"{m}: {needle}"
            for needle in ("._internal", "_zero3_consolidated", "._attn_implementation")
            if needle in text
        ]
    assert not offenders, offenders


def test_no_function_over_60_lines():
    long = []
    for m, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno + 1 > 60:
                long.append(f"{m}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not long, long

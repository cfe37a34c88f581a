"""The house rules, read from the source: one owner per decision, one file per name, run/ a
floor."""

import ast
from collections import Counter
from pathlib import Path

import pytest

PACKAGES = ("optune_jax", "models", "losses", "sampling")
SOURCES = [p for d in (*PACKAGES, "scripts", "benchmarks") for p in sorted(Path(d).rglob("*.py"))]

# a config read (the attribute path's tail) -> the one module that makes that decision;
# `schedule` is read off the train section under any name (`cfg.train.schedule`, `t.schedule`)
OWNERS = {
    ("optune", "reference"): "optune_jax/reference_policy.py",
    ("run", "mode"): "optune_jax/pair_source.py",
    ("schedule",): "optune_jax/optimizer.py",
}


def _reads(tree: ast.AST):
    """The last one and two names of every attribute path read in `tree` (`a.b.c`: (c,), (b, c))."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            yield (node.attr,)
            if isinstance(node.value, ast.Attribute):
                yield node.value.attr, node.attr


def _imports(path: Path) -> set[str]:
    """Modules `path` imports (absolute, as written)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return out


@pytest.mark.parametrize("decision", sorted(OWNERS), ids=".".join)
def test_each_decision_is_read_in_one_module(decision):
    """`optune.reference`, `run.mode` and `train.schedule` are each read by their owner alone."""
    readers = [str(p) for p in SOURCES if decision in set(_reads(ast.parse(p.read_text())))]
    assert readers == [OWNERS[decision]]


def test_no_two_files_share_a_name():
    """No module name repeats across the packages, scripts and benchmarks."""
    names = Counter(p.name for p in SOURCES if p.name != "__init__.py")
    assert [n for n, k in names.items() if k > 1] == []


def test_run_is_a_floor_that_imports_nothing_above_it():
    """optune_jax/run/ (what any trainer needs) imports no other part of optune_jax."""
    above = {
        f"{p}: {m}"
        for p in sorted(Path("optune_jax/run").glob("*.py"))
        for m in _imports(p)
        if m.startswith("optune_jax") and not m.startswith("optune_jax.run")
    }
    assert above == set()


def test_the_rules_see_a_violation(tmp_path):
    """The readers above find a read of `optune.reference` and an upward import when present."""
    code = "from optune_jax.loop import OptuneRun\nx = cfg.optune.reference\ny = t.schedule\n"
    assert {("optune", "reference"), ("schedule",)} <= set(_reads(ast.parse(code)))
    path = tmp_path / "probe.py"
    path.write_text(code)
    assert "optune_jax.loop.OptuneRun" in _imports(path)

"""The dependency rule of docs/design.md, read from the source with ast (no torch import, < 1 s).

    config <- model <- parallel <- trainer;  data <- trainer;  checkpoint knows model (state-dict
    keys: model/sharding.py, model/placement.py) and data (tokenizer files), not the trainer;  inference uses model,
    parallel, checkpoint, data;  server uses inference only;  only arguments.py touches argparse
    (and the entry scripts outside the package: pretrain_early_exit_gpt.py, tools/*.py).

Every ``import`` / ``from ... import`` inside megatron/early_exit (module level or inside a
function) is an arrow from its unit to the unit it names; an arrow the table below does not allow
fails the test, naming the file, line and arrow. Run:
``python -m pytest -q tests/unit/test_import_rule.py``.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "megatron" / "early_exit"

# unit -> the units it may import (a unit is a top-level module or sub-package of early_exit)
ALLOWED = {
    "__init__": set(),
    "config": set(),
    "cli": set(),  # run_cli & flag checks: imports nothing of ours, so every entry point can use it
    "arguments": {"config", "cli"},
    "model": {"config"},
    "parallel": {"config", "model"},
    "data": {"config"},
    "checkpoint": {"config", "model", "data"},  # data: tokenizer files of converted checkpoints
    "trainer": {"config", "model", "parallel", "data", "checkpoint"},
    "inference": {"config", "model", "parallel", "data", "checkpoint"},
    "server": {"inference"},
}
ARGPARSE_ALLOWED = {"arguments"}


def unit_of(path: pathlib.Path, root: pathlib.Path) -> str:
    return path.relative_to(root).with_suffix("").parts[0]


def imported_names(path: pathlib.Path, root: pathlib.Path):
    """(line, absolute module name) for every import in ``path`` (``root``: .../early_exit)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = ["megatron", *path.relative_to(root.parent).parts[:-1]]  # the file's package
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            yield node.lineno, module
            for alias in node.names:  # `from megatron.early_exit import config` names a unit too
                yield node.lineno, f"{module}.{alias.name}"


def arrows(path: pathlib.Path, root: pathlib.Path):
    """(line, target unit or 'argparse') of the arrows leaving ``path``."""
    for line, name in imported_names(path, root):
        if name == "argparse" or name.startswith("argparse."):
            yield line, "argparse"
        parts = name.split(".")
        if parts[:2] == ["megatron", "early_exit"] and len(parts) > 2:
            yield line, parts[2]


def violations(root: pathlib.Path = PACKAGE):
    bad = []
    for path in sorted(root.rglob("*.py")):
        unit = unit_of(path, root)
        allowed = ALLOWED.get(unit)
        for line, target in arrows(path, root):
            if target == "argparse":
                ok = unit in ARGPARSE_ALLOWED
            elif allowed is None:
                ok = False  # a new unit: add it to the table (and to docs/design.md)
            else:
                ok = target == unit or target in allowed
            if not ok:
                bad.append(f"{path.relative_to(root.parent.parent)}:{line}: {unit} -> {target}")
    return sorted(set(bad))


def test_the_package_follows_the_dependency_rule():
    assert not violations(), "imports against docs/design.md's rule:\n" + "\n".join(violations())


def test_every_unit_is_in_the_table():
    units = {unit_of(p, PACKAGE) for p in PACKAGE.rglob("*.py")}
    assert units <= set(ALLOWED), f"units missing from ALLOWED: {sorted(units - set(ALLOWED))}"


@pytest.mark.parametrize("unit, line, arrow", [
    ("parallel", "from megatron.early_exit.trainer.step import train_step", "parallel -> trainer"),
    ("checkpoint", "from ..trainer import optimizer", "checkpoint -> trainer"),
    ("model", "import megatron.early_exit.parallel.state", "model -> parallel"),
    ("server", "from megatron.early_exit.model import gpt_model", "server -> model"),
    ("data", "import argparse", "data -> argparse"),
])
def test_a_bad_arrow_fails(tmp_path, unit, line, arrow):
    """The checker catches each kind of bad arrow (absolute, relative, plain import, argparse)."""
    root = tmp_path / "megatron" / "early_exit"
    (root / unit).mkdir(parents=True)
    (root / unit / "bad.py").write_text(f"def f():\n    {line}\n")
    found = violations(root)
    assert found == [f"megatron/early_exit/{unit}/bad.py:2: {arrow}"], found

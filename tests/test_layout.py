"""The layout rules of docs/architecture.md, checked on the source: one owner for the run folder's
file names, short functions, names from the registries."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO
from lrlab.run_folder import COMPARE_FILES, FILES, TUNE_FILES

SRC = REPO / "src" / "lrlab"
MODULES = sorted(SRC.rglob("*.py"))


def _strings(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, text) of every string constant that is not a docstring."""
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


def test_run_folder_file_names_live_in_run_folder_only():
    names = {Path(v).name for v in [*FILES.values(), *COMPARE_FILES.values(), *TUNE_FILES.values()]}
    found = []
    for path in MODULES:
        if path.name == "run_folder.py":
            continue
        for line, text in _strings(ast.parse(path.read_text())):
            found += [f"{path.relative_to(SRC)}:{line} {name}" for name in names
                      if (name in text if "." in name else name == text)]  # "tensorboard" is also a word
    assert found == []


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_no_function_over_50_lines_of_code(path):
    """Docstrings, comments and blank lines are not counted."""
    lines = path.read_text().splitlines()
    long = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0]
            doc = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
            start = first.end_lineno if doc else first.lineno - 1
            code = [s for s in lines[start:node.end_lineno] if s.strip() and not s.strip().startswith("#")]
            if len(code) > 50:
                long.append(f"{node.name}: {len(code)}")
    assert long == []


def test_config_values_come_from_the_registries():
    """Adding a name to a registry is enough for the config to accept it and list it in errors."""
    from lrlab.config import load_config
    from lrlab.errors import LrlabError
    from lrlab.interpret import CAM_METHODS, SELECT_BY
    from lrlab.lr_finder import METHODS
    from lrlab.optim import OPTIMIZERS
    from lrlab.schedules import SCHEDULES

    for key, names in (("train.optimizer", OPTIMIZERS.names()), ("train.schedule", SCHEDULES.names()),
                       ("explain.method", CAM_METHODS.names()), ("explain.select", SELECT_BY.names()),
                       ("lr_finder.method", ["auto", *METHODS])):
        section, field = key.split(".")
        for name in names:
            assert getattr(getattr(load_config(None, [f"{key}={name}"]), section), field) == name
        with pytest.raises(LrlabError) as e:
            load_config(None, [f"{key}=nonsense"])
        assert f"valid: {', '.join(names)}" in str(e.value)

"""The library packages stand on their own: model_zoo and data_pipeline never import trainer,
launch or deepspeed, not even inside a function (a library a user imports must not drag in the
trainer or a DeepSpeed build)."""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys

import pytest

FORBIDDEN = ("trainer", "launch", "deepspeed")
MODULES = ["model_zoo.assets", "model_zoo.mesh", "model_zoo.marching_tetrahedra", "model_zoo.metrics",
           "model_zoo.image_files", "data_pipeline.cameras"]
# Known exception: model_zoo.export imports the trainer's checkpoint, distributed and config modules
# (inside functions) and DeepSpeed; another part of issue 15 makes it read portable weights instead.
# strict xfail: once it is fixed this fails, as a reminder to move it into MODULES.
KNOWN_EXCEPTIONS = ["model_zoo.export"]


def forbidden_imports(module: str) -> list[str]:
    """Every import statement in the module's source, at any depth, that names a forbidden package."""
    tree = ast.parse(open(importlib.util.find_spec(module).origin).read())
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return sorted({name for name in names if name.split(".")[0] in FORBIDDEN})


def loaded_after_import(module: str) -> list[str]:
    """Forbidden top-level packages in sys.modules after importing ``module`` in a fresh interpreter
    (in this one, other tests imported the trainer long ago)."""
    code = (f"import importlib, json, sys; importlib.import_module({module!r}); "
            f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({list(FORBIDDEN)!r}))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", MODULES)
def test_library_module_does_not_import_the_trainer(module):
    assert forbidden_imports(module) == [], f"{module} imports {forbidden_imports(module)}"
    assert loaded_after_import(module) == [], f"importing {module} loads {loaded_after_import(module)}"


@pytest.mark.xfail(strict=True, reason="model_zoo.export still imports trainer and deepspeed (issue 15, item 6)")
@pytest.mark.parametrize("module", KNOWN_EXCEPTIONS)
def test_known_exceptions_still_import_the_trainer(module):
    assert forbidden_imports(module) == [] and loaded_after_import(module) == []

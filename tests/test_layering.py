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


def loaded_after_import(modules: list[str]) -> dict[str, list[str]]:
    """For each module, the forbidden top-level packages in sys.modules once it is imported, in one
    fresh interpreter (in this one, other tests imported the trainer long ago). Imported in order,
    so a module is blamed only for what it adds."""
    code = ("import importlib, json, sys\n"
            "result = {}\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            f"    result[name] = sorted({{m.split('.')[0] for m in sys.modules}} & set({list(FORBIDDEN)!r}))\n"
            "print(json.dumps(result))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_library_modules_do_not_import_the_trainer():
    written = {module: forbidden_imports(module) for module in MODULES}
    assert not any(written.values()), f"import statements: {written}"
    loaded = loaded_after_import(MODULES)
    assert not any(loaded.values()), f"loaded by importing: {loaded}"


@pytest.mark.xfail(strict=True, reason="model_zoo.export still imports trainer and deepspeed (issue 15, item 6)")
@pytest.mark.parametrize("module", KNOWN_EXCEPTIONS)
def test_known_exceptions_still_import_the_trainer(module):
    assert forbidden_imports(module) == [] and loaded_after_import([module]) == {module: []}

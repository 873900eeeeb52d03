"""The package's shape: every module says its one job, and sub-packages meet through public names only."""

from __future__ import annotations

import ast
import configparser
import fnmatch
import importlib
import os

import pytest
from conftest import REPO

PACKAGE = os.path.join(REPO, "stacker")
SUBPACKAGES = ("data", "backbones", "features", "learners", "level2", "io", "app")


def _modules():
    for root, _dirs, files in os.walk(PACKAGE):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(root, name)
                yield os.path.relpath(path, REPO), ast.parse(open(path).read())


def _subpackage(module: str) -> str:
    """``stacker.features.cache`` -> ``features``; top-level modules are their own."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in SUBPACKAGES else ".".join(parts[:2])


@pytest.mark.parametrize("rel, tree", list(_modules()), ids=lambda v: v if isinstance(v, str) else "")
def test_every_module_says_what_it_owns(rel, tree):
    doc = ast.get_docstring(tree)
    assert doc and len(doc.split()) >= 5, f"{rel} has no docstring saying its job"


def test_no_private_name_crosses_a_subpackage():
    crossings = []
    for rel, tree in _modules():
        here = _subpackage(rel[:-3].replace(os.sep, ".").removesuffix(".__init__"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("stacker"):
                assert node.level == 0, f"{rel}: relative import"
                if _subpackage(node.module) == here:
                    continue
                crossings += [f"{rel}: {node.module}.{a.name}" for a in node.names
                              if a.name.startswith("_") and a.name != "__version__"]
    assert not crossings, "private names imported across sub-packages:\n" + "\n".join(crossings)


def test_every_subpackage_lists_its_modules():
    for sub in SUBPACKAGES:
        doc = ast.get_docstring(ast.parse(open(os.path.join(PACKAGE, sub, "__init__.py")).read())) or ""
        modules = [n[:-3] for n in os.listdir(os.path.join(PACKAGE, sub)) if n.endswith(".py") and n != "__init__.py"]
        missing = [m for m in modules if f".{m}`" not in doc and f"{sub}.{m}" not in doc]
        assert not missing, f"stacker/{sub}/__init__.py does not say what {missing} own"


def test_the_console_script_and_package_data_point_at_what_exists():
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(REPO, "setup.cfg"))
    for line in cfg["options.entry_points"]["console_scripts"].strip().splitlines():
        module, _, func = line.split("=", 1)[1].strip().partition(":")
        assert callable(getattr(importlib.import_module(module), func)), line
    for package, pattern in cfg["options.package_data"].items():
        folder = os.path.join(REPO, *package.split("."))
        assert any(fnmatch.fnmatch(n, pattern.strip()) for n in os.listdir(folder)), package


def test_paths_found_from_a_module_point_at_the_checkout():
    from stacker.app import recipe
    from stacker.learners.distributed import worker_env

    assert os.path.samefile(recipe.REPO, REPO) and os.path.isdir(os.path.join(recipe.REPO, "recipes"))
    assert recipe.SHARED == os.path.normpath(os.path.join(REPO, "..", "shared"))
    first = worker_env()["env_vars"]["PYTHONPATH"].split(os.pathsep)[0]
    assert os.path.isfile(os.path.join(first, "stacker", "__init__.py")), "Ray workers import this stacker"

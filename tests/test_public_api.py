"""The public surface: `bfl_async.__all__` is exactly it, every public name is documented,
and the version has one source."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import importlib.util
import inspect
import types
from pathlib import Path
from typing import Any

import pytest

import bfl_async

PACKAGE = Path(bfl_async.__file__).parent
SUBMODULES = ("bfl_async.testing", "bfl_async.webhooks", "bfl_async.fastapi", "bfl_async.redis")


def _module_names(module: types.ModuleType) -> list[tuple[str, str, str]]:
    """(public name, defining module, name there) for each public name of `module`."""
    tree = ast.parse(Path(module.__file__ or "").read_text(encoding="utf-8"))
    package = module.__name__ if hasattr(module, "__path__") else module.__name__.rpartition(".")[0]
    origin: dict[str, tuple[str, str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
            for alias in node.names:
                origin[alias.asname or alias.name] = (base, alias.name)
    names = getattr(module, "__all__", [])
    return [(name, *origin.get(name, (module.__name__, name))) for name in names]


def _attribute_docstring(module_name: str, name: str) -> str | None:
    """The string literal right after the module-level assignment of `name`, if any."""
    module = importlib.import_module(module_name)
    tree = ast.parse(Path(module.__file__ or "").read_text(encoding="utf-8"))
    for node, after in zip(tree.body, [*tree.body[1:], None], strict=True):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign):
            targets = [node.target]
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            if (
                isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                return after.value.value
            return None
    package = module_name.rpartition(".")[0]
    for node in tree.body:  # imported from another module: follow it there
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    base = "." * node.level + (node.module or "")
                    return _attribute_docstring(
                        importlib.util.resolve_name(base, package), alias.name
                    )
    raise AssertionError(f"{module_name}.{name} is not assigned at module level")


def _docstring(value: Any, module_name: str, name: str) -> str | None:
    if inspect.isclass(value) or inspect.isfunction(value):
        return value.__dict__.get("__doc__") if inspect.isclass(value) else value.__doc__
    return _attribute_docstring(module_name, name)


def test_all_is_exactly_the_public_namespace() -> None:
    public = {
        name
        for name, value in vars(bfl_async).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public | {"__version__"} == set(bfl_async.__all__)
    assert len(bfl_async.__all__) == len(set(bfl_async.__all__))


@pytest.mark.parametrize("module_name", ["bfl_async", *SUBMODULES])
def test_every_public_name_exists_and_has_a_docstring(module_name: str) -> None:
    module = importlib.import_module(module_name)
    assert module.__doc__ and module.__doc__.strip()
    missing = []
    for name, origin, original in _module_names(module):
        assert hasattr(module, name), f"{module_name}.__all__ lists {name}, which does not exist"
        if name == "__version__":
            continue
        doc = _docstring(getattr(module, name), origin, original)
        if not (doc and doc.strip()):
            missing.append(name)
    assert missing == []


@pytest.mark.parametrize("module_name", ["bfl_async", *SUBMODULES])
def test_every_public_method_and_property_has_a_docstring(module_name: str) -> None:
    module = importlib.import_module(module_name)
    missing, checked = [], 0
    for name in module.__all__:
        cls = getattr(module, name)
        if not inspect.isclass(cls):
            continue
        for member, value in vars(cls).items():
            function = value.fget if isinstance(value, property) else value
            function = getattr(function, "__func__", function)  # static and class methods
            if member.startswith("_") or not inspect.isfunction(function):
                continue
            checked += 1
            if not (function.__doc__ or "").strip():
                missing.append(f"{name}.{member}")
    assert missing == []
    assert checked > 30 or module_name != "bfl_async"  # the walk does find the methods


def test_the_docstring_check_notices_a_missing_docstring() -> None:
    assert _attribute_docstring("bfl_async._catalog", "MEGAPIXEL")
    assert _attribute_docstring("bfl_async._journal", "JOURNAL_NAME") is None

    class Undocumented(bfl_async.BFLError):
        pass

    assert _docstring(Undocumented, __name__, "Undocumented") is None  # not inherited


def test_the_version_has_one_source() -> None:
    assert bfl_async.__version__ == importlib.metadata.version("bfl-async")
    pyproject = (PACKAGE.parent / "pyproject.toml").read_text(encoding="utf-8")
    assert 'dynamic = ["version"]' in pyproject and '\nversion = "' not in pyproject
    changelog = (PACKAGE.parent / "CHANGELOG.md").read_text(encoding="utf-8")
    assert f"## {bfl_async.__version__} - " in changelog

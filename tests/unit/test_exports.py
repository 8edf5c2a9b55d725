"""Public names: what `kapellmeister` re-exports, and each module's `__all__`.

As httpx's ``tests/test_exported_members.py``: `__all__` is the public surface, so it
must list exactly what the package offers, and every name in it must exist.
"""

import importlib
import inspect
import pkgutil

import pytest

import kapellmeister

MODULES = sorted(m.name for m in pkgutil.iter_modules(kapellmeister.__path__))


def test_every_name_in_all_exists():
    missing = [name for name in kapellmeister.__all__ if not hasattr(kapellmeister, name)]
    assert missing == []


def test_all_is_exactly_the_public_names():
    public = {
        name
        for name, value in vars(kapellmeister).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    }
    assert len(kapellmeister.__all__) == len(set(kapellmeister.__all__))
    assert set(kapellmeister.__all__) == public


def test_re_exports_are_the_modules_own_objects():
    for name in kapellmeister.__all__:
        value = getattr(kapellmeister, name)
        home = importlib.import_module(value.__module__)
        assert getattr(home, name) is value
        assert name in home.__all__, f"{name} is re-exported but not in {home.__name__}.__all__"


def test_the_modules_are_found():
    assert {"decider", "definitions", "messages", "expressions", "config"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_every_module_has_all_and_its_names_exist(name):
    module = importlib.import_module(f"kapellmeister.{name}")
    names = getattr(module, "__all__", None)
    assert isinstance(names, list), f"kapellmeister.{name} has no __all__ list"
    assert names, f"kapellmeister.{name}.__all__ is empty"
    assert len(names) == len(set(names)), "duplicates in __all__"
    assert all(isinstance(n, str) for n in names)
    missing = [n for n in names if not hasattr(module, n)]
    assert missing == []


@pytest.mark.parametrize("name", MODULES)
def test_star_import_gives_exactly_all(name):
    namespace: dict[str, object] = {}
    exec(f"from kapellmeister.{name} import *", namespace)
    namespace.pop("__builtins__")
    module = importlib.import_module(f"kapellmeister.{name}")
    assert set(namespace) == set(module.__all__)

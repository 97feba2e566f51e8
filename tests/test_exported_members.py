"""Every module's public surface is what its `__all__` says, and every name in it exists."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

PACKAGES = ["adapters", "serve", "train"]


def _modules() -> list[str]:
    names = []
    for package in PACKAGES:
        names.append(package)
        module = importlib.import_module(package)
        names += [f"{package}.{m.name}" for m in pkgutil.iter_modules(module.__path__) if m.name not in ("demo",)]
    return names


@pytest.mark.parametrize("name", _modules())
def test_all_names_exist(name):
    module = importlib.import_module(name)
    for exported in getattr(module, "__all__", []):
        assert hasattr(module, exported), f"{name}.__all__ names missing {exported!r}"

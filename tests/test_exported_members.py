"""Every module's public surface is what its `__all__` says, and every name in it exists."""

from __future__ import annotations

import importlib

import pytest

from tests.modules import lorafleet_modules

MODULES = sorted(name for name in lorafleet_modules() if not name.endswith("__main__"))


def test_every_folder_of_the_product_is_in_the_namespace():
    for package in (
        "lorafleet.adapters",
        "lorafleet.serve",
        "lorafleet.train",
        "lorafleet.serve.api",
        "lorafleet.serve.engine",
        "lorafleet.serve.rollouts",
        "lorafleet.serve.drift",
        "lorafleet.serve.cli",
        "lorafleet.serve.dev",
    ):
        assert package in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_all_names_exist(name):
    module = importlib.import_module(name)
    for exported in getattr(module, "__all__", []):
        assert hasattr(module, exported), f"{name}.__all__ names missing {exported!r}"

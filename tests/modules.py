"""Every module of the lorafleet namespace, found on disk (an editable install maps the folders
in with an import hook, which `pkgutil` cannot list from `lorafleet.__path__` alone)."""

from __future__ import annotations

import importlib.util
import pkgutil
from pathlib import Path

TOP_PACKAGES = ("lorafleet", "lorafleet.adapters", "lorafleet.serve", "lorafleet.train")


def package_folder(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.submodule_search_locations, (
        f"{name} is not an installed package"
    )
    return Path(list(spec.submodule_search_locations)[0])


def lorafleet_modules() -> dict[str, Path]:
    """Module name -> source file, for every module and package of the namespace."""
    found: dict[str, Path] = {}
    for package in TOP_PACKAGES:
        folder = package_folder(package)
        found[package] = folder / "__init__.py"
        for module in pkgutil.walk_packages([str(folder)], package + "."):
            if (
                module.name.split(".")[1] in ("adapters", "serve", "train")
                and package == "lorafleet"
            ):
                continue  # listed under its own top package
            relative = Path(*module.name.split(".")[package.count(".") + 1 :])
            found[module.name] = (
                folder / relative / "__init__.py"
                if module.ispkg
                else folder / relative.with_suffix(".py")
            )
    return found

"""The wheel built from this repository is the product: one `lorafleet` namespace and a working
`lorafleet` command, in an environment that has torch and vLLM, whatever the working directory."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

pytestmark = pytest.mark.packaging
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        cwd=out,
    )
    return next(out.glob("lorafleet-*.whl"))


def test_the_wheel_holds_one_namespace_and_declares_its_dependencies(wheel: Path):
    names = zipfile.ZipFile(wheel).namelist()
    code = {n for n in names if n.endswith(".py")}
    assert {
        "lorafleet/__init__.py",
        "lorafleet/serve/api/app.py",
        "lorafleet/train/trainer.py",
        "lorafleet/adapters/validate.py",
        "lorafleet/serve/cli/__main__.py",
        "lorafleet/adapters/migrations/env.py",
        # the catalog's migrations too
        "lorafleet/adapters/migrations/versions/0001_0_1_0_schema.py",
    } <= code
    assert "lorafleet/adapters/migrations/script.py.mako" in names
    assert all(n.startswith("lorafleet/") for n in code), sorted(
        n for n in code if not n.startswith("lorafleet/")
    )
    meta = (
        zipfile.ZipFile(wheel)
        .read(next(n for n in names if n.endswith(".dist-info/METADATA")))
        .decode()
    )
    requires = [
        Requirement(line.split(":", 1)[1].strip())
        for line in meta.splitlines()
        if line.startswith("Requires-Dist:")
    ]
    runtime = [r for r in requires if r.marker is None]
    assert {"fastapi", "sqlalchemy", "typer", "httpx", "transformers"} <= {
        r.name.lower() for r in runtime
    }
    # the ranges it declares are the ones tested: this environment meets them
    for requirement in runtime:
        installed = metadata.version(requirement.name)
        assert requirement.specifier.contains(installed, prereleases=True), (
            f"{requirement} vs {installed}"
        )


def test_the_installed_wheel_gives_a_working_command_outside_the_checkout(
    wheel: Path, tmp_path: Path
):
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    env = {**os.environ, "PYTHONPATH": str(target)}  # found before this checkout's editable install
    where = subprocess.run(
        [
            sys.executable,
            "-c",
            "import lorafleet, lorafleet.serve.api.app as a; "
            "print(lorafleet.__version__, a.__file__)",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        check=True,
    ).stdout.split()
    assert where[0] == metadata.version("lorafleet") and where[1].startswith(str(target))
    run = subprocess.run(
        [str(target / "bin" / "lorafleet"), "--help"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**env, "COLUMNS": "200"},
    )
    assert run.returncode == 0, run.stderr
    for command in ("serve", "train", "quantize", "rollout", "drift", "tiny-model"):
        assert command in run.stdout
    version = subprocess.run(
        [str(target / "bin" / "lorafleet"), "--version"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert version.stdout.strip() == f"lorafleet {metadata.version('lorafleet')}"

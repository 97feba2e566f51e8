"""Multi-process training: DDP with 2 CPU processes (torchrun; accelerate's own CPU launcher
needs MPI)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.engine  # every test here also proves its adapter servable in vLLM


def test_ddp_with_two_cpu_processes_trains_a_servable_adapter_from_relative_paths(world, tmp_path):
    """As the training docs show it: `lorafleet train --base ./tiny --train ... --out ./adapter`,
    relative to the working directory (here not the source checkout), under torchrun."""
    (tmp_path / "tiny").symlink_to(world.base)
    (tmp_path / "data").symlink_to(world.data)
    out = tmp_path / "ddp-adapter"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "-m",
        "lorafleet.serve.cli",
        "train",
        "--base",
        "./tiny",
        "--train",
        "data/json-train.jsonl",
        "--val",
        "data/json-val.jsonl",
        "--out",
        "./ddp-adapter",
        "--rank",
        "8",
        "--lr",
        "2e-3",
        "--batch-size",
        "8",
        "--max-steps",
        "16",
        "--eval-every",
        "8",
    ]
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["training"]["processes"] == 2 and manifest["training"]["steps"] == 16
    assert manifest["servability"]["changed"] >= 1

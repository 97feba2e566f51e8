"""Multi-process training: DDP with 2 CPU processes (torchrun; accelerate's own CPU launcher needs MPI)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.engine  # every test here also proves its adapter servable in vLLM


def test_ddp_with_two_cpu_processes_trains_a_servable_adapter(world, tmp_path):
    out = tmp_path / "ddp-adapter"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "lorafleet.serve.cli",
               "train",
               "--base", str(world.base), "--train", str(world.file("json", "train")),
               "--val", str(world.file("json", "val")), "--out", str(out), "--rank", "8", "--lr", "2e-3",
               "--batch-size", "8", "--max-steps", "16", "--eval-every", "8"]
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["training"]["processes"] == 2 and manifest["training"]["steps"] == 16
    assert manifest["servability"]["changed"] >= 1

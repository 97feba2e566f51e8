"""`lorafleet tiny-model build` shows its pre-training as it goes."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from lorafleet.serve.cli import app


@pytest.mark.training
def test_tiny_model_build_reports_each_tenth_of_its_pre_training_without_a_terminal(tmp_path):
    built = CliRunner().invoke(
        app,
        ["tiny-model", "build", str(tmp_path / "tiny"), "--pretrain-steps", "20"],
        env={"COLUMNS": "300"},
    )
    assert built.exit_code == 0, built.output
    steps = [line for line in built.output.splitlines() if line.startswith("pre-training the")]
    assert [line.split(" loss")[0] for line in steps] == [
        f"pre-training the tiny model: {n}/20 steps" for n in range(2, 21, 2)
    ]
    assert (tmp_path / "tiny" / "config.json").is_file()
    assert f"tiny model written to {tmp_path / 'tiny'}" in built.output.splitlines()

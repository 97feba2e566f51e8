"""`lorafleet engine` refuses to run an engine node nobody guards."""

from __future__ import annotations

from typer.testing import CliRunner

from lorafleet.serve.cli import app


def test_an_engine_node_without_a_secret_is_refused_with_the_setting_named():
    result = CliRunner().invoke(app, ["engine", "--base", "any", "--print-command"])
    assert result.exit_code == 1
    assert "LORAFLEET_ENGINE_API_KEY is not set" in result.output

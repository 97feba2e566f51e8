"""The `lorafleet` CLI against the real server (or, where no engine is needed, the real routes on
loopback): exit codes and printed lines."""

from __future__ import annotations

import json
import uuid

from typer.testing import CliRunner

from lorafleet.adapters.manifest import MANIFEST_FILE
from lorafleet.serve.cli import app
from tests.adapters.test_manifest import trainer_manifest
from tests.helpers import on_loopback
from tests.serve.api.test_upload_api import adapter_with_manifest, manifest_app

runner = CliRunner()


def test_tenant_push_deploy_list_round_trip(server, make_adapter):
    env = {"LORAFLEET_URL": server.url, "LORAFLEET_ADMIN_KEY": server.admin_key}
    name = f"cli-{uuid.uuid4().hex[:6]}"
    created = runner.invoke(app, ["tenants", "create", name], env=env)
    assert created.exit_code == 0, created.output
    # the key alone on stdout (`export LORAFLEET_API_KEY=$(lorafleet tenants create acme)`)
    api_key = created.stdout.strip()
    assert api_key.startswith("lf-") and len(api_key.split()) == 1, created.stdout
    assert "not shown again" in created.stderr

    env = {"LORAFLEET_URL": server.url, "LORAFLEET_API_KEY": api_key}
    pushed = runner.invoke(app, ["adapters", "push", "ext", str(make_adapter(1))], env=env)
    assert pushed.exit_code == 0, pushed.output
    assert "ext@1" in pushed.output and "rank 8" in pushed.output
    deployed = runner.invoke(app, ["deployments", "set", "invoice", "ext@1"], env=env)
    assert deployed.exit_code == 0 and "invoice -> ext@1" in deployed.output
    listed = runner.invoke(app, ["deployments", "list"], env=env)
    assert "invoice" in listed.output and "ext@1" in listed.output
    refused = runner.invoke(app, ["adapters", "delete", "ext", "1"], env=env)
    assert refused.exit_code == 1 and "deployed by invoice" in refused.output


def test_flags_override_environment(server):
    result = runner.invoke(
        app,
        ["tenants", "list", "--url", server.url, "--admin-key", "wrong"],
        env={"LORAFLEET_ADMIN_KEY": server.admin_key},
    )
    assert result.exit_code == 1 and "ApiError: invalid admin key (HTTP 401)" in result.output


def test_unreachable_server_is_one_red_line_and_exit_1():
    result = runner.invoke(
        app, ["adapters", "list", "--url", "http://127.0.0.1:9", "--api-key", "k"]
    )
    assert (
        result.exit_code == 1
        and "ServerUnreachable: cannot reach http://127.0.0.1:9" in result.output
    )


def test_push_of_a_folder_without_adapter_config_is_refused(tmp_path):
    result = runner.invoke(
        app,
        ["adapters", "push", "ext", str(tmp_path), "--url", "http://127.0.0.1:9", "--api-key", "k"],
    )
    assert result.exit_code == 1 and "not a PEFT adapter folder" in result.output


def test_serve_refuses_to_start_without_an_admin_key(tmp_path):
    result = runner.invoke(app, ["serve", "--base", "x", "--home", str(tmp_path)])
    assert result.exit_code == 1 and "LORAFLEET_ADMIN_KEY is not set" in result.output


def test_serve_with_a_hub_base_it_cannot_fetch_fails_at_once_in_one_line(tmp_path, monkeypatch):
    """No hub (an endpoint that refuses) and an empty hub cache: one line, no half-made home."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    home = tmp_path / "home"
    started = runner.invoke(
        app,
        ["serve", "--base", "org/vlm", "--home", str(home)],
        env={"LORAFLEET_ADMIN_KEY": "k" * 24, "COLUMNS": "300"},
    )
    assert started.exit_code == 1
    assert started.output.strip().splitlines() == [
        "LorafleetError: cannot fetch base 'org/vlm': 127.0.0.1 is unreachable (Connection "
        "refused) and the hub's cache has no copy; pass a local folder as the base"
    ]
    assert not home.exists()


def test_serve_names_a_missing_base_model(tmp_path):
    result = runner.invoke(
        app, ["serve", "--home", str(tmp_path)], env={"LORAFLEET_ADMIN_KEY": "k"}
    )
    assert result.exit_code == 1 and "no base model" in result.output


def test_push_sends_the_folders_manifest_and_show_prints_its_key_numbers(tmp_path, sqlite_catalog):
    # the registry routes without an engine
    api, key = manifest_app(tmp_path, sqlite_catalog(tmp_path / "catalog.db"))
    trained = adapter_with_manifest(tmp_path / "trained", 1, None)
    (tmp_path / "trained" / MANIFEST_FILE).write_text(
        json.dumps(trainer_manifest(trained.digest), indent=2)
    )
    adapter_with_manifest(tmp_path / "plain", 2, None)
    with on_loopback(api) as url:
        env = {"LORAFLEET_URL": url, "LORAFLEET_API_KEY": key, "COLUMNS": "200"}
        for folder in ("trained", "plain"):
            pushed = runner.invoke(
                app, ["adapters", "push", "ext", str(tmp_path / folder)], env=env
            )
            assert pushed.exit_code == 0, pushed.output
        shown = runner.invoke(app, ["adapters", "show", "ext"], env=env)
    assert shown.exit_code == 0, shown.output
    lines = [line.strip() for line in shown.output.splitlines()]
    start = lines.index("ext@1 manifest (the manifest's adapter digest matches):")
    assert lines[start + 1 : start + 7] == [
        "base ./tiny (Qwen2_5_VLForConditionalGeneration)",
        "trained 120 steps, best validation loss 0.613, converged",
        "validation exact_match: base 0.100 -> adapter 0.900 (n=40), +0.800",
        "probe exact_match: base 0.950 -> adapter 0.850 (n=20), -0.100",
        "Forgetting: the probe score fell from 0.950 to 0.850 (10.0 points, tolerance 5).",
        "servable: changes 8/8 check outputs, vLLM = PEFT on the first 8 tokens (1 near ties)",
    ]
    assert lines[-1] == "ext@2: no manifest"


def test_push_with_a_missing_or_wrong_key_fails_before_uploading(tmp_path, sqlite_catalog):
    api, key = manifest_app(tmp_path, sqlite_catalog(tmp_path / "catalog.db"))
    adapter_with_manifest(tmp_path / "plain", 2, None)
    with on_loopback(api) as url:
        for given in ({}, {"LORAFLEET_API_KEY": "not-a-key"}):
            env = {"LORAFLEET_URL": url, "COLUMNS": "200", **given}
            pushed = runner.invoke(
                app, ["adapters", "push", "ext", str(tmp_path / "plain")], env=env
            )
            assert pushed.exit_code == 1 and "API key" in pushed.output, pushed.output
            assert "uploading" not in pushed.output  # no progress bar: nothing was sent
        env = {"LORAFLEET_URL": url, "LORAFLEET_API_KEY": key}
        listed = runner.invoke(app, ["adapters", "list"], env=env)
    assert listed.exit_code == 0 and "ext" not in listed.output, listed.output


def test_tenants_delete_without_a_terminal_asks_for_yes_before_calling_anyone():
    env = {"LORAFLEET_URL": "http://127.0.0.1:9", "LORAFLEET_ADMIN_KEY": "k", "COLUMNS": "200"}
    refused = runner.invoke(app, ["tenants", "delete", "acme"], env=env)
    assert refused.exit_code == 1 and "pass --yes" in refused.output, refused.output
    # with --yes it goes to the gateway (here: none)
    tried = runner.invoke(app, ["tenants", "delete", "acme", "--yes"], env=env)
    assert tried.exit_code == 1 and "cannot reach" in tried.output, tried.output

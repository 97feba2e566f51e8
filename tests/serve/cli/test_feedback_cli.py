"""`lorafleet feedback`, `lorafleet requests` and `lorafleet capture`: arguments checked at parse
time, and the commands against the real server (exit codes and printed lines)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from lorafleet.chat_jsonl import load_jsonl
from lorafleet.serve.cli import app
from lorafleet.serve.cli.feedback import parse_when
from tests.helpers import image_messages, poll_until, upload_folder

runner = CliRunner()
NOWHERE = ["--url", "http://127.0.0.1:9", "--api-key", "k"]


def test_times_are_epoch_iso_or_how_long_ago():
    assert abs(float(parse_when("2h")) - (time.time() - 7200)) < 5
    assert abs(float(parse_when("7d")) - (time.time() - 7 * 86400)) < 5
    assert (
        parse_when("1700000000") == "1700000000"
        and parse_when("2026-05-01T12:00:00Z") == "2026-05-01T12:00:00Z"
    )
    assert parse_when(None) is None
    with pytest.raises(typer.BadParameter, match="'yesterday' is not a time"):
        parse_when("yesterday")


def test_bad_arguments_are_refused_before_any_request():
    since = runner.invoke(app, ["requests", "--since", "yesterday", *NOWHERE])
    assert since.exit_code == 2 and "'yesterday' is not a time" in since.output
    for bad in ("2", "meh"):
        score = runner.invoke(app, ["feedback", "send", "chatcmpl-x", bad, *NOWHERE])
        assert score.exit_code == 2 and "use up or down" in score.output
    rate = runner.invoke(app, ["capture", "on", "invoice", "--sample-rate", "0", *NOWHERE])
    assert rate.exit_code == 2 and "in (0, 1]" in rate.output


def test_deleting_every_capture_asks_first():
    declined = runner.invoke(app, ["capture", "delete", *NOWHERE], input="n\n")
    assert declined.exit_code == 1 and "Delete every capture" in declined.output
    assert "ServerUnreachable" not in declined.output  # nothing was sent
    confirmed = runner.invoke(app, ["capture", "delete", *NOWHERE], input="y\n")
    assert confirmed.exit_code == 1 and "ServerUnreachable" in confirmed.output
    filtered = runner.invoke(app, ["capture", "delete", "--deployment", "invoice", *NOWHERE])
    # a filter needs no question
    assert filtered.exit_code == 1 and "ServerUnreachable" in filtered.output


def test_a_failed_export_leaves_the_earlier_file_and_no_partial_one(tmp_path: Path):
    out = tmp_path / "data.jsonl"
    out.write_text("earlier\n")
    result = runner.invoke(app, ["capture", "export", "invoice", "--out", str(out), *NOWHERE])
    assert result.exit_code == 1 and "ServerUnreachable" in result.output
    assert out.read_text() == "earlier\n" and [p.name for p in tmp_path.iterdir()] == ["data.jsonl"]


def _json(result) -> list[dict]:
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_the_feedback_loop_from_the_command_line(new_tenant, make_adapter, tmp_path: Path):
    tenant = new_tenant()
    # tables unclipped
    env = {"LORAFLEET_URL": tenant.url, "LORAFLEET_API_KEY": tenant.api_key, "COLUMNS": "200"}
    with tenant.http() as http:
        upload_folder(http, "ext", make_adapter(7))
        http.put("/v1/deployments/clidep", json={"adapter": "ext@1"}).raise_for_status()
        on = runner.invoke(
            app,
            [
                "capture",
                "on",
                "clidep",
                "--sample-rate",
                "1",
                "--max-per-day",
                "5",
                "--retention-days",
                "2",
            ],
            env=env,
        )
        assert on.exit_code == 0, on.output
        assert (
            "clidep captures 100% of answered requests, at most 5 a day (UTC), each kept 2 days"
            in on.output
        )
        ids = []
        for color in ((200, 30, 30), (30, 200, 30)):
            response = http.post(
                "/v1/chat/completions",
                json={
                    "model": "clidep",
                    "messages": image_messages(color=color),
                    "max_tokens": 6,
                    "temperature": 0,
                },
            )
            assert response.status_code == 200, response.text
            ids.append(response.headers["x-request-id"])

    def captured() -> list[dict] | None:
        rows = _json(
            runner.invoke(app, ["capture", "list", "--deployment", "clidep", "--json"], env=env)
        )
        return rows if len(rows) == 2 else None

    assert {row["id"] for row in poll_until(captured, 30, "two captures")} == set(ids)
    status = runner.invoke(app, ["capture", "status", "clidep"], env=env)
    assert status.exit_code == 0 and "2 captures (2 today), 2 images" in status.output

    def logged() -> list[dict] | None:  # one row per page: --all follows the cursors
        rows = _json(
            runner.invoke(
                app,
                ["requests", "--deployment", "clidep", "--all", "--json", "--limit", "1"],
                env=env,
            )
        )
        return rows if {row["id"] for row in rows} == set(ids) else None

    assert all(
        row["captured"] for row in poll_until(logged, 15, "both requests in the request log")
    )
    table = runner.invoke(app, ["requests", "--since", "1h"], env=env)
    assert table.exit_code == 0 and "clidep" in table.output and "confidence" in table.output

    sent = runner.invoke(
        app, ["feedback", "send", ids[0], "down", "--correction", "a green square"], env=env
    )
    assert sent.exit_code == 0 and "with a correction" in sent.output, sent.output
    listed = _json(runner.invoke(app, ["feedback", "--deployment", "clidep", "--json"], env=env))
    assert [(f["id"], f["score"], f["correction"]) for f in listed] == [
        (ids[0], -1, "a green square")
    ]

    out = tmp_path / "data.jsonl"
    exported = runner.invoke(
        app, ["capture", "export", "clidep", "--out", str(out), "--with-feedback"], env=env
    )
    assert exported.exit_code == 0, exported.output
    assert (
        f"1 example written to {out}" in exported.output
        and "left out: 1 no feedback" in exported.output
    )
    [example] = load_jsonl(out)
    assert example.messages[-1]["content"] == "a green square" and len(example.images) == 1
    everything = runner.invoke(
        app, ["capture", "export", "clidep", "--out", str(out), "--lowest-confidence", "5"], env=env
    )
    assert (
        "2 examples written" in everything.output and "(2 marked for review)" in everything.output
    )
    assert len(load_jsonl(out)) == 2

    one = runner.invoke(app, ["capture", "delete", "--id", ids[1]], env=env)
    assert one.exit_code == 0 and "deleted 1 captures and 1 images" in one.output, one.output
    off = runner.invoke(app, ["capture", "off", "clidep"], env=env)
    assert off.exit_code == 0 and "deleted 1 captures and 1 images" in off.output, off.output
    empty = runner.invoke(app, ["capture", "export", "clidep", "--out", str(out)], env=env)
    assert empty.exit_code == 0 and "0 examples written" in empty.output and out.read_text() == ""
    assert "capture off" in runner.invoke(app, ["capture", "status", "clidep"], env=env).output

"""`lorafleet traffic` and `lorafleet rollout series`: arguments checked at parse time, and both
commands against the real routes on loopback HTTP over a real SQLite catalog (no engine): exit
codes and printed lines."""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lorafleet.adapters.catalog import (
    Adapter,
    AdapterVersion,
    Deployment,
    RequestRecord,
    Rollout,
    RolloutSample,
    open_catalog,
)
from lorafleet.adapters.tenants import create_tenant
from lorafleet.serve.api import adapters, rollouts
from lorafleet.serve.cli import app
from lorafleet.serve.feedback.request_log import new_request_id
from tests.helpers import catalog_app, on_loopback

runner = CliRunner()
NOWHERE = ["--url", "http://127.0.0.1:9", "--api-key", "k"]
START = 1_000_000.0


def test_a_window_or_period_out_of_range_is_refused_before_any_request():
    for bad in ("5", "86401", "nan"):
        window = runner.invoke(app, ["traffic", "d", "--window", bad, *NOWHERE])
        assert (
            window.exit_code == 2 and f"{bad}: the window is 10 to 86400 seconds" in window.output
        ), window.output
    for bad in ("0", "3601"):
        bucket = runner.invoke(app, ["rollout", "series", "d", "--bucket", bad, *NOWHERE])
        assert bucket.exit_code == 2 and f"{bad}: a period is 1 to 3600 seconds" in bucket.output, (
            bucket.output
        )
    # not a number
    assert runner.invoke(app, ["traffic", "d", "--window", "soon", *NOWHERE]).exit_code == 2
    reached = runner.invoke(app, ["traffic", "d", "--window", "10", *NOWHERE])
    # 10 is fine: it was sent
    assert reached.exit_code == 1 and "ServerUnreachable" in reached.output


@pytest.fixture
def gateway(tmp_path: Path, sqlite_catalog) -> Iterator[tuple[list[str], int]]:
    """Tenant acme's deployment `d` on loopback: three requests just now, and a finished 600 s
    canary rollout with samples in two 10 s periods; (the CLI's --url/--api-key arguments, the
    rollout's id)."""
    _, sessions = open_catalog(sqlite_catalog(tmp_path / "catalog.db"))
    now = time.time()
    with sessions() as session:
        tenant, key = create_tenant(session, "acme")
        adapter = Adapter(tenant_id=tenant.id, name="m")
        stable = AdapterVersion(
            adapter=adapter,
            version=1,
            digest="a" * 64,
            rank=8,
            alpha=16,
            target_modules=["q_proj"],
            size_bytes=1,
        )
        deployment = Deployment(tenant_id=tenant.id, name="d", stable=stable)
        rollout = Rollout(
            deployment=deployment,
            kind="canary",
            phase="Promoted",
            salt="s",
            steps=[100],
            variants=[
                {
                    "label": "canary",
                    "version_id": 2,
                    "digest": "b" * 64,
                    "ref": "m@2",
                    "weight": 100.0,
                }
            ],
            created_by="t",
            created_at=START,
            finished_at=START + 600,
        )
        session.add_all([adapter, stable, deployment, rollout])
        session.flush()
        for latency_s, status, variant, digest in (
            (0.1, 200, "stable", "a"),
            (0.3, 200, "stable", "a"),
            (1.0, 503, "canary", "b"),
        ):
            session.add(
                RequestRecord(
                    request_id=new_request_id(),
                    tenant_id=tenant.id,
                    at=now - 5,
                    deployment_id=deployment.id,
                    deployment="d",
                    variant=variant,
                    digest=digest * 64,
                    status=status,
                    latency_s=latency_s,
                )
            )
        for at, ok, valid in (
            (START + 1, True, True),
            (START + 2, True, False),
            (START + 12, False, None),
        ):
            session.add(
                RolloutSample(
                    rollout_id=rollout.id,
                    step_index=0,
                    variant="canary",
                    unit="u",
                    ok=ok,
                    latency_s=0.25,
                    output_tokens=3,
                    format_valid=valid,
                    at=at,
                    confidence=None,
                )
            )
        session.commit()
        rollout_id = rollout.id
    with on_loopback(catalog_app(sessions, adapters.router, rollouts.router)) as url:
        yield ["--url", url, "--api-key", key], rollout_id


def _lines(result) -> list[str]:
    assert result.exit_code == 0, result.output
    return result.output.splitlines()


def test_traffic_prints_the_totals_and_each_variant(gateway):
    options, _ = gateway
    lines = _lines(runner.invoke(app, ["traffic", "d", *options], env={"COLUMNS": "200"}))
    assert any("d, the last 300 s" in line for line in lines)
    header = next(line for line in lines if "variant" in line)
    assert all(
        name in header
        for name in ("requests", "per s", "errors", "4xx", "error rate", "p50 ms", "p95 ms")
    )
    total = next(line.split("│") for line in lines if line.startswith("│ all"))
    assert [cell.strip() for cell in total[3:]] == [
        "3",
        "0.01",
        "1",
        "0",
        "0.333",
        "200",
        "290",
        "200",
        "",
    ]
    stable = next(line.split("│") for line in lines if line.startswith("│ stable"))
    assert [cell.strip() for cell in stable[2:5]] == ["a" * 12, "2", "0.00667"]
    canary = next(line.split("│") for line in lines if line.startswith("│ canary"))
    assert [cell.strip() for cell in canary[5:11]] == ["1", "0", "1.000", "-", "-", "-"]


def test_traffic_as_json_is_the_apis_answer(gateway):
    options, _ = gateway
    answer = json.loads(
        runner.invoke(app, ["traffic", "d", "--window", "60", "--json", *options]).output
    )
    assert (answer["deployment"], answer["window_s"], answer["requests"], answer["errors"]) == (
        "d",
        60.0,
        3,
        1,
    )
    assert [v["variant"] for v in answer["variants"]] == ["canary", "stable"]


def test_rollout_series_prints_one_row_per_variant_and_period(gateway):
    options, rollout_id = gateway
    lines = _lines(
        runner.invoke(
            app, ["rollout", "series", "d", "--bucket", "10", *options], env={"COLUMNS": "200"}
        )
    )
    since = dt.datetime.fromtimestamp(START).strftime("%H:%M:%S")
    assert any(
        f"rollout #{rollout_id} of d, periods of 10 s since {since}" in line for line in lines
    )
    rows = [
        [cell.strip() for cell in line.split("│")[1:-1]]
        for line in lines
        if line.startswith("│ canary")
    ]
    later = dt.datetime.fromtimestamp(START + 10).strftime("%H:%M:%S")
    assert rows == [
        ["canary", since, "2", "0", "0.000", "250", "1/2", "0", "-"],
        ["canary", later, "1", "1", "1.000", "-", "-", "0", "-"],
    ]
    default = json.loads(runner.invoke(app, ["rollout", "series", "d", "--json", *options]).output)
    # 600 s / 60
    assert default["bucket_s"] == 10.0 and [len(v["buckets"]) for v in default["variants"]] == [2]


def test_an_unknown_deployment_is_one_red_line_and_exit_1(gateway):
    options, _ = gateway
    for command in (["traffic", "nope"], ["rollout", "series", "nope"]):
        result = runner.invoke(app, [*command, *options], env={"COLUMNS": "200"})
        assert (
            result.exit_code == 1
            and "ApiError: The model `nope` does not exist (HTTP 404)" in result.output
        )

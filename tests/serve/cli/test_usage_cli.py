"""`lorafleet usage` and `lorafleet tenants prices|budget` against a real gateway app on loopback
HTTP (a real SQLite catalog, no engine): what they print is the API's numbers, as a table, JSON,
CSV or a file; bad input exits 1 with the API's message."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator

import httpx
import pytest
from typer.testing import CliRunner

from lorafleet.serve.cli import app
from tests.helpers import on_loopback, record_usage
from tests.serve.console.conftest import ADMIN_KEY, console_app  # noqa: F401 - the fixture

runner = CliRunner()


@pytest.fixture(scope="module")
def gateway(console_app) -> Iterator[tuple[str, str]]:  # noqa: F811 - the fixture
    """Tenant acme with a day of usage, on loopback; (the URL, acme's key)."""
    with on_loopback(console_app, lifespan="off") as url:
        admin = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        key = admin.post("/admin/tenants", json={"name": "acme"}).json()["api_key"]
        record_usage(
            console_app.state.gateway,
            "acme",
            0.25,
            prompt_tokens=1200,
            completion_tokens=300,
            images=2,
            prefill_s=1.0,
            decode_s=2.0,
        )
        yield url, key


def _run(*args: str) -> str:
    result = runner.invoke(app, list(args), catch_exceptions=False, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.output


def test_usage_prints_the_apis_numbers_as_a_table_json_csv_or_a_file(gateway, tmp_path):
    url, key = gateway
    table = _run("usage", "--url", url, "--api-key", key, "--group-by", "day,deployment")
    assert "acme:" in table and "reader" in table and "1,200" in table and "0.2500" in table
    report = json.loads(_run("usage", "--url", url, "--api-key", key, "--json"))
    assert report["total"]["prompt_tokens"] == 1200 and report["total"]["engine_seconds"] == 3.0
    text = _run("usage", "--url", url, "--api-key", key, "--csv", "--group-by", "deployment")
    (row,) = list(csv.DictReader(io.StringIO(text)))
    assert (row["deployment"], row["images"], row["cost"]) == ("reader", "2", "0.25")
    target = tmp_path / "usage.csv"
    _run("usage", "--url", url, "--api-key", key, "--csv", "-o", str(target))
    assert target.read_text().startswith("kind,requests,")
    # the admin: every tenant, or one
    everyone = _run("usage", "--url", url, "--admin-key", ADMIN_KEY, "--group-by", "tenant")
    assert "every tenant" in everyone and "acme" in everyone
    # with both keys: the tenant's own, unless the admin's report is asked for
    both = ["--url", url, "--api-key", key, "--admin-key", ADMIN_KEY]
    assert "acme:" in _run("usage", *both)
    assert "every tenant" in _run("usage", *both, "--every-tenant")
    assert "every tenant" in _run("usage", *both, "--group-by", "tenant,day")
    one = json.loads(
        _run("usage", "--url", url, "--admin-key", ADMIN_KEY, "--tenant", "acme", "--json")
    )
    assert one["tenant"] == "acme" and one["total"]["completion_tokens"] == 300


def test_usage_without_a_key_or_with_a_bad_day_exits_1_saying_why(gateway):
    url, key = gateway
    missing = runner.invoke(app, ["usage", "--url", url])
    assert missing.exit_code == 1 and "--api-key" in missing.output
    bad = runner.invoke(app, ["usage", "--url", url, "--api-key", key, "--start", "soon"])
    assert bad.exit_code == 1 and "YYYY-MM-DD" in bad.output


def test_the_admin_sets_prices_and_budgets_from_the_cli(gateway):
    url, _ = gateway
    admin = ["--url", url, "--admin-key", ADMIN_KEY]
    prices = _run("tenants", "prices", "acme", "--image", "0.5", "--prompt", "2", *admin)
    assert "per_image" in prices and "0.5" in prices and "USD" in prices
    assert "default" in _run("tenants", "prices", "acme", *admin)
    bad = runner.invoke(app, ["tenants", "prices", "acme", "--image", "cheap", *admin])
    assert bad.exit_code == 2 and "'cheap'" in bad.output
    assert "acme has no budget" in _run("tenants", "budget", "acme", *admin)
    # 1,500 tokens already spent today: the budget is spent
    shown = _run(
        "tenants", "budget", "acme", "day", "--tokens", "1000", "--alert-at", "0.8", *admin
    )
    assert "1,000 tokens" in shown and "1,500 tokens" in shown and "spent" in shown
    month = _run("tenants", "budget", "acme", "month", "--cost", "10", *admin)
    assert "10 USD" in month and "open" in month
    refused = runner.invoke(app, ["tenants", "budget", "acme", "week", "--tokens", "5", *admin])
    assert refused.exit_code == 1 and "'day' or 'month'" in refused.output
    nothing = runner.invoke(app, ["tenants", "budget", "acme", "day", *admin])
    assert nothing.exit_code == 1 and "'tokens', 'cost' or both" in nothing.output
    removed = _run("tenants", "budget", "acme", "day", "--remove", *admin)
    assert "acme's day budget removed" in removed
    assert "day 20" not in removed and "month 20" in removed

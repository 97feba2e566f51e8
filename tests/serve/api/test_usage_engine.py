"""Usage and budgets on the real gateway and engine, through the unmodified `openai` SDK: the
report's tokens are the sum of the `usage` every client received (streamed answers included), its
images and engine time are counted and priced, CSV and JSON agree; a token budget stops its tenant
with 429 and the period's reset in `Retry-After` while another tenant goes on, records its alert
and exhaustion once, and a money budget of the month counts what the month already spent."""

from __future__ import annotations

import csv
import io
import math
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import NEAR_BASE_STD
from tests.helpers import assert_openai_error, image_messages, poll_until, upload_folder

pytestmark = pytest.mark.engine

PRICES = {
    "prompt_per_million": 2.0,
    "completion_per_million": 10.0,
    "per_image": 0.01,
    "per_engine_hour": 36.0,
}


def _deployed(tenant, make_adapter, name: str = "reader") -> None:
    with tenant.http() as http:
        upload_folder(http, "ext", make_adapter(3, 8, std=NEAR_BASE_STD))
        http.put(f"/v1/deployments/{name}", json={"adapter": "ext@1"}).raise_for_status()


def _report(tenant, **params) -> dict:
    with tenant.http() as http:
        response = http.get("/v1/usage", params=params)
    assert response.status_code == 200, response.text
    return response.json()


def _seconds_to_midnight() -> float:
    now = datetime.now(UTC)
    midnight = datetime(now.year, now.month, now.day, tzinfo=UTC) + timedelta(days=1)
    return (midnight - now).total_seconds()


def test_the_report_is_the_sum_of_what_the_clients_received(server, new_tenant, make_adapter):
    tenant = new_tenant()
    _deployed(tenant, make_adapter)
    with server.admin() as admin:
        admin.put(f"/admin/tenants/{tenant.name}/prices", json=PRICES).raise_for_status()
    client = tenant.openai()
    received = {"prompt": 0, "completion": 0}

    def count(usage) -> None:
        received["prompt"] += usage.prompt_tokens
        received["completion"] += usage.completion_tokens

    for i in range(3):  # plain, then pictures
        answer = client.chat.completions.create(
            model="reader",
            messages=[{"role": "user", "content": f"Count to {i + 2}."}],
            max_tokens=8,
        )
        count(answer.usage)
    for color in ((200, 30, 30), (30, 30, 200)):
        answer = client.chat.completions.create(
            model="reader", messages=image_messages(color=color), max_tokens=6
        )
        count(answer.usage)
    for messages in ([{"role": "user", "content": "Stream a word."}], image_messages()):
        stream = client.chat.completions.create(
            model="reader",
            messages=messages,
            max_tokens=7,
            stream=True,
            stream_options={"include_usage": True},
        )
        usages = [chunk.usage for chunk in stream if chunk.usage is not None]
        assert len(usages) == 1
        count(usages[0])
    # the engine's own times are the gateway's: the client's answer is OpenAI's shape
    with tenant.http() as http:
        raw = http.post(
            "/v1/chat/completions",
            json={
                "model": "reader",
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 3,
            },
        )
        assert raw.status_code == 200 and "metrics" not in raw.json()
        received["prompt"] += raw.json()["usage"]["prompt_tokens"]
        received["completion"] += raw.json()["usage"]["completion_tokens"]
        # a request that fails: counted apart, costs nothing
        missing = http.post(
            "/v1/chat/completions",
            json={"model": "nowhere", "messages": [{"role": "user", "content": "x"}]},
        )
        assert missing.status_code == 404

    def settled() -> dict | None:
        report = _report(tenant)
        total = report["total"]
        done = total["requests"] == 8 and total["failed_requests"] == 1
        return report if done else None

    report = poll_until(settled, 30, "the usage flushed")
    total = report["total"]
    assert (total["prompt_tokens"], total["completion_tokens"]) == (
        received["prompt"],
        received["completion"],
    )
    assert total["images"] == 3
    assert total["engine_seconds"] > 0  # the engine reported its prefill and decode times
    expected_cost = (
        total["prompt_tokens"] * 2.0 / 1e6
        + total["completion_tokens"] * 10.0 / 1e6
        + 3 * 0.01
        + total["engine_seconds"] * 36.0 / 3600
    )
    assert math.isclose(total["cost"], expected_cost, abs_tol=1e-6)
    assert report["currency"] == "USD" and report["prices"]["per_image"] == 0.01
    assert report["tenant"] == tenant.name and report["budgets"] == []
    assert [row["kind"] for row in report["rows"]] == ["live"]

    # grouped: by day, deployment and adapter; the failed request reached no deployment
    grouped = _report(tenant, group_by="day,deployment,adapter")
    today = datetime.now(UTC).date().isoformat()
    by_deployment = {row["deployment"]: row for row in grouped["rows"]}
    assert set(by_deployment) == {"reader", ""}
    reader = by_deployment["reader"]
    assert reader["day"] == today and reader["adapter"] == "ext@1" and len(reader["digest"]) == 64
    assert (reader["requests"], reader["failed_requests"]) == (8, 0)
    assert (by_deployment[""]["requests"], by_deployment[""]["failed_requests"]) == (0, 1)

    # CSV: the same rows and numbers, the header first
    with tenant.http() as http:
        response = http.get(
            "/v1/usage", params={"group_by": ["day", "deployment", "adapter"], "format": "csv"}
        )
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/csv")
    lines = list(csv.DictReader(io.StringIO(response.text)))
    assert response.text.splitlines()[0].startswith("day,deployment,adapter,digest,kind,requests")
    assert len(lines) == len(grouped["rows"])
    for line, row in zip(lines, grouped["rows"], strict=True):
        for column, value in line.items():
            if column == "currency":
                assert value == "USD"
            elif isinstance(row[column], float):
                assert math.isclose(float(value), row[column]), column
            else:
                assert value == str(row[column]), column

    # the admin's report of every tenant has this one's row, the same numbers
    with server.admin() as admin:
        fleet = admin.get("/v1/usage", params={"group_by": "tenant"}).json()
        one = admin.get("/v1/usage", params={"tenant": tenant.name}).json()
    assert fleet["tenant"] is None and fleet["prices"] is None
    mine = [row for row in fleet["rows"] if row["tenant"] == tenant.name]
    assert len(mine) == 1 and mine[0]["prompt_tokens"] == received["prompt"]
    assert one["total"] == total


def _ratio(server, tenant: str, period: str) -> float | None:
    with server.admin() as admin:
        text = admin.get("/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "lorafleet_budget_used_ratio" and sample.labels == {
                "tenant": tenant,
                "period": period,
            }:
                return sample.value
    return None


def test_a_token_budget_stops_its_tenant_until_the_day_ends_and_no_one_else(
    server, new_tenant, make_adapter
):
    capped, other = new_tenant(), new_tenant()
    _deployed(capped, make_adapter)
    _deployed(other, make_adapter)
    with server.admin() as admin:
        bad = admin.put(f"/admin/tenants/{capped.name}/budgets/day", json={"alert_at": 0.5})
        assert_openai_error(bad, 400, "'tokens', 'cost' or both")
        bad = admin.put(f"/admin/tenants/{capped.name}/budgets/week", json={"tokens": 10})
        assert_openai_error(bad, 400)
        set_ = admin.put(
            f"/admin/tenants/{capped.name}/budgets/day", json={"tokens": 120, "alert_at": 0.5}
        )
        assert set_.status_code == 200, set_.text
        assert set_.json()["budgets"][0]["spent_tokens"] == 0
    client = capped.openai()
    spent, answered = 0, 0
    request = {
        "model": "reader",
        "messages": [{"role": "user", "content": "Tell me about the sea."}],
        "max_tokens": 12,
    }
    with capped.http() as http:
        while True:
            response = http.post("/v1/chat/completions", json=request)
            if response.status_code != 200:
                break
            spent += response.json()["usage"]["total_tokens"]
            answered += 1
            assert answered < 50, "the budget never stopped the tenant"
        error = assert_openai_error(response, 429, "day budget")
    # admitted while under the budget: the last answer took it over
    assert spent >= 120 and spent - 120 < 40 + 12
    assert (error["type"], error["code"]) == ("insufficient_quota", "budget_exceeded")
    retry_after = int(response.headers["retry-after"])
    assert abs(retry_after - _seconds_to_midnight()) < 5
    if retry_after > 60:
        assert response.headers["x-should-retry"] == "false"
    # the SDK sees OpenAI's quota error
    from openai import RateLimitError

    with pytest.raises(RateLimitError) as refused:
        client.chat.completions.create(**request)
    assert refused.value.code == "budget_exceeded"
    # a batch is refused too
    uploaded = client.files.create(
        file=(
            "r.jsonl",
            b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", '
            b'"body": {"model": "reader", "messages": [{"role": "user", "content": "x"}]}}\n',
        ),
        purpose="batch",
    )
    with capped.http() as http:
        batch = http.post(
            "/v1/batches",
            json={
                "input_file_id": uploaded.id,
                "endpoint": "/v1/chat/completions",
                "completion_window": "24h",
            },
        )
        assert_openai_error(batch, 429, "day budget")
    # another tenant is not touched
    assert other.openai().chat.completions.create(**request).choices
    # the tenant's report says so; the alert and the exhaustion each recorded once
    budget = _report(capped)["budgets"][0]
    assert budget["exceeded"] and budget["spent_tokens"] == spent and budget["used"] >= 1
    assert budget["period"] == "day" and budget["tokens"] == 120
    with server.admin() as admin:
        events = admin.get("/admin/audit", params={"tenant": capped.name}).json()
    actions = [e["action"] for e in events]
    assert actions.count("budget.alert") == 1 and actions.count("budget.exceeded") == 1
    assert actions.count("budget.set") == 1
    alert = next(e for e in events if e["action"] == "budget.alert")
    assert alert["actor"] == "lorafleet" and alert["details"]["used"] >= 0.5
    assert _ratio(server, capped.name, "day") >= 1.0

    # raised: the tenant is served again at once (this gateway's snapshot is dropped)
    with server.admin() as admin:
        admin.put(
            f"/admin/tenants/{capped.name}/budgets/day", json={"tokens": 100_000}
        ).raise_for_status()
    assert client.chat.completions.create(**request).choices
    # a month's money budget counts what the month already spent, at the prices then
    with server.admin() as admin:
        admin.delete(f"/admin/tenants/{capped.name}/budgets/day").raise_for_status()
        missing = admin.delete(f"/admin/tenants/{capped.name}/budgets/day")
        assert_openai_error(missing, 404)
        admin.put(
            f"/admin/tenants/{capped.name}/prices", json={"completion_per_million": 1000.0}
        ).raise_for_status()
    priced = client.chat.completions.create(**request).usage.completion_tokens / 1000

    def recorded() -> float:
        cost = _report(capped)["total"]["cost"]
        return cost if cost >= priced - 1e-9 else 0.0

    spent_cost = poll_until(recorded, 30, "the priced request in the report")
    with server.admin() as admin:
        budgets = admin.put(
            f"/admin/tenants/{capped.name}/budgets/month", json={"cost": priced / 2}
        ).json()["budgets"]
    assert budgets[0]["exceeded"] and math.isclose(budgets[0]["spent_cost"], spent_cost)
    with capped.http() as http:
        refused_month = http.post("/v1/chat/completions", json=request)
    assert_openai_error(refused_month, 429, "month budget")
    now = datetime.now(UTC)
    next_month = datetime(now.year + now.month // 12, now.month % 12 + 1, 1, tzinfo=UTC)
    assert abs(int(refused_month.headers["retry-after"]) - (next_month - now).total_seconds()) < 5

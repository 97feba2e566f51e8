"""`GET /v1/usage` and the admin's prices and budgets on a gateway with a real catalog and no
engine: who reads what, every parameter checked with OpenAI's error shape, CSV beside JSON, and a
spent budget answered with 429 before the request goes anywhere."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from tests.helpers import assert_openai_error, record_usage


async def test_a_tenant_reads_its_own_usage_and_the_admin_everyones(console, console_app):
    names = [console.name("u"), console.name("v")]
    keys = [await console.tenant(name) for name in names]
    gateway = console_app.state.gateway
    record_usage(gateway, names[0], 0.5, prompt_tokens=100, completion_tokens=20, images=1)
    record_usage(gateway, names[1], 0.25, prompt_tokens=7, completion_tokens=3, images=1)
    async with console.api(keys[0]) as api:
        mine = (await api.get("/v1/usage")).json()
        by_day = await api.get("/v1/usage", params={"group_by": "day", "format": "csv"})
        other = await api.get("/v1/usage", params={"tenant": names[1]})
        assert_openai_error(other, 400, "a tenant's report is its own")
        assert_openai_error(await api.get("/v1/usage", params={"group_by": "tenant"}), 400)
    today = datetime.now(UTC).date()
    assert (mine["tenant"], mine["start"], mine["end"]) == (
        names[0],
        today.replace(day=1).isoformat(),
        today.isoformat(),
    )
    assert mine["total"]["prompt_tokens"] == 100 and mine["total"]["cost"] == 0.5
    assert mine["prices"]["currency"] == "USD" and mine["budgets"] == []
    assert by_day.text.splitlines() == [
        "day,kind,requests,failed_requests,prompt_tokens,completion_tokens,images,"
        "engine_seconds,cost,currency",
        f"{today.isoformat()},live,1,0,100,20,1,0.0,0.5,USD",
    ]
    assert 'filename="usage-' in by_day.headers["content-disposition"]
    # the admin key alone: every tenant, or one by name
    everyone = (await console.admin.get("/v1/usage", params={"group_by": "tenant"})).json()
    rows = {row["tenant"]: row for row in everyone["rows"]}
    assert rows[names[0]]["prompt_tokens"] == 100 and rows[names[1]]["prompt_tokens"] == 7
    assert everyone["tenant"] is None and everyone["prices"] is None
    one = (await console.admin.get("/v1/usage", params={"tenant": names[1]})).json()
    assert one["tenant"] == names[1] and one["total"]["completion_tokens"] == 3
    missing = await console.admin.get("/v1/usage", params={"tenant": "nobody-here"})
    assert_openai_error(missing, 404)
    # acting for a tenant: its report
    acting = await console.admin.get("/v1/usage", headers={"X-Lorafleet-Tenant": names[0]})
    assert acting.json()["tenant"] == names[0]
    # the admin key alone is no tenant anywhere else
    assert_openai_error(await console.admin.get("/v1/models"), 401)


@pytest.mark.parametrize(
    ("params", "phrase"),
    [
        ({"start": "yesterday"}, "YYYY-MM-DD"),
        ({"end": "2026-13-01"}, "YYYY-MM-DD"),
        ({"start": "2026-12-02", "end": "2026-12-01"}, "before start"),
        ({"start": "2000-01-01", "end": "2026-12-01"}, "at most"),
        ({"group_by": "week"}, "unknown week"),
        ({"format": "xml"}, "format"),
    ],
)
async def test_bad_report_parameters_are_400s(console, params, phrase):
    key = await console.tenant(console.name("p"))
    async with console.api(key) as api:
        assert_openai_error(await api.get("/v1/usage", params=params), 400, phrase)


async def test_the_admin_sets_prices_and_budgets_and_a_spent_budget_refuses_chat(
    console, console_app
):
    name = console.name("b")
    key = await console.tenant(name)
    admin = console.admin
    prices = (await admin.get(f"/admin/tenants/{name}/prices")).json()
    assert prices["overrides"] == {} and prices["prices"] == prices["defaults"]
    changed = await admin.put(
        f"/admin/tenants/{name}/prices", json={"per_image": 0.02, "prompt_per_million": 1.5}
    )
    assert changed.json()["prices"]["per_image"] == 0.02
    reset = await admin.put(f"/admin/tenants/{name}/prices", json={"per_image": None})
    assert reset.json()["overrides"] == {"prompt_per_million": 1.5}
    assert_openai_error(
        await admin.put(f"/admin/tenants/{name}/prices", json={"per_image": -1}), 400
    )
    assert_openai_error(
        await admin.put(f"/admin/tenants/{name}/prices", json={"per_token": 1}), 400
    )
    assert_openai_error(await admin.get("/admin/tenants/nobody-here/prices"), 404)
    for body in ({"tokens": 0}, {"cost": -1}, {"tokens": 5, "alert_at": 1.5}, {}):
        refused = await admin.put(f"/admin/tenants/{name}/budgets/day", json=body)
        assert_openai_error(refused, 400)
    assert_openai_error(
        await admin.put(f"/admin/tenants/{name}/budgets/year", json={"tokens": 5}), 400
    )
    async with console.api(key) as api:  # a tenant key is not the admin's
        assert_openai_error(
            await api.put(f"/admin/tenants/{name}/budgets/day", json={"tokens": 5}), 401
        )
    record_usage(console_app.state.gateway, name, prompt_tokens=60, completion_tokens=40)
    budgets = await admin.put(
        f"/admin/tenants/{name}/budgets/day", json={"tokens": 100, "alert_at": 0.8}
    )
    assert budgets.status_code == 200, budgets.text
    (day,) = budgets.json()["budgets"]
    assert (day["spent_tokens"], day["used"], day["exceeded"]) == (100, 1.0, True)
    async with console.api(key) as api:
        chat = await api.post(
            "/v1/chat/completions",
            json={"model": "reader", "messages": [{"role": "user", "content": "hi"}]},
        )
        error = assert_openai_error(chat, 429, "spent its day budget (100 of 100 tokens)")
        assert error["code"] == "budget_exceeded" and int(chat.headers["retry-after"]) >= 1
        report = (await api.get("/v1/usage")).json()
    assert report["budgets"][0]["exceeded"] and report["budgets"][0]["tokens"] == 100
    assert (await admin.get(f"/admin/tenants/{name}/budgets")).json()["budgets"][0]["used"] == 1
    gone = await admin.delete(f"/admin/tenants/{name}/budgets/day")
    assert gone.json()["budgets"] == []
    assert_openai_error(await admin.delete(f"/admin/tenants/{name}/budgets/day"), 404)
    audit = (await admin.get("/admin/audit", params={"tenant": name})).json()
    actions = [e["action"] for e in audit]
    assert actions[0] == "budget.delete" and actions[3] == "budget.set"
    assert sorted(actions[1:3]) == ["budget.alert", "budget.exceeded"]

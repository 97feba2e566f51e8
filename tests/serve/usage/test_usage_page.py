"""The console's usage page (server-rendered, no engine): a tenant sees its own numbers, a chart per
day and its budgets; the admin every tenant's; the numbers are the API's."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime

from lorafleet.adapters.tenants import get_tenant
from lorafleet.serve.feedback.request_log import LoggedRequest, new_request_id
from lorafleet.serve.usage.prices import NANOS
from tests.serve.console.conftest import ADMIN_KEY


def _used(console_app, name: str, prompt: int, cost: float) -> None:
    gateway = console_app.state.gateway
    with gateway.sessions() as session:
        tenant_id = get_tenant(session, name).id
    gateway.usage.add(
        LoggedRequest(
            request_id=new_request_id(),
            tenant_id=tenant_id,
            key_id=None,
            at=time.time(),
            status=200,
            error_code=None,
            prompt_tokens=prompt,
            completion_tokens=5,
            latency_s=0.1,
            stream=False,
            deployment="reader",
            digest="c" * 64,
        ),
        round(cost * NANOS),
    )
    gateway.usage.flush()


async def test_the_usage_page_shows_the_apis_numbers_per_day_and_the_budgets(
    console, console_app, browser_session
):
    mine, theirs = console.name("mine"), console.name("theirs")
    key = await console.tenant(mine)
    await console.tenant(theirs)
    _used(console_app, mine, 4321, 0.125)
    _used(console_app, theirs, 999_777, 2.5)
    budget = await console.admin.put(
        f"/admin/tenants/{mine}/budgets/month", json={"tokens": 10_000, "alert_at": 0.9}
    )
    assert budget.status_code == 200, budget.text
    browser = await browser_session(key)
    page = await browser.get("/console/usage")
    assert page.status_code == 200
    html = page.text
    assert "4,321 prompt" in html and "0.1250 USD" in html
    assert "999,777" not in html and theirs not in html  # another tenant's
    today = datetime.now(UTC).date().isoformat()
    assert re.search(r'<svg class="chart" role="img" aria-label="tokens per day"', html)
    assert f"{today} prompt tokens: 4,321" in html  # the bar's tooltip
    assert "4,326 tokens" in html and "43.3 %" in html and "10,000 tokens" in html
    # the admin: every tenant, with their budgets
    admin = await browser_session(ADMIN_KEY)
    everyone = (await admin.get("/console/usage")).text
    assert mine in everyone and theirs in everyone and "999,777" in everyone
    # a day that is not one: the API's message
    bad = await browser.get("/console/usage", params={"start": "someday"})
    assert bad.status_code == 400 and "YYYY-MM-DD" in bad.text
    # an empty range
    empty = await browser.get("/console/usage", params={"start": "2020-01-01", "end": "2020-01-31"})
    assert (
        "nothing used in this range" in empty.text and "Nothing used from 2020-01-01" in empty.text
    )

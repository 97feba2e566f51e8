"""The console's usage page (server-rendered, no engine): a tenant sees its own numbers, a chart per
day and its budgets; the admin every tenant's; the numbers are the API's."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from tests.helpers import record_usage
from tests.serve.console.conftest import ADMIN_KEY


async def test_the_usage_page_shows_the_apis_numbers_per_day_and_the_budgets(
    console, console_app, browser_session
):
    mine, theirs = console.name("mine"), console.name("theirs")
    key = await console.tenant(mine)
    await console.tenant(theirs)
    record_usage(console_app.state.gateway, mine, 0.125, prompt_tokens=4321)
    record_usage(console_app.state.gateway, theirs, 2.5, prompt_tokens=999_777)
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

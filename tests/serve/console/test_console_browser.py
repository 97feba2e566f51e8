"""The console in a real browser: Debian's chromium driven headless by Playwright (no browser
download), against the session's real gateway and engine. A tenant sees its running canary with
its weights, aborts it and sees the phase change and the decision; another tenant does not see
it; the admin sees both; no page logs an error, and every page fits a 1280-pixel window.
Screenshots of each page go to $LORAFLEET_SCREENSHOTS (default: build/screenshots)."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lorafleet.serve.drift.report import NOT_ENOUGH
from lorafleet.serve.gateway_client import inline_images
from tests.conftest import NEAR_BASE_STD
from tests.helpers import poll_until, upload_folder

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = Path(os.environ.get("LORAFLEET_SCREENSHOTS", "build/screenshots"))

pytestmark = pytest.mark.browser

WIDTH = 1280  # the window every console page fits, without scrolling sideways


@pytest.fixture(scope="module")
def browser() -> Iterator:
    playwright = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.fail(
            "chromium is not installed: `apt-get install chromium` "
            "(deploy/local/services.sh installs it)"
        )
    with playwright.sync_playwright() as p:
        instance = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--no-first-run",
            ],
        )
        yield instance
        instance.close()


class Visit:
    """One browser context (its own cookies) that fails the test on any console error or failed
    request."""

    def __init__(self, browser, base: str) -> None:
        self.context = browser.new_context(viewport={"width": WIDTH, "height": 900})
        self.page = self.context.new_page()
        self.base, self.problems = base, []
        self.page.on(
            "console",
            lambda m: (
                self.problems.append(f"console {m.type}: {m.text}")
                if m.type in ("error", "warning")
                else None
            ),
        )
        self.page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        self.page.on("requestfailed", lambda r: self.problems.append(f"request failed: {r.url}"))

    def sign_in(self, key: str) -> None:
        self.page.goto(self.base + "/console/")
        self.page.get_by_label("API key").fill(key)
        self.page.get_by_role("button", name="Sign in").click()
        self.page.wait_for_url("**/console/deployments")

    def shot(self, name: str) -> None:
        """A screenshot of the page, which must fit the window's width."""
        wider = self.page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert wider <= 0, f"{name}: {wider} px wider than a {WIDTH}-pixel window"
        SHOTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)

    def close(self) -> None:
        self.context.close()
        assert not self.problems, self.problems


def _two_versions(http: httpx.Client, make_adapter) -> None:
    """Adapter m in two versions, deployment `shapes` on m@1."""
    for folder in (make_adapter(0, 8, std=NEAR_BASE_STD), make_adapter(0, 4, std=NEAR_BASE_STD)):
        upload_folder(http, "m", folder)
    http.put("/v1/deployments/shapes", json={"adapter": "m@1"}).raise_for_status()


def _traffic(http: httpx.Client, n: int = 12) -> None:
    for i in range(n):
        answered = http.post(
            "/v1/chat/completions",
            json={
                "model": "shapes",
                "max_tokens": 4,
                "messages": [{"role": "user", "content": f"Say {i}."}],
            },
        )
        assert answered.status_code == 200, answered.text


def _canary(http: httpx.Client, make_adapter) -> None:
    """Deployment `shapes` on m@1 with a canary to m@2 that stays at its first step until it is
    acted on."""
    _two_versions(http, make_adapter)
    started = http.post(
        "/v1/deployments/shapes/rollout",
        json={"to": "m@2", "gate": False, "steps": [20, 100], "min_requests": 10**6},
    )
    assert started.status_code == 202, started.text
    _traffic(http)


def _ab_test(http: httpx.Client, make_adapter) -> None:
    _two_versions(http, make_adapter)
    started = http.post(
        "/v1/deployments/shapes/ab",
        json={"variants": [{"adapter": "m@1", "weight": 50}, {"adapter": "m@2", "weight": 50}]},
    )
    assert started.status_code == 201, started.text
    _traffic(http)


def _validation_set(http: httpx.Client, tmp_path: Path) -> None:
    from lorafleet.train.shapes import write_task

    validation = write_task("general", 8, tmp_path / "val.jsonl", seed=1)
    pushed = http.put(
        "/v1/deployments/shapes/validation", files={"file": ("v.jsonl", inline_images(validation))}
    )
    assert pushed.status_code == 200, pushed.text


def _replayed(http: httpx.Client, tmp_path: Path) -> None:
    """A validation set and one replay of it (the baseline), so that the drift page has its
    figures."""
    _validation_set(http, tmp_path)
    checked = http.post("/v1/deployments/shapes/drift/check")
    assert checked.status_code == 200, checked.text


def test_a_tenant_aborts_its_canary_others_do_not_see_it_the_admin_sees_all(
    server, new_tenant, make_adapter, browser, tmp_path
):
    owner, other = new_tenant(), new_tenant()
    with owner.http() as http:
        _canary(http, make_adapter)
    with other.http() as http:
        _ab_test(http, make_adapter)
        _validation_set(http, tmp_path)

    visit = Visit(browser, server.url)
    visit.sign_in(owner.api_key)
    page = visit.page
    row = page.get_by_role("row").filter(has_text="shapes")
    assert "stable" in row.inner_text() and "80" in row.inner_text() and "20" in row.inner_text()
    visit.shot("deployments")
    page.get_by_role("link", name="Progressing").click()
    page.wait_for_url("**/deployments/shapes/rollout")
    assert page.locator("#phase").inner_text() == "Progressing"
    weights = page.locator("#weights").inner_text()
    assert "m@1" in weights and "80" in weights and "m@2" in weights and "20" in weights
    visit.shot("rollout")
    page.get_by_role("link", name="Abort…").focus()  # the actions work from the keyboard alone
    page.keyboard.press("Enter")
    page.wait_for_url("**/confirm/abort")
    visit.shot("confirm-abort")
    page.get_by_role("button", name="Yes, abort").focus()
    page.keyboard.press("Enter")
    page.wait_for_url("**/rollout?done=abort")
    assert page.locator("#phase").inner_text() == "Aborted"
    decision = page.locator(".decision").first.inner_text()
    assert "abort" in decision.lower() and f"tenant:{owner.name}" in decision
    visit.shot("rollout-aborted")
    with owner.http() as http:
        _replayed(http, tmp_path)
    mine = f"/console/t/{owner.name}"
    for path, name in (
        ("/console/rollouts", "rollouts"),
        ("/console/adapters", "adapters"),
        (f"{mine}/deployments/shapes", "deployment"),
        (f"{mine}/deployments/shapes/drift", "drift"),
        (f"{mine}/adapters/m", "adapter"),
    ):
        response = page.goto(server.url + path)
        assert response is not None and response.status == 200, path
        visit.shot(name)
    page.goto(server.url + f"{mine}/deployments/shapes/drift")
    # one replay so far: no line over time yet, a sentence instead
    assert page.get_by_text(NOT_ENOUGH).first.is_visible()
    with owner.http() as http:  # a second replay (a check against the baseline)
        checked = http.post("/v1/deployments/shapes/drift/check")
        assert checked.status_code == 200, checked.text
    page.goto(server.url + f"{mine}/deployments/shapes/drift")
    # the drift report's own figure
    assert page.get_by_role("img", name="Validation replay").is_visible()
    visit.close()

    stranger = Visit(browser, server.url)
    stranger.sign_in(other.api_key)
    assert owner.name not in stranger.page.content()
    stranger.page.get_by_role("link", name="Running").click()
    stranger.page.wait_for_url("**/deployments/shapes/ab")
    assert "m@1" in stranger.page.content() and "Differences from" in stranger.page.content()
    # replays, then compares
    stranger.page.get_by_role("button", name="Evaluate on the validation set").click()
    stranger.page.wait_for_url("**/ab/evaluate")
    comparison = stranger.page.get_by_role(
        "table", name="Paired differences (95 % intervals)"
    ).inner_text()
    assert "m@2" in comparison and "m@1" in comparison
    assert "answered the 8 items of the validation set" in stranger.page.content()
    stranger.shot("ab")
    response = stranger.page.goto(
        server.url + f"/console/t/{owner.name}/deployments/shapes/rollout"
    )
    assert response is not None and response.status == 404
    stranger.problems.clear()  # the 404 itself is logged by the browser as a failed resource
    stranger.close()

    admin = Visit(browser, server.url)
    admin.sign_in(server.admin_key)
    text = admin.page.content()
    assert owner.name in text and other.name in text
    admin.shot("deployments-admin")
    for path in ("/console/engines", "/console/tenants", "/console/rollouts"):
        response = admin.page.goto(server.url + path)
        assert response is not None and response.status == 200, path
        admin.shot(path.rsplit("/", 1)[-1] + "-admin")
    admin.close()


def test_the_usage_page_charts_a_tenants_days_with_the_apis_numbers(
    server, new_tenant, make_adapter, browser
):
    tenant = new_tenant()
    with server.admin() as admin:
        admin.put(
            f"/admin/tenants/{tenant.name}/prices", json={"prompt_per_million": 500.0}
        ).raise_for_status()
    with tenant.http() as http:
        _two_versions(http, make_adapter)
        _traffic(http, n=6)

        def flushed() -> dict | None:
            report = http.get("/v1/usage", params={"group_by": "day"}).json()
            return report if report["total"]["requests"] == 6 else None

        report = poll_until(flushed, 30, "the traffic in the usage report")
    with server.admin() as admin:
        admin.put(
            f"/admin/tenants/{tenant.name}/budgets/month",
            json={"tokens": 1_000_000, "alert_at": 0.8},
        ).raise_for_status()
    visit = Visit(browser, server.url)
    visit.sign_in(tenant.api_key)
    visit.page.get_by_role("link", name="Usage").click()
    visit.page.wait_for_url("**/console/usage")
    assert visit.page.get_by_role("img", name="tokens per day").is_visible()
    assert visit.page.get_by_role("img", name="cost per day (USD)").is_visible()
    total = report["total"]
    summary = visit.page.locator("main p").first.inner_text()
    assert f"{total['prompt_tokens']:,} prompt" in summary
    assert f"{total['completion_tokens']:,} completion" in summary
    budgets = visit.page.get_by_role("table", name=re.compile("^Budgets")).inner_text()
    assert "1,000,000 tokens" in budgets and "80.0 %" in budgets
    rows = visit.page.get_by_role("table", name=re.compile("^Per deployment")).inner_text()
    assert "shapes" in rows and "m@1" in rows
    visit.shot("usage")
    visit.close()
    admin = Visit(browser, server.url)
    admin.sign_in(server.admin_key)
    admin.page.goto(server.url + "/console/usage")
    assert (
        tenant.name in admin.page.get_by_role("table", name=re.compile("^Per tenant")).inner_text()
    )
    admin.shot("usage-admin")
    admin.close()

"""Budgets' counters in the `limits` library's memory storage over real catalogs (no engine): a
tenant under budget is admitted, one over it refused until the period ends; the alert and the
exhaustion are recorded once for gateways sharing the counters; fresh counters start from the
catalog's usage of the period."""

from __future__ import annotations

import time

import pytest
from limits.aio.storage import MemoryStorage

from lorafleet.adapters.catalog import AuditEvent, Tenant, open_catalog
from lorafleet.adapters.catalog import Budget as BudgetRow
from lorafleet.errors import BudgetExceeded
from lorafleet.serve.metrics import Metrics
from lorafleet.serve.usage import records
from lorafleet.serve.usage.budgets import BudgetCounters, used_ratio
from lorafleet.serve.usage.ledger import UsageLedger
from lorafleet.serve.usage.periods import Budget, period_start, reset_at
from lorafleet.serve.usage.prices import NANOS
from lorafleet.serve.usage.records import Spent
from tests.helpers import logged_request


@pytest.fixture
def catalog(catalog_url):
    _, sessions = open_catalog(catalog_url)
    with sessions() as session:
        tenant = Tenant(name="acme", key_hash="acme")
        session.add(tenant)
        session.commit()
        return sessions, tenant.id


def _set(sessions, tenant_id: int, budget: Budget) -> None:
    with sessions() as session:
        records.set_budget(
            session, tenant_id, budget.period, budget.tokens, budget.cost, budget.alert_at
        )


def _events(sessions) -> list[str]:
    with sessions() as session:
        return [e.action for e in session.query(AuditEvent).order_by(AuditEvent.id)]


def test_used_ratio_is_the_quantity_nearest_its_limit():
    both = Budget("day", tokens=100, cost=1.0, alert_at=None)
    assert used_ratio(both, Spent(50, NANOS // 4)) == 0.5
    assert used_ratio(both, Spent(10, NANOS)) == 1.0
    assert used_ratio(Budget("day", None, 2.0, None), Spent(10**9, NANOS)) == 0.5


async def test_a_budget_admits_until_spent_then_refuses_until_the_period_ends(catalog):
    sessions, acme = catalog
    budget = Budget("day", tokens=100, cost=None, alert_at=0.5)
    _set(sessions, acme, budget)
    metrics = Metrics()
    storage = MemoryStorage()
    gateways = [BudgetCounters(storage, sessions, metrics, "USD") for _ in range(2)]
    await gateways[0].check(acme, "acme", [budget])
    await gateways[0].spend(acme, "acme", [budget], 40, 0)
    assert _events(sessions) == []
    await gateways[1].spend(acme, "acme", [budget], 20, 0)  # 60: the alert
    await gateways[0].spend(acme, "acme", [budget], 1, 0)  # still over the threshold
    assert _events(sessions) == ["budget.alert"]
    await gateways[1].check(acme, "acme", [budget])  # 61 of 100: admitted
    await gateways[0].spend(acme, "acme", [budget], 39, 0)  # 100: spent
    for gateway in gateways:
        with pytest.raises(BudgetExceeded) as refused:
            await gateway.check(acme, "acme", [budget])
    assert _events(sessions) == ["budget.alert", "budget.exceeded"]
    error = refused.value
    seconds = reset_at("day", period_start("day", time.time())) - time.time()
    assert abs(int(error.headers["Retry-After"]) - seconds) <= 2
    assert "100 of 100 tokens" in error.message and "resets at" in error.message
    assert (error.status, error.code, error.type) == (429, "budget_exceeded", "insufficient_quota")
    labels = {"tenant": "acme", "period": "day"}
    assert metrics.registry.get_sample_value("lorafleet_budget_used_ratio", labels) == 1.0
    assert metrics.registry.get_sample_value("lorafleet_budget_alert_ratio", labels) == 0.5
    assert metrics.budget_events.labels("acme", "day", "alert")._value.get() == 1
    assert metrics.rate_limited.labels("acme", "budget_exceeded")._value.get() == 2
    # a new budget is alerted on anew
    with sessions() as session:
        row = session.get(BudgetRow, (acme, "day"))
        assert row.alerted_for == row.exceeded_for == period_start("day", time.time())
    raised = Budget("day", tokens=1000, cost=None, alert_at=0.1)
    _set(sessions, acme, raised)
    await gateways[0].check(acme, "acme", [raised])
    assert _events(sessions)[-1] == "budget.alert"


async def test_fresh_counters_start_from_what_the_catalog_holds_for_the_period(catalog):
    """A restarted gateway (memory://) or a Redis without its data: the month is not forgotten."""
    sessions, acme = catalog
    ledger = UsageLedger(sessions, Metrics(), flush_s=1.0)
    ledger.add(logged_request(acme, prompt_tokens=30, completion_tokens=20), 3 * NANOS)
    ledger.flush()
    budget = Budget("month", tokens=None, cost=5.0, alert_at=None)
    counters = BudgetCounters(MemoryStorage(), sessions, Metrics(), "EUR")
    (status,) = await counters.status(acme, "acme", [budget])
    assert status.spent == Spent(50, 3 * NANOS) and status.used == pytest.approx(0.6)
    assert status.start.day == 1
    await counters.spend(acme, "acme", [budget], 10, 2 * NANOS)
    with pytest.raises(BudgetExceeded, match="5.0000 of 5 EUR"):
        await counters.check(acme, "acme", [budget])
    # seeded once: another look does not add the catalog's usage again
    (again,) = await counters.status(acme, "acme", [budget])
    assert again.spent == Spent(60, 5 * NANOS)


async def test_a_tenant_without_budgets_is_never_counted(catalog):
    sessions, acme = catalog
    storage = MemoryStorage()
    counters = BudgetCounters(storage, sessions, Metrics(), "USD")
    await counters.check(acme, "acme", [])
    await counters.spend(acme, "acme", [], 10**9, 10**12)
    assert await counters.status(acme, "acme", []) == []
    assert not storage.storage


async def test_a_removed_budget_and_an_ended_period_leave_no_gauge_up(catalog, monkeypatch):
    sessions, acme = catalog
    budget = Budget("day", tokens=10, cost=None, alert_at=0.5)
    _set(sessions, acme, budget)
    metrics = Metrics()
    counters = BudgetCounters(MemoryStorage(), sessions, metrics, "USD")
    await counters.spend(acme, "acme", [budget], 20, 0)
    labels = {"tenant": "acme", "period": "day"}

    def gauge(name: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    assert gauge("lorafleet_budget_used_ratio") == 2.0
    # the day is over: nothing spent in the new one yet
    ends = reset_at("day", period_start("day", time.time()))
    monkeypatch.setattr(time, "time", lambda: ends + 1)
    assert gauge("lorafleet_budget_used_ratio") == 0.0
    monkeypatch.undo()
    # the budget removed: the next request of the tenant drops its gauges
    await counters.check(acme, "acme", [])
    assert gauge("lorafleet_budget_used_ratio") is None
    assert gauge("lorafleet_budget_alert_ratio") is None
    # set again without a threshold: no alert gauge
    await counters.check(acme, "acme", [Budget("day", tokens=100, cost=None, alert_at=None)])
    assert gauge("lorafleet_budget_used_ratio") == 0.2
    assert gauge("lorafleet_budget_alert_ratio") is None

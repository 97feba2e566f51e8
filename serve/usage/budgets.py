"""Budgets: what a tenant may spend per period (tokens, money or both), enforced on every gateway.

Spending is counted where the rate limits count (`LORAFLEET_LIMITS_URL`: this process, or Redis
for the fleet), one counter per tenant, period and quantity, named by the period's first day so it
starts from zero when the period does. A counter that does not exist yet (a new period, a restarted
gateway's memory, a Redis without its data) is seeded once, from the usage the catalog holds for
the period: nothing spent is forgotten beyond the gateways' last usage flush. Tokens are known
when a request ends: a request is admitted while its tenant is under budget, and counted when it
ends, so requests in flight can overshoot a budget by their own size.

Crossing a budget's alert threshold, and reaching the budget, are each recorded once per period
for the whole fleet (a catalog mark, then an audit event) and counted in metrics.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from sqlalchemy.orm import sessionmaker
from starlette.concurrency import run_in_threadpool

from lorafleet.errors import BudgetExceeded
from lorafleet.serve.metrics import Metrics
from lorafleet.serve.usage import records
from lorafleet.serve.usage.periods import Budget, Period, period_start, reset_at
from lorafleet.serve.usage.prices import NANOS
from lorafleet.serve.usage.records import Spent

__all__ = ["Budget", "BudgetStatus", "BudgetCounters", "used_ratio"]

log = logging.getLogger("lorafleet.usage")

_KEEP_S = 86400  # a period's counters outlive it by a day (a request that ends just after)
_MAX_MARKED = 10_000  # recorded events remembered past this are pruned to the last month's


@dataclass(frozen=True)
class BudgetStatus:
    """A budget in its current period: what was spent, how much of it that is, when it resets."""

    budget: Budget
    start: date
    resets_at: float
    spent: Spent
    used: float  # the larger of the tokens' and the cost's fraction of their budget

    @property
    def exceeded(self) -> bool:
        return self.used >= 1.0


def used_ratio(budget: Budget, spent: Spent) -> float:
    """How much of the budget is spent (1.0: all of it): the quantity nearest its limit."""
    ratios = [0.0]
    if budget.tokens is not None:
        ratios.append(spent.tokens / budget.tokens)
    if budget.cost is not None:
        ratios.append(spent.cost_nanos / (budget.cost * NANOS))
    return max(ratios)


class BudgetCounters:
    """What each budgeted tenant spent in its budgets' current periods, shared by the gateways
    that share `storage` (the `limits` library's async storage)."""

    def __init__(
        self,
        storage,  # noqa: ANN001 - limits.aio.storage.Storage (memory or Redis)
        sessions: sessionmaker,
        metrics: Metrics,
        currency: str,
    ) -> None:
        self.storage = storage
        self.sessions = sessions
        self.metrics = metrics
        self.currency = currency
        # events this process saw recorded, per budget as set (a new budget is alerted on anew)
        self._marked: set[tuple[int, Budget, date, str]] = set()
        # each tenant's budgets as this gateway last saw them: their gauges read these when scraped
        self._seen: dict[str, dict[Period, BudgetStatus]] = {}

    async def check(self, tenant_id: int, tenant: str, budgets: Sequence[Budget]) -> None:
        """Raise BudgetExceeded (429, Retry-After: the period's end) while one of the budgets is
        spent. Cheap for a tenant without budgets (nothing is counted)."""
        if not budgets:
            if tenant in self._seen:  # its budgets were removed
                self._forget(tenant, budgets)
            return
        for status in await self.status(tenant_id, tenant, budgets):
            if status.exceeded:
                self.metrics.rate_limited.labels(tenant, "budget_exceeded").inc()
                raise BudgetExceeded(self._refusal(tenant, status), status.resets_at - time.time())

    async def spend(
        self,
        tenant_id: int,
        tenant: str,
        budgets: Sequence[Budget],
        tokens: int,
        cost_nanos: int,
    ) -> None:
        """Count an answered request's tokens and cost against each budget's period."""
        now = time.time()
        self._forget(tenant, budgets)
        for budget in budgets:
            start = period_start(budget.period, now)
            key = await self._seeded(tenant_id, budget.period, start, now)
            expiry = _expiry(budget.period, start, now)
            spent = Spent(
                await self.storage.incr(f"{key}/tokens", expiry, tokens),
                await self.storage.incr(f"{key}/cost", expiry, cost_nanos),
            )
            await self._observe(tenant_id, tenant, budget, start, spent)

    async def status(
        self, tenant_id: int, tenant: str, budgets: Sequence[Budget]
    ) -> list[BudgetStatus]:
        """Each budget in its current period."""
        now, statuses = time.time(), []
        self._forget(tenant, budgets)
        for budget in budgets:
            start = period_start(budget.period, now)
            key = await self._seeded(tenant_id, budget.period, start, now)
            spent = Spent(
                await self.storage.get(f"{key}/tokens"), await self.storage.get(f"{key}/cost")
            )
            statuses.append(await self._observe(tenant_id, tenant, budget, start, spent))
        return statuses

    async def _seeded(self, tenant_id: int, period: Period, start: date, now: float) -> str:
        """The counters' key of the period, seeded from the catalog by the first gateway that
        finds them missing."""
        key = f"lorafleet/budget/{tenant_id}/{period}/{start.isoformat()}"
        expiry = _expiry(period, start, now)
        if await self.storage.incr(f"{key}/seeded", expiry) == 1:
            try:
                spent = await run_in_threadpool(self._catalog_spent, tenant_id, period, start)
            except BaseException:
                await self.storage.clear(f"{key}/seeded")  # the next request seeds it
                raise
            await self.storage.incr(f"{key}/tokens", expiry, spent.tokens)
            await self.storage.incr(f"{key}/cost", expiry, spent.cost_nanos)
        return key

    def _catalog_spent(self, tenant_id: int, period: Period, start: date) -> Spent:
        with self.sessions() as session:
            return records.period_spent(session, tenant_id, period, start)

    async def _observe(
        self, tenant_id: int, tenant: str, budget: Budget, start: date, spent: Spent
    ) -> BudgetStatus:
        status = BudgetStatus(
            budget, start, reset_at(budget.period, start), spent, used_ratio(budget, spent)
        )
        self._show(tenant, status)
        if budget.alert_at is not None:
            if status.used >= budget.alert_at:
                await self._mark(tenant_id, tenant, status, "alert")
        if status.exceeded:
            await self._mark(tenant_id, tenant, status, "exceeded")
        return status

    def _show(self, tenant: str, status: BudgetStatus) -> None:
        """The budget's gauges: how much of it is spent, read when scraped (0 once its period has
        ended: the next period's spending shows at the tenant's next request), and its alert
        threshold."""
        key = (tenant, status.budget.period)
        seen = self._seen.setdefault(tenant, {})
        if status.budget.period not in seen:
            self.metrics.budget_used.labels(*key).set_function(lambda: self._used_now(*key))
        seen[status.budget.period] = status
        if status.budget.alert_at is not None:
            self.metrics.budget_alert_at.labels(*key).set(status.budget.alert_at)
        else:
            _remove(self.metrics.budget_alert_at, key)

    def _used_now(self, tenant: str, period: Period) -> float:
        status = self._seen.get(tenant, {}).get(period)
        return status.used if status is not None and time.time() < status.resets_at else 0.0

    def _forget(self, tenant: str, budgets: Sequence[Budget]) -> None:
        """Drop the gauges of the tenant's budgets that are no longer set."""
        seen = self._seen.get(tenant)
        if seen is None:
            return
        for period in set(seen) - {budget.period for budget in budgets}:
            del seen[period]
            _remove(self.metrics.budget_used, (tenant, period))
            _remove(self.metrics.budget_alert_at, (tenant, period))
        if not seen:
            del self._seen[tenant]

    async def _mark(self, tenant_id: int, tenant: str, status: BudgetStatus, event: str) -> None:
        """Record the event once per period for the fleet: the catalog's mark decides."""
        seen = (tenant_id, status.budget, status.start, event)
        if seen in self._marked:
            return
        details = {
            "start": status.start.isoformat(),
            "used": round(status.used, 4),
            "tokens": status.spent.tokens,
            "cost": status.spent.cost_nanos / NANOS,
            "budget_tokens": status.budget.tokens,
            "budget_cost": status.budget.cost,
            "alert_at": status.budget.alert_at,
        }

        def mark() -> bool:
            with self.sessions() as session:
                return records.mark_budget_event(
                    session, tenant_id, tenant, status.budget.period, status.start, event, details
                )

        try:
            recorded = await run_in_threadpool(mark)
        except Exception:  # noqa: BLE001 - the request goes on; the next one tries again
            log.exception(
                "recording the %s of %s's %s budget failed", event, tenant, status.budget.period
            )
            return
        self._marked.add(seen)
        if len(self._marked) > _MAX_MARKED:  # keep the periods that may still be current
            recent = status.start - timedelta(days=32)
            self._marked = {m for m in self._marked if m[2] >= recent}
        if recorded:
            self.metrics.budget_events.labels(tenant, status.budget.period, event).inc()
            log.warning(
                "tenant %s: %s budget %s (%.0f%% used)",
                tenant,
                status.budget.period,
                "alert threshold crossed" if event == "alert" else "spent",
                100 * status.used,
            )

    def _refusal(self, tenant: str, status: BudgetStatus) -> str:
        budget, spent = status.budget, status.spent
        limits = []
        if budget.tokens is not None:
            limits.append(f"{spent.tokens} of {budget.tokens} tokens")
        if budget.cost is not None:
            limits.append(f"{spent.cost_nanos / NANOS:.4f} of {budget.cost:g} {self.currency}")
        resets = datetime.fromtimestamp(status.resets_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return (
            f"tenant {tenant!r} spent its {budget.period} budget ({', '.join(limits)}); it "
            f"resets at {resets}"
        )


def _remove(gauge, labels: tuple[str, ...]) -> None:  # noqa: ANN001 - a labelled Gauge
    try:
        gauge.remove(*labels)
    except KeyError:  # never shown
        pass


def _expiry(period: Period, start: date, now: float) -> int:
    return max(1, int(reset_at(period, start) - now) + _KEEP_S)

"""Usage, prices and budgets over HTTP.

- `GET /v1/usage`: the usage report (a tenant key: its own; the admin key with
  `X-Lorafleet-Tenant`: that tenant's; the admin key alone: every tenant's, or `tenant=NAME`'s),
  JSON or CSV (`format=csv`), with one tenant's prices and budgets in effect.
- `GET|PUT /admin/tenants/{name}/prices`: a tenant's prices (null: back to the default).
- `GET /admin/tenants/{name}/budgets`, `PUT|DELETE /admin/tenants/{name}/budgets/{period}`: its
  budgets per day and per month, each with what the period has spent.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from lorafleet.adapters.catalog import Tenant, TenantPolicy
from lorafleet.adapters.tenants import get_tenant, record_audit, set_prices
from lorafleet.errors import InvalidRequest, NotFound
from lorafleet.serve.api.dependencies import Actor, AdminKey, GatewayDep, SessionDep
from lorafleet.serve.gateway import Gateway
from lorafleet.serve.route_cache import TenantEntry
from lorafleet.serve.usage import records, report
from lorafleet.serve.usage.budgets import BudgetStatus
from lorafleet.serve.usage.periods import Period, period_start, utc_day
from lorafleet.serve.usage.prices import NANOS, Prices
from lorafleet.serve.usage.schemas import (
    BudgetPublic,
    BudgetPut,
    PricesPublic,
    PricesPut,
    TenantBudgets,
    TenantPrices,
    UsageReport,
)

__all__ = ["router", "admin_router", "budget_public", "prices_public"]

router = APIRouter(prefix="/v1")
admin_router = APIRouter(prefix="/admin", dependencies=[AdminKey])

_CSV = "text/csv; charset=utf-8"


@router.get(
    "/usage",
    responses={200: {"content": {_CSV: {"schema": {"type": "string"}}}}},
)
async def get_usage(
    request: Request,
    gateway: GatewayDep,
    start: Annotated[
        str | None,
        Query(description="The first day (YYYY-MM-DD, UTC); default: the month's first."),
    ] = None,
    end: Annotated[
        str | None, Query(description="The last day, included (YYYY-MM-DD, UTC); default: today.")
    ] = None,
    group_by: Annotated[
        list[str],
        Query(description="deployment, adapter, day (and tenant, for every tenant's report)."),
    ] = [],  # noqa: B006 - FastAPI copies it
    format: Literal["json", "csv"] = "json",
    tenant: Annotated[
        str | None, Query(description="The admin's report of every tenant: only this one.")
    ] = None,
) -> UsageReport:
    """What requests used from `start` to `end`, grouped, with their cost: answered requests'
    tokens, images and engine time; failed requests counted apart; live requests and batches'
    lines in rows of their own."""
    entry: TenantEntry | None = getattr(request.state, "tenant", None)
    if entry is not None and tenant not in (None, entry.name):
        raise InvalidRequest(
            "'tenant' is the admin key's: a tenant's report is its own", param="tenant"
        )
    if entry is None and tenant is not None:
        entry = await gateway.route_cache.tenant_named(tenant)
    today = utc_day(time.time())
    first = report.parse_day(start, "start", period_start("month", time.time()))
    last = report.parse_day(end, "end", today)
    groups = report.parse_group_by(group_by, all_tenants=entry is None)
    tenant_ids = [entry.id] if entry is not None else None

    def read() -> list:
        with gateway.sessions() as session:
            return report.usage_rows(session, tenant_ids, first, last, groups)

    rows = await run_in_threadpool(read)
    currency = gateway.settings.currency
    if format == "csv":
        return Response(  # type: ignore[return-value]
            report.to_csv(rows, groups, currency),
            media_type=_CSV,
            headers={"Content-Disposition": f'attachment; filename="usage-{first}-{last}.csv"'},
        )
    budgets = []
    if entry is not None:
        statuses = await gateway.budgets.status(entry.id, entry.name, entry.budgets)
        budgets = [budget_public(s) for s in statuses]
    return UsageReport(
        tenant=entry.name if entry is not None else None,
        start=first,
        end=last,
        group_by=groups,
        currency=currency,
        rows=rows,
        total=report.total_of(rows),
        prices=prices_public(gateway, entry.prices) if entry is not None else None,
        budgets=budgets,
    )


def prices_public(gateway: Gateway, prices: Prices | None) -> PricesPublic:
    prices = prices or Prices.defaults(gateway.settings)
    return PricesPublic(**asdict(prices), currency=gateway.settings.currency)


def budget_public(status: BudgetStatus) -> BudgetPublic:
    budget = status.budget
    return BudgetPublic(
        period=budget.period,
        tokens=budget.tokens,
        cost=budget.cost,
        alert_at=budget.alert_at,
        start=status.start,
        resets_at=datetime.fromtimestamp(status.resets_at, UTC),
        spent_tokens=status.spent.tokens,
        spent_cost=status.spent.cost_nanos / NANOS,
        used=round(status.used, 6),
        exceeded=status.exceeded,
    )


# --- the admin's: prices and budgets ---


def _tenant_prices(gateway: Gateway, tenant: Tenant, overrides: dict) -> TenantPrices:
    defaults = Prices.defaults(gateway.settings)
    return TenantPrices(
        tenant=tenant.name,
        prices=prices_public(gateway, defaults.overridden(overrides)),
        overrides=overrides,
        defaults=prices_public(gateway, defaults),
    )


@admin_router.get("/tenants/{name}/prices")
def get_prices(name: str, gateway: GatewayDep, session: SessionDep) -> TenantPrices:
    tenant = get_tenant(session, name)
    policy = session.get(TenantPolicy, tenant.id)
    return _tenant_prices(gateway, tenant, (policy.prices if policy else None) or {})


@admin_router.put("/tenants/{name}/prices")
def put_prices(
    name: str, body: PricesPut, gateway: GatewayDep, session: SessionDep, actor: Actor
) -> TenantPrices:
    """Set some of the tenant's prices, or return them to the default with null; the others are
    unchanged. From now on: usage already recorded keeps its cost."""
    tenant = get_tenant(session, name)
    changes = body.model_dump(exclude_unset=True)
    policy = set_prices(session, tenant, changes)
    record_audit(session, actor, "tenant.prices", tenant.name, changes=changes)
    return _tenant_prices(gateway, tenant, policy.prices or {})


async def _budgets(gateway: Gateway, name: str) -> TenantBudgets:
    entry = await gateway.route_cache.tenant_named(name)
    statuses = await gateway.budgets.status(entry.id, entry.name, entry.budgets)
    return TenantBudgets(
        tenant=entry.name,
        currency=gateway.settings.currency,
        budgets=[budget_public(s) for s in statuses],
    )


@admin_router.get("/tenants/{name}/budgets")
async def get_budgets(name: str, gateway: GatewayDep) -> TenantBudgets:
    """The tenant's budgets, each with what its current period has spent."""
    return await _budgets(gateway, name)


@admin_router.put("/tenants/{name}/budgets/{period}")
async def put_budget(
    name: str, period: Period, body: BudgetPut, gateway: GatewayDep, actor: Actor
) -> TenantBudgets:
    """Set the tenant's budget of a day or a month (UTC): tokens, money (the prices' currency)
    or both, and an alert threshold (a fraction). Over it, its chat and batch requests get 429
    `budget_exceeded` until the period ends."""

    def write(session: Session) -> None:
        tenant = get_tenant(session, name)
        records.set_budget(session, tenant.id, period, body.tokens, body.cost, body.alert_at)
        record_audit(session, actor, "budget.set", tenant.name, period=period, **body.model_dump())

    await _in_session(gateway, write)
    return await _budgets(gateway, name)


@admin_router.delete("/tenants/{name}/budgets/{period}")
async def delete_budget(
    name: str, period: Period, gateway: GatewayDep, actor: Actor
) -> TenantBudgets:
    """Remove the tenant's budget of that period (404 if it has none)."""

    def write(session: Session) -> None:
        tenant = get_tenant(session, name)
        if not records.delete_budget(session, tenant.id, period):
            raise NotFound(f"tenant {tenant.name!r} has no {period} budget")
        record_audit(session, actor, "budget.delete", tenant.name, period=period)

    await _in_session(gateway, write)
    return await _budgets(gateway, name)


async def _in_session(gateway: Gateway, work) -> None:  # noqa: ANN001 - Callable[[Session], None]
    def run() -> None:
        with gateway.sessions() as session:
            work(session)

    await run_in_threadpool(run)

"""The catalog's side of usage and budgets (blocking; worker threads): usage added by the gateways'
ledgers (one upsert per row, so gateways add to the same day's rows without reading them), what a
tenant spent in a period, the report's grouped sums, and the admin's budgets with their once-per-
period alert and exhaustion marks.

Upserts are SQLite's and PostgreSQL's `INSERT ... ON CONFLICT DO UPDATE`, each row's counts added to
the stored ones in the statement itself; rows go in key order, so two gateways' flushes lock the
same rows in the same order.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import date
from typing import Any

from sqlalchemy import case, delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from lorafleet.adapters.catalog import Adapter, AdapterVersion, Budget, Tenant, UsageDay
from lorafleet.adapters.tenants import record_audit
from lorafleet.serve.route_cache import ROUTE_NEUTRAL
from lorafleet.serve.usage.periods import Period, period_end

__all__ = [
    "UsageKey",
    "UsageCounts",
    "Spent",
    "add_usage",
    "period_spent",
    "grouped_usage",
    "adapter_names",
    "tenant_names",
    "set_budget",
    "delete_budget",
    "list_budgets",
    "mark_budget_event",
]


@dataclass(frozen=True, order=True)
class UsageKey:
    """One row of `usage_days`."""

    tenant_id: int
    day: date
    deployment: str
    digest: str
    batch: bool
    failed: bool


@dataclass
class UsageCounts:
    """What the requests of one `UsageKey` used (a ledger adds to it in place)."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    images: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    cost_nanos: int = 0

    def add(self, other: UsageCounts) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


_COUNTS = tuple(f.name for f in fields(UsageCounts))
_KEY = tuple(f.name for f in fields(UsageKey))


@dataclass(frozen=True)
class Spent:
    """A tenant's answered requests' tokens (prompt + completion) and cost in a period."""

    tokens: int = 0
    cost_nanos: int = 0


def add_usage(session: Session, usage: Mapping[UsageKey, UsageCounts]) -> None:
    """Add `usage` to the catalog's rows (created where missing), and commit."""
    if not usage:
        return
    dialect = session.get_bind().dialect.name
    upsert: Any = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}.get(dialect)
    if upsert is None:  # the catalog is SQLite or PostgreSQL (`connect_catalog`)
        raise ValueError(f"no usage upsert for a {dialect} catalog")
    statement = upsert(UsageDay)
    statement = statement.on_conflict_do_update(
        index_elements=list(_KEY),
        set_={name: getattr(UsageDay, name) + statement.excluded[name] for name in _COUNTS},
    )
    rows = [asdict(key) | asdict(counts) for key, counts in sorted(usage.items())]
    session.info[ROUTE_NEUTRAL] = True  # usage changes no route: keep the route cache
    session.execute(statement, rows)
    session.commit()


def period_spent(session: Session, tenant_id: int, period: Period, start: date) -> Spent:
    """What the tenant's answered requests used in the period that starts on `start`, as the
    catalog holds it (every gateway's usage up to its last flush)."""
    u = UsageDay
    tokens, cost = session.execute(
        select(
            func.coalesce(func.sum(u.prompt_tokens + u.completion_tokens), 0),
            func.coalesce(func.sum(u.cost_nanos), 0),
        ).where(
            u.tenant_id == tenant_id,
            u.failed.is_(False),
            u.day >= start,
            u.day < period_end(period, start),
        )
    ).one()
    return Spent(int(tokens), int(cost))


# the report's dimensions, in the order rows carry them
GROUPS = ("tenant", "day", "deployment", "adapter")


@dataclass(frozen=True)
class GroupedUsage:
    """One group's sums, answered and failed requests apart."""

    tenant_id: int | None
    day: date | None
    deployment: str | None
    digest: str | None
    batch: bool
    requests: int
    failed_requests: int
    prompt_tokens: int
    completion_tokens: int
    images: int
    engine_s: float
    cost_nanos: int


def grouped_usage(
    session: Session,
    tenant_ids: Sequence[int] | None,
    start: date,
    end: date,
    group_by: Iterable[str],
) -> list[GroupedUsage]:
    """Sums over `usage_days` from `start` to `end` (both included) of the tenants (None: every
    tenant), grouped by `group_by` (of GROUPS) and always by kind (live or batch), ordered by
    the groups. Tokens, images, engine time and cost are the answered requests' only."""
    u = UsageDay
    wanted = set(group_by)
    columns = {
        "tenant": u.tenant_id,
        "day": u.day,
        "deployment": u.deployment,
        "adapter": u.digest,
    }
    keys = [columns[name] for name in GROUPS if name in wanted] + [u.batch]
    answered = u.failed.is_(False)

    def answered_sum(column):  # noqa: ANN001, ANN202 - a column expression
        return func.coalesce(func.sum(case((answered, column), else_=0)), 0)

    query = (
        select(
            *keys,
            answered_sum(u.requests),
            func.coalesce(func.sum(case((u.failed, u.requests), else_=0)), 0),
            answered_sum(u.prompt_tokens),
            answered_sum(u.completion_tokens),
            answered_sum(u.images),
            answered_sum(u.prefill_s + u.decode_s),
            answered_sum(u.cost_nanos),
        )
        .where(u.day >= start, u.day <= end)
        .group_by(*keys)
        .order_by(*keys)
    )
    if tenant_ids is not None:
        query = query.where(u.tenant_id.in_(tenant_ids))
    found = []
    for row in session.execute(query):
        values = iter(row)
        group = {name: next(values) if name in wanted else None for name in GROUPS}
        batch, requests, failed, prompt, completion, images, engine_s, cost = values
        found.append(
            GroupedUsage(
                group["tenant"],
                group["day"],
                group["deployment"],
                group["adapter"],
                bool(batch),
                int(requests),
                int(failed),
                int(prompt),
                int(completion),
                int(images),
                float(engine_s),
                int(cost),
            )
        )
    return found


def adapter_names(
    session: Session, digests: Iterable[str], tenant_ids: Sequence[int] | None
) -> dict[str, str]:
    """`name@version` of each digest among the tenants' adapters (None: anyone's), where one is
    still stored (the first version of that content)."""
    wanted = set(digests) - {""}
    if not wanted:
        return {}
    query = (
        select(AdapterVersion.digest, Adapter.name, AdapterVersion.version)
        .join(Adapter)
        .where(AdapterVersion.digest.in_(wanted))
        .order_by(AdapterVersion.id.desc())
    )
    if tenant_ids is not None:
        query = query.where(Adapter.tenant_id.in_(tenant_ids))
    return {digest: f"{name}@{version}" for digest, name, version in session.execute(query)}


def tenant_names(session: Session, tenant_ids: Iterable[int]) -> dict[int, str]:
    ids = set(tenant_ids)
    if not ids:
        return {}
    return dict(session.execute(select(Tenant.id, Tenant.name).where(Tenant.id.in_(ids))).all())


def list_budgets(session: Session, tenant_id: int) -> list[Budget]:
    return list(
        session.scalars(select(Budget).where(Budget.tenant_id == tenant_id).order_by(Budget.period))
    )


def set_budget(
    session: Session,
    tenant_id: int,
    period: Period,
    tokens: int | None,
    cost: float | None,
    alert_at: float | None,
) -> Budget:
    """Create or replace the tenant's budget of `period`; its alert and exhaustion are recorded
    anew, for the new amounts."""
    budget = session.get(Budget, (tenant_id, period)) or Budget(tenant_id=tenant_id, period=period)
    budget.tokens, budget.cost, budget.alert_at = tokens, cost, alert_at
    budget.alerted_for = budget.exceeded_for = None
    budget.updated_at = time.time()
    session.add(budget)
    session.commit()
    return budget


def delete_budget(session: Session, tenant_id: int, period: Period) -> bool:
    deleted = session.execute(
        delete(Budget).where(Budget.tenant_id == tenant_id, Budget.period == period)
    )
    session.commit()
    return bool(getattr(deleted, "rowcount", 0))


def mark_budget_event(
    session: Session,
    tenant_id: int,
    tenant: str,
    period: Period,
    start: date,
    event: str,
    details: dict,
) -> bool:
    """Mark the budget's alert ("alert") or exhaustion ("exceeded") for the period that starts on
    `start` and record the audit event `budget.<event>`, unless already marked (by any gateway):
    whether this call did."""
    column = Budget.alerted_for if event == "alert" else Budget.exceeded_for
    result = session.execute(
        update(Budget)
        .where(
            Budget.tenant_id == tenant_id,
            Budget.period == period,
            column.is_distinct_from(start),
        )
        .values({column.key: start})
        .execution_options(synchronize_session=False)
    )
    session.info[ROUTE_NEUTRAL] = True
    if not getattr(result, "rowcount", 0):
        session.rollback()
        return False
    record_audit(session, "lorafleet", f"budget.{event}", tenant, period=period, **details)
    return True

"""The usage report: the catalog's daily usage summed over a range of days and grouped, in JSON's
rows or CSV's lines (the same rows, the same numbers: CSV is written from the JSON rows).
Blocking catalog reads (a worker thread)."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from datetime import date

from sqlalchemy.orm import Session

from lorafleet.errors import InvalidRequest
from lorafleet.serve.usage import records
from lorafleet.serve.usage.prices import NANOS
from lorafleet.serve.usage.schemas import UsageRow, UsageTotal

__all__ = [
    "GROUP_BY",
    "MAX_DAYS",
    "parse_group_by",
    "parse_day",
    "usage_rows",
    "total_of",
    "to_csv",
]

GROUP_BY = records.GROUPS  # tenant, day, deployment, adapter: rows and columns in this order
MAX_DAYS = 3 * 366  # the longest range one report covers
_TOTALS = tuple(UsageTotal.model_fields)


def parse_group_by(values: Sequence[str], all_tenants: bool) -> list[str]:
    """`group_by` as given (repeated, or comma-separated): known names, in the report's order.
    `tenant` only in a report of every tenant."""
    names = {v.strip() for value in values for v in value.split(",") if v.strip()}
    allowed = GROUP_BY if all_tenants else GROUP_BY[1:]
    unknown = names - set(allowed)
    if unknown:
        raise InvalidRequest(
            f"group_by: unknown {', '.join(sorted(unknown))}; use any of {', '.join(allowed)}",
            param="group_by",
        )
    return [name for name in GROUP_BY if name in names]


def parse_day(value: str | None, name: str, default: date) -> date:
    if value is None or value == "":
        return default
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise InvalidRequest(
            f"{name}: {value[:40]!r} is not a day: use YYYY-MM-DD (UTC)", param=name
        ) from None


def usage_rows(
    session: Session,
    tenant_ids: Sequence[int] | None,
    start: date,
    end: date,
    group_by: Sequence[str],
) -> list[UsageRow]:
    """The report's rows (tenants None: every tenant's)."""
    if end < start:
        raise InvalidRequest(f"end ({end}) is before start ({start})", param="end")
    if (end - start).days >= MAX_DAYS:
        raise InvalidRequest(f"a report covers at most {MAX_DAYS} days", param="start")
    grouped = records.grouped_usage(session, tenant_ids, start, end, group_by)
    names = records.tenant_names(session, {g.tenant_id for g in grouped if g.tenant_id})
    adapters = records.adapter_names(session, {g.digest or "" for g in grouped}, tenant_ids)
    return [
        UsageRow(
            tenant=names.get(g.tenant_id, "") if g.tenant_id is not None else None,
            day=g.day,
            deployment=g.deployment,
            adapter=adapters.get(g.digest, "") if g.digest is not None else None,
            digest=g.digest,
            kind="batch" if g.batch else "live",
            requests=g.requests,
            failed_requests=g.failed_requests,
            prompt_tokens=g.prompt_tokens,
            completion_tokens=g.completion_tokens,
            images=g.images,
            engine_seconds=round(g.engine_s, 6),
            cost=g.cost_nanos / NANOS,
        )
        for g in grouped
    ]


def total_of(rows: Sequence[UsageRow]) -> UsageTotal:
    sums = {name: sum(getattr(row, name) for row in rows) for name in _TOTALS}
    sums["engine_seconds"] = round(sums["engine_seconds"], 6)
    sums["cost"] = round(sums["cost"], 9)
    return UsageTotal(**sums)


def columns_of(group_by: Sequence[str]) -> list[str]:
    """The CSV's columns: the groups (an adapter by name and digest), the kind, the sums."""
    groups = [
        c for name in group_by for c in (("adapter", "digest") if name == "adapter" else (name,))
    ]
    return [*groups, "kind", *_TOTALS, "currency"]


def to_csv(rows: Sequence[UsageRow], group_by: Sequence[str], currency: str) -> str:
    """The rows as CSV, the header line first."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    columns = columns_of(group_by)
    writer.writerow(columns)
    for row in rows:
        values = row.model_dump(mode="json") | {"currency": currency}
        writer.writerow(values[c] for c in columns)
    return out.getvalue()

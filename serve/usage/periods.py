"""A budget as the admin set it, and its periods in UTC: a day, or a calendar month. A period is
named by its first day."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Literal

__all__ = ["PERIODS", "Period", "Budget", "period_start", "period_end", "utc_day", "reset_at"]

Period = Literal["day", "month"]
PERIODS: tuple[Period, ...] = ("day", "month")


@dataclass(frozen=True)
class Budget:
    """A tenant's budget for one period."""

    period: Period
    tokens: int | None  # prompt + completion tokens
    cost: float | None  # in the prices' currency
    alert_at: float | None  # a fraction of the budget


def utc_day(at: float) -> date:
    """The UTC day of a Unix time."""
    return datetime.fromtimestamp(at, UTC).date()


def period_start(period: Period, at: float) -> date:
    """The first day of the period `at` falls in."""
    day = utc_day(at)
    return day if period == "day" else day.replace(day=1)


def period_end(period: Period, start: date) -> date:
    """The first day after the period that starts on `start`."""
    if period == "day":
        return start + timedelta(days=1)
    return date(start.year + start.month // 12, start.month % 12 + 1, 1)


def reset_at(period: Period, start: date) -> float:
    """When the period that starts on `start` ends (a Unix time: UTC midnight)."""
    end = period_end(period, start)
    return datetime(end.year, end.month, end.day, tzinfo=UTC).timestamp()

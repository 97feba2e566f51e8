"""A rollout's time series: per variant and period, its requests, errors, latency, answer-format
validity and users' feedback. Catalog reads (blocking): two aggregate queries (samples, feedback),
whatever the traffic.

Periods are counted from the rollout's start; feedback counts in the period of the request it judges
(its `at`), as in the drift status's feedback timeline.
"""

from __future__ import annotations

import math
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from lorafleet.adapters.catalog import Feedback, Rollout, RolloutSample, sql_floor
from lorafleet.errors import InvalidRequest
from lorafleet.serve.rollouts.schemas import RolloutSeries, SeriesBucket, VariantSeries
from lorafleet.serve.types import utc

__all__ = [
    "MIN_BUCKET_S",
    "MAX_BUCKET_S",
    "DEFAULT_BUCKETS",
    "MIN_DEFAULT_BUCKET_S",
    "MAX_PERIODS",
    "default_bucket_s",
    "rollout_series",
]

MIN_BUCKET_S, MAX_BUCKET_S = 1.0, 3600.0  # what a caller may ask for
# without a bucket_s: periods just long enough that the span has at most this many
DEFAULT_BUCKETS = 60
MIN_DEFAULT_BUCKET_S = 5.0
MAX_PERIODS = 10_000  # a bucket_s that cuts the span finer is refused: the answer stays bounded

_Key = tuple[str, int]  # (variant, period index)
# requests, errors, mean latency (s), format checked, valid
_Samples = tuple[int, int, float | None, int, int]


def _span_s(rollout: Rollout, now: float) -> float:
    return max(0.0, (rollout.finished_at or now) - rollout.created_at)


def default_bucket_s(span_s: float) -> float:
    """Whole seconds, at least MIN_DEFAULT_BUCKET_S, such that `span_s` has at most
    DEFAULT_BUCKETS periods."""
    return float(max(MIN_DEFAULT_BUCKET_S, math.ceil(span_s / DEFAULT_BUCKETS)))


def _period(at: Any, start: float, bucket_s: float) -> Any:
    return sql_floor((at - start) / float(bucket_s))


def _samples(
    session: Session, rollout_id: int, start: float, bucket_s: float
) -> dict[_Key, _Samples]:
    """(variant, period) -> (requests, errors, mean latency of the answered, format checked,
    format valid). The period is computed in a subquery: PostgreSQL does not match a GROUP BY
    expression with bound parameters to the selected one."""
    s = RolloutSample
    rows = (
        select(
            s.variant.label("variant"),
            _period(s.at, start, bucket_s).label("period"),
            s.ok,
            s.latency_s,
            s.format_valid,
        )
        .where(s.rollout_id == rollout_id, s.at >= start)
        .subquery()
    )
    query = select(
        rows.c.variant,
        rows.c.period,
        func.count(),
        func.count().filter(rows.c.ok.is_(False)),
        func.avg(rows.c.latency_s).filter(rows.c.ok.is_(True)),
        func.count(rows.c.format_valid),
        func.count().filter(rows.c.format_valid.is_(True)),
    ).group_by(rows.c.variant, rows.c.period)
    return {
        (variant, int(period)): (
            n,
            errors,
            None if latency_s is None else float(latency_s),
            checked,
            valid,
        )
        for variant, period, n, errors, latency_s, checked, valid in session.execute(query)
    }


def _feedback(
    session: Session, rollout_id: int, start: float, bucket_s: float
) -> dict[_Key, tuple[int, float]]:
    """(variant, period) -> (feedback count, mean value) of the rollout's feedback, by the judged
    request's time."""
    rows = (
        select(
            Feedback.variant.label("variant"),
            _period(Feedback.at, start, bucket_s).label("period"),
            Feedback.value,
        )
        .where(Feedback.rollout_id == rollout_id, Feedback.at >= start)
        .subquery()
    )
    query = select(rows.c.variant, rows.c.period, func.count(), func.avg(rows.c.value)).group_by(
        rows.c.variant, rows.c.period
    )
    return {
        (variant, int(period)): (n, float(mean))
        for variant, period, n, mean in session.execute(query)
    }


def _bucket(
    start: float, samples: _Samples | None, feedback: tuple[int, float] | None
) -> SeriesBucket:
    requests, errors, latency_s, checked, valid = samples or (0, 0, None, 0, 0)
    judged, mean = feedback or (0, None)
    return SeriesBucket(
        start=utc(start),
        requests=requests,
        errors=errors,
        error_rate=errors / requests if requests else None,
        latency_ms_mean=1000 * latency_s if latency_s is not None else None,
        format_checked=checked,
        format_valid=valid,
        format_validity=valid / checked if checked else None,
        feedback_count=judged,
        feedback_mean=mean,
    )


def _check_periods(span_s: float, bucket_s: float) -> None:
    if span_s / bucket_s > MAX_PERIODS:
        raise InvalidRequest(
            f"bucket_s={bucket_s:g} cuts this rollout's {span_s:.0f} s into more than "
            f"{MAX_PERIODS} periods: pass at least {math.ceil(span_s / MAX_PERIODS)}",
            code="too_many_periods",
        )


def rollout_series(
    session: Session, rollout: Rollout, bucket_s: float | None, now: float
) -> RolloutSeries:
    """Every variant's non-empty periods, oldest first; variants in the routing table's order,
    then any other label the samples or feedback carry."""
    span_s = _span_s(rollout, now)
    bucket_s = default_bucket_s(span_s) if bucket_s is None else bucket_s
    _check_periods(span_s, bucket_s)
    start = rollout.created_at
    samples = _samples(session, rollout.id, start, bucket_s)
    feedback = _feedback(session, rollout.id, start, bucket_s)
    labels = [v["label"] for v in rollout.variants]
    labels += sorted({variant for variant, _ in samples.keys() | feedback.keys()} - set(labels))
    variants = []
    for label in labels:
        periods = sorted(p for variant, p in samples.keys() | feedback.keys() if variant == label)
        variants.append(
            VariantSeries(
                variant=label,
                buckets=[
                    _bucket(start + p * bucket_s, samples.get((label, p)), feedback.get((label, p)))
                    for p in periods
                ],
            )
        )
    return RolloutSeries(
        rollout_id=rollout.id, bucket_s=bucket_s, start=utc(start), variants=variants
    )

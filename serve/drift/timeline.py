"""The feedback timeline of a deployment's live versions: per period, answered requests, feedback,
its rate and its mean value. Catalog reads (blocking): two aggregate queries per deployment,
whatever the traffic.

Periods are aligned to multiples of `bucket_s` since the epoch (whole UTC hours by default) and the
last one is the current, unfinished period. Feedback counts in the period of the request it judges,
so a period's rate is the share of its answers that were judged, and late feedback fills in older
periods.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Float, cast, func, null, select
from sqlalchemy.orm import Session

from lorafleet.adapters.catalog import Deployment, Feedback, RequestRecord, sql_floor
from lorafleet.serve.drift.monitor import live_versions
from lorafleet.serve.drift.schemas import FeedbackPeriod, FeedbackTimeline
from lorafleet.serve.types import utc

__all__ = [
    "DEFAULT_BUCKET_S",
    "MIN_BUCKET_S",
    "MAX_BUCKET_S",
    "DEFAULT_BUCKETS",
    "MAX_BUCKETS",
    "Window",
    "feedback_timeline",
]

DEFAULT_BUCKET_S = 3600
MIN_BUCKET_S, MAX_BUCKET_S = 60, 7 * 86400
DEFAULT_BUCKETS, MAX_BUCKETS = 24, 168


@dataclass(frozen=True)
class Window:
    """`buckets` periods of `bucket_s` seconds, the last one holding `now`."""

    bucket_s: int
    buckets: int
    end: float

    @classmethod
    def ending_at(
        cls, now: float, bucket_s: int = DEFAULT_BUCKET_S, buckets: int = DEFAULT_BUCKETS
    ) -> Window:
        return cls(bucket_s, buckets, float((math.floor(now / bucket_s) + 1) * bucket_s))

    @property
    def start(self) -> float:
        return self.end - self.buckets * self.bucket_s


_Counts = dict[tuple[str, int], tuple[int, float | None]]


def _per_period(
    session: Session,
    table: type[RequestRecord] | type[Feedback],
    window: Window,
    where: list,
    value: Any = None,
) -> _Counts:
    """(digest, period index) -> (rows, mean of `value`) of `table` in the window. The period is
    computed in a subquery: PostgreSQL does not match a GROUP BY expression with bound parameters
    to the selected one."""
    period = sql_floor((table.at - window.start) / float(window.bucket_s))
    rows = (
        select(
            table.digest.label("digest"),
            period.label("period"),
            (cast(null(), Float) if value is None else value).label("value"),
        )
        .where(table.at >= window.start, table.at < window.end, *where)
        .subquery()
    )
    query = select(rows.c.digest, rows.c.period, func.count(), func.avg(rows.c.value)).group_by(
        rows.c.digest, rows.c.period
    )
    return {
        (digest, int(period)): (count, None if mean is None else float(mean))
        for digest, period, count, mean in session.execute(query)
    }


def _periods(
    window: Window, digest: str, requests: _Counts, feedback: _Counts
) -> list[FeedbackPeriod]:
    periods = []
    for i in range(window.buckets):
        answered = requests.get((digest, i), (0, None))[0]
        judged, mean = feedback.get((digest, i), (0, None))
        periods.append(
            FeedbackPeriod(
                start=utc(window.start + i * window.bucket_s),
                requests=answered,
                feedback=judged,
                rate=judged / answered if answered else None,
                mean=mean,
            )
        )
    return periods


def feedback_timeline(
    session: Session, deployment: Deployment, window: Window
) -> list[FeedbackTimeline]:
    """Per live (variant, version) of the deployment: its answered requests and their feedback
    per period."""
    live = live_versions(session, deployment)
    digests = sorted({version.digest for _, version in live})
    requests = _per_period(
        session,
        RequestRecord,
        window,
        [
            RequestRecord.deployment_id == deployment.id,
            RequestRecord.digest.in_(digests),
            RequestRecord.status == 200,
        ],
    )
    feedback = _per_period(
        session,
        Feedback,
        window,
        [Feedback.deployment_id == deployment.id, Feedback.digest.in_(digests)],
        Feedback.value,
    )
    return [
        FeedbackTimeline(
            variant=variant,
            version=f"{version.adapter.name}@{version.version}",
            adapter=version.digest,
            bucket_s=window.bucket_s,
            periods=_periods(window, version.digest, requests, feedback),
        )
        for variant, version in live
    ]

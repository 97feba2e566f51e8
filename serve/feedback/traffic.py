"""A deployment's live traffic over a recent window, from the request log: requests, error rates and
latency, in total and per (variant, adapter). Catalog reads (blocking): one aggregate query for the
counts and the mean, and one bounded query for the percentiles, whatever the traffic; portable to
SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from lorafleet.adapters.catalog import Deployment, RequestRecord
from lorafleet.serve.feedback.schemas import DeploymentTraffic, LatencySummary, VariantTraffic

__all__ = [
    "MIN_WINDOW_S",
    "MAX_WINDOW_S",
    "DEFAULT_WINDOW_S",
    "MAX_LATENCY_ROWS",
    "deployment_traffic",
]

MIN_WINDOW_S, MAX_WINDOW_S, DEFAULT_WINDOW_S = 10.0, 86400.0, 300.0
MAX_LATENCY_ROWS = 50_000  # percentiles come from at most the window's newest answered requests

_Key = tuple[str, str]  # (variant, digest)


@dataclass(frozen=True)
class _Counts:
    requests: int = 0
    errors: int = 0
    client_errors: int = 0
    answered: int = 0
    latency_s_sum: float = 0.0

    def __add__(self, other: _Counts) -> _Counts:
        return _Counts(
            self.requests + other.requests,
            self.errors + other.errors,
            self.client_errors + other.client_errors,
            self.answered + other.answered,
            self.latency_s_sum + other.latency_s_sum,
        )


def _counts(session: Session, deployment_id: int, since: float) -> dict[_Key, _Counts]:
    """Per (variant, digest): every request of the window, its errors and its answered requests'
    latency sum."""
    r = RequestRecord
    answered = r.status == 200
    query = (
        select(
            r.variant,
            r.digest,
            func.count(),
            func.count().filter(r.status >= 500),
            func.count().filter(r.status.between(400, 499)),
            func.count().filter(answered),
            func.sum(r.latency_s).filter(answered),
        )
        .where(r.deployment_id == deployment_id, r.at >= since)
        .group_by(r.variant, r.digest)
    )
    return {
        (variant, digest): _Counts(n, errors, client, ok, float(total or 0.0))
        for variant, digest, n, errors, client, ok, total in session.execute(query)
    }


def _latencies(session: Session, deployment_id: int, since: float) -> dict[_Key, list[float]]:
    """The answered requests' latencies in seconds, per (variant, digest): the newest
    MAX_LATENCY_ROWS."""
    r = RequestRecord
    query = (
        select(r.variant, r.digest, r.latency_s)
        .where(r.deployment_id == deployment_id, r.at >= since, r.status == 200)
        .order_by(r.at.desc())
        .limit(MAX_LATENCY_ROWS)
    )
    latencies: dict[_Key, list[float]] = defaultdict(list)
    for variant, digest, latency_s in session.execute(query):
        latencies[(variant, digest)].append(latency_s)
    return latencies


def _latency(counts: _Counts, latencies_s: Sequence[float]) -> LatencySummary:
    """Percentiles (numpy's linear interpolation) of the sampled latencies; the mean over every
    answered one."""
    mean = 1000 * counts.latency_s_sum / counts.answered if counts.answered else None
    if not latencies_s:
        return LatencySummary(p50=None, p95=None, mean=mean)
    p50, p95 = (
        float(p) for p in np.percentile(1000 * np.asarray(latencies_s, dtype=float), [50, 95])
    )
    return LatencySummary(p50=p50, p95=p95, mean=mean)


def _rates(counts: _Counts, window_s: float) -> dict:
    return {
        "requests": counts.requests,
        "per_s": counts.requests / window_s,
        "errors": counts.errors,
        "client_errors": counts.client_errors,
        "error_rate": counts.errors / counts.requests if counts.requests else None,
    }


def deployment_traffic(
    session: Session, deployment: Deployment, window_s: float, now: float
) -> DeploymentTraffic:
    """The deployment's request-log rows with `at >= now - window_s`, summed up; variants by
    name, then adapter."""
    since = now - window_s
    counts = _counts(session, deployment.id, since)
    latencies = _latencies(session, deployment.id, since)
    total = sum(counts.values(), _Counts())
    variants = [
        VariantTraffic(
            variant=variant,
            digest=digest,
            **_rates(c, window_s),
            latency_ms=_latency(c, latencies.get((variant, digest), [])),
        )
        for (variant, digest), c in sorted(counts.items())
    ]
    return DeploymentTraffic(
        deployment=deployment.name,
        window_s=window_s,
        **_rates(total, window_s),
        latency_ms=_latency(total, [x for values in latencies.values() for x in values]),
        variants=variants,
    )

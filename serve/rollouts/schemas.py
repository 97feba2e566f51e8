"""API schemas the rollouts package builds: a rollout's time series per variant and period."""

from __future__ import annotations

from pydantic import BaseModel

from lorafleet.serve.types import UtcDateTime

__all__ = ["SeriesBucket", "VariantSeries", "RolloutSeries"]


class SeriesBucket(BaseModel):
    """One period [start, start + bucket_s) of one variant of a rollout; rates are None without a
    denominator."""

    start: UtcDateTime
    requests: int
    errors: int
    error_rate: float | None
    latency_ms_mean: float | None  # of the answered requests
    format_checked: int  # answers checked against the deployment's answer format
    format_valid: int
    format_validity: float | None
    feedback_count: int  # feedback on the period's requests (counted at the request's time)
    feedback_mean: float | None  # on [0, 1]


class VariantSeries(BaseModel):
    variant: str
    buckets: list[SeriesBucket]  # only periods with requests or feedback, oldest first


class RolloutSeries(BaseModel):
    """`GET /v1/deployments/{name}/rollout/series`: the rollout's samples and feedback per
    variant and period."""

    rollout_id: int
    bucket_s: float
    start: UtcDateTime  # the rollout's start: periods are counted from it
    variants: list[VariantSeries]  # in the routing table's order

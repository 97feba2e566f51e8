"""API schemas the drift package builds: a live version's feedback timeline."""

from __future__ import annotations

from pydantic import BaseModel

from lorafleet.serve.types import UtcDateTime

__all__ = ["FeedbackPeriod", "FeedbackTimeline"]


class FeedbackPeriod(BaseModel):
    """One period of a live version's feedback timeline: [start, start + bucket_s)."""

    start: UtcDateTime
    requests: int  # answered requests (status 200) made in the period
    feedback: int  # feedback on those requests (counted at the request's time)
    rate: float | None  # feedback per request; None without requests
    mean: float | None  # mean feedback value on [0, 1]; None without feedback


class FeedbackTimeline(BaseModel):
    """Users' feedback on one live version over the last periods, oldest first (the last one is
    still running)."""

    variant: str
    version: str  # NAME@N
    adapter: str  # its digest
    bucket_s: int
    periods: list[FeedbackPeriod]

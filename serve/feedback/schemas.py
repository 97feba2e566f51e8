"""API schemas of the feedback loop (request log, feedback, capture, traffic), built by this
package and returned by the routes in `lorafleet.serve.api`."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lorafleet.serve.types import UtcDateTime

__all__ = [
    "FeedbackCreate",
    "FeedbackPublic",
    "RequestPublic",
    "RequestPage",
    "CapturePolicy",
    "CapturePublic",
    "CapturesDeleted",
    "CapturePage",
    "CaptureStatus",
    "LatencySummary",
    "VariantTraffic",
    "DeploymentTraffic",
]


class FeedbackCreate(BaseModel):
    """`POST /v1/feedback`: a judgement of one answer, by the `id` its response carried."""

    model_config = ConfigDict(extra="forbid")
    id: Annotated[str, Field(min_length=1, max_length=64)]
    score: float  # -1 or 1 (thumbs down / up), or a number in [0, 1]
    # the answer that should have been given
    correction: Annotated[str, Field(max_length=65536)] | None = None
    comment: Annotated[str, Field(max_length=4000)] = ""

    @model_validator(mode="after")
    def _score(self) -> FeedbackCreate:
        if self.score not in (-1, 1) and not 0 <= self.score <= 1:
            raise ValueError(
                f"score must be -1 or 1 (thumbs) or a number in [0, 1], not {self.score}"
            )
        return self

    @property
    def value(self) -> float:
        """The score on [0, 1]: thumbs down 0, up 1."""
        return 0.0 if self.score == -1 else float(self.score)


class FeedbackPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: str = Field(validation_alias="request_id")
    deployment: str
    variant: str
    adapter: str = Field(validation_alias="digest")
    score: float
    value: float
    correction: str | None
    comment: str
    at: UtcDateTime  # of the request
    created_at: UtcDateTime
    updated_at: UtcDateTime


class RequestPublic(BaseModel):
    """One row of the request log."""

    model_config = ConfigDict(from_attributes=True)
    id: str = Field(validation_alias="request_id")
    at: UtcDateTime
    key_id: int | None
    deployment: str
    variant: str
    adapter: str = Field(validation_alias="digest")
    status: int
    error_code: str | None
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    stream: bool
    confidence_mean: float | None
    confidence_min: float | None
    captured: bool
    feedback: float | None = None  # the feedback's score, if any
    batch_id: str | None = None  # a batch's line, not a live request
    images: int = 0
    # the engine's own prefill and decode times, where it reported them (seconds)
    prefill_s: float | None = None
    decode_s: float | None = None


class RequestPage(BaseModel):
    data: list[RequestPublic]
    next_cursor: str | None  # pass as `cursor` for the next (older) page; None: this was the last


class CapturePolicy(BaseModel):
    """`PUT /v1/deployments/{name}/capture`: keep a sampled, bounded share of the deployment's
    requests in full."""

    model_config = ConfigDict(extra="forbid")
    sample_rate: Annotated[float, Field(gt=0, le=1)] = 0.1  # share of answered requests kept
    max_per_day: Annotated[int, Field(ge=1, le=1_000_000)] = 1000  # at most this many per UTC day
    # then deleted by the garbage collector
    retention_days: Annotated[float, Field(gt=0, le=3660)] = 30.0


class CapturePublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: str = Field(validation_alias="request_id")
    deployment: str
    variant: str
    adapter: str = Field(validation_alias="digest")
    at: UtcDateTime
    answer: str
    images: list[str]
    confidence_mean: float | None
    size_bytes: int


class CapturesDeleted(BaseModel):
    captures: int
    images: int  # image blobs no other capture referenced


class CapturePage(BaseModel):
    data: list[CapturePublic]
    next_cursor: str | None  # pass as `cursor` for the next (older) page; None: this was the last


class CaptureStatus(BaseModel):
    """`GET /v1/deployments/{name}/capture`: the policy, and what is kept under it now."""

    deployment: str
    policy: CapturePolicy | None  # None: capture is off
    captures: int
    today: int  # kept since 00:00 UTC (what `max_per_day` bounds)
    bytes: int  # the captures' messages and answers (images not included)
    images: int  # distinct images the captures reference


class LatencySummary(BaseModel):
    """Latency of answered requests (status 200), in milliseconds; None without any."""

    p50: float | None
    p95: float | None
    mean: float | None


class VariantTraffic(BaseModel):
    """One (variant, adapter) of a deployment's recent traffic."""

    variant: str
    digest: str
    requests: int
    per_s: float  # requests per second over the window
    errors: int  # status >= 500
    client_errors: int  # status 400-499
    error_rate: float | None  # errors per request; None without requests
    latency_ms: LatencySummary


class DeploymentTraffic(BaseModel):
    """`GET /v1/deployments/{name}/traffic`: the request log of the last `window_s` seconds, in
    total and per (variant, adapter)."""

    deployment: str
    window_s: float
    requests: int
    per_s: float
    errors: int  # status >= 500
    client_errors: int  # status 400-499
    error_rate: float | None  # errors per request; None without requests
    latency_ms: LatencySummary
    variants: list[VariantTraffic]

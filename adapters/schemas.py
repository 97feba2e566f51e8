"""API schemas, split by direction: `...Create`/`...Put` come in, `...Public` go out. ORM rows
never leave."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "NAME_PATTERN",
    "Name",
    "check_name",
    "TenantCreate",
    "TenantSelf",
    "TenantCreated",
    "AdapterVersionPublic",
    "AdapterVersionDetail",
    "AdapterPublic",
    "AdapterDetail",
    "DeploymentPut",
    "DeploymentPublic",
    "ModelPublic",
    "ModelList",
    "ValidationSetPublic",
    "VariantPublic",
    "DecisionPublic",
    "RolloutPublic",
    "ValidationRunPublic",
    "DriftCheckPublic",
    "DriftStatus",
    "DriftHistory",
    "DriftSampling",
    "TenantLimitsPut",
    "TenantLimitsPublic",
    "ApiKeyCreate",
    "ApiKeyPublic",
    "ApiKeyCreated",
    "ApiKeyRotate",
    "KeyRotated",
    "TenantDisable",
    "TenantPublic",
    "TenantDeletedPublic",
    "AuditEventPublic",
    "VariantFeedback",
    "VariantConfidence",
    "FeedbackCreate",
    "FeedbackPublic",
    "RequestPublic",
    "RequestPage",
    "CapturePolicy",
    "CapturePublic",
    "CapturePage",
    "CaptureStatus",
    "CapturesDeleted",
    "FeedbackPeriod",
    "FeedbackTimeline",
    "LatencySummary",
    "VariantTraffic",
    "DeploymentTraffic",
    "SeriesBucket",
    "VariantSeries",
    "RolloutSeries",
]

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def check_name(value: str) -> str:
    """Names of tenants, adapters and deployments: 1-63 of letters, digits, '.', '_', '-'."""
    if not NAME_PATTERN.match(value):
        raise ValueError(
            f"invalid name {value!r}: use 1-63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


Name = Annotated[str, AfterValidator(check_name)]


def _as_utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


# The catalog stores UTC; SQLite gives it back without a zone. Answers always say it (RFC 3339's
# date-time).
UtcDateTime = Annotated[datetime, AfterValidator(_as_utc)]


class TenantCreate(BaseModel):
    name: Name


class TenantSelf(BaseModel):
    """`GET /v1/tenant`: the tenant a key belongs to, and who acts ("tenant:NAME", or the admin
    acting for it)."""

    name: str
    acting_as: str


class TenantCreated(BaseModel):
    name: str
    api_key: str  # shown once; only its hash is stored
    key_id: int | None = None


class AdapterVersionPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    name: str
    version: int
    digest: str
    rank: int
    alpha: float
    target_modules: list[str]
    size_bytes: int
    created_at: UtcDateTime


class AdapterVersionDetail(AdapterVersionPublic):
    """A version as `GET /v1/adapters/{name}` shows it: with the trainer's manifest uploaded
    beside it."""

    manifest: dict[str, Any] | None = None  # None: uploaded without one
    # whether the adapter digest the manifest records is `digest`; None: no manifest, or it records
    # none
    manifest_matches: bool | None = None


class AdapterPublic(BaseModel):
    name: str
    versions: list[AdapterVersionPublic]


class AdapterDetail(AdapterPublic):
    versions: list[AdapterVersionDetail]  # type: ignore[assignment]  # each version with its manifest


class DeploymentPut(BaseModel):
    adapter: str  # "NAME" (latest), "NAME@N", or a digest


class ValidationSetPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    digest: str
    metric: str
    items: int
    size_bytes: int
    created_at: UtcDateTime


class DeploymentPublic(BaseModel):
    name: str
    adapter: AdapterVersionPublic
    updated_at: UtcDateTime
    previous_adapter: str | None = None  # NAME@N that `undo` goes back to
    answer_format: dict | None = None
    validation_set: ValidationSetPublic | None = None
    rollout_id: int | None = None
    capture: CapturePolicy | None = None  # None: no request of it is kept


class VariantPublic(BaseModel):
    label: str
    ref: str
    digest: str
    weight: float


class DecisionPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    at: float
    action: str
    reason: str
    message: str
    step_index: int
    actor: str
    numbers: list[dict[str, Any]]


class RolloutPublic(BaseModel):
    id: int
    deployment: str
    kind: str
    phase: str
    reason: str
    message: str
    variants: list[VariantPublic]
    steps: list[float]
    step_index: int
    params: dict[str, Any]
    gate: dict[str, Any] | None
    looks: int
    created_by: str
    created_at: float
    finished_at: float | None
    lease_owner: str | None
    decisions: list[DecisionPublic]
    # per variant, the whole rollout so far
    feedback: list[VariantFeedback] = Field(default_factory=list)
    # informational: never decides
    confidence: list[VariantConfidence] = Field(default_factory=list)


class ModelPublic(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelPublic]


class ValidationRunPublic(BaseModel):
    """One validation replay of a live version (the outputs themselves stay in the catalog)."""

    model_config = ConfigDict(from_attributes=True)
    id: int
    variant: str
    version: str = ""  # NAME@N
    kind: str
    at: float  # when the replay ended
    started_at: float | None = None  # when it began (None: recorded before this release)
    engine: str
    score: float
    exact_match_rate: float
    changed: bool
    numbers: dict[str, Any]
    message: str


class DriftCheckPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    variant: str
    kind: str
    at: float
    look: int
    p: float
    q: float
    drifted: bool
    numbers: dict[str, Any]
    message: str


class FeedbackPeriod(BaseModel):
    """One period of a live version's feedback timeline: [start, start + bucket_s)."""

    start: float
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


class DriftStatus(BaseModel):
    deployment: str
    sample_inputs: bool
    samples: int
    validation_set: str | None
    runs: list[ValidationRunPublic]  # the latest per live variant
    input: DriftCheckPublic | None
    output: list[DriftCheckPublic]  # the latest per variant
    confidence: list[DriftCheckPublic] = Field(default_factory=list)  # the latest per variant
    feedback: list[FeedbackTimeline] = Field(default_factory=list)  # per live version


class DriftHistory(BaseModel):
    deployment: str
    runs: list[ValidationRunPublic]
    checks: list[DriftCheckPublic]  # input, output and confidence looks


class DriftSampling(BaseModel):
    sample_inputs: bool


NonNegative = Annotated[int, Field(ge=0, le=2**62)]


class TenantLimitsPut(BaseModel):
    """Limits to set for one tenant (0: unlimited) or, given as null, to return to the default."""

    model_config = ConfigDict(extra="forbid")
    rpm: NonNegative | None = None
    tpm: NonNegative | None = None
    concurrency: NonNegative | None = None
    images_per_request: NonNegative | None = None
    image_bytes: NonNegative | None = None
    image_pixels: NonNegative | None = None
    adapters: NonNegative | None = None
    adapter_bytes: NonNegative | None = None


class TenantLimitsPublic(BaseModel):
    tenant: str
    limits: dict[str, int]  # in effect
    overrides: dict[str, int]  # set for this tenant; the rest are the defaults
    defaults: dict[str, int]


class ApiKeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    label: Annotated[str, Field(max_length=64)] = ""
    expires_in_s: Annotated[float, Field(gt=0, le=10 * 366 * 86400)] | None = None


class ApiKeyPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    prefix: str
    label: str
    created_at: float
    expires_at: float | None
    revoked_at: float | None
    last_used_at: float | None
    live: bool


class ApiKeyCreated(ApiKeyPublic):
    api_key: str  # shown once


class ApiKeyRotate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grace_s: Annotated[float, Field(ge=0, le=366 * 86400)] = 3600.0


class KeyRotated(BaseModel):
    old: ApiKeyPublic
    new: ApiKeyCreated


class TenantDisable(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: Annotated[str, Field(max_length=500)] = ""


class TenantPublic(BaseModel):
    name: str
    created_at: UtcDateTime
    disabled: bool
    disabled_reason: str
    keys: int  # live keys
    adapters: int  # versions stored
    adapter_bytes: int
    deployments: int
    limits: dict[str, int]


class TenantDeletedPublic(BaseModel):
    name: str
    deleted: dict[str, int]  # rows per table
    blobs_deleted: int


class AuditEventPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    at: float
    actor: str
    action: str
    tenant: str
    details: dict[str, Any]


# --- the feedback loop: request log, feedback, confidence, capture ---


class VariantFeedback(BaseModel):
    """Users' feedback on one variant's answers: mean on [0, 1] with its 95 % interval, and the
    difference from the reference variant (stable, or an A/B test's first) with its 95 %
    interval."""

    variant: str
    requests: int  # answered requests of the variant (the feedback rate's denominator)
    count: int
    rate: float | None  # feedback per request
    mean: float | None
    interval: list[float] | None = None
    difference: float | None = None  # this variant - the reference
    difference_interval: list[float] | None = None


class VariantConfidence(BaseModel):
    """The answers' mean token log-probability of one variant, and its difference from the
    reference variant."""

    variant: str
    count: int
    mean: float | None
    interval: list[float] | None = None
    difference: float | None = None
    difference_interval: list[float] | None = None


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
    at: float  # of the request
    created_at: float
    updated_at: float


class RequestPublic(BaseModel):
    """One row of the request log."""

    model_config = ConfigDict(from_attributes=True)
    id: str = Field(validation_alias="request_id")
    at: float
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
    at: float
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


# --- live traffic of a deployment, and a rollout's time series ---


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


class SeriesBucket(BaseModel):
    """One period [start, start + bucket_s) of one variant of a rollout; rates are None without a
    denominator."""

    start: float
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
    start: float  # the rollout's start: periods are counted from it
    variants: list[VariantSeries]  # in the routing table's order

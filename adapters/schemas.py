"""API schemas, split by direction: `...Create`/`...Put` come in, `...Public` go out. ORM rows never leave."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

__all__ = ["NAME_PATTERN", "Name", "check_name", "TenantCreate", "TenantCreated", "AdapterVersionPublic",
           "AdapterPublic", "DeploymentPut", "DeploymentPublic", "ModelPublic", "ModelList", "ValidationSetPublic",
           "VariantPublic", "DecisionPublic", "RolloutPublic", "ValidationRunPublic", "DriftCheckPublic", "DriftStatus",
           "DriftHistory", "DriftSampling", "TenantLimitsPut", "TenantLimitsPublic", "ApiKeyCreate", "ApiKeyPublic",
           "ApiKeyCreated", "ApiKeyRotate", "KeyRotated", "TenantDisable", "TenantPublic", "TenantDeletedPublic",
           "AuditEventPublic"]

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def check_name(value: str) -> str:
    """Names of tenants, adapters and deployments: 1-63 of letters, digits, '.', '_', '-'."""
    if not NAME_PATTERN.match(value):
        raise ValueError(f"invalid name {value!r}: use 1-63 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    return value


Name = Annotated[str, AfterValidator(check_name)]


def _as_utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


# The catalog stores UTC; SQLite gives it back without a zone. Answers always say it (RFC 3339's date-time).
UtcDateTime = Annotated[datetime, AfterValidator(_as_utc)]


class TenantCreate(BaseModel):
    name: Name


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


class AdapterPublic(BaseModel):
    name: str
    versions: list[AdapterVersionPublic]


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
    at: float
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


class DriftStatus(BaseModel):
    deployment: str
    sample_inputs: bool
    samples: int
    validation_set: str | None
    runs: list[ValidationRunPublic]  # the latest per live variant
    input: DriftCheckPublic | None
    output: list[DriftCheckPublic]  # the latest per variant


class DriftHistory(BaseModel):
    deployment: str
    runs: list[ValidationRunPublic]
    checks: list[DriftCheckPublic]


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

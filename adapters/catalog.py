"""The catalog: tenants, adapters, versions and deployments, as SQLAlchemy rows (SQLite by
default)."""

from __future__ import annotations

import sqlite3
import time
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Date,
    Float,
    ForeignKey,
    Index,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker
from sqlalchemy.sql.functions import FunctionElement

from lorafleet.adapters.migrate import bring_to_head

__all__ = [
    "Base",
    "Tenant",
    "Adapter",
    "AdapterVersion",
    "ValidationSet",
    "Deployment",
    "Rollout",
    "Decision",
    "RolloutSample",
    "ValidationRun",
    "InputSample",
    "DriftCheck",
    "ApiKey",
    "TenantPolicy",
    "AuditEvent",
    "Lease",
    "RequestRecord",
    "Feedback",
    "Capture",
    "StoredFile",
    "Batch",
    "BatchLine",
    "UsageDay",
    "Budget",
    "open_catalog",
    "connect_catalog",
    "is_transient",
    "sql_floor",
]


def _now() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class Tenant(Base):
    __tablename__ = "tenants"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    # the first key's sha256 (keys: `ApiKey`)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    # False: no live request features are kept
    sample_inputs: Mapped[bool] = mapped_column(default=True)
    created_at: Mapped[datetime] = mapped_column(default=_now)


class Adapter(Base):
    __tablename__ = "adapters"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    next_version: Mapped[int] = mapped_column(default=1)  # version numbers are never reused
    created_at: Mapped[datetime] = mapped_column(default=_now)
    versions: Mapped[list[AdapterVersion]] = relationship(
        back_populates="adapter", order_by="AdapterVersion.version"
    )


class AdapterVersion(Base):
    __tablename__ = "adapter_versions"
    __table_args__ = (UniqueConstraint("adapter_id", "version"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id"), index=True)
    version: Mapped[int]
    digest: Mapped[str] = mapped_column(String(64), index=True)
    rank: Mapped[int]
    alpha: Mapped[float]
    target_modules: Mapped[list[str]] = mapped_column(JSON)
    size_bytes: Mapped[int]
    created_at: Mapped[datetime] = mapped_column(default=_now)
    # the trainer's manifest.json uploaded beside the adapter (informational: not part of the
    # digest). SQL NULL when there is none, as on rows from before revision 0004; deferred: only the
    # version's detail reads it
    manifest: Mapped[dict | None] = mapped_column(JSON(none_as_null=True), deferred=True)
    # the parts of the base it changes ("language", "connector", "vision"); SQL NULL on rows from
    # before revision 0005, which were the language model's only: read `touches`
    parts: Mapped[list[str] | None] = mapped_column(JSON(none_as_null=True))
    adapter: Mapped[Adapter] = relationship(back_populates="versions")

    @property
    def touches(self) -> list[str]:
        """The parts of the base this version changes."""
        return self.parts or ["language"]


class ValidationSet(Base):
    """A tenant's fixed validation set: chat JSONL with images inlined, stored content-addressed."""

    __tablename__ = "validation_sets"
    __table_args__ = (UniqueConstraint("tenant_id", "digest", "metric"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), index=True)
    digest: Mapped[str] = mapped_column(String(64))  # sha256 of the canonical JSONL
    metric: Mapped[str] = mapped_column(String(32))
    items: Mapped[int]
    size_bytes: Mapped[int]
    created_at: Mapped[datetime] = mapped_column(default=_now)


class Deployment(Base):
    __tablename__ = "deployments"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    stable_id: Mapped[int] = mapped_column(ForeignKey("adapter_versions.id"))
    # for `undo`
    previous_stable_id: Mapped[int | None] = mapped_column(ForeignKey("adapter_versions.id"))
    # the active rollout or A/B test; set and cleared by conditional updates
    rollout_id: Mapped[int | None]
    # {"json_schema": {...}} or {"regex": "..."}
    answer_format: Mapped[dict | None] = mapped_column(JSON)
    validation_set_id: Mapped[int | None] = mapped_column(ForeignKey("validation_sets.id"))
    # capture of live requests for retraining, opted in by the tenant: {"sample_rate",
    # "max_per_day", "retention_days"} (`lorafleet.serve.capture.CapturePolicy`); None: nothing is
    # kept
    capture: Mapped[dict | None] = mapped_column(JSON)
    # the InferenceObjective its requests name to an InferencePool, set by the admin (revision
    # 0006); None: the gateway's default (`pool_objective`)
    objective: Mapped[str | None] = mapped_column(String(253))
    # next scheduled replay (claimed by UPDATE)
    drift_replay_at: Mapped[float] = mapped_column(default=0.0)
    # next input/output drift look (claimed alike)
    drift_look_at: Mapped[float] = mapped_column(default=0.0)
    updated_at: Mapped[datetime] = mapped_column(default=_now, onupdate=_now)
    stable: Mapped[AdapterVersion] = relationship(foreign_keys=[stable_id])
    previous_stable: Mapped[AdapterVersion | None] = relationship(foreign_keys=[previous_stable_id])
    validation_set: Mapped[ValidationSet | None] = relationship()


class Rollout(Base):
    """A canary rollout or an A/B test of one deployment. `variants` is the routing table:
    [{"label", "version_id", "digest", "ref", "weight"}] with weights in percent, in bucket
    order."""

    __tablename__ = "rollouts"
    id: Mapped[int] = mapped_column(primary_key=True)
    deployment_id: Mapped[int] = mapped_column(ForeignKey("deployments.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # "canary" | "ab"
    phase: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(String(64), default="")
    message: Mapped[str] = mapped_column(Text, default="")
    salt: Mapped[str] = mapped_column(String(32))  # per-rollout: a new rollout reshuffles units
    variants: Mapped[list[dict]] = mapped_column(JSON)
    steps: Mapped[list[float]] = mapped_column(JSON, default=list)  # canary weights in percent
    step_index: Mapped[int] = mapped_column(default=-1)  # -1 while gating
    params: Mapped[dict] = mapped_column(JSON, default=dict)
    gate: Mapped[dict | None] = mapped_column(JSON)  # the validation-set evidence
    # analysis looks so far (alpha spending counts them)
    looks: Mapped[int] = mapped_column(default=0)
    step_started_at: Mapped[float] = mapped_column(default=0.0)  # epoch seconds
    last_look_at: Mapped[float] = mapped_column(default=0.0)
    # canary requests of this step at that look
    last_look_requests: Mapped[int] = mapped_column(default=0)
    created_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float]
    finished_at: Mapped[float | None]
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_expires: Mapped[float] = mapped_column(default=0.0)
    revision: Mapped[int] = mapped_column(default=1)  # optimistic lock: a stale write raises
    deployment: Mapped[Deployment] = relationship()
    decisions: Mapped[list[Decision]] = relationship(
        back_populates="rollout", order_by="Decision.id"
    )
    __mapper_args__ = {"version_id_col": revision}


class Decision(Base):
    """One recorded transition of a rollout, with the reason and the numbers that decided it."""

    __tablename__ = "decisions"
    id: Mapped[int] = mapped_column(primary_key=True)
    deployment_id: Mapped[int] = mapped_column(ForeignKey("deployments.id"), index=True)
    # None: e.g. `undo`
    rollout_id: Mapped[int | None] = mapped_column(ForeignKey("rollouts.id"), index=True)
    at: Mapped[float]
    # start, gate, advance, extend, rollback, promote, ...
    action: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(String(64))  # CamelCase constant
    message: Mapped[str] = mapped_column(Text)
    step_index: Mapped[int]
    actor: Mapped[str] = mapped_column(String(80))  # "controller:<gateway id>" or "tenant:<name>"
    # one entry per statistical test
    numbers: Mapped[list[dict]] = mapped_column(JSON, default=list)
    rollout: Mapped[Rollout | None] = relationship(back_populates="decisions")


class RolloutSample(Base):
    """One request served during a rollout: what the analysis compares, per variant and step."""

    __tablename__ = "rollout_samples"
    __table_args__ = (Index("ix_samples_rollout_step", "rollout_id", "step_index"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    rollout_id: Mapped[int]
    step_index: Mapped[int]
    variant: Mapped[str] = mapped_column(String(80))
    # hash of the assignment unit, for the sample-ratio check
    unit: Mapped[str] = mapped_column(String(16))
    ok: Mapped[bool]
    latency_s: Mapped[float]
    output_tokens: Mapped[int]
    format_valid: Mapped[bool | None]
    at: Mapped[float]
    confidence: Mapped[float | None]  # the answer's mean token log-probability


class ValidationRun(Base):
    """One replay of a deployment's validation set by one adapter version, greedy, through the
    engine. The first run of a (version, validation set) is its baseline; later runs are compared
    with it."""

    __tablename__ = "validation_runs"
    __table_args__ = (Index("ix_runs_deployment_version", "deployment_id", "version_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    deployment_id: Mapped[int] = mapped_column(ForeignKey("deployments.id"))
    version_id: Mapped[int] = mapped_column(ForeignKey("adapter_versions.id"))
    validation_set_id: Mapped[int] = mapped_column(ForeignKey("validation_sets.id"))
    variant: Mapped[str] = mapped_column(String(80))
    kind: Mapped[str] = mapped_column(String(16))  # "baseline" | "check"
    at: Mapped[float]  # when the replay ended
    started_at: Mapped[float | None]  # when it began (None: recorded before revision 0004)
    # base, dtype, quantization, vLLM version: what served it
    engine: Mapped[str] = mapped_column(Text)
    score: Mapped[float]
    scores: Mapped[list[float]] = mapped_column(JSON)
    outputs: Mapped[list[str]] = mapped_column(JSON)
    output_tokens: Mapped[list[int]] = mapped_column(JSON)
    # per item: mean token log-probability
    confidences: Mapped[list[float | None] | None] = mapped_column(JSON)
    # share of items answered exactly as in the baseline (1.0 for a baseline)
    exact_match_rate: Mapped[float]
    changed: Mapped[bool] = mapped_column(default=False)
    # the paired test against the baseline
    numbers: Mapped[dict] = mapped_column(JSON, default=dict)
    message: Mapped[str] = mapped_column(Text, default="")


class InputSample(Base):
    """Features of one sampled live request and of its answer (never the request itself)."""

    __tablename__ = "input_samples"
    __table_args__ = (Index("ix_input_samples_deployment", "deployment_id", "id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    deployment_id: Mapped[int] = mapped_column(ForeignKey("deployments.id"))
    variant: Mapped[str] = mapped_column(String(80))
    at: Mapped[float]
    features: Mapped[dict] = mapped_column(JSON)
    ok: Mapped[bool]
    output_tokens: Mapped[int] = mapped_column(default=0)
    empty: Mapped[bool] = mapped_column(default=False)  # empty or a refusal
    format_valid: Mapped[bool | None]
    confidence: Mapped[float | None]  # the answer's mean token log-probability


class DriftCheck(Base):
    """One input- or output-drift look of a deployment (or variant), with its numbers."""

    __tablename__ = "drift_checks"
    __table_args__ = (
        Index("ix_drift_checks_deployment", "deployment_id", "kind"),
        Index("ix_drift_checks_at", "at"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    deployment_id: Mapped[int] = mapped_column(ForeignKey("deployments.id"))
    version_id: Mapped[int] = mapped_column(ForeignKey("adapter_versions.id"))
    variant: Mapped[str] = mapped_column(String(80))
    kind: Mapped[str] = mapped_column(String(16))  # "input" | "output" | "confidence"
    at: Mapped[float]
    look: Mapped[int]
    p: Mapped[float]
    q: Mapped[float]  # after spending and Benjamini-Hochberg across deployments
    drifted: Mapped[bool]
    numbers: Mapped[dict] = mapped_column(JSON, default=dict)
    message: Mapped[str] = mapped_column(Text, default="")


class ApiKey(Base):
    """One of a tenant's API keys (only its sha256 is kept). A key authenticates while it is
    neither revoked nor expired; rotation gives the old key an expiry (the grace period) and
    creates a new one."""

    __tablename__ = "api_keys"
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    # the first characters, to tell keys apart in listings
    prefix: Mapped[str] = mapped_column(String(16))
    label: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[float]
    expires_at: Mapped[float | None]
    revoked_at: Mapped[float | None]
    # written by the gateway about once a minute, not per request
    last_used_at: Mapped[float | None]


class TenantPolicy(Base):
    """What the admin set for a tenant beyond its name: limits that differ from the defaults, and
    whether it is disabled. A tenant without a row has the default limits and is enabled."""

    __tablename__ = "tenant_policies"
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    limits: Mapped[dict] = mapped_column(JSON, default=dict)  # only the limits set for this tenant
    # only the prices set for this tenant (revision 0008; SQL NULL: none)
    prices: Mapped[dict | None] = mapped_column(JSON(none_as_null=True), default=dict)
    disabled_at: Mapped[float | None]
    disabled_reason: Mapped[str] = mapped_column(Text, default="")
    updated_at: Mapped[float]


class AuditEvent(Base):
    """One admin operation: who (the admin key, from which address), what, on which tenant, when."""

    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_tenant", "tenant", "id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[float] = mapped_column(index=True)
    actor: Mapped[str] = mapped_column(String(80))
    action: Mapped[str] = mapped_column(String(32))
    # a name: the tenant may be deleted since
    tenant: Mapped[str] = mapped_column(String(64), default="")
    details: Mapped[dict] = mapped_column(JSON, default=dict)


class Lease(Base):
    """A job that runs once per fleet at a time (e.g. `gc`): whoever holds the unexpired lease
    runs it."""

    __tablename__ = "leases"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64))
    expires_at: Mapped[float]
    last_run_at: Mapped[float] = mapped_column(default=0.0)  # when the job last finished a run


class RequestRecord(Base):
    """One chat request of a tenant: the request log (what served it and how it went, never its
    content), and what feedback and captures refer to by `request_id`. Deployments are kept by
    name as well: the log outlives them."""

    __tablename__ = "requests"
    __table_args__ = (
        Index("ix_requests_tenant", "tenant_id", "id"),
        Index("ix_requests_at", "at"),
        Index("ix_requests_deployment", "deployment_id", "at"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    # the response's `id` and `x-request-id`
    request_id: Mapped[str] = mapped_column(String(64), unique=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"))
    key_id: Mapped[int | None]
    at: Mapped[float]
    deployment_id: Mapped[int | None]
    deployment: Mapped[str] = mapped_column(String(64), default="")
    rollout_id: Mapped[int | None]
    variant: Mapped[str] = mapped_column(String(80), default="")
    digest: Mapped[str] = mapped_column(String(64), default="")
    status: Mapped[int]
    error_code: Mapped[str | None] = mapped_column(String(64))
    prompt_tokens: Mapped[int] = mapped_column(default=0)
    completion_tokens: Mapped[int] = mapped_column(default=0)
    latency_s: Mapped[float]
    stream: Mapped[bool] = mapped_column(default=False)
    confidence_mean: Mapped[float | None]  # mean token log-probability of the answer (choice 0)
    confidence_min: Mapped[float | None]  # its least likely token's log-probability
    captured: Mapped[bool] = mapped_column(default=False)
    batch_id: Mapped[str | None] = mapped_column(String(40))  # a batch's line (revision 0007)
    # revision 0008: the request's images, and the engine's own prefill and decode times where it
    # reported them
    images: Mapped[int] = mapped_column(default=0, server_default="0")
    prefill_s: Mapped[float | None]
    decode_s: Mapped[float | None]


class Feedback(Base):
    """A user's judgement of one answer, one per request (a second post replaces the first).
    `value` is the score on [0, 1] (thumbs: -1 -> 0, +1 -> 1); the request's deployment, variant
    and adapter are copied here."""

    __tablename__ = "feedback"
    __table_args__ = (
        UniqueConstraint("tenant_id", "request_id"),
        Index("ix_feedback_rollout", "rollout_id"),
        Index("ix_feedback_deployment", "deployment_id", "at"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"))
    request_id: Mapped[str] = mapped_column(String(64))
    key_id: Mapped[int | None]
    deployment_id: Mapped[int | None]
    deployment: Mapped[str] = mapped_column(String(64), default="")
    rollout_id: Mapped[int | None]
    variant: Mapped[str] = mapped_column(String(80), default="")
    digest: Mapped[str] = mapped_column(String(64), default="")
    score: Mapped[float]  # as given: -1 or 1 (thumbs), or a number in [0, 1]
    value: Mapped[float]
    correction: Mapped[str | None] = mapped_column(Text)  # the answer that should have been given
    comment: Mapped[str] = mapped_column(Text, default="")
    at: Mapped[float]  # of the request it judges
    created_at: Mapped[float]
    updated_at: Mapped[float]


class Capture(Base):
    """One live request kept in full for retraining (deployments that opted in): its messages
    with every image replaced by a reference to the capture store (`lorafleet-capture:<sha256>`),
    and the answer served."""

    __tablename__ = "captures"
    __table_args__ = (
        Index("ix_captures_deployment", "deployment_id", "id"),
        Index("ix_captures_at", "at"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    request_id: Mapped[str] = mapped_column(String(64), unique=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), index=True)
    deployment_id: Mapped[int]
    deployment: Mapped[str] = mapped_column(String(64))
    variant: Mapped[str] = mapped_column(String(80))
    digest: Mapped[str] = mapped_column(String(64))
    at: Mapped[float]
    messages: Mapped[list[dict]] = mapped_column(JSON)
    answer: Mapped[str] = mapped_column(Text)
    # the capture store's digests it references
    images: Mapped[list[str]] = mapped_column(JSON, default=list)
    confidence_mean: Mapped[float | None]
    size_bytes: Mapped[int] = mapped_column(default=0)  # messages and answer, images not included


class StoredFile(Base):
    """A tenant's file (OpenAI's Files API): the request lines of a batch it uploaded, or the
    output or error lines a batch wrote. Its bytes are in the file store under `digest`."""

    __tablename__ = "files"
    __table_args__ = (Index("ix_files_tenant", "tenant_id", "created_at"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # "file-<hex>"
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"))
    purpose: Mapped[str] = mapped_column(String(16))  # "batch" | "batch_output"
    filename: Mapped[str] = mapped_column(String(255))
    bytes: Mapped[int]
    lines: Mapped[int]
    digest: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float]


class Batch(Base):
    """One batch of a tenant (OpenAI's Batch API): its input file's lines run through the chat
    path at a lower priority than live requests, by the gateway that holds its lease; each
    finished line is a `BatchLine` until the batch writes its output and error files."""

    __tablename__ = "batches"
    __table_args__ = (
        Index("ix_batches_tenant", "tenant_id", "created_at"),
        Index("ix_batches_status", "status"),
    )
    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # "batch_<hex>"
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"))
    input_file_id: Mapped[str] = mapped_column(String(40))
    endpoint: Mapped[str] = mapped_column(String(64))
    completion_window: Mapped[str] = mapped_column(String(8))
    # validating | in_progress | finalizing | completed | failed | expired | cancelling | cancelled
    status: Mapped[str] = mapped_column(String(16))
    batch_metadata: Mapped[dict | None] = mapped_column("metadata", JSON)
    errors: Mapped[list | None] = mapped_column(JSON)  # why it failed validation
    total: Mapped[int] = mapped_column(default=0)
    completed: Mapped[int] = mapped_column(default=0)
    failed: Mapped[int] = mapped_column(default=0)
    output_file_id: Mapped[str | None] = mapped_column(String(40))
    error_file_id: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[float]
    expires_at: Mapped[float]
    in_progress_at: Mapped[float | None]
    finalizing_at: Mapped[float | None]
    completed_at: Mapped[float | None]
    failed_at: Mapped[float | None]
    expired_at: Mapped[float | None]
    cancelling_at: Mapped[float | None]
    cancelled_at: Mapped[float | None]
    # the gateway running it, until `lease_until` (another takes it over after that)
    owner: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[float] = mapped_column(default=0.0)


class BatchLine(Base):
    """One finished line of a running batch: what the chat path answered (a response body, or an
    error's), kept until the batch's output and error files are written."""

    __tablename__ = "batch_lines"
    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id"), primary_key=True)
    line: Mapped[int] = mapped_column(primary_key=True)  # 0-based, in the input file
    custom_id: Mapped[str] = mapped_column(String(512))
    request_id: Mapped[str] = mapped_column(String(64))
    status: Mapped[int]  # the HTTP status the chat path answered
    body: Mapped[dict] = mapped_column(JSON)
    at: Mapped[float]


class UsageDay(Base):
    """What a tenant's requests used in one UTC day, per deployment, adapter version, kind (live
    or a batch's line) and outcome: the usage report's rows. Every gateway adds to them (one
    upsert per row and flush); the request log is pruned, these are kept."""

    __tablename__ = "usage_days"
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    # by name, as in the request log ("": the request reached no deployment)
    deployment: Mapped[str] = mapped_column(String(64), primary_key=True)
    digest: Mapped[str] = mapped_column(String(64), primary_key=True)
    batch: Mapped[bool] = mapped_column(primary_key=True)
    failed: Mapped[bool] = mapped_column(primary_key=True)  # any answer but a 200
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    images: Mapped[int] = mapped_column(BigInteger, default=0)
    prefill_s: Mapped[float] = mapped_column(default=0.0)
    decode_s: Mapped[float] = mapped_column(default=0.0)
    # billionths of the currency unit, at the prices in effect when each request ended
    cost_nanos: Mapped[int] = mapped_column(BigInteger, default=0)


class Budget(Base):
    """A tenant's budget for one period ("day" or "month", UTC), set by the admin: tokens, money
    or both (the first reached stops the tenant), an alert threshold, and the periods whose alert
    and exhaustion were recorded (each once per fleet)."""

    __tablename__ = "budgets"
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    period: Mapped[str] = mapped_column(String(8), primary_key=True)
    tokens: Mapped[int | None] = mapped_column(BigInteger)  # prompt + completion
    cost: Mapped[float | None]  # in the currency of the prices
    alert_at: Mapped[float | None]  # a fraction of the budget
    alerted_for: Mapped[date | None] = mapped_column(Date)  # the first day of that period
    exceeded_for: Mapped[date | None] = mapped_column(Date)
    updated_at: Mapped[float]


POOL_SIZE = 40


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.execute("PRAGMA foreign_keys=ON")
    _use_wal(cursor)
    cursor.close()


def _use_wal(cursor) -> None:
    """Write-ahead logging: readers do not block the writer. Switching a new file to it needs a
    moment alone with it, which SQLite does not wait for (no busy handler): gateways opening one
    new catalog at once take turns."""
    for attempt in range(100):
        try:
            if cursor.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
                return
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == 99:
                raise
            time.sleep(0.05)


def open_catalog(url: str, upgrade: bool = False) -> tuple[Engine, sessionmaker]:
    """Connect to the catalog and bring it to this release's schema revision: a new one is
    created; one that is behind is upgraded only if `upgrade` (else `CatalogBehind`), a SQLite
    file after a backup copy next to it."""
    engine = connect_catalog(url)
    try:
        bring_to_head(engine, upgrade)
    except BaseException:
        engine.dispose()
        raise
    return engine, sessionmaker(engine, expire_on_commit=False)


def connect_catalog(url: str) -> Engine:
    """An engine on the catalog database as it is, at whatever revision (what `lorafleet db`
    looks at)."""
    if url.startswith("sqlite:///"):
        from pathlib import Path

        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    # As many pooled connections as threads that run the routes' catalog work (anyio's default pool:
    # 40), so that none waits for, or opens, a connection beyond the pool under load.
    engine = _create_engine(url)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


# PostgreSQL's serialization failure and deadlock (the transaction may simply be run again);
# SQLite's writer lock held past busy_timeout
_TRANSIENT_SQLSTATES = {"40001", "40P01"}


def is_transient(exc: BaseException) -> bool:
    """Whether a database error goes away when the same unit of work runs again."""
    if not isinstance(exc, (OperationalError, DBAPIError)):
        return False
    orig = getattr(exc, "orig", None)
    return getattr(orig, "sqlstate", None) in _TRANSIENT_SQLSTATES or "database is locked" in str(
        orig
    )


def _create_engine(url: str) -> Engine:
    parsed = make_url(url)
    # a bare URL, as PostgreSQL services hand them out
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:"):
        return create_engine(parsed)  # one connection, no pool to size
    options: dict = {"pool_size": POOL_SIZE, "max_overflow": 10}
    if parsed.get_backend_name() == "postgresql":
        # Timestamps are written and read in UTC whatever the server's zone; a connection the server
        # dropped (restart, failover, idle timeout) is replaced before use instead of failing a
        # request.
        options |= {"pool_pre_ping": True, "connect_args": {"options": "-c timezone=UTC"}}
    return create_engine(parsed, **options)


class sql_floor(FunctionElement):
    """floor() of a non-negative number on every catalog database (e.g. a time's period index in
    GROUP BY): SQLite has floor() only when built with its math functions, and its CAST
    truncates, which is the same for non-negative numbers."""

    type = Float()
    inherit_cache = True


@compiles(sql_floor)
def _floor_sql(element: sql_floor, compiler: Any, **kw: Any) -> str:
    return f"floor({compiler.process(element.clauses, **kw)})"


@compiles(sql_floor, "sqlite")
def _floor_sqlite(element: sql_floor, compiler: Any, **kw: Any) -> str:
    return f"CAST({compiler.process(element.clauses, **kw)} AS INTEGER)"

"""Tenant API for drift monitoring: replay on demand, status (with the feedback timeline), history,
and the input-sampling opt-out.

Scoped like every tenant route: another tenant's deployment is 404.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from lorafleet.adapters.catalog import (
    AdapterVersion,
    Deployment,
    DriftCheck,
    InputSample,
    ValidationRun,
)
from lorafleet.adapters.registry import get_deployment, list_deployments
from lorafleet.serve.api.dependencies import (
    CurrentTenant,
    GatewayDep,
    SessionDep,
    release_connection,
)
from lorafleet.serve.drift.monitor import live_versions
from lorafleet.serve.drift.schemas import FeedbackTimeline
from lorafleet.serve.drift.timeline import (
    DEFAULT_BUCKET_S,
    DEFAULT_BUCKETS,
    MAX_BUCKET_S,
    MAX_BUCKETS,
    MIN_BUCKET_S,
    Window,
    feedback_timeline,
)
from lorafleet.serve.types import UtcDateTime
from lorafleet.serve.validation import require_validation_set

__all__ = [
    "router",
    "ValidationRunPublic",
    "DriftCheckPublic",
    "DriftStatus",
    "DriftHistory",
    "DriftSampling",
]


class ValidationRunPublic(BaseModel):
    """One validation replay of a live version (the outputs themselves stay in the catalog)."""

    model_config = ConfigDict(from_attributes=True)
    id: int
    variant: str
    version: str = ""  # NAME@N
    kind: str
    at: UtcDateTime  # when the replay ended
    started_at: UtcDateTime | None = None  # when it began (None: recorded before this release)
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
    at: UtcDateTime
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
    confidence: list[DriftCheckPublic] = Field(default_factory=list)  # the latest per variant
    feedback: list[FeedbackTimeline] = Field(default_factory=list)  # per live version


class DriftHistory(BaseModel):
    deployment: str
    runs: list[ValidationRunPublic]
    checks: list[DriftCheckPublic]  # input, output and confidence looks


class DriftSampling(BaseModel):
    sample_inputs: bool


router = APIRouter(prefix="/v1")

BucketS = Annotated[
    int, Query(ge=MIN_BUCKET_S, le=MAX_BUCKET_S, description="seconds per feedback period")
]
Buckets = Annotated[
    int, Query(ge=1, le=MAX_BUCKETS, description="feedback periods, the current one last")
]


def _run_public(session: Session, run: ValidationRun) -> ValidationRunPublic:
    version = session.get_one(AdapterVersion, run.version_id)
    return ValidationRunPublic.model_validate(run).model_copy(
        update={"version": f"{version.adapter.name}@{version.version}"}
    )


def _latest_per_variant(session: Session, latest: Select, kind: str) -> list[DriftCheckPublic]:
    checks: dict[str, DriftCheck] = {}
    for check in session.scalars(latest.where(DriftCheck.kind == kind).limit(20)):
        checks.setdefault(check.variant, check)
    return [DriftCheckPublic.model_validate(c) for c in checks.values()]


def _status(
    session: Session, deployment: Deployment, sample_inputs: bool, window: Window | None = None
) -> DriftStatus:
    window = window or Window.ending_at(time.time())
    runs = []
    for variant, version in live_versions(session, deployment):
        run = session.scalar(
            select(ValidationRun)
            .where(
                ValidationRun.deployment_id == deployment.id, ValidationRun.version_id == version.id
            )
            .order_by(ValidationRun.id.desc())
            .limit(1)
        )
        if run is not None:
            runs.append(_run_public(session, run).model_copy(update={"variant": variant}))
    latest = (
        select(DriftCheck)
        .where(DriftCheck.deployment_id == deployment.id)
        .order_by(DriftCheck.id.desc())
    )
    input_check = session.scalar(latest.where(DriftCheck.kind == "input").limit(1))
    samples = (
        session.scalar(select(func.count()).where(InputSample.deployment_id == deployment.id)) or 0
    )
    validation = deployment.validation_set
    return DriftStatus(
        deployment=deployment.name,
        sample_inputs=sample_inputs,
        samples=samples,
        validation_set=validation.digest if validation else None,
        runs=runs,
        input=DriftCheckPublic.model_validate(input_check) if input_check else None,
        output=_latest_per_variant(session, latest, "output"),
        confidence=_latest_per_variant(session, latest, "confidence"),
        feedback=feedback_timeline(session, deployment, window),
    )


@router.post("/deployments/{deployment}/drift/check")
async def drift_check(
    deployment: str, gateway: GatewayDep, session: SessionDep, tenant: CurrentTenant
) -> list[ValidationRunPublic]:
    """Every live version answers the validation set now: a baseline the first time, else a
    comparison."""
    target = await run_in_threadpool(get_deployment, session, tenant, deployment)
    require_validation_set(target)
    gateway.fleet.require_up()
    release_connection(session)  # the replay takes a while: no connection held meanwhile
    runs = await gateway.drift.replay_deployment(target.id)
    return [await run_in_threadpool(_run_public, session, run) for run in runs]


@router.post("/deployments/{deployment}/drift/look")
async def drift_look(
    deployment: str, gateway: GatewayDep, session: SessionDep, tenant: CurrentTenant
) -> DriftStatus:
    """Save the sampled requests and look for input and output drift now (over whatever has been
    sampled)."""
    target = await run_in_threadpool(get_deployment, session, tenant, deployment)
    await run_in_threadpool(gateway.drift.save_samples)
    await run_in_threadpool(gateway.drift.look, target.id)
    session.expire_all()
    return await run_in_threadpool(_status, session, target, tenant.sample_inputs)


@router.get("/deployments/{deployment}/drift")
def drift_status(
    deployment: str,
    session: SessionDep,
    tenant: CurrentTenant,
    bucket_s: BucketS = DEFAULT_BUCKET_S,
    buckets: Buckets = DEFAULT_BUCKETS,
) -> DriftStatus:
    """The latest replay and looks of every live version, and its feedback per period of
    `bucket_s` seconds."""
    window = Window.ending_at(time.time(), bucket_s, buckets)
    return _status(
        session, get_deployment(session, tenant, deployment), tenant.sample_inputs, window
    )


@router.get("/drift")
def drift_overview(
    session: SessionDep,
    tenant: CurrentTenant,
    bucket_s: BucketS = DEFAULT_BUCKET_S,
    buckets: Buckets = DEFAULT_BUCKETS,
) -> list[DriftStatus]:
    window = Window.ending_at(time.time(), bucket_s, buckets)
    return [
        _status(session, d, tenant.sample_inputs, window) for d in list_deployments(session, tenant)
    ]


@router.get("/deployments/{deployment}/drift/history")
def drift_history(deployment: str, session: SessionDep, tenant: CurrentTenant) -> DriftHistory:
    """Every replay and every drift look of the deployment, oldest first (what `drift report`
    plots)."""
    target = get_deployment(session, tenant, deployment)
    runs = session.scalars(
        select(ValidationRun)
        .where(ValidationRun.deployment_id == target.id)
        .order_by(ValidationRun.id)
    )
    checks = session.scalars(
        select(DriftCheck).where(DriftCheck.deployment_id == target.id).order_by(DriftCheck.id)
    )
    return DriftHistory(
        deployment=target.name,
        runs=[_run_public(session, r) for r in runs],
        checks=[DriftCheckPublic.model_validate(c) for c in checks],
    )


@router.put("/drift/sampling")
async def drift_sampling(
    body: DriftSampling, gateway: GatewayDep, session: SessionDep, tenant: CurrentTenant
) -> dict:
    """Opt this tenant in or out of live-request sampling; opting out deletes what was kept."""
    tenant.sample_inputs = body.sample_inputs
    await run_in_threadpool(session.commit)
    deleted = 0 if body.sample_inputs else await run_in_threadpool(gateway.drift.forget, tenant.id)
    return {"sample_inputs": body.sample_inputs, "deleted_samples": deleted}

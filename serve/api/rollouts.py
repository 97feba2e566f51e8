"""Tenant API for traffic control: validation sets, answer formats, canary rollouts and A/B tests.

Everything is scoped to the caller's deployments: another tenant's deployment is 404 for every
operation.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Body, File, Form, Query, UploadFile
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session, object_session
from sqlalchemy.orm.exc import StaleDataError
from starlette.concurrency import run_in_threadpool

from lorafleet.adapters.catalog import Deployment, Rollout, Tenant
from lorafleet.adapters.registry import get_deployment, resolve_version
from lorafleet.errors import NotFound
from lorafleet.serve.answer_format import check_format_spec
from lorafleet.serve.api.adapters import (
    DeploymentPublic,
    ValidationSetPublic,
    deployment_public,
    prepare_engine,
)
from lorafleet.serve.api.dependencies import (
    ActingAs,
    CurrentTenant,
    Gateway,
    GatewayDep,
    SessionDep,
    release_connection,
)
from lorafleet.serve.rollouts import state as rollouts
from lorafleet.serve.rollouts.phases import SERVING, Phase
from lorafleet.serve.rollouts.schemas import RolloutSeries
from lorafleet.serve.rollouts.series import MAX_BUCKET_S, MIN_BUCKET_S, rollout_series
from lorafleet.serve.rollouts.state import AbStart, RolloutStart, VariantSignals, active_rollout
from lorafleet.serve.rollouts.statistics import (
    Estimate,
    Limits,
    Measurement,
    Moments,
    VariantSamples,
    bounded_difference,
    bounded_mean,
    compare_variants,
    sample_ratio,
    welch_difference,
    welch_mean,
)
from lorafleet.serve.types import UtcDateTime, utc
from lorafleet.serve.validation import (
    attach_validation,
    canonical_validation,
    paired_test,
    read_items,
    replay_and_score,
    require_validation_set,
)

__all__ = [
    "router",
    "rollout_public",
    "VariantPublic",
    "DecisionPublic",
    "VariantFeedback",
    "VariantConfidence",
    "RolloutPublic",
]


class VariantPublic(BaseModel):
    label: str
    ref: str
    digest: str
    # its share of the deployment's requests now, in % (a finished rollout's serving variant: 100)
    weight: float


class GateProgressPublic(BaseModel):
    """How far the validation gate is, from the gateway that runs it."""

    answered: int  # answers so far: each version answers every validation item
    total: int
    started_at: UtcDateTime


class DecisionPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    at: UtcDateTime
    action: str
    reason: str
    message: str
    step_index: int
    actor: str
    numbers: list[dict[str, Any]]


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
    # while the gate runs: its progress, from the gateway that runs it (null on the others)
    gate_progress: GateProgressPublic | None = None
    looks: int
    created_by: str
    created_at: UtcDateTime
    finished_at: UtcDateTime | None
    lease_owner: str | None
    decisions: list[DecisionPublic]
    # per variant, the whole rollout so far
    feedback: list[VariantFeedback] = Field(default_factory=list)
    # informational: never decides
    confidence: list[VariantConfidence] = Field(default_factory=list)


router = APIRouter(prefix="/v1")


class PromoteBody(BaseModel):
    full: bool = False


class StopBody(BaseModel):
    # NAME@N of the variant that becomes stable; None keeps the current stable
    keep: str | None = None


def rollout_public(rollout: Rollout, session: Session | None = None) -> RolloutPublic:
    """The rollout as the API shows it, with each variant's feedback and confidence over the
    whole rollout (read through `session`, by default the rollout's own; none when the row is
    detached)."""
    session = session if session is not None else object_session(rollout)
    signals = rollouts.rollout_signals(session, rollout.id) if session is not None else {}
    labels = [v["label"] for v in rollout.variants]
    reference = "stable" if rollout.kind == "canary" else labels[0] if labels else ""
    return RolloutPublic(
        id=rollout.id,
        deployment=rollout.deployment.name,
        kind=rollout.kind,
        phase=rollout.phase,
        reason=rollout.reason,
        message=rollout.message,
        variants=[
            VariantPublic(label=v["label"], ref=v["ref"], digest=v["digest"], weight=weight)
            for v, weight in zip(rollout.variants, _weights_now(rollout), strict=True)
        ],
        steps=rollout.steps,
        step_index=rollout.step_index,
        params=rollout.params,
        gate=rollout.gate,
        looks=rollout.looks,
        created_by=rollout.created_by,
        created_at=utc(rollout.created_at),
        finished_at=utc(rollout.finished_at) if rollout.finished_at is not None else None,
        lease_owner=rollout.lease_owner,
        decisions=[DecisionPublic.model_validate(d) for d in rollout.decisions],
        feedback=[_variant_feedback(label, signals, reference) for label in labels],
        confidence=[_variant_confidence(label, signals, reference) for label in labels],
    )


def _weights_now(rollout: Rollout) -> list[float]:
    """Each variant's share of the deployment's requests now: its routing weight while the
    rollout routes, else 100 for the variant the deployment serves (none, once a later change
    replaced it) and 0 for the others."""
    if rollout.phase in SERVING:
        return [v["weight"] for v in rollout.variants]
    serving = rollout.deployment.stable.digest
    first = next((i for i, v in enumerate(rollout.variants) if v["digest"] == serving), None)
    return [100.0 if i == first else 0.0 for i in range(len(rollout.variants))]


_NOTHING = VariantSignals(0, Moments(), Moments())


def _interval(estimate: Estimate | None) -> list[float] | None:
    return estimate.interval if estimate is not None else None


def _variant_feedback(
    label: str, signals: dict[str, VariantSignals], reference: str
) -> VariantFeedback:
    """Feedback of one variant: count, rate per answered request, mean with its 95 % interval,
    and the difference from the reference variant (Agresti-Caffo on [0, 1])."""
    own = signals.get(label, _NOTHING)
    mean = bounded_mean(own.feedback)
    difference = (
        bounded_difference(own.feedback, signals.get(reference, _NOTHING).feedback)
        if label != reference
        else None
    )
    return VariantFeedback(
        variant=label,
        requests=own.answered,
        count=own.feedback.n,
        rate=own.feedback.n / own.answered if own.answered else None,
        mean=mean.value if mean else None,
        interval=_interval(mean),
        difference=difference.value if difference else None,
        difference_interval=_interval(difference),
    )


def _variant_confidence(
    label: str, signals: dict[str, VariantSignals], reference: str
) -> VariantConfidence:
    """The answers' mean token log-probability of one variant and its difference from the
    reference (Welch)."""
    own = signals.get(label, _NOTHING).confidence
    mean = welch_mean(own)
    difference = (
        welch_difference(own, signals.get(reference, _NOTHING).confidence)
        if label != reference
        else None
    )
    return VariantConfidence(
        variant=label,
        count=own.n,
        mean=own.mean if own.n else None,
        interval=_interval(mean),
        difference=difference.value if difference else None,
        difference_interval=_interval(difference),
    )


def _latest(session: Session, deployment: Deployment, kind: str | None = None) -> Rollout:
    """The deployment's active rollout, else its most recent one."""
    rollout = active_rollout(session, deployment)
    if rollout is not None and (kind is None or rollout.kind == kind):
        return rollout
    query = select(Rollout).where(Rollout.deployment_id == deployment.id)
    if kind:
        query = query.where(Rollout.kind == kind)
    rollout = session.scalar(query.order_by(Rollout.id.desc()).limit(1))
    if rollout is None:
        what = {"canary": "rollout", "ab": "A/B test"}.get(kind or "", "rollout or A/B test")
        raise NotFound(f"deployment {deployment.name!r} has no {what}", code="rollout_not_found")
    return rollout


COMMAND_ATTEMPTS = 3


def _command(
    session: Session,
    tenant: Tenant,
    deployment: str,
    act: Callable[[Deployment, Rollout | None], Rollout],
) -> RolloutPublic:
    """Apply a user's command to the rollout as it is now. The controller writes the rollout at
    every look, so a command that loses that race is judged again on the fresh row (where it may
    still be refused with 409 because the controller finished the rollout) rather than failing
    because of the timing alone."""
    for _ in range(COMMAND_ATTEMPTS - 1):
        target = get_deployment(session, tenant, deployment)
        try:
            return rollout_public(act(target, active_rollout(session, target)))
        except StaleDataError:
            session.rollback()
    target = get_deployment(session, tenant, deployment)
    # the last attempt's 409 reaches the user
    return rollout_public(act(target, active_rollout(session, target)))


# --- validation sets and answer formats ---

# the client's name, kept for the line numbers in errors
_FILE_NAME = re.compile(r"[\w-][\w.-]{0,99}")


def _store_validation(gateway: Gateway, upload: UploadFile, metric: str) -> tuple[str, int, int]:
    with tempfile.TemporaryDirectory(dir=gateway.tmp_dir) as scratch:
        name = (upload.filename or "").rsplit("/", 1)[-1]
        # never "..", "."
        path = Path(scratch) / (name if _FILE_NAME.fullmatch(name) else "validation.jsonl")
        with open(path, "wb") as out:
            shutil.copyfileobj(upload.file, out, 1024 * 1024)
        # checks everything before anything is stored
        data, items = canonical_validation(path, metric)
    return gateway.validation_store.put(data), items, len(data)


@router.put("/deployments/{deployment}/validation")
async def put_validation(
    deployment: str,
    gateway: GatewayDep,
    session: SessionDep,
    tenant: CurrentTenant,
    file: Annotated[UploadFile, File()],
    metric: Annotated[str, Form()] = "exact_match",
) -> ValidationSetPublic:
    """The deployment's fixed validation set (chat JSONL, images as data URLs): the rollout gate
    replays it."""
    target = await run_in_threadpool(get_deployment, session, tenant, deployment)
    digest, items, size = await run_in_threadpool(_store_validation, gateway, file, metric)
    stored = await run_in_threadpool(
        attach_validation, session, tenant, target, digest, metric, items, size
    )
    return ValidationSetPublic.model_validate(stored)


@router.get("/deployments/{deployment}/validation")
def get_validation(
    deployment: str, session: SessionDep, tenant: CurrentTenant
) -> ValidationSetPublic:
    target = get_deployment(session, tenant, deployment)
    if target.validation_set is None:
        raise NotFound(
            f"deployment {deployment!r} has no validation set", code="validation_set_not_found"
        )
    return ValidationSetPublic.model_validate(target.validation_set)


@router.put("/deployments/{deployment}/answer-format")
def put_answer_format(
    deployment: str,
    session: SessionDep,
    tenant: CurrentTenant,
    spec: Annotated[dict[str, Any], Body()],
) -> DeploymentPublic:
    """`{"json_schema": {...}}`, `{"regex": "..."}`, `{"choice": [...]}`, each with `"enforce":
    true` to have the engine produce it (every request of the deployment gets the matching
    structured-output constraint unless it sends its own), or `{}` to clear: rollouts, A/B tests
    and drift measure it."""
    target = get_deployment(session, tenant, deployment)
    target.answer_format = check_format_spec(spec)
    session.commit()
    return deployment_public(target)


# --- canary rollouts ---


@router.post("/deployments/{deployment}/rollout", status_code=202)
async def start_rollout(
    deployment: str,
    body: RolloutStart,
    gateway: GatewayDep,
    session: SessionDep,
    tenant: CurrentTenant,
    actor: ActingAs,
) -> RolloutPublic:
    """Start a canary rollout. It first runs the validation gate (phase Gating), then takes
    traffic."""
    target = await run_in_threadpool(get_deployment, session, tenant, deployment)
    candidate = await run_in_threadpool(resolve_version, session, tenant, body.to)
    await prepare_engine(gateway, session, [candidate])
    rollout = await run_in_threadpool(
        rollouts.start_canary, session, target, candidate, body, actor, time.time()
    )
    return await run_in_threadpool(rollout_public, rollout, session)


def latest_canary(session: Session, tenant: Tenant, deployment: str) -> RolloutPublic:
    """The deployment's active canary rollout, else its most recent one, as the API shows it."""
    return rollout_public(_latest(session, get_deployment(session, tenant, deployment), "canary"))


@router.get("/deployments/{deployment}/rollout")
def get_rollout(
    deployment: str, gateway: GatewayDep, session: SessionDep, tenant: CurrentTenant
) -> RolloutPublic:
    public = latest_canary(session, tenant, deployment)
    progress = gateway.controller.gate_progress.get(public.id)
    if progress is None or public.phase != Phase.GATING:
        return public
    return public.model_copy(
        update={
            "gate_progress": GateProgressPublic(
                answered=progress.answered,
                total=progress.total,
                started_at=utc(progress.started_at),
            )
        }
    )


BucketS = Annotated[
    float | None,
    Query(
        ge=MIN_BUCKET_S,
        le=MAX_BUCKET_S,
        description="period length in seconds; default: at most ~60 periods",
    ),
]


@router.get("/deployments/{deployment}/rollout/series")
def get_rollout_series(
    deployment: str, session: SessionDep, tenant: CurrentTenant, bucket_s: BucketS = None
) -> RolloutSeries:
    """The rollout's (as `GET .../rollout` shows it) requests, errors, mean latency,
    answer-format validity and feedback per variant and period since its start: only periods with
    requests or feedback, oldest first."""
    rollout = _latest(session, get_deployment(session, tenant, deployment), "canary")
    return rollout_series(session, rollout, bucket_s, time.time())


@router.get("/rollouts")
def list_rollouts(session: SessionDep, tenant: CurrentTenant) -> list[RolloutPublic]:
    """The latest rollout or A/B test of each of the tenant's deployments."""
    query = (
        select(Rollout)
        .join(Deployment, Deployment.id == Rollout.deployment_id)
        .where(Deployment.tenant_id == tenant.id)
        .order_by(Rollout.id.desc())
    )
    latest: dict[int, Rollout] = {}
    for rollout in session.scalars(query):
        latest.setdefault(rollout.deployment_id, rollout)
    return [rollout_public(r) for r in sorted(latest.values(), key=lambda r: r.deployment.name)]


@router.post("/deployments/{deployment}/rollout/pause")
def pause_rollout(
    deployment: str, session: SessionDep, tenant: CurrentTenant, actor: ActingAs
) -> RolloutPublic:
    return _command(
        session,
        tenant,
        deployment,
        lambda target, rollout: rollouts.pause(session, target, rollout, actor, time.time()),
    )


@router.post("/deployments/{deployment}/rollout/resume")
def resume_rollout(
    deployment: str, session: SessionDep, tenant: CurrentTenant, actor: ActingAs
) -> RolloutPublic:
    return _command(
        session,
        tenant,
        deployment,
        lambda target, rollout: rollouts.resume(session, target, rollout, actor, time.time()),
    )


@router.post("/deployments/{deployment}/rollout/abort")
def abort_rollout(
    deployment: str, session: SessionDep, tenant: CurrentTenant, actor: ActingAs
) -> RolloutPublic:
    """All traffic back to the stable version, at once."""
    return _command(
        session,
        tenant,
        deployment,
        lambda target, rollout: rollouts.abort(session, target, rollout, actor, time.time()),
    )


@router.post("/deployments/{deployment}/rollout/promote")
def promote_rollout(
    deployment: str,
    session: SessionDep,
    tenant: CurrentTenant,
    actor: ActingAs,
    body: PromoteBody | None = None,
) -> RolloutPublic:
    """One step forward without waiting for the analysis, or (`full`) straight to 100 %."""
    full = body.full if body else False
    return _command(
        session,
        tenant,
        deployment,
        lambda target, rollout: rollouts.promote(
            session, target, rollout, full, actor, time.time()
        ),
    )


@router.post("/deployments/{deployment}/undo")
async def undo_deployment(
    deployment: str,
    gateway: GatewayDep,
    session: SessionDep,
    tenant: CurrentTenant,
    actor: ActingAs,
) -> DeploymentPublic:
    """Serve the previous stable version again."""
    target = await run_in_threadpool(get_deployment, session, tenant, deployment)
    if target.previous_stable is not None:
        await prepare_engine(gateway, session, [target.previous_stable])
    result = await run_in_threadpool(rollouts.undo, session, target, actor, time.time())
    return deployment_public(result)


# --- A/B tests ---


@router.post("/deployments/{deployment}/ab", status_code=201)
async def start_ab(
    deployment: str,
    body: AbStart,
    gateway: GatewayDep,
    session: SessionDep,
    tenant: CurrentTenant,
    actor: ActingAs,
) -> RolloutPublic:
    target = await run_in_threadpool(get_deployment, session, tenant, deployment)
    versions = [
        (await run_in_threadpool(resolve_version, session, tenant, v.adapter), v.weight)
        for v in body.variants
    ]
    await prepare_engine(gateway, session, [v for v, _ in versions])
    rollout = await run_in_threadpool(
        rollouts.start_ab, session, target, versions, actor, time.time()
    )
    return await run_in_threadpool(rollout_public, rollout, session)


def _ab_status(session: Session, rollout: Rollout) -> dict:
    samples = rollouts.with_feedback(
        rollouts.step_samples(session, rollout.id, None),
        rollouts.rollout_feedback(session, rollout.id),
    )
    labels = [v["label"] for v in rollout.variants]
    summary = [_ab_summary(label, samples.get(label)) for label in labels]
    control = samples.get(labels[0])
    comparisons = [
        {"variant": label, "against": labels[0], **compare_variants(control, samples[label])}
        for label in labels[1:]
        if control and label in samples
    ]
    srm = sample_ratio(
        {k: v.units for k, v in samples.items()},
        {v["label"]: v["weight"] for v in rollout.variants},
        Limits(),
    )
    return {
        "rollout": rollout_public(rollout, session).model_dump(mode="json"),
        "variants": summary,
        "comparisons": comparisons,
        "sample_ratio": srm.to_dict(),
    }


def _ab_summary(label: str, s: VariantSamples | None) -> dict:
    """One variant's live metrics over the whole A/B test."""
    latencies = sorted(s.latencies_s) if s else []
    answered = s.requests - s.errors if s else 0
    return {
        "variant": label,
        "requests": s.requests if s else 0,
        "units": s.units if s else 0,
        "error_rate": s.errors / s.requests if s and s.requests else None,
        "latency_p50_ms": 1000 * latencies[len(latencies) // 2] if latencies else None,
        "latency_p95_ms": 1000 * latencies[int(len(latencies) * 0.95)] if latencies else None,
        "output_tokens_mean": sum(s.output_tokens) / len(s.output_tokens)
        if s and s.output_tokens
        else None,
        "format_validity": 1 - s.format_invalid / s.format_checked
        if s and s.format_checked
        else None,
        "feedback_count": len(s.feedback) if s else 0,
        "feedback_rate": len(s.feedback) / answered if s and answered else None,
        "feedback_mean": sum(s.feedback) / len(s.feedback) if s and s.feedback else None,
        "confidence_mean": sum(s.confidences) / len(s.confidences) if s and s.confidences else None,
    }


def _difference(label: str, control: str, measurement: Measurement) -> dict:
    """A paired difference with its two-sided 95% interval and what the interval says."""
    low, high = measurement.interval or (0.0, 0.0)
    verdict = "worse" if high < 0 else "better" if low > 0 else "no difference shown"
    numbers = measurement.to_dict()
    return {
        "variant": label,
        "against": control,
        "verdict": verdict,
        **{k: numbers[k] for k in ("test", "effect", "interval", "p", "n_candidate", "extra")},
    }


@router.get("/deployments/{deployment}/ab")
def get_ab(deployment: str, session: SessionDep, tenant: CurrentTenant) -> JSONResponse:
    """Per-variant live metrics, and each variant's differences from the first one with 95%
    intervals."""
    rollout = _latest(session, get_deployment(session, tenant, deployment), "ab")
    return JSONResponse(_ab_status(session, rollout))


@router.post("/deployments/{deployment}/ab/stop")
async def stop_ab(
    deployment: str,
    session: SessionDep,
    tenant: CurrentTenant,
    actor: ActingAs,
    body: StopBody | None = None,
) -> RolloutPublic:
    keep_ref = body.keep if body else None

    def stop(target: Deployment, rollout: Rollout | None) -> Rollout:
        keep = resolve_version(session, tenant, keep_ref) if keep_ref else None
        return rollouts.stop_ab(session, target, rollout, keep, actor, time.time())

    return await run_in_threadpool(_command, session, tenant, deployment, stop)


@router.post("/deployments/{deployment}/ab/evaluate")
async def evaluate_ab(
    deployment: str,
    gateway: GatewayDep,
    session: SessionDep,
    tenant: CurrentTenant,
    max_tokens: Annotated[int, Query(ge=1, le=4096)] = 128,
) -> JSONResponse:
    """Every variant answers the validation set (greedy, through the engine); paired differences
    from the first variant with 95% intervals (McNemar exact or paired bootstrap)."""
    target = await run_in_threadpool(get_deployment, session, tenant, deployment)
    rollout = await run_in_threadpool(_latest, session, target, "ab")
    validation = require_validation_set(target)
    answer_format = target.answer_format
    gateway.fleet.require_up()
    release_connection(session)  # the replays take a while: no connection held meanwhile
    items = read_items(await run_in_threadpool(gateway.validation_store.read, validation.digest))
    scores = {}
    for variant in rollout.variants:
        replayed = await replay_and_score(
            gateway.fleet,
            variant["digest"],
            items,
            validation.metric,
            max_tokens,
            answer_format=answer_format,
            tenant=tenant.name,
        )
        scores[variant["label"]] = replayed.scores
    labels = list(scores)
    differences = [
        _difference(
            label, labels[0], await paired_test(scores[labels[0]], scores[label], 0.0, 0.025)
        )
        for label in labels[1:]
    ]
    return JSONResponse(
        {
            "metric": validation.metric,
            "items": len(items),
            "scores": {label: sum(s) / len(s) for label, s in scores.items()},
            "differences": differences,
        }
    )

"""Canary rollouts and A/B tests of a deployment: the state machine, its commands, and the per-tick
plan.

Phases: Gating -> Progressing <-> Paused -> Promoted | RolledBack | Aborted, or Gating ->
GateRefused; A/B tests: Running -> Stopped. Every transition writes a Decision row with its reason
and numbers. The deployment row points at its one active rollout (`rollout_id`), claimed by a
conditional UPDATE so two starts can never both succeed; rollout rows carry a revision, so a stale
write (a user's abort racing the controller's advance) fails instead of overwriting.
"""

from __future__ import annotations

import secrets
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import cast

from pydantic import BaseModel, Field, field_validator
from sqlalchemy import CursorResult, func, select, update
from sqlalchemy.orm import Session

from lorafleet.adapters.catalog import (
    AdapterVersion,
    Decision,
    Deployment,
    Feedback,
    Rollout,
    RolloutSample,
)
from lorafleet.errors import Conflict, InvalidRequest
from lorafleet.serve.rollouts.phases import SERVING, Phase
from lorafleet.serve.rollouts.routing import Variant, check_weights
from lorafleet.serve.rollouts.statistics import (
    EMPTY,
    Limits,
    Measurement,
    Moments,
    Status,
    VariantSamples,
    assess_step,
)

__all__ = [
    "RolloutStart",
    "AbStart",
    "CanaryView",
    "Tick",
    "plan_tick",
    "routing_table",
    "active_rollout",
    "serving_rollout",
    "start_canary",
    "start_ab",
    "pause",
    "resume",
    "abort",
    "promote",
    "undo",
    "stop_ab",
    "apply_gate",
    "apply_tick",
    "step_samples",
    "record",
    "Transition",
    "rollout_feedback",
    "with_feedback",
    "VariantSignals",
    "rollout_signals",
]


# reasons of the transitions that are not statistical (those live in statistics.py)
STARTED, GATE_SKIPPED, STEP_ADVANCED, PROMOTED = (
    "RolloutStarted",
    "GateSkipped",
    "StepAdvanced",
    "Promoted",
)
MANUAL_PROMOTE, PAUSED, RESUMED, ABORTED = (
    "ManualPromote",
    "PausedByUser",
    "ResumedByUser",
    "AbortedByUser",
)
UNDONE, AB_STARTED, AB_STOPPED = "UndoToPreviousStable", "AbStarted", "AbStopped"


class RolloutStart(BaseModel):
    """`POST /v1/deployments/{name}/rollout`: the candidate and how to roll it out."""

    to: str  # NAME, NAME@N or a digest
    # canary weight per step (percent)
    steps: list[float] = Field(default_factory=lambda: [10.0, 25.0, 50.0, 100.0])
    min_requests: int = Field(100, ge=1)  # per variant and step before it may advance
    # minimum time at each step, and the longest time between looks
    interval_s: float = Field(60, gt=0)
    look_requests: int = Field(25, ge=1)  # a look also happens after this many new canary requests
    margin: float = Field(0.05, ge=0, le=1)  # validation-gate non-inferiority margin (score points)
    gate: bool = True  # False skips the validation-set gate (recorded as GateSkipped)
    gate_max_tokens: int = Field(128, ge=1, le=4096)
    error_margin: float = Field(0.01, ge=0, le=1)
    format_margin: float = Field(0.01, ge=0, le=1)
    latency_tolerance: float = Field(0.25, ge=0)
    alpha: float = Field(0.05, gt=0, lt=0.5)
    # users' feedback over the whole rollout may roll the canary back (off by default: feedback is
    # sparse and comes late); rollouts started before these existed validate to the defaults
    feedback_rollback: bool = False
    feedback_min: int = Field(30, ge=1)  # feedback values per variant before that test may fail
    # tolerated drop of the mean feedback (on [0, 1])
    feedback_margin: float = Field(0.05, ge=0, le=1)

    @field_validator("steps")
    @classmethod
    def _steps(cls, steps: list[float]) -> list[float]:
        if (
            not steps
            or any(not 0 < s <= 100 for s in steps)
            or any(b <= a for a, b in zip(steps, steps[1:]))
        ):
            raise ValueError(f"steps must be increasing percents in (0, 100], got {steps}")
        if any(abs(s * 100 - round(s * 100)) > 1e-6 for s in steps):
            raise ValueError("steps have at most two decimals (10,000 buckets)")
        # the rollout promotes after its last step
        return steps if steps[-1] == 100 else [*steps, 100.0]

    def limits(self) -> Limits:
        return Limits(
            min_requests=self.min_requests,
            error_margin=self.error_margin,
            format_margin=self.format_margin,
            latency_tolerance=self.latency_tolerance,
            alpha=self.alpha,
            feedback_rollback=self.feedback_rollback,
            feedback_min=self.feedback_min,
            feedback_margin=self.feedback_margin,
        )


class AbVariant(BaseModel):
    adapter: str
    weight: float


class AbStart(BaseModel):
    variants: list[AbVariant]


@dataclass(frozen=True)
class CanaryView:
    """What the pure plan needs from a rollout row."""

    step_index: int
    steps: list[float]
    looks: int
    step_started_at: float
    last_look_at: float
    last_look_requests: int
    params: RolloutStart


@dataclass(frozen=True)
class Tick:
    action: str  # "extend" | "advance" | "promote" | "rollback"
    reason: str
    message: str
    measurements: list[Measurement]


def plan_tick(view: CanaryView, samples: dict[str, VariantSamples], now: float) -> Tick | None:
    """One controller tick of a progressing canary; None when no look is due yet."""
    p = view.params
    candidate, stable = samples.get("canary", EMPTY), samples.get("stable", EMPTY)
    dwell_done = now - view.step_started_at >= p.interval_s
    due = (
        now - view.last_look_at >= p.interval_s
        or candidate.requests - view.last_look_requests >= p.look_requests
    )
    if not (due or dwell_done):
        return None
    weight = view.steps[view.step_index]
    assessment = assess_step(
        candidate,
        stable,
        {"canary": weight, "stable": 100 - weight},
        view.looks + 1,
        p.limits(),
        may_advance=dwell_done,
    )
    if assessment.outcome != "advance":
        return Tick(
            assessment.outcome, assessment.reason, assessment.message, assessment.measurements
        )
    if view.steps[view.step_index + 1] >= 100:
        return Tick(
            "promote", PROMOTED, f"last step passed: {assessment.message}", assessment.measurements
        )
    return Tick(
        "advance",
        STEP_ADVANCED,
        f"{weight:g}% -> {view.steps[view.step_index + 1]:g}%: {assessment.message}",
        assessment.measurements,
    )


def active_rollout(session: Session, deployment: Deployment) -> Rollout | None:
    """The deployment's one active rollout or A/B test (gating, progressing, paused or running),
    if any."""
    return (
        session.get(Rollout, deployment.rollout_id) if deployment.rollout_id is not None else None
    )


def serving_rollout(session: Session, deployment: Deployment) -> Rollout | None:
    """The active rollout whose routing table is in effect (not while it gates)."""
    rollout = active_rollout(session, deployment)
    return rollout if rollout is not None and rollout.phase in SERVING else None


def routing_table(rollout: Rollout) -> list[Variant]:
    return [Variant(v["label"], v["digest"], v["ref"], v["weight"]) for v in rollout.variants]


def _ref(version: AdapterVersion) -> str:
    return f"{version.adapter.name}@{version.version}"


def _entry(label: str, version: AdapterVersion, weight: float) -> dict:
    return {
        "label": label,
        "version_id": version.id,
        "digest": version.digest,
        "ref": _ref(version),
        "weight": weight,
    }


@dataclass(frozen=True)
class Transition:
    """One decision about a rollout: what was done, why (a CamelCase reason), and the numbers."""

    action: str
    reason: str
    message: str
    measurements: Sequence[Measurement] = ()
    describe: bool = True  # it also becomes the rollout's current reason and message


def record(
    session: Session,
    rollout: Rollout | None,
    deployment: Deployment,
    transition: Transition,
    actor: str,
    now: float,
) -> Decision:
    """Write a decision row of `transition`, made by `actor` at `now`."""
    decision = Decision(
        deployment_id=deployment.id,
        rollout=rollout,
        at=now,
        action=transition.action,
        reason=transition.reason,
        message=transition.message,
        step_index=rollout.step_index if rollout else -1,
        actor=actor,
        numbers=[m.to_dict() for m in transition.measurements],
    )
    session.add(decision)
    if rollout is not None and transition.describe:
        rollout.reason, rollout.message = transition.reason, transition.message
    return decision


def _claim(session: Session, deployment: Deployment, rollout: Rollout) -> None:
    """Point the deployment at `rollout`, unless another rollout got there first (atomic on any
    database)."""
    session.add(rollout)
    session.flush()
    claimed = cast(
        CursorResult,
        session.execute(
            update(Deployment)
            .where(Deployment.id == deployment.id, Deployment.rollout_id.is_(None))
            .values(rollout_id=rollout.id)
            .execution_options(synchronize_session=False)
        ),
    )
    if claimed.rowcount != 1:
        session.rollback()
        raise _running(deployment)
    session.refresh(deployment)


def _running(deployment: Deployment) -> Conflict:
    return Conflict(
        f"a rollout or A/B test is already running on {deployment.name!r}; "
        "see `lorafleet rollout status`",
        code="rollout_running",
    )


def _require_idle(deployment: Deployment) -> None:
    if deployment.rollout_id is not None:
        raise _running(deployment)


def start_canary(
    session: Session,
    deployment: Deployment,
    candidate: AdapterVersion,
    spec: RolloutStart,
    actor: str,
    now: float,
) -> Rollout:
    _require_idle(deployment)
    if candidate.id == deployment.stable_id:
        raise InvalidRequest(
            f"{_ref(candidate)} is already the stable version of {deployment.name!r}",
            code="already_stable",
        )
    if spec.gate and deployment.validation_set is None:
        raise InvalidRequest(
            f"deployment {deployment.name!r} has no validation set for the gate: push one with "
            "`lorafleet validation push`, or start with --no-gate",
            code="no_validation_set",
        )
    rollout = Rollout(
        deployment=deployment,
        kind="canary",
        phase=Phase.GATING if spec.gate else Phase.PROGRESSING,
        salt=secrets.token_hex(8),
        steps=spec.steps,
        params=spec.model_dump(),
        variants=[_entry("canary", candidate, 0.0), _entry("stable", deployment.stable, 100.0)],
        created_by=actor,
        created_at=now,
        step_started_at=now,
        last_look_at=now,
    )
    _claim(session, deployment, rollout)
    record(
        session,
        rollout,
        deployment,
        Transition(
            "start",
            STARTED,
            f"canary {_ref(candidate)} against stable {_ref(deployment.stable)}, steps "
            f"{','.join(f'{s:g}' for s in spec.steps)}",
        ),
        actor,
        now,
    )
    if not spec.gate:
        record(
            session,
            rollout,
            deployment,
            Transition("gate", GATE_SKIPPED, "the validation-set gate was skipped"),
            actor,
            now,
        )
        _set_step(rollout, 0, now)
    session.commit()
    return rollout


def start_ab(
    session: Session,
    deployment: Deployment,
    variants: list[tuple[AdapterVersion, float]],
    actor: str,
    now: float,
) -> Rollout:
    _require_idle(deployment)
    if len(variants) < 2:
        raise InvalidRequest("an A/B test needs at least two variants", code="invalid_variants")
    try:
        check_weights([w for _, w in variants])
    except ValueError as exc:
        raise InvalidRequest(str(exc), code="invalid_weights") from exc
    if len({v.id for v, _ in variants}) != len(variants):
        raise InvalidRequest(
            "each variant must be a different adapter version", code="invalid_variants"
        )
    rollout = Rollout(
        deployment=deployment,
        kind="ab",
        phase=Phase.RUNNING,
        salt=secrets.token_hex(8),
        variants=[_entry(_ref(v), v, w) for v, w in variants],
        steps=[],
        step_index=0,
        params={},
        created_by=actor,
        created_at=now,
        step_started_at=now,
        last_look_at=now,
    )
    _claim(session, deployment, rollout)
    record(
        session,
        rollout,
        deployment,
        Transition(
            "start", AB_STARTED, "A/B " + ", ".join(f"{_ref(v)}={w:g}%" for v, w in variants)
        ),
        actor,
        now,
    )
    session.commit()
    return rollout


def _set_step(rollout: Rollout, index: int, now: float) -> None:
    weight = rollout.steps[index]
    canary, stable = rollout.variants
    # a new list: JSON change
    rollout.variants = [{**canary, "weight": weight}, {**stable, "weight": 100 - weight}]
    rollout.step_index, rollout.phase = (
        index,
        rollout.phase if rollout.phase == Phase.PAUSED else Phase.PROGRESSING,
    )
    rollout.step_started_at, rollout.last_look_at, rollout.last_look_requests = now, now, 0


def _finish(session: Session, rollout: Rollout, phase: Phase, now: float) -> None:
    rollout.phase, rollout.finished_at, rollout.lease_owner = phase, now, None
    if rollout.deployment.rollout_id == rollout.id:
        # traffic follows the deployment's stable version from now on
        rollout.deployment.rollout_id = None


def _make_stable(session: Session, deployment: Deployment, version_id: int) -> None:
    if version_id != deployment.stable_id:
        deployment.previous_stable, deployment.stable = (
            deployment.stable,
            session.get_one(AdapterVersion, version_id),
        )


def _promote(session: Session, rollout: Rollout, now: float) -> None:
    _make_stable(session, rollout.deployment, rollout.variants[0]["version_id"])
    rollout.variants = [
        {**rollout.variants[0], "weight": 100.0},
        {**rollout.variants[1], "weight": 0.0},
    ]
    rollout.step_index = len(rollout.steps) - 1
    _finish(session, rollout, Phase.PROMOTED, now)


def _require(
    rollout: Rollout | None, deployment: Deployment, kind: str, phases: set[Phase], doing: str
) -> Rollout:
    if rollout is None or rollout.kind != kind or rollout.phase not in phases:
        what = "canary rollout" if kind == "canary" else "A/B test"
        state = (
            f"it is {rollout.phase}"
            if rollout is not None and rollout.kind == kind
            else f"there is no {what}"
        )
        raise Conflict(
            f"cannot {doing} on {deployment.name!r}: {state}", code="invalid_rollout_state"
        )
    return rollout


def pause(
    session: Session, deployment: Deployment, rollout: Rollout | None, actor: str, now: float
) -> Rollout:
    rollout = _require(rollout, deployment, "canary", {Phase.PROGRESSING}, "pause")
    rollout.phase = Phase.PAUSED
    record(
        session,
        rollout,
        deployment,
        Transition("pause", PAUSED, "paused: weights stay, no analysis"),
        actor,
        now,
    )
    session.commit()
    return rollout


def resume(
    session: Session, deployment: Deployment, rollout: Rollout | None, actor: str, now: float
) -> Rollout:
    rollout = _require(rollout, deployment, "canary", {Phase.PAUSED}, "resume")
    rollout.phase, rollout.last_look_at = Phase.PROGRESSING, now
    record(session, rollout, deployment, Transition("resume", RESUMED, "resumed"), actor, now)
    session.commit()
    return rollout


def abort(
    session: Session, deployment: Deployment, rollout: Rollout | None, actor: str, now: float
) -> Rollout:
    rollout = _require(
        rollout, deployment, "canary", {Phase.GATING, Phase.PROGRESSING, Phase.PAUSED}, "abort"
    )
    _finish(session, rollout, Phase.ABORTED, now)
    record(
        session,
        rollout,
        deployment,
        Transition(
            "abort",
            ABORTED,
            f"aborted at {rollout.variants[0]['weight']:g}%: "
            f"all traffic back to {rollout.variants[1]['ref']}",
        ),
        actor,
        now,
    )
    session.commit()
    return rollout


def promote(
    session: Session,
    deployment: Deployment,
    rollout: Rollout | None,
    full: bool,
    actor: str,
    now: float,
) -> Rollout:
    """Skip the analysis: one step forward, or (`full`) straight to 100 %."""
    rollout = _require(rollout, deployment, "canary", {Phase.PROGRESSING, Phase.PAUSED}, "promote")
    nxt = len(rollout.steps) - 1 if full else rollout.step_index + 1
    if rollout.steps[nxt] >= 100:
        _promote(session, rollout, now)
        record(
            session,
            rollout,
            deployment,
            Transition(
                "promote",
                MANUAL_PROMOTE,
                f"promoted by hand: {rollout.variants[0]['ref']} is stable",
            ),
            actor,
            now,
        )
    else:
        _set_step(rollout, nxt, now)
        record(
            session,
            rollout,
            deployment,
            Transition("advance", MANUAL_PROMOTE, f"advanced by hand to {rollout.steps[nxt]:g}%"),
            actor,
            now,
        )
    session.commit()
    return rollout


def undo(session: Session, deployment: Deployment, actor: str, now: float) -> Deployment:
    """Serve the previous stable version again (twice = redo). The decision joins the latest
    rollout's history."""
    _require_idle(deployment)
    if deployment.previous_stable_id is None:
        raise Conflict(
            f"deployment {deployment.name!r} has no previous stable version", code="nothing_to_undo"
        )
    old = deployment.stable
    _make_stable(session, deployment, deployment.previous_stable_id)
    latest = session.scalar(
        select(Rollout).where(Rollout.deployment_id == deployment.id).order_by(Rollout.id.desc())
    )
    record(
        session,
        latest,
        deployment,
        Transition(
            "undo", UNDONE, f"stable {_ref(old)} -> {_ref(deployment.stable)}", describe=False
        ),
        actor,
        now,
    )
    session.commit()
    return deployment


def stop_ab(
    session: Session,
    deployment: Deployment,
    rollout: Rollout | None,
    keep: AdapterVersion | None,
    actor: str,
    now: float,
) -> Rollout:
    rollout = _require(rollout, deployment, "ab", {Phase.RUNNING}, "stop the A/B test")
    if keep is not None:
        if keep.id not in {v["version_id"] for v in rollout.variants}:
            raise InvalidRequest(
                f"{_ref(keep)} is not a variant of this A/B test", code="invalid_variants"
            )
        _make_stable(session, deployment, keep.id)
    _finish(session, rollout, Phase.STOPPED, now)
    record(
        session,
        rollout,
        deployment,
        Transition(
            "stop",
            AB_STOPPED,
            "stopped; stable is "
            f"{_ref(keep) if keep else deployment.stable.adapter.name + ' (unchanged)'}",
        ),
        actor,
        now,
    )
    session.commit()
    return rollout


def apply_gate(
    session: Session,
    rollout: Rollout,
    measurement: Measurement,
    evidence: dict,
    actor: str,
    now: float,
) -> None:
    rollout.gate = {**evidence, "measurement": measurement.to_dict()}
    if measurement.status is Status.SUCCESSFUL:
        _set_step(rollout, 0, now)
    else:
        _finish(session, rollout, Phase.GATE_REFUSED, now)
    record(
        session,
        rollout,
        rollout.deployment,
        Transition("gate", measurement.reason, measurement.message, [measurement]),
        actor,
        now,
    )
    session.commit()


def apply_tick(
    session: Session, rollout: Rollout, tick: Tick, canary_requests: int, actor: str, now: float
) -> None:
    rollout.looks += 1
    rollout.last_look_at, rollout.last_look_requests = now, canary_requests
    if tick.action == "advance":
        _set_step(rollout, rollout.step_index + 1, now)
    elif tick.action == "promote":
        _promote(session, rollout, now)
    elif tick.action == "rollback":
        _finish(session, rollout, Phase.ROLLED_BACK, now)
    record(
        session,
        rollout,
        rollout.deployment,
        Transition(tick.action, tick.reason, tick.message, tick.measurements),
        actor,
        now,
    )
    session.commit()


def step_samples(
    session: Session, rollout_id: int, step_index: int | None
) -> dict[str, VariantSamples]:
    """Per-variant samples of one step (or of the whole rollout when `step_index` is None)."""
    query = select(
        RolloutSample.variant,
        RolloutSample.ok,
        RolloutSample.latency_s,
        RolloutSample.unit,
        RolloutSample.format_valid,
        RolloutSample.output_tokens,
        RolloutSample.confidence,
    ).where(RolloutSample.rollout_id == rollout_id)
    if step_index is not None:
        query = query.where(RolloutSample.step_index == step_index)
    rows: dict[str, list] = defaultdict(list)
    for row in session.execute(query):
        rows[row.variant].append(row)
    return {
        variant: VariantSamples(
            requests=len(rs),
            errors=sum(not r.ok for r in rs),
            units=len({r.unit for r in rs}),
            latencies_s=[r.latency_s for r in rs if r.ok],
            format_checked=sum(r.format_valid is not None for r in rs),
            format_invalid=sum(r.format_valid is False for r in rs),
            output_tokens=[r.output_tokens for r in rs if r.ok],
            confidences=[r.confidence for r in rs if r.confidence is not None],
        )
        for variant, rs in rows.items()
    }


def rollout_feedback(session: Session, rollout_id: int) -> dict[str, list[float]]:
    """Users' feedback values (on [0, 1]) per variant over the whole rollout. Feedback comes
    after its request and is sparse, and the variants serve side by side throughout, so it is
    judged over the rollout, not a step."""
    feedback: dict[str, list[float]] = defaultdict(list)
    for variant, value in session.execute(
        select(Feedback.variant, Feedback.value)
        .where(Feedback.rollout_id == rollout_id)
        .order_by(Feedback.id)
    ):
        feedback[variant].append(value)
    return dict(feedback)


def with_feedback(
    samples: dict[str, VariantSamples], feedback: dict[str, list[float]]
) -> dict[str, VariantSamples]:
    """The samples with each variant's feedback in (a variant may have feedback but no request
    this step)."""
    variants = [*samples, *(v for v in feedback if v not in samples)]
    return {v: replace(samples.get(v, EMPTY), feedback=feedback.get(v, ())) for v in variants}


@dataclass(frozen=True)
class VariantSignals:
    """What one variant's answers earned over a whole rollout: the requests answered, the
    answers' mean token log-probabilities and users' feedback values, as SQL aggregates."""

    answered: int
    confidence: Moments
    feedback: Moments


def rollout_signals(session: Session, rollout_id: int) -> dict[str, VariantSignals]:
    """Per variant, aggregated in the database: a status needs no rows of a long rollout in
    memory."""
    served = session.execute(
        select(
            RolloutSample.variant,
            func.count().filter(RolloutSample.ok),
            func.count(RolloutSample.confidence),
            func.sum(RolloutSample.confidence),
            func.sum(RolloutSample.confidence * RolloutSample.confidence),
        )
        .where(RolloutSample.rollout_id == rollout_id)
        .group_by(RolloutSample.variant)
    )
    judged = session.execute(
        select(
            Feedback.variant,
            func.count(),
            func.sum(Feedback.value),
            func.sum(Feedback.value * Feedback.value),
        )
        .where(Feedback.rollout_id == rollout_id)
        .group_by(Feedback.variant)
    )
    answers = {
        variant: (answered, _moments(n, total, squares))
        for variant, answered, n, total, squares in served
    }
    feedback = {variant: _moments(n, total, squares) for variant, n, total, squares in judged}
    return {
        variant: VariantSignals(
            *answers.get(variant, (0, Moments())), feedback.get(variant, Moments())
        )
        for variant in answers.keys() | feedback.keys()
    }


def _moments(n: int, total: float | None, squares: float | None) -> Moments:
    return Moments(n, float(total or 0.0), float(squares or 0.0))

"""The drift monitor: validation replay against each version's baseline, and input/output drift of
live traffic.

- Replay: every live version of a deployment (stable, and canary or A/B variants) answers the
  deployment's validation set through the engine, greedy. The first replay of a (version, validation
  set) is its baseline; later ones are compared with it item by item: exact-output match rate, and
  the task score by the paired test of the rollout gate. A frozen adapter on a frozen base must not
  move; when it does, the run says whether the engine's identity (base files, dtype, engine
  arguments, vLLM version) changed too.
- Sampling: after each answered request, a per-deployment reservoir may keep the features of the
  request and of its answer (`statistics.request_features`), at most `drift_reservoir` per look
  period; the catalog keeps at most `drift_max_samples` per deployment. Tenants can opt out; their
  samples are then deleted.
- Looks: every `drift_look_s`, each deployment with a validation set and `drift_window` new samples
  gets an input look (the window against the validation set's requests) and, per variant, an output
  look (length, empty/refusal rate, format validity against the variant's baseline replay) and a
  confidence look (the answers' mean token log-probability against the baseline replay's, when both
  recorded them). p-values are spent per (deployment, version, kind) as in rollouts and adjusted
  across all looks of the tick with Benjamini-Hochberg.

Scheduled work is claimed with a conditional UPDATE of the deployment row, so gateways sharing a
catalog do not both do it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scipy import stats
from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from lorafleet.adapters.catalog import (
    AdapterVersion,
    Deployment,
    DriftCheck,
    InputSample,
    Tenant,
    ValidationRun,
)
from lorafleet.adapters.store import BlobStorage
from lorafleet.serve.answer_format import answer_checker
from lorafleet.serve.drift.statistics import (
    Reservoir,
    benjamini_hochberg,
    confidence_drift,
    input_drift,
    proportion_p,
    request_features,
    spent_p,
)
from lorafleet.serve.engine.client import Engines
from lorafleet.serve.metrics import Metrics
from lorafleet.serve.rollouts.state import serving_rollout
from lorafleet.serve.rollouts.statistics import Measurement
from lorafleet.serve.settings import Settings
from lorafleet.serve.types import Answer
from lorafleet.serve.validation import (
    Replay,
    ValidationItem,
    paired_test,
    read_items,
    replay_and_score,
)

__all__ = ["DriftMonitor", "SampleTicket", "is_empty_or_refusal", "live_versions"]

log = logging.getLogger("lorafleet.drift")

_REFUSAL = re.compile(
    r"^\s*$|\b(I can(?:no|')t|I'm sorry|I am sorry|I'm unable|I am unable|as an AI)\b",
    re.IGNORECASE,
)
MIN_OUTPUT_SAMPLES = 20  # a variant's output look needs this many answered samples in the window
SETTLE_S = 2.0  # longest a save waits for the samples already drawn to have their features computed


def is_empty_or_refusal(text: str) -> bool:
    return bool(_REFUSAL.search(text[:200]))


def live_versions(session: Session, deployment: Deployment) -> list[tuple[str, AdapterVersion]]:
    """(variant, version) of everything the deployment serves right now."""
    rollout = serving_rollout(session, deployment)
    if rollout is None:
        return [("stable", deployment.stable)]
    return [
        (v["label"], session.get_one(AdapterVersion, v["version_id"]))
        for v in rollout.variants
        if v["weight"] > 0
    ]


def _baseline(session: Session, version_id: int, validation_set_id: int) -> ValidationRun | None:
    """The version's first replay on this validation set (two gateways may both record one: the
    first wins)."""
    return session.scalar(
        select(ValidationRun)
        .where(
            ValidationRun.version_id == version_id,
            ValidationRun.validation_set_id == validation_set_id,
            ValidationRun.kind == "baseline",
        )
        .order_by(ValidationRun.id)
        .limit(1)
    )


def _count(session: Session, *where: Any) -> int:
    return session.scalar(select(func.count()).where(*where)) or 0


def _last_look(session: Session, *where: Any) -> int:
    """The number of a series' last drift look (0 before its first): counted from it, not from
    the rows, since retention deletes old looks (`lorafleet.adapters.garbage` keeps each
    series' newest)."""
    return session.scalar(select(func.max(DriftCheck.look)).where(*where)) or 0


def _base_fingerprint(base: str) -> str:
    """Names, sizes and modification times of a local base's files (cheap; a replaced file
    changes it)."""
    folder = Path(base)
    if not folder.is_dir():
        return base  # a hub id: the engine resolves it
    listing = sorted(
        f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
        for p in folder.iterdir()
        if p.is_file()
    )
    return f"{base}#{hashlib.sha256('|'.join(listing).encode()).hexdigest()[:12]}"


@dataclass(frozen=True)
class _ReplayPlan:
    """What a replay of one deployment needs, read in one session."""

    items: list[ValidationItem]
    metric: str
    versions: list[tuple[str, int, str]]  # (variant, version id, digest)
    tenant: str
    name: str
    answer_format: dict | None  # enforced in the replays where it is, as in live traffic


@dataclass(frozen=True)
class _Replayed:
    """One live version's validation replay, with what it is compared against: ready to record."""

    deployment_id: int
    variant: str
    version_id: int
    replay: Replay
    baseline: ValidationRun | None  # None: this replay becomes the version's baseline
    test: Measurement | None  # the paired test against the baseline
    engine: str  # the engine's identity during the replay
    started_at: float


@dataclass(frozen=True)
class SampleTicket:
    """A live request the reservoir of its deployment decided to keep; `DriftMonitor.keep` fills
    it in."""

    deployment_id: int
    slot: tuple[int, int]


class DriftMonitor:
    """Samples live requests, replays validation sets, and runs the drift looks, on the schedule
    of `settings`."""

    def __init__(
        self,
        sessions: sessionmaker,
        engine: Engines,
        validation_store: BlobStorage,
        metrics: Metrics,
        settings: Settings,
        quantization_label: str,
    ) -> None:
        self.sessions, self.engine, self.validation_store = sessions, engine, validation_store
        self.metrics, self.settings, self.quantization_label = metrics, settings, quantization_label
        self._reservoirs: dict[int, Reservoir] = {}
        # requests add reservoirs on the loop; the flush reads in a thread
        self._reservoirs_lock = threading.Lock()
        # samples drawn on the loop, settled when their features are kept
        self._tickets = threading.Condition()
        self._issued = self._settled = 0
        # validation digest -> request features
        self._references: dict[str, list[dict[str, float]]] = {}
        self._identity: tuple[int, str] | None = None  # (engine generation, identity)

    # --- the hot path: after each answered request, in two steps ---

    def wants_sample(self, deployment_id: int) -> SampleTicket | None:
        """Cheap, on the event loop: whether this request is kept (the reservoir draws)."""
        with self._reservoirs_lock:
            reservoir = self._reservoirs.get(deployment_id)
            if reservoir is None:
                reservoir = self._reservoirs[deployment_id] = Reservoir(
                    self.settings.drift_reservoir
                )
        slot = reservoir.wants()
        if slot is None:
            return None
        with self._tickets:
            self._issued += 1
        return SampleTicket(deployment_id, slot)

    def keep(self, ticket: SampleTicket, variant: str, messages: list, answer: Answer) -> None:
        """CPU work, in a worker thread: the request's features (its image decoded) go into the
        reservoir. Called exactly once per ticket."""
        try:
            with self._reservoirs_lock:
                reservoir = self._reservoirs.get(ticket.deployment_id)
            if reservoir is None:  # the tenant opted out meanwhile
                return
            reservoir.put(
                ticket.slot,
                {
                    "deployment_id": ticket.deployment_id,
                    "variant": variant,
                    "at": time.time(),
                    "features": request_features(messages),
                    "ok": answer.answered,
                    "output_tokens": answer.output_tokens,
                    "empty": answer.answered
                    and answer.text is not None
                    and is_empty_or_refusal(answer.text),
                    "format_valid": answer.format_valid,
                    "confidence": answer.confidence,
                },
            )
        finally:
            with self._tickets:
                self._settled += 1
                self._tickets.notify_all()

    # --- the schedule ---

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.drift_look_s)
            try:
                await self.tick()
            except Exception:  # noqa: BLE001 - one bad tick must not stop the monitor
                log.exception("drift monitor tick failed")

    async def tick(self) -> None:
        await run_in_threadpool(self.save_samples)
        if self.settings.drift_replay_s > 0 and self.engine.up:
            due = await run_in_threadpool(
                self._claim, "drift_replay_at", self.settings.drift_replay_s
            )
            for deployment_id in sorted(
                set(due) | set(await run_in_threadpool(self._without_baseline))
            ):
                try:
                    await self.replay_deployment(deployment_id)
                except Exception:  # noqa: BLE001 - the next deployment's replay still runs
                    log.exception("drift replay of deployment %s failed", deployment_id)
        await run_in_threadpool(self.look)

    def save_samples(self) -> None:
        """Write the reservoirs' samples to the catalog, those drawn before this call included
        (their features may still be computing in another thread), and keep at most
        `drift_max_samples` per deployment."""
        with self._tickets:
            drawn = self._issued
            self._tickets.wait_for(lambda: self._settled >= drawn, timeout=SETTLE_S)
        with self._reservoirs_lock:
            reservoirs = list(self._reservoirs.values())
        rows = [row for reservoir in reservoirs for row in reservoir.drain()]
        if not rows:
            return
        with self.sessions() as session:
            session.add_all(InputSample(**row) for row in rows)
            session.flush()
            for deployment_id in {row["deployment_id"] for row in rows}:
                keep_from = session.scalar(
                    select(InputSample.id)
                    .where(InputSample.deployment_id == deployment_id)
                    .order_by(InputSample.id.desc())
                    .offset(self.settings.drift_max_samples)
                    .limit(1)
                )
                if keep_from is not None:
                    session.execute(
                        delete(InputSample).where(
                            InputSample.deployment_id == deployment_id, InputSample.id <= keep_from
                        )
                    )
            session.commit()

    def _without_baseline(self) -> list[int]:
        """Deployments serving a version that has no baseline on the current validation set (just
        promoted, deployed, or given a new validation set): their baseline is recorded at the
        next tick."""
        with self.sessions() as session:
            missing = []
            for deployment in session.scalars(
                select(Deployment).where(Deployment.validation_set_id.is_not(None))
            ):
                for _, version in live_versions(session, deployment):
                    if _baseline(session, version.id, deployment.validation_set_id) is None:
                        missing.append(deployment.id)
                        break
            return missing

    def _claim(self, column: str, period: float) -> list[int]:
        """Deployments with a validation set whose `column` time has come, claimed for this
        gateway."""
        now = time.time()
        claimed = []
        with self.sessions() as session:
            due = session.scalars(
                select(Deployment.id).where(
                    Deployment.validation_set_id.is_not(None), getattr(Deployment, column) <= now
                )
            ).all()
            for deployment_id in due:
                result = session.execute(
                    update(Deployment)
                    .where(Deployment.id == deployment_id, getattr(Deployment, column) <= now)
                    .values({column: now + period})
                    .execution_options(synchronize_session=False)
                )
                if result.rowcount == 1:
                    claimed.append(deployment_id)
            session.commit()
        return claimed

    # --- validation replay ---

    async def identity(self) -> str:
        """What serves the replays: base files, quantization, dtype, engine arguments, vLLM
        version."""
        if self._identity is None or self._identity[0] != self.engine.generation:
            s = self.settings
            value = (
                f"base={_base_fingerprint(s.base)} quantization={self.quantization_label} "
                f"dtype={s.dtype} vllm={await self.engine.version()} "
                f"args={' '.join(s.engine_extra_args) or '-'}"
            )
            self._identity = (self.engine.generation, value)
        return self._identity[1]

    async def replay_deployment(
        self, deployment_id: int, max_tokens: int = 128
    ) -> list[ValidationRun]:
        """Replay every live version of the deployment; record baselines or compare with them."""
        plan = await run_in_threadpool(self._replay_plan, deployment_id)
        if plan is None:
            return []
        identity = await self.identity()
        runs = []
        for variant, version_id, digest in plan.versions:
            # scheduled replays start once per period; `at`, their end, moves with each replay's
            # duration
            started_at = time.time()
            replay = await replay_and_score(
                self.engine,
                digest,
                plan.items,
                plan.metric,
                max_tokens,
                answer_format=plan.answer_format,
                tenant=plan.tenant,
            )
            baseline = await run_in_threadpool(self._baseline_of, deployment_id, version_id)
            test = (
                None
                if baseline is None
                else await paired_test(baseline.scores, replay.scores, 0.0, 0.025)
            )
            replayed = _Replayed(
                deployment_id, variant, version_id, replay, baseline, test, identity, started_at
            )
            run = await run_in_threadpool(self._record_run, replayed)
            self._export_run(plan.tenant, plan.name, run)
            log.info("drift replay %s/%s %s: %s", plan.tenant, plan.name, variant, run.message)
            runs.append(run)
        return runs

    def _replay_plan(self, deployment_id: int) -> _ReplayPlan | None:
        with self.sessions() as session:
            deployment = session.get(Deployment, deployment_id)
            if deployment is None or deployment.validation_set is None:
                return None
            validation = deployment.validation_set
            items = read_items(self.validation_store.read(validation.digest))
            versions = [
                (variant, v.id, v.digest) for variant, v in live_versions(session, deployment)
            ]
            tenant = session.get_one(Tenant, deployment.tenant_id).name
            name, answer_format = deployment.name, deployment.answer_format
            return _ReplayPlan(items, validation.metric, versions, tenant, name, answer_format)

    def _baseline_of(self, deployment_id: int, version_id: int) -> ValidationRun | None:
        with self.sessions() as session:
            deployment = session.get(Deployment, deployment_id)
            return (
                None
                if deployment is None
                else _baseline(session, version_id, deployment.validation_set_id)
            )

    def _record_run(self, replayed: _Replayed) -> ValidationRun:
        replay, baseline, test = replayed.replay, replayed.baseline, replayed.test
        deployment_id, identity = replayed.deployment_id, replayed.engine
        mean, n = replay.mean, len(replay.scores)
        with self.sessions() as session:
            deployment = session.get(Deployment, deployment_id)
            run = ValidationRun(
                deployment_id=deployment_id,
                version_id=replayed.version_id,
                validation_set_id=deployment.validation_set_id,
                variant=replayed.variant,
                at=time.time(),
                started_at=replayed.started_at,
                engine=identity,
                score=mean,
                scores=replay.scores,
                outputs=replay.outputs,
                output_tokens=replay.tokens,
                confidences=replay.confidences,
                exact_match_rate=1.0,
            )
            if baseline is None or test is None:
                run.kind, run.message = (
                    "baseline",
                    f"baseline recorded: score {mean:.3f} on {n} items",
                )
            else:
                run.kind = "check"
                same = [a == b for a, b in zip(replay.outputs, baseline.outputs)]
                run.exact_match_rate = sum(same) / len(same)
                run.changed = not all(same)
                run.numbers = test.to_dict()
                if run.changed:
                    cause = (
                        f"the engine changed: was {baseline.engine!r}, now {identity!r}"
                        if baseline.engine != identity
                        else "the engine looks the same, so the adapter or base weights "
                        "changed on disk"
                    )
                    run.message = (
                        f"{len(same) - sum(same)}/{len(same)} answers differ from the baseline; "
                        f"score {mean:.3f} vs {baseline.score:.3f} "
                        f"({test.test} p={test.p:.2g}); {cause}"
                    )
                else:
                    run.message = f"unchanged: every answer equals the baseline (score {mean:.3f})"
            session.add(run)
            session.commit()
            return run

    def _export_run(self, tenant: str, deployment: str, run: ValidationRun) -> None:
        m = self.metrics
        m.validation_score.labels(tenant, deployment, run.variant).set(run.score)
        m.validation_exact_match.labels(tenant, deployment, run.variant).set(run.exact_match_rate)

    # --- input and output drift looks ---

    def _reference(self, digest: str) -> list[dict[str, float]]:
        if digest not in self._references:
            items = read_items(self.validation_store.read(digest))
            self._references[digest] = [request_features(item.messages) for item in items]
        return self._references[digest]

    def look(self, only: int | None = None) -> list[DriftCheck]:
        """One round of drift looks over every due deployment with a window of new samples;
        `only` looks at that deployment now, over whatever it has sampled."""
        pending: list[tuple[DriftCheck, str, str]] = []
        with self.sessions() as session:
            if only is None:
                due = self._claim("drift_look_at", self.settings.drift_look_s / 2)
            else:
                due = [only]
            for deployment in session.scalars(select(Deployment).where(Deployment.id.in_(due))):
                if deployment.validation_set is not None:
                    pending += self._looks_of(session, deployment, force=only is not None)
            if not pending:
                return []
            q = benjamini_hochberg(
                {
                    i: spent_p(c.p, c.look, self.settings.drift_alpha)
                    for i, (c, _, _) in enumerate(pending)
                }
            )
            for i, (check, tenant, name) in enumerate(pending):
                check.q, check.drifted = q[i], q[i] < self.settings.drift_alpha
                check.message = ("DRIFT " if check.drifted else "no drift: ") + check.message
                session.add(check)
                self._export_check(tenant, name, check)
            session.commit()
            return [c for c, _, _ in pending]

    def _looks_of(self, session: Session, deployment: Deployment, force: bool) -> list:
        assert deployment.validation_set is not None and deployment.validation_set_id is not None
        tenant = session.get_one(Tenant, deployment.tenant_id).name
        last = session.scalar(
            select(DriftCheck)
            .where(DriftCheck.deployment_id == deployment.id, DriftCheck.kind == "input")
            .order_by(DriftCheck.id.desc())
            .limit(1)
        )
        since = last.numbers.get("last_sample_id", 0) if last else 0
        window_n = self.settings.drift_window
        new = _count(session, InputSample.deployment_id == deployment.id, InputSample.id > since)
        if new < (2 if force else window_n):
            return []
        samples = list(
            session.scalars(
                select(InputSample)
                .where(InputSample.deployment_id == deployment.id)
                .order_by(InputSample.id.desc())
                .limit(window_n)
            )
        )
        stable = deployment.stable_id
        looks = (
            _last_look(
                session,
                DriftCheck.deployment_id == deployment.id,
                DriftCheck.kind == "input",
                DriftCheck.version_id == stable,
            )
            + 1
        )
        out = []
        reference = self._reference(deployment.validation_set.digest)
        window = [s.features for s in samples]
        try:
            result = input_drift(
                reference,
                window,
                looks,
                self.settings.drift_alpha,
                self.settings.drift_permutations,
            )
        except ValueError as exc:
            log.info("drift %s/%s: no input look: %s", tenant, deployment.name, exc)
        else:
            out.append(
                (
                    DriftCheck(
                        deployment_id=deployment.id,
                        version_id=stable,
                        variant="all",
                        kind="input",
                        at=time.time(),
                        look=looks,
                        p=result.p,
                        q=1.0,
                        drifted=False,
                        numbers={
                            "p_values": result.p_values,
                            "n_window": result.n_window,
                            "n_reference": result.n_reference,
                            "top": result.top,
                            "last_sample_id": samples[0].id,
                        },
                        message=result.message(),
                    ),
                    tenant,
                    deployment.name,
                )
            )
        out += self._output_looks(session, deployment, samples, tenant)
        out += self._confidence_looks(session, deployment, samples, tenant)
        return out

    def _output_looks(
        self, session: Session, deployment: Deployment, samples: list[InputSample], tenant: str
    ) -> list:
        assert deployment.validation_set_id is not None
        out = []
        check = answer_checker(deployment.answer_format) if deployment.answer_format else None
        for variant, version in live_versions(session, deployment):
            answered = [s for s in samples if s.variant == variant and s.ok]
            baseline = _baseline(session, version.id, deployment.validation_set_id)
            if baseline is None or len(answered) < MIN_OUTPUT_SAMPLES:
                continue
            p_values = {
                "ks:output_tokens": float(
                    stats.ks_2samp(
                        [s.output_tokens for s in answered], baseline.output_tokens
                    ).pvalue
                )
            }
            empty = sum(s.empty for s in answered)
            base_empty = sum(is_empty_or_refusal(o) for o in baseline.outputs)
            p_values["empty_rate"] = proportion_p(
                empty, len(answered), base_empty, len(baseline.outputs)
            )
            numbers = {
                "output_tokens_mean": sum(s.output_tokens for s in answered) / len(answered),
                "baseline_output_tokens_mean": sum(baseline.output_tokens)
                / len(baseline.output_tokens),
                "empty_rate": empty / len(answered),
                "baseline_empty_rate": base_empty / len(baseline.outputs),
                "n": len(answered),
            }
            checked = [s for s in answered if s.format_valid is not None]
            if check is not None and checked:
                invalid = sum(not s.format_valid for s in checked)
                base_invalid = sum(not check(o) for o in baseline.outputs)
                p_values["format_validity"] = proportion_p(
                    invalid, len(checked), base_invalid, len(baseline.outputs)
                )
                numbers.update(
                    format_validity=1 - invalid / len(checked),
                    baseline_format_validity=1 - base_invalid / len(baseline.outputs),
                )
            p = min(1.0, min(p_values.values()) * len(p_values))
            looks = (
                _last_look(
                    session,
                    DriftCheck.deployment_id == deployment.id,
                    DriftCheck.kind == "output",
                    DriftCheck.version_id == version.id,
                )
                + 1
            )
            top = min(p_values, key=lambda name: p_values[name])
            n = numbers
            message = (
                f"output of {variant}: p={p:.2g} (look {looks}); smallest {top} "
                f"p={p_values[top]:.2g}; mean tokens {n['output_tokens_mean']:.1f} vs "
                f"{n['baseline_output_tokens_mean']:.1f}, empty/refusal {n['empty_rate']:.2f} vs "
                f"{n['baseline_empty_rate']:.2f}"
            )
            if "format_validity" in n:
                message += (
                    f", format valid {n['format_validity']:.2f} vs "
                    f"{n['baseline_format_validity']:.2f}"
                )
            out.append(
                (
                    DriftCheck(
                        deployment_id=deployment.id,
                        version_id=version.id,
                        variant=variant,
                        kind="output",
                        at=time.time(),
                        look=looks,
                        p=p,
                        q=1.0,
                        drifted=False,
                        numbers={**numbers, "p_values": p_values},
                        message=message,
                    ),
                    tenant,
                    deployment.name,
                )
            )
        return out

    def _confidence_looks(
        self, session: Session, deployment: Deployment, samples: list[InputSample], tenant: str
    ) -> list:
        """Per live variant: the window's answer confidences against its baseline replay's.
        Baselines recorded before confidences were (their `confidences` is None) give no look."""
        assert deployment.validation_set_id is not None
        out = []
        for variant, version in live_versions(session, deployment):
            live = [
                s.confidence
                for s in samples
                if s.variant == variant and s.ok and s.confidence is not None
            ]
            baseline = _baseline(session, version.id, deployment.validation_set_id)
            reference = (
                [c for c in (baseline.confidences or []) if c is not None] if baseline else []
            )
            if not reference or len(live) < MIN_OUTPUT_SAMPLES:
                continue
            result = confidence_drift(live, reference)
            looks = (
                _last_look(
                    session,
                    DriftCheck.deployment_id == deployment.id,
                    DriftCheck.kind == "confidence",
                    DriftCheck.version_id == version.id,
                )
                + 1
            )
            numbers = {
                "confidence_mean": result.mean,
                "baseline_confidence_mean": result.baseline_mean,
                "shift": result.shift,
                "ks_statistic": result.statistic,
                "n": result.n,
                "n_baseline": result.n_baseline,
            }
            out.append(
                (
                    DriftCheck(
                        deployment_id=deployment.id,
                        version_id=version.id,
                        variant=variant,
                        kind="confidence",
                        at=time.time(),
                        look=looks,
                        p=result.p,
                        q=1.0,
                        drifted=False,
                        numbers=numbers,
                        message=result.message(variant, looks),
                    ),
                    tenant,
                    deployment.name,
                )
            )
        return out

    def _export_check(self, tenant: str, deployment: str, check: DriftCheck) -> None:
        m = self.metrics
        if check.kind == "input":
            m.input_drift_p.labels(tenant, deployment).set(check.p)
            m.input_drift_alarm.labels(tenant, deployment).set(float(check.drifted))
            return
        labels = (tenant, deployment, check.variant)
        if check.kind == "confidence":
            m.confidence_drift_p.labels(*labels).set(check.p)
            m.confidence_drift_alarm.labels(*labels).set(float(check.drifted))
            m.output_confidence_mean.labels(*labels).set(check.numbers["confidence_mean"])
            return
        m.output_drift_p.labels(*labels).set(check.p)
        m.output_drift_alarm.labels(*labels).set(float(check.drifted))
        m.output_tokens_mean.labels(*labels).set(check.numbers["output_tokens_mean"])
        m.output_empty_rate.labels(*labels).set(check.numbers["empty_rate"])
        if "format_validity" in check.numbers:
            m.output_format_validity.labels(*labels).set(check.numbers["format_validity"])

    # --- opt-out ---

    def forget(self, tenant_id: int) -> int:
        """Delete every stored sample of the tenant's deployments and drop its pending ones."""
        with self.sessions() as session:
            ids = list(
                session.scalars(select(Deployment.id).where(Deployment.tenant_id == tenant_id))
            )
            with self._reservoirs_lock:
                for deployment_id in ids:
                    self._reservoirs.pop(deployment_id, None)
            deleted = session.execute(
                delete(InputSample).where(InputSample.deployment_id.in_(ids))
            ).rowcount
            session.commit()
            return deleted

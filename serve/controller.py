"""The rollout controller: one idempotent reconcile per active rollout per tick, under a lease.

Each tick: flush this gateway's request samples to the catalog, then for every active rollout take (or
renew) its lease (a conditional UPDATE: the owner, or anyone once it expired), read a snapshot, decide with
pure code (`rollouts.plan`, `analysis.paired_gate`), and write the outcome once, checking that the row has not
changed since the snapshot. A restarted gateway resumes from the catalog; a second gateway waits for the
lease, so two processes never both act on one rollout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from sqlalchemy import func, insert, or_, select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import StaleDataError
from starlette.concurrency import run_in_threadpool

from adapters.catalog import Decision, Deployment, Rollout, RolloutSample, Tenant
from adapters.errors import ServiceUnavailable

from .analysis import Measurement, Status, VariantSamples, paired_gate
from .deps import Gateway
from .rollouts import ACTIVE, CanaryView, Phase, RolloutStart, Tick, apply_gate, apply_tick, plan, step_samples
from .validation import read_items, replay, score

__all__ = ["SampleBuffer", "RolloutController", "new_gateway_id"]

log = logging.getLogger("lorafleet.rollouts")

GATE_ERROR = "GateError"


def new_gateway_id() -> str:
    return f"{socket.gethostname()[:40]}-{uuid.uuid4().hex[:8]}"


class SampleBuffer:
    """Request samples of rollouts, kept in memory until the next flush (bounded: the oldest are dropped)."""

    def __init__(self, max_pending: int = 100_000) -> None:
        self.max_pending = max_pending
        self._pending: list[dict] = []
        self.dropped = 0

    def add(self, row: dict) -> None:
        if len(self._pending) >= self.max_pending:
            self._pending.pop(0)
            self.dropped += 1
        self._pending.append(row)

    def drain(self) -> list[dict]:
        rows, self._pending = self._pending, []
        return rows


@dataclass(frozen=True)
class _Snapshot:
    id: int
    revision: int
    phase: str
    tenant: str
    deployment: str
    view: CanaryView | None
    samples: dict[str, VariantSamples]
    variants: list[dict]
    validation_path: str | None
    metric: str | None


class RolloutController:
    def __init__(self, gateway: Gateway, owner: str, tick_s: float, lease_s: float) -> None:
        self.gateway, self.owner, self.tick_s, self.lease_s = gateway, owner, tick_s, lease_s
        self.samples = SampleBuffer()
        self._last_decision: int | None = None  # the last decision exported to the metrics

    @property
    def actor(self) -> str:
        return f"controller:{self.owner}"

    async def run(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # noqa: BLE001 - one bad tick must not stop the controller
                log.exception("rollout controller tick failed")
            await asyncio.sleep(self.tick_s)

    async def tick(self) -> None:
        await run_in_threadpool(self._flush)
        for rollout_id in await run_in_threadpool(self._active_ids):
            if await run_in_threadpool(self._lease, rollout_id):
                await self.reconcile(rollout_id)
        await run_in_threadpool(self._export_decisions)

    async def reconcile(self, rollout_id: int) -> None:
        snap = await run_in_threadpool(self._snapshot, rollout_id)
        if snap is None:
            return
        self._export(snap)
        if snap.phase == Phase.GATING:
            if not self.gateway.engine.up:
                log.info("rollout %s: waiting for the engine before the gate", rollout_id)
                return
            try:
                async with self._holding(rollout_id):
                    measurement, evidence = await self._gate(snap)
            except ServiceUnavailable as exc:  # the engine is restarting: try again next tick
                log.info("rollout %s: gate postponed: %s", rollout_id, exc.message)
                return
            except Exception as exc:  # noqa: BLE001 - a gate that cannot run refuses, with the reason
                log.exception("rollout %s: the gate failed", rollout_id)
                measurement = Measurement("validation", "gate", Status.ERROR, GATE_ERROR,
                                          f"the gate could not run: {type(exc).__name__}: {exc}")
                evidence = {}
            await self._write(snap, lambda s, r: apply_gate(s, r, measurement, evidence, self.actor, time.time()))
        elif snap.phase == Phase.PROGRESSING:
            tick = plan(snap.view, snap.samples, time.time())
            if tick is None:
                return
            canary_requests = snap.samples["canary"].requests if "canary" in snap.samples else 0
            if await self._write(snap, lambda s, r: apply_tick(s, r, tick, canary_requests, self.actor, time.time())):
                self._export_tick(snap, tick)
                log.info("rollout %s (%s/%s): %s %s: %s", rollout_id, snap.tenant, snap.deployment, tick.action,
                         tick.reason, tick.message)

    def release(self) -> None:
        """Save pending samples and give up our leases (at shutdown), so another gateway takes over at once."""
        self._flush()
        with self.gateway.sessions() as session:
            session.execute(update(Rollout).where(Rollout.lease_owner == self.owner).values(lease_expires=0.0))
            session.commit()

    # --- database steps (run in the thread pool) ---

    def _flush(self) -> None:
        rows = self.samples.drain()
        if rows:
            with self.gateway.sessions() as session:
                session.execute(insert(RolloutSample), rows)
                session.commit()

    def _active_ids(self) -> list[int]:
        with self.gateway.sessions() as session:
            return list(session.scalars(select(Rollout.id).where(Rollout.phase.in_(list(ACTIVE)))))

    def _lease(self, rollout_id: int) -> bool:
        now = time.time()
        with self.gateway.sessions() as session:
            result = session.execute(
                update(Rollout).where(Rollout.id == rollout_id, Rollout.phase.in_(list(ACTIVE)),
                                      or_(Rollout.lease_owner == self.owner, Rollout.lease_owner.is_(None),
                                          Rollout.lease_expires < now))
                .values(lease_owner=self.owner, lease_expires=now + self.lease_s)
                .execution_options(synchronize_session=False))
            session.commit()
            return result.rowcount == 1

    def _snapshot(self, rollout_id: int) -> _Snapshot | None:
        with self.gateway.sessions() as session:
            rollout = session.get(Rollout, rollout_id)
            if rollout is None or rollout.phase not in ACTIVE:
                return None
            deployment = rollout.deployment
            tenant = session.get(Tenant, deployment.tenant_id).name
            view, samples = None, {}
            if rollout.kind == "canary":
                view = CanaryView(rollout.step_index, rollout.steps, rollout.looks, rollout.step_started_at,
                                  rollout.last_look_at, rollout.last_look_requests,
                                  RolloutStart.model_validate(rollout.params))
                if rollout.phase == Phase.PROGRESSING:
                    samples = step_samples(session, rollout.id, rollout.step_index)
            validation = deployment.validation_set
            path = str(self.gateway.validation_store.path(validation.digest)) if validation else None
            return _Snapshot(rollout.id, rollout.revision, rollout.phase, tenant, deployment.name, view, samples,
                             rollout.variants, path, validation.metric if validation else None)

    async def _write(self, snap: _Snapshot, change: Callable[[Session, Rollout], None]) -> bool:
        """Apply `change` once, only if the rollout is still the one the decision was made on."""
        def write() -> bool:
            with self.gateway.sessions() as session:
                rollout = session.get(Rollout, snap.id)
                if rollout is None or rollout.revision != snap.revision or rollout.lease_owner != self.owner:
                    log.info("rollout %s changed during the tick; deciding again next tick", snap.id)
                    return False
                try:
                    change(session, rollout)
                except StaleDataError:
                    session.rollback()
                    log.info("rollout %s changed while writing; deciding again next tick", snap.id)
                    return False
                return True

        return await run_in_threadpool(write)

    @contextlib.asynccontextmanager
    async def _holding(self, rollout_id: int) -> AsyncIterator[None]:
        """Keep renewing the lease while a long step (the gate) runs."""
        async def renew() -> None:
            while True:
                await asyncio.sleep(self.lease_s / 3)
                await run_in_threadpool(self._lease, rollout_id)

        task = asyncio.create_task(renew())
        try:
            yield
        finally:
            task.cancel()

    # --- the gate: the validation set through the engine, both versions, greedy ---

    async def _gate(self, snap: _Snapshot) -> tuple[Measurement, dict]:
        params = snap.view.params
        canary, stable = snap.variants
        items = await run_in_threadpool(read_items, snap.validation_path)
        engine, store = self.gateway.engine, self.gateway.store
        outputs = {}
        for variant in (stable, canary):
            await engine.ensure_loaded(variant["digest"], store.local_path(variant["digest"]))
            outputs[variant["label"]] = await replay(engine, variant["digest"], items, params.gate_max_tokens)
        scores = {label: score(texts, items, snap.metric) for label, texts in outputs.items()}
        measurement = paired_gate(scores["stable"], scores["canary"], params.margin, params.alpha)
        disagreements = [{"item": i, "stable": outputs["stable"][i][:200], "candidate": outputs["canary"][i][:200],
                          "answer": items[i].answer[:200]}
                         for i in range(len(items)) if scores["stable"][i] != scores["canary"][i]][:20]
        evidence = {"metric": snap.metric, "items": len(items), "stable_scores": scores["stable"],
                    "candidate_scores": scores["canary"], "disagreements": disagreements}
        log.info("rollout %s gate: %s", snap.id, measurement.message)
        return measurement, evidence

    # --- metrics ---

    def _export(self, snap: _Snapshot) -> None:
        m = self.gateway.metrics
        for phase in Phase:
            m.rollout_phase.labels(snap.tenant, snap.deployment, phase.value).set(float(phase == snap.phase))
        if snap.view is not None:
            weight = snap.view.steps[snap.view.step_index] if snap.view.step_index >= 0 else 0.0
            m.rollout_step.labels(snap.tenant, snap.deployment).set(snap.view.step_index)
            m.rollout_weight.labels(snap.tenant, snap.deployment).set(weight)

    def _export_tick(self, snap: _Snapshot, tick: Tick) -> None:
        for measurement in tick.measurements:
            if measurement.metric == "sample_ratio" and measurement.p is not None:
                self.gateway.metrics.rollout_srm_p.labels(snap.tenant, snap.deployment).set(measurement.p)

    def _export_decisions(self) -> None:
        """Count every decision recorded since the last tick (the controller's and users' commands alike) and
        set the phase gauge of its rollout, so that aborts and rollbacks reach the alert rules."""
        m = self.gateway.metrics
        with self.gateway.sessions() as session:
            if self._last_decision is None:  # at start: count from now on, not the catalog's history
                self._last_decision = session.scalar(select(func.max(Decision.id))) or 0
                return
            query = (select(Decision, Deployment.name, Tenant.name).join(Deployment, Deployment.id ==
                                                                         Decision.deployment_id)
                     .join(Tenant, Tenant.id == Deployment.tenant_id).where(Decision.id > self._last_decision)
                     .order_by(Decision.id))
            for decision, deployment, tenant in session.execute(query):
                m.rollout_decisions.labels(tenant, deployment, decision.action, decision.reason).inc()
                if decision.rollout is not None:
                    for phase in Phase:
                        m.rollout_phase.labels(tenant, deployment, phase.value).set(
                            float(phase == decision.rollout.phase))
                self._last_decision = decision.id

"""The rollout controller: one idempotent reconcile per active rollout per tick, under a lease.

Each tick: flush this gateway's request samples to the catalog, then for every active rollout take
(or renew) its lease (a conditional UPDATE: the owner, or anyone once it expired), read a snapshot,
decide with pure code (`state.plan_tick`, `statistics.paired_gate`), and write the outcome once,
checking that the row has not changed since the snapshot. A restarted gateway resumes from the
catalog; a second gateway waits for the lease, so two processes never both act on one rollout. A
validation gate runs as a task of its own (renewing its lease), so a long gate never holds up the
other rollouts' ticks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from sqlalchemy import func, insert, or_, select, update
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm.exc import StaleDataError
from starlette.concurrency import run_in_threadpool

from lorafleet.adapters.catalog import Decision, Deployment, Rollout, RolloutSample, Tenant
from lorafleet.adapters.store import BlobStorage
from lorafleet.errors import ServiceUnavailable
from lorafleet.serve.engine.client import Engines
from lorafleet.serve.metrics import Metrics
from lorafleet.serve.rollouts.gate import GateProgress, run_gate
from lorafleet.serve.rollouts.phases import ACTIVE, Phase
from lorafleet.serve.rollouts.state import (
    CanaryView,
    RolloutStart,
    Tick,
    apply_gate,
    apply_tick,
    plan_tick,
    rollout_feedback,
    step_samples,
    with_feedback,
)
from lorafleet.serve.rollouts.statistics import Measurement, Status, VariantSamples
from lorafleet.serve.types import Answer, RolloutAssignment
from lorafleet.serve.validation import read_items

__all__ = ["SampleBuffer", "RolloutController", "new_gateway_id"]

log = logging.getLogger("lorafleet.rollouts")

GATE_ERROR = "GateError"


def new_gateway_id() -> str:
    return f"{socket.gethostname()[:40]}-{uuid.uuid4().hex[:8]}"


class SampleBuffer:
    """Request samples of rollouts, kept in memory until the next flush (bounded: the oldest are
    dropped)."""

    def __init__(self, max_pending: int = 100_000) -> None:
        self.max_pending = max_pending
        self._pending: deque[dict] = deque()
        # requests add on the event loop, the flush drains in a worker thread
        self._lock = threading.Lock()

    def add(
        self, assignment: RolloutAssignment, answer: Answer, latency_s: float, at: float
    ) -> None:
        """One request a rollout measured; an engine that did not answer says nothing of the
        adapter, and a 4xx is the client's: only a 5xx counts against its variant."""
        row = {
            "rollout_id": assignment.rollout_id,
            "step_index": assignment.step_index,
            "variant": assignment.variant,
            "unit": assignment.unit,
            "ok": answer.status < 500,
            "latency_s": latency_s,
            "output_tokens": answer.output_tokens,
            "format_valid": answer.format_valid,
            "confidence": answer.confidence,
            "at": at,
        }
        with self._lock:
            if len(self._pending) >= self.max_pending:
                self._pending.popleft()
            self._pending.append(row)

    def drain(self) -> list[dict]:
        with self._lock:
            rows, self._pending = list(self._pending), deque()
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
    validation_digest: str | None
    metric: str | None
    answer_format: dict | None  # the deployment's: enforced in the gate's replays where it is


class RolloutController:
    """Reconciles every active rollout of the catalog that this gateway holds the lease of."""

    def __init__(
        self,
        sessions: sessionmaker,
        engine: Engines,
        validation_store: BlobStorage,
        metrics: Metrics,
        owner: str,
        tick_s: float,
        lease_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`clock`: the time leases are taken and renewed at (a test's fake clock)."""
        self.clock = clock
        self.sessions, self.engine, self.validation_store, self.metrics = (
            sessions,
            engine,
            validation_store,
            metrics,
        )
        self.owner, self.tick_s, self.lease_s = owner, tick_s, lease_s
        self.samples = SampleBuffer()
        self._gates: dict[int, asyncio.Task] = {}  # rollout id -> its running validation gate
        # rollout id -> how far its gate is, while this gateway runs it
        self.gate_progress: dict[int, GateProgress] = {}
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
            self._start_gate(snap)
        elif snap.phase == Phase.PROGRESSING:
            assert snap.view is not None
            tick = plan_tick(snap.view, snap.samples, time.time())
            if tick is None:
                return
            canary_requests = snap.samples["canary"].requests if "canary" in snap.samples else 0
            if await self._write(
                snap, lambda s, r: apply_tick(s, r, tick, canary_requests, self.actor, time.time())
            ):
                self._export_tick(snap, tick)
                log.info(
                    "rollout %s (%s/%s): %s %s: %s",
                    rollout_id,
                    snap.tenant,
                    snap.deployment,
                    tick.action,
                    tick.reason,
                    tick.message,
                )

    def _start_gate(self, snap: _Snapshot) -> None:
        """Run the rollout's gate in a task of its own, unless it already runs or the engine is
        down."""
        running = self._gates.get(snap.id)
        if running is not None and not running.done():
            return
        if not self.engine.up:
            log.info("rollout %s: waiting for the engine before the gate", snap.id)
            return
        self._gates[snap.id] = asyncio.create_task(self._gate(snap), name=f"rollout-{snap.id}-gate")

    async def _gate(self, snap: _Snapshot) -> None:
        try:
            try:
                async with self._holding(snap.id):
                    measurement, evidence = await self._measure_gate(snap)
            except ServiceUnavailable as exc:  # the engine is restarting: try again next tick
                log.info("rollout %s: gate postponed: %s", snap.id, exc.message)
                return
            except Exception as exc:  # noqa: BLE001 - a gate that cannot run refuses, with the reason
                log.exception("rollout %s: the gate failed", snap.id)
                measurement = Measurement(
                    "validation",
                    "gate",
                    Status.ERROR,
                    GATE_ERROR,
                    f"the gate could not run: {type(exc).__name__}: {exc}",
                )
                evidence = {}
            log.info("rollout %s gate: %s", snap.id, measurement.message)
            await self._write(
                snap, lambda s, r: apply_gate(s, r, measurement, evidence, self.actor, time.time())
            )
        # only now may a tick start another gate of this rollout (if this one did not decide)
        finally:
            self._gates.pop(snap.id, None)
            self.gate_progress.pop(snap.id, None)

    async def _measure_gate(self, snap: _Snapshot) -> tuple[Measurement, dict]:
        assert (
            snap.view is not None and snap.validation_digest is not None and snap.metric is not None
        )
        items = read_items(
            await run_in_threadpool(self.validation_store.read, snap.validation_digest)
        )
        canary, stable = snap.variants
        progress = self.gate_progress[snap.id] = GateProgress(total=2 * len(items))
        return await run_gate(
            self.engine,
            items,
            snap.metric,
            stable["digest"],
            canary["digest"],
            snap.view.params,
            progress,
            snap.answer_format,
            snap.tenant,
        )

    async def stop(self) -> None:
        """At shutdown: cancel running gates (another gateway reruns them), save samples, give up
        the leases."""
        for task in list(self._gates.values()):
            task.cancel()
        await asyncio.gather(*self._gates.values(), return_exceptions=True)
        await run_in_threadpool(self.release)

    def release(self) -> None:
        """Save pending samples and give up our leases (at shutdown), so another gateway takes
        over at once."""
        self._flush()
        with self.sessions() as session:
            session.execute(
                update(Rollout).where(Rollout.lease_owner == self.owner).values(lease_expires=0.0)
            )
            session.commit()

    # --- database steps (run in the thread pool) ---

    def _flush(self) -> None:
        rows = self.samples.drain()
        if rows:
            with self.sessions() as session:
                session.execute(insert(RolloutSample), rows)
                session.commit()

    def _active_ids(self) -> list[int]:
        with self.sessions() as session:
            return list(session.scalars(select(Rollout.id).where(Rollout.phase.in_(list(ACTIVE)))))

    def _lease(self, rollout_id: int) -> bool:
        now = self.clock()
        with self.sessions() as session:
            result = session.execute(
                update(Rollout)
                .where(
                    Rollout.id == rollout_id,
                    Rollout.phase.in_(list(ACTIVE)),
                    or_(
                        Rollout.lease_owner == self.owner,
                        Rollout.lease_owner.is_(None),
                        Rollout.lease_expires < now,
                    ),
                )
                .values(lease_owner=self.owner, lease_expires=now + self.lease_s)
                .execution_options(synchronize_session=False)
            )
            session.commit()
            return result.rowcount == 1

    def _snapshot(self, rollout_id: int) -> _Snapshot | None:
        with self.sessions() as session:
            rollout = session.get(Rollout, rollout_id)
            if rollout is None or rollout.phase not in ACTIVE:
                return None
            deployment = rollout.deployment
            tenant = session.get(Tenant, deployment.tenant_id).name
            view, samples = None, {}
            if rollout.kind == "canary":
                view = CanaryView(
                    rollout.step_index,
                    rollout.steps,
                    rollout.looks,
                    rollout.step_started_at,
                    rollout.last_look_at,
                    rollout.last_look_requests,
                    RolloutStart.model_validate(rollout.params),
                )
                # this step's requests, the whole rollout's feedback
                if rollout.phase == Phase.PROGRESSING:
                    samples = with_feedback(
                        step_samples(session, rollout.id, rollout.step_index),
                        rollout_feedback(session, rollout.id),
                    )
            validation = deployment.validation_set
            return _Snapshot(
                rollout.id,
                rollout.revision,
                rollout.phase,
                tenant,
                deployment.name,
                view,
                samples,
                rollout.variants,
                validation.digest if validation else None,
                validation.metric if validation else None,
                deployment.answer_format,
            )

    async def _write(self, snap: _Snapshot, change: Callable[[Session, Rollout], None]) -> bool:
        """Apply `change` once, only if the rollout is still the one the decision was made on."""

        def write() -> bool:
            with self.sessions() as session:
                rollout = session.get(Rollout, snap.id)
                if (
                    rollout is None
                    or rollout.revision != snap.revision
                    or rollout.lease_owner != self.owner
                ):
                    log.info(
                        "rollout %s changed during the tick; deciding again next tick", snap.id
                    )
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

    # --- metrics ---

    def _export(self, snap: _Snapshot) -> None:
        m = self.metrics
        for phase in Phase:
            m.rollout_phase.labels(snap.tenant, snap.deployment, phase.value).set(
                float(phase == snap.phase)
            )
        if snap.view is not None:
            weight = snap.view.steps[snap.view.step_index] if snap.view.step_index >= 0 else 0.0
            m.rollout_step.labels(snap.tenant, snap.deployment).set(snap.view.step_index)
            m.rollout_weight.labels(snap.tenant, snap.deployment).set(weight)

    def _export_tick(self, snap: _Snapshot, tick: Tick) -> None:
        for measurement in tick.measurements:
            if measurement.metric == "sample_ratio" and measurement.p is not None:
                self.metrics.rollout_srm_p.labels(snap.tenant, snap.deployment).set(measurement.p)

    def _export_decisions(self) -> None:
        """Count every decision recorded since the last tick (the controller's and users'
        commands alike) and set the phase gauge of its rollout, so that aborts and rollbacks
        reach the alert rules."""
        m = self.metrics
        with self.sessions() as session:
            # at start: count from now on, not the catalog's history
            if self._last_decision is None:
                self._last_decision = session.scalar(select(func.max(Decision.id))) or 0
                return
            query = (
                select(Decision, Deployment.name, Tenant.name)
                .join(Deployment, Deployment.id == Decision.deployment_id)
                .join(Tenant, Tenant.id == Deployment.tenant_id)
                .where(Decision.id > self._last_decision)
                .order_by(Decision.id)
            )
            for decision, deployment, tenant in session.execute(query):
                m.rollout_decisions.labels(
                    tenant, deployment, decision.action, decision.reason
                ).inc()
                if decision.rollout is not None:
                    for phase in Phase:
                        m.rollout_phase.labels(tenant, deployment, phase.value).set(
                            float(phase == decision.rollout.phase)
                        )
                self._last_decision = decision.id

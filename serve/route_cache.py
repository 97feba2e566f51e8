"""The hot path's view of the catalog: (API key, deployment name) -> the tenant and where its
requests go.

Every chat request needs both. Read from the catalog per request they were the largest part of the
gateway's own CPU (SQLAlchemy statements, lazy loads, a thread hand-off), so they are kept as
immutable snapshots: dropped on every catalog commit made by this process (a SQLAlchemy session
event, so no write path can forget it) and, for changes made by another gateway process on the same
catalog, `ttl_s` after they were read. Failed lookups (unknown key or deployment) are never kept.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

from sqlalchemy import event, select
from sqlalchemy.orm import ORMExecuteState, Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from lorafleet.adapters.catalog import Budget, Tenant, TenantPolicy
from lorafleet.adapters.registry import get_deployment, hash_key
from lorafleet.adapters.tenants import authenticate_key, check_not_expired, get_tenant
from lorafleet.serve.limits import Limits
from lorafleet.serve.rollouts.routing import Variant
from lorafleet.serve.rollouts.state import routing_table, serving_rollout
from lorafleet.serve.usage import periods
from lorafleet.serve.usage.prices import Prices

__all__ = ["RouteCache", "TenantEntry", "DeploymentEntry", "RolloutEntry", "ROUTE_NEUTRAL"]

_MAX_ENTRIES = 10_000  # (key, deployment) pairs; past this the cache starts over
# session.info flag: this session's commits change no route (key usage)
ROUTE_NEUTRAL = "lorafleet_route_neutral"


@dataclass(frozen=True)
class TenantEntry:
    id: int
    name: str
    sample_inputs: bool
    key_id: int = 0
    key_expires_at: float | None = None
    limits: Limits | None = None  # effective: the defaults with the tenant's own values
    prices: Prices | None = None  # likewise
    budgets: tuple[periods.Budget, ...] = ()

    def check_live(self, now: float) -> None:
        """A snapshot outlives its key's expiry only until that moment."""
        check_not_expired(self.key_expires_at, now)


@dataclass(frozen=True)
class RolloutEntry:
    """A rollout whose routing table is in effect."""

    id: int
    salt: str
    step_index: int
    variants: tuple[Variant, ...]


@dataclass(frozen=True)
class DeploymentEntry:
    id: int
    name: str
    stable_digest: str
    answer_format: dict | None
    validation_set_id: int | None
    rollout: RolloutEntry | None
    capture: dict | None = None  # the deployment's capture policy (None: off)
    objective: str | None = None  # the InferenceObjective the admin gave it (None: the default)


class RouteCache:
    """Snapshots of (tenant, deployment) per (key, deployment name), invalidated when the catalog
    changes."""

    def __init__(
        self,
        sessions: sessionmaker,
        ttl_s: float,
        defaults: Limits | None = None,
        prices: Prices | None = None,
    ) -> None:
        self.sessions = sessions
        self.ttl_s = ttl_s
        self.defaults = defaults
        self.prices = prices
        # key id -> when it last authenticated (written to the catalog in batches)
        self.used: dict[int, float] = {}
        self._entries: dict[tuple[str, str], tuple[float, TenantEntry, DeploymentEntry]] = {}
        self._tenants: dict[str, tuple[float, TenantEntry]] = {}
        self._deployments: dict[tuple[str, str], tuple[float, DeploymentEntry]] = {}
        self._generation = 0  # bumped by every invalidation: a read that raced one is not kept
        self._lock = threading.Lock()
        self._in_flight: dict[tuple[str, str], asyncio.Future] = {}
        event.listen(sessions, "after_flush", _mark_changed)
        event.listen(sessions, "do_orm_execute", _mark_bulk_change)
        event.listen(sessions, "after_commit", self._after_commit)

    def get(self, key: str, model: str) -> tuple[TenantEntry, DeploymentEntry] | None:
        """The snapshot if one is fresh; None means: call `load` (it reads the catalog, so off
        the event loop)."""
        hit = self._entries.get((hash_key(key), model))
        if hit is None or time.monotonic() - hit[0] > self.ttl_s:
            return None
        hit[1].check_live(time.time())
        return hit[1], hit[2]

    async def tenant(self, key: str) -> TenantEntry:
        """On the event loop: the tenant of a live key (read in a worker thread on a miss), or
        Unauthorized."""
        now = time.time()
        hit = self._tenants.get(hash_key(key))
        entry = hit[1] if hit is not None and time.monotonic() - hit[0] <= self.ttl_s else None
        if entry is None:
            entry = await run_in_threadpool(self.load_tenant, key)
        entry.check_live(now)
        self.used[entry.key_id] = now
        return entry

    def load_tenant(self, key: str) -> TenantEntry:
        generation, read_at = self._generation, time.monotonic()
        with self.sessions() as session:
            entry = self._tenant_entry(session, key)
        with self._lock:
            if generation == self._generation:
                if len(self._tenants) >= _MAX_ENTRIES:
                    self._tenants.clear()
                self._tenants[hash_key(key)] = (read_at, entry)
        return entry

    async def tenant_named(self, name: str) -> TenantEntry:
        """The tenant the admin acts for (`X-Lorafleet-Tenant`), read from the catalog (admin
        reads are rare); NotFound for an unknown name. A disabled tenant can still be looked at
        and acted for."""
        return await run_in_threadpool(self._tenant_named, name)

    def _tenant_named(self, name: str) -> TenantEntry:
        with self.sessions() as session:
            tenant = get_tenant(session, name)
            policy = session.get(TenantPolicy, tenant.id)
            return TenantEntry(
                tenant.id,
                tenant.name,
                tenant.sample_inputs,
                limits=self._limits(policy),
                prices=self._prices(policy),
                budgets=_budgets(session, tenant.id),
            )

    def _tenant_entry(self, session: Session, key: str) -> TenantEntry:
        tenant, api_key, policy = authenticate_key(session, key)
        return TenantEntry(
            tenant.id,
            tenant.name,
            tenant.sample_inputs,
            api_key.id,
            api_key.expires_at,
            self._limits(policy),
            self._prices(policy),
            _budgets(session, tenant.id),
        )

    def _limits(self, policy: TenantPolicy | None) -> Limits | None:
        return (
            self.defaults.overridden(policy.limits if policy else None) if self.defaults else None
        )

    def _prices(self, policy: TenantPolicy | None) -> Prices | None:
        return self.prices.overridden(policy.prices if policy else None) if self.prices else None

    async def fetch(self, key: str, model: str) -> tuple[TenantEntry, DeploymentEntry]:
        """On the event loop: the snapshot, read in a worker thread on a miss; concurrent misses
        of one (key, deployment) share a single read (an expiry under load would otherwise send
        every client to the catalog)."""
        hit = self.get(key, model)
        if hit is not None:
            return hit
        flight = (hash_key(key), model)
        if (pending := self._in_flight.get(flight)) is None:
            pending = self._in_flight[flight] = asyncio.ensure_future(
                run_in_threadpool(self.load, key, model)
            )
            pending.add_done_callback(lambda _: self._in_flight.pop(flight, None))
        return await asyncio.shield(pending)

    def load(self, key: str, model: str) -> tuple[TenantEntry, DeploymentEntry]:
        """Read and keep the snapshot; raises Unauthorized / NotFound as the catalog lookups do."""
        generation, read_at = self._generation, time.monotonic()
        with self.sessions() as session:
            tenant_entry = self._tenant_entry(session, key)
            entry = (tenant_entry, _deployment_entry(session, tenant_entry.id, model))
        with self._lock:
            if generation == self._generation:
                if len(self._entries) >= _MAX_ENTRIES:
                    self._entries.clear()
                self._entries[(hash_key(key), model)] = (read_at, *entry)
        return entry

    async def deployment_of(self, tenant_id: int, model: str) -> DeploymentEntry:
        """The tenant's deployment named `model`, as the chat path sees it, for work that runs
        without an API key (a batch's lines); NotFound for any other name. Read from the catalog
        in a worker thread, kept as the key's snapshots are."""
        cache_key = (f"tenant:{tenant_id}", model)
        hit = self._deployments.get(cache_key)
        if hit is not None and time.monotonic() - hit[0] <= self.ttl_s:
            return hit[1]
        generation, read_at = self._generation, time.monotonic()

        def read() -> DeploymentEntry:
            with self.sessions() as session:
                return _deployment_entry(session, tenant_id, model)

        entry = await run_in_threadpool(read)
        with self._lock:
            if generation == self._generation:
                if len(self._deployments) >= _MAX_ENTRIES:
                    self._deployments.clear()
                self._deployments[cache_key] = (read_at, entry)
        return entry

    def invalidate(self) -> None:
        with self._lock:
            self._generation += 1
            self._entries.clear()
            self._tenants.clear()
            self._deployments.clear()

    def _after_commit(self, session: Session) -> None:
        if session.info.pop("lorafleet_changed", False) and not session.info.get(ROUTE_NEUTRAL):
            self.invalidate()


def _budgets(session: Session, tenant_id: int) -> tuple[periods.Budget, ...]:
    rows = session.scalars(
        select(Budget).where(Budget.tenant_id == tenant_id).order_by(Budget.period)
    )
    return tuple(
        periods.Budget(row.period, row.tokens, row.cost, row.alert_at)  # type: ignore[arg-type]
        for row in rows
    )


def _deployment_entry(session: Session, tenant_id: int, model: str) -> DeploymentEntry:
    deployment = get_deployment(session, session.get_one(Tenant, tenant_id), model)
    rollout = serving_rollout(session, deployment)
    return DeploymentEntry(
        deployment.id,
        deployment.name,
        deployment.stable.digest,
        deployment.answer_format,
        deployment.validation_set_id,
        None
        if rollout is None
        else RolloutEntry(
            rollout.id, rollout.salt, rollout.step_index, tuple(routing_table(rollout))
        ),
        deployment.capture,
        deployment.objective,
    )


def _mark_changed(session: Session, _flush_context: object) -> None:
    session.info["lorafleet_changed"] = True


def _mark_bulk_change(state: ORMExecuteState) -> None:
    if state.is_update or state.is_delete or state.is_insert:
        state.session.info["lorafleet_changed"] = True

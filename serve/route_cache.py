"""The hot path's view of the catalog: (API key, deployment name) -> the tenant and where its requests go.

Every chat request needs both. Read from the catalog per request they were the largest part of the gateway's
own CPU (SQLAlchemy statements, lazy loads, a thread hand-off), so they are kept as immutable snapshots:
dropped on every catalog commit made by this process (a SQLAlchemy session event, so no write path can forget
it) and, for changes made by another gateway process on the same catalog, `ttl_s` after they were read.
Failed lookups (unknown key or deployment) are never kept.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

from sqlalchemy import event
from sqlalchemy.orm import ORMExecuteState, Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from lorafleet.adapters.registry import authenticate, get_deployment, hash_key
from lorafleet.serve.rollouts.routing import Variant
from lorafleet.serve.rollouts.state import routing_table, serving_rollout

__all__ = ["RouteCache", "TenantEntry", "DeploymentEntry", "RolloutEntry"]

_MAX_ENTRIES = 10_000  # (key, deployment) pairs; past this the cache starts over


@dataclass(frozen=True)
class TenantEntry:
    id: int
    name: str
    sample_inputs: bool


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


class RouteCache:
    """Snapshots of (tenant, deployment) per (key, deployment name), invalidated when the catalog changes."""

    def __init__(self, sessions: sessionmaker, ttl_s: float) -> None:
        self.sessions = sessions
        self.ttl_s = ttl_s
        self._entries: dict[tuple[str, str], tuple[float, TenantEntry, DeploymentEntry]] = {}
        self._generation = 0  # bumped by every invalidation: a read that raced one is not kept
        self._lock = threading.Lock()
        self._in_flight: dict[tuple[str, str], asyncio.Future] = {}
        event.listen(sessions, "after_flush", _mark_changed)
        event.listen(sessions, "do_orm_execute", _mark_bulk_change)
        event.listen(sessions, "after_commit", self._after_commit)

    def get(self, key: str, model: str) -> tuple[TenantEntry, DeploymentEntry] | None:
        """The snapshot if one is fresh; None means: call `load` (it reads the catalog, so off the event loop)."""
        hit = self._entries.get((hash_key(key), model))
        if hit is None or time.monotonic() - hit[0] > self.ttl_s:
            return None
        return hit[1], hit[2]

    async def fetch(self, key: str, model: str) -> tuple[TenantEntry, DeploymentEntry]:
        """On the event loop: the snapshot, read in a worker thread on a miss; concurrent misses of one (key,
        deployment) share a single read (an expiry under load would otherwise send every client to the catalog)."""
        hit = self.get(key, model)
        if hit is not None:
            return hit
        flight = (hash_key(key), model)
        if (pending := self._in_flight.get(flight)) is None:
            pending = self._in_flight[flight] = asyncio.ensure_future(run_in_threadpool(self.load, key, model))
            pending.add_done_callback(lambda _: self._in_flight.pop(flight, None))
        return await asyncio.shield(pending)

    def load(self, key: str, model: str) -> tuple[TenantEntry, DeploymentEntry]:
        """Read and keep the snapshot; raises Unauthorized / NotFound as the catalog lookups do."""
        generation, read_at = self._generation, time.monotonic()
        with self.sessions() as session:
            tenant = authenticate(session, key)
            deployment = get_deployment(session, tenant, model)
            rollout = serving_rollout(session, deployment)
            entry = (TenantEntry(tenant.id, tenant.name, tenant.sample_inputs),
                     DeploymentEntry(deployment.id, deployment.name, deployment.stable.digest,
                                     deployment.answer_format, deployment.validation_set_id,
                                     None if rollout is None else RolloutEntry(
                                         rollout.id, rollout.salt, rollout.step_index, tuple(routing_table(rollout)))))
        with self._lock:
            if generation == self._generation:
                if len(self._entries) >= _MAX_ENTRIES:
                    self._entries.clear()
                self._entries[(hash_key(key), model)] = (read_at, *entry)
        return entry

    def invalidate(self) -> None:
        with self._lock:
            self._generation += 1
            self._entries.clear()

    def _after_commit(self, session: Session) -> None:
        if session.info.pop("lorafleet_changed", False):
            self.invalidate()


def _mark_changed(session: Session, _flush_context: object) -> None:
    session.info["lorafleet_changed"] = True


def _mark_bulk_change(state: ORMExecuteState) -> None:
    if state.is_update or state.is_delete or state.is_insert:
        state.session.info["lorafleet_changed"] = True

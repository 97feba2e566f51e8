"""Fleet-wide leases: a job that must run once at a time across every gateway takes its row first.

The claim is one conditional UPDATE (held by nobody, by us, or expired), which both SQLite and
PostgreSQL apply atomically; the row is created on first use (a unique name: a concurrent creator
makes the other's insert fail).
"""

from __future__ import annotations

import time

from sqlalchemy import or_, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker

from lorafleet.adapters.catalog import Lease

__all__ = ["take_lease", "release_lease", "finish_lease"]


def take_lease(
    sessions: sessionmaker, name: str, owner: str, ttl_s: float, every_s: float = 0.0
) -> bool:
    """Take (or renew) lease `name` for `ttl_s` seconds; False if another holder's lease is still
    valid, or the job last finished less than `every_s` seconds ago (so N gateways run a periodic
    job once per period)."""
    now = time.time()
    with sessions() as session:
        result = session.execute(
            update(Lease)
            .where(
                Lease.name == name,
                or_(Lease.owner == owner, Lease.expires_at < now),
                Lease.last_run_at <= now - every_s,
            )
            .values(owner=owner, expires_at=now + ttl_s)
            .execution_options(synchronize_session=False)
        )
        session.commit()
        if result.rowcount == 1:
            return True
        if session.get(Lease, name) is not None:
            return False
        session.add(Lease(name=name, owner=owner, expires_at=now + ttl_s, last_run_at=0.0))
        try:
            session.commit()
        except IntegrityError:
            session.rollback()
            return False
        return True


def finish_lease(sessions: sessionmaker, name: str, owner: str) -> None:
    """Record a finished run and give the lease up."""
    _end(sessions, name, owner, {"expires_at": 0.0, "last_run_at": time.time()})


def release_lease(sessions: sessionmaker, name: str, owner: str) -> None:
    """Give the lease up without recording a run (e.g. the job failed; another may try at once)."""
    _end(sessions, name, owner, {"expires_at": 0.0})


def _end(sessions: sessionmaker, name: str, owner: str, values: dict) -> None:
    with sessions() as session:
        session.execute(
            update(Lease)
            .where(Lease.name == name, Lease.owner == owner)
            .values(values)
            .execution_options(synchronize_session=False)
        )
        session.commit()

"""Garbage collection: orphan blobs, temporary and scratch entries past an age bound, and catalog history past its
retention.

A blob that a row references is never removed: the referenced digests are read first, and each delete takes its
last look at the catalog with the blob out of sight (the race rules of `lorafleet.adapters.store`). The age bound
covers what is written before its row commits (an upload's blob and scratch folder). History goes in batches, one
short transaction each, and never what a running rollout or a later comparison still reads.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path
from typing import cast

from sqlalchemy import ColumnElement, CursorResult, and_, delete, func, or_, select
from sqlalchemy.orm import aliased, sessionmaker

from lorafleet.adapters.catalog import (
    AdapterVersion,
    Decision,
    Deployment,
    DriftCheck,
    Rollout,
    RolloutSample,
    ValidationRun,
    ValidationSet,
)
from lorafleet.adapters.registry import digest_in_use
from lorafleet.adapters.store import AdapterStore, BlobStorage, BlobStore, LocalStore, last_changed

__all__ = ["GC_LEASE", "BATCH_ROWS", "Retention", "Removed", "GcReport", "collect_garbage"]

GC_LEASE = "gc"  # the fleet-wide lease (`lorafleet.adapters.leases`) of whoever collects garbage now
BATCH_ROWS = 10_000  # rows per delete statement: a big table never holds one long transaction
DAY_S = 86400.0

_History = type[RolloutSample] | type[Decision] | type[DriftCheck] | type[ValidationRun]


@dataclass(frozen=True)
class Retention:
    """How long catalog history is kept, in days (0: forever), and how old an unreferenced file must be to go."""

    rollout_samples_days: float = 0.0
    decisions_days: float = 0.0
    drift_checks_days: float = 0.0
    validation_runs_days: float = 0.0
    temp_age_s: float = DAY_S

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) < 0:  # a cutoff in the future would delete everything
                raise ValueError(f"{f.name} = {getattr(self, f.name)}: must be 0 or more")


@dataclass(frozen=True)
class Removed:
    """What one kind of garbage came to: entries (blobs, folders, files or rows) and bytes (files only)."""

    count: int = 0
    bytes: int = 0

    def __add__(self, other: Removed) -> Removed:
        return Removed(self.count + other.count, self.bytes + other.bytes)


@dataclass(frozen=True)
class GcReport:
    """What one collection removed or, in a dry run, would remove."""

    dry_run: bool
    adapter_blobs: Removed
    validation_blobs: Removed
    temp_entries: Removed  # the stores' half-written puts and half-done deletes
    scratch_entries: Removed  # what uploads left in the scratch folders
    rows: Mapping[str, int]  # table name -> rows past retention

    def kinds(self) -> dict[str, Removed]:
        """Every kind by name: files first, then each table's rows."""
        files = {"adapter_blobs": self.adapter_blobs, "validation_blobs": self.validation_blobs,
                 "temp_entries": self.temp_entries, "scratch_entries": self.scratch_entries}
        return files | {table: Removed(count) for table, count in self.rows.items()}


def collect_garbage(sessions: sessionmaker, store: AdapterStore, validation_store: BlobStorage, tmp_dirs: list[Path],
                    retention: Retention, now: float, dry_run: bool = False) -> GcReport:
    """Remove (in a dry run, only count) unreferenced blobs and temporary entries older than the age bound, and
    catalog history older than its retention, as of `now` (epoch seconds)."""
    before = now - retention.temp_age_s
    rows = _apply_retention(sessions, retention, now, dry_run)
    return GcReport(dry_run=dry_run,
                    adapter_blobs=_orphan_adapter_blobs(sessions, store, before, dry_run),
                    validation_blobs=_orphan_validation_blobs(sessions, validation_store, before, dry_run),
                    temp_entries=(_temp_entries(store, before, dry_run)
                                  + _temp_entries(validation_store, before, dry_run)),
                    scratch_entries=sum((_scratch_entries(d, before, dry_run) for d in tmp_dirs), Removed()),
                    rows=rows)


# --- files ---

def _adapter_in_use(sessions: sessionmaker, digest: str) -> bool:
    with sessions() as session:  # a new transaction: it sees a version committed since the listing
        return digest_in_use(session, digest)


def _validation_in_use(sessions: sessionmaker, digest: str) -> bool:
    with sessions() as session:
        return session.scalar(select(ValidationSet.id).where(ValidationSet.digest == digest).limit(1)) is not None


def _orphan_adapter_blobs(sessions: sessionmaker, store: AdapterStore, before: float, dry_run: bool) -> Removed:
    with sessions() as session:
        referenced = set(session.scalars(select(AdapterVersion.digest).distinct()))
    removed = Removed()
    for digest, changed in list(store.digests()):
        if digest in referenced or changed >= before:
            continue
        size = _tree_bytes(store.local_path(digest)) if isinstance(store, LocalStore) else 0  # S3: not sized
        if dry_run or store.delete(digest, keep=partial(_adapter_in_use, sessions, digest)):
            removed += Removed(1, size)
    return removed


def _orphan_validation_blobs(sessions: sessionmaker, store: BlobStorage, before: float, dry_run: bool) -> Removed:
    with sessions() as session:
        referenced = set(session.scalars(select(ValidationSet.digest).distinct()))
    removed = Removed()
    for digest, changed in list(store.digests()):
        if digest in referenced or changed >= before:
            continue
        size = _tree_bytes(store.path(digest)) if isinstance(store, BlobStore) else 0
        # A put since the listing renews the blob's time: its row may commit after the look below.
        if dry_run or store.delete(digest, keep=partial(_validation_in_use, sessions, digest),
                                   if_unmodified_since=changed):
            removed += Removed(1, size)
    return removed


def _temp_entries(store: AdapterStore | BlobStorage, before: float, dry_run: bool) -> Removed:
    removed = Removed()
    for name, changed in list(store.temp_entries()):
        if changed >= before:
            continue
        size = _tree_bytes(store.root / name) if isinstance(store, LocalStore | BlobStore) else 0
        if not dry_run:
            store.remove_temp(name)
        removed += Removed(1, size)
    return removed


def _scratch_entries(folder: Path, before: float, dry_run: bool) -> Removed:
    removed = Removed()
    for entry in list(folder.iterdir()) if folder.is_dir() else []:
        try:
            if last_changed(entry) >= before:
                continue
            size = _tree_bytes(entry)
        except FileNotFoundError:  # its upload just finished
            continue
        if not dry_run:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        removed += Removed(1, size)
    return removed


def _tree_bytes(path: Path) -> int:
    """Bytes of a file, or of the files under a folder (links not followed); 0 if it is gone."""
    try:
        if not path.is_dir() or path.is_symlink():
            return path.lstat().st_size
        return sum(os.lstat(os.path.join(folder, name)).st_size for folder, _, files in os.walk(path) for name in files)
    except FileNotFoundError:
        return 0


# --- catalog history ---

def _apply_retention(sessions: sessionmaker, retention: Retention, now: float, dry_run: bool) -> dict[str, int]:
    rules: list[tuple[_History, ColumnElement[bool]]] = []
    if retention.rollout_samples_days:
        cutoff = now - retention.rollout_samples_days * DAY_S
        rules.append((RolloutSample, RolloutSample.rollout_id.in_(_finished_rollouts(cutoff))))
    if retention.decisions_days:
        cutoff = now - retention.decisions_days * DAY_S
        rules.append((Decision, or_(Decision.rollout_id.in_(_finished_rollouts(cutoff)),
                                  and_(Decision.rollout_id.is_(None), Decision.at < cutoff))))
    if retention.drift_checks_days:
        cutoff = now - retention.drift_checks_days * DAY_S
        rules.append((DriftCheck, and_(DriftCheck.at < cutoff, DriftCheck.id.not_in(_newest_checks()))))
    if retention.validation_runs_days:
        cutoff = now - retention.validation_runs_days * DAY_S
        rules.append((ValidationRun, and_(ValidationRun.kind == "check", ValidationRun.at < cutoff,
                                          ValidationRun.id.not_in(_newest_replays()))))
    return {table.__tablename__: _purge(sessions, table, where, dry_run) for table, where in rules}


def _finished_rollouts(cutoff: float):
    """Rollouts finished before the cutoff; never one a deployment still points at (it is running)."""
    running = select(Deployment.rollout_id).where(Deployment.rollout_id.is_not(None))
    return select(Rollout.id).where(Rollout.finished_at.is_not(None), Rollout.finished_at < cutoff,
                                    Rollout.id.not_in(running))


def _newest_checks():
    """The newest drift look of each series: the monitor numbers the next look after it (alpha spending), and the
    status shows it."""
    c = aliased(DriftCheck)
    return select(func.max(c.id)).group_by(c.deployment_id, c.kind, c.version_id, c.variant)


def _newest_replays():
    """The newest check replay of each version on each validation set: what the drift status shows."""
    r = aliased(ValidationRun)
    return select(func.max(r.id)).where(r.kind == "check").group_by(r.deployment_id, r.version_id,
                                                                      r.validation_set_id)


def _purge(sessions: sessionmaker, table: _History, where: ColumnElement[bool], dry_run: bool) -> int:
    """Delete the matching rows, BATCH_ROWS per transaction; return how many went (would go, in a dry run)."""
    if dry_run:
        with sessions() as session:
            return session.scalar(select(func.count()).select_from(table).where(where)) or 0
    total = 0
    while True:
        with sessions() as session:
            ids = list(session.scalars(select(table.id).where(where).order_by(table.id).limit(BATCH_ROWS)))
            if not ids:
                return total
            result = session.execute(delete(table).where(table.id.in_(ids)).execution_options(
                synchronize_session=False))
            session.commit()
        total += cast(CursorResult, result).rowcount
        if len(ids) < BATCH_ROWS:
            return total

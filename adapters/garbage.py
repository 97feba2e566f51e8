"""Garbage collection: orphan blobs, temporary and scratch entries past an age bound, and catalog
history past its retention; captured requests past their deployment's retention, with the images
only they referenced.

A blob that a row references is never removed: the referenced digests are read first, and each
delete takes its last look at the catalog with the blob out of sight (the race rules of
`lorafleet.adapters.store`). The age bound covers what is written before its row commits (an
upload's blob and scratch folder). History goes in batches, one short transaction each, and never
what a running rollout or a later comparison still reads.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import UTC, date, datetime
from functools import partial
from pathlib import Path
from typing import cast

from sqlalchemy import (
    ColumnElement,
    CursorResult,
    Text,
    and_,
    delete,
    false,
    func,
    not_,
    or_,
    select,
)
from sqlalchemy import cast as sql_cast
from sqlalchemy.orm import aliased, sessionmaker

from lorafleet.adapters.catalog import (
    AdapterVersion,
    Capture,
    Decision,
    Deployment,
    DriftCheck,
    Feedback,
    RequestRecord,
    Rollout,
    RolloutSample,
    UsageDay,
    ValidationRun,
    ValidationSet,
)
from lorafleet.adapters.registry import digest_in_use
from lorafleet.adapters.store import AdapterStore, BlobStorage, BlobStore, LocalStore, last_changed

__all__ = [
    "GC_LEASE",
    "BATCH_ROWS",
    "Retention",
    "Removed",
    "GcReport",
    "collect_garbage",
    "delete_captures",
    "capture_image_in_use",
]

# the fleet-wide lease (`lorafleet.adapters.leases`) of whoever collects garbage now
GC_LEASE = "gc"
BATCH_ROWS = 10_000  # rows per delete statement: a big table never holds one long transaction
DAY_S = 86400.0

_History = (
    type[RolloutSample]
    | type[Decision]
    | type[DriftCheck]
    | type[ValidationRun]
    | type[RequestRecord]
    | type[Feedback]
)


@dataclass(frozen=True)
class Retention:
    """How long catalog history is kept, in days (0: forever), and how old an unreferenced file
    must be to go."""

    rollout_samples_days: float = 0.0
    decisions_days: float = 0.0
    drift_checks_days: float = 0.0
    validation_runs_days: float = 0.0
    requests_days: float = 0.0  # the request log
    feedback_days: float = 0.0
    usage_days: float = 0.0  # the usage report's days
    temp_age_s: float = DAY_S

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) < 0:  # a cutoff in the future would delete everything
                raise ValueError(f"{f.name} = {getattr(self, f.name)}: must be 0 or more")


@dataclass(frozen=True)
class Removed:
    """What one kind of garbage came to: entries (blobs, folders, files or rows) and bytes (files
    only)."""

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
    # orphan images and those of expired captures; None: no capture store
    capture_images: Removed | None = None

    def kinds(self) -> dict[str, Removed]:
        """Every kind by name: files first, then each table's rows."""
        files = {
            "adapter_blobs": self.adapter_blobs,
            "validation_blobs": self.validation_blobs,
            "temp_entries": self.temp_entries,
            "scratch_entries": self.scratch_entries,
        }
        if self.capture_images is not None:
            files["capture_images"] = self.capture_images
        return files | {table: Removed(count) for table, count in self.rows.items()}


def collect_garbage(
    sessions: sessionmaker,
    store: AdapterStore,
    validation_store: BlobStorage,
    tmp_dirs: list[Path],
    retention: Retention,
    now: float,
    dry_run: bool = False,
    capture_store: BlobStorage | None = None,
) -> GcReport:
    """Remove (in a dry run, only count) unreferenced blobs and temporary entries older than the
    age bound, and catalog history older than its retention, as of `now` (epoch seconds); with
    the capture store, also captures past their deployment's retention (or of a deployment that
    stopped capturing) and orphan capture images."""
    before = now - retention.temp_age_s
    rows = _apply_retention(sessions, retention, now, dry_run)
    temp = _temp_entries(store, before, dry_run) + _temp_entries(validation_store, before, dry_run)
    capture_images = None
    if capture_store is not None:
        rows["captures"], capture_images = delete_captures(
            sessions, capture_store, _expired_captures(sessions, now), dry_run
        )
        capture_images += _orphan_capture_images(sessions, capture_store, before, dry_run)
        temp += _temp_entries(capture_store, before, dry_run)
    return GcReport(
        dry_run=dry_run,
        adapter_blobs=_orphan_adapter_blobs(sessions, store, before, dry_run),
        validation_blobs=_orphan_validation_blobs(sessions, validation_store, before, dry_run),
        temp_entries=temp,
        scratch_entries=sum((_scratch_entries(d, before, dry_run) for d in tmp_dirs), Removed()),
        rows=rows,
        capture_images=capture_images,
    )


# --- files ---


def _adapter_in_use(sessions: sessionmaker, digest: str) -> bool:
    with sessions() as session:  # a new transaction: it sees a version committed since the listing
        return digest_in_use(session, digest)


def _validation_in_use(sessions: sessionmaker, digest: str) -> bool:
    with sessions() as session:
        return (
            session.scalar(select(ValidationSet.id).where(ValidationSet.digest == digest).limit(1))
            is not None
        )


def _orphan_adapter_blobs(
    sessions: sessionmaker, store: AdapterStore, before: float, dry_run: bool
) -> Removed:
    with sessions() as session:
        referenced = set(session.scalars(select(AdapterVersion.digest).distinct()))
    removed = Removed()
    for digest, changed in list(store.digests()):
        if digest in referenced or changed >= before:
            continue
        # S3: not sized
        size = _tree_bytes(store.local_path(digest)) if isinstance(store, LocalStore) else 0
        if dry_run or store.delete(digest, keep=partial(_adapter_in_use, sessions, digest)):
            removed += Removed(1, size)
    return removed


def _orphan_validation_blobs(
    sessions: sessionmaker, store: BlobStorage, before: float, dry_run: bool
) -> Removed:
    with sessions() as session:
        referenced = set(session.scalars(select(ValidationSet.digest).distinct()))
    removed = Removed()
    for digest, changed in list(store.digests()):
        if digest in referenced or changed >= before:
            continue
        size = _tree_bytes(store.path(digest)) if isinstance(store, BlobStore) else 0
        # A put since the listing renews the blob's time: its row may commit after the look below.
        if dry_run or store.delete(
            digest, keep=partial(_validation_in_use, sessions, digest), if_unmodified_since=changed
        ):
            removed += Removed(1, size)
    return removed


def capture_image_in_use(sessions: sessionmaker, digest: str) -> bool:
    """Whether any capture references the image (its digest inside the JSON list: no portable
    JSON query)."""
    with sessions() as session:
        listed = sql_cast(Capture.images, Text)
        return (
            session.scalar(select(Capture.id).where(listed.contains(digest)).limit(1)) is not None
        )


def _delete_image(
    sessions: sessionmaker, images: BlobStorage, digest: str, put_since: float
) -> Removed:
    """Delete one capture image unless a capture references it at the last look, or it was put
    after `put_since` (a capture whose row is not committed yet)."""
    size = _tree_bytes(images.path(digest)) if isinstance(images, BlobStore) else 0
    if images.delete(
        digest, keep=partial(capture_image_in_use, sessions, digest), if_unmodified_since=put_since
    ):
        return Removed(1, size)
    return Removed()


def _orphan_capture_images(
    sessions: sessionmaker, images: BlobStorage, before: float, dry_run: bool
) -> Removed:
    with sessions() as session:
        referenced = {
            d
            for listed in session.scalars(select(Capture.images).execution_options(yield_per=1000))
            for d in listed
        }
    removed = Removed()
    for digest, changed in list(images.digests()):
        if digest in referenced or changed >= before:
            continue
        if dry_run:
            removed += Removed(
                1, _tree_bytes(images.path(digest)) if isinstance(images, BlobStore) else 0
            )
        else:
            removed += _delete_image(sessions, images, digest, changed)
    return removed


def delete_captures(
    sessions: sessionmaker, images: BlobStorage, where: ColumnElement[bool], dry_run: bool = False
) -> tuple[int, Removed]:
    """Delete the captures `where` selects, BATCH_ROWS per transaction, then the images that no
    remaining capture references; (captures, images) removed. A dry run counts the captures only:
    their images are orphans then."""
    if dry_run:
        with sessions() as session:
            return session.scalar(
                select(func.count()).select_from(Capture).where(where)
            ) or 0, Removed()
    # an image put since may belong to a capture being written: it stays (gc's orphan later)
    started = time.time()
    total, freed = 0, set()
    while True:
        with sessions() as session:
            rows = session.execute(
                select(Capture.id, Capture.images)
                .where(where)
                .order_by(Capture.id)
                .limit(BATCH_ROWS)
            ).all()
            if rows:
                session.execute(
                    delete(Capture)
                    .where(Capture.id.in_([row.id for row in rows]))
                    .execution_options(synchronize_session=False)
                )
                session.commit()
        total += len(rows)
        freed |= {digest for row in rows for digest in row.images}
        if len(rows) < BATCH_ROWS:
            break
    removed = sum((_delete_image(sessions, images, d, started) for d in sorted(freed)), Removed())
    return total, removed


def _expired_captures(sessions: sessionmaker, now: float) -> ColumnElement[bool]:
    """Captures older than their deployment's `retention_days`, and every capture of a deployment
    that no longer captures (opted out, or gone) made before this look at the policies."""
    # a deployment that opts in after this look keeps what it captures from then on
    looked_at = time.time()
    with sessions() as session:
        policies = {
            id_: policy
            for id_, policy in session.execute(select(Deployment.id, Deployment.capture))
            if policy
        }
    kept = [
        and_(Capture.deployment_id == id_, Capture.at >= now - policy["retention_days"] * DAY_S)
        for id_, policy in policies.items()
    ]
    return and_(Capture.at < looked_at, not_(or_(false(), *kept)))


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
        return sum(
            os.lstat(os.path.join(folder, name)).st_size
            for folder, _, files in os.walk(path)
            for name in files
        )
    except FileNotFoundError:
        return 0


# --- catalog history ---


def _apply_retention(
    sessions: sessionmaker, retention: Retention, now: float, dry_run: bool
) -> dict[str, int]:
    rules: list[tuple[_History, ColumnElement[bool]]] = []
    if retention.rollout_samples_days:
        cutoff = now - retention.rollout_samples_days * DAY_S
        rules.append((RolloutSample, RolloutSample.rollout_id.in_(_finished_rollouts(cutoff))))
    if retention.decisions_days:
        cutoff = now - retention.decisions_days * DAY_S
        rules.append(
            (
                Decision,
                or_(
                    Decision.rollout_id.in_(_finished_rollouts(cutoff)),
                    and_(Decision.rollout_id.is_(None), Decision.at < cutoff),
                ),
            )
        )
    if retention.drift_checks_days:
        cutoff = now - retention.drift_checks_days * DAY_S
        rules.append(
            (DriftCheck, and_(DriftCheck.at < cutoff, DriftCheck.id.not_in(_newest_checks())))
        )
    if retention.validation_runs_days:
        cutoff = now - retention.validation_runs_days * DAY_S
        rules.append(
            (
                ValidationRun,
                and_(
                    ValidationRun.kind == "check",
                    ValidationRun.at < cutoff,
                    ValidationRun.id.not_in(_newest_replays()),
                ),
            )
        )
    if retention.requests_days:
        rules.append((RequestRecord, RequestRecord.at < now - retention.requests_days * DAY_S))
    if retention.feedback_days:
        rules.append((Feedback, Feedback.at < now - retention.feedback_days * DAY_S))
    removed = {
        table.__tablename__: _purge(sessions, table, where, dry_run) for table, where in rules
    }
    if retention.usage_days:
        cutoff_day = datetime.fromtimestamp(now - retention.usage_days * DAY_S, UTC).date()
        removed[UsageDay.__tablename__] = _purge_usage(sessions, cutoff_day, dry_run)
    return removed


def _purge_usage(sessions: sessionmaker, before: date, dry_run: bool) -> int:
    """The usage report's days before `before` (one row per tenant, deployment, adapter, kind
    and outcome a day: one statement)."""
    older = UsageDay.day < before
    with sessions() as session:
        if dry_run:
            return session.scalar(select(func.count()).select_from(UsageDay).where(older)) or 0
        result = session.execute(delete(UsageDay).where(older))
        session.commit()
    return cast(CursorResult, result).rowcount


def _finished_rollouts(cutoff: float):
    """Rollouts finished before the cutoff; never one a deployment still points at (it is
    running)."""
    running = select(Deployment.rollout_id).where(Deployment.rollout_id.is_not(None))
    return select(Rollout.id).where(
        Rollout.finished_at.is_not(None), Rollout.finished_at < cutoff, Rollout.id.not_in(running)
    )


def _newest_checks():
    """The newest drift look of each series: the monitor numbers the next look after it (alpha
    spending), and the status shows it."""
    c = aliased(DriftCheck)
    return select(func.max(c.id)).group_by(c.deployment_id, c.kind, c.version_id, c.variant)


def _newest_replays():
    """The newest check replay of each version on each validation set: what the drift status
    shows."""
    r = aliased(ValidationRun)
    return (
        select(func.max(r.id))
        .where(r.kind == "check")
        .group_by(r.deployment_id, r.version_id, r.validation_set_id)
    )


def _purge(
    sessions: sessionmaker, table: _History, where: ColumnElement[bool], dry_run: bool
) -> int:
    """Delete the matching rows, BATCH_ROWS per transaction; return how many went (would go, in a
    dry run)."""
    if dry_run:
        with sessions() as session:
            return session.scalar(select(func.count()).select_from(table).where(where)) or 0
    total = 0
    while True:
        with sessions() as session:
            ids = list(
                session.scalars(select(table.id).where(where).order_by(table.id).limit(BATCH_ROWS))
            )
            if not ids:
                return total
            result = session.execute(
                delete(table).where(table.id.in_(ids)).execution_options(synchronize_session=False)
            )
            session.commit()
        total += cast(CursorResult, result).rowcount
        if len(ids) < BATCH_ROWS:
            return total

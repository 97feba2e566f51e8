"""Files and batches in the catalog.

A tenant sees its own only: every lookup is by (tenant, id), and another tenant's id is a 404 as an
unknown one is. A batch is run by the gateway holding its lease (`claim`, `renew`): a finished line
is recorded (`record_line`) in the transaction that counts it, only while that gateway still holds
the batch, and only once (the line is the row's key), so a gateway that takes a batch over runs the
lines without a row and never a finished one again.

Batch statuses (OpenAI's): validating (created; no gateway has started it) -> in_progress ->
finalizing (its output and error files are being written) -> completed; cancelling (asked to stop)
-> cancelled; expired (its completion window ended first; finished lines kept); failed (it could
not start: its `errors` say why).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from lorafleet.adapters.catalog import Batch, BatchLine, StoredFile
from lorafleet.errors import Conflict, InvalidRequest, NotFound, QuotaExceeded

__all__ = [
    "UNFINISHED",
    "WINDOWS",
    "new_id",
    "add_file",
    "get_file",
    "list_files",
    "delete_file",
    "digest_held",
    "create_batch",
    "get_batch",
    "list_batches",
    "cancel_batch",
    "claim",
    "start",
    "finalizing",
    "record_line",
    "finished_lines",
    "finish",
    "Recorded",
]

UNFINISHED = ("validating", "in_progress", "finalizing", "cancelling")
WINDOWS = {"24h": 24 * 3600.0}  # the completion windows OpenAI's API takes


def new_id(prefix: str) -> str:
    """A file's (`file-`) or a batch's (`batch_`) id: 24 random hex digits."""
    return prefix + secrets.token_hex(12)


def add_file(
    session: Session,
    tenant_id: int,
    purpose: str,
    filename: str,
    digest: str,
    size: int,
    lines: int,
    max_files: int,
    now: float,
) -> StoredFile:
    """A new file row (its bytes already in the file store); QuotaExceeded at `max_files` (0: no
    limit)."""
    if max_files and _count(session, StoredFile, tenant_id) >= max_files:
        raise QuotaExceeded(
            f"this tenant stores {max_files} files, its limit: delete some (DELETE /v1/files/ID)",
            code="file_limit",
        )
    stored = StoredFile(
        id=new_id("file-"),
        tenant_id=tenant_id,
        purpose=purpose,
        filename=filename[:255],
        bytes=size,
        lines=lines,
        digest=digest,
        created_at=now,
    )
    session.add(stored)
    session.commit()
    return stored


def _count(session: Session, table: type[StoredFile] | type[Batch], tenant_id: int) -> int:
    query = select(func.count()).select_from(table).where(table.tenant_id == tenant_id)
    if table is Batch:
        query = query.where(Batch.status.in_(UNFINISHED))
    return session.scalar(query) or 0


def get_file(session: Session, tenant_id: int, file_id: str) -> StoredFile:
    found = session.get(StoredFile, file_id)
    if found is None or found.tenant_id != tenant_id:
        raise NotFound(f"no file {file_id!r}", code="file_not_found")
    return found


def list_files(
    session: Session, tenant_id: int, purpose: str | None, after: str | None, limit: int
) -> list[StoredFile]:
    """The tenant's files, newest first, from after the file `after` (a page)."""
    query = select(StoredFile).where(StoredFile.tenant_id == tenant_id)
    if purpose:
        query = query.where(StoredFile.purpose == purpose)
    mark = get_file(session, tenant_id, after) if after else None
    return _newest_first(session, StoredFile, query, mark, limit)


def _newest_first(
    session: Session,
    table: type[StoredFile] | type[Batch],
    query: Any,
    mark: StoredFile | Batch | None,
    limit: int,
) -> list[Any]:
    """A page of `query`'s rows, newest first, from after the row `mark` (OpenAI's `after`)."""
    if mark is not None:
        query = query.where(
            (table.created_at < mark.created_at)
            | ((table.created_at == mark.created_at) & (table.id < mark.id))
        )
    order = (table.created_at.desc(), table.id.desc())
    return list(session.scalars(query.order_by(*order).limit(limit)))


def delete_file(session: Session, tenant_id: int, file_id: str) -> str | None:
    """Delete the tenant's file; the digest of its bytes where no other file holds them (the
    caller deletes them from the store). 409 while an unfinished batch reads it."""
    found = get_file(session, tenant_id, file_id)
    running = session.scalar(
        select(Batch.id).where(Batch.input_file_id == file_id, Batch.status.in_(UNFINISHED))
    )
    if running is not None:
        raise Conflict(
            f"file {file_id!r} is the input of batch {running}, which has not finished: cancel "
            "it first",
            code="file_in_use",
        )
    digest = found.digest
    session.delete(found)
    session.commit()
    return None if digest_held(session, digest) else digest


def digest_held(session: Session, digest: str) -> bool:
    """Whether some file's bytes are these."""
    return (
        session.scalar(select(StoredFile.id).where(StoredFile.digest == digest).limit(1))
        is not None
    )


def create_batch(
    session: Session,
    tenant_id: int,
    input_file_id: str,
    endpoint: str,
    completion_window: str,
    metadata: dict[str, str] | None,
    max_batches: int,
    max_lines: int,
    now: float,
) -> Batch:
    """A new batch (validating) of the tenant's input file."""
    source = get_file(session, tenant_id, input_file_id)
    if source.purpose != "batch":
        raise InvalidRequest(
            f"file {input_file_id!r} is a {source.purpose} file: upload the requests with "
            "purpose 'batch'",
            code="invalid_input_file",
            param="input_file_id",
        )
    if max_lines and source.lines > max_lines:
        raise InvalidRequest(
            f"file {input_file_id!r} has {source.lines} requests; this tenant's batches take at "
            f"most {max_lines}",
            code="batch_too_large",
            param="input_file_id",
        )
    if max_batches and _count(session, Batch, tenant_id) >= max_batches:
        raise QuotaExceeded(
            f"this tenant has {max_batches} batches not yet finished, its limit: wait for one or "
            "cancel one",
            code="batch_limit",
        )
    batch = Batch(
        id=new_id("batch_"),
        tenant_id=tenant_id,
        input_file_id=input_file_id,
        endpoint=endpoint,
        completion_window=completion_window,
        status="validating",
        batch_metadata=metadata,
        total=source.lines,
        completed=0,
        failed=0,
        created_at=now,
        expires_at=now + WINDOWS[completion_window],
        lease_until=0.0,
    )
    session.add(batch)
    session.commit()
    return batch


def get_batch(session: Session, tenant_id: int, batch_id: str) -> Batch:
    found = session.get(Batch, batch_id)
    if found is None or found.tenant_id != tenant_id:
        raise NotFound(f"no batch {batch_id!r}", code="batch_not_found")
    return found


def list_batches(session: Session, tenant_id: int, after: str | None, limit: int) -> list[Batch]:
    query = select(Batch).where(Batch.tenant_id == tenant_id)
    mark = get_batch(session, tenant_id, after) if after else None
    return _newest_first(session, Batch, query, mark, limit)


def cancel_batch(session: Session, tenant_id: int, batch_id: str, now: float) -> Batch:
    """Ask the batch to stop: it ends `cancelled` once its gateway has written what finished.
    Cancelling a batch that is stopping already changes nothing; a finished one is a 409."""
    batch = get_batch(session, tenant_id, batch_id)
    if batch.status in ("cancelling", "cancelled"):
        return batch
    moved = session.execute(
        update(Batch)
        .where(Batch.id == batch_id, Batch.status.in_(("validating", "in_progress")))
        .values(status="cancelling", cancelling_at=now)
    )
    session.commit()
    if not moved.rowcount:  # type: ignore[attr-defined]
        session.refresh(batch)
        raise Conflict(
            f"batch {batch_id} is {batch.status}: it cannot be cancelled",
            code="batch_not_cancellable",
        )
    session.refresh(batch)
    return batch


def claim(session: Session, owner: str, now: float, lease_s: float) -> dict[str, str]:
    """The unfinished batches `owner` holds after this: its own (lease renewed) and those whose
    lease ran out (taken over); by id, their statuses."""
    candidates = session.scalars(
        select(Batch.id).where(
            Batch.status.in_(UNFINISHED), (Batch.owner == owner) | (Batch.lease_until < now)
        )
    ).all()
    held = {}
    for batch_id in candidates:
        taken = session.execute(
            update(Batch)
            .where(
                Batch.id == batch_id,
                Batch.status.in_(UNFINISHED),
                (Batch.owner == owner) | (Batch.lease_until < now),
            )
            .values(owner=owner, lease_until=now + lease_s)
        )
        if taken.rowcount:  # type: ignore[attr-defined]
            held[batch_id] = ""
    session.commit()
    if held:
        rows = session.execute(select(Batch.id, Batch.status).where(Batch.id.in_(held)))
        held = {batch_id: status for batch_id, status in rows}
    return held


def start(session: Session, batch_id: str, owner: str, now: float) -> None:
    """A validating batch its gateway starts: in progress."""
    session.execute(
        update(Batch)
        .where(Batch.id == batch_id, Batch.owner == owner, Batch.status == "validating")
        .values(status="in_progress", in_progress_at=now)
    )
    session.commit()


def finalizing(session: Session, batch_id: str, owner: str, now: float) -> None:
    """Every line of an in-progress batch has finished: its files are being written."""
    session.execute(
        update(Batch)
        .where(Batch.id == batch_id, Batch.owner == owner, Batch.status == "in_progress")
        .values(status="finalizing", finalizing_at=now)
    )
    session.commit()


@dataclass(frozen=True)
class Recorded:
    """What `record_line` did: counted the line, or not because the batch is no longer this
    gateway's (`lost`) or the line was recorded before."""

    counted: bool
    lost: bool = False


def record_line(
    session: Session,
    batch_id: str,
    owner: str,
    line: BatchLine,
) -> Recorded:
    """Keep a finished line and count it (completed: a 2xx answer; failed: any other), in one
    transaction, while `owner` holds the batch."""
    counter = Batch.completed if 200 <= line.status < 300 else Batch.failed
    moved = session.execute(
        update(Batch)
        .where(Batch.id == batch_id, Batch.owner == owner, Batch.status.in_(UNFINISHED))
        .values({counter: counter + 1})
    )
    if not moved.rowcount:  # type: ignore[attr-defined]
        session.rollback()
        return Recorded(False, lost=True)
    session.add(line)
    try:
        session.commit()
    except IntegrityError:  # recorded already (by a gateway that held the batch before)
        session.rollback()
        return Recorded(False)
    return Recorded(True)


def finished_lines(session: Session, batch_id: str) -> list[BatchLine]:
    return list(
        session.scalars(select(BatchLine).where(BatchLine.batch_id == batch_id).order_by("line"))
    )


def finish(
    session: Session,
    batch_id: str,
    owner: str,
    status: str,
    output_file_id: str | None,
    error_file_id: str | None,
    now: float,
) -> bool:
    """The batch's end (completed, cancelled, expired or failed) with its files; its finished
    lines' rows go (the files hold them now). False where `owner` no longer holds it."""
    stamp = {
        "completed": "completed_at",
        "cancelled": "cancelled_at",
        "expired": "expired_at",
        "failed": "failed_at",
    }[status]
    moved = session.execute(
        update(Batch)
        .where(Batch.id == batch_id, Batch.owner == owner, Batch.status.in_(UNFINISHED))
        .values(
            {
                "status": status,
                stamp: now,
                "output_file_id": output_file_id,
                "error_file_id": error_file_id,
                "owner": None,
                "lease_until": 0.0,
            }
        )
    )
    if not moved.rowcount:  # type: ignore[attr-defined]
        session.rollback()
        return False
    session.execute(delete(BatchLine).where(BatchLine.batch_id == batch_id))
    session.commit()
    return True

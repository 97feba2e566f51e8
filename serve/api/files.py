"""OpenAI's Files API, for batches: `POST /v1/files` (purpose `batch`: a JSONL file of chat
completion requests, checked line by line at upload), `GET /v1/files`, `GET /v1/files/{id}`,
`GET /v1/files/{id}/content`, `DELETE /v1/files/{id}`. A tenant's own files only; a batch's output
and error files are files too (purpose `batch_output`). The bytes are in the file store
(content-addressed, beside the adapter store), the rows in the catalog."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import Response
from pydantic import BaseModel
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from lorafleet.adapters.catalog import StoredFile
from lorafleet.adapters.registry import list_deployments
from lorafleet.errors import InvalidRequest
from lorafleet.serve.api.dependencies import CurrentTenant, GatewayDep, SessionDep
from lorafleet.serve.batches import records
from lorafleet.serve.batches.lines import read_lines
from lorafleet.serve.gateway import Gateway
from lorafleet.serve.limits import Limits

__all__ = [
    "router",
    "FileObject",
    "FileList",
    "FileDeleted",
    "file_object",
    "list_page",
    "tenant_limits",
]

router = APIRouter(prefix="/v1")


class FileObject(BaseModel):
    """OpenAI's file object."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"
    status_details: str | None = None
    expires_at: int | None = None


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


def file_object(stored: StoredFile) -> FileObject:
    return FileObject(
        id=stored.id,
        bytes=stored.bytes,
        created_at=int(stored.created_at),
        filename=stored.filename,
        purpose=stored.purpose,
    )


def list_page(found: Sequence[Any], limit: int) -> dict[str, Any]:
    """OpenAI's list page of the first `limit` of `found` (read one more, to say whether more
    follow: pass `after` = `last_id` for them)."""
    page = list(found[:limit])
    return {
        "data": page,
        "first_id": page[0].id if page else None,
        "last_id": page[-1].id if page else None,
        "has_more": len(found) > limit,
    }


def tenant_limits(request: Request, gateway: Gateway) -> Limits:
    """The limits in effect for the request's tenant."""
    entry = getattr(request.state, "tenant", None)
    return (entry.limits if entry is not None else None) or Limits.defaults(gateway.settings)


@router.post("/files")
async def upload_file(
    request: Request,
    gateway: GatewayDep,
    session: SessionDep,
    tenant: CurrentTenant,
    file: Annotated[UploadFile, File()],
    purpose: Annotated[str, Form()],
) -> FileObject:
    """A batch's requests: JSONL, one `{"custom_id", "method": "POST", "url":
    "/v1/chat/completions", "body"}` per line, each `body.model` one of your deployments. A bad
    line is a 400 naming it; nothing is stored then."""
    if purpose != "batch":
        raise InvalidRequest(
            f"purpose {purpose!r} is not served: files here are a batch's requests "
            "(purpose 'batch')",
            code="invalid_purpose",
            param="purpose",
        )
    data = await file.read()
    limits = tenant_limits(request, gateway)
    names = {d.name for d in await run_in_threadpool(list_deployments, session, tenant)}
    lines = await run_in_threadpool(
        read_lines, data, gateway.settings.max_request_bytes, limits.batch_lines, names
    )
    stored = await run_in_threadpool(
        _store,
        gateway,
        session,
        tenant.id,
        "batch",
        file.filename or "batch.jsonl",
        data,
        len(lines),
        limits.files,
    )
    return file_object(stored)


def _store(
    gateway: Gateway,
    session: Session,
    tenant_id: int,
    purpose: str,
    filename: str,
    data: bytes,
    lines: int,
    max_files: int,
) -> StoredFile:
    """The bytes into the file store, then the row (a row never names bytes that are not
    there; bytes without a row are the garbage collector's)."""
    digest = gateway.file_store.put(data)
    assert digest == hashlib.sha256(data).hexdigest()
    return records.add_file(
        session, tenant_id, purpose, filename, digest, len(data), lines, max_files, time.time()
    )


@router.get("/files")
def get_files(
    session: SessionDep,
    tenant: CurrentTenant,
    purpose: str | None = None,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
) -> FileList:
    found = records.list_files(session, tenant.id, purpose, after, limit + 1)
    return FileList(**list_page([file_object(f) for f in found], limit))


@router.get("/files/{file_id}")
def get_file(file_id: str, session: SessionDep, tenant: CurrentTenant) -> FileObject:
    return file_object(records.get_file(session, tenant.id, file_id))


@router.get("/files/{file_id}/content")
async def get_file_content(
    file_id: str, gateway: GatewayDep, session: SessionDep, tenant: CurrentTenant
) -> Response:
    stored = await run_in_threadpool(records.get_file, session, tenant.id, file_id)
    data = await run_in_threadpool(gateway.file_store.read, stored.digest)
    return Response(data, media_type="application/jsonl")


@router.delete("/files/{file_id}")
async def delete_file(
    file_id: str, gateway: GatewayDep, session: SessionDep, tenant: CurrentTenant
) -> FileDeleted:
    """Delete the file (409 while an unfinished batch reads it)."""
    unused = await run_in_threadpool(records.delete_file, session, tenant.id, file_id)
    if unused is not None:  # unless a file uploaded meanwhile holds the same bytes
        await run_in_threadpool(gateway.file_store.delete, unused, lambda: _held(gateway, unused))
    return FileDeleted(id=file_id)


def _held(gateway: Gateway, digest: str) -> bool:
    with gateway.sessions() as session:
        return records.digest_held(session, digest)

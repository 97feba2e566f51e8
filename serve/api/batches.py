"""OpenAI's Batch API on a tenant's deployments: `POST /v1/batches`, `GET /v1/batches`,
`GET /v1/batches/{id}`, `POST /v1/batches/{id}/cancel`. A batch runs its input file's lines through
the chat path at a lower priority than live requests (`batch_runner`); a tenant sees its own
batches only."""

from __future__ import annotations

import time
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from lorafleet.adapters.catalog import Batch
from lorafleet.serve.api.dependencies import CurrentTenant, GatewayDep, SessionDep
from lorafleet.serve.api.files import list_page, tenant_limits
from lorafleet.serve.batches import records
from lorafleet.serve.batches.lines import ENDPOINT

__all__ = ["router", "BatchCreate", "BatchObject", "BatchList", "batch_object"]

router = APIRouter(prefix="/v1")


class BatchCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input_file_id: str
    endpoint: Literal["/v1/chat/completions"]
    completion_window: Literal["24h"]
    # OpenAI's: at most 16 pairs, keys up to 64 characters, values up to 512
    metadata: (
        Annotated[dict[str, Annotated[str, Field(max_length=512)]], Field(max_length=16)] | None
    ) = None


class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class BatchError(BaseModel):
    code: str
    message: str
    param: str | None = None
    line: int | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError]


class BatchObject(BaseModel):
    """OpenAI's batch object."""

    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str
    status: str
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts
    metadata: dict[str, str] | None = None


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


def _at(value: float | None) -> int | None:
    return None if value is None else int(value)


def batch_object(batch: Batch) -> BatchObject:
    return BatchObject(
        id=batch.id,
        endpoint=batch.endpoint,
        errors=BatchErrors(data=[BatchError(**e) for e in batch.errors]) if batch.errors else None,
        input_file_id=batch.input_file_id,
        completion_window=batch.completion_window,
        status=batch.status,
        output_file_id=batch.output_file_id,
        error_file_id=batch.error_file_id,
        created_at=int(batch.created_at),
        in_progress_at=_at(batch.in_progress_at),
        expires_at=_at(batch.expires_at),
        finalizing_at=_at(batch.finalizing_at),
        completed_at=_at(batch.completed_at),
        failed_at=_at(batch.failed_at),
        expired_at=_at(batch.expired_at),
        cancelling_at=_at(batch.cancelling_at),
        cancelled_at=_at(batch.cancelled_at),
        request_counts=RequestCounts(
            total=batch.total, completed=batch.completed, failed=batch.failed
        ),
        metadata=batch.batch_metadata,
    )


@router.post("/batches")
async def create_batch(
    body: BatchCreate,
    request: Request,
    gateway: GatewayDep,
    session: SessionDep,
    tenant: CurrentTenant,
) -> BatchObject:
    """Run a file of chat completion requests (`POST /v1/files`, purpose `batch`) within 24
    hours, on what live traffic leaves of the engine. Refused (429) while the tenant's budget is
    spent."""
    limits = tenant_limits(request, gateway)
    assert body.endpoint == ENDPOINT
    entry = request.state.tenant
    await gateway.budgets.check(entry.id, entry.name, entry.budgets)
    batch = await run_in_threadpool(
        records.create_batch,
        session,
        tenant.id,
        body.input_file_id,
        body.endpoint,
        body.completion_window,
        body.metadata,
        limits.batches,
        limits.batch_lines,
        time.time(),
    )
    request.app.state.batches.wake()  # started at once, not at the next tick
    return batch_object(batch)


@router.get("/batches")
def get_batches(
    session: SessionDep,
    tenant: CurrentTenant,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> BatchList:
    found = records.list_batches(session, tenant.id, after, limit + 1)
    return BatchList(**list_page([batch_object(b) for b in found], limit))


@router.get("/batches/{batch_id}")
def get_batch(batch_id: str, session: SessionDep, tenant: CurrentTenant) -> BatchObject:
    return batch_object(records.get_batch(session, tenant.id, batch_id))


@router.post("/batches/{batch_id}/cancel")
def cancel_batch(
    batch_id: str, request: Request, session: SessionDep, tenant: CurrentTenant
) -> BatchObject:
    """Stop the batch: lines not yet sent are not run; it ends `cancelled`, with the output and
    error files of what finished (the error file lists the lines that did not run)."""
    batch = records.cancel_batch(session, tenant.id, batch_id, time.time())
    request.app.state.batches.wake()
    return batch_object(batch)

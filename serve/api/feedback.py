"""Tenant API of the feedback loop: feedback on answers (`POST /v1/feedback`), the feedback and
request logs.

Scoped like every tenant route: another tenant's request id is 404.
"""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from lorafleet.errors import NotFound
from lorafleet.serve.api.dependencies import CurrentTenant, GatewayDep, SessionDep
from lorafleet.serve.feedback.records import (
    MAX_PAGE,
    TimeRange,
    feedback_page,
    parse_time,
    record_feedback,
    request_page,
)
from lorafleet.serve.feedback.request_log import logged_request_id
from lorafleet.serve.feedback.schemas import FeedbackCreate, FeedbackPublic, RequestPage

__all__ = ["router", "Since", "Until", "Limit", "time_range"]

router = APIRouter(prefix="/v1")

Since = Annotated[str | None, Query(description="from this time on: epoch seconds or ISO 8601")]
Until = Annotated[str | None, Query(description="before this time: epoch seconds or ISO 8601")]
Limit = Annotated[int, Query(ge=1, le=MAX_PAGE)]


def time_range(since: str | None, until: str | None) -> TimeRange:
    """The `since`/`until` query parameters of the listing routes (feedback, requests, captures)."""
    return TimeRange(parse_time(since, "since"), parse_time(until, "until"))


@router.post("/feedback", responses={201: {"model": FeedbackPublic}})
async def post_feedback(
    body: FeedbackCreate,
    request: Request,
    gateway: GatewayDep,
    session: SessionDep,
    tenant: CurrentTenant,
) -> JSONResponse:
    """Judge one answer by the `id` its response carried: `score` -1 or 1 (thumbs) or in [0, 1],
    an optional `correction` (the answer that should have been given) and `comment`. Posting
    again for the same id replaces the earlier feedback (200); the first post is 201."""
    # another gateway's buffer is written within its period
    wait_s = 2 * gateway.settings.request_log_flush_s + 1
    found = await run_in_threadpool(
        gateway.request_log.find_request, session, tenant.id, logged_request_id(body.id), wait_s
    )
    if found is None:
        raise NotFound(
            f"no request {body.id!r} of yours: pass the `id` of one of your chat completions",
            code="request_not_found",
        )
    key_id = getattr(request.state.tenant, "key_id", None) or None
    row, created = await run_in_threadpool(
        record_feedback, session, tenant, found, body, key_id, time.time()
    )
    gateway.metrics.feedback.labels(tenant.name, row.deployment, row.variant).observe(row.value)
    return JSONResponse(
        FeedbackPublic.model_validate(row).model_dump(mode="json"),
        status_code=201 if created else 200,
    )


@router.get("/feedback")
def list_feedback(
    session: SessionDep,
    tenant: CurrentTenant,
    since: Since = None,
    until: Until = None,
    deployment: str | None = None,
    cursor: str | None = None,
    limit: Limit = 100,
) -> dict:
    """Your feedback, newest first; `next_cursor` pages on."""
    data, next_cursor = feedback_page(
        session, tenant, time_range(since, until), deployment, cursor, limit
    )
    return {"data": [row.model_dump(mode="json") for row in data], "next_cursor": next_cursor}


@router.get("/requests")
def list_requests(
    session: SessionDep,
    tenant: CurrentTenant,
    since: Since = None,
    until: Until = None,
    deployment: str | None = None,
    cursor: str | None = None,
    limit: Limit = 100,
) -> RequestPage:
    """Your request log, newest first: time, key id, deployment, variant, adapter, tokens,
    status, latency, confidence and feedback of every chat request; `next_cursor` pages on."""
    return request_page(session, tenant, time_range(since, until), deployment, cursor, limit)

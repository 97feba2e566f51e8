"""Tenant API of captured requests: the capture policy of a deployment, the captures, their
deletion, and their export as the trainer's chat JSONL.

Scoped like every tenant route: another tenant's deployment or capture is 404.
"""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse

from lorafleet.adapters.registry import get_deployment
from lorafleet.errors import NotFound
from lorafleet.serve.api.adapters import DeploymentPublic, deployment_public
from lorafleet.serve.api.dependencies import (
    CurrentTenant,
    GatewayDep,
    SessionDep,
    release_connection,
)
from lorafleet.serve.api.feedback import Limit, Since, Until, time_range
from lorafleet.serve.feedback.capture import (
    CaptureSelection,
    capture_page,
    capture_status,
    delete_selected,
    opt_out,
    set_policy,
)
from lorafleet.serve.feedback.export import (
    LEFT_OUT,
    ExportOptions,
    ExportPlan,
    export_lines,
    plan_export,
)
from lorafleet.serve.feedback.schemas import (
    CapturePage,
    CapturePolicy,
    CapturesDeleted,
    CaptureStatus,
)

__all__ = ["router", "EXPORT_MEDIA_TYPE"]

router = APIRouter(prefix="/v1")

EXPORT_MEDIA_TYPE = "application/x-ndjson"


def _selection(deployment: str | None, since: str | None, until: str | None) -> CaptureSelection:
    return CaptureSelection(deployment, time_range(since, until))


@router.put("/deployments/{deployment}/capture")
def put_capture(
    deployment: str, body: CapturePolicy, session: SessionDep, tenant: CurrentTenant
) -> DeploymentPublic:
    """Keep a sampled share of the deployment's answered requests in full (images included), at most
    `max_per_day` a UTC day, each for `retention_days`; the policy replaces an earlier one."""
    return deployment_public(set_policy(session, get_deployment(session, tenant, deployment), body))


@router.get("/deployments/{deployment}/capture")
def get_capture(deployment: str, session: SessionDep, tenant: CurrentTenant) -> CaptureStatus:
    """The deployment's capture policy (null: off) and what is kept: captures, today's, bytes,
    images."""
    return capture_status(session, get_deployment(session, tenant, deployment), time.time())


@router.delete("/deployments/{deployment}/capture")
def delete_capture_policy(
    deployment: str, gateway: GatewayDep, session: SessionDep, tenant: CurrentTenant
) -> CapturesDeleted:
    """Opt out: stop capturing and delete every capture of the deployment, with the images no
    other capture references."""
    target = get_deployment(session, tenant, deployment)
    return opt_out(session, gateway.sessions, gateway.capture_store, target)


@router.get("/captures")
def list_captures(
    session: SessionDep,
    tenant: CurrentTenant,
    since: Since = None,
    until: Until = None,
    deployment: str | None = None,
    cursor: str | None = None,
    limit: Limit = 100,
) -> CapturePage:
    """Your captures, newest first (their messages and images only in the export); `next_cursor`
    pages on."""
    return capture_page(session, tenant.id, _selection(deployment, since, until), cursor, limit)


@router.delete("/captures")
def delete_captures(
    gateway: GatewayDep,
    session: SessionDep,
    tenant: CurrentTenant,
    since: Since = None,
    until: Until = None,
    deployment: str | None = None,
) -> CapturesDeleted:
    """Delete your captures (those of one deployment, of a time range; no filter: all of them),
    with the images no other capture references."""
    selection = _selection(deployment, since, until)
    release_connection(session)
    return delete_selected(gateway.sessions, gateway.capture_store, tenant.id, selection)


@router.delete("/captures/{request_id}")
def delete_capture(
    request_id: str, gateway: GatewayDep, session: SessionDep, tenant: CurrentTenant
) -> CapturesDeleted:
    """Delete one capture, by the id of its request."""
    deleted = delete_selected(
        gateway.sessions, gateway.capture_store, tenant.id, CaptureSelection(request_id=request_id)
    )
    if not deleted.captures:
        raise NotFound(f"no capture of request {request_id!r} of yours", code="capture_not_found")
    return deleted


def _summary(plan: ExportPlan) -> dict[str, str]:
    """The plan in response headers: what the CLI reports beside the lines it wrote."""
    left_out = ", ".join(f"{reason}={count}" for reason, count in sorted(plan.left_out.items()))
    return {
        "x-lorafleet-examples": str(len(plan.chosen)),
        "x-lorafleet-review": str(plan.review),
        "x-lorafleet-left-out": left_out,
    }


@router.get(
    "/deployments/{deployment}/captures/export",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "Chat JSONL, one line per capture (the trainer's format); headers "
            "x-lorafleet-examples, x-lorafleet-review and x-lorafleet-left-out "
            f"(reason=count, reasons: {', '.join(LEFT_OUT)}) summarize it",
            "content": {EXPORT_MEDIA_TYPE: {"schema": {"type": "string"}}},
        }
    },
)
def export_captures(
    deployment: str,
    gateway: GatewayDep,
    session: SessionDep,
    tenant: CurrentTenant,
    with_feedback: bool = False,
    corrections_only: bool = False,
    lowest_confidence: Annotated[int | None, Query(ge=1, le=1_000_000)] = None,
    review: bool = False,
) -> StreamingResponse:
    """The deployment's captures as the trainer's chat JSONL: corrections replace answers,
    negative feedback without one is left out (or, with `review`, marked for review);
    `with_feedback`, `corrections_only` and `lowest_confidence` N (the N least confident first,
    for review) select. Images are inlined as data URLs."""
    target = get_deployment(session, tenant, deployment)
    plan = plan_export(
        session, target, ExportOptions(with_feedback, corrections_only, lowest_confidence, review)
    )
    release_connection(session)
    return StreamingResponse(
        export_lines(gateway.sessions, gateway.capture_store, plan),
        media_type=EXPORT_MEDIA_TYPE,
        headers=_summary(plan),
    )

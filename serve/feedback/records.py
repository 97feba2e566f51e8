"""Users' feedback on answers, and the tenant's view of its request log. Pure catalog work
(blocking).

Feedback names a request by the id its response carried; it is scoped to the tenant (another
tenant's id is not found), stored with the request's deployment, rollout, variant and adapter, and
idempotent per id: posting again replaces the earlier judgement (one row per request, so nothing is
counted twice).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Select, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from lorafleet.adapters.catalog import Feedback, RequestRecord, Tenant
from lorafleet.errors import InvalidRequest
from lorafleet.serve.feedback.schemas import (
    FeedbackCreate,
    FeedbackPublic,
    RequestPage,
    RequestPublic,
)
from lorafleet.serve.route_cache import ROUTE_NEUTRAL

__all__ = [
    "record_feedback",
    "TimeRange",
    "parse_time",
    "request_page",
    "feedback_page",
    "MAX_PAGE",
]

MAX_PAGE = 1000


def record_feedback(
    session: Session,
    tenant: Tenant,
    request: RequestRecord,
    body: FeedbackCreate,
    key_id: int | None,
    now: float,
) -> tuple[Feedback, bool]:
    """Store the judgement of `request` (one of the tenant's); (row, whether it is new)."""
    if request.status != 200:
        raise InvalidRequest(
            f"request {request.request_id} failed (status {request.status}): it has no answer to "
            "judge",
            code="request_not_answered",
        )
    session.info[ROUTE_NEUTRAL] = True
    for _ in range(2):  # a concurrent first post of the same id: the loser updates the winner's row
        row = session.scalar(
            select(Feedback).where(
                Feedback.tenant_id == tenant.id, Feedback.request_id == request.request_id
            )
        )
        created = row is None
        if row is None:
            row = Feedback(
                tenant_id=tenant.id,
                request_id=request.request_id,
                deployment_id=request.deployment_id,
                deployment=request.deployment,
                rollout_id=request.rollout_id,
                variant=request.variant,
                digest=request.digest,
                at=request.at,
                created_at=now,
            )
            session.add(row)
        row.score, row.value, row.correction, row.comment = (
            body.score,
            body.value,
            body.correction,
            body.comment,
        )
        row.key_id, row.updated_at = key_id, now
        try:
            session.commit()
            return row, created
        except IntegrityError:
            session.rollback()
    raise RuntimeError(
        "feedback could not be stored"
    )  # pragma: no cover - the second attempt updates


@dataclass(frozen=True)
class TimeRange:
    since: float | None = None
    until: float | None = None


def parse_time(value: str | None, name: str) -> float | None:
    """Epoch seconds, or an ISO 8601 time (UTC unless it says otherwise)."""
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except ValueError:
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError as exc:
            raise InvalidRequest(
                f"'{name}' must be epoch seconds or an ISO 8601 time, not {value!r}",
                code="invalid_time",
            ) from exc
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        return parsed.timestamp()
    if not math.isfinite(number):
        raise InvalidRequest(
            f"'{name}' must be a finite number of epoch seconds", code="invalid_time"
        )
    return number


def _cursor(value: str | None) -> int | None:
    if value is None or value == "":
        return None
    # an id, as `next_cursor` gives it
    if not (value.isascii() and value.isdigit() and len(value) <= 18):
        raise InvalidRequest(
            f"invalid cursor {value!r}: pass the next_cursor of the previous page",
            code="invalid_cursor",
        )
    return int(value)


def _page(
    query: Select,
    column,
    times: TimeRange,
    deployment: str | None,
    cursor: str | None,
    limit: int,
    table,
) -> Select:
    if times.since is not None:
        query = query.where(table.at >= times.since)
    if times.until is not None:
        query = query.where(table.at < times.until)
    if deployment:
        query = query.where(table.deployment == deployment)
    if (before := _cursor(cursor)) is not None:
        query = query.where(column < before)
    return query.order_by(column.desc()).limit(limit + 1)


def request_page(
    session: Session,
    tenant: Tenant,
    times: TimeRange,
    deployment: str | None,
    cursor: str | None,
    limit: int,
) -> RequestPage:
    """The tenant's requests, newest first, with the feedback each got."""
    query = (
        select(RequestRecord, Feedback.score)
        .outerjoin(
            Feedback,
            (Feedback.tenant_id == RequestRecord.tenant_id)
            & (Feedback.request_id == RequestRecord.request_id),
        )
        .where(RequestRecord.tenant_id == tenant.id)
    )
    rows = session.execute(
        _page(query, RequestRecord.id, times, deployment, cursor, limit, RequestRecord)
    ).all()
    data = [
        RequestPublic.model_validate(record).model_copy(update={"feedback": score})
        for record, score in rows[:limit]
    ]
    return RequestPage(
        data=data, next_cursor=str(rows[limit - 1][0].id) if len(rows) > limit else None
    )


def feedback_page(
    session: Session,
    tenant: Tenant,
    times: TimeRange,
    deployment: str | None,
    cursor: str | None,
    limit: int,
) -> tuple[list[FeedbackPublic], str | None]:
    """The tenant's feedback, newest first."""
    query = select(Feedback).where(Feedback.tenant_id == tenant.id)
    rows = list(
        session.scalars(_page(query, Feedback.id, times, deployment, cursor, limit, Feedback))
    )
    return (
        [FeedbackPublic.model_validate(row) for row in rows[:limit]],
        str(rows[limit - 1].id) if len(rows) > limit else None,
    )

"""Capture of whole live requests for retraining, opted in per deployment (`CapturePolicy`), off by
default.

An answered request is kept with probability `sample_rate`, at most `max_per_day` per deployment and
UTC day; its images go to the capture store, content-addressed (one copy however many captures show
it), and its row references them as `lorafleet-capture:<media type>:<sha256>`. Only requests the
trainer can read back are kept (`trainer_refusal`: the roles and content parts of
`lorafleet.chat_jsonl`). Captures older than `retention_days` are deleted by the garbage collector;
opting out, or `DELETE /v1/captures`, deletes them at once, with the images no other capture
references (`lorafleet.adapters.garbage.delete_captures`).
"""

from __future__ import annotations

import base64
import binascii
import copy
import hashlib
import json
import logging
import random
import threading
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, and_, case, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from lorafleet.adapters.catalog import Capture, Deployment
from lorafleet.adapters.garbage import delete_captures
from lorafleet.adapters.store import BlobStorage
from lorafleet.chat_jsonl import content_parts
from lorafleet.errors import InvalidRequest
from lorafleet.serve.feedback.records import TimeRange
from lorafleet.serve.feedback.schemas import (
    CapturePage,
    CapturePolicy,
    CapturePublic,
    CapturesDeleted,
    CaptureStatus,
)
from lorafleet.serve.metrics import Metrics
from lorafleet.serve.route_cache import ROUTE_NEUTRAL
from lorafleet.serve.types import Route

__all__ = [
    "Capturer",
    "IMAGE_REF",
    "image_ref",
    "parse_image_ref",
    "DAY_S",
    "trainer_refusal",
    "restore_images",
    "CaptureSelection",
    "capture_page",
    "capture_status",
    "set_policy",
    "opt_out",
    "delete_selected",
]

log = logging.getLogger("lorafleet.capture")

IMAGE_REF = "lorafleet-capture:"
DAY_S = 86400.0
_ROLES = {"system", "user", "assistant"}  # what `lorafleet.chat_jsonl.load_jsonl` reads


def image_ref(media_type: str, digest: str) -> str:
    return f"{IMAGE_REF}{media_type}:{digest}"


def parse_image_ref(url: str) -> tuple[str, str] | None:
    """(media type, digest) of a capture's image reference; None for anything else."""
    if not url.startswith(IMAGE_REF):
        return None
    media_type, _, digest = url.removeprefix(IMAGE_REF).rpartition(":")
    return (media_type, digest) if media_type and len(digest) == 64 else None


def _day(at: float) -> int:
    return int(at // DAY_S)


def _image_url(part: dict) -> Any:
    return (
        (part.get("image_url") or {}).get("url")
        if isinstance(part.get("image_url"), dict)
        else None
    )


def trainer_refusal(messages: list) -> str | None:
    """Why the trainer's chat JSONL could not hold these (stored) messages, or None: system, user
    and assistant messages of text and, in user messages, images by capture reference (the chat
    path also accepts other roles and part shapes, which the trainer does not read)."""
    if not messages:
        return "no messages"
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            return (
                f"message {i}: role {message.get('role') if isinstance(message, dict) else None!r}"
            )
        if isinstance(message.get("content"), str):
            continue
        parts = message.get("content")
        if not isinstance(parts, list) or not parts:
            return f"message {i}: content is neither text nor a list of parts"
        for part in parts:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                continue
            if kind != "image_url" or parse_image_ref(str(_image_url(part))) is None:
                return (
                    f"message {i}: a content part of type {kind!r} that is not text or an "
                    "inline image"
                )
            if message["role"] != "user":
                return f"message {i}: an image in a {message['role']} message"
    return None


def restore_images(messages: list, images: BlobStorage) -> list[dict[str, Any]]:
    """A capture's messages with every image reference replaced by its data URL, read from the
    store (blocking; StoreUnavailable if an image is gone)."""
    restored = copy.deepcopy(messages)
    for message in restored:
        for part in content_parts(message):
            ref = parse_image_ref(str(_image_url(part))) if isinstance(part, dict) else None
            if ref is not None:
                media_type, digest = ref
                data = base64.b64encode(images.read(digest)).decode()
                part["image_url"] = {**part["image_url"], "url": f"data:{media_type};base64,{data}"}
    return restored


class Capturer:
    """Decides, on the event loop, which answered requests are kept (cheap), and keeps them in a
    worker thread."""

    def __init__(
        self,
        sessions: sessionmaker,
        images: BlobStorage,
        metrics: Metrics,
        max_request_bytes: int,
        rng: random.Random | None = None,
    ) -> None:
        self.sessions, self.images, self.metrics = sessions, images, metrics
        self.max_request_bytes = max_request_bytes
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        # deployment id -> (UTC day, captures kept by this gateway)
        self._today: dict[int, tuple[int, int]] = {}

    def wants(self, route: Route, now: float) -> bool:
        """Whether this answered request is drawn: its deployment captures, the draw hits, the
        day's bound is not reached as this gateway counts (`keep` checks the catalog's count,
        which every gateway shares)."""
        policy = route.capture
        if policy is None or self._rng.random() >= policy["sample_rate"]:
            return False
        day, kept = self._today.get(route.deployment_id, (_day(now), 0))
        return not (day == _day(now) and kept >= policy["max_per_day"])

    def keep(
        self,
        tenant_id: int,
        route: Route,
        messages: list,
        answer: str,
        confidence: float | None,
        now: float,
    ) -> bool:
        """Store the request's images and its row (blocking). False when the deployment no longer
        captures, the day's bound is reached, the request is too large, or the trainer could not
        read it; nothing is kept then."""
        try:
            kept, images, size = self._strip_images(messages)
        except ValueError as exc:
            log.info("request %s not captured: %s", route.request_id, exc)
            return False
        if (refusal := trainer_refusal(kept)) is not None:
            log.info(
                "request %s not captured: the trainer could not read it (%s)",
                route.request_id,
                refusal,
            )
            return False
        if size > self.max_request_bytes:
            return False
        day = _day(now)
        with self.sessions() as session:
            session.info[ROUTE_NEUTRAL] = True
            policy = _locked_policy(session, route.deployment_id)
            today = (
                session.scalar(
                    select(func.count()).where(
                        Capture.deployment_id == route.deployment_id, Capture.at >= day * DAY_S
                    )
                )
                or 0
            )
            if policy is None or today >= policy["max_per_day"]:
                session.rollback()
                self._count(
                    route.deployment_id, day, today if policy is None else policy["max_per_day"]
                )
                return False
            for data, _ in images:
                self.images.put(data)
            text = json.dumps(kept)
            session.add(
                Capture(
                    request_id=route.request_id,
                    tenant_id=tenant_id,
                    deployment_id=route.deployment_id,
                    deployment=route.deployment,
                    variant=route.variant,
                    digest=route.digest,
                    at=now,
                    messages=kept,
                    answer=answer,
                    images=sorted({d for _, d in images}),
                    confidence_mean=confidence,
                    size_bytes=len(text) + len(answer),
                )
            )
            session.commit()
        self._count(route.deployment_id, day, today + 1)
        return True

    def _count(self, deployment_id: int, day: int, kept: int) -> None:
        with self._lock:
            self._today[deployment_id] = (day, kept)

    def _strip_images(
        self, messages: list
    ) -> tuple[list[dict[str, Any]], list[tuple[bytes, str]], int]:
        """The messages with every data-URL image replaced by its store reference; the images'
        bytes and digests; the request's size, images included."""
        kept = copy.deepcopy(messages)
        images: list[tuple[bytes, str]] = []
        size = 0
        for message in kept:
            for part in content_parts(message):
                if not isinstance(part, dict):
                    continue
                if part.get("type") == "text":
                    size += len(str(part.get("text", "")))
                    continue
                url = _image_url(part) if part.get("type") == "image_url" else None
                if not isinstance(url, str) or not url.startswith("data:"):
                    continue
                header, _, payload = url.partition(",")
                media_type = (
                    header.removeprefix("data:").split(";")[0] or "application/octet-stream"
                )
                try:
                    data = base64.b64decode(payload, validate=True)
                except (binascii.Error, ValueError) as exc:
                    raise ValueError(f"an image is not valid base64: {exc}") from exc
                digest = hashlib.sha256(data).hexdigest()
                images.append((data, digest))
                size += len(data)
                part["image_url"] = {**part["image_url"], "url": image_ref(media_type, digest)}
        return kept, images, size


def _locked_policy(session: Session, deployment_id: int) -> dict | None:
    """The deployment's capture policy as the catalog has it now, with its row locked until the
    transaction ends: gateways keeping captures of one deployment take turns, so the day's count
    they check is exact, and an opt-out (which updates the row) is never followed by a capture."""
    session.execute(
        update(Deployment)
        .where(Deployment.id == deployment_id)
        .values(updated_at=Deployment.updated_at)
        .execution_options(synchronize_session=False)
    )
    return session.scalar(select(Deployment.capture).where(Deployment.id == deployment_id))


# --- the tenant's captures: policy, listing, deletion ---


@dataclass(frozen=True)
class CaptureSelection:
    """Which of a tenant's captures: by deployment name, request time, request id (None: any)."""

    deployment: str | None = None
    times: TimeRange = TimeRange()
    request_id: str | None = None

    def where(self, tenant_id: int) -> ColumnElement[bool]:
        clauses = [Capture.tenant_id == tenant_id]
        if self.deployment:
            clauses.append(Capture.deployment == self.deployment)
        if self.times.since is not None:
            clauses.append(Capture.at >= self.times.since)
        if self.times.until is not None:
            clauses.append(Capture.at < self.times.until)
        if self.request_id is not None:
            clauses.append(Capture.request_id == self.request_id)
        return and_(*clauses)


def _before(cursor: str | None) -> int | None:
    if cursor is None or cursor == "":
        return None
    # an id, as `next_cursor` gives them
    if not (cursor.isascii() and cursor.isdigit() and len(cursor) <= 18):
        raise InvalidRequest(
            f"invalid cursor {cursor!r}: pass the next_cursor of the previous page",
            code="invalid_cursor",
        )
    return int(cursor)


def capture_page(
    session: Session, tenant_id: int, selection: CaptureSelection, cursor: str | None, limit: int
) -> CapturePage:
    """The tenant's captures, newest first; `next_cursor` pages on (the cursor style of the
    request log)."""
    query = select(Capture).where(selection.where(tenant_id))
    if (before := _before(cursor)) is not None:
        query = query.where(Capture.id < before)
    rows = list(session.scalars(query.order_by(Capture.id.desc()).limit(limit + 1)))
    return CapturePage(
        data=[CapturePublic.model_validate(row) for row in rows[:limit]],
        next_cursor=str(rows[limit - 1].id) if len(rows) > limit else None,
    )


def capture_status(session: Session, deployment: Deployment, now: float) -> CaptureStatus:
    """The deployment's policy, and its captures: how many, how many today (UTC), their bytes and
    images."""
    of_it = Capture.deployment_id == deployment.id
    count, today, size = session.execute(
        select(
            func.count(),
            func.coalesce(func.sum(case((Capture.at >= _day(now) * DAY_S, 1), else_=0)), 0),
            func.coalesce(func.sum(Capture.size_bytes), 0),
        ).where(of_it)
    ).one()
    images = {d for listed in session.scalars(select(Capture.images).where(of_it)) for d in listed}
    policy = CapturePolicy.model_validate(deployment.capture) if deployment.capture else None
    return CaptureStatus(
        deployment=deployment.name,
        policy=policy,
        captures=count,
        today=today,
        bytes=size,
        images=len(images),
    )


def set_policy(session: Session, deployment: Deployment, policy: CapturePolicy) -> Deployment:
    """Capture the deployment's requests under `policy` from now on (gateways' route caches pick
    it up)."""
    deployment.capture = policy.model_dump()
    session.commit()
    return deployment


def opt_out(
    session: Session, sessions: sessionmaker, images: BlobStorage, deployment: Deployment
) -> CapturesDeleted:
    """Stop capturing, then delete everything kept of the deployment, with the images no other
    capture references. The policy goes first: a capture being kept meanwhile waits for it, sees
    it off, and keeps nothing."""
    deployment.capture = None
    session.commit()
    captures, removed = delete_captures(sessions, images, Capture.deployment_id == deployment.id)
    return CapturesDeleted(captures=captures, images=removed.count)


def delete_selected(
    sessions: sessionmaker, images: BlobStorage, tenant_id: int, selection: CaptureSelection
) -> CapturesDeleted:
    """Delete the tenant's selected captures, with the images no other capture references."""
    captures, removed = delete_captures(sessions, images, selection.where(tenant_id))
    return CapturesDeleted(captures=captures, images=removed.count)

"""Capture of whole live requests for retraining, opted in per deployment (`CapturePolicy`), off by default.

An answered request is kept with probability `sample_rate`, at most `max_per_day` per deployment and UTC day;
its images go to the capture store, content-addressed (one copy however many captures show it), and its row
references them as `lorafleet-capture:<media type>:<sha256>`. Captures older than `retention_days` are deleted by
the garbage collector; opting out, or `DELETE /v1/captures`, deletes them at once.
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
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import sessionmaker

from lorafleet.adapters.catalog import Capture
from lorafleet.adapters.store import BlobStorage
from lorafleet.chat import content_parts
from lorafleet.serve.api.forward import Route
from lorafleet.serve.metrics import Metrics
from lorafleet.serve.route_cache import ROUTE_NEUTRAL

__all__ = ["Capturer", "IMAGE_REF", "image_ref", "parse_image_ref", "DAY_S"]

log = logging.getLogger("lorafleet.capture")

IMAGE_REF = "lorafleet-capture:"
DAY_S = 86400.0


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


class Capturer:
    """Decides, on the event loop, which answered requests are kept (cheap), and keeps them in a worker thread."""

    def __init__(self, sessions: sessionmaker, images: BlobStorage, metrics: Metrics, max_request_bytes: int,
                 rng: random.Random | None = None) -> None:
        self.sessions, self.images, self.metrics = sessions, images, metrics
        self.max_request_bytes = max_request_bytes
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self._today: dict[int, tuple[int, int]] = {}  # deployment id -> (UTC day, captures kept by this gateway)

    def wants(self, route: Route, now: float) -> bool:
        """Whether this answered request is drawn: its deployment captures, the draw hits, the day's bound is not
        reached as this gateway counts (`keep` checks the catalog's count, which every gateway shares)."""
        policy = route.capture
        if policy is None or self._rng.random() >= policy["sample_rate"]:
            return False
        day, kept = self._today.get(route.deployment_id, (_day(now), 0))
        return not (day == _day(now) and kept >= policy["max_per_day"])

    def keep(self, tenant_id: int, route: Route, messages: list, answer: str, confidence: float | None,
             now: float) -> bool:
        """Store the request's images and its row (blocking). False when the day's bound is reached, the request is
        too large, or it cannot be read back; nothing is half-written then (a stored image without its row is an
        orphan the garbage collector removes)."""
        policy = route.capture
        assert policy is not None
        try:
            kept, digests, size = self._strip_images(messages)
        except ValueError as exc:
            log.info("request %s not captured: %s", route.request_id, exc)
            return False
        if size > self.max_request_bytes:
            return False
        day = _day(now)
        with self.sessions() as session:
            session.info[ROUTE_NEUTRAL] = True
            today = session.scalar(select(func.count()).where(Capture.deployment_id == route.deployment_id,
                                                              Capture.at >= day * DAY_S)) or 0
            if today >= policy["max_per_day"]:
                self._count(route.deployment_id, day, policy["max_per_day"])
                return False
            for data, _ in digests:
                self.images.put(data)
            text = json.dumps(kept)
            session.add(Capture(request_id=route.request_id, tenant_id=tenant_id, deployment_id=route.deployment_id,
                                deployment=route.deployment, variant=route.variant, digest=route.digest, at=now,
                                messages=kept, answer=answer, images=sorted({d for _, d in digests}),
                                confidence_mean=confidence, size_bytes=len(text) + len(answer)))
            session.commit()
        self._count(route.deployment_id, day, today + 1)
        return True

    def _count(self, deployment_id: int, day: int, kept: int) -> None:
        with self._lock:
            self._today[deployment_id] = (day, kept)

    def _strip_images(self, messages: list) -> tuple[list[dict[str, Any]], list[tuple[bytes, str]], int]:
        """The messages with every data-URL image replaced by its store reference; the images' bytes and digests;
        the request's size, images included."""
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
                url = (part.get("image_url") or {}).get("url") if part.get("type") == "image_url" else None
                if not isinstance(url, str) or not url.startswith("data:"):
                    continue
                header, _, payload = url.partition(",")
                media_type = header.removeprefix("data:").split(";")[0] or "application/octet-stream"
                try:
                    data = base64.b64decode(payload, validate=True)
                except (binascii.Error, ValueError) as exc:
                    raise ValueError(f"an image is not valid base64: {exc}") from exc
                digest = hashlib.sha256(data).hexdigest()
                images.append((data, digest))
                size += len(data)
                part["image_url"] = {**part["image_url"], "url": image_ref(media_type, digest)}
        return kept, images, size

"""A deployment's captures as the trainer's chat JSONL (`lorafleet.chat_jsonl`): `lorafleet train`
reads the file as it is.

One line per capture: the request's messages as sent (images inlined as data URLs again), then the
answer as the last assistant message, and a `metadata` object the trainer ignores:

    {"messages": [..., {"role": "assistant", "content": ANSWER}],
     "metadata": {"request_id", "variant", "adapter", "at", "confidence_mean",
                  "feedback": {"score", "comment"} | null, "answer": "served" | "correction",
                  "review": bool}}

What is exported, and how (`ExportOptions`):
- a correction, when the feedback has one, replaces the served answer: it is what should have been
  said;
- negative feedback (value < 0.5) without a correction leaves the capture out (its answer is known
  to be wrong), or with `review` keeps it marked `"review": true`, for a person to correct;
- `with_feedback`: only captures that got feedback; `corrections_only`: only those with a
  correction;
- `lowest_confidence` N: the N least confident answers, least confident first, all marked for
  review; otherwise oldest first.

The plan (which captures, in which order, and why the others were left out) is made first from the
rows without their images; the lines are then written one at a time, each capture's images read from
the store as it goes.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from lorafleet.adapters.catalog import Capture, Deployment, Feedback
from lorafleet.adapters.store import BlobStorage
from lorafleet.errors import StoreUnavailable
from lorafleet.serve.feedback.capture import restore_images, trainer_refusal

__all__ = [
    "ExportOptions",
    "ExportPlan",
    "Chosen",
    "LEFT_OUT",
    "NEGATIVE",
    "plan_export",
    "export_lines",
]

log = logging.getLogger("lorafleet.capture")

NEGATIVE = 0.5  # feedback values below this judge the answer wrong (thumbs down is 0)
BATCH = 64  # captures read per catalog query while the lines are written
# why a capture is not in the export
LEFT_OUT = {
    "negative_feedback": "negative feedback without a correction",
    "no_feedback": "no feedback",
    "no_correction": "no correction",
    "no_confidence": "no confidence recorded",
    "not_least_confident": "not among the least confident",
}


@dataclass(frozen=True)
class ExportOptions:
    with_feedback: bool = False
    corrections_only: bool = False
    lowest_confidence: int | None = None  # N: only the N least confident, least confident first
    review: bool = False  # keep negative feedback without a correction, marked for review


@dataclass(frozen=True)
class Chosen:
    """One capture in the export, and how its line reads."""

    capture_id: int
    confidence: float | None
    feedback: dict | None  # {"score", "comment"}
    correction: str | None  # replaces the served answer
    review: bool


@dataclass(frozen=True)
class ExportPlan:
    chosen: list[Chosen]
    left_out: Counter[str] = field(default_factory=Counter)  # reason (a LEFT_OUT key) -> captures

    @property
    def review(self) -> int:
        return sum(c.review for c in self.chosen)


@dataclass(frozen=True)
class _Row:
    capture_id: int
    confidence: float | None
    score: float | None  # None: no feedback
    value: float | None
    comment: str | None
    correction: str | None


def _judge(row: _Row, options: ExportOptions) -> Chosen | str:
    """The capture's line, or why it is left out (a LEFT_OUT key)."""
    correction = row.correction or None  # an empty correction corrects nothing
    if options.corrections_only and correction is None:
        return "no_correction"
    if options.with_feedback and row.score is None:
        return "no_feedback"
    negative = row.value is not None and row.value < NEGATIVE and correction is None
    if negative and not options.review:
        return "negative_feedback"
    feedback = None if row.score is None else {"score": row.score, "comment": row.comment or ""}
    return Chosen(row.capture_id, row.confidence, feedback, correction, review=negative)


def _least_confident(chosen: list[Chosen], n: int, left_out: Counter[str]) -> list[Chosen]:
    ranked = [c for c in chosen if c.confidence is not None]
    left_out["no_confidence"] += len(chosen) - len(ranked)
    ranked.sort(key=lambda c: (c.confidence, c.capture_id))
    left_out["not_least_confident"] += max(0, len(ranked) - n)
    return [
        Chosen(c.capture_id, c.confidence, c.feedback, c.correction, review=True)
        for c in ranked[:n]
    ]


def plan_export(session: Session, deployment: Deployment, options: ExportOptions) -> ExportPlan:
    """Which of the deployment's captures go in the export, in order, and why the others do not
    (images are not read here)."""
    query = (
        select(
            Capture.id,
            Capture.confidence_mean,
            Feedback.score,
            Feedback.value,
            Feedback.comment,
            Feedback.correction,
        )
        .outerjoin(
            Feedback,
            (Feedback.tenant_id == Capture.tenant_id) & (Feedback.request_id == Capture.request_id),
        )
        .where(Capture.deployment_id == deployment.id)
        .order_by(Capture.at, Capture.id)
    )
    chosen: list[Chosen] = []
    left_out: Counter[str] = Counter()
    for row in session.execute(query):
        judged = _judge(_Row(*row), options)
        if isinstance(judged, str):
            left_out[judged] += 1
        else:
            chosen.append(judged)
    if options.lowest_confidence is not None:
        chosen = _least_confident(chosen, options.lowest_confidence, left_out)
    return ExportPlan(chosen, +left_out)


def _line(capture: Capture, chosen: Chosen, images: BlobStorage) -> dict[str, Any]:
    answer = chosen.correction if chosen.correction is not None else capture.answer
    return {
        "messages": [
            *restore_images(capture.messages, images),
            {"role": "assistant", "content": answer},
        ],
        "metadata": {
            "request_id": capture.request_id,
            "variant": capture.variant,
            "adapter": capture.digest,
            "at": capture.at,
            "confidence_mean": capture.confidence_mean,
            "feedback": chosen.feedback,
            "answer": "served" if chosen.correction is None else "correction",
            "review": chosen.review,
        },
    }


def export_lines(sessions: sessionmaker, images: BlobStorage, plan: ExportPlan) -> Iterator[bytes]:
    """The plan's JSONL lines, one capture at a time (blocking: the catalog in batches, the
    images from the store). A capture deleted since the plan, or whose image is gone, is skipped
    (and logged)."""
    for start in range(0, len(plan.chosen), BATCH):
        batch = plan.chosen[start : start + BATCH]
        with sessions() as session:
            rows = {
                c.id: c
                for c in session.scalars(
                    select(Capture).where(Capture.id.in_([chosen.capture_id for chosen in batch]))
                )
            }
        for chosen in batch:
            capture = rows.get(chosen.capture_id)
            if capture is None:
                continue
            if (refusal := trainer_refusal(capture.messages)) is not None:
                log.warning(
                    "capture %s not exported: the trainer could not read it (%s)",
                    capture.request_id,
                    refusal,
                )
                continue
            try:
                line = _line(capture, chosen, images)
            except StoreUnavailable as exc:
                log.warning("capture %s not exported: %s", capture.request_id, exc.message)
                continue
            yield (json.dumps(line, ensure_ascii=False) + "\n").encode()

"""A deployment's fixed validation set: checked, stored content-addressed, and replayed through the
engine.

The file is the training format (chat JSONL, last message = the reference answer) with images as
data URLs only (a path or URL is refused: it would name a server file or make the gateway fetch);
`lorafleet validation push` inlines local image paths before uploading.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from lorafleet.adapters.catalog import Deployment, Tenant, ValidationSet
from lorafleet.chat_jsonl import answer_of, load_jsonl
from lorafleet.errors import DataError, InvalidRequest
from lorafleet.scoring import METRICS
from lorafleet.serve.answer_format import enforce_format
from lorafleet.serve.engine.client import Engines, map_engine_errors, public_engine_message
from lorafleet.serve.feedback.confidence import summarize, token_logprobs
from lorafleet.serve.rollouts.statistics import Measurement, paired_gate

__all__ = [
    "MAX_ITEMS",
    "ValidationItem",
    "Replay",
    "canonical_validation",
    "attach_validation",
    "read_items",
    "replay_and_score",
    "paired_test",
    "score",
    "require_validation_set",
]

MAX_ITEMS = 5000


@dataclass(frozen=True)
class ValidationItem:
    messages: list[dict[str, Any]]  # the request, as a client sends it
    answer: str  # the reference


def canonical_validation(path: Path, metric: str) -> tuple[bytes, int]:
    """Check every line (as the trainer does) and the metric; return the canonical JSONL and its
    item count."""
    if metric not in METRICS:
        raise InvalidRequest(
            f"unknown metric {metric!r}; choose from {', '.join(METRICS)}", code="invalid_metric"
        )
    # a client's file: no server paths, no URLs to fetch
    examples = load_jsonl(path, local_images=False)
    if len(examples) > MAX_ITEMS:
        raise InvalidRequest(
            f"the validation set has {len(examples)} items; the limit is {MAX_ITEMS}"
        )
    lines = []
    for example in examples:
        try:
            METRICS[metric](answer_of(example), answer_of(example))
        except ValueError as exc:
            raise DataError(example.source, f"metric {metric}: {exc}") from exc
        lines.append(
            json.dumps({"messages": example.messages}, sort_keys=True, separators=(",", ":"))
        )
    return ("\n".join(lines) + "\n").encode(), len(examples)


def attach_validation(
    session: Session,
    tenant: Tenant,
    deployment: Deployment,
    digest: str,
    metric: str,
    items: int,
    size_bytes: int,
) -> ValidationSet:
    """Record the stored set (once per content and metric) and make it the deployment's
    validation set."""
    found = session.scalar(
        select(ValidationSet).where(
            ValidationSet.tenant_id == tenant.id,
            ValidationSet.digest == digest,
            ValidationSet.metric == metric,
        )
    )
    if found is None:
        found = ValidationSet(
            tenant_id=tenant.id, digest=digest, metric=metric, items=items, size_bytes=size_bytes
        )
        session.add(found)
    deployment.validation_set = found
    session.commit()
    return found


def require_validation_set(deployment: Deployment) -> ValidationSet:
    """The deployment's validation set, or the 400 that says how to give it one."""
    if deployment.validation_set is None:
        raise InvalidRequest(
            f"deployment {deployment.name!r} has no validation set: push one with "
            "`lorafleet validation push`",
            code="no_validation_set",
        )
    return deployment.validation_set


def read_items(data: bytes) -> list[ValidationItem]:
    """The stored canonical file's bytes (already checked at upload): requests and reference
    answers."""
    items = []
    for line in data.decode("utf-8").splitlines():
        messages = json.loads(line)["messages"]
        items.append(ValidationItem(messages=messages[:-1], answer=messages[-1]["content"]))
    return items


@dataclass(frozen=True)
class Replay:
    """One adapter's greedy answers to a validation set, their lengths in tokens, their task
    scores and their confidences (each answer's mean token log-probability; None where the engine
    returned none)."""

    digest: str
    outputs: list[str]
    tokens: list[int]
    scores: list[float]
    confidences: list[float | None]

    @property
    def mean(self) -> float:
        return sum(self.scores) / len(self.scores)


async def replay_and_score(
    engines: Engines,
    digest: str,
    items: list[ValidationItem],
    metric: str,
    max_tokens: int,
    concurrency: int = 8,
    answered: Callable[[], None] | None = None,
    answer_format: dict | None = None,
    tenant: str = "",
) -> Replay:
    """The one replay path of the gate, A/B evaluation and drift replay: register adapter
    `digest`, let it answer every item through the engine (greedy, the same path as live
    traffic), score the answers. The chosen tokens' log-probabilities come along (`logprobs`
    changes no token): the baseline of confidence drift. `answered` is called after each
    answer (progress). The deployment's `answer_format`, where enforced, constrains the answers
    as it does live traffic's. In front of an InferencePool the replays are the `tenant`'s,
    under the pool's replay objective."""
    engine = engines.client_for(digest)  # in a fleet: the replica that serves the adapter
    await engine.ensure_loaded(digest)
    headers = engine.flow_headers(tenant, replay=True)
    limit = asyncio.Semaphore(concurrency)

    async def one(item: ValidationItem) -> tuple[str, int, float | None]:
        body = {
            "model": digest,
            "messages": item.messages,
            "temperature": 0,
            "max_tokens": max_tokens,
            "logprobs": True,
        }
        body = enforce_format(body, answer_format)
        async with limit:
            with map_engine_errors():
                response = await engine.http.post(
                    "/v1/chat/completions", json=body, headers=headers
                )
        # e.g. an item the engine refuses (too long for max_model_len)
        if response.status_code != 200:
            refusal = public_engine_message(response.text, engine.private_paths)[:300]
            raise InvalidRequest(
                f"the engine refused a validation item ({response.status_code}): {refusal}",
                code="validation_replay_failed",
            )
        if answered is not None:
            answered()
        payload = response.json()
        choice = payload["choices"][0]
        confidence = summarize(list(token_logprobs(choice)))
        mean = confidence.mean if confidence else None
        return choice["message"]["content"] or "", payload["usage"]["completion_tokens"], mean

    answers = await asyncio.gather(*(one(item) for item in items))
    outputs, tokens, confidences = (
        [a[0] for a in answers],
        [a[1] for a in answers],
        [a[2] for a in answers],
    )
    # metrics such as ANLS are CPU work
    scores = await run_in_threadpool(score, outputs, items, metric)
    return Replay(digest, outputs, tokens, scores, confidences)


async def paired_test(
    reference: list[float], candidate: list[float], margin: float, alpha: float
) -> Measurement:
    """`paired_gate` off the event loop (the bootstrap resamples thousands of times)."""
    return await run_in_threadpool(paired_gate, reference, candidate, margin, alpha)


def score(outputs: list[str], items: list[ValidationItem], metric: str) -> list[float]:
    """Each answer's task score against its item's reference."""
    return [METRICS[metric](text, item.answer) for text, item in zip(outputs, items)]

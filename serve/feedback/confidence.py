"""An answer's confidence: the mean and the least log-probability of the tokens the engine chose.

The engine returns them when a request has `"logprobs": true` (OpenAI's field:
`choices[i].logprobs.content[j] .logprob`); the gateway asks for them on every request and hides
them again from a client that did not. Only choice 0 is read, the answer that the format check and
the drift sample read too.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Confidence", "token_logprobs", "summarize"]


@dataclass(frozen=True)
class Confidence:
    """How sure the engine was of an answer: the mean and the least log-probability of its
    tokens."""

    mean: float
    least: float


def token_logprobs(choice: dict) -> Iterable[float]:
    """The chosen tokens' log-probabilities of one choice (or stream delta), finite ones only."""
    content = (choice.get("logprobs") or {}).get("content") or ()
    for entry in content:
        value = entry.get("logprob") if isinstance(entry, dict) else None
        if isinstance(value, (int, float)) and math.isfinite(value):
            yield float(value)


def summarize(logprobs: list[float] | None) -> Confidence | None:
    """An answer's confidence from its token log-probabilities; None when none were recorded."""
    if not logprobs:
        return None
    return Confidence(sum(logprobs) / len(logprobs), min(logprobs))

"""Task metrics, one function per name: how an answer scores against its reference (trainer and
gateway)."""

from __future__ import annotations

import json
from collections.abc import Callable

__all__ = ["METRICS", "exact_match", "anls", "json_fields", "json_object"]


def _norm(text: str) -> str:
    return " ".join(text.strip().casefold().split())


def exact_match(prediction: str, reference: str) -> float:
    return float(_norm(prediction) == _norm(reference))


def _levenshtein(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(prediction: str, reference: str, threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity (DocVQA): 1 - NL, or 0 when NL is above the
    threshold."""
    p, r = _norm(prediction), _norm(reference)
    if not p and not r:
        return 1.0
    distance = _levenshtein(p, r) / max(len(p), len(r))
    return 1.0 - distance if distance < threshold else 0.0


def json_object(text: str) -> dict | None:
    try:
        value = json.loads(text)
    except (ValueError, TypeError):
        return None
    return value if isinstance(value, dict) else None


def json_fields(prediction: str, reference: str) -> float:
    """Share of the reference object's fields that the prediction reproduces (0 if it is not a
    JSON object)."""
    expected, got = json_object(reference), json_object(prediction)
    if expected is None:
        raise ValueError(f"reference is not a JSON object: {reference[:60]!r}")
    if got is None or not expected:
        return float(got == expected)
    return sum(got.get(k) == v for k, v in expected.items()) / len(expected)


METRICS: dict[str, Callable[[str, str], float]] = {
    "exact_match": exact_match,
    "anls": anls,
    "json_fields": json_fields,
}

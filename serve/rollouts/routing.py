"""Sticky, monotone traffic assignment: which variant of a deployment serves one request.

bucket = sha256(salt | tenant | deployment | unit) mod 10,000. Variants own consecutive bucket
ranges in table order, sized by their weights; a canary is listed first, so raising its weight only
extends its range and a unit never flips back and forth. A new rollout has a new salt, so it
reshuffles units.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["BUCKETS", "Variant", "bucket_of", "unit_of", "choose", "check_weights"]

BUCKETS = 10_000


@dataclass(frozen=True)
class Variant:
    label: str  # "stable", "canary", or the version ("json@2") in an A/B test
    digest: str
    ref: str  # NAME@N
    weight: float  # percent


def bucket_of(salt: str, tenant: str, deployment: str, unit: str) -> int:
    digest = hashlib.sha256(f"{salt}|{tenant}|{deployment}|{unit}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def unit_of(body: Mapping, headers: Mapping[str, str]) -> str:
    """The unit of assignment: the request's `user`, else the `x-lorafleet-session` header, else
    the request."""
    user = body.get("user")
    if isinstance(user, str) and user:
        return "user:" + user
    if session := headers.get("x-lorafleet-session"):
        return "session:" + session
    return "request:" + (headers.get("x-request-id") or uuid.uuid4().hex)


def choose(variants: Sequence[Variant], bucket: int) -> Variant:
    """The variant whose bucket range holds `bucket` (weights in percent, 0.01 % resolution)."""
    upper = 0
    for variant in variants:
        upper += round(variant.weight * BUCKETS / 100)
        if bucket < upper:
            return variant
    return variants[-1]  # rounding: the last variant owns the remainder


def check_weights(weights: Sequence[float]) -> None:
    """Weights are percents > 0 with at most two decimals that sum to 100."""
    if any(w <= 0 or w > 100 for w in weights):
        raise ValueError(f"weights must be between 0 (exclusive) and 100, got {list(weights)}")
    if any(abs(w * 100 - round(w * 100)) > 1e-6 for w in weights):
        raise ValueError(f"weights have at most two decimals (10,000 buckets), got {list(weights)}")
    if abs(sum(weights) - 100) > 1e-6:
        raise ValueError(f"weights must sum to 100, got {sum(weights):g}")

"""Sticky, monotone assignment (pure)."""

from __future__ import annotations

import pytest

from lorafleet.serve.rollouts.routing import (
    BUCKETS,
    Variant,
    bucket_of,
    check_weights,
    choose,
    unit_of,
)


def _table(canary_weight: float) -> list[Variant]:
    return [
        Variant("canary", "c" * 64, "m@2", canary_weight),
        Variant("stable", "s" * 64, "m@1", 100 - canary_weight),
    ]


def test_bucket_is_deterministic_and_in_range():
    assert bucket_of("salt", "acme", "invoices", "user:1") == bucket_of(
        "salt", "acme", "invoices", "user:1"
    )
    assert all(
        0 <= bucket_of("salt", "acme", "invoices", f"user:{i}") < BUCKETS for i in range(1000)
    )


def test_a_new_salt_reshuffles_units():
    first = [bucket_of("a", "t", "d", f"u{i}") for i in range(200)]
    second = [bucket_of("b", "t", "d", f"u{i}") for i in range(200)]
    assert sum(x == y for x, y in zip(first, second)) < 5


def test_raising_the_canary_weight_only_adds_units():
    units = [f"user:{i}" for i in range(5000)]
    previous: set[str] = set()
    for weight in (1, 10, 25, 50, 99.99):
        canary = {
            u
            for u in units
            if choose(_table(weight), bucket_of("s", "t", "d", u)).label == "canary"
        }
        assert previous <= canary  # nobody who had the canary goes back to stable
        assert abs(len(canary) / len(units) - weight / 100) < 0.03
        previous = canary


def test_weights_split_buckets_exactly():
    table = [
        Variant("a", "a", "x@1", 33.33),
        Variant("b", "b", "x@2", 33.33),
        Variant("c", "c", "x@3", 33.34),
    ]
    counts = {"a": 0, "b": 0, "c": 0}
    for bucket in range(BUCKETS):
        counts[choose(table, bucket).label] += 1
    assert counts == {"a": 3333, "b": 3333, "c": 3334}


def test_unit_prefers_user_then_session_then_request_id():
    assert unit_of({"user": "u1"}, {"x-lorafleet-session": "s1"}) == "user:u1"
    assert unit_of({}, {"x-lorafleet-session": "s1"}) == "session:s1"
    assert unit_of({}, {"x-request-id": "r1"}) == "request:r1"
    assert unit_of({}, {}) != unit_of({}, {})  # no unit: every request is its own


@pytest.mark.parametrize(
    "weights, message",
    [
        ([50, 40], "sum to 100"),
        ([100, 0], "between 0"),
        ([50.001, 49.999], "two decimals"),
        ([-10, 110], "between 0"),
    ],
)
def test_bad_weights_are_refused(weights, message):
    with pytest.raises(ValueError, match=message):
        check_weights(weights)

"""A run that ends with its validation loss still falling says so, and what to try."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafleet.train.config import TrainConfig
from lorafleet.train.result import TrainResult, still_improving


def _result(val_losses: list[float], stopped_early: bool = False) -> TrainResult:
    return TrainResult(
        out=Path("out"),
        steps=30,
        resumed_from=0,
        best_val_loss=min(val_losses, default=None),
        stopped_early=stopped_early,
        samples_per_s=1.0,
        peak_memory_mb=1.0,
        processes=1,
        val_losses=tuple(val_losses),
    )


@pytest.mark.parametrize(
    ("losses", "expected"),
    [
        ([1.2, 0.8, 0.5], True),  # the last validation is the best, by far
        ([1.2, 0.8, 0.795], False),  # flattening out: under 2 % better
        ([1.2, 0.5, 0.6], False),  # the best was earlier
        ([0.9], None),  # one validation says nothing
        ([], None),
    ],
)
def test_still_improving_means_the_last_validation_is_the_best_by_a_margin(losses, expected):
    assert still_improving(losses) is expected


def test_a_run_stopped_while_the_loss_falls_is_not_converged_and_says_what_to_try():
    # defaults: lr 2e-4, 3 epochs
    config = TrainConfig(base="b", train=Path("t.jsonl"), out=Path("o"))
    result = _result([1.31, 0.92, 0.61])
    assert result.converged is False
    advice = result.advice(config)
    assert advice is not None and "not converged" in advice and "0.9200 -> 0.6100" in advice
    assert "--epochs 6" in advice and "--lr 0.001" in advice


def test_a_run_that_stopped_improving_or_stopped_early_gets_no_advice():
    config = TrainConfig(base="b", train=Path("t.jsonl"), out=Path("o"))
    assert (
        _result([1.3, 0.6, 0.61]).converged is True
        and _result([1.3, 0.6, 0.61]).advice(config) is None
    )
    assert _result([1.3, 0.9, 0.5], stopped_early=True).converged is True
    assert _result([0.7]).converged is None and _result([0.7]).advice(config) is None

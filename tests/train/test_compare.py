"""The evaluation report says plainly when an adapter did not help or made the base forget."""

from __future__ import annotations

from lorafleet.train.compare import EvalReport, SetScore


def test_helpful_adapter_gets_no_warning():
    report = EvalReport(
        sets=[
            SetScore("validation", "exact_match", 50, base=0.05, adapter=0.95),
            SetScore("probe", "exact_match", 50, base=0.98, adapter=0.96),
        ]
    )
    assert report.verdicts() == []


def test_adapter_that_did_not_help_is_called_out():
    report = EvalReport(sets=[SetScore("validation", "anls", 50, base=0.61, adapter=0.60)])
    assert report.verdicts() == [
        "The adapter did NOT help: anls 0.600 vs the base's 0.610 on the validation set (n=50)."
    ]


def test_forgetting_beyond_tolerance_is_called_out():
    report = EvalReport(
        sets=[
            SetScore("validation", "exact_match", 50, base=0.0, adapter=0.9),
            SetScore("probe", "exact_match", 50, base=0.98, adapter=0.80),
        ]
    )
    (verdict,) = report.verdicts()
    assert "Forgetting" in verdict and "18.0 points" in verdict

"""Rollout statistics and decisions (pure): one hand-built case per branch."""

from __future__ import annotations

import json
import random

import pytest

from lorafleet.serve.rollouts.state import CanaryView, RolloutStart, plan_tick
from lorafleet.serve.rollouts.statistics import (
    Limits,
    Status,
    VariantSamples,
    assess_step,
    compare_variants,
    look_alpha,
    paired_gate,
    proportion_harm,
    sample_ratio,
    worst,
)

LIMITS = Limits(min_requests=50)


def _samples(n: int, errors: int = 0, invalid: int = 0, latency: float = 0.2, units: int | None = None,
             seed: int = 0) -> VariantSamples:
    rng = random.Random(seed)
    return VariantSamples(requests=n, errors=errors, units=n if units is None else units,
                          latencies_s=[latency * rng.uniform(0.8, 1.2) for _ in range(n - errors)],
                          format_checked=n - errors, format_invalid=invalid, output_tokens=[10] * (n - errors))


def test_worst_orders_statuses():
    assert worst([Status.SUCCESSFUL, Status.INCONCLUSIVE, Status.RUNNING]) is Status.INCONCLUSIVE
    assert worst([Status.INCONCLUSIVE, Status.FAILED]) is Status.FAILED
    assert worst([]) is Status.SUCCESSFUL


def test_alpha_spending_sums_to_alpha_over_any_number_of_looks():
    assert sum(look_alpha(0.05, k) for k in range(1, 100_000)) == pytest.approx(0.05, rel=1e-4)
    assert look_alpha(0.05, 2) < look_alpha(0.05, 1)


def test_broken_format_rolls_back_at_the_first_look():
    result = assess_step(_samples(20, invalid=20), _samples(180, seed=1), {"canary": 10, "stable": 90}, 1, LIMITS,
                         may_advance=False)
    assert result.outcome == "rollback"
    assert result.reason == "FormatValidityRegressed"
    failed = next(m for m in result.measurements if m.metric == "format_validity")
    assert failed.p < failed.alpha and failed.effect > 0.8


def test_higher_error_rate_rolls_back():
    result = assess_step(_samples(100, errors=30), _samples(900, errors=9, seed=1), {"canary": 10, "stable": 90}, 1,
                         LIMITS, may_advance=True)
    assert (result.outcome, result.reason) == ("rollback", "ErrorRateRegressed")


def test_slower_candidate_rolls_back_only_beyond_the_tolerance():
    slower = assess_step(_samples(100, latency=0.4), _samples(900, seed=1), {"canary": 10, "stable": 90}, 1, LIMITS,
                         may_advance=True)
    assert (slower.outcome, slower.reason) == ("rollback", "LatencyRegressed")
    slightly = assess_step(_samples(100, latency=0.22), _samples(900, seed=1), {"canary": 10, "stable": 90}, 1,
                           LIMITS, may_advance=True)
    assert slightly.outcome == "advance"


def test_too_few_requests_extends_the_step():
    result = assess_step(_samples(20), _samples(180, seed=1), {"canary": 10, "stable": 90}, 1, LIMITS,
                         may_advance=True)
    assert (result.outcome, result.status, result.reason) == ("extend", Status.INCONCLUSIVE, "SampleTooSmall")


def test_equal_variants_advance_once_the_interval_passed():
    args = (_samples(100), _samples(900, seed=1), {"canary": 10, "stable": 90}, 1, LIMITS)
    assert assess_step(*args, may_advance=False).outcome == "extend"
    assert assess_step(*args, may_advance=True).outcome == "advance"


def test_sample_ratio_mismatch_is_detected_on_units():
    assert sample_ratio({"canary": 200, "stable": 800}, {"canary": 10, "stable": 90}, LIMITS).status is Status.FAILED
    assert sample_ratio({"canary": 95, "stable": 905}, {"canary": 10, "stable": 90}, LIMITS).status is Status.SUCCESSFUL
    assert sample_ratio({"canary": 1, "stable": 9}, {"canary": 10, "stable": 90}, LIMITS).status is Status.PENDING


def test_mismatched_ratio_rolls_back():
    result = assess_step(_samples(300), _samples(700, seed=1), {"canary": 10, "stable": 90}, 1, LIMITS, True)
    assert (result.outcome, result.reason) == ("rollback", "SampleRatioMismatch")


def test_small_differences_within_the_margin_are_not_harm():
    m = proportion_harm("error_rate", 2, 100, 9, 900, 0.01, 0.01, LIMITS, "ErrorRateRegressed")
    assert m.status is Status.SUCCESSFUL


def test_gate_refuses_a_worse_candidate_with_mcnemar():
    stable, candidate = [1.0] * 40, [1.0] * 10 + [0.0] * 30
    m = paired_gate(stable, candidate, margin=0.05)
    assert (m.status, m.reason, m.test) == (Status.FAILED, "ValidationRegressed", "McNemar exact")
    assert m.extra == {"stable_only": 30, "candidate_only": 0} and m.p < 1e-6


def test_gate_admits_an_identical_candidate():
    scores = [1.0] * 35 + [0.0] * 5
    m = paired_gate(scores, list(scores), margin=0.05)
    assert m.status is Status.SUCCESSFUL and m.interval == (0.0, 0.0)


def test_gate_margin_decides_small_differences():
    stable = [1.0] * 190 + [0.0] * 10
    candidate = [1.0] * 188 + [0.0] * 12
    assert paired_gate(stable, candidate, margin=0.05).status is Status.SUCCESSFUL
    assert paired_gate(stable, candidate, margin=0.001).status is Status.FAILED


def test_gate_uses_a_paired_bootstrap_for_graded_scores():
    rng = random.Random(0)
    stable = [rng.uniform(0.6, 1.0) for _ in range(100)]
    assert paired_gate(stable, [s - 0.3 for s in stable], margin=0.05).status is Status.FAILED
    m = paired_gate(stable, [min(1.0, s + 0.01) for s in stable], margin=0.05)
    assert m.status is Status.SUCCESSFUL and m.test.startswith("paired bootstrap")


def _view(step_index: int = 0, started: float = 0.0, last_look: float = 0.0, last_requests: int = 0) -> CanaryView:
    params = RolloutStart(to="m@2", steps=[10, 50], min_requests=50, interval_s=60, look_requests=25)
    return CanaryView(step_index, params.steps, 0, started, last_look, last_requests, params)


def test_plan_waits_until_a_look_is_due():
    assert plan_tick(_view(), {"canary": _samples(10), "stable": _samples(90)}, now=30) is None


def test_plan_looks_early_after_enough_new_canary_requests():
    tick = plan_tick(_view(), {"canary": _samples(30, invalid=30), "stable": _samples(270)}, now=5)
    assert tick is not None and tick.action == "rollback"


def test_plan_advances_then_promotes_after_the_last_step():
    samples = {"canary": _samples(100), "stable": _samples(900, seed=1)}
    assert plan_tick(_view(0), samples, now=61).action == "advance"
    assert plan_tick(_view(1), {"canary": _samples(500), "stable": _samples(500, seed=1)}, now=61).action == "promote"


def test_rollout_steps_must_increase_and_end_at_100():
    assert RolloutStart(to="m", steps=[5, 20]).steps == [5, 20, 100]
    with pytest.raises(ValueError, match="increasing"):
        RolloutStart(to="m", steps=[50, 10])


def test_ab_comparison_of_identical_constant_samples_is_valid_json():
    a, b = _samples(40), _samples(40)
    compared = compare_variants(a, b)
    assert compared["output_tokens"] == {"diff": 0.0, "interval": [0.0, 0.0], "p": 1.0}
    json.dumps(compared, allow_nan=False)
    zero = VariantSamples(requests=20, errors=0, units=20, latencies_s=[0.0] * 20)
    json.dumps(assess_step(_samples(20), zero, {"canary": 50, "stable": 50}, 1, LIMITS, True).measurements[2]
               .to_dict(), allow_nan=False)  # an infinite median ratio is written as null


def test_a_format_failure_names_the_rollback_even_when_the_candidate_is_also_slower():
    slow_broken = _samples(60, invalid=60, latency=1.0)
    assessment = assess_step(slow_broken, _samples(600, seed=1), {"canary": 10, "stable": 90}, 1, LIMITS, True)
    assert (assessment.outcome, assessment.reason) == ("rollback", "FormatValidityRegressed")
    assert [m.metric for m in assessment.measurements if m.status is Status.FAILED] == ["format_validity", "latency"]

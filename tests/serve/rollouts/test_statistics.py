"""Rollout statistics and decisions (pure): one hand-built case per branch."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import numpy as np
import pytest
from scipy import stats

from lorafleet.serve.rollouts.state import CanaryView, RolloutStart, plan_tick
from lorafleet.serve.rollouts.statistics import (
    Limits,
    Moments,
    Status,
    VariantSamples,
    assess_step,
    bounded_difference,
    bounded_difference_se,
    bounded_mean,
    compare_variants,
    confidence_difference,
    difference_ci,
    feedback_harm,
    look_alpha,
    paired_gate,
    proportion_harm,
    rate_difference,
    sample_ratio,
    welch_difference,
    welch_mean,
    worst,
)

LIMITS = Limits(min_requests=50)


def _samples(
    n: int,
    errors: int = 0,
    invalid: int = 0,
    latency: float = 0.2,
    units: int | None = None,
    seed: int = 0,
) -> VariantSamples:
    rng = random.Random(seed)
    return VariantSamples(
        requests=n,
        errors=errors,
        units=n if units is None else units,
        latencies_s=[latency * rng.uniform(0.8, 1.2) for _ in range(n - errors)],
        format_checked=n - errors,
        format_invalid=invalid,
        output_tokens=[10] * (n - errors),
    )


def test_worst_orders_statuses():
    assert worst([Status.SUCCESSFUL, Status.INCONCLUSIVE, Status.RUNNING]) is Status.INCONCLUSIVE
    assert worst([Status.INCONCLUSIVE, Status.FAILED]) is Status.FAILED
    assert worst([]) is Status.SUCCESSFUL


def test_alpha_spending_sums_to_alpha_over_any_number_of_looks():
    assert sum(look_alpha(0.05, k) for k in range(1, 100_000)) == pytest.approx(0.05, rel=1e-4)
    assert look_alpha(0.05, 2) < look_alpha(0.05, 1)


def test_broken_format_rolls_back_at_the_first_look():
    result = assess_step(
        _samples(20, invalid=20),
        _samples(180, seed=1),
        {"canary": 10, "stable": 90},
        1,
        LIMITS,
        may_advance=False,
    )
    assert result.outcome == "rollback"
    assert result.reason == "FormatValidityRegressed"
    failed = next(m for m in result.measurements if m.metric == "format_validity")
    assert failed.p < failed.alpha and failed.effect > 0.8


def test_higher_error_rate_rolls_back():
    result = assess_step(
        _samples(100, errors=30),
        _samples(900, errors=9, seed=1),
        {"canary": 10, "stable": 90},
        1,
        LIMITS,
        may_advance=True,
    )
    assert (result.outcome, result.reason) == ("rollback", "ErrorRateRegressed")


def test_slower_candidate_rolls_back_only_beyond_the_tolerance():
    slower = assess_step(
        _samples(100, latency=0.4),
        _samples(900, seed=1),
        {"canary": 10, "stable": 90},
        1,
        LIMITS,
        may_advance=True,
    )
    assert (slower.outcome, slower.reason) == ("rollback", "LatencyRegressed")
    slightly = assess_step(
        _samples(100, latency=0.22),
        _samples(900, seed=1),
        {"canary": 10, "stable": 90},
        1,
        LIMITS,
        may_advance=True,
    )
    assert slightly.outcome == "advance"


def test_too_few_requests_extends_the_step():
    result = assess_step(
        _samples(20),
        _samples(180, seed=1),
        {"canary": 10, "stable": 90},
        1,
        LIMITS,
        may_advance=True,
    )
    assert (result.outcome, result.status, result.reason) == (
        "extend",
        Status.INCONCLUSIVE,
        "SampleTooSmall",
    )


def test_equal_variants_advance_once_the_interval_passed():
    args = (_samples(100), _samples(900, seed=1), {"canary": 10, "stable": 90}, 1, LIMITS)
    assert assess_step(*args, may_advance=False).outcome == "extend"
    assert assess_step(*args, may_advance=True).outcome == "advance"


def test_sample_ratio_mismatch_is_detected_on_units():
    assert (
        sample_ratio({"canary": 200, "stable": 800}, {"canary": 10, "stable": 90}, LIMITS).status
        is Status.FAILED
    )
    assert (
        sample_ratio({"canary": 95, "stable": 905}, {"canary": 10, "stable": 90}, LIMITS).status
        is Status.SUCCESSFUL
    )
    assert (
        sample_ratio({"canary": 1, "stable": 9}, {"canary": 10, "stable": 90}, LIMITS).status
        is Status.PENDING
    )


def test_mismatched_ratio_rolls_back():
    result = assess_step(
        _samples(300), _samples(700, seed=1), {"canary": 10, "stable": 90}, 1, LIMITS, True
    )
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


def _view(
    step_index: int = 0, started: float = 0.0, last_look: float = 0.0, last_requests: int = 0
) -> CanaryView:
    params = RolloutStart(
        to="m@2", steps=[10, 50], min_requests=50, interval_s=60, look_requests=25
    )
    return CanaryView(step_index, params.steps, 0, started, last_look, last_requests, params)


def test_plan_waits_until_a_look_is_due():
    assert plan_tick(_view(), {"canary": _samples(10), "stable": _samples(90)}, now=30) is None


def test_plan_looks_early_after_enough_new_canary_requests():
    tick = plan_tick(_view(), {"canary": _samples(30, invalid=30), "stable": _samples(270)}, now=5)
    assert tick is not None and tick.action == "rollback"


def test_plan_advances_then_promotes_after_the_last_step():
    samples = {"canary": _samples(100), "stable": _samples(900, seed=1)}
    assert plan_tick(_view(0), samples, now=61).action == "advance"
    assert (
        plan_tick(
            _view(1), {"canary": _samples(500), "stable": _samples(500, seed=1)}, now=61
        ).action
        == "promote"
    )


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
    json.dumps(
        assess_step(_samples(20), zero, {"canary": 50, "stable": 50}, 1, LIMITS, True)
        .measurements[2]
        .to_dict(),
        allow_nan=False,
    )  # an infinite median ratio is written as null


def test_a_format_failure_names_the_rollback_even_when_the_candidate_is_also_slower():
    slow_broken = _samples(60, invalid=60, latency=1.0)
    assessment = assess_step(
        slow_broken, _samples(600, seed=1), {"canary": 10, "stable": 90}, 1, LIMITS, True
    )
    assert (assessment.outcome, assessment.reason) == ("rollback", "FormatValidityRegressed")
    assert [m.metric for m in assessment.measurements if m.status is Status.FAILED] == [
        "format_validity",
        "latency",
    ]


# --- feedback (values on [0, 1]) and confidence (mean token log-probabilities) ---

FEEDBACK = Limits(min_requests=50, feedback_rollback=True, feedback_min=30, feedback_margin=0.05)


def _thumbs(n: int, up: float, seed: int = 0) -> list[float]:
    """n thumbs (0 or 1) with exactly round(n * up) up."""
    values = [1.0] * round(n * up) + [0.0] * (n - round(n * up))
    random.Random(seed).shuffle(values)
    return values


@pytest.mark.parametrize(
    ("x_c", "n_c", "x_s", "n_s"), [(1, 3, 2, 3), (0, 1, 1, 1), (7, 7, 0, 12), (30, 100, 45, 90)]
)
def test_bounded_difference_of_thumbs_is_agresti_caffo(x_c, n_c, x_s, n_s):
    candidate, stable = (
        Moments.of(_thumbs(n_c, x_c / n_c)),
        Moments.of(_thumbs(n_s, x_s / n_s, seed=1)),
    )
    assert bounded_difference_se(candidate, stable) == pytest.approx(
        difference_ci(x_c, n_c, x_s, n_s), abs=1e-12
    )


def test_one_or_all_equal_feedback_values_keep_a_proper_interval():
    one = bounded_mean(Moments.of([1.0]))
    assert one.value == 1.0 and 0 < one.low < 0.5 and one.high == 1.0  # not [1, 1] from one vote
    flat = bounded_mean(Moments.of([0.5] * 10))
    assert flat.value == 0.5 and flat.low < 0.5 < flat.high
    diff = bounded_difference(Moments.of([1.0]), Moments.of([1.0]))
    assert diff.value == 0.0 and diff.low < 0 < diff.high and -1 <= diff.low and diff.high <= 1
    assert (
        bounded_mean(Moments()) is None and bounded_difference(Moments(), Moments.of([1.0])) is None
    )


def test_bounded_intervals_cover_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    means, diffs, runs = 0, 0, 2000
    for _ in range(runs):
        a, b = rng.beta(4, 2, size=25), rng.beta(2, 2, size=40)  # true means 2/3 and 1/2
        mean, diff = bounded_mean(Moments.of(a)), bounded_difference(Moments.of(a), Moments.of(b))
        means += mean.low <= 2 / 3 <= mean.high
        diffs += diff.low <= 1 / 6 <= diff.high
    assert 0.93 < means / runs < 0.985 and 0.93 < diffs / runs < 0.985


def test_welch_intervals_match_scipy_and_need_two_values():
    rng = np.random.default_rng(1)
    a, b = rng.normal(-0.8, 0.3, size=12), rng.normal(-0.5, 0.1, size=30)
    ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    diff = welch_difference(Moments.of(a), Moments.of(b))
    assert (diff.value, diff.low, diff.high) == pytest.approx(
        (a.mean() - b.mean(), ci.low, ci.high), rel=1e-9
    )
    mean = welch_mean(Moments.of(a))
    low, high = stats.t.interval(0.95, len(a) - 1, loc=a.mean(), scale=stats.sem(a))
    assert (mean.low, mean.high) == pytest.approx((low, high), rel=1e-9)
    assert (
        welch_mean(Moments.of([-1.0])) is None
        and welch_difference(Moments.of([-1.0]), Moments.of(a)) is None
    )
    constant = welch_difference(Moments.of([-0.5] * 3), Moments.of([-0.2] * 4))
    assert (constant.low, constant.high) == pytest.approx((-0.3, -0.3))


def test_clearly_worse_feedback_rolls_the_canary_back():
    canary = replace(_samples(100), feedback=_thumbs(40, 0.3))
    stable = replace(_samples(100, seed=1), feedback=_thumbs(200, 0.8, seed=1))
    result = assess_step(
        canary, stable, {"canary": 50, "stable": 50}, 1, FEEDBACK, may_advance=True
    )
    assert (result.outcome, result.reason) == ("rollback", "FeedbackRegressed")
    failed = next(m for m in result.measurements if m.metric == "feedback")
    assert (failed.n_candidate, failed.n_stable) == (40, 200) and failed.p < failed.alpha
    assert failed.effect == pytest.approx(-0.5, abs=0.03) and failed.interval[1] < 0


def test_feedback_below_its_minimum_neither_rolls_back_nor_holds_the_step():
    # all thumbs down, but one short of feedback_min
    canary = replace(_samples(100), feedback=_thumbs(29, 0.0))
    stable = replace(_samples(100, seed=1), feedback=_thumbs(200, 0.9, seed=1))
    result = assess_step(
        canary, stable, {"canary": 50, "stable": 50}, 1, FEEDBACK, may_advance=True
    )
    assert result.outcome == "advance"
    pending = next(m for m in result.measurements if m.metric == "feedback")
    assert (pending.status, pending.reason) == (Status.PENDING, "SampleTooSmall")
    no_feedback = assess_step(
        _samples(100), _samples(100, seed=1), {"canary": 50, "stable": 50}, 1, FEEDBACK, True
    )
    assert no_feedback.outcome == "advance"  # a step never waits for feedback


def test_slightly_worse_feedback_within_the_margin_is_not_harm():
    m = feedback_harm(_thumbs(2000, 0.78), _thumbs(2000, 0.80, seed=1), 0.01, FEEDBACK)
    assert (m.status, m.reason) == (Status.SUCCESSFUL, "NoHarmDetected")
    assert m.effect == pytest.approx(-0.02, abs=1e-3)
    beyond = feedback_harm(_thumbs(2000, 0.70), _thumbs(2000, 0.80, seed=1), 0.01, FEEDBACK)
    assert beyond.status is Status.FAILED  # the same sample sizes detect a drop beyond the margin
    # scores on [0, 1], not only thumbs
    graded = feedback_harm([0.6] * 500, [0.9] * 500, 0.01, FEEDBACK)
    assert graded.status is Status.FAILED


def test_feedback_joins_the_alpha_split_only_when_enabled():
    canary = replace(_samples(100), feedback=_thumbs(40, 0.8), confidences=[-0.2, -0.3])
    stable = replace(
        _samples(100, seed=1), feedback=_thumbs(40, 0.8, seed=1), confidences=[-0.2, -0.25]
    )
    first_look = look_alpha(FEEDBACK.alpha, 1)
    on = assess_step(canary, stable, {"canary": 50, "stable": 50}, 1, FEEDBACK, True)
    off = assess_step(
        canary,
        stable,
        {"canary": 50, "stable": 50},
        1,
        replace(FEEDBACK, feedback_rollback=False),
        True,
    )
    # error rate, format validity, latency (+ feedback); never the informational confidence
    assert {
        m.alpha for m in on.measurements if m.metric in ("error_rate", "latency", "feedback")
    } == {first_look / 4}
    assert {m.alpha for m in off.measurements if m.metric in ("error_rate", "latency")} == {
        first_look / 3
    }
    assert "feedback" in [m.metric for m in on.measurements]
    assert "feedback" not in [m.metric for m in off.measurements]


def test_much_lower_confidence_is_reported_but_never_fails_or_holds():
    canary = replace(_samples(100), confidences=[-3.0 + 0.01 * i for i in range(100)])
    stable = replace(_samples(100, seed=1), confidences=[-0.1 - 0.001 * i for i in range(100)])
    result = assess_step(canary, stable, {"canary": 50, "stable": 50}, 1, LIMITS, may_advance=True)
    assert result.outcome == "advance"
    m = next(m for m in result.measurements if m.metric == "confidence")
    assert (m.status, m.reason, m.extra) == (
        Status.SUCCESSFUL,
        "Informational",
        {"informational": True},
    )
    assert (
        m.effect == pytest.approx(-2.3555) and m.interval[1] < 0 and m.p < 1e-10 and m.alpha is None
    )
    few = confidence_difference([-1.0], [-0.5, -0.6])
    assert (few.status, few.effect, few.interval) == (Status.SUCCESSFUL, None, None)
    json.dumps(few.to_dict(), allow_nan=False)


def test_ab_comparison_reports_feedback_and_confidence_differences():
    control = replace(_samples(40), feedback=_thumbs(50, 0.8), confidences=[-0.2, -0.4] * 20)
    other = replace(
        _samples(40, seed=1), feedback=_thumbs(50, 0.4, seed=1), confidences=[-0.9, -1.1] * 20
    )
    compared = compare_variants(control, other)
    assert compared["confidence"] == 0.95  # the level, as before
    low, high = compared["feedback"]["interval"]
    assert compared["feedback"]["diff"] == pytest.approx(-0.4) and low < -0.4 < high < 0
    assert (
        compared["logprob"]["diff"] == pytest.approx(-0.7)
        and compared["logprob"]["interval"][1] < 0
    )
    # no feedback on one side: no difference
    assert "feedback" not in compare_variants(control, _samples(40))


def test_rollouts_started_before_feedback_existed_validate_to_the_defaults():
    old = RolloutStart.model_validate(
        {"to": "m@2", "steps": [10.0, 100.0], "min_requests": 100, "alpha": 0.05}
    )
    limits = old.limits()
    assert (limits.feedback_rollback, limits.feedback_min, limits.feedback_margin) == (
        False,
        30,
        0.05,
    )
    new = RolloutStart(
        to="m@2", feedback_rollback=True, feedback_min=5, feedback_margin=0.1
    ).limits()
    assert (new.feedback_rollback, new.feedback_min, new.feedback_margin) == (True, 5, 0.1)
    with pytest.raises(ValueError, match="feedback_min"):
        RolloutStart(to="m@2", feedback_min=0)


def test_a_difference_of_rates_is_the_observed_one_with_an_interval_inside_its_range():
    # both at 0 errors, different sizes: Agresti-Caffo's adjusted difference would be 1/12 - 1/52
    none = rate_difference(0, 10, 0, 50)
    assert none.value == 0.0 and -1.0 <= none.low < 0.0 < none.high <= 1.0
    worst_case = rate_difference(10, 10, 0, 10)
    assert worst_case.value == 1.0 and worst_case.high == 1.0
    assert compare_variants(_samples(50), _samples(10))["error_rate"]["diff"] == 0.0


def test_a_feedback_rollback_reports_the_observed_difference_inside_its_range():
    """Every user judges the canary's answers wrong (0) and the stable's right (1): the reason
    says diff -1.000 with an interval inside [-1, 1], as the A/B table does."""
    harm = feedback_harm([0.0] * 40, [1.0] * 40, 0.01, FEEDBACK)
    assert harm.status == Status.FAILED
    assert harm.effect == -1.0 and -1.0 <= harm.interval[0] <= harm.interval[1] <= 1.0
    assert "diff -1.000" in harm.message
    stable, canary = _samples(40), _samples(40)
    shown = compare_variants(
        replace(stable, feedback=[1.0] * 40), replace(canary, feedback=[0.0] * 40)
    )["feedback"]
    assert shown["diff"] == harm.effect

"""Statistics that decide rollouts. Pure: no DB, no HTTP, no clock; samples and limits are
arguments.

- Validation gate (paired, same items): McNemar's exact test when every item scores 0 or 1, else a
  paired bootstrap of the mean difference; the candidate passes when the one-sided lower confidence
  bound of (candidate - stable) is above -margin (non-inferiority).
- Live analysis (candidate vs stable on concurrent traffic, one step): error rate and
  format-validity rate by a one-sided two-proportion test against a margin (Agresti-Caffo adjusted),
  latency by Mann-Whitney U with a relative tolerance on the medians (Kayenta-style), and a
  sample-ratio-mismatch chi-square on units (threshold 0.001, spent over looks like alpha). Opt-in:
  users' feedback (values on [0, 1], over the whole rollout) by the same one-sided test against a
  margin, Agresti-Caffo generalized to [0, 1] (one 0 and one 1 added to each group). Informational
  only: the answers' mean token log-probability (Welch), which never decides and spends no alpha.
- Repeated looks: alpha spending. Look k of a rollout may spend alpha * 6 / (pi^2 k^2); the series
  sums to alpha, so however many looks a rollout takes, the chance of any false rollback stays below
  alpha. Alpha is split evenly over the harm tests of a look (Bonferroni).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from enum import IntEnum

import numpy as np
from scipy import stats

__all__ = [
    "Status",
    "worst",
    "Measurement",
    "Limits",
    "VariantSamples",
    "Assessment",
    "look_alpha",
    "proportion_harm",
    "latency_harm",
    "sample_ratio",
    "assess_step",
    "paired_gate",
    "difference_ci",
    "EMPTY",
    "compare_variants",
    "Moments",
    "Estimate",
    "bounded_mean",
    "bounded_difference_se",
    "bounded_difference",
    "rate_difference",
    "welch_mean",
    "welch_difference",
    "feedback_harm",
    "confidence_difference",
]

# reasons (CamelCase constants, recorded with every decision)
SAMPLE_TOO_SMALL = "SampleTooSmall"
NO_HARM = "NoHarmDetected"
ERROR_RATE_REGRESSED = "ErrorRateRegressed"
FORMAT_REGRESSED = "FormatValidityRegressed"
LATENCY_REGRESSED = "LatencyRegressed"
SAMPLE_RATIO_MISMATCH = "SampleRatioMismatch"
VALIDATION_NON_INFERIOR = "ValidationNonInferior"
VALIDATION_REGRESSED = "ValidationRegressed"
FEEDBACK_REGRESSED = "FeedbackRegressed"
INFORMATIONAL = "Informational"


class Status(IntEnum):
    """Outcome of one measurement, best to worst. Inconclusive means hold; Failed means roll
    back."""

    SUCCESSFUL = 0
    RUNNING = 1
    PENDING = 2
    INCONCLUSIVE = 3
    ERROR = 4
    FAILED = 5


def worst(statuses: Sequence[Status]) -> Status:
    return max(statuses, default=Status.SUCCESSFUL)


@dataclass(frozen=True)
class Measurement:
    """One statistical test and what it concluded, with the numbers a reviewer needs."""

    # error_rate, format_validity, feedback, latency, sample_ratio, confidence, validation
    metric: str
    test: str
    status: Status
    reason: str
    message: str
    n_candidate: int = 0
    n_stable: int = 0
    effect: float | None = None  # candidate - stable (rates, means), or median ratio (latency)
    interval: tuple[float, float] | None = None
    p: float | None = None
    alpha: float | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return _finite({**asdict(self), "status": self.status.name.lower()})


def _finite(value):
    """JSON has no NaN or infinity: such numbers (zero-variance tests, zero medians) become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


@dataclass(frozen=True)
class Limits:
    """Named limits of a canary analysis; every number in the decision code comes from here."""

    min_requests: int = 100  # per variant and step, before a step may advance
    min_rollback_requests: int = 10  # candidate requests before a harm test may roll back
    error_margin: float = 0.01  # tolerated extra error rate (absolute)
    format_margin: float = 0.01  # tolerated extra format-invalid rate (absolute)
    latency_tolerance: float = 0.25  # tolerated relative increase of the median latency
    alpha: float = 0.05  # total false-rollback probability over all looks of a rollout
    srm_p: float = 0.001  # sample-ratio mismatch threshold
    min_srm_expected: int = 5  # chi-square needs this many expected units per variant
    # users' feedback may roll a canary back (it never holds a step)
    feedback_rollback: bool = False
    # feedback values per variant, over the whole rollout, before that test may fail
    feedback_min: int = 30
    feedback_margin: float = 0.05  # tolerated drop of the mean feedback (on [0, 1])


@dataclass(frozen=True)
class VariantSamples:
    """What one variant served during one step."""

    requests: int
    errors: int
    units: int  # distinct assignment units
    latencies_s: Sequence[float]
    format_checked: int = 0
    format_invalid: int = 0
    output_tokens: Sequence[int] = ()
    # users' feedback values on [0, 1] (a canary's: over the whole rollout)
    feedback: Sequence[float] = ()
    confidences: Sequence[float] = ()  # the answers' mean token log-probabilities


EMPTY = VariantSamples(requests=0, errors=0, units=0, latencies_s=())


@dataclass(frozen=True)
class Assessment:
    outcome: str  # "advance" | "extend" | "rollback"
    status: Status
    reason: str
    message: str
    measurements: list[Measurement]


def look_alpha(alpha: float, look: int) -> float:
    """Alpha spent at look k >= 1: sum over all k of alpha * 6 / (pi^2 k^2) is alpha."""
    return alpha * 6 / (math.pi**2 * look**2)


def difference_ci(x_c: int, n_c: int, x_s: int, n_s: int) -> tuple[float, float]:
    """Agresti-Caffo: (difference, standard error) of rate_candidate - rate_stable, with one
    success and one failure added to each group, which keeps 0/n and n/n well behaved."""
    pc, ps = (x_c + 1) / (n_c + 2), (x_s + 1) / (n_s + 2)
    return pc - ps, math.sqrt(pc * (1 - pc) / (n_c + 2) + ps * (1 - ps) / (n_s + 2))


@dataclass(frozen=True)
class Moments:
    """Count, sum and sum of squares of some values: enough for their mean, its interval and a
    difference of means. A SQL aggregate returns them too, so a whole rollout's numbers need none
    of its rows in memory."""

    n: int = 0
    total: float = 0.0
    squares: float = 0.0

    @classmethod
    def of(cls, values: Sequence[float]) -> Moments:
        x = np.asarray(values, dtype=float)
        return cls(len(x), float(x.sum()), float((x * x).sum()))

    @property
    def mean(self) -> float:
        return self.total / self.n

    def variance(self, ddof: int = 1) -> float:
        # sums of squares can cancel to a hair below zero on constant values
        return max(0.0, (self.squares - self.total**2 / self.n) / (self.n - ddof))

    def with_pseudo_observations(self) -> Moments:
        """One 0 and one 1 added (Agresti-Caffo): n = 1 and all-equal samples keep a non-zero
        variance."""
        return Moments(self.n + 2, self.total + 1, self.squares + 1)


@dataclass(frozen=True)
class Estimate:
    """A mean, or a difference of means, with its two-sided interval."""

    value: float
    low: float
    high: float

    @property
    def interval(self) -> list[float]:
        return [self.low, self.high]


def _z(level: float) -> float:
    return float(stats.norm.ppf(0.5 + level / 2))


def bounded_mean(values: Moments, level: float = 0.95) -> Estimate | None:
    """The mean of values on [0, 1] with its interval, which is centred (like Agresti-Coull's) on
    the mean with one 0 and one 1 added and clipped to [0, 1]; None without values."""
    if values.n == 0:
        return None
    adjusted = values.with_pseudo_observations()
    half = _z(level) * math.sqrt(adjusted.variance(ddof=0) / adjusted.n)
    return Estimate(values.mean, max(0.0, adjusted.mean - half), min(1.0, adjusted.mean + half))


def bounded_difference_se(candidate: Moments, stable: Moments) -> tuple[float, float]:
    """(difference, standard error) of mean_candidate - mean_stable for values on [0, 1]:
    Agresti-Caffo generalized, one 0 and one 1 added to each group. On 0/1 values it is exactly
    `difference_ci`."""
    c, s = candidate.with_pseudo_observations(), stable.with_pseudo_observations()
    return c.mean - s.mean, math.sqrt(c.variance(ddof=0) / c.n + s.variance(ddof=0) / s.n)


def bounded_difference(candidate: Moments, stable: Moments, level: float = 0.95) -> Estimate | None:
    """mean_candidate - mean_stable of values on [0, 1] with its interval (centred on the
    adjusted difference of `bounded_difference_se`, clipped to [-1, 1]); None unless both have
    values."""
    if candidate.n == 0 or stable.n == 0:
        return None
    diff, se = bounded_difference_se(candidate, stable)
    half = _z(level) * se
    return Estimate(candidate.mean - stable.mean, max(-1.0, diff - half), min(1.0, diff + half))


def rate_difference(x_c: int, n_c: int, x_s: int, n_s: int, level: float = 0.95) -> Estimate:
    """rate_candidate - rate_stable (x of n each, both n > 0) as observed, with the Agresti-Caffo
    interval at `level` clipped to [-1, 1]: the one estimate of a difference of rates that the
    rollout's decisions, the A/B comparison, the CLI and the console all show."""
    diff, se = difference_ci(x_c, n_c, x_s, n_s)
    half = _z(level) * se
    return Estimate(x_c / n_c - x_s / n_s, max(-1.0, diff - half), min(1.0, diff + half))


def welch_mean(values: Moments, level: float = 0.95) -> Estimate | None:
    """The mean of unbounded values (log-probabilities) with its t interval; None below two
    values."""
    if values.n < 2:
        return None
    half = float(stats.t.ppf(0.5 + level / 2, values.n - 1)) * math.sqrt(
        values.variance() / values.n
    )
    return Estimate(values.mean, values.mean - half, values.mean + half)


def _welch(candidate: Moments, stable: Moments) -> tuple[float, float, float]:
    """(difference, Welch standard error, Welch-Satterthwaite degrees of freedom); both n >= 2."""
    vc, vs = candidate.variance() / candidate.n, stable.variance() / stable.n
    se = math.sqrt(vc + vs)
    df = (
        (vc + vs) ** 2 / (vc**2 / (candidate.n - 1) + vs**2 / (stable.n - 1))
        if se > 0
        else math.inf
    )
    return candidate.mean - stable.mean, se, df


def welch_difference(candidate: Moments, stable: Moments, level: float = 0.95) -> Estimate | None:
    """mean_candidate - mean_stable of unbounded values with Welch's interval; None unless both n
    >= 2."""
    if candidate.n < 2 or stable.n < 2:
        return None
    diff, se, df = _welch(candidate, stable)
    half = float(stats.t.ppf(0.5 + level / 2, df)) * se if se > 0 else 0.0  # both constant: exact
    return Estimate(diff, diff - half, diff + half)


def proportion_harm(
    metric: str,
    bad_c: int,
    n_c: int,
    bad_s: int,
    n_s: int,
    margin: float,
    alpha: float,
    limits: Limits,
    regressed: str,
) -> Measurement:
    """One-sided test of H0: rate_c - rate_s <= margin against H1: the candidate is worse by
    more."""
    test = "two-proportion z (Agresti-Caffo)"
    if n_c < limits.min_rollback_requests or n_s < limits.min_rollback_requests:
        return Measurement(
            metric,
            test,
            Status.PENDING,
            SAMPLE_TOO_SMALL,
            f"{metric}: n={n_c} vs {n_s}, need {limits.min_rollback_requests}",
            n_c,
            n_s,
        )
    adjusted, se = difference_ci(bad_c, n_c, bad_s, n_s)  # the test's statistic
    p = float(stats.norm.sf((adjusted - margin) / se))
    estimate = rate_difference(bad_c, n_c, bad_s, n_s, 1 - 2 * alpha)  # what is shown
    diff, (low, high) = estimate.value, estimate.interval
    rates = f"{bad_c}/{n_c} vs {bad_s}/{n_s}"
    numbers = (
        f"diff {diff:+.3f}, {1 - 2 * alpha:.4g} CI [{low:+.3f}, {high:+.3f}], margin {margin}, "
        f"p={p:.2g}, alpha={alpha:.2g}"
    )
    if p < alpha:
        return Measurement(
            metric,
            test,
            Status.FAILED,
            regressed,
            f"{metric} worse: {rates}; {numbers}",
            n_c,
            n_s,
            diff,
            (low, high),
            p,
            alpha,
        )
    return Measurement(
        metric,
        test,
        Status.SUCCESSFUL,
        NO_HARM,
        f"{metric}: {rates}; {numbers}",
        n_c,
        n_s,
        diff,
        (low, high),
        p,
        alpha,
    )


def feedback_harm(
    candidate: Sequence[float], stable: Sequence[float], alpha: float, limits: Limits
) -> Measurement:
    """One-sided test of H0: mean_stable - mean_candidate <= margin against H1: users judge the
    candidate's answers worse by more (feedback values on [0, 1], Agresti-Caffo generalized)."""
    test = "two-sample z on [0, 1] (Agresti-Caffo)"
    n_c, n_s = len(candidate), len(stable)
    if n_c < limits.feedback_min or n_s < limits.feedback_min:
        return Measurement(
            "feedback",
            test,
            Status.PENDING,
            SAMPLE_TOO_SMALL,
            f"feedback: n={n_c} vs {n_s}, need {limits.feedback_min}",
            n_c,
            n_s,
        )
    c, s = Moments.of(candidate), Moments.of(stable)
    # the test's statistic; se > 0: the pseudo-observations differ
    adjusted, se = bounded_difference_se(c, s)
    p = float(stats.norm.sf((-adjusted - limits.feedback_margin) / se))
    estimate = bounded_difference(c, s, 1 - 2 * alpha)  # what is shown: never None here
    assert estimate is not None
    diff, (low, high) = estimate.value, estimate.interval
    means = f"mean {c.mean:.3f} (n={n_c}) vs {s.mean:.3f} (n={n_s})"
    numbers = (
        f"diff {diff:+.3f}, {1 - 2 * alpha:.4g} CI [{low:+.3f}, {high:+.3f}], margin "
        f"{limits.feedback_margin}, p={p:.2g}, alpha={alpha:.2g}"
    )
    if p < alpha:
        return Measurement(
            "feedback",
            test,
            Status.FAILED,
            FEEDBACK_REGRESSED,
            f"feedback worse: {means}; {numbers}",
            n_c,
            n_s,
            diff,
            (low, high),
            p,
            alpha,
        )
    return Measurement(
        "feedback",
        test,
        Status.SUCCESSFUL,
        NO_HARM,
        f"feedback: {means}; {numbers}",
        n_c,
        n_s,
        diff,
        (low, high),
        p,
        alpha,
    )


def confidence_difference(
    candidate: Sequence[float], stable: Sequence[float], level: float = 0.95
) -> Measurement:
    """Informational: the candidate's mean token log-probability minus the stable one's, with
    Welch's interval. It never fails, never holds a step and spends no alpha: a lower confidence
    is a reason to look, not proof."""
    test, extra = "Welch t", {"informational": True}
    c, s = Moments.of(candidate), Moments.of(stable)
    estimate = welch_difference(c, s, level)
    if estimate is None:
        return Measurement(
            "confidence",
            test,
            Status.SUCCESSFUL,
            INFORMATIONAL,
            f"confidence (informational): n={c.n} vs {s.n}, need 2 each",
            c.n,
            s.n,
            extra=extra,
        )
    diff, se, df = _welch(c, s)
    p = float(2 * stats.t.sf(abs(diff) / se, df)) if se > 0 else float(diff == 0)
    return Measurement(
        "confidence",
        test,
        Status.SUCCESSFUL,
        INFORMATIONAL,
        f"confidence (informational): mean log-prob {c.mean:.3f} vs {s.mean:.3f} (diff "
        f"{diff:+.3f}, {level:.0%} CI [{estimate.low:+.3f}, {estimate.high:+.3f}]), p={p:.2g}",
        c.n,
        s.n,
        diff,
        (estimate.low, estimate.high),
        p,
        extra=extra,
    )


def latency_harm(
    candidate: Sequence[float], stable: Sequence[float], alpha: float, limits: Limits
) -> Measurement:
    """Mann-Whitney U (candidate slower?) and a median ratio above 1 + tolerance: both must hold
    to fail."""
    n_c, n_s = len(candidate), len(stable)
    if n_c < limits.min_rollback_requests or n_s < limits.min_rollback_requests:
        return Measurement(
            "latency",
            "Mann-Whitney U",
            Status.PENDING,
            SAMPLE_TOO_SMALL,
            f"latency: n={n_c} vs {n_s}, need {limits.min_rollback_requests}",
            n_c,
            n_s,
        )
    p = float(stats.mannwhitneyu(candidate, stable, alternative="greater").pvalue)
    median_c, median_s = float(np.median(candidate)), float(np.median(stable))
    ratio = median_c / median_s if median_s > 0 else math.inf
    numbers = (
        f"median {median_c * 1000:.0f} vs {median_s * 1000:.0f} ms (x{ratio:.2f}, tolerance "
        f"x{1 + limits.latency_tolerance:.2f}), p={p:.2g}, alpha={alpha:.2g}"
    )
    if p < alpha and ratio > 1 + limits.latency_tolerance:
        return Measurement(
            "latency",
            "Mann-Whitney U",
            Status.FAILED,
            LATENCY_REGRESSED,
            f"latency worse: {numbers}",
            n_c,
            n_s,
            ratio,
            None,
            p,
            alpha,
        )
    return Measurement(
        "latency",
        "Mann-Whitney U",
        Status.SUCCESSFUL,
        NO_HARM,
        f"latency: {numbers}",
        n_c,
        n_s,
        ratio,
        None,
        p,
        alpha,
    )


def sample_ratio(units: dict[str, int], weights: dict[str, float], limits: Limits) -> Measurement:
    """Chi-square of the units each variant received against its weight (GrowthBook: p < 0.001 is
    a bug)."""
    labels = [label for label in weights if weights[label] > 0]
    observed = [units.get(label, 0) for label in labels]
    total = sum(observed)
    expected = [total * weights[label] / sum(weights[v] for v in labels) for label in labels]
    shares = ", ".join(f"{label} {o}/{e:.0f}" for label, o, e in zip(labels, observed, expected))
    if len(labels) < 2 or min(expected) < limits.min_srm_expected:
        return Measurement(
            "sample_ratio",
            "chi-square",
            Status.PENDING,
            SAMPLE_TOO_SMALL,
            f"sample ratio: too few units ({shares})",
        )
    p = float(stats.chisquare(observed, expected).pvalue)
    status, reason = (
        (Status.FAILED, SAMPLE_RATIO_MISMATCH) if p < limits.srm_p else (Status.SUCCESSFUL, NO_HARM)
    )
    return Measurement(
        "sample_ratio",
        "chi-square",
        status,
        reason,
        f"sample ratio (observed/expected units): {shares}, p={p:.2g}, threshold {limits.srm_p}",
        observed[0],
        sum(observed[1:]),
        p=p,
        alpha=limits.srm_p,
    )


def assess_step(
    candidate: VariantSamples,
    stable: VariantSamples,
    weights: dict[str, float],
    look: int,
    limits: Limits,
    may_advance: bool,
) -> Assessment:
    """One look at a canary step: roll back on any proven harm, extend until enough data, else
    advance.

    `weights` maps "canary"/"stable" to percents; `may_advance` is False until the step's dwell
    time passed. Feedback (when `limits.feedback_rollback`) can only roll back: a step never
    waits for it."""
    tests = 2 + bool(candidate.format_checked) + bool(limits.feedback_rollback)
    alpha = look_alpha(limits.alpha, look) / tests
    # in order of what a failure says about the candidate: the first failed test names the rollback
    measurements = [
        proportion_harm(
            "error_rate",
            candidate.errors,
            candidate.requests,
            stable.errors,
            stable.requests,
            limits.error_margin,
            alpha,
            limits,
            ERROR_RATE_REGRESSED,
        )
    ]
    if candidate.format_checked:
        measurements.append(
            proportion_harm(
                "format_validity",
                candidate.format_invalid,
                candidate.format_checked,
                stable.format_invalid,
                stable.format_checked,
                limits.format_margin,
                alpha,
                limits,
                FORMAT_REGRESSED,
            )
        )
    if limits.feedback_rollback:
        measurements.append(feedback_harm(candidate.feedback, stable.feedback, alpha, limits))
    measurements.append(latency_harm(candidate.latencies_s, stable.latencies_s, alpha, limits))
    # the SRM threshold is spent over looks too, so repeated looks keep its false alarms below srm_p
    srm = replace(limits, srm_p=look_alpha(limits.srm_p, look))
    measurements.append(
        sample_ratio({"canary": candidate.units, "stable": stable.units}, weights, srm)
    )
    measurements.append(confidence_difference(candidate.confidences, stable.confidences))
    failed = [m for m in measurements if m.status is Status.FAILED]
    if failed:
        return Assessment(
            "rollback",
            Status.FAILED,
            failed[0].reason,
            "; ".join(m.message for m in failed),
            measurements,
        )
    short = min(candidate.requests, stable.requests)
    if short < limits.min_requests or not may_advance:
        why = (
            f"canary {candidate.requests}, stable {stable.requests} requests this step; need "
            f"{limits.min_requests} each"
            if short < limits.min_requests
            else "the step's interval has not passed"
        )
        return Assessment("extend", Status.INCONCLUSIVE, SAMPLE_TOO_SMALL, why, measurements)
    return Assessment(
        "advance",
        Status.SUCCESSFUL,
        NO_HARM,
        f"no harm detected at look {look} (alpha {look_alpha(limits.alpha, look):.2g}); "
        f"canary {candidate.requests}, stable {stable.requests} requests",
        measurements,
    )


def paired_gate(
    stable: Sequence[float],
    candidate: Sequence[float],
    margin: float,
    alpha: float = 0.05,
    resamples: int = 4000,
    seed: int = 0,
) -> Measurement:
    """Non-inferiority of the candidate on the same validation items (scores in [0, 1], paired by
    index)."""
    if len(stable) != len(candidate) or not stable:
        raise ValueError("paired scores need the same, non-zero number of items")
    s, c = np.asarray(stable, dtype=float), np.asarray(candidate, dtype=float)
    n, effect = len(s), float(c.mean() - s.mean())
    if np.isin(s, (0.0, 1.0)).all() and np.isin(c, (0.0, 1.0)).all():
        # discordant pairs
        b, k = int(((s == 1) & (c == 0)).sum()), int(((s == 0) & (c == 1)).sum())
        if b + k == 0:
            low, high, p = 0.0, 0.0, 1.0
        else:
            test = stats.binomtest(k, b + k, 0.5)
            ci = test.proportion_ci(confidence_level=1 - 2 * alpha, method="exact")
            # conditional on the discordant pairs, candidate - stable = (2 pi - 1) (b + k) / n
            low, high, p = (
                (2 * ci.low - 1) * (b + k) / n,
                (2 * ci.high - 1) * (b + k) / n,
                float(test.pvalue),
            )
        name, extra = "McNemar exact", {"stable_only": b, "candidate_only": k}
        detail = f"stable-only passes {b}, candidate-only passes {k}, McNemar p={p:.2g}"
    else:
        rng = np.random.default_rng(seed)
        diffs = (c - s)[rng.integers(0, n, size=(resamples, n))].mean(axis=1)
        low, high = (float(x) for x in np.quantile(diffs, [alpha, 1 - alpha]))
        p = float(min(1.0, 2 * min((diffs <= 0).mean(), (diffs >= 0).mean())))
        name, extra = f"paired bootstrap ({resamples} resamples)", {}
        detail = f"bootstrap p={p:.2g}"
    numbers = (
        f"candidate {c.mean():.3f} vs stable {s.mean():.3f} (diff {effect:+.3f}, "
        f"{1 - 2 * alpha:.0%} CI [{low:+.3f}, {high:+.3f}], margin {margin}), {detail}, n={n}"
    )
    if low >= -margin:  # an identical candidate (interval [0, 0]) passes even a zero margin
        return Measurement(
            "validation",
            name,
            Status.SUCCESSFUL,
            VALIDATION_NON_INFERIOR,
            f"non-inferior: {numbers}",
            n,
            n,
            effect,
            (low, high),
            p,
            alpha,
            extra,
        )
    return Measurement(
        "validation",
        name,
        Status.FAILED,
        VALIDATION_REGRESSED,
        f"not shown non-inferior: {numbers}",
        n,
        n,
        effect,
        (low, high),
        p,
        alpha,
        extra,
    )


def compare_variants(control: VariantSamples, other: VariantSamples, level: float = 0.95) -> dict:
    """A/B differences of `other` vs `control` with two-sided intervals at `level`: error rate
    and format validity (Agresti-Caffo), feedback (Agresti-Caffo on [0, 1]), output length and
    the answers' confidence (`logprob`: mean token log-probability; Welch t), latency
    (Mann-Whitney p, median ratio). `confidence` is the intervals' level, as it always was."""
    out: dict = {"confidence": level}
    if control.requests and other.requests:
        errors = rate_difference(
            other.errors, other.requests, control.errors, control.requests, level
        )
        out["error_rate"] = {"diff": errors.value, "interval": errors.interval}
    if control.format_checked and other.format_checked:
        valid = rate_difference(
            other.format_checked - other.format_invalid,
            other.format_checked,
            control.format_checked - control.format_invalid,
            control.format_checked,
            level,
        )
        out["format_validity"] = {"diff": valid.value, "interval": valid.interval}
    feedback = bounded_difference(Moments.of(other.feedback), Moments.of(control.feedback), level)
    if feedback is not None:
        out["feedback"] = {"diff": feedback.value, "interval": feedback.interval}
    confidence = welch_difference(
        Moments.of(other.confidences), Moments.of(control.confidences), level
    )
    if confidence is not None:
        out["logprob"] = {"diff": confidence.value, "interval": confidence.interval}
    if len(control.output_tokens) > 1 and len(other.output_tokens) > 1:
        diff = float(np.mean(other.output_tokens) - np.mean(control.output_tokens))
        # both constant: exact
        if np.ptp(other.output_tokens) == np.ptp(control.output_tokens) == 0:
            out["output_tokens"] = {"diff": diff, "interval": [diff, diff], "p": float(diff == 0)}
        else:
            test = stats.ttest_ind(other.output_tokens, control.output_tokens, equal_var=False)
            ci = test.confidence_interval(level)
            out["output_tokens"] = {
                "diff": diff,
                "interval": [float(ci.low), float(ci.high)],
                "p": float(test.pvalue),
            }
    if len(control.latencies_s) and len(other.latencies_s):
        p = float(
            stats.mannwhitneyu(
                other.latencies_s, control.latencies_s, alternative="two-sided"
            ).pvalue
        )
        ratio = float(np.median(other.latencies_s) / np.median(control.latencies_s))
        out["latency"] = {"median_ratio": ratio, "p": p}
    return _finite(out)

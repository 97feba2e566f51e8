"""Drift statistics (pure): request features, two-sample tests, and false-alarm control.

- Features of one request: its first image's brightness, contrast, width, height and aspect ratio
  (cheap statistics, no model), and its prompt's length in characters and words and its share of
  non-ASCII and digit characters. Only these numbers are kept, never the request.
- A look compares a window of live requests with the reference (the deployment's validation set): a
  Kolmogorov-Smirnov test per feature, and an RBF-kernel MMD on all standardised features together
  with a permutation p-value. The look's p-value is the smallest of them times their number
  (Bonferroni).
- A confidence look compares a variant's live answers' mean token log-probabilities with those of
  its baseline replay: a two-sample KS test. A drop is the usual signal (a broken adapter or base is
  unsure of its tokens).
- Repeated looks: alpha spending as in rollouts; look k of one monitored version may spend
  alpha * 6 / (pi^2 k^2), so the chance of any false alarm over all its looks stays below alpha.
- Many deployments: at each check the spending-adjusted p-values of every deployment go through
  Benjamini-Hochberg, which keeps the expected share of false alarms among all alarms below alpha.
"""

from __future__ import annotations

import base64
import io
import random
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from PIL import Image
from scipy import stats

from lorafleet.chat_jsonl import content_parts
from lorafleet.serve.rollouts.statistics import difference_ci, look_alpha

__all__ = [
    "IMAGE_FEATURES",
    "PROMPT_FEATURES",
    "FEATURES",
    "request_features",
    "Reservoir",
    "DriftLook",
    "input_drift",
    "ConfidenceLook",
    "confidence_drift",
    "spent_p",
    "benjamini_hochberg",
    "mmd_permutation",
    "proportion_p",
]

K = TypeVar("K")

IMAGE_FEATURES = ("brightness", "contrast", "width", "height", "aspect")
PROMPT_FEATURES = ("prompt_chars", "prompt_words", "non_ascii", "digits")
FEATURES = IMAGE_FEATURES + PROMPT_FEATURES


def _image_of(url: str) -> Image.Image | None:
    if not url.startswith("data:") or "," not in url:
        return None  # remote images are fetched by the engine, not by the gateway
    try:
        return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    except (ValueError, OSError):
        return None


def request_features(messages: Sequence[Mapping]) -> dict[str, float]:
    """The features of a chat request's user turns (image features only when it has a data-URL
    image)."""
    texts, image = [], None
    for message in messages:
        if not isinstance(message, Mapping) or message.get("role") != "user":
            continue
        for part in content_parts(message):
            if not isinstance(part, Mapping):
                continue
            if part.get("type") == "text":
                texts.append(str(part.get("text") or ""))
            elif part.get("type") == "image_url" and image is None:
                image = _image_of(str((part.get("image_url") or {}).get("url") or ""))
    text = "\n".join(texts)
    n = max(len(text), 1)
    features = {
        "prompt_chars": float(len(text)),
        "prompt_words": float(len(text.split())),
        "non_ascii": sum(ord(c) > 127 for c in text) / n,
        "digits": sum(c.isdigit() for c in text) / n,
    }
    if image is not None:
        gray = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
        features.update(
            brightness=float(gray.mean()),
            contrast=float(gray.std()),
            width=float(image.width),
            height=float(image.height),
            aspect=image.width / max(image.height, 1),
        )
    return features


class Reservoir:
    """A uniform sample of at most `size` items out of everything offered since the last `drain`
    (Vitter's algorithm R): memory is bounded however much traffic there is.

    Thread-safe, and in two steps: `wants` decides (cheaply, on the event loop) whether an offer
    is kept and returns a ticket for its slot; `put` fills the slot later (its item is computed
    in a worker thread). An item whose ticket was drawn before a `drain` is kept for the next one
    (at most one per request then in flight)."""

    def __init__(self, size: int, rng: random.Random | None = None) -> None:
        self.size, self.rng = size, rng or random.Random()
        self.offered = 0
        self._items: dict[int, Any] = {}
        self._late: list[Any] = []  # put after the drain of the period their ticket was drawn in
        self._reserved = 0
        self._period = 0
        self._lock = threading.Lock()

    def wants(self) -> tuple[int, int] | None:
        """Count one offer; the ticket of the slot it should take, or None to skip it."""
        with self._lock:
            self.offered += 1
            if self._reserved < self.size:
                self._reserved += 1
                return self._period, self._reserved - 1
            slot = self.rng.randrange(self.offered)
            return (self._period, slot) if slot < self.size else None

    def __len__(self) -> int:
        with self._lock:
            return len(self._items) + len(self._late)

    def put(self, ticket: tuple[int, int], item: Any) -> None:
        period, slot = ticket
        with self._lock:
            if period == self._period:
                self._items[slot] = item
            else:
                self._late.append(item)

    def drain(self) -> list:
        with self._lock:
            items = self._late + [self._items[slot] for slot in sorted(self._items)]
            self._items, self._late, self._reserved, self.offered = {}, [], 0, 0
            self._period += 1
        return items


def _matrix(rows: Sequence[Mapping[str, float]], names: Sequence[str]) -> np.ndarray:
    return np.array([[row[name] for name in names] for row in rows], dtype=float)


def mmd_permutation(
    x: np.ndarray, y: np.ndarray, permutations: int = 200, seed: int = 0
) -> tuple[float, float]:
    """Squared MMD (biased estimate, RBF kernel, median-distance bandwidth) and its permutation
    p-value."""
    z = np.vstack([x, y])
    d2 = ((z[:, None, :] - z[None, :, :]) ** 2).sum(-1)
    positive = d2[d2 > 0]
    bandwidth = float(np.median(positive)) if positive.size else 1.0
    k = np.exp(-d2 / bandwidth)
    n, m = len(x), len(y)
    # MMD^2 of a split is w' K w with w = 1/n on one side and -1/m on the other: all permutations at
    # once
    base = np.concatenate([np.full(n, 1 / n), np.full(m, -1 / m)])
    rng = np.random.default_rng(seed)
    weights = np.vstack([base] + [rng.permutation(base) for _ in range(permutations)])
    statistics = np.einsum("pi,ij,pj->p", weights, k, weights)
    observed = float(statistics[0])
    exceed = int((statistics[1:] >= observed - 1e-12).sum())
    return observed, (exceed + 1) / (permutations + 1)


@dataclass(frozen=True)
class DriftLook:
    """One input-drift look: per-test p-values, the look's Bonferroni p, and the spending
    verdict."""

    n_reference: int
    n_window: int
    p_values: dict[str, float]  # ks:<feature> and mmd
    p: float  # Bonferroni over the tests
    look: int
    alpha: float  # what this look may spend
    drifted: bool
    top: str  # the test with the smallest p

    def message(self) -> str:
        return (
            f"input: p={self.p:.2g} (look {self.look}, alpha {self.alpha:.2g}); "
            f"smallest {self.top} p={self.p_values.get(self.top, 1.0):.2g}; "
            f"window {self.n_window} vs reference {self.n_reference}"
        )


def input_drift(
    reference: Sequence[Mapping[str, float]],
    window: Sequence[Mapping[str, float]],
    look: int,
    alpha: float = 0.05,
    permutations: int = 200,
    seed: int = 0,
) -> DriftLook:
    """Test whether `window` comes from the distribution of `reference` (features present in
    both)."""
    names = [f for f in FEATURES if all(f in r for r in reference) and all(f in w for w in window)]
    if not names or len(reference) < 2 or len(window) < 2:
        raise ValueError(
            "input drift needs at least two requests on each side with shared features"
        )
    ref, cur = _matrix(reference, names), _matrix(window, names)
    p_values = {
        f"ks:{name}": float(stats.ks_2samp(ref[:, i], cur[:, i]).pvalue)
        for i, name in enumerate(names)
    }
    scale = ref.std(axis=0)
    scale[scale == 0] = 1.0
    _, p_values["mmd"] = mmd_permutation(
        (ref - ref.mean(0)) / scale, (cur - ref.mean(0)) / scale, permutations, seed
    )
    p = min(1.0, min(p_values.values()) * len(p_values))
    spend = look_alpha(alpha, look)
    return DriftLook(
        len(reference),
        len(window),
        p_values,
        p,
        look,
        spend,
        p < spend,
        min(p_values, key=lambda name: p_values[name]),
    )


@dataclass(frozen=True)
class ConfidenceLook:
    """One output-confidence look: live answers' mean token log-probabilities against the
    baseline replay's."""

    n: int
    n_baseline: int
    mean: float
    baseline_mean: float
    statistic: float  # the KS distance
    p: float

    @property
    def shift(self) -> float:
        """Live minus baseline mean: negative when the answers became less sure."""
        return self.mean - self.baseline_mean

    def message(self, variant: str, look: int) -> str:
        direction = "lower (less sure)" if self.shift < 0 else "higher (surer)"
        return (
            f"confidence of {variant}: p={self.p:.2g} (look {look}); mean token log-probability "
            f"{self.mean:.3f} vs {self.baseline_mean:.3f}, {direction} by {abs(self.shift):.3f}; "
            f"KS D={self.statistic:.2f}, n={self.n} vs baseline {self.n_baseline}"
        )


def confidence_drift(live: Sequence[float], baseline: Sequence[float]) -> ConfidenceLook:
    """Test whether the live confidences come from the distribution of the baseline's (two-sided
    KS)."""
    if not live or not baseline:
        raise ValueError("a confidence look needs confidences on both sides")
    result = stats.ks_2samp(live, baseline)
    return ConfidenceLook(
        len(live),
        len(baseline),
        float(np.mean(live)),
        float(np.mean(baseline)),
        float(result.statistic),
        float(result.pvalue),
    )


def spent_p(p: float, look: int, alpha: float = 0.05) -> float:
    """A look's p-value on the scale of the whole series: p < alpha here exactly when the look's
    p is below what look k may spend."""
    return min(1.0, p * alpha / look_alpha(alpha, look))


def benjamini_hochberg(p_values: Mapping[K, float]) -> dict[K, float]:
    """BH-adjusted q-values (alarms where q < alpha keep the false discovery rate below alpha)."""
    ordered = sorted(p_values.items(), key=lambda kv: kv[1])
    m, running = len(ordered), 1.0
    q: dict[K, float] = {}
    for rank in range(m, 0, -1):
        key, p = ordered[rank - 1]
        running = min(running, p * m / rank)
        q[key] = running
    return q


def proportion_p(bad: int, n: int, bad_ref: int, n_ref: int) -> float:
    """Two-sided two-proportion test (Agresti-Caffo), used for the output rates against the
    baseline."""
    if not n or not n_ref:
        return 1.0
    diff, se = difference_ci(bad, n, bad_ref, n_ref)
    return float(2 * stats.norm.sf(abs(diff) / se)) if se > 0 else 1.0

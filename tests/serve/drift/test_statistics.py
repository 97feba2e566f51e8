"""Drift statistics (pure): features, the bounded reservoir, the two-sample look, false-alarm
control."""

from __future__ import annotations

import random
import threading

import pytest
from PIL import Image

from lorafleet.chat_jsonl import image_data_url
from lorafleet.serve.drift.statistics import (
    Reservoir,
    benjamini_hochberg,
    confidence_drift,
    input_drift,
    request_features,
    spent_p,
)


def _request(brightness: int, size: int = 64, text: str = "What is in the image?") -> list[dict]:
    image = Image.new("RGB", (size, size // 2), (brightness,) * 3)
    return [
        {"role": "system", "content": "ignored"},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": image_data_url(image)}},
                {"type": "text", "text": text},
            ],
        },
    ]


def test_request_features_describe_the_image_and_the_prompt():
    features = request_features(_request(255, text="Quelle est la couleur ? 1 mot"))
    assert features["brightness"] == pytest.approx(1.0) and features["contrast"] == pytest.approx(
        0.0
    )
    assert (features["width"], features["height"], features["aspect"]) == (64, 32, 2.0)
    assert features["prompt_words"] == 7 and features["digits"] == pytest.approx(1 / 29)
    text_only = request_features([{"role": "user", "content": "héllo"}])
    assert "brightness" not in text_only and text_only["non_ascii"] == pytest.approx(0.2)


def test_reservoir_holds_at_most_its_size_and_samples_uniformly():
    reservoir, kept = Reservoir(50, random.Random(0)), []
    for _ in range(20):
        for i in range(2000):
            if (slot := reservoir.wants()) is not None:
                reservoir.put(slot, i)
            assert len(reservoir) <= 50
        kept += reservoir.drain()
    assert len(kept) == 20 * 50
    assert abs(sum(kept) / len(kept) - 1000) < 60  # uniform over 0..1999: mean 1000, se ~13


def test_reservoir_slots_drawn_before_their_items_are_filled_do_not_collide():
    reservoir = Reservoir(3, random.Random(0))
    # three requests sampled, their features not computed yet
    tickets = [reservoir.wants() for _ in range(3)]
    for i, ticket in enumerate(reversed(tickets)):
        reservoir.put(ticket, i)
    assert sorted(reservoir.drain()) == [0, 1, 2]


def test_an_item_whose_ticket_was_drawn_before_a_drain_goes_to_the_next_drain():
    reservoir = Reservoir(3, random.Random(0))
    ticket = reservoir.wants()
    assert reservoir.drain() == []  # its features were still being computed
    new = reservoir.wants()
    reservoir.put(ticket, "late")  # not lost, and it does not take the new period's slot
    reservoir.put(new, "new")
    assert reservoir.drain() == ["late", "new"]
    assert reservoir.drain() == []


def test_reservoir_is_safe_to_fill_from_threads_while_it_is_drained():
    reservoir, drained = Reservoir(64, random.Random(0)), []

    def offer() -> None:
        for i in range(20_000):
            if (ticket := reservoir.wants()) is not None:
                reservoir.put(ticket, i)

    workers = [threading.Thread(target=offer) for _ in range(4)]
    for worker in workers:
        worker.start()
    while any(worker.is_alive() for worker in workers):
        drained.append(reservoir.drain())
    drained.append(reservoir.drain())
    # late ones: at most one per worker
    assert all(len(batch) <= 64 + len(workers) for batch in drained)
    assert sum(map(len, drained)) >= 64


def _features(rng: random.Random, n: int, darken: float = 1.0) -> list[dict[str, float]]:
    return [
        request_features(
            _request(int(rng.randint(60, 200) * darken), size=rng.choice([48, 64, 80]))
        )
        for _ in range(n)
    ]


def test_same_distribution_rarely_alarms_and_a_darkened_stream_does():
    rng = random.Random(1)
    reference = _features(rng, 40)
    alarms = [
        input_drift(reference, _features(rng, 60), look=1, permutations=100, seed=s).drifted
        for s in range(10)
    ]
    assert sum(alarms) <= 1
    dark = input_drift(reference, _features(rng, 60, darken=0.5), look=3, permutations=100)
    assert dark.drifted and dark.top in ("ks:brightness", "mmd") and dark.p < dark.alpha


def test_alarm_control_over_looks_and_deployments():
    assert spent_p(0.001, 1) == pytest.approx(0.001 * 3.14159**2 / 6, rel=1e-4)
    # a late look needs a smaller p for the same alarm
    assert spent_p(0.001, 10) > spent_p(0.001, 2)
    q = benjamini_hochberg({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.5})
    assert q == pytest.approx({"a": 0.04, "b": 0.04 * 4 / 3, "c": 0.04 * 4 / 3, "d": 0.5})


def _logprobs(rng: random.Random, n: int, mean: float, sd: float = 0.1) -> list[float]:
    return [min(0.0, rng.gauss(mean, sd)) for _ in range(n)]


def test_a_confidence_drop_is_detected_and_named_as_a_drop():
    rng = random.Random(2)
    look = confidence_drift(_logprobs(rng, 40, -0.9, 0.2), _logprobs(rng, 30, -0.3))
    assert look.p < 1e-6 and look.statistic > 0.9 and (look.n, look.n_baseline) == (40, 30)
    assert look.shift == pytest.approx(look.mean - look.baseline_mean) and look.shift < -0.4
    assert "lower (less sure) by 0.6" in look.message("canary", 3) and "(look 3)" in look.message(
        "canary", 3
    )
    assert "higher (surer)" in confidence_drift([-0.1] * 20, [-0.5, -0.6, -0.7]).message(
        "stable", 1
    )


def test_confidences_from_the_baseline_distribution_rarely_look_drifted():
    rng = random.Random(3)
    baseline = _logprobs(rng, 30, -0.3)
    p_values = [confidence_drift(_logprobs(rng, 40, -0.3), baseline).p for _ in range(20)]
    assert sum(p < 0.01 for p in p_values) <= 1
    with pytest.raises(ValueError, match="both sides"):
        confidence_drift([-0.2] * 20, [])

"""The export of captures as the trainer's chat JSONL, on a real catalog and capture store: which
captures go in, with which answer, in which order, and that the trainer's loader reads every
line."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from lorafleet.adapters.catalog import Deployment, Feedback
from lorafleet.chat_jsonl import load_jsonl
from lorafleet.serve.feedback.capture import Capturer
from lorafleet.serve.feedback.export import ExportOptions, ExportPlan, export_lines, plan_export
from lorafleet.serve.metrics import Metrics
from lorafleet.serve.types import Route
from tests.helpers import image_messages

T0 = 1_800_000_000.0
# request id -> (confidence, feedback (score, correction) or None); requests in this order, one
# second apart
TRAFFIC = {
    "plain": (-0.30, None),
    "liked": (-0.10, (1, None)),
    "corrected": (-0.90, (-1, "a blue square")),
    "disliked": (-0.50, (0.25, None)),
    "unsure": (None, None),
}


@dataclass
class Exported:
    sent: dict[str, list[dict]]  # request id -> its messages as the client sent them
    export: Callable[..., tuple[ExportPlan, list[dict]]]  # options -> (the plan, the parsed lines)

    def __call__(self, **options) -> tuple[ExportPlan, list[dict]]:
        return self.export(**options)


@pytest.fixture
def exported(sessions, images, place) -> Exported:
    """A deployment with the TRAFFIC captures (a picture each) and their feedback, ready to
    export."""
    invoice = place()
    capturer = Capturer(sessions, images, Metrics(), 1 << 24)
    sent = {}
    for i, (request_id, (confidence, feedback)) in enumerate(TRAFFIC.items()):
        sent[request_id] = image_messages(f"What is {request_id}?", color=(10 * i, 100, 200))
        route = Route(
            deployment=invoice.deployment,
            digest=invoice.digest,
            deployment_id=invoice.deployment_id,
            request_id=request_id,
            capture={"sample_rate": 1.0, "max_per_day": 100, "retention_days": 1.0},
        )
        assert capturer.keep(
            invoice.tenant_id, route, sent[request_id], f"served {request_id}", confidence, T0 + i
        )
        if feedback is not None:
            score, correction = feedback
            with sessions() as s:
                s.add(
                    Feedback(
                        tenant_id=invoice.tenant_id,
                        request_id=request_id,
                        deployment_id=invoice.deployment_id,
                        deployment=invoice.deployment,
                        variant="stable",
                        digest=invoice.digest,
                        score=score,
                        value=0.0 if score == -1 else float(score),
                        correction=correction,
                        comment="checked",
                        at=T0 + i,
                        created_at=T0 + i,
                        updated_at=T0 + i,
                    )
                )
                s.commit()

    def export(**options) -> tuple[ExportPlan, list[dict]]:
        with sessions() as s:
            plan = plan_export(
                s, s.get_one(Deployment, invoice.deployment_id), ExportOptions(**options)
            )
        return plan, [json.loads(line) for line in export_lines(sessions, images, plan)]

    return Exported(sent, export)


def _ids(lines: list[dict]) -> list[str]:
    return [line["metadata"]["request_id"] for line in lines]


def _answers(lines: list[dict]) -> dict[str, str]:
    return {line["metadata"]["request_id"]: line["messages"][-1]["content"] for line in lines}


def test_by_default_every_capture_oldest_first_with_corrections_and_without_known_wrong_answers(
    exported,
):
    plan, lines = exported()
    assert _ids(lines) == ["plain", "liked", "corrected", "unsure"]
    assert plan.left_out == {"negative_feedback": 1}
    assert (
        _answers(lines)["corrected"] == "a blue square"
        and _answers(lines)["plain"] == "served plain"
    )
    corrected = lines[2]["metadata"]
    assert corrected["answer"] == "correction" and corrected["feedback"] == {
        "score": -1,
        "comment": "checked",
    }
    assert (
        corrected["confidence_mean"] == -0.9
        and corrected["at"] == T0 + 2
        and corrected["variant"] == "stable"
    )
    assert len(corrected["adapter"]) == 64 and not corrected["review"]
    assert lines[0]["metadata"]["feedback"] is None and lines[0]["metadata"]["answer"] == "served"


def test_the_request_is_exported_as_sent_with_the_answer_appended(exported):
    _, lines = exported()
    for line in lines:
        request_id = line["metadata"]["request_id"]
        # images inlined again, byte for byte
        assert line["messages"][:-1] == exported.sent[request_id]
        assert line["messages"][-1]["role"] == "assistant"


def test_review_keeps_negative_feedback_without_a_correction_marked(exported):
    plan, lines = exported(review=True)
    assert (
        _ids(lines) == ["plain", "liked", "corrected", "disliked", "unsure"] and not plan.left_out
    )
    disliked = lines[3]
    assert (
        disliked["metadata"]["review"] and disliked["messages"][-1]["content"] == "served disliked"
    )
    assert [line["metadata"]["review"] for line in lines].count(True) == 1 == plan.review


def test_with_feedback_only_judged_captures(exported):
    plan, lines = exported(with_feedback=True)
    assert _ids(lines) == ["liked", "corrected"]
    assert plan.left_out == {"no_feedback": 2, "negative_feedback": 1}


def test_corrections_only(exported):
    plan, lines = exported(corrections_only=True)
    assert _ids(lines) == ["corrected"] and plan.left_out == {"no_correction": 4}


def test_lowest_confidence_first_all_for_review(exported):
    plan, lines = exported(lowest_confidence=2)
    # -0.9, -0.3 (disliked, -0.5, is left out as known wrong)
    assert _ids(lines) == ["corrected", "plain"]
    assert all(line["metadata"]["review"] for line in lines)
    assert plan.left_out == {"negative_feedback": 1, "no_confidence": 1, "not_least_confident": 1}
    _, reviewed = exported(lowest_confidence=10, review=True)
    assert _ids(reviewed) == ["corrected", "disliked", "plain", "liked"]


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"review": True},
        {"with_feedback": True},
        {"corrections_only": True},
        {"lowest_confidence": 3, "review": True},
    ],
)
def test_the_trainer_loads_every_exported_line(exported, options, tmp_path: Path):
    plan, lines = exported(**options)
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    examples = load_jsonl(path)
    assert len(examples) == len(lines) == len(plan.chosen) > 0
    assert all(
        len(example.images) == 1 and example.images[0].size == (64, 64) for example in examples
    )


def test_a_deployment_without_captures_exports_nothing(sessions, images, place):
    empty = place(deployment="empty")
    with sessions() as s:
        plan = plan_export(s, s.get_one(Deployment, empty.deployment_id), ExportOptions())
    assert (
        plan.chosen == [] and not plan.left_out and list(export_lines(sessions, images, plan)) == []
    )


def test_a_capture_whose_image_is_gone_is_skipped(exported, images):
    plan, _ = exported()
    victim = next(d for d, _ in images.digests())
    images.path(victim).unlink()
    _, lines = exported()
    assert len(lines) == len(plan.chosen) - 1

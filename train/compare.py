"""Baseline-first evaluation: the base and the adapter answer the same sets through vLLM, side by
side."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lorafleet.adapters.pictures import PictureBudget
from lorafleet.chat_jsonl import Example, answer_of, load_jsonl, request_messages
from lorafleet.scoring import METRICS, json_object
from lorafleet.train.vllm_generate import generate

__all__ = [
    "SetScore",
    "EvalReport",
    "compare_to_base",
    "infer_answer_format",
    "FORGETTING_TOLERANCE",
]

FORGETTING_TOLERANCE = 0.05  # a probe score drop above this many points (as a fraction) is reported


@dataclass
class SetScore:
    """One data set scored for the base and the adapter."""

    name: str  # "validation" or "probe"
    metric: str
    n: int
    base: float
    adapter: float
    format_name: str | None = None
    base_format: float | None = None
    adapter_format: float | None = None

    @property
    def delta(self) -> float:
        return self.adapter - self.base


@dataclass
class EvalReport:
    sets: list[SetScore]
    # set -> model -> gens
    outputs: dict[str, dict[str, list[dict]]] = field(default_factory=dict, repr=False)

    def verdicts(self) -> list[str]:
        """Plain sentences about what the numbers mean; empty when the adapter helped and forgot
        nothing."""
        lines = []
        for s in self.sets:
            if s.name == "validation" and s.delta <= 0:
                lines.append(
                    f"The adapter did NOT help: {s.metric} {s.adapter:.3f} vs the base's "
                    f"{s.base:.3f} on the validation set (n={s.n})."
                )
            if s.name == "probe" and -s.delta > FORGETTING_TOLERANCE:
                lines.append(
                    f"Forgetting: the probe score fell from {s.base:.3f} to {s.adapter:.3f} "
                    f"({-s.delta * 100:.1f} points, tolerance {FORGETTING_TOLERANCE * 100:.0f})."
                )
        return lines

    def to_dict(self) -> dict:
        return {"sets": [asdict(s) for s in self.sets], "verdicts": self.verdicts()}


def infer_answer_format(references: list[str]) -> tuple[str, Callable[[str], bool]] | None:
    """The answer format the references share, as (name, check): a JSON object, or a single word."""
    if references and all(json_object(r) is not None for r in references):
        return "valid JSON object", lambda text: json_object(text) is not None
    if references and all(re.fullmatch(r"\S+", r.strip()) for r in references):
        return "one word", lambda text: re.fullmatch(r"\S+", text.strip()) is not None
    return None


def _score(
    name: str, examples: list[Example], outputs: dict[str, list[dict]], metric: str
) -> SetScore:
    references = [answer_of(e) for e in examples]
    scores = {}
    for model in ("base", "adapter"):
        texts = [o["text"] for o in outputs[model]]
        scores[model] = sum(METRICS[metric](t, r) for t, r in zip(texts, references)) / len(
            references
        )
    result = SetScore(
        name=name, metric=metric, n=len(examples), base=scores["base"], adapter=scores["adapter"]
    )
    if (checker := infer_answer_format(references)) is not None:
        result.format_name, check = checker
        result.base_format = sum(check(o["text"]) for o in outputs["base"]) / len(examples)
        result.adapter_format = sum(check(o["text"]) for o in outputs["adapter"]) / len(examples)
    return result


def compare_to_base(
    base: str,
    adapter: Path,
    val: Path | None,
    probe: Path | None,
    metric: str = "exact_match",
    max_tokens: int = 64,
    max_rank: int = 64,
    pictures: PictureBudget | None = None,
) -> EvalReport:
    """Score the base and the adapter on the validation set (the task's metric) and the probe set
    (exact match on the base's general task), in one vLLM engine."""
    sets = {
        name: load_jsonl(path) for name, path in (("validation", val), ("probe", probe)) if path
    }
    prompts = [request_messages(e) for examples in sets.values() for e in examples]
    if not prompts:
        return EvalReport(sets=[])
    generations = generate(
        base,
        {"base": None, "adapter": str(adapter)},
        prompts,
        max_tokens,
        max_rank=max_rank,
        pictures=pictures,
    )
    report, start = EvalReport(sets=[]), 0
    for name, examples in sets.items():
        outputs = {m: generations[m][start : start + len(examples)] for m in ("base", "adapter")}
        start += len(examples)
        report.outputs[name] = outputs
        report.sets.append(
            _score(name, examples, outputs, metric if name == "validation" else "exact_match")
        )
    return report

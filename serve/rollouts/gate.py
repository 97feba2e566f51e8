"""The validation gate of a canary rollout: before any traffic, the stable and the candidate
version answer the deployment's validation set (greedy, through the engine) and the candidate
must be non-inferior on the same items (`paired_gate`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from lorafleet.serve.engine.client import Engines
from lorafleet.serve.rollouts.state import RolloutStart
from lorafleet.serve.rollouts.statistics import Measurement
from lorafleet.serve.validation import ValidationItem, paired_test, replay_and_score

__all__ = ["run_gate", "GateProgress", "MAX_DISAGREEMENTS"]

MAX_DISAGREEMENTS = 20  # items where the two versions scored differently, kept as evidence


@dataclass
class GateProgress:
    """How far a running gate is: answers so far of `total` (each version answers every item)."""

    total: int
    answered: int = 0
    started_at: float = field(default_factory=time.time)

    def one_more(self) -> None:
        self.answered += 1


async def run_gate(
    engine: Engines,
    items: list[ValidationItem],
    metric: str,
    stable_digest: str,
    candidate_digest: str,
    params: RolloutStart,
    progress: GateProgress | None = None,
    answer_format: dict | None = None,
    tenant: str = "",
) -> tuple[Measurement, dict]:
    """The gate's measurement and its evidence (per-item scores and the first disagreements);
    `progress` counts the answers as they come; the deployment's `answer_format` constrains them
    where it is enforced, as it does live answers."""
    answered = progress.one_more if progress is not None else None
    stable, candidate = [
        await replay_and_score(
            engine,
            digest,
            items,
            metric,
            params.gate_max_tokens,
            answered=answered,
            answer_format=answer_format,
            tenant=tenant,
        )
        for digest in (stable_digest, candidate_digest)
    ]
    measurement = await paired_test(stable.scores, candidate.scores, params.margin, params.alpha)
    disagreements = [
        {
            "item": i,
            "stable": stable.outputs[i][:200],
            "candidate": candidate.outputs[i][:200],
            "answer": items[i].answer[:200],
        }
        for i in range(len(items))
        if stable.scores[i] != candidate.scores[i]
    ][:MAX_DISAGREEMENTS]
    evidence = {
        "metric": metric,
        "items": len(items),
        "stable_scores": stable.scores,
        "candidate_scores": candidate.scores,
        "disagreements": disagreements,
    }
    return measurement, evidence

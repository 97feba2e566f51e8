"""The phases of a rollout and of an A/B test, in the order they can follow each other.

Canary: Gating -> Progressing <-> Paused -> Promoted | RolledBack | Aborted, or Gating ->
GateRefused. A/B test: Running -> Stopped.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["Phase", "ACTIVE", "SERVING"]


class Phase(StrEnum):
    GATING = "Gating"
    PROGRESSING = "Progressing"
    PAUSED = "Paused"
    RUNNING = "Running"  # an A/B test
    PROMOTED = "Promoted"
    ROLLED_BACK = "RolledBack"
    ABORTED = "Aborted"
    GATE_REFUSED = "GateRefused"
    STOPPED = "Stopped"


ACTIVE = frozenset({Phase.GATING, Phase.PROGRESSING, Phase.PAUSED, Phase.RUNNING})
# the rollout's routing table is in effect
SERVING = frozenset({Phase.PROGRESSING, Phase.PAUSED, Phase.RUNNING})

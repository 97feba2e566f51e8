"""What a training run produced and whether its validation loss had stopped falling (no torch
here: the pipeline, the CLI and the tests read results without loading the trainer)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lorafleet.train.config import TrainConfig

# a last validation this much (relative) below the one before: the loss was still falling
STILL_IMPROVING = 0.02


def still_improving(val_losses: list[float], tolerance: float = STILL_IMPROVING) -> bool | None:
    """Whether validation loss was still falling when training ended: the last validation is the
    best one and improved on the one before by more than `tolerance`. None when fewer than two
    validations say nothing."""
    if len(val_losses) < 2:
        return None
    *earlier, last = val_losses
    return last <= min(earlier) and (earlier[-1] - last) > tolerance * abs(earlier[-1])


@dataclass(frozen=True)
class TrainResult:
    out: Path
    steps: int
    resumed_from: int  # 0 for a fresh run
    best_val_loss: float | None
    stopped_early: bool
    samples_per_s: float
    peak_memory_mb: float
    processes: int  # data-parallel workers (accelerate launch --num_processes)
    val_losses: tuple[float, ...] = ()  # every validation of the run, in order

    @property
    def converged(self) -> bool | None:
        """False when the validation loss was still falling at the end (more training would
        likely help)."""
        if self.stopped_early:  # patience ran out: the loss stopped improving
            return True
        improving = still_improving(list(self.val_losses))
        return None if improving is None else not improving

    def advice(self, config: TrainConfig) -> str | None:
        """What to try when the run ended before its validation loss stopped falling."""
        if self.converged is not False:
            return None
        before, last = self.val_losses[-2], self.val_losses[-1]
        return (
            "not converged: the validation loss was still falling at the end "
            f"({before:.4f} -> {last:.4f}, {(last - before) / before:+.0%}); try more epochs "
            f"(e.g. --epochs {config.epochs * 2}) or a higher learning rate "
            f"(e.g. --lr {config.lr * 5:g})"
        )

"""Training configuration: every default visible, loadable from YAML, overridable from the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lorafleet.adapters.base_model import PARTS
from lorafleet.adapters.pictures import (
    DEFAULT_CONTEXT,
    DEFAULT_IMAGE_TOKENS,
    PictureBudget,
    picture_budget,
)
from lorafleet.errors import InvalidRequest

__all__ = ["TrainConfig", "load_config"]

Part = Literal["language", "connector", "vision"]


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base: str  # hub id or local path of the base model the adapter is for
    train: Path  # chat JSONL
    out: Path  # adapter folder (+ manifest.json, checkpoint/)
    val: Path | None = None  # chat JSONL: validation loss, early stopping, task score
    probe: Path | None = None  # chat JSONL of the base's general ability: forgetting check
    mix: Path | None = None  # chat JSONL of general examples mixed into training against forgetting
    # mixed examples per training example (at most all of `mix`)
    mix_ratio: float = Field(0.5, ge=0.0)
    # the parts of the base that get LoRA layers: any of "language", "connector", "vision" (the
    # vision tower); the connector and tower only where vLLM applies LoRA to them
    parts: tuple[Part, ...] = ("language",)
    rank: int = Field(16, ge=1)
    alpha: float = 32.0
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    lr: float = Field(2e-4, gt=0.0)
    # the learning rate of the connector's and vision tower's LoRA layers; None: lr
    tower_lr: float | None = Field(None, gt=0.0)
    epochs: int = Field(3, ge=1)
    # > 0: stop after this many optimizer steps, whatever the epochs
    max_steps: int = Field(0, ge=0)
    batch_size: int = Field(8, ge=1)  # per process
    grad_accum: int = Field(1, ge=1)
    # longer examples are refused, never truncated; the engine's default context
    max_length: int = Field(DEFAULT_CONTEXT, ge=16)
    # the most tokens one picture becomes (and at most half of max_length): larger ones are scaled
    # down, as the server scales them (LORAFLEET_MAX_IMAGE_TOKENS)
    max_image_tokens: int = Field(DEFAULT_IMAGE_TOKENS, ge=1)
    warmup_steps: int = Field(10, ge=0)
    seed: int = 0
    eval_every: int = Field(0, ge=0)  # optimizer steps between validations; 0: once per epoch
    # validations without improvement before stopping; 0: never stop early
    patience: int = Field(3, ge=0)
    gradient_checkpointing: bool = False
    # full-precision base in 4-bit NF4 (bitsandbytes, CUDA); auto: on with
    qlora: Literal["auto", "on", "off"] = "auto"
    # CUDA. A base already quantized (`lorafleet quantize`) is always trained as it is, the weights
    # vLLM serves
    max_rank: int = 64  # the server's max LoRA rank
    eval_max_tokens: int = 64  # generation budget when scoring
    metric: Literal["exact_match", "anls", "json_fields"] = "exact_match"
    check_tokens: int = 8  # servability: vLLM and PEFT must agree on this many first greedy tokens

    @field_validator("train", "out", "val", "probe", "mix")
    @classmethod
    def _absolute(cls, path: Path | None) -> Path | None:
        """Relative paths mean the working directory of the command; child processes get absolute
        ones."""
        return None if path is None else path.expanduser().resolve()

    @field_validator("parts", mode="before")
    @classmethod
    def _parts(cls, parts: Any) -> Any:
        """A comma-separated string (the CLI's) or a list; each part once, in PARTS order."""
        if isinstance(parts, str):
            parts = [p.strip() for p in parts.split(",") if p.strip()]
        if isinstance(parts, list | tuple):
            if not parts:
                raise ValueError(f"name at least one of {', '.join(PARTS)}")
            return tuple(p for p in PARTS if p in parts) + tuple(p for p in parts if p not in PARTS)
        return parts

    @field_validator("base")
    @classmethod
    def _local_base_absolute(cls, base: str) -> str:
        local = Path(base).expanduser()
        return str(local.resolve()) if local.exists() else base  # else a hub id

    def pictures(self) -> PictureBudget | None:
        """How far pictures are scaled down in training, evaluation and the servability proof."""
        return picture_budget(self.base, self.max_image_tokens, self.max_length)


def load_config(path: Path | None = None, **overrides: Any) -> TrainConfig:
    """A YAML file's values, then the non-None overrides; errors name the bad field."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            values = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise InvalidRequest(f"config {path}: {exc}") from exc
        if not isinstance(values, dict):
            raise InvalidRequest(f"config {path}: expected a mapping of settings")
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        config = TrainConfig(**values)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise InvalidRequest(f"invalid training config: {problems}") from exc
    if config.rank > config.max_rank:
        raise InvalidRequest(
            f"rank {config.rank} is above the server's max LoRA rank {config.max_rank}"
        )
    return config

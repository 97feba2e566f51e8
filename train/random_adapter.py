"""Seeded random LoRA adapters for the demo, tests and benchmarks: real PEFT output, on the language
model (or the parts of the base asked for), for a base of any size (its weights are never read)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["make_random_adapter"]


def make_random_adapter(
    base: str | Path,
    out: Path,
    seed: int,
    rank: int = 8,
    std: float = 0.5,
    parts: tuple[str, ...] = ("language",),
) -> Path:
    """Save a PEFT LoRA adapter for `base` on every LoRA-able layer of `parts` (of "language",
    "connector", "vision"), whose B matrices are random, so it visibly changes outputs; A as PEFT
    initialises it (uniform in ±1/√in), from the same seed. In float32, as PEFT keeps adapters of
    a bfloat16 base.

    A tiny `std` (1e-6) answers like the base; std=0 leaves B = 0, which upload validation
    refuses as a no-op."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from lorafleet.adapters.base_model import base_config, load_base_spec

    spec = load_base_spec(str(base))
    with torch.device("meta"):  # shapes only: a 3B base costs nothing to wrap
        model = AutoModelForImageTextToText.from_config(base_config(str(base)))
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        target_modules=spec.lora_target_regex(parts),
    )
    config.base_model_name_or_path = str(base)
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, param in peft_model.named_parameters():
        if "lora_A" in name:
            bound = 1 / param.shape[1] ** 0.5
            weights[name] = (torch.rand(param.shape, generator=generator) * 2 - 1) * bound
        elif "lora_B" in name:  # PEFT starts B at zero (a no-op adapter); make it do something
            weights[name] = torch.randn(param.shape, generator=generator) * std
    peft_model.save_pretrained(str(out), state_dict=weights)
    return Path(out)

"""Seeded random LoRA adapters for the demo and tests: real PEFT output, language model only."""

from __future__ import annotations

from pathlib import Path

__all__ = ["make_random_adapter"]


def make_random_adapter(
    base: str | Path, out: Path, seed: int, rank: int = 8, std: float = 0.5
) -> Path:
    """Save a PEFT LoRA adapter for `base` whose B matrices are random, so it visibly changes
    outputs.

    A tiny `std` (1e-6) answers like the base; std=0 leaves B = 0, which upload validation
    refuses as a no-op."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from lorafleet.adapters.base_model import load_base_spec

    spec = load_base_spec(str(base))
    model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=spec.lora_target_regex()
    )
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero (a no-op adapter); make it do something
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    peft_model.save_pretrained(str(out))
    return Path(out)

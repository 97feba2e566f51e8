"""LoRA target selection: every language-model linear layer, nothing in the vision tower or the
head."""

from __future__ import annotations

import re

from lorafleet.adapters.base_model import load_base_spec
from lorafleet.train.config import load_config


def test_target_regex_hits_exactly_the_language_model_linears(tiny_model):
    spec = load_base_spec(str(tiny_model))
    regex = spec.lora_target_regex()
    assert all(re.fullmatch(regex, path) for path in spec.lora_modules)
    assert not any(re.fullmatch(regex, path) for path in spec.other_linear)
    assert any("visual" in path for path in spec.other_linear)  # the tower exists and is excluded


def test_peft_model_has_lora_only_on_the_language_model(tiny_model, tmp_path):
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForImageTextToText

    from lorafleet.train.trainer import lora_config

    config = load_config(None, base=str(tiny_model), train="t.jsonl", out=str(tmp_path))
    model = get_peft_model(
        AutoModelForImageTextToText.from_pretrained(tiny_model, dtype=torch.float32),
        lora_config(config),
    )
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(
        "language_model" in n and ("lora_A" in n or "lora_B" in n) for n in trainable
    )
    spec = load_base_spec(str(tiny_model))
    assert len(trainable) == 2 * len(spec.lora_modules)

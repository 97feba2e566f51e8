"""LoRA target selection: every language-model linear layer, nothing in the vision tower or the
head, unless the parts asked for include the connector or the tower."""

from __future__ import annotations

import re

import pytest

from lorafleet.adapters.base_model import load_base_spec
from lorafleet.train.config import load_config


def test_target_regex_hits_exactly_the_language_model_linears(tiny_model):
    spec = load_base_spec(str(tiny_model))
    regex = spec.lora_target_regex()
    assert all(re.fullmatch(regex, path) for path in spec.lora_modules)
    assert not any(re.fullmatch(regex, path) for path in spec.other_linear)
    assert not any(re.fullmatch(regex, path) for path in spec.tower_modules)
    assert any("visual" in path for path in spec.tower_modules)  # the tower exists and is excluded


@pytest.mark.parametrize(
    "parts", [("vision",), ("connector",), ("language", "connector"), ("language", "vision")]
)
def test_target_regex_of_parts_hits_exactly_their_linears(tiny_model, parts):
    spec = load_base_spec(str(tiny_model))
    regex = spec.lora_target_regex(parts)
    every = [*spec.lora_modules, *spec.tower_modules]
    hit = {p for p in every if re.fullmatch(regex, p)}
    assert hit == {p for p in every if spec.part(p) in parts}
    assert not any(re.fullmatch(regex, path) for path in spec.other_linear)
    # Conv3d patch embedding and norms are not linear layers: never targets
    assert not re.fullmatch(regex, "model.visual.patch_embed.proj")


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


def test_the_trainer_puts_lora_on_the_parts_asked_for_at_their_learning_rates(tiny_model, tmp_path):
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForImageTextToText

    from lorafleet.train.trainer import _param_groups, lora_config

    config = load_config(
        None,
        base=str(tiny_model),
        train="t.jsonl",
        out=str(tmp_path),
        parts="vision,language",
        lr=1e-3,
        tower_lr=2e-4,
    )
    assert config.parts == ("language", "vision")  # in the order of the data flow
    model = get_peft_model(
        AutoModelForImageTextToText.from_pretrained(tiny_model, dtype=torch.float32),
        lora_config(config),
    )
    spec = load_base_spec(str(tiny_model))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    vision = [p for p in spec.tower_modules if spec.part(p) == "vision"]
    assert len(trainable) == 2 * (len(spec.lora_modules) + len(vision))
    assert not any("merger" in n for n in trainable)
    groups = {g["lr"]: len(g["params"]) for g in _param_groups(model, config)}
    assert groups == {1e-3: 2 * len(spec.lora_modules), 2e-4: 2 * len(vision)}


def test_parts_must_be_known_and_not_empty(tiny_model, tmp_path):
    from lorafleet.errors import InvalidRequest

    for parts in ("", "language,eyes"):
        with pytest.raises(InvalidRequest, match="parts"):
            load_config(None, base=str(tiny_model), train="t.jsonl", out=str(tmp_path), parts=parts)

"""The real-size base has its published architecture: built on the meta device (no memory, no
weights), counted."""

from __future__ import annotations

import pytest

from lorafleet.adapters.base_model import load_base_spec, training_dtype
from lorafleet.adapters.validate import MIN_UPLOAD_BYTES, upload_limit
from lorafleet.train import tiny_model
from lorafleet.train.real_size_base import REAL_SIZES, real_size_config
from lorafleet.train.tiny_model import local_tokenizer

pytestmark = pytest.mark.heavy_imports  # transformers' model code, imported by the tests


@pytest.fixture(scope="module")
def model_3b():
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        return Qwen2_5_VLForConditionalGeneration(
            real_size_config("qwen2.5-vl-3b", local_tokenizer())
        )


def test_qwen2_5_vl_3b_has_its_published_size(model_3b):
    params = sum(p.numel() for p in model_3b.parameters())
    assert 3.70e9 < params < 3.80e9  # published: 3.75 B
    text = model_3b.config.get_text_config()
    assert (text.hidden_size, text.num_hidden_layers, text.vocab_size) == (2048, 36, 151936)
    assert model_3b.config.vision_config.depth == 32


def test_its_language_model_layers_are_the_lora_targets(model_3b, tmp_path):
    model_3b.config.save_pretrained(tmp_path)
    spec = load_base_spec(str(tmp_path))
    # 7 linear layers in each of the 36 decoder layers; nothing of the vision tower
    assert len(spec.lora_modules) == 7 * 36
    assert not [m for m in spec.lora_modules if "visual" in m]


def test_an_unknown_base_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="qwen2.5-vl-3b"):
        real_size_config("qwen9-vl-1t", local_tokenizer())
    assert "qwen2.5-vl-3b" in REAL_SIZES


@pytest.mark.parametrize(
    ("stored", "cuda", "computed"),
    [
        ("bfloat16", False, "bfloat16"),  # a released base: half the memory on a CPU
        ("float32", False, "float32"),  # the tiny base, as before
        ("float32", True, "bfloat16"),
    ],
)
def test_training_computes_in_the_checkpoints_dtype_on_a_cpu(tmp_path, stored, cuda, computed):
    import torch

    config = real_size_config("qwen2.5-vl-3b", local_tokenizer())
    config.dtype = getattr(torch, stored)
    config.save_pretrained(tmp_path)
    assert training_dtype(str(tmp_path), cuda) == computed


def test_the_upload_limit_holds_the_largest_adapter_of_the_base(model_3b, tmp_path):
    import copy

    config = copy.deepcopy(model_3b.config)
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]  # as released
    config.save_pretrained(tmp_path / "3b")
    spec = load_base_spec(str(tmp_path / "3b"))
    # a rank-64 adapter on every layer of its language model: 479 MB measured by bench_real_size.py
    language = 64 * sum(i + o for i, o in spec.lora_modules.values()) * 4
    assert 478e6 < language < 480e6
    # with its vision tower and connector, which the engine applies LoRA to as well
    assert 661e6 < spec.adapter_bytes(64) < 663e6
    assert upload_limit(spec, 64) == spec.adapter_bytes(64) * 5 // 4 > 512 * 1024**2
    # the tiny base's adapters are small: the limit stays what it was
    tiny_model._config(local_tokenizer()).save_pretrained(tmp_path / "tiny")
    assert upload_limit(load_base_spec(str(tmp_path / "tiny")), 64) == MIN_UPLOAD_BYTES

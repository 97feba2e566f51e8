"""A base with the architecture and size of a released VLM, its published config with random
weights, built locally (no hub): what lorafleet is measured on at real size
(`loadtests/bench_real_size.py`). Its answers mean nothing; its shapes, memory and speed are real.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorafleet.train.tiny_model import (
    local_processor,
    local_tokenizer,
    save_base,
    special_token_ids,
)

__all__ = ["REAL_SIZES", "build_real_size_base", "real_size_config"]

# Qwen2.5-VL-3B-Instruct's published config.json and preprocessor_config.json: every dimension
# (about 3.75 B parameters); the token ids are the local tokenizer's, the vocabulary its published
# size
REAL_SIZES: dict[str, dict[str, Any]] = {
    "qwen2.5-vl-3b": dict(
        text=dict(
            vocab_size=151936,
            hidden_size=2048,
            intermediate_size=11008,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=2,
            max_position_embeddings=128000,
            rope_theta=1000000.0,
            rms_norm_eps=1e-6,
            rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
            tie_word_embeddings=True,
            use_sliding_window=False,
            hidden_act="silu",
        ),
        vision=dict(
            depth=32,
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            out_hidden_size=2048,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
            window_size=112,
            fullatt_block_indexes=[7, 15, 23, 31],
            tokens_per_second=2,
            hidden_act="silu",
        ),
        min_pixels=56 * 56,
        max_pixels=12845056,
    ),
}


def real_size_config(like: str, tokenizer):
    """`like`'s published config, with `tokenizer`'s special token ids."""
    from transformers import Qwen2_5_VLConfig

    if like not in REAL_SIZES:
        raise ValueError(f"unknown base {like!r}; one of: {', '.join(REAL_SIZES)}")
    size = REAL_SIZES[like]
    text_ids, vision_ids = special_token_ids(tokenizer)
    return Qwen2_5_VLConfig(
        text_config={**size["text"], **text_ids},
        vision_config=size["vision"],
        **vision_ids,
    )


def build_real_size_base(out: Path, like: str = "qwen2.5-vl-3b", seed: int = 0) -> Path:
    """Write a base of `like`'s architecture and size to `out` in bfloat16, randomly initialised
    (about 7.5 GB and a few minutes for the 3B)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    tokenizer = local_tokenizer()
    config = real_size_config(like, tokenizer)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bfloat16: half the memory of float32
    try:
        model = Qwen2_5_VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
    model.config.dtype = torch.bfloat16
    size = REAL_SIZES[like]
    save_base(out, model, local_processor(tokenizer, size["min_pixels"], size["max_pixels"]))
    return out

"""Quantized bases: the schemes lorafleet writes, and what a checkpoint says about its own
quantization.

lorafleet quantizes with torchao, weight-only: the language model's linear layers get int4 (per
group) or int8 (per row) weights, the vision tower and the output head stay in full precision, as
official 4-bit VLM releases do. vLLM serves these with LoRA on its CPU engine (measured by
`loadtests/bench_quantization.py`) and on GPUs; the LoRA layers themselves always run in full
precision on top of the quantized base layer.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lorafleet.adapters.base_model import BaseModelSpec, base_config
from lorafleet.errors import InvalidRequest

__all__ = [
    "SCHEMES",
    "CHECKPOINT_SCHEMES",
    "check_group_size",
    "checkpoint_dtype",
    "checkpoint_quantization",
    "describe_checkpoint",
    "full_precision_parts",
    "online_overrides",
    "torchao_config",
    "unquantized_modules",
]

# torchao weight-only: what `--quantize` applies at load, and `lorafleet quantize` writes
SCHEMES = ("int4", "int8")
# + compressed-tensors W4A16 (packed 4-bit; AVX-512 CPUs and CUDA GPUs)
CHECKPOINT_SCHEMES = (*SCHEMES, "w4a16")


def full_precision_parts(spec: BaseModelSpec) -> list[str]:
    """Top-level modules with linear layers outside the language model (Qwen2.5-VL: ["visual"]).

    The names match both transformers' paths (model.visual.…) and vLLM's (visual.…): vLLM skips a
    layer when one of these is a whole component of its path."""
    # vLLM's output head is not a linear layer it quantizes; the vision tower and connector stay
    # in full precision, LoRA-able or not
    paths = [p for p, part in spec.other_linear.items() if part != "output head"]
    paths += list(spec.tower_modules)
    return sorted({p.removeprefix(spec.outer_prefix).split(".", 1)[0] for p in paths})


def unquantized_modules(spec: BaseModelSpec) -> list[str]:
    """`modules_to_not_convert` for a checkpoint: each full-precision part under both namings
    (transformers matches path prefixes, "model.visual"; vLLM matches path components, "visual"),
    and the output head."""
    return sorted(
        {name for part in full_precision_parts(spec) for name in (spec.outer_prefix + part, part)}
        | {"lm_head"}
    )


def check_group_size(scheme: str, group_size: int, spec: BaseModelSpec) -> None:
    """Per-group schemes need every language-model layer's input size to be a multiple of the
    group size."""
    if scheme == "int8":
        return  # one scale per output row: no shape constraint
    if group_size <= 0 or group_size % 8:
        raise InvalidRequest(f"group size must be a positive multiple of 8, not {group_size}")
    odd = _not_divisible((fan_in for fan_in, _ in spec.lora_modules.values()), group_size)
    if odd:
        raise InvalidRequest(
            f"{scheme} with group size {group_size} needs every language-model layer's input size "
            f"to be a multiple of it; {spec.name} has input sizes {odd}. Use --group-size "
            f"{_gcd_hint(spec)} or --scheme int8"
        )


def torchao_config(scheme: str, group_size: int, spec: BaseModelSpec):
    """The torchao weight-only config for `scheme`, checked against the language model's layer
    shapes."""
    import torch
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, PerGroup

    if scheme not in SCHEMES:
        raise InvalidRequest(
            f"unknown quantization scheme {scheme!r}; torchao applies {', '.join(SCHEMES)}"
        )
    check_group_size(scheme, group_size, spec)
    if scheme == "int8":
        return Int8WeightOnlyConfig()
    # int4 values kept one per int8 byte ("unpacked"): the layout vLLM can slice across GPUs and CPU
    # threads
    return IntxWeightOnlyConfig(
        weight_dtype=torch.int4,  # type: ignore[attr-defined]  # torch's stubs lack int4
        granularity=PerGroup(group_size),
    )


def online_overrides(scheme: str, group_size: int, spec: BaseModelSpec) -> dict[str, str]:
    """vLLM `--hf-overrides` that quantize a full-precision base at load, leaving the vision
    tower alone."""
    from torchao.core.config import config_to_dict
    from torchao.quantization import ModuleFqnToConfig

    weights = torchao_config(scheme, group_size, spec)
    by_module = {part: None for part in full_precision_parts(spec)} | {"re:.*": weights}
    return {
        "quantization_config_dict_json": json.dumps(config_to_dict(ModuleFqnToConfig(by_module)))
    }


def checkpoint_quantization(base: str | Path) -> dict[str, Any] | None:
    """The `quantization_config` a checkpoint ships in its config.json (None: full precision)."""
    config = base_config(str(base))
    found = getattr(config, "quantization_config", None)
    if found is None and getattr(config, "text_config", None) is not None:
        found = getattr(config.text_config, "quantization_config", None)
    if found is not None and not isinstance(found, dict):
        found = found.to_dict()
    return found


def checkpoint_dtype(base: str | Path) -> str | None:
    """The dtype a checkpoint was written in ("bfloat16", "float32", …), as its config.json says."""
    dtype = getattr(base_config(str(base)), "dtype", None)
    return str(dtype).removeprefix("torch.") if dtype is not None else None


def describe_checkpoint(quantization: dict[str, Any]) -> str:
    """A short human name for a checkpoint's quantization: "awq 4-bit", "torchao
    IntxWeightOnlyConfig", …"""
    method = str(quantization.get("quant_method", "unknown"))
    if method == "torchao":
        return f"torchao {quantization.get('quant_type', {}).get('default', {}).get('_type', '?')}"
    bits = quantization.get("bits") or quantization.get("w_bit")
    return f"{method} {bits}-bit" if bits else method


def _not_divisible(sizes: Iterable[int], group_size: int) -> list[int]:
    return sorted({size for size in sizes if size % group_size})


def _gcd_hint(spec: BaseModelSpec) -> int:
    from math import gcd

    divisor = 0
    for fan_in, _ in spec.lora_modules.values():
        divisor = gcd(divisor, fan_in)
    return max(g for g in (128, 64, 32, 16, 8) if divisor % g == 0) if divisor % 8 == 0 else divisor

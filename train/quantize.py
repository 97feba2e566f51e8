"""`lorafleet quantize`: write a quantized checkpoint of a base model that vLLM loads as it is.

1. load the full-precision base, 2. quantize the language model's linear layers (vision tower and
   output head
stay as they are): torchao weight-only int4/int8, or compressed-tensors W4A16, 3. write the weights
and the `quantization_config` vLLM and transformers read, plus the processor files, into a folder
renamed into place.

torchao weights are written here rather than by `save_pretrained`, which renames Qwen2.5-VL's keys
to the old layout on save but leaves torchao's metadata on the new names: vLLM then finds no
quantized weights and answers "".
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from lorafleet.adapters.base_model import load_base_spec
from lorafleet.adapters.quantization import (
    CHECKPOINT_SCHEMES,
    check_group_size,
    checkpoint_quantization,
    describe_checkpoint,
    full_precision_parts,
    torchao_config,
    unquantized_modules,
)
from lorafleet.errors import InvalidRequest

__all__ = ["QuantizeReport", "quantize"]

MANIFEST = "lorafleet-quantization.json"


@dataclass(frozen=True)
class QuantizeReport:
    """What was written; also saved beside the weights as lorafleet-quantization.json."""

    base: str
    out: str
    scheme: str
    group_size: int | None  # int4 only; int8 has one scale per row
    quantized_layers: int
    kept_full_precision: list[str]
    weights_bytes_before: int  # the quantized layers' weights, in the base's dtype
    weights_bytes_after: int  # the same layers: integer values + scales + zero points
    checkpoint_bytes: int
    seconds: float


def quantize(base: str, out: Path, scheme: str = "int4", group_size: int = 32) -> QuantizeReport:
    """Quantize `base` (hub id or folder) into `out`, which must not exist yet; nothing is left
    on failure."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if scheme not in CHECKPOINT_SCHEMES:
        raise InvalidRequest(
            f"unknown scheme {scheme!r}; choose one of {', '.join(CHECKPOINT_SCHEMES)}"
        )
    if out.exists():
        raise InvalidRequest(f"{out} already exists; choose a new folder")
    existing = checkpoint_quantization(base)
    if existing is not None:
        raise InvalidRequest(
            f"{base} is already quantized ({describe_checkpoint(existing)}); serve it as it is"
        )
    spec = load_base_spec(base)
    # refuses shapes the scheme cannot take, before loading anything
    check_group_size(scheme, group_size, spec)

    t0 = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # W4A16 kernels (Marlin, cpu_gemm_wna16) take 16-bit activations: its scales are written in
    # bfloat16
    dtype = torch.bfloat16 if scheme == "w4a16" else "auto"
    model = AutoModelForImageTextToText.from_pretrained(base, dtype=dtype, device_map=device)
    decoder = model.get_decoder()  # the language model: the only part LoRA adapters touch
    layers = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.startswith(spec.language_model_prefix + ".")
    }
    before = sum(m.weight.numel() * m.weight.element_size() for m in layers.values())

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        if scheme == "w4a16":
            after = _write_w4a16(model, list(layers), group_size, tmp)
        else:
            after = _write_torchao(
                model,
                decoder,
                layers.values(),
                torchao_config(scheme, group_size, spec),
                unquantized_modules(spec),
                tmp,
            )
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        AutoProcessor.from_pretrained(base).save_pretrained(tmp)
        report = QuantizeReport(
            base=str(base),
            out=str(out),
            scheme=scheme,
            group_size=None if scheme == "int8" else group_size,
            quantized_layers=len(layers),
            kept_full_precision=[*full_precision_parts(spec), "lm_head"],
            weights_bytes_before=before,
            weights_bytes_after=after,
            checkpoint_bytes=sum(p.stat().st_size for p in tmp.iterdir() if p.is_file()),
            seconds=round(time.perf_counter() - t0, 2),
        )
        (tmp / MANIFEST).write_text(json.dumps(asdict(report), indent=2) + "\n")
        tmp.rename(out)  # one step: a failed run leaves no half-written checkpoint at `out`
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _write_torchao(model, decoder, layers, config, keep: list[str], folder: Path) -> int:
    """torchao weight-only: quantize in place, write flattened tensor subclasses with their
    metadata."""
    from huggingface_hub import save_torch_state_dict
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict
    from torchao.quantization import quantize_
    from transformers import TorchAoConfig

    quantize_(decoder, config)
    state = {name: tensor.detach().to("cpu") for name, tensor in model.state_dict().items()}
    tensors, metadata = flatten_tensor_state_dict(state)
    save_torch_state_dict(tensors, folder, metadata=metadata, max_shard_size="5GB")
    model.config.quantization_config = TorchAoConfig(quant_type=config, modules_to_not_convert=keep)
    model.config.save_pretrained(folder)
    return sum(_stored_bytes(m.weight) for m in layers)


def _write_w4a16(model, layers: list[str], group_size: int, folder: Path) -> int:
    """compressed-tensors W4A16: symmetric int4 per group, scales from each group's range (round
    to nearest, no calibration data), packed eight values per int32 — the format vLLM's Marlin
    (CUDA) and cpu_gemm_wna16 (AVX-512) kernels read. AWQ/GPTQ calibration (llm-compressor) is
    more accurate but cannot share vLLM's env."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationStatus,
        apply_quantization_config,
        preset_name_to_scheme,
    )
    from compressed_tensors.quantization.utils.helpers import compute_dynamic_scales_and_zp

    scheme = preset_name_to_scheme("W4A16", targets=["Linear"])
    scheme.weights.group_size = group_size
    ignore = [
        name
        for name, m in model.named_modules()
        if type(m).__name__ == "Linear" and name not in layers
    ]
    apply_quantization_config(
        model,
        QuantizationConfig(
            config_groups={"group_0": scheme},
            ignore=ignore,
            quantization_status=QuantizationStatus.INITIALIZED,
        ),
    )
    for module in model.modules():
        if getattr(module, "quantization_scheme", None) is None:
            continue
        scale, zero_point = compute_dynamic_scales_and_zp(
            module.weight.data, module.quantization_scheme.weights, module
        )
        module.weight_scale.data.copy_(scale.to(module.weight_scale.dtype))
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.data.copy_(zero_point.to(module.weight_zero_point.dtype))
        module.quantization_status = QuantizationStatus.FROZEN
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(folder)
    compressor.update_config(folder)
    state = model.state_dict()
    return sum(
        t.numel() * t.element_size()
        for key, t in state.items()
        if key.rsplit(".", 1)[0] in layers and not key.endswith(".bias")
    )


def _stored_bytes(weight) -> int:
    """Bytes a (possibly torchao) weight holds: the sum of the plain tensors it is made of.
    torchao's portable int4 layout keeps one value per byte, so on this path int4 saves memory
    like int8 (plus its finer scales)."""
    names = list(getattr(weight, "tensor_data_names", None) or [])
    if not names:
        return weight.numel() * weight.element_size()
    parts = [
        getattr(weight, n, None)
        for n in names + list(getattr(weight, "optional_tensor_data_names", []))
    ]
    return sum(p.numel() * p.element_size() for p in parts if p is not None)

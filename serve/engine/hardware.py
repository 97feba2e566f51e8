"""What this machine can run, and which quantization the engine serves the base with.

Decided before the engine starts: a scheme the hardware cannot run is refused with a message that
names the CPU feature or GPU it needs, never left to fail as a stack trace inside vLLM. The facts
behind each rule were measured with vLLM 0.32 (`loadtests/bench_quantization.py`) or come from
vLLM's kernel requirements (GPU compute capabilities).
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafleet.adapters.base_model import BaseModelSpec, load_base_spec
from lorafleet.adapters.quantization import (
    SCHEMES,
    checkpoint_dtype,
    checkpoint_quantization,
    describe_checkpoint,
    online_overrides,
)
from lorafleet.errors import UnsupportedQuantization
from lorafleet.serve.settings import Settings

__all__ = [
    "Hardware",
    "Quantization",
    "detect_hardware",
    "plan_quantization",
    "quantization_for",
]

QUANTIZE_CHOICES = ("auto", "none", *SCHEMES, "fp8")
# 4-bit weights, 16-bit activations (Marlin on GPUs)
_W4A16 = ("awq", "gptq", "awq_marlin", "gptq_marlin")


@dataclass(frozen=True)
class Hardware:
    arch: str  # platform.machine(): x86_64, aarch64, …
    cpu_flags: frozenset[str] = frozenset()
    gpu: str | None = None  # the first CUDA device's name; None on a CPU-only machine
    capability: tuple[int, int] | None = None  # its compute capability

    def describe(self) -> str:
        if self.gpu:
            major, minor = self.capability or (0, 0)
            return f"{self.gpu} (compute capability {major}.{minor})"
        isa = [
            "AVX-512"
            if "avx512f" in self.cpu_flags
            else "AVX2"
            if "avx2" in self.cpu_flags
            else "no AVX2"
        ]
        if "avx512_bf16" in self.cpu_flags:
            isa.append("AVX512-BF16")
        return f"{self.arch} CPU, {' + '.join(isa)}, no GPU"

    def gpu_at_least(self, major: int, minor: int) -> bool:
        return self.capability is not None and self.capability >= (major, minor)


def detect_hardware() -> Hardware:
    """The first CUDA GPU if torch sees one; the CPU's instruction-set flags (Linux
    /proc/cpuinfo)."""
    import torch

    flags: frozenset[str] = frozenset()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = frozenset(line.split(":", 1)[1].split())
                break
    if torch.cuda.is_available():
        return Hardware(
            platform.machine(),
            flags,
            torch.cuda.get_device_name(0),
            torch.cuda.get_device_capability(0),
        )
    return Hardware(platform.machine(), flags)


@dataclass(frozen=True)
class Quantization:
    """How the engine serves the base: a label for people (and the drift monitor), and vLLM's
    arguments."""

    label: str
    engine_args: tuple[str, ...] = ()  # for `vllm serve`
    # the same, for vLLM's offline `LLM(...)`
    llm_kwargs: dict[str, Any] = field(default_factory=dict)
    # the engine must run in this dtype (a torchao checkpoint's own); None: settings
    dtype: str | None = None


def plan_quantization(
    requested: str,
    group_size: int,
    base: str,
    spec: BaseModelSpec,
    hw: Hardware,
    dtype: str = "auto",
) -> Quantization:
    """The quantization to serve `base` with on `hw`, or UnsupportedQuantization saying why not.

    requested: "auto" (the checkpoint's own quantization, else int4), "none", "int4", "int8"
    (torchao weight-only, applied at load) or "fp8" (vLLM's online FP8, GPUs only)."""
    if requested == "w4a16":
        raise UnsupportedQuantization(
            "w4a16 is a checkpoint format, not applied at load: write one with "
            "`lorafleet quantize --scheme w4a16` and serve that folder"
        )
    if requested not in QUANTIZE_CHOICES:
        raise UnsupportedQuantization(
            f"unknown quantization {requested!r}; choose one of {', '.join(QUANTIZE_CHOICES)}"
        )
    if hw.gpu is None and hw.arch in ("x86_64", "AMD64") and "avx2" not in hw.cpu_flags:
        raise UnsupportedQuantization(
            f"vLLM's CPU engine needs a CPU with AVX2; this one ({hw.describe()}) has none"
        )
    existing = checkpoint_quantization(base)
    if existing is not None:
        if requested not in ("auto", "none"):
            raise UnsupportedQuantization(
                f"{base} is already quantized ({describe_checkpoint(existing)}); serve it "
                f"with --quantize auto, or quantize its full-precision original instead"
            )
        _require_checkpoint_support(existing, hw, dtype)
        label = f"{describe_checkpoint(existing)} (from the checkpoint)"
        if existing.get("quant_method") != "torchao":
            return Quantization(label)
        # torchao's tensors carry their dtype: vLLM cannot load them into an engine of another dtype
        # (measured: "metadata mismatch" on a float32 checkpoint under --dtype auto, which is
        # bfloat16 on CPU)
        written = checkpoint_dtype(base)
        if dtype not in ("auto", written):
            raise UnsupportedQuantization(
                f"{base} was quantized in {written} and is served in {written} only; "
                f"LORAFLEET_DTYPE={dtype} asks otherwise: set it to auto or {written}, or "
                f"quantize a {dtype} copy of the base"
            )
        return Quantization(label, dtype=written)
    if requested == "none":
        return Quantization("none (full precision)")
    if requested == "fp8":
        if not hw.gpu_at_least(8, 9):
            raise UnsupportedQuantization(
                f"fp8 needs an NVIDIA GPU with compute capability 8.9 or newer (Ada, "
                f"Hopper); this machine has {_what(hw)}. Use --quantize int4 or int8"
            )
        return Quantization(
            "fp8 (vLLM online, weights and activations)",
            ("--quantization", "fp8"),
            {"quantization": "fp8"},
        )
    scheme = "int4" if requested == "auto" else requested
    if hw.gpu and not hw.gpu_at_least(7, 5):  # vLLM's torchao method: compute capability 7.5+
        if requested == "auto":
            return Quantization(
                f"none (full precision: torchao needs compute capability 7.5+, {_what(hw)})"
            )
        raise UnsupportedQuantization(
            f"{scheme} (torchao) needs an NVIDIA GPU with compute capability 7.5 or newer "
            f"(Turing+); this machine has {_what(hw)}. Use --quantize none"
        )
    overrides = online_overrides(scheme, group_size, spec)
    detail = f", group {group_size}" if scheme == "int4" else ", per row"
    return Quantization(
        f"{scheme} (torchao weight-only{detail}, quantized at load)",
        ("--quantization", "torchao", f"--hf-overrides={json.dumps(overrides)}"),
        {"quantization": "torchao", "hf_overrides": overrides},
    )


def quantization_for(settings: Settings) -> tuple[Hardware, Quantization]:
    """This machine, and the quantization `settings` ask for on it (what `lorafleet serve` runs)."""
    hardware = detect_hardware()
    spec = load_base_spec(settings.base)
    return hardware, plan_quantization(
        settings.quantize,
        settings.quantize_group_size,
        settings.base,
        spec,
        hardware,
        settings.dtype,
    )


def _require_checkpoint_support(quantization: dict[str, Any], hw: Hardware, dtype: str) -> None:
    method = str(quantization.get("quant_method", "")).lower()
    name = describe_checkpoint(quantization)
    if method == "torchao":
        if hw.gpu and not hw.gpu_at_least(7, 5):
            raise UnsupportedQuantization(
                f"{name} needs an NVIDIA GPU with compute capability 7.5 or newer; "
                f"this machine has {_what(hw)}"
            )
        return
    if method == "bitsandbytes":
        raise UnsupportedQuantization(
            "bitsandbytes checkpoints are no longer served by vLLM (removed in 0.32); serve "
            "the full-precision base with --quantize int4, or an AWQ/GPTQ release"
        )
    kind = (
        _compressed_tensors_kind(quantization)
        if method == "compressed-tensors"
        else "w4a16"
        if method in _W4A16
        else "fp8"
        if method in ("fp8", "fbgemm_fp8")
        else None
    )
    if kind is None:
        raise UnsupportedQuantization(
            f"lorafleet does not serve {name} checkpoints: known are torchao, AWQ, GPTQ, "
            "compressed-tensors (W4A16, W8A8, FP8) and FP8"
        )
    if kind == "w4a16":
        if hw.gpu:
            if not hw.gpu_at_least(8, 0):
                raise UnsupportedQuantization(
                    f"{name} (4-bit weights) is served with vLLM's Marlin kernels, which "
                    f"need compute capability 8.0 or newer (Ampere+); this machine has "
                    f"{_what(hw)}"
                )
        elif "avx512f" not in hw.cpu_flags:
            raise UnsupportedQuantization(
                f"{name} (4-bit weights) needs vLLM's cpu_gemm_wna16 kernel, built only for "
                f"CPUs with AVX-512; this one has {_what(hw)}. Serve the full-precision "
                "base with --quantize int4 (torchao) instead"
            )
        elif dtype == "float32":  # measured: the kernel takes bfloat16 activations only
            raise UnsupportedQuantization(
                f"{name} (4-bit weights) runs on vLLM's CPU engine in bfloat16 only "
                "(cpu_gemm_wna16 has no float32 path); set LORAFLEET_DTYPE=auto or bfloat16"
            )
        return
    if not hw.gpu:  # W8A8 and FP8 on the CPU engine
        raise UnsupportedQuantization(
            f"{name} ({kind.upper()}) cannot serve LoRA adapters on vLLM's CPU engine: "
            + (
                "its int8 layers cannot be wrapped by LoRA layers"
                if kind == "w8a8"
                else "FP8 needs an NVIDIA GPU with compute capability 8.9+ (Ada, Hopper)"
            )
            + ". Serve the full-precision base with --quantize int4"
        )
    need = (8, 9) if kind == "fp8" else (7, 5)
    if not hw.gpu_at_least(*need):
        raise UnsupportedQuantization(
            f"{name} ({kind.upper()}) needs compute capability {need[0]}.{need[1]} or newer; "
            f"this machine has {_what(hw)}"
        )


def _compressed_tensors_kind(quantization: dict[str, Any]) -> str | None:
    """ "w4a16" | "w8a8" | "fp8" from a compressed-tensors config's first scheme group."""
    for group in (quantization.get("config_groups") or {}).values():
        weights, activations = group.get("weights") or {}, group.get("input_activations")
        if weights.get("type") == "float":
            return "fp8"
        if activations is None:
            return "w4a16"  # weight-only integer (4 or 8 bits): the WNA16 kernels
        return "w8a8"
    return None


def _what(hw: Hardware) -> str:
    return hw.describe() if hw.gpu else f"no NVIDIA GPU ({hw.describe()})"

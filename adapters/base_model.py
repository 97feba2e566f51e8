"""What a base model offers LoRA: its language model's linear layers, with their shapes.

Derived from the model's own config by instantiating it on the meta device (no weights, no memory),
so the same code works for a tiny local model and for a hub id (only its config.json is fetched).
vLLM applies LoRA to the language model only; a tensor aimed anywhere else is refused at upload.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit

from lorafleet.errors import InvalidRequest

__all__ = ["BaseModelSpec", "base_config", "load_base_spec", "training_dtype"]


@dataclass(frozen=True)
class BaseModelSpec:
    """Module paths (transformers names) of a base model, split by what vLLM does with a LoRA on
    them."""

    name: str
    language_model_prefix: str  # e.g. "model.language_model"
    lora_modules: dict[str, tuple[int, int]]  # path -> (in_features, out_features), LoRA-able
    # path -> the part it belongs to ("vision tower", "output head", ...)
    other_linear: dict[str, str]
    # (old, new) key renames, e.g. transformers 4 names
    legacy_prefixes: tuple[tuple[str, str], ...] = ()
    parameters: int = 0  # the whole model's, vision tower included (tied weights once)

    @property
    def outer_prefix(self) -> str:
        """The path prefix the language model shares with the vision tower ("model." for
        Qwen2.5-VL), or ""."""
        return _outer(self.language_model_prefix) + "." if "." in self.language_model_prefix else ""

    def resolve(self, path: str) -> str:
        """Map a module path from an adapter to this model's naming (legacy renames applied)."""
        if path in self.lora_modules or path in self.other_linear:
            return path
        for old, new in self.legacy_prefixes:
            if re.match(old, path):
                return re.sub(old, new, path, count=1)
        return path

    def adapter_bytes(self, rank: int, dtype_bytes: int = 4) -> int:
        """A LoRA adapter of `rank` on every LoRA-able layer (A [rank, in] and B [out, rank]),
        float32 by default, as PEFT saves adapters of a bfloat16 base."""
        return rank * sum(i + o for i, o in self.lora_modules.values()) * dtype_bytes

    def lora_target_regex(self) -> str:
        """A PEFT `target_modules` regex that hits every LoRA-able layer and nothing else."""
        names = sorted({p.rsplit(".", 1)[-1] for p in self.lora_modules})
        return rf".*{re.escape(self.language_model_prefix)}\..*\.({'|'.join(names)})"


def _outer(lm_prefix: str) -> str:
    return lm_prefix.rsplit(".", 1)[0] if "." in lm_prefix else ""


def _part_of(path: str, lm_prefix: str) -> str:
    if path.startswith(lm_prefix + "."):
        return "language model"
    if any(k in path for k in ("visual", "vision", "image", "merger", "projector")):
        return "vision tower"
    if path.endswith("lm_head"):
        return "output head"
    return "outside the language model"


@lru_cache(maxsize=8)
def base_config(base: str):
    """The base model's config (local path or hub id), read once per base. A hub id that is
    neither in the hub's cache nor reachable fails at once, in one line (the hub client would
    retry for half a minute)."""
    if not Path(base).is_dir():
        _require_fetchable(base)
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(base)


def _require_fetchable(base: str, timeout_s: float = 3.0) -> None:
    """OSError unless hub id `base` has its config in the hub's cache or the hub answers."""
    from huggingface_hub import constants, try_to_load_from_cache

    try:
        if isinstance(try_to_load_from_cache(base, "config.json"), str) or constants.HF_HUB_OFFLINE:
            return  # offline mode: the hub client itself says what is missing
    except ValueError:  # not a repository id
        raise OSError(f"base {base!r} is neither a local folder nor a hub id") from None
    host = urlsplit(constants.ENDPOINT).hostname or "huggingface.co"
    port = urlsplit(constants.ENDPOINT).port or 443
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as exc:
        raise OSError(
            f"cannot fetch base {base!r}: {host} is unreachable ({exc.strerror or exc}) and the "
            "hub's cache has no copy; pass a local folder as the base"
        ) from None


def training_dtype(base: str, cuda: bool) -> str:
    """The dtype the trainer and its servability check compute in: bfloat16 on a GPU; on a CPU, the
    checkpoint's own when it is bfloat16 (a released base: half the memory of float32, and what
    vLLM's CPU engine computes in), else float32."""
    if cuda:
        return "bfloat16"
    stored = getattr(base_config(base), "dtype", None)
    return "bfloat16" if str(stored).removeprefix("torch.") == "bfloat16" else "float32"


@lru_cache(maxsize=8)
def load_base_spec(base: str) -> BaseModelSpec:
    """Read the base model's config and list its linear layers."""
    config = base_config(base)  # first: a base that is not there fails before torch is imported
    import torch
    from transformers import AutoModelForImageTextToText

    try:
        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(config)
    # transformers lists every VLM config class it knows; name what was given instead
    except ValueError:
        architecture = ", ".join(getattr(config, "architectures", None) or [config.model_type])
        raise InvalidRequest(
            f"{base} is a {architecture} model, not a vision-language model: lorafleet serves one "
            "image-text-to-text base (e.g. Qwen2.5-VL)"
        ) from None
    decoder = model.get_decoder()
    lm_prefix = next(name for name, module in model.named_modules() if module is decoder)
    lora: dict[str, tuple[int, int]] = {}
    other: dict[str, str] = {}
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            part = _part_of(path, lm_prefix)
            if part == "language model":
                lora[path] = (module.in_features, module.out_features)
            else:
                other[path] = part
    # transformers 4 saved VLMs as model.layers / visual.*; vLLM maps both namings.
    outer = _outer(lm_prefix)
    legacy = (
        (
            (rf"^{outer}\.(?!language_model\.|visual\.)", f"{lm_prefix}."),
            (r"^visual\.", f"{outer}.visual."),
        )
        if outer
        else ()
    )
    return BaseModelSpec(
        name=base,
        language_model_prefix=lm_prefix,
        lora_modules=lora,
        other_linear=other,
        legacy_prefixes=legacy,
        parameters=sum(p.numel() for p in model.parameters()),
    )

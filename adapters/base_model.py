"""What a base model offers LoRA: its language model's linear layers, with their shapes.

Derived from the model's own config by instantiating it on the meta device (no weights, no memory),
so the same code works for a tiny local model and for a hub id (only its config.json is fetched).
vLLM applies LoRA to the language model, and, for the architectures in `TOWER_LORA`, to the vision
tower and the connector too; a tensor aimed anywhere else is refused at upload.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit

from lorafleet.errors import InvalidRequest

__all__ = [
    "PARTS",
    "TOWER_LORA",
    "BaseModelSpec",
    "base_config",
    "load_base_spec",
    "tower_lora_supported",
    "training_dtype",
]

# the parts of a VLM a LoRA adapter can touch, in the order the data flows back from the answer
PARTS = ("language", "connector", "vision")
# Architectures whose vLLM model applies LoRA to the vision tower and connector when the engine
# runs with --enable-tower-connector-lora (`supports_tower_connector_lora` in vLLM 0.32): the
# tower's and the connectors' module prefixes, as transformers names them (vLLM's
# `get_mm_mapping`, mapped from its names). Copied, as the gateway does not import vLLM;
# tests/serve/engine/test_tower_lora.py checks them against the installed vLLM.
_QWEN_VL = ("model.visual.", ("model.visual.merger.",))
_LLAVA = ("model.vision_tower.", ("model.multi_modal_projector.",))
TOWER_LORA: dict[str, tuple[str, tuple[str, ...]]] = {
    "Qwen2VLForConditionalGeneration": _QWEN_VL,
    "Qwen2_5_VLForConditionalGeneration": _QWEN_VL,
    "Qwen3VLForConditionalGeneration": (
        "model.visual.",
        ("model.visual.merger.", "model.visual.deepstack_merger_list."),
    ),
    "LlavaForConditionalGeneration": _LLAVA,
    "LlavaNextForConditionalGeneration": _LLAVA,
    "Gemma3ForConditionalGeneration": _LLAVA,
    "PaliGemmaForConditionalGeneration": _LLAVA,
}


@dataclass(frozen=True)
class BaseModelSpec:
    """Module paths (transformers names) of a base model, split by what vLLM does with a LoRA on
    them."""

    name: str
    language_model_prefix: str  # e.g. "model.language_model"
    lora_modules: dict[str, tuple[int, int]]  # path -> (in_features, out_features), LoRA-able
    # path -> the part it belongs to ("vision tower", "output head", ...): never LoRA-able
    other_linear: dict[str, str]
    # (old, new) key renames, e.g. transformers 4 names
    legacy_prefixes: tuple[tuple[str, str], ...] = ()
    parameters: int = 0  # the whole model's, vision tower included (tied weights once)
    architecture: str = ""
    # the vision tower's and connector's linear layers, where vLLM can apply LoRA to them (the
    # architecture is in TOWER_LORA): path -> (in_features, out_features)
    tower_modules: dict[str, tuple[int, int]] = field(default_factory=dict)
    connector_prefixes: tuple[str, ...] = ()

    @property
    def tower_lora(self) -> bool:
        """Whether vLLM can apply LoRA to this base's vision tower and connector."""
        return bool(self.tower_modules)

    def part(self, path: str) -> str:
        """The part ("language", "connector" or "vision") of a LoRA-able module path."""
        if path in self.lora_modules:
            return "language"
        if path not in self.tower_modules:
            raise KeyError(path)
        return "connector" if path.startswith(self.connector_prefixes) else "vision"

    def layer_shape(self, path: str) -> tuple[int, int]:
        """(in_features, out_features) of a LoRA-able layer of any part."""
        return self.lora_modules.get(path) or self.tower_modules[path]

    @property
    def outer_prefix(self) -> str:
        """The path prefix the language model shares with the vision tower ("model." for
        Qwen2.5-VL), or ""."""
        return _outer(self.language_model_prefix) + "." if "." in self.language_model_prefix else ""

    def resolve(self, path: str) -> str:
        """Map a module path from an adapter to this model's naming (legacy renames applied)."""
        if path in self.lora_modules or path in self.tower_modules or path in self.other_linear:
            return path
        for old, new in self.legacy_prefixes:
            if re.match(old, path):
                return re.sub(old, new, path, count=1)
        return path

    def adapter_bytes(self, rank: int, dtype_bytes: int = 4) -> int:
        """A LoRA adapter of `rank` on every LoRA-able layer (A [rank, in] and B [out, rank]), the
        vision tower's and connector's included, float32 by default, as PEFT saves adapters of a
        bfloat16 base."""
        layers = [*self.lora_modules.values(), *self.tower_modules.values()]
        return rank * sum(i + o for i, o in layers) * dtype_bytes

    def lora_target_regex(self, parts: tuple[str, ...] = ("language",)) -> str:
        """A PEFT `target_modules` regex that hits every LoRA-able layer of `parts` and nothing
        else."""
        unknown = set(parts) - set(PARTS)
        if unknown or not parts:
            raise ValueError(f"parts must be some of {', '.join(PARTS)}; got {', '.join(parts)}")
        if set(parts) - {"language"} and not self.tower_lora:
            raise ValueError(
                f"{self.name} ({self.architecture or 'unknown architecture'}): vLLM applies LoRA "
                "to its language model only, not to its vision tower or connector"
            )
        if parts == ("language",):  # the short form, as adapters trained so far carry it
            names = sorted({p.rsplit(".", 1)[-1] for p in self.lora_modules})
            return rf".*{re.escape(self.language_model_prefix)}\..*\.({'|'.join(names)})"
        paths = [*self.lora_modules, *self.tower_modules]
        # each path with its block numbers as \d+: one alternative per kind of layer
        shapes = {
            re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", re.escape(p))
            for p in paths
            if self.part(p) in parts
        }
        return "|".join(sorted(shapes))


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


def tower_lora_supported(architectures: list[str] | None) -> bool:
    """Whether vLLM can apply LoRA to the vision tower and connector of a base with these
    `architectures` (its config's)."""
    return bool(architectures and architectures[0] in TOWER_LORA)


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
    architecture = (getattr(config, "architectures", None) or [""])[0]
    tower_prefix, connectors = (
        TOWER_LORA[architecture] if tower_lora_supported([architecture]) else (None, ())
    )
    lora: dict[str, tuple[int, int]] = {}
    tower: dict[str, tuple[int, int]] = {}
    other: dict[str, str] = {}
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            part = _part_of(path, lm_prefix)
            shape = (module.in_features, module.out_features)
            if part == "language model":
                lora[path] = shape
            elif tower_prefix and path.startswith((tower_prefix, *connectors)):
                tower[path] = shape
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
        architecture=architecture,
        tower_modules=tower,
        connector_prefixes=connectors,
    )

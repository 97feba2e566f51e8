"""Turn an uploaded archive into a `ValidatedAdapter`, or raise one `InvalidAdapter` naming field
and reason.

Everything that would make vLLM refuse an adapter, or load it and silently serve base-model output
(vLLM matches only the last component of each key), is checked here, before anything is stored.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lorafleet.adapters.adapter_config import (
    CONFIG_FILE,
    check_target_modules,
    configured_ranks,
    read_config,
)
from lorafleet.adapters.archive import unpack_archive
from lorafleet.adapters.base_model import PARTS, BaseModelSpec
from lorafleet.adapters.manifest import read_manifest
from lorafleet.errors import InvalidAdapter, PayloadTooLarge

__all__ = [
    "MIN_UPLOAD_BYTES",
    "upload_limit",
    "ValidatedAdapter",
    "extract_archive",
    "validate_adapter_dir",
    "validate_upload",
    "engine_lora_rank",
    "content_digest",
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "ENGINE_LORA_RANKS",
]

WEIGHTS_FILE = "adapter_model.safetensors"
# the only values vLLM takes as --max-lora-rank
ENGINE_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# (`MaxLoRARanks` in vllm/config/lora.py, vLLM 0.32); the gateway does not import vLLM, so they are
# copied here
_PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}
_PART_NAMES = {"language": "language model", "connector": "connector", "vision": "vision tower"}
# PEFT key: base_model.model.<module path>.lora_A.weight (older PEFT: .lora_A.<adapter name>.weight)
_KEY = re.compile(
    r"^base_model\.model\.(?P<module>.+)\.(?P<kind>lora_A|lora_B)(?:\.[^.]+)?\.weight$"
)


@dataclass(frozen=True)
class ValidatedAdapter:
    """A LoRA adapter folder that the engine will load and apply to every tensor."""

    path: Path  # folder holding CONFIG_FILE and WEIGHTS_FILE
    digest: str  # sha256 of the canonical config and the tensors
    rank: int
    alpha: float
    target_modules: tuple[str, ...]  # short names, e.g. ("k_proj", "q_proj")
    size_bytes: int
    # the parts of the base it changes, in PARTS order: ("language",), ("connector", "vision")…
    parts: tuple[str, ...] = ("language",)
    # the trainer's manifest.json uploaded beside it (`lorafleet.adapters.manifest`): informational,
    # so neither part of the digest nor of what makes two adapters equal
    manifest: dict[str, Any] | None = field(default=None, compare=False)


def extract_archive(archive: Path, dest: Path, max_bytes: int) -> Path:
    """Unpack a .zip or .tar(.gz) safely into `dest`; return the folder holding
    adapter_config.json."""
    unpack_archive(archive, dest, max_bytes)
    configs = sorted(dest.rglob(CONFIG_FILE))
    if not configs:
        raise InvalidAdapter(CONFIG_FILE, f"the archive has no {CONFIG_FILE}")
    if len(configs) > 1:
        raise InvalidAdapter(
            CONFIG_FILE, f"the archive holds {len(configs)} adapters; upload one at a time"
        )
    return configs[0].parent


@dataclass
class _LoraLayer:
    """What the tensors say about one LoRA layer, filled in tensor by tensor."""

    module: str  # the base's module path (legacy names mapped)
    # "lora_A" -> [r, in], "lora_B" -> [out, r]
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    nonzero: dict[str, bool] = field(default_factory=dict)


@dataclass(frozen=True)
class _Weights:
    """What the tensors say about the whole adapter."""

    digest: hashlib._Hash  # a running hash of the tensors, the config still to come
    rank: int
    targets: tuple[str, ...]
    parts: tuple[str, ...]


def _check_weights(
    folder: Path, config: dict, spec: BaseModelSpec, max_rank: int, tower_lora: bool
) -> _Weights:
    """Check every tensor against the base."""
    from safetensors import SafetensorError, safe_open

    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise InvalidAdapter("weights", f"no {WEIGHTS_FILE} in the adapter folder")
    # by checkpoint name, which vLLM matches rank_pattern against
    layers: dict[str, _LoraLayer] = {}
    digest = hashlib.sha256()
    try:
        with safe_open(weights, framework="pt") as f:
            for key in sorted(f.keys()):
                name, module, kind = _classify_key(key, spec, tower_lora)
                layer = layers.setdefault(name, _LoraLayer(module))
                layer.shapes[kind], layer.nonzero[kind] = _read_tensor(f, key, digest)
    except SafetensorError as exc:
        raise InvalidAdapter("weights", f"corrupt safetensors file: {exc}") from exc
    if not layers:
        raise InvalidAdapter("weights", "the adapter holds no LoRA tensors")
    expected = configured_ranks(config, list(layers))
    ranks = {_check_shapes(layer, expected[name], spec, max_rank) for name, layer in layers.items()}
    _check_changes_output(layers.values())
    touched = {spec.part(layer.module) for layer in layers.values()}
    return _Weights(
        digest,
        max(ranks),
        tuple(sorted({layer.module.rsplit(".", 1)[-1] for layer in layers.values()})),
        tuple(p for p in PARTS if p in touched),
    )


def _read_tensor(f, key: str, digest: hashlib._Hash) -> tuple[tuple[int, int], bool]:
    """Check one tensor and add it to the digest; return its shape and whether any weight is
    nonzero."""
    import torch

    tensor = f.get_tensor(key)
    if tensor.ndim != 2 or not tensor.is_floating_point():
        raise InvalidAdapter(
            "weights", f"{key}: expected a 2-D float tensor, got {tuple(tensor.shape)}"
        )
    if not torch.isfinite(tensor).all():
        raise InvalidAdapter("weights", f"{key}: holds NaN or infinite values")
    _hash_tensor(digest, key, tensor)
    return tuple(tensor.shape), bool(tensor.any())


def _hash_tensor(digest: hashlib._Hash, key: str, tensor) -> None:
    import torch

    digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())


def _hash_config(digest: hashlib._Hash, config: dict) -> None:
    digest.update(json.dumps(config, sort_keys=True, separators=(",", ":")).encode())


def content_digest(folder: Path) -> str:
    """The digest `validate_adapter_dir` gives a folder (tensors in key order, then the canonical
    config), without its checks: what a copy fetched from a store is verified against."""
    from safetensors import safe_open

    digest = hashlib.sha256()
    with safe_open(folder / WEIGHTS_FILE, framework="pt") as f:
        for key in sorted(f.keys()):
            _hash_tensor(digest, key, f.get_tensor(key))
    _hash_config(digest, json.loads((folder / CONFIG_FILE).read_bytes()))
    return digest.hexdigest()


def _classify_key(key: str, spec: BaseModelSpec, tower_lora: bool) -> tuple[str, str, str]:
    """(checkpoint module name, the base's module path, "lora_A" | "lora_B") of one tensor key."""
    match = _KEY.match(key)
    if not match:
        raise InvalidAdapter(
            "weights", f"unexpected tensor {key!r}: only LoRA A/B weights can be hot-loaded"
        )
    module = spec.resolve(match["module"])
    if module in spec.other_linear:
        part = spec.other_linear[module]
        raise InvalidAdapter(
            "target_modules",
            f"{match['module']} is in the {part}, where the engine applies no LoRA for the base "
            f"{spec.name} ({spec.architecture or 'unknown architecture'}): it would silently "
            "ignore it",
        )
    if module in spec.tower_modules and not tower_lora:
        raise InvalidAdapter(
            "target_modules",
            f"{match['module']} is in the {_PART_NAMES[spec.part(module)]}: "
            "LORAFLEET_TOWER_LORA=off on this server, so its engine applies LoRA to the language "
            "model only; ask the operator, or train the language model only",
        )
    if module not in spec.lora_modules and module not in spec.tower_modules:
        raise InvalidAdapter(
            "target_modules", f"the base model's language model has no module {match['module']!r}"
        )
    return match["module"], module, match["kind"]


def _check_shapes(
    layer: _LoraLayer, expected: tuple[int, str], spec: BaseModelSpec, max_rank: int
) -> int:
    """lora_A [r, in] and lora_B [out, r] must fit the base layer, with the rank the config gives
    it."""
    module, pair = layer.module, layer.shapes
    if set(pair) != {"lora_A", "lora_B"}:
        raise InvalidAdapter(
            "weights", f"{module}: needs both lora_A and lora_B, found {sorted(pair)}"
        )
    in_features, out_features = spec.layer_shape(module)
    (rank_a, a_in), (b_out, rank_b) = pair["lora_A"], pair["lora_B"]
    if (a_in, b_out) != (in_features, out_features) or rank_a != rank_b:
        raise InvalidAdapter(
            "weights",
            f"{module}: lora_A {pair['lora_A']} / lora_B {pair['lora_B']} do not fit "
            f"the base layer ({in_features} -> {out_features})",
        )
    if rank_a > max_rank:
        raise InvalidAdapter(
            "r", f"{module}: rank {rank_a} is above this server's max LoRA rank {max_rank}"
        )
    rank, field_name = expected
    # the engine scales by alpha / r from the config: a wrong r serves a wrong adapter
    if rank_a != rank:
        raise InvalidAdapter(
            field_name,
            f"{module}: its tensors have rank {rank_a}, but {CONFIG_FILE} gives it rank {rank}",
        )
    return rank_a


def _check_changes_output(layers: Iterable[_LoraLayer]) -> None:
    """Refuse an adapter whose every update B @ A is zero: it loads fine and serves the base's
    answers."""
    layers = list(layers)
    # B first: PEFT starts B at zero, so an untrained adapter has B = 0
    for kind in ("lora_B", "lora_A"):
        if not any(layer.nonzero[kind] for layer in layers):
            raise InvalidAdapter(
                "weights",
                f"all {kind} weights are zero: this adapter would serve the base "
                "model's output (untrained?)",
            )
    if not any(layer.nonzero["lora_A"] and layer.nonzero["lora_B"] for layer in layers):
        raise InvalidAdapter(
            "weights",
            "every layer has an all-zero lora_A or lora_B: this adapter would serve "
            "the base model's output",
        )


def engine_lora_rank(rank: int) -> int:
    """The smallest max LoRA rank vLLM takes that holds adapters of rank `rank`."""
    for allowed in ENGINE_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ValueError(
        f"rank {rank} is above the largest max LoRA rank vLLM takes ({ENGINE_LORA_RANKS[-1]})"
    )


def validate_adapter_dir(
    folder: Path, spec: BaseModelSpec, max_rank: int, *, tower_lora: bool = True
) -> ValidatedAdapter:
    """Check a PEFT LoRA folder against the base model; compute its content digest.
    `tower_lora`: whether the engine applies LoRA to the vision tower and connector where the
    base supports it (False: refuse tensors there)."""
    for path in folder.rglob("*"):
        if path.suffix.lower() in _PICKLE_SUFFIXES:
            raise InvalidAdapter(
                "weights", f"{path.name}: pickle files are refused, save with safetensors"
            )
    config = read_config(folder, max_rank)
    check_target_modules(config, spec)
    weights = _check_weights(folder, config, spec, max_rank, tower_lora)
    _hash_config(weights.digest, config)
    size = (folder / CONFIG_FILE).stat().st_size + (folder / WEIGHTS_FILE).stat().st_size
    return ValidatedAdapter(
        path=folder,
        digest=weights.digest.hexdigest(),
        rank=weights.rank,
        alpha=float(config["lora_alpha"]),
        target_modules=weights.targets,
        size_bytes=size,
        parts=weights.parts,
    )


def validate_upload(
    archive: Path,
    workdir: Path,
    spec: BaseModelSpec,
    *,
    max_rank: int,
    max_bytes: int,
    tower_lora: bool = True,
) -> ValidatedAdapter:
    """Unpack an uploaded archive into `workdir` and validate the adapter inside, with the
    trainer's manifest.json beside it if there is one."""
    if archive.stat().st_size > max_bytes:
        raise PayloadTooLarge(f"upload is larger than the limit of {max_bytes} bytes")
    folder = extract_archive(archive, workdir, max_bytes)
    manifest = read_manifest(folder)  # cheap: refused before the tensors are read
    validated = validate_adapter_dir(folder, spec, max_rank, tower_lora=tower_lora)
    return replace(validated, manifest=manifest)


MIN_UPLOAD_BYTES = 512 * 1024 * 1024  # the fixed limit before it was derived


def upload_limit(spec: BaseModelSpec, max_rank: int) -> int:
    """The largest upload accepted when no limit is set: a float32 adapter of `max_rank` on every
    LoRA-able layer of the base, and a quarter more (its config, the archive), at least 512 MiB.
    Qwen2.5-VL-3B's rank-64 adapter on every layer of its language model is 479 MB, with its vision
    tower and connector 662 MB (limit 827 MB); a 7B's language model alone, 646 MB."""
    return max(MIN_UPLOAD_BYTES, spec.adapter_bytes(max_rank) * 5 // 4)

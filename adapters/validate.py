"""Turn an uploaded archive into a `ValidatedAdapter`, or raise one `InvalidAdapter` naming field and reason.

Everything that would make vLLM refuse an adapter, or load it and silently serve base-model output
(shared/pitfalls.md), is checked here, before anything is stored.
"""

from __future__ import annotations

import hashlib
import json
import re
import stat
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from lorafleet.adapters.base_model import BaseModelSpec
from lorafleet.adapters.errors import InvalidAdapter, PayloadTooLarge

__all__ = ["ValidatedAdapter", "extract_archive", "validate_adapter_dir", "validate_upload", "engine_lora_rank",
           "CONFIG_FILE", "WEIGHTS_FILE", "ENGINE_LORA_RANKS"]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ENGINE_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the only values vLLM takes as --max-lora-rank
# (`MaxLoRARanks` in vllm/config/lora.py, vLLM 0.32); the gateway does not import vLLM, so they are copied here
_PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}
# PEFT key: base_model.model.<module path>.lora_A.weight (older PEFT: .lora_A.<adapter name>.weight)
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<kind>lora_A|lora_B)(?:\.[^.]+)?\.weight$")


@dataclass(frozen=True)
class ValidatedAdapter:
    """A LoRA adapter folder that the engine will load and apply to every tensor."""

    path: Path  # folder holding CONFIG_FILE and WEIGHTS_FILE
    digest: str  # sha256 of the canonical config and the tensors
    rank: int
    alpha: float
    target_modules: tuple[str, ...]  # short names, e.g. ("k_proj", "q_proj")
    size_bytes: int


def _safe_member_name(name: str) -> None:
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
        raise InvalidAdapter("file", f"unsafe path in archive: {name!r}")


def _extract_zip(archive: Path, dest: Path, max_bytes: int) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        for info in infos:
            _safe_member_name(info.filename)
            if stat.S_ISLNK(info.external_attr >> 16):
                raise InvalidAdapter("file", f"links are not allowed in the archive: {info.filename!r}")
        if sum(i.file_size for i in infos) > max_bytes:
            raise PayloadTooLarge(f"archive unpacks to more than {max_bytes} bytes")
        zf.extractall(dest)


def _extract_tar(archive: Path, dest: Path, max_bytes: int) -> None:
    with tarfile.open(archive) as tf:
        members = tf.getmembers()
        for m in members:
            _safe_member_name(m.name)
            if m.issym() or m.islnk():
                raise InvalidAdapter("file", f"links are not allowed in the archive: {m.name!r}")
            if not (m.isfile() or m.isdir()):
                raise InvalidAdapter("file", f"special file in archive: {m.name!r}")
        if sum(m.size for m in members) > max_bytes:
            raise PayloadTooLarge(f"archive unpacks to more than {max_bytes} bytes")
        tf.extractall(dest, filter="data")


def extract_archive(archive: Path, dest: Path, max_bytes: int) -> Path:
    """Unpack a .zip or .tar(.gz) safely into `dest`; return the folder holding adapter_config.json."""
    try:
        if zipfile.is_zipfile(archive):
            _extract_zip(archive, dest, max_bytes)
        elif tarfile.is_tarfile(archive):
            _extract_tar(archive, dest, max_bytes)
        else:
            raise InvalidAdapter("file", "not a .tar.gz or .zip archive")
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
        raise InvalidAdapter("file", f"unreadable archive: {exc}") from exc
    configs = sorted(dest.rglob(CONFIG_FILE))
    if not configs:
        raise InvalidAdapter(CONFIG_FILE, f"the archive has no {CONFIG_FILE}")
    if len(configs) > 1:
        raise InvalidAdapter(CONFIG_FILE, f"the archive holds {len(configs)} adapters; upload one at a time")
    return configs[0].parent


def _read_config(folder: Path, max_rank: int) -> dict:
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidAdapter(CONFIG_FILE, f"not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise InvalidAdapter(CONFIG_FILE, "must be a JSON object")
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise InvalidAdapter("peft_type", f"only LORA adapters are served, got {config.get('peft_type')!r}")
    if config.get("use_dora"):
        raise InvalidAdapter("use_dora", "DoRA adapters cannot be hot-loaded by the engine")
    if config.get("bias", "none") != "none":
        raise InvalidAdapter("bias", f"bias must be 'none' (trained biases are not served), got {config['bias']!r}")
    if config.get("modules_to_save"):
        raise InvalidAdapter("modules_to_save", f"full copies of {config['modules_to_save']} cannot be hot-loaded; "
                             "train LoRA layers only")
    ranks = [config.get("r", 0), *(config.get("rank_pattern") or {}).values()]
    if not all(isinstance(r, int) and r > 0 for r in ranks):
        raise InvalidAdapter("r", f"rank must be a positive integer, got {config.get('r')!r}")
    if max(ranks) > max_rank:
        raise InvalidAdapter("r", f"rank {max(ranks)} is above this server's max LoRA rank {max_rank}")
    return config


def _check_target_modules(config: dict, spec: BaseModelSpec) -> None:
    targets = config.get("target_modules")
    paths = [*spec.lora_modules, *spec.other_linear]
    if isinstance(targets, str):
        if not any(re.fullmatch(targets, p) for p in spec.lora_modules):
            raise InvalidAdapter("target_modules", f"{targets!r} matches no layer of the base's language model")
    elif isinstance(targets, list) and targets:
        for name in targets:
            if not any(p == name or p.endswith("." + name) for p in paths):
                raise InvalidAdapter("target_modules", f"the base model has no module {name!r}")
    else:
        raise InvalidAdapter("target_modules", "missing or empty")


def _check_weights(folder: Path, config: dict, spec: BaseModelSpec,
                   max_rank: int) -> tuple[hashlib._Hash, int, tuple[str, ...]]:
    """Check every tensor against the base; return a running hash of the tensors, the rank and targets."""
    import torch
    from safetensors import SafetensorError, safe_open

    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise InvalidAdapter("weights", f"no {WEIGHTS_FILE} in the adapter folder")
    shapes: dict[str, dict[str, tuple[int, int]]] = {}
    digest = hashlib.sha256()
    try:
        with safe_open(weights, framework="pt") as f:
            for key in sorted(f.keys()):
                tensor = f.get_tensor(key)
                module, kind = _classify_key(key, spec)
                if tensor.ndim != 2 or not tensor.is_floating_point():
                    raise InvalidAdapter("weights", f"{key}: expected a 2-D float tensor, got {tuple(tensor.shape)}")
                if not torch.isfinite(tensor).all():
                    raise InvalidAdapter("weights", f"{key}: holds NaN or infinite values")
                shapes.setdefault(module, {})[kind] = tuple(tensor.shape)
                digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
                digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    except SafetensorError as exc:
        raise InvalidAdapter("weights", f"corrupt safetensors file: {exc}") from exc
    if not shapes:
        raise InvalidAdapter("weights", "the adapter holds no LoRA tensors")
    ranks = {_check_shapes(module, pair, spec, max_rank) for module, pair in shapes.items()}
    return digest, max(ranks), tuple(sorted({m.rsplit(".", 1)[-1] for m in shapes}))


def _classify_key(key: str, spec: BaseModelSpec) -> tuple[str, str]:
    match = _KEY.match(key)
    if not match:
        raise InvalidAdapter("weights", f"unexpected tensor {key!r}: only LoRA A/B weights can be hot-loaded")
    module = spec.resolve(match["module"])
    if module in spec.other_linear:
        part = spec.other_linear[module]
        raise InvalidAdapter("target_modules", f"{match['module']} is in the {part}: the engine applies LoRA to "
                             "the language model only and would silently ignore it")
    if module not in spec.lora_modules:
        raise InvalidAdapter("target_modules", f"the base model's language model has no module {match['module']!r}")
    return module, match["kind"]


def _check_shapes(module: str, pair: dict[str, tuple[int, int]], spec: BaseModelSpec, max_rank: int) -> int:
    if set(pair) != {"lora_A", "lora_B"}:
        raise InvalidAdapter("weights", f"{module}: needs both lora_A and lora_B, found {sorted(pair)}")
    in_features, out_features = spec.lora_modules[module]
    (rank_a, a_in), (b_out, rank_b) = pair["lora_A"], pair["lora_B"]
    if (a_in, b_out) != (in_features, out_features) or rank_a != rank_b:
        raise InvalidAdapter("weights", f"{module}: lora_A {pair['lora_A']} / lora_B {pair['lora_B']} do not fit "
                             f"the base layer ({in_features} -> {out_features})")
    if rank_a > max_rank:
        raise InvalidAdapter("r", f"{module}: rank {rank_a} is above this server's max LoRA rank {max_rank}")
    return rank_a


def engine_lora_rank(rank: int) -> int:
    """The smallest max LoRA rank vLLM takes that holds adapters of rank `rank`."""
    for allowed in ENGINE_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ValueError(f"rank {rank} is above the largest max LoRA rank vLLM takes ({ENGINE_LORA_RANKS[-1]})")


def validate_adapter_dir(folder: Path, spec: BaseModelSpec, max_rank: int) -> ValidatedAdapter:
    """Check a PEFT LoRA folder against the base model; compute its content digest."""
    for path in folder.rglob("*"):
        if path.suffix.lower() in _PICKLE_SUFFIXES:
            raise InvalidAdapter("weights", f"{path.name}: pickle files are refused, save with safetensors")
    config = _read_config(folder, max_rank)
    _check_target_modules(config, spec)
    digest, rank, targets = _check_weights(folder, config, spec, max_rank)
    digest.update(json.dumps(config, sort_keys=True, separators=(",", ":")).encode())
    size = (folder / CONFIG_FILE).stat().st_size + (folder / WEIGHTS_FILE).stat().st_size
    return ValidatedAdapter(path=folder, digest=digest.hexdigest(), rank=rank,
                            alpha=float(config.get("lora_alpha", rank)), target_modules=targets, size_bytes=size)


def validate_upload(archive: Path, workdir: Path, spec: BaseModelSpec, *, max_rank: int,
                    max_bytes: int) -> ValidatedAdapter:
    """Unpack an uploaded archive into `workdir` and validate the adapter inside."""
    if archive.stat().st_size > max_bytes:
        raise PayloadTooLarge(f"upload is larger than the limit of {max_bytes} bytes")
    return validate_adapter_dir(extract_archive(archive, workdir, max_bytes), spec, max_rank)

"""Builders for adapters and archives, good and bad, shared by unit and integration tests."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def tar_gz(folder: Path, out: Path, extra: Callable[[tarfile.TarFile], None] | None = None) -> Path:
    with tarfile.open(out, "w:gz") as tar:
        for path in sorted(folder.iterdir()):
            tar.add(path, arcname=f"adapter/{path.name}")
        if extra:
            extra(tar)
    return out


def zip_dir(folder: Path, out: Path) -> Path:
    with zipfile.ZipFile(out, "w") as zf:
        for path in sorted(folder.iterdir()):
            zf.write(path, arcname=path.name)
    return out


def copy_adapter(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_config(folder: Path, **changes) -> Path:
    config = json.loads((folder / CONFIG).read_text())
    config.update(changes)
    (folder / CONFIG).write_text(json.dumps(config))
    return folder


def edit_tensors(folder: Path, edit: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> Path:
    tensors = load_file(folder / WEIGHTS)
    save_file(edit(tensors), folder / WEIGHTS)
    return folder


def rename_module(old: str, new: str) -> Callable[[dict], dict]:
    return lambda tensors: {k.replace(old, new): v for k, v in tensors.items()}


def widen_first_lora_a(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    key = next(k for k in sorted(tensors) if "lora_A" in k)
    return {**tensors, key: torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 1)}


def _member(tar: tarfile.TarFile, name: str, data: bytes = b"x", kind: bytes = tarfile.REGTYPE,
            link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, 0 if link else len(data)
    tar.addfile(info, None if link else io.BytesIO(data))


def bad_archive(case: str, good: Path, work: Path, vision_adapter: Path, rank32_adapter: Path) -> Path:
    """An upload that must be refused; `case` names the reason. Returns the archive path."""
    folder = copy_adapter(good, work / "adapter")
    archive = work / "upload.tar.gz"
    match case:
        case "not_an_archive":
            archive.write_bytes(b"this is not an archive" * 10)
            return archive
        case "path_traversal":
            return tar_gz(folder, archive, lambda t: _member(t, "../../evil.txt"))
        case "symlink":
            return tar_gz(folder, archive,
                          lambda t: _member(t, "adapter/link", kind=tarfile.SYMTYPE, link="/etc/passwd"))
        case "no_config":
            (folder / CONFIG).unlink()
        case "not_lora":
            edit_config(folder, peft_type="PREFIX_TUNING")
        case "dora":
            edit_config(folder, use_dora=True)
        case "bias":
            edit_config(folder, bias="all")
        case "modules_to_save":
            edit_config(folder, modules_to_save=["lm_head"])
        case "rank_too_high":
            shutil.rmtree(folder)
            folder = copy_adapter(rank32_adapter, work / "adapter")
        case "pickle_weights":
            torch.save({"w": torch.zeros(1)}, folder / "adapter_model.bin")
        case "corrupt_safetensors":
            data = (folder / WEIGHTS).read_bytes()
            (folder / WEIGHTS).write_bytes(data[: len(data) // 2])
        case "unknown_module":
            edit_tensors(folder, rename_module("self_attn.q_proj", "self_attn.qq_proj"))
        case "vision_tower":
            shutil.rmtree(folder)
            folder = copy_adapter(vision_adapter, work / "adapter")
        case "shape_mismatch":
            edit_tensors(folder, widen_first_lora_a)
        case "too_large":
            padding = torch.randint(0, 255, (3_000_000,), dtype=torch.uint8).numpy().tobytes()
            (folder / "padding.safetensors.txt").write_bytes(padding)
        case _:
            raise ValueError(case)
    return tar_gz(folder, archive)


# case -> (HTTP status, a phrase the error message must contain)
REJECTIONS: dict[str, tuple[int, str]] = {
    "not_an_archive": (400, "not a .tar.gz or .zip"),
    "path_traversal": (400, "unsafe path"),
    "symlink": (400, "links are not allowed"),
    "no_config": (400, "no adapter_config.json"),
    "not_lora": (400, "only LORA adapters"),
    "dora": (400, "DoRA"),
    "bias": (400, "bias must be 'none'"),
    "modules_to_save": (400, "modules_to_save"),
    "rank_too_high": (400, "above this server's max LoRA rank"),
    "pickle_weights": (400, "pickle files are refused"),
    "corrupt_safetensors": (400, "corrupt safetensors"),
    "unknown_module": (400, "has no module"),
    "vision_tower": (400, "vision tower"),
    "shape_mismatch": (400, "do not fit the base layer"),
    "too_large": (413, "larger than the limit"),
}

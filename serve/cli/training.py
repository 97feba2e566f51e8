"""Offline work: train, evaluate and quantize, and the tiny local model of the demo and the
tests."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from lorafleet.serve.cli.common import DEFAULT_URL, ApiKey, Url, console, group, progress, working
from lorafleet.serve.gateway_client import LorafleetClient

__all__ = ["tiny", "train_command", "quantize_command", "eval_command"]

tiny = group("The tiny local Qwen2.5-VL used by the demo and the tests.")


@tiny.command("build")
def tiny_build(
    out: Path,
    seed: int = 0,
    pretrain_steps: Annotated[
        Optional[int], typer.Option(help="General-task pre-training steps.")
    ] = None,
) -> None:
    """Build the tiny Qwen2.5-VL in OUT and pre-train it on the shapes world (a base with
    something to forget)."""
    from transformers.utils import logging as hf_logging

    from lorafleet.train.tiny_model import PRETRAIN_STEPS, build_tiny_model

    hf_logging.disable_progress_bar()  # its "Writing model shards" bar: ours says it all

    steps = PRETRAIN_STEPS if pretrain_steps is None else pretrain_steps
    with progress("pre-training the tiny model", "steps") as update:
        built = build_tiny_model(
            out,
            seed,
            steps,
            progress=lambda step, total, loss: update(step, total, f"loss {loss:.3f}"),
        )
    console.print(f"tiny model written to {built}", soft_wrap=True)  # a path is never wrapped


@tiny.command("data")
def tiny_data(out: Path, train_size: int = 400, val_size: int = 60, seed: int = 0) -> None:
    """Write the shapes world's tasks as chat JSONL: general (the probe), json and french (tenant
    tasks), and the lessons' texture (a property the base's vision tower never learned),
    color_option and color_letter (a multiple-choice question answered with the option's text or
    its letter)."""
    from lorafleet.train.shapes import LESSON_TASK_NAMES, TASKS, write_task

    tasks = [*TASKS, *LESSON_TASK_NAMES]
    for task in tasks:
        write_task(task, train_size, out / f"{task}-train.jsonl", seed)
        write_task(task, val_size, out / f"{task}-val.jsonl", seed + 1)
    console.print(f"{', '.join(tasks)} train/val sets written to {out}", soft_wrap=True)


@tiny.command("adapter")
def tiny_adapter(base: Path, out: Path, seed: int = 1, rank: int = 8) -> None:
    """Write a random (seeded) LoRA adapter for BASE that visibly changes its outputs."""
    from lorafleet.train.random_adapter import make_random_adapter

    console.print(
        f"adapter written to {make_random_adapter(base, out, seed, rank)}", soft_wrap=True
    )


def report_table(report) -> Table:
    """Base vs adapter, side by side, per data set."""
    table = Table(
        "set", "n", "metric", "base", "adapter", "change", "format", "base fmt", "adapter fmt"
    )
    for s in report.sets:
        fmt = (
            s.format_name or "-",
            f"{s.base_format:.0%}" if s.base_format is not None else "-",
            f"{s.adapter_format:.0%}" if s.adapter_format is not None else "-",
        )
        table.add_row(
            s.name, str(s.n), s.metric, f"{s.base:.3f}", f"{s.adapter:.3f}", f"{s.delta:+.3f}", *fmt
        )
    return table


def _print_report(report) -> None:
    console.print(report_table(report))
    for line in report.verdicts():
        console.print(f"[yellow]{line}[/yellow]", highlight=False)


Opt = typer.Option


def train_command(
    base: Annotated[Optional[str], Opt(help="Base model: hub id or local path.")] = None,
    train: Annotated[Optional[Path], Opt(help="Training chat JSONL.")] = None,
    val: Annotated[Optional[Path], Opt(help="Validation chat JSONL.")] = None,
    probe: Annotated[
        Optional[Path], Opt(help="General-ability probe JSONL (forgetting check).")
    ] = None,
    out: Annotated[Optional[Path], Opt(help="Adapter output folder.")] = None,
    mix: Annotated[
        Optional[Path], Opt(help="General chat JSONL mixed into training (against forgetting).")
    ] = None,
    mix_ratio: Annotated[Optional[float], Opt(help="Mixed examples per training example.")] = None,
    config: Annotated[Optional[Path], Opt(help="YAML config; flags override it.")] = None,
    parts: Annotated[
        Optional[str],
        Opt(
            help="The parts that get LoRA layers, comma-separated: language, connector, vision "
            "(the vision tower). Default: language."
        ),
    ] = None,
    rank: Annotated[Optional[int], Opt()] = None,
    alpha: Annotated[Optional[float], Opt()] = None,
    dropout: Annotated[Optional[float], Opt()] = None,
    lr: Annotated[Optional[float], Opt()] = None,
    tower_lr: Annotated[
        Optional[float],
        Opt(help="Learning rate of the connector's and vision tower's LoRA (default: --lr)."),
    ] = None,
    epochs: Annotated[Optional[int], Opt()] = None,
    max_steps: Annotated[Optional[int], Opt()] = None,
    batch_size: Annotated[Optional[int], Opt()] = None,
    grad_accum: Annotated[Optional[int], Opt()] = None,
    max_length: Annotated[Optional[int], Opt()] = None,
    max_image_tokens: Annotated[
        Optional[int],
        Opt(
            help="The most tokens one picture becomes (larger ones are scaled down), as the "
            "server's LORAFLEET_MAX_IMAGE_TOKENS."
        ),
    ] = None,
    seed: Annotated[Optional[int], Opt()] = None,
    eval_every: Annotated[Optional[int], Opt()] = None,
    patience: Annotated[Optional[int], Opt()] = None,
    metric: Annotated[Optional[str], Opt(help="exact_match | anls | json_fields")] = None,
    gradient_checkpointing: Annotated[Optional[bool], Opt()] = None,
    qlora: Annotated[Optional[str], Opt(help="auto | on | off")] = None,
    resume: Annotated[bool, Opt(help="Continue from OUT/checkpoint.")] = False,
    push: Annotated[
        Optional[str], Opt(help="After the checks pass, upload and deploy to this deployment.")
    ] = None,
    name: Annotated[
        Optional[str], Opt(help="Adapter name for --push (default: OUT's folder name).")
    ] = None,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Train a LoRA adapter, score it against the base, prove it servable, and optionally push
    it."""
    from accelerate import PartialState

    from lorafleet.train.config import load_config
    from lorafleet.train.pipeline import finish
    from lorafleet.train.trainer import train as run_training

    settings = load_config(
        config,
        base=base,
        train=train,
        val=val,
        probe=probe,
        out=out,
        mix=mix,
        mix_ratio=mix_ratio,
        parts=parts,
        rank=rank,
        alpha=alpha,
        dropout=dropout,
        lr=lr,
        tower_lr=tower_lr,
        epochs=epochs,
        max_steps=max_steps,
        batch_size=batch_size,
        grad_accum=grad_accum,
        max_length=max_length,
        max_image_tokens=max_image_tokens,
        seed=seed,
        eval_every=eval_every,
        patience=patience,
        metric=metric,
        gradient_checkpointing=gradient_checkpointing,
        qlora=qlora,
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    result = run_training(settings, resume=resume)
    if not PartialState().is_main_process:
        return
    console.print(
        f"trained {result.steps} steps, {result.samples_per_s:.1f} samples/s, peak memory "
        f"{result.peak_memory_mb:.0f} MB, best validation loss {result.best_val_loss}"
    )
    if advice := result.advice(settings):
        console.print(f"[yellow]{advice}[/yellow]", highlight=False)
    with working("evaluating base vs adapter and proving the adapter servable in vLLM"):
        manifest, report = finish(settings, result)
    _print_report(report)
    console.print(
        f"servable: digest {manifest['adapter_digest'][:12]}, "
        f"changes {manifest['servability']['changed']}/"
        f"{manifest['servability']['prompts']} check outputs, vLLM = PEFT on the first "
        f"{settings.check_tokens} tokens; manifest at {settings.out / 'manifest.json'}"
    )
    if push:
        client = LorafleetClient(url, api_key)
        version = client.push_adapter(name or settings.out.name, settings.out)
        client.deploy(push, f"{version['name']}@{version['version']}")
        console.print(f"pushed {version['name']}@{version['version']} and deployed it as {push}")


def quantize_command(
    base: Annotated[str, Opt(help="Full-precision base: hub id or local path.")],
    out: Annotated[Path, Opt(help="New folder for the quantized checkpoint.")],
    scheme: Annotated[
        str,
        Opt(
            help="int4 | int8 (torchao weight-only: any CPU, GPUs) | w4a16 (compressed-tensors, "
            "packed 4-bit: AVX-512 CPUs in bfloat16, CUDA GPUs with Marlin)."
        ),
    ] = "int4",
    group_size: Annotated[int, Opt(help="int4, w4a16: weights per scale.")] = 32,
) -> None:
    """Write a quantized checkpoint of BASE that `lorafleet serve --base OUT` serves as it is."""
    from lorafleet.train.quantize import quantize

    with working(f"quantizing {base} to {scheme}"):
        report = quantize(base, out, scheme, group_size)
    mib = 1024 * 1024
    console.print(
        f"{report.quantized_layers} language-model layers quantized to {scheme} in "
        f"{report.seconds:.1f} s: their weights {report.weights_bytes_before / mib:.1f} MiB -> "
        f"{report.weights_bytes_after / mib:.1f} MiB; kept in full precision: "
        f"{', '.join(report.kept_full_precision)}\n"
        f"checkpoint: {report.out} ({report.checkpoint_bytes / mib:.1f} MiB); serve it with "
        f"`lorafleet serve --base {report.out}`",
        highlight=False,
    )


def eval_command(
    base: Annotated[str, Opt(help="Base model: hub id or local path.")],
    adapter: Annotated[Path, Opt(exists=True, file_okay=False, help="Adapter folder.")],
    val: Annotated[Optional[Path], Opt(help="Validation chat JSONL.")] = None,
    probe: Annotated[Optional[Path], Opt(help="General-ability probe JSONL.")] = None,
    metric: Annotated[str, Opt(help="exact_match | anls | json_fields")] = "exact_match",
    max_tokens: int = 64,
) -> None:
    """Score the base and the adapter side by side through vLLM."""
    from lorafleet.scoring import METRICS
    from lorafleet.train.compare import compare_to_base

    if metric not in METRICS:
        raise typer.BadParameter(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    if val is None and probe is None:
        raise typer.BadParameter("give --val and/or --probe")
    with working("generating with vLLM"):
        report = compare_to_base(base, adapter, val, probe, metric, max_tokens)
    _print_report(report)

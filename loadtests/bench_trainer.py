"""Trainer throughput and peak memory: lorafleet's trainer vs a plain PEFT loop, same model, data
and steps.

Each variant runs in its own process (peak RSS cannot be reset); variants alternate over rounds.

    .venv/bin/python loadtests/bench_trainer.py [--base DIR] [--steps 30] [--rounds 2]

Without --base it builds the tiny model. On a CUDA machine, pass a real-size base (e.g. a
random-initialised Qwen2.5-VL-3B saved with `save_pretrained`) to measure GPU throughput and memory
the same way.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {  # name -> (loop, batch size, rank, gradient checkpointing)
    "lorafleet b8 r16": ("lorafleet", 8, 16, False),
    "plain PEFT b8 r16": ("plain", 8, 16, False),
    "lorafleet b16 r16": ("lorafleet", 16, 16, False),
    "lorafleet b16 r64": ("lorafleet", 16, 64, False),
    "lorafleet b16 r16 ckpt": ("lorafleet", 16, 16, True),
}


def _peak_mb() -> float:
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _run_variant(name: str, base: str, data: str, steps: int, out: str) -> dict:
    loop, batch, rank, ckpt = VARIANTS[name]
    from lorafleet.train.config import load_config

    config = load_config(
        None,
        base=base,
        train=data,
        out=out,
        rank=rank,
        batch_size=batch,
        max_steps=steps,
        gradient_checkpointing=ckpt,
        eval_every=10**6,
        qlora="off",
    )
    if loop == "lorafleet":
        from lorafleet.train.trainer import train

        result = train(config, progress=False)
        return {"samples_per_s": result.samples_per_s, "peak_mb": _peak_mb()}
    import torch
    from torch.utils.data import DataLoader

    from lorafleet.chat_jsonl import load_jsonl
    from lorafleet.train.data import collate, encode
    from lorafleet.train.trainer import _load_model

    processor, model = _load_model(config)
    items = [encode(processor, e, config.max_length) for e in load_jsonl(config.train)]
    loader = DataLoader(
        items,
        batch_size=batch,
        shuffle=True,
        collate_fn=lambda b: collate(b, processor.tokenizer.pad_token_id),
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).train()
    done, samples, t0 = 0, 0, time.perf_counter()
    while done < steps:
        for batch_ in loader:
            loss = model(**{k: v.to(device) for k, v in batch_.items()}).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            done, samples = done + 1, samples + len(batch_["input_ids"])
            if done == steps:
                break
    return {"samples_per_s": samples / (time.perf_counter() - t0), "peak_mb": _peak_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:  # child process: one measurement, printed as JSON
        print(
            "RESULT "
            + json.dumps(_run_variant(args.variant, args.base, args.data, args.steps, args.out))
        )
        return

    from rich.console import Console
    from rich.table import Table

    from lorafleet.train.shapes import write_task
    from lorafleet.train.tiny_model import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="lorafleet-trainbench-"))
    base = args.base or str(build_tiny_model(work / "base"))
    data = write_task("json", 256, work / "json.jsonl", seed=0)
    results: dict[str, list[dict]] = {}
    for round_ in range(args.rounds):
        for name in VARIANTS:
            run = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--variant",
                    name,
                    "--base",
                    base,
                    "--data",
                    str(data),
                    "--steps",
                    str(args.steps),
                    "--out",
                    str(work / f"out-{round_}-{len(results)}"),
                ],
                capture_output=True,
                text=True,
            )
            line = next((out for out in run.stdout.splitlines() if out.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"{name} failed:\n{run.stderr[-2000:]}")
            results.setdefault(name, []).append(json.loads(line[7:]))
    reference = statistics.median(r["samples_per_s"] for r in results["plain PEFT b8 r16"])
    table = Table(
        "variant",
        "samples/s",
        "vs plain PEFT b8",
        "peak memory (MB)",
        title=f"LoRA training, {base}, {args.steps} steps, median of {args.rounds} rounds",
    )
    for name, runs in results.items():
        rate = statistics.median(r["samples_per_s"] for r in runs)
        peak = statistics.median(r["peak_mb"] for r in runs)
        table.add_row(name, f"{rate:.1f}", f"{rate / reference:.2f}", f"{peak:.0f}")
    Console(width=120).print(table)


if __name__ == "__main__":
    main()

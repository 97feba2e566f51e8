"""When the vision encoder is the bottleneck: a shapes-world task whose visual property the tiny
base's vision tower never learned (is the object striped or plain? the stripes keep the plain
fill's mean colour), learned by LoRA on the connector and the vision tower alone, on the language
model alone, with the connector, and with the connector and the vision tower, side by side with
the same data, rank and steps. Every adapter and the base answer the held-out items through vLLM
(tower and connector LoRA on); the table gives exact-match accuracy and what each answered.

    .venv/bin/python loadtests/bench_vision_bottleneck.py [--base DIR] [--train 800] [--val 200]
        [--epochs 6] [--rank 16] [--lr 2e-3] [--tower-lr LR] [--seed 0]

Without --base it builds the pre-trained tiny base (about 2 minutes).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.table import Table

console = Console(width=160)
# label -> the parts that get LoRA layers (the answer's wording is new: only a LoRA on the language
# model can teach the base to say "striped")
VARIANTS = {
    "connector alone": ("connector",),
    "connector + vision tower alone": ("connector", "vision"),
    "language model": ("language",),
    "language model + connector": ("language", "connector"),
    "language model + connector + vision tower": ("language", "connector", "vision"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path)
    parser.add_argument("--train", type=int, default=800)
    parser.add_argument("--val", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--tower-lr", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from lorafleet.chat_jsonl import answer_of, load_jsonl, request_messages
    from lorafleet.scoring import exact_match
    from lorafleet.train.config import load_config
    from lorafleet.train.shapes import write_task
    from lorafleet.train.tiny_model import PRETRAIN_STEPS, build_tiny_model
    from lorafleet.train.trainer import train
    from lorafleet.train.vllm_generate import generate

    work = Path(tempfile.mkdtemp(prefix="lorafleet-bottleneck-"))
    base = args.base
    if base is None:
        with console.status("building the pre-trained tiny base"):
            base = build_tiny_model(work / "tiny", pretrain_steps=PRETRAIN_STEPS)
    train_set = write_task("texture", args.train, work / "texture-train.jsonl", seed=args.seed)
    val_set = write_task("texture", args.val, work / "texture-val.jsonl", seed=args.seed + 1)
    trained = {}
    for label, parts in VARIANTS.items():
        config = load_config(
            None,
            base=str(base),
            train=train_set,
            val=val_set,
            out=work / "-".join(parts),
            parts=parts,
            rank=args.rank,
            alpha=2 * args.rank,
            lr=args.lr,
            tower_lr=args.tower_lr,
            epochs=args.epochs,
            batch_size=16,
            patience=0,
            seed=args.seed,
        )
        console.print(f"training on the {label}")
        t0 = time.perf_counter()
        result = train(config)
        trained[label] = (config.out, result, time.perf_counter() - t0)

    examples = load_jsonl(val_set)
    prompts = [request_messages(e) for e in examples]
    references = [answer_of(e) for e in examples]
    with console.status(f"{len(VARIANTS) + 1} models answer {len(prompts)} held-out items in vLLM"):
        answers = generate(
            str(base),
            {"base": None, **{label: str(out) for label, (out, _, _) in trained.items()}},
            prompts,
            max_tokens=8,
            tower_lora=True,
        )

    table = Table(
        title=f"Is the object striped or plain? {args.train} training items, {len(prompts)} "
        f"held out; rank {args.rank}, lr {args.lr}, {args.epochs} epochs"
    )
    for column in ("LoRA on", "steps", "train s", "best val loss", "accuracy", "answers"):
        table.add_column(column, justify="right")
    plain = sum(r == "plain" for r in references) / len(references)
    for label in ("base", *VARIANTS):
        texts = [a["text"] for a in answers[label]]
        accuracy = sum(exact_match(t, r) for t, r in zip(texts, references)) / len(references)
        said = ", ".join(f"{t.strip()!r} {n}" for t, n in Counter(texts).most_common(3))
        if label == "base":
            table.add_row("(the base)", "", "", "", f"{accuracy:.3f}", said)
            continue
        _, result, seconds = trained[label]
        table.add_row(
            label,
            str(result.steps),
            f"{seconds:.0f}",
            f"{result.best_val_loss:.4f}",
            f"{accuracy:.3f}",
            said,
        )
    console.print(table)
    console.print(f"answering 'plain' to every item scores {plain:.3f}")


if __name__ == "__main__":
    main()

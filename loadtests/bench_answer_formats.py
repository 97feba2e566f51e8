"""Answer formats by construction, measured through one `lorafleet serve` on the pre-trained tiny
base with the unmodified `openai` SDK.

1. The multiple-choice story: an adapter trained to answer "Which color is the object? A) red
   B) green C) blue D) yellow" with the option's text ("red") is asked the same question with
   "Answer with the letter." on held-out pictures: its accuracy and format validity with the
   deployment's `choice` format declared only, then enforced; an adapter trained on the letters
   is the reference.
2. What enforcing costs the engine when the answers comply anyway (the same tokens either way): an
   adapter answering the colour word behind a deployment with no format, one enforcing a choice of
   the four words and one enforcing a regex of them; an adapter answering JSON behind one with no
   format and one enforcing its JSON schema. Alternating rounds at 16 clients, each asking its
   adapter's own question about a picture: requests/s and p50 latency, and each side's ratio to
   its adapter's unconstrained side.

    .venv/bin/python loadtests/bench_answer_formats.py [--base DIR] [--train 400] [--val 200]
        [--epochs 4] [--rounds 3] [--requests 192] [--clients 16]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from harness import BENCH_LIMITS, Phase, run_load, spread, wait_idle
from rich.console import Console
from rich.table import Table

from lorafleet.serve.dev.local_server import LocalServer
from lorafleet.serve.gateway_client import LorafleetClient
from lorafleet.train import shapes

console = Console(width=160)
LETTERS = list(shapes.LETTERS.values())
COLOR_JSON = {
    "type": "object",
    "properties": {
        "shape": {"enum": list(shapes.SHAPES)},
        "color": {"enum": list(shapes.COLORS)},
    },
    "required": ["shape", "color"],
    "additionalProperties": False,
}
WORDS = list(shapes.COLORS)
# deployment -> (adapter task, its enforced format or None, the unconstrained side it is compared
# with)
FORMATS = {
    "word": ("color_option", None, "word"),
    "word-choice": ("color_option", {"choice": WORDS, "enforce": True}, "word"),
    "word-regex": ("color_option", {"regex": "|".join(WORDS), "enforce": True}, "word"),
    "json": ("json", None, "json"),
    "json-schema": ("json", {"json_schema": COLOR_JSON, "enforce": True}, "json"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path)
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--val", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=192)
    parser.add_argument("--clients", type=int, default=16)
    args = parser.parse_args()

    from openai import OpenAI

    from lorafleet.chat_jsonl import answer_of, load_jsonl, request_messages
    from lorafleet.serve.answer_format import answer_checker
    from lorafleet.train.config import load_config
    from lorafleet.train.shapes import write_task
    from lorafleet.train.tiny_model import PRETRAIN_STEPS, build_tiny_model
    from lorafleet.train.trainer import train

    work = Path(tempfile.mkdtemp(prefix="lorafleet-formats-"))
    base = args.base
    if base is None:
        with console.status("building the pre-trained tiny base"):
            base = build_tiny_model(work / "tiny", pretrain_steps=PRETRAIN_STEPS)
    adapters = {}
    for task in ("color_option", "color_letter", "json"):
        data = write_task(task, args.train, work / f"{task}-train.jsonl", seed=0)
        console.print(f"training on {task}")
        config = load_config(
            None,
            base=str(base),
            train=data,
            out=work / task,
            rank=16,
            lr=2e-3,
            epochs=args.epochs,
            batch_size=16,
        )
        train(config)
        adapters[task] = config.out
    val = load_jsonl(write_task("color_letter", args.val, work / "letter-val.jsonl", seed=1))
    prompts = [request_messages(e) for e in val]
    references = [answer_of(e) for e in val]

    server = LocalServer.start(base, work / "home", max_model_len="1024", **BENCH_LIMITS)
    try:
        with console.status("starting lorafleet serve"):
            server.wait_ready()
        key = LorafleetClient(server.url, server.admin_key).create_tenant("bench")["api_key"]
        tenant = LorafleetClient(server.url, key)
        for task, folder in adapters.items():
            tenant.push_adapter(task, folder)
        client = OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)

        def ask(deployment: str) -> list[str]:
            def one(messages: list[dict]) -> str:
                reply = client.chat.completions.create(
                    model=deployment, messages=messages, max_tokens=8, temperature=0
                )
                return reply.choices[0].message.content or ""

            with ThreadPoolExecutor(8) as pool:
                return list(pool.map(one, prompts))

        story = []
        valid = answer_checker({"choice": LETTERS})
        for label, task, spec in (
            ("option text, declared", "color_option", {"choice": LETTERS}),
            ("option text, enforced", "color_option", {"choice": LETTERS, "enforce": True}),
            ("letters, declared", "color_letter", {"choice": LETTERS}),
            ("letters, enforced", "color_letter", {"choice": LETTERS, "enforce": True}),
        ):
            tenant.deploy("quiz", task)
            tenant.set_answer_format("quiz", spec)
            with console.status(f"{label}: {len(prompts)} questions"):
                answers = ask("quiz")
            correct = sum(a.strip() == r for a, r in zip(answers, references)) / len(answers)
            story.append((label, correct, sum(map(valid, answers)) / len(answers), answers))

        questions = {
            task: request_messages(load_jsonl(write_task(task, 1, work / f"{task}-q.jsonl", 2))[0])
            for task in ("color_option", "json")
        }
        for name, (task, spec, _) in FORMATS.items():
            tenant.deploy(name, task)
            if spec:
                tenant.set_answer_format(name, spec)
        pids = [server.process.pid]
        runs: dict[str, list[Phase]] = {name: [] for name in FORMATS}
        answers_of = {}
        for name, (task, _, _) in FORMATS.items():  # the same answer with and without the format
            reply = client.chat.completions.create(
                model=name, messages=questions[task], max_tokens=32, temperature=0
            )
            answers_of[name] = (reply.choices[0].message.content, reply.usage.completion_tokens)
        order = list(FORMATS)
        for r in range(args.rounds + 1):  # round 0 warms up (and compiles each grammar)
            for name in order if r % 2 else order[::-1]:
                wait_idle(pids)
                with console.status(f"round {r}: {name}"):
                    phase = run_load(
                        server.url,
                        key,
                        [name],
                        args.requests,
                        args.clients,
                        seed=r,
                        extra={
                            "ignore_eos": False,
                            "max_tokens": 32,
                            "messages": questions[FORMATS[name][0]],
                        },
                    )
                if phase.failed:
                    raise RuntimeError(f"{name}: {phase.failed} requests failed: {phase.errors}")
                if r:
                    runs[name].append(phase)
    finally:
        server.stop()

    table = Table(title=f"The multiple-choice story: {len(prompts)} held-out pictures")
    for column in ("adapter trained on", "accuracy", "valid letters", "answers (most common)"):
        table.add_column(column, justify="right")
    for label, correct, validity, answers in story:
        common = statistics.multimode(answers)[:3]
        table.add_row(label, f"{correct:.3f}", f"{validity:.3f}", ", ".join(map(repr, common)))
    console.print(table)

    table = Table(
        title=f"What enforcing costs when the answers comply anyway: {args.clients} clients, "
        f"{args.requests} requests × {args.rounds} rounds"
    )
    for column in ("deployment", "answer", "tokens", "requests/s", "p50 ms", "rps ÷ unconstrained"):
        table.add_column(column, justify="right")
    for name, (_, _, reference) in FORMATS.items():
        ratios = [p.rps / f.rps for p, f in zip(runs[name], runs[reference])]
        text, tokens = answers_of[name]
        table.add_row(
            name,
            repr(text),
            str(tokens),
            spread([p.rps for p in runs[name]]),
            spread([p.p50 for p in runs[name]], 1000, 0),
            f"{statistics.median(ratios):.3f} [{min(ratios):.3f}–{max(ratios):.3f}]",
        )
    console.print(table)


if __name__ == "__main__":
    main()

"""`make demo`: the whole product on the embedded defaults, on this machine, with no download.

1. builds the tiny Qwen2.5-VL and pre-trains it on the shapes world (the base);
2. trains two tenants' adapters on CPU: acme wants JSON, globex wants the colour as one French word;
   each is scored against the base in vLLM (task + forgetting probe) and proven servable;
3. quantizes the base to int4 (`lorafleet quantize`) and serves that 4-bit checkpoint with
   `lorafleet serve`; creates the tenants, uploads and deploys each adapter (trained on the
   full-precision base), asks both tenants' deployments about the same picture through the `openai`
   SDK, and scores each adapter's validation set on the 4-bit base beside its full-precision score;
4. acme starts a canary rollout of the wrong adapter, and the validation gate refuses it before any
   traffic.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw
from rich.console import Console
from rich.table import Table

from lorafleet.serve.cli.common import progress, working
from lorafleet.serve.dev.local_server import LocalServer
from lorafleet.serve.gateway_client import LorafleetClient

console = Console(width=None if sys.stdout.isatty() else 120)
TENANTS = {"acme": "json", "globex": "french"}


def _picture() -> str:
    from lorafleet.chat_jsonl import image_data_url

    image = Image.new("RGB", (112, 112), "white")
    ImageDraw.Draw(image).ellipse((16, 16, 96, 96), fill=(220, 30, 30))
    return image_data_url(image)


def _build_world(work: Path) -> Path:
    from transformers.utils import logging as hf_logging

    from lorafleet.train.shapes import TASKS, write_task
    from lorafleet.train.tiny_model import PRETRAIN_STEPS, build_tiny_model

    hf_logging.disable_progress_bar()
    with progress("pre-training the tiny Qwen2.5-VL", "steps", console) as update:

        def advance(step: int, total: int, loss: float) -> None:
            update(step, total, f"loss {loss:.3f}")

        base = build_tiny_model(
            work / "base", seed=0, pretrain_steps=PRETRAIN_STEPS, progress=advance
        )
    with working("writing the shapes world's tasks", console):
        for task in TASKS:
            write_task(task, 400, work / "data" / f"{task}-train.jsonl", seed=0)
            write_task(task, 60, work / "data" / f"{task}-val.jsonl", seed=1)
    return base


def _train_adapters(base: Path, work: Path) -> dict[str, tuple[Path, float]]:
    from lorafleet.train.config import load_config
    from lorafleet.train.pipeline import finish
    from lorafleet.train.trainer import train

    table = Table(
        "tenant",
        "task",
        "val base",
        "val adapter",
        "format base → adapter",
        "probe base",
        "probe adapter",
        "servable",
        title="adapters trained on CPU, scored in vLLM against the base",
    )
    adapters = {}
    for tenant, task in TENANTS.items():
        data = work / "data"
        config = load_config(
            None,
            base=str(base),
            train=data / f"{task}-train.jsonl",
            val=data / f"{task}-val.jsonl",
            probe=data / "general-val.jsonl",
            mix=data / "general-train.jsonl",
            out=work / f"adapter-{tenant}",
            rank=16,
            lr=2e-3,
            epochs=2,
            batch_size=16,
            eval_every=25,
        )
        with working(
            f"training {tenant}'s {task} adapter, then evaluating and proving it in vLLM", console
        ):
            t0 = time.perf_counter()
            result = train(config, progress=False)
            manifest, report = finish(config, result)
        val, probe = report.sets
        fmt = f"{val.base_format:.0%} → {val.adapter_format:.0%}" if val.format_name else "-"
        table.add_row(
            tenant,
            task,
            f"{val.base:.0%}",
            f"{val.adapter:.0%}",
            fmt,
            f"{probe.base:.0%}",
            f"{probe.adapter:.0%}",
            f"yes ({manifest['adapter_digest'][:12]})",
        )
        console.print(
            f"{tenant}: {result.steps} steps at {result.samples_per_s:.0f} samples/s, "
            f"{time.perf_counter() - t0:.0f} s with evaluation"
        )
        for line in report.verdicts():
            console.print(f"[yellow]{line}[/yellow]")
        adapters[tenant] = (config.out, val.adapter)
    console.print(table)
    return adapters


def _ask(url: str, api_key: str, question: str) -> tuple[str, str, float]:
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key=api_key)
    messages: Any = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": _picture()}},
                {"type": "text", "text": question},
            ],
        }
    ]
    t0 = time.perf_counter()
    raw = client.chat.completions.with_raw_response.create(
        model="assistant", messages=messages, max_tokens=24, temperature=0
    )
    return (
        raw.parse().choices[0].message.content or "",
        raw.headers["x-lorafleet-adapter"],
        time.perf_counter() - t0,
    )


def _quantize(base: Path, work: Path) -> Path:
    from lorafleet.train.quantize import quantize

    with working("quantizing the base to int4 (lorafleet quantize)", console):
        report = quantize(str(base), work / "base-int4", "int4", 32)
    console.print(
        f"lorafleet quantize: {report.quantized_layers} language-model layers to int4 (groups of "
        f"{report.group_size}), their weights {report.weights_bytes_before / 1024:.0f} KiB -> "
        f"{report.weights_bytes_after / 1024:.0f} KiB; vision tower kept in full precision"
    )
    return Path(report.out)


def _serve(base: Path, work: Path, adapters: dict[str, tuple[Path, float]]) -> None:
    from lorafleet.train.shapes import TASKS

    server = LocalServer.start(base, work / "home", max_model_len="512")
    try:  # the gateway and its engine stop whatever happens, a start that times out included
        with working("starting the gateway and its vLLM engine (about a minute on CPU)", console):
            console.print(f"server ready in {server.wait_ready():.0f} s on {server.url}")
        admin = LorafleetClient(server.url, server.admin_key)
        table = Table(
            "tenant",
            "asks (picture of a red circle)",
            "deployment 'assistant' answers",
            "adapter",
            "latency",
            title="one int4 base, hot-swapped per-tenant adapters, through the openai SDK",
        )
        clients = {}
        for tenant, task in TENANTS.items():
            key = admin.create_tenant(tenant)["api_key"]
            client = clients[tenant] = LorafleetClient(server.url, key)
            version = client.push_adapter(task, adapters[tenant][0])
            client.deploy("assistant", f"{task}@{version['version']}")
            question = TASKS[task]("circle", "red")[0]
            answer, digest, seconds = _ask(server.url, key, question)
            table.add_row(
                tenant,
                question,
                answer,
                f"{task}@{version['version']} {digest[:12]}",
                f"{seconds * 1000:.0f} ms",
            )
        console.print(table)
        _score_on_quantized_base(clients, work, adapters)
        _gate(clients["acme"], work, adapters["globex"][0])
    finally:
        server.stop()


def _score_on_quantized_base(
    clients: dict[str, LorafleetClient], work: Path, adapters: dict[str, tuple[Path, float]]
) -> None:
    """Each tenant's validation set replayed through the gateway on the 4-bit base (the drift
    monitor's baseline)."""
    table = Table(
        "tenant",
        "validation items",
        "full-precision base (training eval)",
        "int4 base (served)",
        title="the same adapters on the full-precision and the quantized base",
    )
    for tenant, task in TENANTS.items():
        client = clients[tenant]
        stored = client.push_validation(
            "assistant", work / "data" / f"{task}-val.jsonl", "exact_match"
        )
        with working(f"{tenant}'s validation set on the int4 base", console):
            (run,) = client.drift_check("assistant")
        table.add_row(
            tenant, str(stored["items"]), f"{adapters[tenant][1]:.1%}", f"{run['score']:.1%}"
        )
    console.print(table)


def _gate(client: LorafleetClient, work: Path, wrong: Path) -> None:
    """acme starts a canary rollout of the wrong adapter: the validation gate refuses it before
    any traffic."""
    # globex's French adapter, uploaded by mistake
    version = client.push_adapter("json", wrong)["version"]
    rollout = client.start_rollout("assistant", to=f"json@{version}")
    with working(
        "canary json@2: stable and candidate answer acme's 60-item validation set", console
    ):
        while rollout["phase"] == "Gating":
            time.sleep(0.5)
            rollout = client.rollout("assistant")
    table = Table(
        "canary",
        "phase",
        "decided by",
        "evidence",
        title="a canary rollout meets the validation gate",
    )
    table.add_row(f"json@{version}", rollout["phase"], rollout["reason"], rollout["message"])
    console.print(table)


def main() -> None:
    work = Path(
        os.environ.get("LORAFLEET_DEMO_DIR", Path.home() / ".lorafleet" / "demo")
    ).expanduser()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    base = _build_world(work)
    adapters = _train_adapters(base, work)
    _serve(_quantize(base, work), work, adapters)
    console.print(f"state, adapters, manifests and logs: {work}")


if __name__ == "__main__":
    main()

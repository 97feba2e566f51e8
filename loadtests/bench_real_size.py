"""A real-size base on this machine: Qwen2.5-VL-3B's architecture and size (its published config,
random bfloat16 weights, built locally; no hub) under one `lorafleet serve` with every engine and
limit setting at its default.

Measures the build (seconds, size on disk); the engine sizing derived for it; the engine's start
until ready and the memory of the gateway and engine processes; a rank-64 adapter on every linear
layer of its language model: size, pack + upload (validation → store), deploy (a derived rank grows:
the engine restarts) and the first token; chats with a small picture, a real-size one and a
12-megapixel phone photo (prompt tokens, first token, whole answer, the memory's peak); and the
trainer's peak memory and time for one step on one picture.

    .venv/bin/python loadtests/bench_real_size.py [--like qwen2.5-vl-3b] [--base DIR]
        [--image 1280x960] [--train-image 448x448] [--skip-train]

`--base DIR` keeps the built base there and reuses it on the next run.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from harness import tree_rss
from rich.console import Console
from rich.table import Table

from lorafleet.serve.dev.local_server import LocalServer
from lorafleet.serve.gateway_client import LorafleetClient

console = Console(width=160)
GIB = 1024**3


class PeakRss:
    """The largest `tree_rss` seen while the block runs (sampled twice a second)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0, threading.Event()

    def __enter__(self) -> PeakRss:
        def sample() -> None:
            while not self._stop.is_set():
                self.peak = max(self.peak, tree_rss(self.pid))
                self._stop.wait(0.5)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def picture(width: int, height: int) -> bytes:
    """A JPEG of a scanned-page-like picture: text lines and boxes on a light background."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), (245, 243, 238))
    draw = ImageDraw.Draw(image)
    for y in range(height // 20, height - 20, max(12, height // 40)):
        draw.line([(width // 12, y), (width - width // 12, y)], fill=(40, 40, 40), width=2)
    draw.rectangle(
        [width // 10, height // 8, width // 3, height // 4], outline=(200, 30, 30), width=4
    )
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


def chat(url: str, key: str, model: str, image: bytes, max_tokens: int = 16) -> dict:
    """One streamed chat with one picture: first token and whole answer (s), prompt tokens, or the
    error the client got."""
    body = {
        "model": model,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": max_tokens,
        "temperature": 0,
        "messages": [
            {
                "role": "user",
                "content": [
                    {
                        "type": "image_url",
                        "image_url": {
                            "url": "data:image/jpeg;base64," + base64.b64encode(image).decode()
                        },
                    },
                    {"type": "text", "text": "What does this page say?"},
                ],
            }
        ],
    }
    t0, first = time.perf_counter(), None
    usage: dict = {}
    with httpx.stream(
        "POST",
        f"{url}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {key}"},
        timeout=1800,
    ) as response:
        if response.status_code != 200:
            response.read()
            return {
                "status": response.status_code,
                "error": response.json().get("error", {}).get("message", response.text)[:200],
                "total_s": time.perf_counter() - t0,
            }
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"status": 200, "error": chunk["error"].get("message", "")[:200]}
            if (
                first is None
                and chunk.get("choices")
                and chunk["choices"][0]["delta"].get("content")
            ):
                first = time.perf_counter() - t0
            usage = chunk.get("usage") or usage
    return {
        "status": 200,
        "first_s": first,
        "total_s": time.perf_counter() - t0,
        "prompt_tokens": usage.get("prompt_tokens"),
        "completion_tokens": usage.get("completion_tokens"),
    }


def train_one_step(base: Path, work: Path, image: bytes, rank: int) -> dict:
    """The trainer's one optimizer step on one example with `image`, in a process of its own (its
    peak memory is its own)."""
    (work / "pic.jpg").write_bytes(image)
    example = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "pic.jpg"}},
                    {"type": "text", "text": "What does this page say?"},
                ],
            },
            {"role": "assistant", "content": "An invoice."},
        ]
    }
    (work / "train.jsonl").write_text(json.dumps(example) + "\n")
    script = (
        "import json, sys, time\n"
        "from lorafleet.train.config import load_config\n"
        "from lorafleet.train.trainer import train\n"
        f"config = load_config(base={str(base)!r}, train={str(work / 'train.jsonl')!r}, "
        f"out={str(work / 'adapter')!r}, max_steps=1, batch_size=1, rank={rank}, "
        "max_length=8192, warmup_steps=0)\n"
        "t0 = time.perf_counter()\n"
        "result = train(config, progress=False)\n"
        "print(json.dumps({'step_s': time.perf_counter() - t0, "
        "'peak_gib': result.peak_memory_mb / 1024}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False, cwd=work
    )
    if done.returncode != 0:
        last = done.stderr.strip().splitlines()[-1:] or ["no message"]
        return {"error": f"exit {done.returncode}: {last[0][:200]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def size_of(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def dims(text: str) -> tuple[int, int]:
    width, height = text.lower().split("x")
    return int(width), int(height)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--like", default="qwen2.5-vl-3b")
    parser.add_argument("--base", type=Path, help="build it here, or reuse the one built here")
    parser.add_argument("--image", default="1280x960", help="the real-size picture")
    parser.add_argument("--photo", default="4000x3000", help="a phone photo")
    parser.add_argument("--train-image", default="448x448")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-serve", action="store_true", help="the build and the trainer only")
    args = parser.parse_args()

    from lorafleet.adapters.pictures import picture_budget
    from lorafleet.serve.engine.sizing import Workload, sizing_for
    from lorafleet.serve.settings import Settings
    from lorafleet.train.real_size_base import build_real_size_base

    work = Path(tempfile.mkdtemp(prefix="lorafleet-real-size-"))
    base = args.base or work / "base"
    rows: list[tuple[str, str]] = []
    if not (base / "config.json").exists():
        with console.status(f"building {args.like} with random weights in {base}"):
            t0 = time.perf_counter()
            build_real_size_base(base, args.like)
            rows.append(("build the base (s)", f"{time.perf_counter() - t0:.0f}"))
    rows.append(("base on disk (GB)", f"{size_of(base) / 1e9:.2f}"))
    settings = Settings(base=str(base))
    budget = picture_budget(settings.base, settings.max_image_tokens, settings.max_model_len)
    rows.append(("picture budget", budget.describe() if budget else "the processor's own"))
    for label, workload in (
        ("nothing deployed", Workload()),
        (f"rank {args.rank} deployed", Workload(1, args.rank)),
    ):
        rows.append(
            (f"sizing, {label}", sizing_for(settings, False, "bfloat16", workload).describe())
        )

    if not args.skip_serve:
        serve(args, base, work, rows)
    if not args.skip_train:
        with console.status("the trainer's one step"):
            step = train_one_step(base, work, picture(*dims(args.train_image)), args.rank)
        if "error" in step:
            rows.append(("trainer, one step", f"failed: {step['error']}"))
        else:
            rows.append(
                (
                    f"trainer, one step on a {args.train_image} picture, rank {args.rank}",
                    f"{step['step_s']:.0f} s, peak {step['peak_gib']:.1f} GiB",
                )
            )

    table = Table(title=f"{args.like} (random weights) under lorafleet on this CPU, defaults")
    table.add_column("measure")
    table.add_column("value")
    for row in rows:
        table.add_row(*row)
    console.print(table)


def serve(args: argparse.Namespace, base: Path, work: Path, rows: list[tuple[str, str]]) -> None:
    """`lorafleet serve` on the base: start, a rank-64 adapter uploaded and deployed, chats."""
    from lorafleet.train.random_adapter import make_random_adapter

    with console.status(f"a rank-{args.rank} adapter on every linear layer of its language model"):
        adapter = make_random_adapter(base, work / "adapter", seed=1, rank=args.rank, std=0.02)
    rows.append((f"rank-{args.rank} adapter (MB)", f"{size_of(adapter) / 1e6:.0f}"))

    server = LocalServer.start(base, work / "home", tenant_rpm="100000")
    try:
        with console.status("the engine starting"), PeakRss(server.process.pid) as peak:
            ready_s = server.wait_ready(timeout=3600)
        rows.append(("start until ready (s)", f"{ready_s:.0f}"))
        rows.append(("memory while starting, peak (GiB)", f"{peak.peak / GIB:.1f}"))
        rows.append(("memory when ready (GiB)", f"{tree_rss(server.process.pid) / GIB:.1f}"))
        engine = httpx.get(
            f"{server.url}/admin/engine",
            headers={"Authorization": f"Bearer {server.admin_key}"},
            timeout=30,
        ).json()
        warm_up = engine.get("last_warm_up_s")
        rows.append(("warm-up request (s)", f"{warm_up:.1f}" if warm_up is not None else "-"))
        key = LorafleetClient(server.url, server.admin_key).create_tenant("bench")["api_key"]
        tenant = LorafleetClient(server.url, key, timeout=3600)
        with console.status("pack + upload"):
            t0 = time.perf_counter()
            try:
                tenant.push_adapter("big", adapter)
                rows.append(
                    ("pack + upload + validate + store (s)", f"{time.perf_counter() - t0:.1f}")
                )
            except Exception as exc:  # the finding is the error a user gets
                rows.append(("pack + upload + validate + store", f"refused: {exc}"[:200]))
        name = "big"
        if not any(a["name"] == "big" for a in tenant.list_adapters()):  # refused: a small one
            name = "small"
            tenant.push_adapter(name, make_random_adapter(base, work / "small", seed=2, std=0.02))
        with console.status("deploy (a derived rank grows: the engine restarts)"):
            t0 = time.perf_counter()
            tenant.deploy("doc", f"{name}@1")
            server.wait_ready(timeout=3600)
            rows.append(
                (f"deploy {name}@1 incl. any engine restart (s)", f"{time.perf_counter() - t0:.0f}")
            )
        for label, size in (
            (f"{args.train_image} picture", args.train_image),
            (f"{args.image} picture", args.image),
            (f"{args.photo} photo", args.photo),
        ):
            with console.status(f"chat with a {label}"), PeakRss(server.process.pid) as peak:
                result = chat(server.url, key, "doc", picture(*dims(size)))
            if "error" in result:
                outcome = f"{result['status']}: {result['error']}"
            else:
                first = result["first_s"]  # None: no token with text (an answer of whitespace)
                outcome = (
                    f"{result['prompt_tokens']} prompt tokens, first token "
                    f"{'-' if first is None else f'{first:.1f}'} s, "
                    f"{result['completion_tokens']} tokens in {result['total_s']:.1f} s"
                )
            rows.append((f"chat, {label}", f"{outcome}; memory peak {peak.peak / GIB:.1f} GiB"))
            console.print(*rows[-1], sep=": ")  # as it comes: the whole table prints at the end
        rows.append(("memory after the chats (GiB)", f"{tree_rss(server.process.pid) / GIB:.1f}"))
    finally:
        server.stop()


if __name__ == "__main__":
    main()

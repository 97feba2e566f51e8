"""`make demo`: the whole path on the embedded defaults, on this machine, with no download.

Builds the tiny Qwen2.5-VL, makes two LoRA adapters, starts `lorafleet serve`, creates two tenants,
uploads and deploys one adapter each, chats with an image through the `openai` SDK, hot-swaps a
version, and prints what each tenant got back.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import sys
import time
from pathlib import Path

from PIL import Image, ImageDraw
from rich.console import Console
from rich.table import Table

from .client import LorafleetClient
from .local_server import LocalServer

console = Console(width=None if sys.stdout.isatty() else 110)


def _circle_image() -> str:
    image = Image.new("RGB", (112, 112), "white")
    ImageDraw.Draw(image).ellipse((20, 20, 92, 92), fill="red")
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _prepare(work: Path) -> tuple[Path, list[Path]]:
    from train.random_adapter import make_random_adapter
    from train.tiny_model import build_tiny_model

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with console.status("building the tiny Qwen2.5-VL and three LoRA adapters"):
        base = build_tiny_model(work / "tiny-model")
        adapters = [make_random_adapter(base, work / f"adapter-{seed}", seed=seed) for seed in (1, 2, 3)]
    return base, adapters


def _start_server(base: Path, home: Path) -> LocalServer:
    server = LocalServer.start(base, home, max_model_len="512")
    with console.status("starting the gateway and its vLLM engine (about a minute on CPU)"):
        seconds = server.wait_ready()
    console.print(f"server ready in {seconds:.0f} s on {server.url}")
    return server


def _ask(url: str, api_key: str, image: str) -> tuple[str, str, float]:
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key=api_key)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                             {"type": "text", "text": "What is in the image?"}]}]
    t0 = time.perf_counter()
    raw = client.chat.completions.with_raw_response.create(model="assistant", messages=messages, max_tokens=12,
                                                           temperature=0)
    reply = raw.parse().choices[0].message.content or ""
    return reply, raw.headers["x-lorafleet-adapter"], time.perf_counter() - t0


def main() -> None:
    work = Path(os.environ.get("LORAFLEET_DEMO_DIR", Path.home() / ".lorafleet" / "demo")).expanduser()
    shutil.rmtree(work, ignore_errors=True)
    (work / "home").mkdir(parents=True)
    base, adapters = _prepare(work)
    server = _start_server(base, work / "home")
    url = server.url
    try:
        admin = LorafleetClient(url, server.admin_key)
        image = _circle_image()
        table = Table("tenant", "model=assistant serves", "digest", "reply (random weights)", "latency")
        keys = {}
        for tenant, adapter in (("acme", adapters[0]), ("globex", adapters[1])):
            keys[tenant] = admin.create_tenant(tenant)["api_key"]
            client = LorafleetClient(url, keys[tenant])
            version = client.push_adapter("captioner", adapter)
            client.deploy("assistant", "captioner")
            reply, digest, seconds = _ask(url, keys[tenant], image)
            table.add_row(tenant, f"captioner@{version['version']}", digest[:12], repr(reply)[:28],
                          f"{seconds * 1000:.0f} ms")
        acme = LorafleetClient(url, keys["acme"])  # hot swap: a new version, served on the next request
        version = acme.push_adapter("captioner", adapters[2])
        acme.deploy("assistant", f"captioner@{version['version']}")
        reply, digest, seconds = _ask(url, keys["acme"], image)
        table.add_row("acme, swapped", f"captioner@{version['version']}", digest[:12], repr(reply)[:28],
                      f"{seconds * 1000:.0f} ms")
        console.print(table)
        console.print(f"state and logs: {work}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()

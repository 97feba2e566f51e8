"""What the gateway costs over vLLM alone, measured side by side in one run.

Starts `lorafleet serve` (gateway + engine) and, beside it, a second vLLM server started with the same
command line (`lorafleet.serve.engine.command.engine_command`) and the same adapters registered directly.
Rounds alternate between the two so that machine noise hits both alike; the table reports each and their ratio.

    .venv/bin/python loadtests/bench_gateway.py [--adapters 8] [--rounds 3] [--requests 96] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import secrets
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
from PIL import Image
from rich.console import Console
from rich.table import Table

from lorafleet.chat import image_data_url
from lorafleet.serve.client import LorafleetClient
from lorafleet.serve.dev.local_server import LocalServer
from lorafleet.serve.engine.command import engine_command, free_port
from lorafleet.serve.engine.hardware import quantization_for
from lorafleet.serve.settings import Settings

console = Console()


def _image() -> str:
    return image_data_url(Image.new("RGB", (64, 64), (200, 30, 30)))


def _wait_healthy(url: str, process: subprocess.Popen) -> float:
    t0 = time.perf_counter()
    while process.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return time.perf_counter() - t0
        except httpx.HTTPError:
            time.sleep(0.25)
    raise SystemExit(f"vLLM exited with {process.returncode}")


async def scenario(url: str, key: str, models: list[str], n: int, concurrency: int, seed: int) -> dict:
    body = {"max_tokens": 16, "temperature": 0, "ignore_eos": True,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _image()}},
                                                      {"type": "text", "text": "What is this?"}]}]}
    rng, gate = random.Random(seed), asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=300) as client:
        async def one(model: str) -> None:
            async with gate:
                t0 = time.perf_counter()
                response = await client.post("/v1/chat/completions", json={**body, "model": model})
                response.raise_for_status()
                latencies.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(one(rng.choice(models)) for _ in range(n)))
        elapsed = time.perf_counter() - t0
    latencies.sort()
    return {"rps": n / elapsed, "p50": latencies[len(latencies) // 2], "p99": latencies[int(len(latencies) * 0.99)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()

    from lorafleet.train.random_adapter import make_random_adapter
    from lorafleet.train.tiny_model import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="lorafleet-bench-"))
    with console.status("building the tiny model and adapters"):
        base = build_tiny_model(work / "tiny")
        adapter_dirs = [make_random_adapter(base, work / f"a{i}", seed=i) for i in range(args.adapters)]

    vllm_port, token = free_port(), secrets.token_urlsafe(16)
    settings = Settings(base=str(base), max_model_len=512, dtype="float32", max_lora_rank=16)
    gateway = direct = None
    try:
        with console.status("starting lorafleet serve"):
            gateway = LocalServer.start(base, work / "home", max_model_len="512", dtype="float32", max_lora_rank="16")
            gateway_ready_s = gateway.wait_ready()
            gw_url = gateway.url
        with console.status("starting vLLM alone"):
            cmd, vllm_env = engine_command(settings, vllm_port, token, False, quantization_for(settings)[1])
            direct = subprocess.Popen(cmd, env=vllm_env, stdout=open(work / "vllm.log", "wb"), stderr=subprocess.STDOUT)
            vllm_url = f"http://127.0.0.1:{vllm_port}"
            vllm_ready_s = _wait_healthy(vllm_url, direct)

        admin = LorafleetClient(gw_url, gateway.admin_key)
        key = admin.create_tenant("bench")["api_key"]
        tenant = LorafleetClient(gw_url, key)
        upload_s, digests, deploy_s = [], [], []
        for i, folder in enumerate(adapter_dirs):
            t0 = time.perf_counter()
            digests.append(tenant.push_adapter(f"a{i}", folder)["digest"])
            upload_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            tenant.deploy(f"d{i}", f"a{i}")  # includes registering the adapter on the engine
            deploy_s.append(time.perf_counter() - t0)
        direct_load_s = []
        with httpx.Client(base_url=vllm_url, headers={"Authorization": f"Bearer {token}"}) as http:
            for digest in digests:
                t0 = time.perf_counter()
                http.post("/v1/load_lora_adapter", json={"lora_name": digest,
                                                         "lora_path": str(work / "home" / "adapters" / digest)}
                          ).raise_for_status()
                direct_load_s.append(time.perf_counter() - t0)

        deployments = [f"d{i}" for i in range(args.adapters)]
        runs: dict[tuple[str, str], list[dict]] = {}
        for r in range(args.rounds + 1):  # round 0 warms both up and is not counted
            for label, conc, n in (("1 client", 1, max(16, args.requests // 4)),
                                   (f"{args.concurrency} clients", args.concurrency, args.requests)):
                for side, url, auth, models in (("gateway", gw_url, key, deployments),
                                                ("vllm", vllm_url, token, digests)):
                    result = asyncio.run(scenario(url, auth, models, n, conc, seed=r))
                    if r:
                        runs.setdefault((label, side), []).append(result)

        def med(label: str, side: str, field: str) -> float:
            return statistics.median(x[field] for x in runs[(label, side)])

        table = Table(title=f"tiny Qwen2.5-VL, {args.adapters} adapters, CPU, median of {args.rounds} rounds")
        for column in ("measure", "lorafleet gateway", "vLLM alone", "ratio"):
            table.add_column(column, justify="right")
        table.add_row("ready after start (s)", f"{gateway_ready_s:.1f}", f"{vllm_ready_s:.1f}",
                      f"{gateway_ready_s / vllm_ready_s:.2f}")
        table.add_row("adapter upload: validate + store (ms)", f"{statistics.median(upload_s) * 1000:.0f}", "-", "-")
        table.add_row("deploy incl. engine registration (ms)", f"{statistics.median(deploy_s) * 1000:.0f}",
                      f"{statistics.median(direct_load_s) * 1000:.0f}",
                      f"{statistics.median(deploy_s) / statistics.median(direct_load_s):.2f}")
        for label in ("1 client", f"{args.concurrency} clients"):
            for field, unit, scale in (("p50", "ms", 1000), ("p99", "ms", 1000), ("rps", "req/s", 1)):
                g, v = med(label, "gateway", field), med(label, "vllm", field)
                table.add_row(f"{label}: {field} ({unit})", f"{g * scale:.1f}", f"{v * scale:.1f}", f"{g / v:.2f}")
        console.print(table)
    finally:
        if gateway:
            gateway.stop()
        if direct:
            direct.terminate()
            direct.wait(60)

if __name__ == "__main__":
    main()

"""What the benchmarks share: the load they drive, where it runs, how they wait, and how results are
summarised.

On a small machine one-shot numbers say little: vLLM's scheduler and worker busy-poll for about a
second after each burst, and which processes share a session (and so a scheduler autogroup) changes
who gets the CPU. So a phase starts only when the servers have gone idle (`wait_idle`, a condition,
not a sleep), rounds alternate between the sides being compared, and results are medians with their
spread over rounds.

The load generator can run in its own process (`run_load(..., own_session=True)`), as when a user
starts the server and the client from different terminals.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import psutil
from PIL import Image

from lorafleet.chat_jsonl import image_data_url

__all__ = [
    "BENCH_LIMITS",
    "Phase",
    "scenario",
    "run_load",
    "wait_idle",
    "own_cpu_s",
    "tree_cpu_s",
    "tree_rss",
    "tree_open_files",
    "spread",
    "chat_body",
    "wait_healthy",
    "engine_child",
    "vllm_bench_serve",
]


# The benchmark's one tenant sends more than a tenant's default limits allow (thousands of requests
# a minute, every client's next request arriving as the last one's slot is released): limits far
# above the load, still checked.
BENCH_LIMITS = {
    "tenant_rpm": str(10**9),
    "tenant_tpm": str(10**12),
    "tenant_concurrency": str(10**6),
}


def chat_body(max_tokens: int = 16, stream: bool = False) -> dict:
    """One image and a short question; `ignore_eos` so every answer costs the same tokens."""
    image = image_data_url(Image.new("RGB", (64, 64), (200, 30, 30)))
    body = {
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image}},
                    {"type": "text", "text": "What is this?"},
                ],
            }
        ],
    }
    return {**body, "stream": True} if stream else body


@dataclass
class Phase:
    """One load phase: n requests, at most `concurrency` in flight."""

    rps: float
    p50: float
    p99: float
    ttft_p50: float | None = None
    failed: int = 0
    ok: int = 0
    # what failed requests got: a status, or an error's name
    errors: dict[str, int] = field(default_factory=dict)


async def scenario(
    url: str,
    key: str,
    models: list[str],
    n: int,
    concurrency: int,
    seed: int,
    stream: bool = False,
    extra: dict | None = None,
    plan: list[tuple[str, str]] | None = None,
) -> dict:
    """Drive the load in this process; models are drawn uniformly (seeded), or each request's
    (key, model) is `plan`'s next one (many tenants); `extra` fields join every request's body.
    Returns Phase's fields."""
    body = {**chat_body(stream=stream), **(extra or {})}
    rng, gate = random.Random(seed), asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    ttfts: list[float] = []
    failed = 0
    errors: Counter[str] = Counter()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=300, limits=limits
    ) as client:

        async def one(model: str, auth: str | None = None) -> None:
            nonlocal failed
            headers = {"Authorization": f"Bearer {auth}"} if auth else None
            async with gate:
                t0 = time.perf_counter()
                try:
                    if stream:
                        async with client.stream(
                            "POST",
                            "/v1/chat/completions",
                            json={**body, "model": model},
                            headers=headers,
                        ) as response:
                            first = None
                            async for line in response.aiter_lines():
                                if first is None and line.startswith("data: {"):
                                    first = time.perf_counter() - t0
                            ok = response.status_code == 200 and first is not None
                            if ok:
                                ttfts.append(first)
                    else:
                        response = await client.post(
                            "/v1/chat/completions", json={**body, "model": model}, headers=headers
                        )
                        ok = response.status_code == 200
                    error = str(response.status_code)
                except httpx.HTTPError as exc:
                    ok, error = False, type(exc).__name__
                if ok:
                    latencies.append(time.perf_counter() - t0)
                else:
                    failed += 1
                    errors[error] += 1

        t0 = time.perf_counter()
        if plan is not None:
            await asyncio.gather(*(one(model, auth) for auth, model in plan))
        else:
            await asyncio.gather(*(one(rng.choice(models)) for _ in range(n)))
        elapsed = time.perf_counter() - t0
    latencies.sort()
    if not latencies:
        return asdict(Phase(0.0, float("nan"), float("nan"), None, failed, 0, dict(errors)))
    return asdict(
        Phase(
            rps=len(latencies) / elapsed,
            p50=latencies[len(latencies) // 2],
            p99=latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
            ttft_p50=statistics.median(ttfts) if ttfts else None,
            failed=failed,
            ok=len(latencies),
            errors=dict(errors),
        )
    )


def run_load(
    url: str,
    key: str,
    models: list[str],
    n: int,
    concurrency: int,
    seed: int,
    *,
    stream: bool = False,
    own_session: bool = False,
    extra: dict | None = None,
    plan: list[tuple[str, str]] | None = None,
) -> Phase:
    """The same load from a child process of its own; `own_session` puts it in a session (and
    autogroup) of its own, as a client started from another terminal is."""
    spec = json.dumps(
        {
            "url": url,
            "key": key,
            "models": models,
            "n": n,
            "concurrency": concurrency,
            "seed": seed,
            "stream": stream,
            "extra": extra,
            "plan": plan,
        }
    )
    done = subprocess.run(
        [sys.executable, __file__, spec],
        capture_output=True,
        text=True,
        start_new_session=own_session,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the load generator failed:\n{done.stderr[-2000:]}")
    return Phase(**json.loads(done.stdout.strip().splitlines()[-1]))


def own_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by one process alone."""
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by a process and everything it started."""
    return _tree_total(pid, lambda p: sum(p.cpu_times()[:2]))


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and everything it started."""
    return int(_tree_total(pid, lambda p: p.memory_info().rss))


def tree_open_files(pid: int) -> int:
    """File descriptors open in a process and everything it started."""
    return int(_tree_total(pid, lambda p: p.num_fds()))


def _tree_total(pid: int, read: Callable[[psutil.Process], float]) -> float:
    """`read` summed over a process and its descendants (those that exit meanwhile count 0)."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for process in processes:
        try:
            total += read(process)
        except psutil.NoSuchProcess:
            pass
    return total


def wait_idle(
    pids: list[int], below: float = 0.05, window_s: float = 0.25, timeout_s: float = 15.0
) -> float:
    """Wait until these process trees together use less than `below` of a core over a window
    (vLLM's pollers have stopped spinning); return the seconds waited."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        before = sum(tree_cpu_s(pid) for pid in pids)
        time.sleep(window_s)
        if (sum(tree_cpu_s(pid) for pid in pids) - before) / window_s < below:
            break
    return time.perf_counter() - t0


def wait_healthy(
    url: str, process: subprocess.Popen, path: str = "/health", timeout_s: float = 600
) -> float:
    t0 = time.perf_counter()
    while process.poll() is None and time.perf_counter() - t0 < timeout_s:
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise SystemExit(f"{url} did not become healthy (exit code {process.poll()})")


def engine_child(gateway_pid: int, timeout_s: float = 600) -> psutil.Process:
    """The vLLM API server a gateway started (its command line and environment are the engine's
    exact ones)."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        for child in psutil.Process(gateway_pid).children():
            if "vllm.entrypoints.openai.api_server" in " ".join(child.cmdline()):
                return child
        time.sleep(0.25)
    raise SystemExit("the gateway started no engine")


def spread(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    """Median and [min–max] over rounds."""
    if not values:
        return "-"
    return (
        f"{statistics.median(values) * scale:.{digits}f} "
        f"[{min(values) * scale:.{digits}f}–{max(values) * scale:.{digits}f}]"
    )


def vllm_bench_serve(
    url: str, key: str, model: str, tokenizer: str, prompts: int, concurrency: int, out: Path
) -> dict:
    """vLLM's own benchmark client (`vllm bench serve`, random text + one 64×64 image per
    request, chat endpoint) against `url`: a load generator lorafleet did not write. Returns its
    result JSON."""
    code = (
        "import sys; from vllm.benchmarks.serve import add_cli_args, main;"
        "from vllm.utils.argparse_utils import FlexibleArgumentParser;"
        "p = FlexibleArgumentParser(); add_cli_args(p); main(p.parse_args(sys.argv[1:]))"
    )
    args = [
        "--backend",
        "openai-chat",
        "--base-url",
        url,
        "--endpoint",
        "/v1/chat/completions",
        "--model",
        model,
        "--tokenizer",
        tokenizer,
        "--dataset-name",
        "random-mm",
        "--random-input-len",
        "16",
        "--random-output-len",
        "16",
        "--random-range-ratio",
        "0",
        "--random-mm-base-items-per-request",
        "1",
        "--random-mm-num-mm-items-range-ratio",
        "0",
        "--random-mm-limit-mm-per-prompt",
        '{"image": 1}',
        "--random-mm-bucket-config",
        "{(64, 64, 1): 1.0}",
        "--ignore-eos",
        "--num-prompts",
        str(prompts),
        "--max-concurrency",
        str(concurrency),
        "--request-rate",
        "inf",
        "--disable-tqdm",
        "--save-result",
        "--result-dir",
        str(out.parent),
        "--result-filename",
        out.name,
        "--seed",
        "0",
    ]
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "OPENAI_API_KEY": key},
    )
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(
            f"vllm bench serve failed:\n{done.stdout[-1500:]}\n{done.stderr[-2500:]}"
        )
    return json.loads(out.read_text())


if __name__ == "__main__":  # the load generator's child process (run_load)
    parser = argparse.ArgumentParser()
    parser.add_argument("spec")
    spec = json.loads(parser.parse_args().spec)
    print(json.dumps(asyncio.run(scenario(**spec))))

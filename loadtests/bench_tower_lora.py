"""What vLLM's tower and connector LoRA costs an engine: two `lorafleet serve` side by side on the
tiny base, one whose engine runs with `--enable-tower-connector-lora`, one without, serving the
same language-model adapters. Reports each engine's start (to ready), its memory once ready, and
throughput and latency at 16 clients over alternating rounds (the median of per-round ratios with
[min–max]).

    .venv/bin/python loadtests/bench_tower_lora.py [--rounds 4] [--requests 256] [--clients 16]
        [--adapters 8]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from harness import BENCH_LIMITS, Phase, engine_child, run_load, spread, tree_rss, wait_idle
from rich.console import Console
from rich.table import Table

from lorafleet.serve.dev.local_server import LocalServer
from lorafleet.serve.gateway_client import LorafleetClient

console = Console(width=160)
SIDES = ("off", "on")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=8)
    args = parser.parse_args()

    from lorafleet.train.random_adapter import make_random_adapter
    from lorafleet.train.tiny_model import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="lorafleet-tower-"))
    with console.status(f"building the tiny model and {args.adapters} adapters"):
        base = build_tiny_model(work / "tiny")
        folders = [make_random_adapter(base, work / f"a{i}", seed=i) for i in range(args.adapters)]
    servers: dict[str, LocalServer] = {}
    ready_s: dict[str, float] = {}
    try:
        for side in SIDES:  # one after the other: a start is timed on an otherwise idle machine
            servers[side] = LocalServer.start(
                base,
                work / f"home-{side}",
                max_model_len="512",
                dtype="float32",
                tower_lora=side,
                **BENCH_LIMITS,
            )
            with console.status(f"starting the engine with tower LoRA {side}"):
                ready_s[side] = servers[side].wait_ready()
        rss = {side: tree_rss(engine_child(s.process.pid).pid) for side, s in servers.items()}
        keys, models = {}, [f"d{i}" for i in range(args.adapters)]
        for side, server in servers.items():
            keys[side] = LorafleetClient(server.url, server.admin_key).create_tenant("bench")[
                "api_key"
            ]
            tenant = LorafleetClient(server.url, keys[side])
            for i, folder in enumerate(folders):
                tenant.push_adapter(f"a{i}", folder)
                tenant.deploy(models[i], f"a{i}")
        pids = [s.process.pid for s in servers.values()]
        runs: dict[str, list[Phase]] = {side: [] for side in SIDES}
        for r in range(args.rounds + 1):  # round 0 warms up
            for side in SIDES if r % 2 else SIDES[::-1]:
                wait_idle(pids)
                with console.status(f"round {r}: tower LoRA {side}"):
                    phase = run_load(
                        servers[side].url, keys[side], models, args.requests, args.clients, seed=r
                    )
                if phase.failed:
                    raise RuntimeError(f"{phase.failed} requests failed: {phase.errors}")
                if r:
                    runs[side].append(phase)
    finally:
        for server in servers.values():
            server.stop()

    ratios = [on.rps / off.rps for on, off in zip(runs["on"], runs["off"])]
    p50s = [on.p50 / off.p50 for on, off in zip(runs["on"], runs["off"])]
    table = Table(
        title=f"tower/connector LoRA on vs off: {args.adapters} language-model adapters, "
        f"{args.clients} clients, {args.requests} requests × {args.rounds} rounds"
    )
    for column in ("", "off", "on", "on ÷ off"):
        table.add_column(column, justify="right")
    table.add_row(
        "start to ready (s)",
        f"{ready_s['off']:.1f}",
        f"{ready_s['on']:.1f}",
        f"{ready_s['on'] / ready_s['off']:.2f}",
    )
    table.add_row(
        "engine memory once ready (MiB)",
        f"{rss['off'] / 2**20:.0f}",
        f"{rss['on'] / 2**20:.0f}",
        f"{rss['on'] / rss['off']:.3f}",
    )
    table.add_row(
        "requests/s",
        spread([p.rps for p in runs["off"]]),
        spread([p.rps for p in runs["on"]]),
        f"{statistics.median(ratios):.3f} [{min(ratios):.3f}–{max(ratios):.3f}]",
    )
    table.add_row(
        "p50 latency (ms)",
        spread([p.p50 for p in runs["off"]], 1000, 0),
        spread([p.p50 for p in runs["on"]], 1000, 0),
        f"{statistics.median(p50s):.3f} [{min(p50s):.3f}–{max(p50s):.3f}]",
    )
    console.print(table)


if __name__ == "__main__":
    main()

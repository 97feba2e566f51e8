"""A batch beside live traffic, through one `lorafleet serve` on the tiny base: does live latency
stay within 1.2x of live latency alone, and how much of the engine's idle capacity does the batch
use?

Each round, alternating: live alone (`--clients` clients send `--requests` requests), the batch
alone (`--lines` lines: the engine's capacity with nothing else to do), and both at once (the
batch submitted, the live load started once it runs, the batch followed to its end). Every request
and line is the same question about a picture with `ignore_eos`, so each costs the same tokens.

    .venv/bin/python loadtests/bench_batches.py [--base DIR] [--rounds 3] [--clients 4]
        [--requests 96] [--lines 192] [--share 0.05]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from harness import BENCH_LIMITS, Phase, chat_body, run_load, spread, wait_idle
from rich.console import Console
from rich.table import Table

from lorafleet.serve.dev.local_server import LocalServer
from lorafleet.serve.gateway_client import LorafleetClient

console = Console(width=160)


def _batch_file(lines: int) -> bytes:
    body = {**chat_body(max_tokens=16), "model": "reader"}
    return (
        "\n".join(
            json.dumps(
                {
                    "custom_id": f"l{i}",
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": body,
                }
            )
            for i in range(lines)
        )
        + "\n"
    ).encode()


def _run_batch(client: LorafleetClient, file_id: str) -> tuple[str, float]:
    """Create a batch of the file; return its id and when it started running."""
    batch = client.create_batch(file_id)
    while (state := client.batch(batch["id"]))["status"] == "validating":
        time.sleep(0.05)
    return batch["id"], float(state["in_progress_at"] or time.time())


def _wait_done(client: LorafleetClient, batch_id: str) -> tuple[float, dict]:
    while (state := client.batch(batch_id))["status"] not in ("completed", "failed", "cancelled"):
        time.sleep(0.2)
    assert state["status"] == "completed", state
    return time.time(), state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--lines", type=int, default=192)
    parser.add_argument("--share", type=float, default=0.05, help="LORAFLEET_BATCH_SHARE")
    args = parser.parse_args()

    from lorafleet.train.random_adapter import make_random_adapter
    from lorafleet.train.tiny_model import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="lorafleet-batches-"))
    base = args.base or build_tiny_model(work / "tiny", pretrain_steps=0)
    adapter = make_random_adapter(base, work / "adapter", seed=1, std=0.0005)
    server = LocalServer.start(
        base, work / "home", **BENCH_LIMITS, batch_share=str(args.share), batch_tick_s="0.2"
    )
    try:
        console.print(f"gateway ready in {server.wait_ready():.0f} s")
        admin = LorafleetClient(server.url, server.admin_key)
        key = admin.create_tenant("bench")["api_key"]
        client = LorafleetClient(server.url, key)
        client.push_adapter("ext", adapter)
        client.deploy("reader", "ext@1")
        file_id = client.upload_file(_batch_file(args.lines), "bench.jsonl")["id"]
        pids = [server.process.pid]
        live_alone: list[Phase] = []
        live_beside: list[Phase] = []
        batch_alone: list[float] = []  # lines/s
        batch_beside: list[float] = []
        run_load(server.url, key, ["reader"], 16, 4, seed=0)  # warm-up
        for r in range(args.rounds):
            wait_idle(pids)
            live_alone.append(
                run_load(server.url, key, ["reader"], args.requests, args.clients, seed=r)
            )
            wait_idle(pids)
            batch_id, started = _run_batch(client, file_id)
            ended, _ = _wait_done(client, batch_id)
            batch_alone.append(args.lines / (ended - started))
            wait_idle(pids)
            batch_id, started = _run_batch(client, file_id)
            live_beside.append(
                run_load(server.url, key, ["reader"], args.requests, args.clients, seed=r)
            )
            ended, _ = _wait_done(client, batch_id)
            batch_beside.append(args.lines / (ended - started))
            console.print(
                f"round {r + 1}: live p50 {live_alone[-1].p50 * 1000:.0f} -> "
                f"{live_beside[-1].p50 * 1000:.0f} ms; batch {batch_alone[-1]:.1f} -> "
                f"{batch_beside[-1]:.1f} lines/s"
            )
    finally:
        server.stop()

    p50_ratio = [b.p50 / a.p50 for a, b in zip(live_alone, live_beside)]
    p99_ratio = [b.p99 / a.p99 for a, b in zip(live_alone, live_beside)]
    table = Table(
        title=f"A batch of {args.lines} lines beside {args.clients} live clients "
        f"(batch_share {args.share}; median [min–max] of {args.rounds} rounds)"
    )
    for column in ("", "alone", "with the other", "ratio"):
        table.add_column(column)
    table.add_row(
        "live p50 latency (ms)",
        spread([p.p50 for p in live_alone], 1000, 0),
        spread([p.p50 for p in live_beside], 1000, 0),
        spread(p50_ratio, 1, 3),
    )
    table.add_row(
        "live p99 latency (ms)",
        spread([p.p99 for p in live_alone], 1000, 0),
        spread([p.p99 for p in live_beside], 1000, 0),
        spread(p99_ratio, 1, 3),
    )
    table.add_row(
        "live requests/s",
        spread([p.rps for p in live_alone]),
        spread([p.rps for p in live_beside]),
        spread([b.rps / a.rps for a, b in zip(live_alone, live_beside)], 1, 3),
    )
    table.add_row(
        "batch lines/s (alone: the engine's idle capacity)",
        spread(batch_alone),
        spread(batch_beside),
        spread([b / a for a, b in zip(batch_alone, batch_beside)], 1, 3),
    )
    console.print(table)
    failed = sum(p.failed for p in live_alone + live_beside)
    console.print(
        f"live p50 with a batch / alone: {statistics.median(p50_ratio):.3f} (target <= 1.2); "
        f"failed live requests: {failed}"
    )


if __name__ == "__main__":
    main()

"""Fair share under saturation: tenant A floods the engine, tenant B sends one request at a time.

One `lorafleet serve` (tiny Qwen2.5-VL on CPU, engine sizing derived), two tenants with a deployment
each, their rate and concurrency limits lifted so that only the fair queue stands between them. Per
round, alternating: B alone (its p50 latency), A alone (the engine's throughput), then A and B
together. Goals: B's p50 together ÷ alone ≤ 1.5, and the engine's throughput together ÷ A alone ≥
0.95. Each A concurrency runs twice: with the fair queue (`LORAFLEET_ENGINE_SLOTS` = 0, the engine's
batch size) and without it (slots far above what the engine takes, so vLLM's first-come-first-served
queue decides), side by side on the same engine.

    .venv/bin/python loadtests/bench_fairness.py [--rounds 3] [--flood 64 256] [--b-requests 12]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

from harness import Phase, run_load, spread, wait_idle
from rich.console import Console
from rich.table import Table

from lorafleet.serve.dev.local_server import LocalServer
from lorafleet.serve.gateway_client import LorafleetClient

console = Console(width=160)
UNLIMITED = {"rpm": 0, "tpm": 0, "concurrency": 0}


def in_flight(admin: LorafleetClient) -> int:
    admission = admin._call("GET", "/admin/engine")["admission"]
    return admission["in_engine"] + admission["waiting"]


def together(
    server: LocalServer, a: str, b: str, flood: int, a_requests: int, b_requests: int, seed: int
) -> tuple[Phase, Phase]:
    """A's flood and B's one-at-a-time requests at once; B starts once all of A's clients are in
    flight."""
    result: dict[str, Phase] = {}
    flood_thread = threading.Thread(
        target=lambda: result.__setitem__(
            "a", run_load(server.url, a, ["a"], a_requests, flood, seed)
        )
    )
    flood_thread.start()
    admin, deadline = LorafleetClient(server.url, server.admin_key), time.monotonic() + 60
    while in_flight(admin) < flood and time.monotonic() < deadline:
        time.sleep(0.05)
    result["b"] = run_load(server.url, b, ["b"], b_requests, 1, seed)
    flood_thread.join()
    return result["a"], result["b"]


def measure(
    server: LocalServer, keys: dict[str, str], flood: int, rounds: int, b_requests: int
) -> dict:
    pids = [server.process.pid]
    a_requests = flood * 16  # A outlasts B's requests, with or without the fair queue
    runs: dict[str, list] = {"b_alone": [], "a_alone": [], "a_with": [], "b_with": []}
    for r in range(rounds + 1):  # round 0 warms up
        wait_idle(pids)
        b_alone = run_load(server.url, keys["b"], ["b"], b_requests, 1, seed=r)
        wait_idle(pids)
        a_alone = run_load(server.url, keys["a"], ["a"], a_requests, flood, seed=r)
        wait_idle(pids)
        a_with, b_with = together(
            server, keys["a"], keys["b"], flood, a_requests, b_requests, seed=r
        )
        if r:
            for name, phase in (
                ("b_alone", b_alone),
                ("a_alone", a_alone),
                ("a_with", a_with),
                ("b_with", b_with),
            ):
                runs[name].append(phase)
    return runs


def start(base: Path, home: Path, slots: int) -> tuple[LocalServer, dict[str, str]]:
    server = LocalServer.start(
        base, home, max_model_len="512", dtype="float32", engine_slots=str(slots)
    )
    server.wait_ready()
    admin = LorafleetClient(server.url, server.admin_key)
    return server, {name: admin.create_tenant(name)["api_key"] for name in ("a", "b")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--flood", type=int, nargs="+", default=[64, 256], help="tenant A's concurrent requests"
    )
    parser.add_argument("--b-requests", type=int, default=12)
    args = parser.parse_args()

    from lorafleet.train.random_adapter import make_random_adapter
    from lorafleet.train.tiny_model import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="lorafleet-fairness-"))
    with console.status("building the tiny model and two adapters"):
        base = build_tiny_model(work / "tiny")
        folders = {
            name: make_random_adapter(base, work / name, seed=seed)
            for seed, name in enumerate("ab")
        }
    results = {}
    for fair, slots in (("fair queue", 0), ("no fair queue", 100_000)):
        server, keys = start(base, work / f"home-{slots}", slots)
        try:
            admin = LorafleetClient(server.url, server.admin_key)
            for name, key in keys.items():
                admin.set_limits(name, UNLIMITED)
                tenant = LorafleetClient(server.url, key)
                tenant.push_adapter(name, folders[name])
                tenant.deploy(name, name)
            for flood in args.flood:
                results[(fair, flood)] = measure(server, keys, flood, args.rounds, args.b_requests)
        finally:
            server.stop()

    table = Table(
        title=f"tiny Qwen2.5-VL on CPU; A floods, B one at a time; {args.rounds} rounds "
        "— median [min–max]"
    )
    for column in (
        "A clients",
        "gateway",
        "B p50 alone (ms)",
        "B p50 with A (ms)",
        "B p50 ratio (goal ≤ 1.5)",
        "A alone req/s",
        "A + B req/s",
        "throughput ratio (goal ≥ 0.95)",
        "failed",
    ):
        table.add_column(column, justify="right")
    for (fair, flood), runs in results.items():
        b_ratio = [w.p50 / a.p50 for w, a in zip(runs["b_with"], runs["b_alone"])]
        kept = [
            (aw.rps + bw.rps) / aa.rps
            for aw, bw, aa in zip(runs["a_with"], runs["b_with"], runs["a_alone"])
        ]
        failed = sum(p.failed for side in runs.values() for p in side)
        table.add_row(
            str(flood),
            fair,
            spread([p.p50 for p in runs["b_alone"]], 1000, 0),
            spread([p.p50 for p in runs["b_with"]], 1000, 0),
            spread(b_ratio, digits=2),
            spread([p.rps for p in runs["a_alone"]]),
            spread([aw.rps + bw.rps for aw, bw in zip(runs["a_with"], runs["b_with"])]),
            spread(kept, digits=3),
            str(failed),
        )
    console.print(table)
    ratios = {
        key: statistics.median(w.p50 / a.p50 for w, a in zip(r["b_with"], r["b_alone"]))
        for key, r in results.items()
    }
    console.print(
        "B p50 ratio by arrangement: "
        + ", ".join(f"{k[0]} @{k[1]}: {v:.2f}" for k, v in ratios.items())
    )


if __name__ == "__main__":
    main()

"""What quantizing the base costs: the same adapters on the full-precision, int8 and int4 base, side
by side.

The demo's tasks on the tiny pre-trained Qwen2.5-VL: a JSON adapter (acme) and a
one-word-French-colour adapter (globex), both trained on the FULL-PRECISION base, plus an adapter
that changes nothing (the base itself, on the general task). Three `lorafleet serve` run at once on
the same machine: the full-precision base, and the int8 and int4 checkpoints `lorafleet quantize`
wrote from it. For each: every deployment's validation set replayed through the gateway (exact
match), the engine's memory (PSS of its process group), and chat latency and throughput with both
adapters hot-swapped per request; load rounds alternate between the three servers so that machine
noise hits them alike.

    .venv/bin/python loadtests/bench_quantization.py [--work /tmp/benchworld] [--items 200]
        [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
from pathlib import Path

import psutil
from bench_rollout import build_world
from harness import scenario
from rich.console import Console
from rich.table import Table

from lorafleet.serve.dev.local_server import LocalServer
from lorafleet.serve.gateway_client import LorafleetClient

console = Console(width=160)
DEPLOYMENTS = {"acme": ("json", "stable"), "globex": ("french", "bad"), "base": ("general", None)}


def engine_memory_mib(pid: int) -> float:
    """Proportional set size of the engine's whole process group (API server, engine core,
    workers)."""
    total = 0
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pid:
                total += process.memory_full_info().pss
        except (psutil.Error, ProcessLookupError):
            continue
    return total / 2**20


def _weights_bytes(base: Path) -> int:
    """The language model's linear weights as stored: from `lorafleet quantize`'s manifest, else
    counted."""
    manifest = base / "lorafleet-quantization.json"
    if manifest.exists():
        return json.loads(manifest.read_text())["weights_bytes_after"]
    from lorafleet.adapters.base_model import load_base_spec

    return sum(
        fan_in * fan_out * 4 for fan_in, fan_out in load_base_spec(str(base)).lora_modules.values()
    )


def prepare(work: Path, items: int) -> tuple[dict[str, Path], dict[str, Path], dict[str, Path]]:
    """Bases (full, int8, int4), adapters per deployment, validation sets per deployment."""
    from lorafleet.train.quantize import quantize
    from lorafleet.train.random_adapter import make_random_adapter
    from lorafleet.train.shapes import write_task

    base, trained = build_world(work)
    bases = {"full precision": base}
    for scheme in ("int8", "int4"):
        out = work / f"base-{scheme}"
        if not out.exists():
            quantize(str(base), out, scheme, 32)
        bases[scheme] = out
    identity = work / "adapter-identity"
    if not identity.exists():
        # answers like the base (B = 0 is refused at upload)
        make_random_adapter(base, identity, seed=0, std=1e-6)
    adapters = {
        name: trained[which] if which else identity for name, (_, which) in DEPLOYMENTS.items()
    }
    sets = {
        name: write_task(task, items, work / "data" / f"{task}-bench-{items}.jsonl", seed=3)
        for name, (task, _) in DEPLOYMENTS.items()
    }
    return bases, adapters, sets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--work", type=Path, help="keep the world here (default: a temporary folder)"
    )
    parser.add_argument("--items", type=int, default=200, help="validation items per deployment")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the three servers on `kill` too
    work = args.work or Path(tempfile.mkdtemp(prefix="lorafleet-bench-quant-"))
    work.mkdir(parents=True, exist_ok=True)
    bases, adapters, sets = prepare(work, args.items)
    servers: dict[str, LocalServer] = {}
    try:
        with console.status("starting three lorafleet serve (full precision, int8, int4)"):
            for label, base in bases.items():
                home = work / f"home-{label.split()[0]}"
                shutil.rmtree(home, ignore_errors=True)
                servers[label] = LocalServer.start(
                    base,
                    home,
                    max_model_len="512",
                    max_lora_rank="16",
                    drift_replay_s="0",
                    dtype="float32",
                    quantize="none" if base == bases["full precision"] else "auto",
                )
            for server in servers.values():
                server.wait_ready(900)
        keys, scores, memory, engine = {}, {}, {}, {}
        for label, server in servers.items():
            admin = LorafleetClient(server.url, server.admin_key)
            engine[label] = admin.http.get("/admin/engine").json()
            keys[label] = admin.create_tenant("bench")["api_key"]
            tenant = LorafleetClient(server.url, keys[label])
            for name, folder in adapters.items():
                version = tenant.push_adapter(name, folder)
                tenant.deploy(name, f"{name}@{version['version']}")
                tenant.push_validation(name, sets[name], "exact_match")
            with console.status(
                f"{label}: replaying {len(DEPLOYMENTS)} x {args.items} validation items"
            ):
                scores[label] = {name: tenant.drift_check(name)[0]["score"] for name in DEPLOYMENTS}
        runs: dict[tuple[str, str], list[dict]] = {}
        loads = (
            ("1 client", 1, max(16, args.requests // 4)),
            (f"{args.concurrency} clients", args.concurrency, args.requests),
        )
        for r in range(args.rounds + 1):  # round 0 warms every server up and is not counted
            for load, concurrency, n in loads:
                for label, server in servers.items():
                    with console.status(f"round {r}: {load} on {label}"):
                        result = asyncio.run(
                            scenario(
                                server.url, keys[label], ["acme", "globex"], n, concurrency, seed=r
                            )
                        )
                    if r:
                        runs.setdefault((load, label), []).append(result)
        for label in servers:
            memory[label] = engine_memory_mib(engine[label]["pid"])
    finally:
        for server in servers.values():
            server.stop()

    labels = list(servers)
    weights = {label: _weights_bytes(base) for label, base in bases.items()}
    table = Table(
        title=f"tiny Qwen2.5-VL on this CPU: the same adapters on three bases (validation: "
        f"{args.items} items each; load: median of {args.rounds} alternating rounds, 16 tokens "
        "per answer; float32, the tiny checkpoint's dtype)"
    )
    table.add_column("measure")
    for label in labels:
        table.add_column(label, justify="right")
    table.add_row(
        "quantization (as the server reports it)", *(engine[b]["quantization"] for b in labels)
    )
    for name, (task, _) in DEPLOYMENTS.items():
        table.add_row(
            f"{name}: {task} validation exact match", *(f"{scores[b][name]:.3f}" for b in labels)
        )
    table.add_row("language-model weights (KiB)", *(f"{weights[b] / 1024:.0f}" for b in labels))
    table.add_row(
        "engine memory, PSS of its processes (MiB)", *(f"{memory[b]:.0f}" for b in labels)
    )
    table.add_row(
        "engine start (s, three starting at once)",
        *(f"{engine[b]['last_start_s']:.0f}" for b in labels),
    )
    for load, _, _ in loads:
        for field, unit, scale in (("p50", "ms", 1000), ("p99", "ms", 1000), ("rps", "req/s", 1)):
            values = [statistics.median(x[field] for x in runs[(load, b)]) for b in labels]
            table.add_row(
                f"{load}: {field} ({unit})",
                f"{values[0] * scale:.1f}",
                *(f"{v * scale:.1f} ({v / values[0]:.2f}x)" for v in values[1:]),
            )
    console.print(table)
    console.print(f"world and logs: {work}")


if __name__ == "__main__":
    main()

"""Thousands of adapters on one engine: 2,000 adapters of 200 tenants, traffic over their
deployments with Zipf popularity (s = 1.1) and uniform, against the same load on one adapter, side
by side; and the working set at 0.5×, 1×, 2× and 4× the engine's LoRA slots. One `lorafleet serve`
with the engine sizing it derives itself (no engine setting given).

Reports per phase the throughput ratio to one adapter, p50/p99, and adapter loads per 1,000
requests (the gateway's registrations and cold loads: a registered adapter read from disk again);
and the setup's upload, deploy (the engine registers each adapter) and listing times.

    .venv/bin/python loadtests/bench_many_adapters.py [--adapters 2000] [--tenants 200]
        [--clients 16,64] [--requests 512] [--rounds 2] [--zipf 1.1] [--quick] [--check]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import psutil
from harness import BENCH_LIMITS, Phase, run_load, spread, wait_idle
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from lorafleet.serve.dev.local_server import LocalServer
from lorafleet.serve.gateway_client import LorafleetClient

console = Console(width=160)


def clone_adapters(first: Path, out: Path, n: int) -> list[Path]:
    """`n` distinct adapters from one: its config, its lora_B scaled a little differently each
    (another digest, about the same answers), written in a few milliseconds each."""
    from safetensors.numpy import load_file, save_file

    weights = load_file(first / "adapter_model.safetensors")
    folders = []
    for i in range(n):
        folder = out / f"a{i}"
        folder.mkdir(parents=True)
        shutil.copy(first / "adapter_config.json", folder)
        scale = 1.0 + 0.001 * (i + 1)
        save_file(
            {k: v * scale if "lora_B" in k else v for k, v in weights.items()},
            str(folder / "adapter_model.safetensors"),
        )
        folders.append(folder)
    return folders


def zipf_plan(targets: list[tuple[str, str]], n: int, s: float, seed: int) -> list[tuple[str, str]]:
    """`n` requests over `targets` with Zipf popularity of exponent `s`: the order of popularity is
    the same in every round (shuffled once), the requests drawn by `seed`."""
    ranked = targets[:]
    random.Random("popularity").shuffle(ranked)
    weights = [1.0 / (rank + 1) ** s for rank in range(len(ranked))]
    return random.Random(seed).choices(ranked, weights=weights, k=n)


def uniform_plan(targets: list[tuple[str, str]], n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [rng.choice(targets) for _ in range(n)]


_SAMPLE = re.compile(r"^(lorafleet_adapter_(?:cold_loads|loads)_total)\{([^}]*)\} ([0-9.e+]+)$")


def adapter_loads(server: LocalServer) -> float:
    """Registrations (ok) and cold loads so far, from the gateway's /metrics."""
    text = httpx.get(
        f"{server.url}/metrics",
        headers={"Authorization": f"Bearer {server.admin_key}"},
        timeout=30,
    ).text
    total = 0.0
    for line in text.splitlines():
        if (m := _SAMPLE.match(line)) and ('outcome="failed"' not in m.group(2)):
            total += float(m.group(3))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=2000)
    parser.add_argument("--tenants", type=int, default=200)
    parser.add_argument("--clients", default="16,64")
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument(
        "--quick", action="store_true", help="CI's guard: 200 adapters of 20 tenants"
    )
    parser.add_argument("--check", action="store_true", help="exit 1 when a goal is missed")
    parser.add_argument(
        "--cpu-loras",
        default="",
        help="instead of the working sets: one adapter and Zipf with vLLM's adapter memory "
        "(LORAFLEET_MAX_CPU_LORAS) at each of these sizes, 0 the derived one, e.g. 64,256,1024,0",
    )
    parser.add_argument(
        "--compare-fixes",
        action="store_true",
        help="with --cpu-loras: each size with lorafleet's vLLM fix on and off "
        "(LORAFLEET_ENGINE_FIXES)",
    )
    parser.add_argument(
        "--min-ratio", type=float, default=0.90, help="goal: Zipf over all ÷ one adapter"
    )
    args = parser.parse_args()
    if args.quick:
        args.adapters, args.tenants, args.clients, args.requests, args.rounds = (
            200,
            20,
            "16",
            256,
            2,
        )
        # a noisy machine, and a guard against cliffs rather than a measurement
        args.min_ratio = min(args.min_ratio, 0.70)
    clients = [int(c) for c in args.clients.split(",")]

    from lorafleet.train.random_adapter import make_random_adapter
    from lorafleet.train.tiny_model import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="lorafleet-many-"))
    with console.status(f"building the tiny model and {args.adapters} adapters"):
        base = build_tiny_model(work / "tiny")
        folders = clone_adapters(
            make_random_adapter(base, work / "first", seed=0), work / "adapters", args.adapters
        )
    server = LocalServer.start(base, work / "home", max_model_len="512", **BENCH_LIMITS)
    setup: dict[str, list[float]] = {"upload": [], "deploy": []}
    try:
        server.wait_ready()
        rss = {"ready": psutil.Process(server.process.pid).memory_info().rss}
        admin = LorafleetClient(server.url, server.admin_key)
        per_tenant = args.adapters // args.tenants
        targets: list[tuple[str, str]] = []
        with Progress(console=console) as bar:
            task = bar.add_task("uploading and deploying", total=args.adapters)
            for t in range(args.tenants):
                key = admin.create_tenant(f"t{t}")["api_key"]
                tenant = LorafleetClient(server.url, key)
                for j in range(per_tenant):
                    i = t * per_tenant + j
                    t0 = time.perf_counter()
                    tenant.push_adapter(f"a{j}", folders[i])
                    t1 = time.perf_counter()
                    tenant.deploy(f"d{j}", f"a{j}")
                    setup["upload"].append(t1 - t0)
                    setup["deploy"].append(time.perf_counter() - t1)
                    targets.append((key, f"d{j}"))
                    bar.advance(task)
        t0 = time.perf_counter()
        listed = LorafleetClient(server.url, targets[0][0]).list_deployments()
        list_s = time.perf_counter() - t0
        engine = admin.engines()["replicas"][0]
        slots = int(engine["max_loras"])
        sizes = {f"working set {k}× slots": max(1, int(k * slots)) for k in (0.5, 1, 2, 4)}

        def plans(seed: int, n: int) -> dict[str, list[tuple[str, str]]]:
            chosen = {
                "one adapter": [targets[0]] * n,
                f"Zipf s={args.zipf}, {len(targets)} adapters": zipf_plan(
                    targets, n, args.zipf, seed
                ),
            }
            if not args.quick:
                chosen[f"uniform, {len(targets)} adapters"] = uniform_plan(targets, n, seed)
            rng = random.Random(seed)
            for label, size in sizes.items():
                if args.quick and not label.startswith("working set 2×"):
                    continue  # CI's guard: past the slots, once
                if size <= len(targets):
                    chosen[f"{label} ({size})"] = uniform_plan(rng.sample(targets, size), n, seed)
            return chosen

        runs: dict[tuple[str, int], list[tuple[Phase, float]]] = {}

        def measure(server: LocalServer, suffix: str = "") -> None:
            pids = [server.process.pid]
            for r in range(args.rounds + 1):  # round 0 warms up (and registers what it needs)
                for conc in clients:
                    phases = list(plans(r, args.requests).items())
                    if r % 2:
                        phases.reverse()
                    for label, plan in phases:
                        wait_idle(pids)
                        loads0 = adapter_loads(server)
                        phase = run_load(server.url, "", [], len(plan), conc, seed=r, plan=plan)
                        loads = (adapter_loads(server) - loads0) / len(plan) * 1000
                        if r:
                            runs.setdefault((label + suffix, conc), []).append((phase, loads))
                        console.print(
                            f"round {r}, {conc} clients, {label}{suffix}: {phase.rps:.1f} req/s, "
                            f"{phase.failed} failed, {loads:.1f} loads per 1,000"
                        )

        if not args.cpu_loras:
            measure(server)
            # every deployment's route cached by now, with everything else the traffic left
            rss["traffic"] = psutil.Process(server.process.pid).memory_info().rss
        fixes = ("on", "off") if args.compare_fixes else ("on",)
        for size in [int(v) for v in args.cpu_loras.split(",") if v]:
            for fix in fixes:
                server.stop()
                sizes.clear()  # one adapter and Zipf only
                server = LocalServer.start(
                    base,
                    work / "home",
                    max_model_len="512",
                    max_cpu_loras=str(size),
                    engine_fixes=str(fix == "on").lower(),
                    admin_key=server.admin_key,
                    **BENCH_LIMITS,
                )
                server.wait_ready()
                held = LorafleetClient(server.url, server.admin_key).engines()["replicas"][0]
                label = f", adapter memory {held['max_cpu_loras']}"
                measure(server, label + (f", vLLM fix {fix}" if args.compare_fixes else ""))
    finally:
        server.stop()

    summary = Table(title=f"{len(targets)} adapters of {args.tenants} tenants: the setup")
    for column in ("measure", "value"):
        summary.add_column(column, justify="right")
    summary.add_row("upload, p50 / p99 (ms)", _p50_p99(setup["upload"]))
    summary.add_row(
        "deploy incl. the engine's registration, p50 / p99 (ms)", _p50_p99(setup["deploy"])
    )
    if "traffic" in rss:
        summary.add_row(
            "gateway RSS: ready / after deploying and serving them all (MiB)",
            f"{rss['ready'] / 2**20:.0f} / {rss['traffic'] / 2**20:.0f}",
        )
    summary.add_row(f"a tenant's deployments listed ({len(listed)}) (ms)", f"{list_s * 1000:.0f}")
    summary.add_row(
        "engine sizing (derived)",
        f"max_loras {engine['max_loras']}, max_num_seqs {engine['max_num_seqs']}",
    )
    console.print(summary)
    table = Table(
        title=f"tiny Qwen2.5-VL on CPU, engine sizing derived, {args.rounds} rounds — "
        "median [min–max]"
    )
    for column in (
        "traffic",
        "clients",
        "req/s",
        "÷ one adapter",
        "p50 (ms)",
        "p99 (ms)",
        "adapter loads / 1,000 req",
        "failed",
    ):
        table.add_column(column, justify="right")
    ratios: dict[tuple[str, int], float] = {}
    failed = 0
    for (label, conc), rows in runs.items():
        config = label[label.find(", adapter memory") :] if ", adapter memory" in label else ""
        one = runs[("one adapter" + config, conc)]
        per_round = [p.rps / o.rps for (p, _), (o, _) in zip(rows, one)]
        ratios[(label, conc)] = statistics.median(per_round)
        failed += sum(p.failed for p, _ in rows)
        table.add_row(
            label,
            str(conc),
            spread([p.rps for p, _ in rows]),
            spread(per_round, digits=3),
            spread([p.p50 for p, _ in rows], 1000, 0),
            spread([p.p99 for p, _ in rows], 1000, 0),
            spread([loads for _, loads in rows], digits=1),
            str(sum(p.failed for p, _ in rows)),
        )
    console.print(table)
    (work / "results.json").write_text(
        json.dumps({f"{label} @{conc}": ratio for (label, conc), ratio in ratios.items()})
    )
    misses = [f"{failed} failed requests"] if failed else []
    # the goal is lorafleet's as it ships: not the rows run with its vLLM fix off
    zipf = [
        r for (label, _), r in ratios.items() if label.startswith("Zipf") and "fix off" not in label
    ]
    if zipf and min(zipf) < args.min_ratio:
        misses.append(f"Zipf ÷ one adapter {min(zipf):.3f} < {args.min_ratio}")
    if misses:
        console.print("[red]goals missed:[/red] " + "; ".join(misses))
        if args.check:
            raise SystemExit(1)


def _p50_p99(values: list[float]) -> str:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"{statistics.median(ordered) * 1000:.0f} / {p99 * 1000:.0f}"


if __name__ == "__main__":
    main()

"""The gateway's own cost: `lorafleet serve` attached to an instant upstream (`stub_engine.py`), so
that every CPU cycle it spends is visible. Reports requests per second, the gateway process's CPU
per request and the requests per second one core of it would serve, at 1 / 16 / 64 clients, streamed
and not; the load generator straight against the stub is the reference of what the client and the
stub themselves allow.

    .venv/bin/python loadtests/bench_gateway_overhead.py [--rounds 3] [--requests 2000]
        [--clients 1,16,64] [--check-cpu-ms 1.0] [--quick] [--compare-confidence]
        [--tokens 16] [--stream-only]

Long streamed answers (`--tokens 512 --stream-only --compare-confidence`) give the gateway's CPU per
streamed token, and the tokens per second one of its cores relays.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import BENCH_LIMITS, own_cpu_s, run_load, spread, wait_healthy
from rich.console import Console
from rich.table import Table

from lorafleet.serve.dev.local_server import LocalServer
from lorafleet.serve.engine.command import free_port
from lorafleet.serve.gateway_client import LorafleetClient

console = Console(width=160)
HERE = Path(__file__).parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", default="1,16,64")
    parser.add_argument("--deployments", type=int, default=8)
    parser.add_argument(
        "--profile",
        type=Path,
        help="write py-spy's collapsed stacks of the gateway during the "
        "last 16-client phase here (needs `pip install py-spy`)",
    )
    parser.add_argument(
        "--check-cpu-ms",
        type=float,
        default=0.0,
        help="exit 1 when the gateway's CPU per request at 16 clients exceeds this (0: no check)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="CI's regression guard: 1 round, 16 clients"
    )
    parser.add_argument("--tokens", type=int, default=16, help="tokens in each answer")
    parser.add_argument("--stream-only", action="store_true", help="streamed requests only")
    parser.add_argument(
        "--compare-confidence",
        action="store_true",
        help="also measure a second gateway with LORAFLEET_RECORD_CONFIDENCE=0, side by side, "
        "for the cost of recording every answer's confidence (the logprobs asked for, read and "
        "hidden)",
    )
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.requests, args.clients = 2, 1000, "16"
    clients = [int(c) for c in args.clients.split(",")]

    from lorafleet.train.random_adapter import make_random_adapter
    from lorafleet.train.tiny_model import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="lorafleet-overhead-"))
    with console.status("building the tiny model's config and an adapter"):
        base = build_tiny_model(work / "tiny")
        adapter = make_random_adapter(base, work / "a0", seed=0)
    stub_port = free_port()
    stub = subprocess.Popen(
        [
            sys.executable,
            str(HERE / "stub_engine.py"),
            "--port",
            str(stub_port),
            "--tokens",
            str(args.tokens),
        ]
    )
    stub_url = f"http://127.0.0.1:{stub_port}"
    gateway, others = None, []
    try:
        wait_healthy(stub_url, stub)
        gateway = LocalServer.start(
            base, work / "home", engine_url=stub_url, engine_api_key="stub", **BENCH_LIMITS
        )
        gateway.wait_ready()
        deployments = [f"d{i}" for i in range(args.deployments)]
        key = _deploy(gateway, adapter, deployments)
        sides = [("gateway", gateway.url, key, deployments, gateway.process.pid)]
        if args.compare_confidence:
            plain = LocalServer.start(
                base,
                work / "home-plain",
                engine_url=stub_url,
                engine_api_key="stub",
                record_confidence="0",
                **BENCH_LIMITS,
            )
            others.append(plain)
            plain.wait_ready()
            sides.append(
                (
                    "no confidence",
                    plain.url,
                    _deploy(plain, adapter, deployments),
                    deployments,
                    plain.process.pid,
                )
            )
        sides.append(("stub", stub_url, "stub", deployments, 0))
        pid = gateway.process.pid
        runs: dict[tuple[str, int], list[dict]] = {}
        streams = (True,) if args.stream_only else (False, True)
        for r in range(args.rounds + 1):  # round 0 warms up
            for stream in streams:
                for conc in clients:
                    n = args.requests // 4 if conc == 1 else args.requests
                    for side, url, auth, models, side_pid in sides:
                        spy = None
                        if (
                            args.profile
                            and side == "gateway"
                            and conc == 16
                            and not stream
                            and r == args.rounds
                        ):
                            spy = subprocess.Popen(
                                [
                                    "py-spy",
                                    "record",
                                    "--format",
                                    "raw",
                                    "--rate",
                                    "500",
                                    "--pid",
                                    str(pid),
                                    "--output",
                                    str(args.profile),
                                ],
                                stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL,
                            )
                        cpu0 = own_cpu_s(side_pid or pid)
                        phase = run_load(url, auth, models, n, conc, seed=r, stream=stream)
                        if spy:
                            spy.send_signal(signal.SIGINT)
                            spy.wait(30)
                        cpu_s = own_cpu_s(side_pid or pid) - cpu0
                        if r:
                            label = f"{side}{' stream' if stream else ''}"
                            runs.setdefault((label, conc), []).append(
                                {
                                    "rps": phase.rps,
                                    "p50": phase.p50,
                                    "failed": phase.failed,
                                    "cpu_ms": cpu_s / n * 1000,
                                    "per_core": n / cpu_s if cpu_s else float("nan"),
                                    "token_us": cpu_s / (n * args.tokens) * 1e6,
                                    "tokens_per_core": n * args.tokens / cpu_s
                                    if cpu_s
                                    else float("nan"),
                                }
                            )
    finally:
        for server in [gateway, *others]:
            if server:
                server.stop()
        stub.terminate()

    table = Table(
        title=f"the gateway against an instant upstream, answers of {args.tokens} tokens, "
        f"{args.rounds} rounds — median [min–max]"
    )
    for column in (
        "load",
        "req/s",
        "p50 (ms)",
        "gateway CPU per request (ms)",
        "gateway req/s per core",
        "client → stub alone, req/s",
        "req/s ÷ stub alone",
        "CPU per token (µs)",
        "tokens/s per core",
    ):
        table.add_column(column, justify="right")
    failed = 0
    for stream in streams:
        for conc in clients:
            label = f"gateway{' stream' if stream else ''}"
            rows, reference = (
                runs[(label, conc)],
                runs[(f"stub{' stream' if stream else ''}", conc)],
            )
            failed += sum(x["failed"] for x in rows)
            table.add_row(
                f"{conc} client{'s' if conc > 1 else ''}{', streamed' if stream else ''}",
                spread([x["rps"] for x in rows], digits=0),
                spread([x["p50"] for x in rows], 1000, 2),
                spread([x["cpu_ms"] for x in rows], digits=3),
                spread([x["per_core"] for x in rows], digits=0),
                spread([x["rps"] for x in reference], digits=0),
                spread([a["rps"] / b["rps"] for a, b in zip(rows, reference)], digits=3),
                spread([x["token_us"] for x in rows], digits=1),
                spread([x["tokens_per_core"] for x in rows], digits=0),
            )
    console.print(table)
    if args.compare_confidence:
        _print_confidence_cost(runs, clients, args.rounds, streams)
    misses = [f"{failed} failed requests"] if failed else []
    if args.check_cpu_ms and ("gateway", 16) in runs:
        cpu = statistics.median(x["cpu_ms"] for x in runs[("gateway", 16)])
        if cpu > args.check_cpu_ms:
            misses.append(
                f"gateway CPU per request at 16 clients {cpu:.3f} ms > {args.check_cpu_ms} ms"
            )
    if misses:
        console.print("[red]goals missed:[/red] " + "; ".join(misses))
        raise SystemExit(1)


def _deploy(gateway: LocalServer, adapter: Path, deployments: list[str]) -> str:
    """A tenant with the adapter deployed under every name; its key."""
    key = LorafleetClient(gateway.url, gateway.admin_key).create_tenant("bench")["api_key"]
    tenant = LorafleetClient(gateway.url, key)
    tenant.push_adapter("a", adapter)
    for name in deployments:
        tenant.deploy(name, "a")
    return key


def _print_confidence_cost(
    runs: dict[tuple[str, int], list[dict]],
    clients: list[int],
    rounds: int,
    streams: tuple[bool, ...],
) -> None:
    """Recording confidence against not recording it, measured in the same rounds: CPU and
    throughput ratios."""
    table = Table(
        title=f"the cost of recording confidence (on ÷ off, same rounds), {rounds} rounds — median "
        "[min–max]"
    )
    for column in (
        "load",
        "CPU per request, on (ms)",
        "off (ms)",
        "CPU on ÷ off",
        "req/s on ÷ off",
    ):
        table.add_column(column, justify="right")
    for stream in streams:
        suffix = " stream" if stream else ""
        for conc in clients:
            on, off = runs[(f"gateway{suffix}", conc)], runs[(f"no confidence{suffix}", conc)]
            table.add_row(
                f"{conc} client{'s' if conc > 1 else ''}{', streamed' if stream else ''}",
                spread([x["cpu_ms"] for x in on], digits=3),
                spread([x["cpu_ms"] for x in off], digits=3),
                spread([a["cpu_ms"] / b["cpu_ms"] for a, b in zip(on, off)], digits=3),
                spread([a["rps"] / b["rps"] for a, b in zip(on, off)], digits=3),
            )
    console.print(table)


if __name__ == "__main__":
    main()

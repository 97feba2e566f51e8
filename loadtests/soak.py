"""Hours of traffic: a mixed workload at a fixed fraction of measured capacity against one
`lorafleet serve` (the tiny base), sampled every few minutes.

The workload: chat requests over every tenant's deployments (a third streamed) arriving at random
(Poisson) at `--fraction` of the throughput measured first, feedback on some answers, captures
and drift monitoring (a validation set, inputs sampled) on one deployment per tenant; and, every
`--op-s`, the next of: a new adapter version uploaded and deployed, a canary rollout started, a
drift look at the sampled inputs, a drift check (the validation set replayed through the engine).
Garbage collection runs on its own schedule, with the request log kept `--retention-s` so that
retention is exercised within the run.

Each sample records the gateway's and the engine's memory (RSS) and open files, the catalog's size
and rows per table, and the window's requests, errors, p50 and p99. At the end: the table, a plot
(`soak.png`), the samples (`samples.json`) in `--out`, and the goals: no error, no growth of memory
or latency beyond noise, a request log that retention keeps level.

    .venv/bin/python loadtests/soak.py [--minutes 60] [--fraction 0.5] [--sample-s 300]
        [--postgres-url URL] [--out DIR] [--quick] [--check]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import psutil
from bench_many_adapters import clone_adapters
from harness import BENCH_LIMITS, chat_body, run_load, tree_open_files, tree_rss, wait_idle
from rich.console import Console
from rich.table import Table
from sqlalchemy import create_engine, func, inspect, select, table

from lorafleet.errors import ApiError
from lorafleet.serve.dev.local_server import LocalServer
from lorafleet.serve.gateway_client import LorafleetClient
from lorafleet.serve.rollouts.phases import ACTIVE

console = Console(width=160)
MIB = 1024**2


@dataclass(frozen=True)
class Sample:
    """One look at the server, and the traffic since the previous one."""

    at_s: float  # since the traffic started
    requests: int
    errors: int
    p50_ms: float
    p99_ms: float
    gateway_mib: float
    engine_mib: float
    open_files: int
    catalog_mib: float
    rows: dict[str, int]


# --- the traffic: its own process, so that the server's CPU and memory are the server's ---


async def traffic(spec: dict) -> None:
    """Open-loop chat traffic at `rate` per second until `until` (epoch s), each request's outcome
    a JSON line in `log`; feedback on some answers."""
    rng = random.Random(spec["seed"])
    targets: list[tuple[str, str]] = [tuple(t) for t in spec["targets"]]
    body = chat_body()
    pending: set[asyncio.Task] = set()
    with open(spec["log"], "a", buffering=1) as log:
        async with httpx.AsyncClient(
            base_url=spec["url"],
            timeout=300,
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
        ) as client:

            async def one(key: str, model: str, stream: bool) -> None:
                headers = {"Authorization": f"Bearer {key}"}
                t0, status, request_id = time.perf_counter(), 0, ""
                try:
                    if stream:
                        async with client.stream(
                            "POST",
                            "/v1/chat/completions",
                            json={**body, "model": model, "stream": True},
                            headers=headers,
                        ) as response:
                            status = response.status_code
                            done = False
                            async for line in response.aiter_lines():
                                done = done or line == "data: [DONE]"
                            status = status if done else 599  # a stream cut short
                    else:
                        response = await client.post(
                            "/v1/chat/completions", json={**body, "model": model}, headers=headers
                        )
                        status = response.status_code
                        if status == 200:
                            request_id = response.json()["id"]
                except httpx.HTTPError:
                    status = 598
                latency = time.perf_counter() - t0
                log.write(
                    json.dumps(
                        {
                            "at": time.time(),
                            "s": round(latency, 4),
                            "status": status,
                            "stream": stream,
                        }
                    )
                    + "\n"
                )
                if request_id and rng.random() < spec["feedback"]:
                    reply = await client.post(
                        "/v1/feedback",
                        json={"id": request_id, "score": rng.choice([0, 1])},
                        headers=headers,
                    )
                    if not reply.is_success:  # 201: recorded
                        log.write(json.dumps({"feedback": reply.status_code}) + "\n")

            next_at = time.time()
            while next_at < spec["until"]:
                await asyncio.sleep(max(0.0, next_at - time.time()))
                key, model = rng.choice(targets)
                task = asyncio.create_task(one(key, model, rng.random() < spec["streamed"]))
                pending.add(task)
                task.add_done_callback(pending.discard)
                next_at += rng.expovariate(spec["rate"])
            await asyncio.gather(*pending)


# --- what a sample reads ---


def catalog_state(url: str, sqlite_file: Path | None) -> tuple[float, dict[str, int]]:
    """The catalog's size (MiB) and rows per table."""
    engine = create_engine(url)
    try:
        with engine.connect() as db:
            names = [n for n in inspect(db).get_table_names() if n != "alembic_version"]
            rows = {
                n: db.execute(select(func.count()).select_from(table(n))).scalar_one()
                for n in names
            }
            if sqlite_file is not None:
                size = sum(
                    p.stat().st_size
                    for p in sqlite_file.parent.glob(sqlite_file.name + "*")
                    if p.is_file()
                )
            else:
                size = db.exec_driver_sql(
                    "SELECT pg_database_size(current_database())"
                ).scalar_one()
    finally:
        engine.dispose()
    return size / MIB, rows


def window(lines: list[dict]) -> tuple[int, int, float, float]:
    chats = [line for line in lines if "status" in line]
    errors = sum(1 for line in chats if line["status"] != 200) + sum(
        1 for line in lines if "feedback" in line
    )
    latencies = sorted(line["s"] for line in chats if line["status"] == 200)
    if not latencies:
        return len(chats), errors, float("nan"), float("nan")
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    return len(chats), errors, statistics.median(latencies) * 1000, p99 * 1000


def rollout_active(tenant: LorafleetClient, deployment: str) -> bool:
    try:
        return tenant.rollout(deployment)["phase"] in ACTIVE
    except ApiError as exc:
        if exc.status == 404:  # none yet
            return False
        raise


# --- the run ---


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=60)
    parser.add_argument("--fraction", type=float, default=0.5, help="of the measured capacity")
    parser.add_argument("--sample-s", type=float, default=300)
    parser.add_argument("--op-s", type=float, default=120, help="between control operations")
    parser.add_argument("--retention-s", type=float, default=900, help="of the request log")
    parser.add_argument("--tenants", type=int, default=4)
    parser.add_argument("--postgres-url", default="", help="a catalog on PostgreSQL instead")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="3 minutes, a sample every 20 s")
    parser.add_argument("--check", action="store_true", help="exit 1 when a goal is missed")
    parser.add_argument("--traffic", help=argparse.SUPPRESS)  # the traffic process's spec
    args = parser.parse_args()
    if args.traffic:
        asyncio.run(traffic(json.loads(args.traffic)))
        return
    if args.quick:
        args.minutes, args.sample_s, args.op_s, args.retention_s = 3, 20, 30, 60

    from lorafleet.train.random_adapter import make_random_adapter
    from lorafleet.train.shapes import write_task
    from lorafleet.train.tiny_model import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="lorafleet-soak-"))
    out = args.out or work
    out.mkdir(parents=True, exist_ok=True)
    with console.status("building the tiny model and adapters"):
        base = build_tiny_model(work / "tiny")
        spares = clone_adapters(make_random_adapter(base, work / "first", seed=0), work / "a", 400)
        validation = write_task("general", 100, work / "validation" / "general.jsonl", seed=0)
    catalog_url = args.postgres_url or f"sqlite:///{work / 'home' / 'catalog.db'}"
    settings = dict(
        max_model_len="512",
        retention_requests_days=str(args.retention_s / 86400),
        gc_interval_s=str(max(30.0, args.retention_s / 3)),
        drift_look_s=str(max(30.0, args.op_s)),
        **BENCH_LIMITS,
    )
    if args.postgres_url:
        settings["catalog_url"] = args.postgres_url
    server = LocalServer.start(base, work / "home", **settings)
    gateway = psutil.Process(server.process.pid)
    samples: list[Sample] = []
    traffic_process = None
    try:
        server.wait_ready()
        admin = LorafleetClient(server.url, server.admin_key)
        tenants: list[LorafleetClient] = []
        targets: list[tuple[str, str]] = []
        spare = iter(spares)
        for t in range(args.tenants):
            key = admin.create_tenant(f"t{t}")["api_key"]
            tenant = LorafleetClient(server.url, key)
            tenants.append(tenant)
            for d in range(2):
                tenant.push_adapter(f"a{d}", next(spare))
                tenant.deploy(f"d{d}", f"a{d}")
                targets.append((key, f"d{d}"))
            tenant.set_capture(
                "d0", {"sample_rate": 0.2, "max_per_day": 10**6, "retention_days": 1}
            )
            tenant.push_validation("d0", validation, "exact_match")
            tenant.drift_sampling(True)

        with console.status("measuring capacity (16 clients, closed loop)"):
            wait_idle([server.process.pid])
            capacity = run_load(server.url, "", [], 1000, 16, seed=0, plan=targets * 125).rps
        rate = args.fraction * capacity
        console.print(
            f"capacity {capacity:.1f} req/s; the soak sends {rate:.1f} req/s "
            f"({args.fraction:.0%}) for {args.minutes:.0f} min"
        )
        log_path = work / "traffic.jsonl"
        log_path.touch()
        t_start = time.time()
        until = t_start + args.minutes * 60
        spec = {
            "url": server.url,
            "targets": targets,
            "rate": rate,
            "until": until,
            "log": str(log_path),
            "seed": 1,
            "streamed": 1 / 3,
            "feedback": 0.05,
        }
        traffic_process = subprocess.Popen(
            [sys.executable, __file__, "--traffic", json.dumps(spec)], start_new_session=True
        )
        ops = ["upload and deploy", "rollout", "drift look", "drift check"]
        op_index, next_op, next_sample, read_at = 0, t_start + args.op_s, t_start, 0
        version: dict[tuple[int, str], int] = {}
        sqlite_file = None if args.postgres_url else work / "home" / "catalog.db"
        while time.time() < until:
            now = time.time()
            if now >= next_op:
                which = ops[op_index % len(ops)]
                t = op_index % len(tenants)
                tenant = tenants[t]
                if which == "upload and deploy":
                    n = version[(t, "a1")] = version.get((t, "a1"), 1) + 1
                    tenant.push_adapter("a1", next(spare))
                    tenant.deploy("d1", f"a1@{n}")
                elif which == "rollout":
                    if not rollout_active(tenant, "d0"):
                        n = version[(t, "a0")] = version.get((t, "a0"), 1) + 1
                        tenant.push_adapter("a0", next(spare))
                        tenant.start_rollout(
                            "d0",
                            to=f"a0@{n}",
                            gate=False,
                            steps=[50, 100],
                            min_requests=20,
                            interval_s=30,
                        )
                elif which == "drift look":
                    tenant.drift_look("d0")
                else:
                    tenant.drift_check("d0")
                op_index, next_op = op_index + 1, next_op + args.op_s
            if now >= next_sample:
                with open(log_path) as log:
                    log.seek(read_at)
                    text = log.read()
                complete = text[: text.rfind("\n") + 1]
                read_at += len(complete)
                lines = [json.loads(line) for line in complete.splitlines()]
                requests, errors, p50, p99 = window(lines)
                catalog_mib, rows = catalog_state(catalog_url, sqlite_file)
                engine = [p for p in gateway.children() if "vllm" in " ".join(p.cmdline())]
                sample = Sample(
                    at_s=round(now - t_start),
                    requests=requests,
                    errors=errors,
                    p50_ms=round(p50, 1),
                    p99_ms=round(p99, 1),
                    gateway_mib=round(gateway.memory_info().rss / MIB, 1),
                    engine_mib=round(sum(tree_rss(p.pid) for p in engine) / MIB, 1),
                    open_files=tree_open_files(gateway.pid),
                    catalog_mib=round(catalog_mib, 2),
                    rows=rows,
                )
                samples.append(sample)
                console.print(
                    f"{sample.at_s:>6} s: {requests} requests, {errors} errors, p50 "
                    f"{sample.p50_ms} ms, p99 {sample.p99_ms} ms, gateway "
                    f"{sample.gateway_mib} MiB, engine {sample.engine_mib} MiB, "
                    f"{sample.open_files} files, catalog {sample.catalog_mib} MiB, "
                    f"{rows.get('requests', 0)} request rows"
                )
                next_sample += args.sample_s
            time.sleep(max(0.0, min(next_op, next_sample, until) - time.time()))
        traffic_process.wait(timeout=600)
        everything = [json.loads(line) for line in log_path.read_text().splitlines()]
    finally:
        if traffic_process is not None and traffic_process.poll() is None:
            traffic_process.kill()
        server.stop()

    total, errors_total, _, _ = window(everything)
    (out / "samples.json").write_text(json.dumps([asdict(s) for s in samples], indent=1))
    report(samples, total, errors_total, args, capacity, rate, out)


def report(
    samples: list[Sample],
    total: int,
    errors: int,
    args: argparse.Namespace,
    capacity: float,
    rate: float,
    out: Path,
) -> None:
    table_ = Table(
        title=f"soak: {args.minutes:.0f} min at {rate:.1f} req/s ({args.fraction:.0%} of "
        f"{capacity:.1f}), a sample every {args.sample_s:.0f} s"
    )
    columns = (
        "t (s)",
        "requests",
        "errors",
        "p50 (ms)",
        "p99 (ms)",
        "gateway (MiB)",
        "engine (MiB)",
        "open files",
        "catalog (MiB)",
        "request rows",
    )
    for column in columns:
        table_.add_column(column, justify="right")
    for s in samples:
        table_.add_row(
            str(s.at_s),
            str(s.requests),
            str(s.errors),
            f"{s.p50_ms:.0f}",
            f"{s.p99_ms:.0f}",
            f"{s.gateway_mib:.0f}",
            f"{s.engine_mib:.0f}",
            str(s.open_files),
            f"{s.catalog_mib:.1f}",
            str(s.rows.get("requests", 0)),
        )
    console.print(table_)
    plot(samples, out / "soak.png")

    # growth: the run's second half against its first (the first sample is before any traffic)
    body = [s for s in samples[1:] if s.requests]
    half = len(body) // 2
    early, late = body[:half], body[half:]
    misses = []

    def mean(values: list[float]) -> float:
        return statistics.fmean(values) if values else float("nan")

    findings = Table(title="the goals")
    for column in ("measure", "first half", "second half", "ratio"):
        findings.add_column(column, justify="right")
    for label, attr, bound in (
        ("gateway RSS (MiB)", "gateway_mib", 1.10),
        ("engine RSS (MiB)", "engine_mib", 1.10),
        ("open files", "open_files", 1.10),
        ("p50 (ms)", "p50_ms", 1.25),
        ("p99 (ms)", "p99_ms", 1.50),
        ("request rows", None, 1.25),
    ):
        values_early = [
            s.rows.get("requests", 0) if attr is None else getattr(s, attr) for s in early
        ]
        values_late = [
            s.rows.get("requests", 0) if attr is None else getattr(s, attr) for s in late
        ]
        a, b = mean(values_early), mean(values_late)
        ratio = b / a if a else float("nan")
        findings.add_row(label, f"{a:.1f}", f"{b:.1f}", f"{ratio:.3f}")
        if early and late and ratio > bound:
            misses.append(f"{label} grew {ratio:.2f}× (bound {bound}×)")
    console.print(findings)
    rows = [s.rows.get("requests", 0) for s in samples]
    console.print(
        f"{total} requests, {errors} errors; request-log rows at most {max(rows)} "
        f"(retention {args.retention_s:.0f} s); catalog {samples[-1].catalog_mib:.1f} MiB at "
        "the end"
    )
    if errors:
        misses.append(f"{errors} errors")
    if misses:
        console.print("[red]goals missed:[/red] " + "; ".join(misses))
        if args.check:
            raise SystemExit(1)


def plot(samples: list[Sample], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [s.at_s / 60 for s in samples]
    figure, axes = plt.subplots(2, 3, figsize=(15, 7), sharex=True)
    for ax, series, title in (
        (axes[0][0], {"gateway": "gateway_mib"}, "gateway RSS (MiB)"),
        (axes[0][1], {"engine": "engine_mib"}, "engine RSS (MiB)"),
        (axes[0][2], {"p50": "p50_ms", "p99": "p99_ms"}, "latency (ms)"),
        (axes[1][0], {"catalog": "catalog_mib"}, "catalog (MiB)"),
        (axes[1][1], {"open files": "open_files"}, "open files"),
        (axes[1][2], {"errors": "errors"}, "errors per sample"),
    ):
        for label, attr in series.items():
            ax.plot(minutes, [getattr(s, attr) for s in samples], marker=".", label=label)
        ax.set_title(title)
        ax.set_ylim(bottom=0)
        ax.legend()
    for ax in axes[1]:
        ax.set_xlabel("minutes")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    console.print(f"plot: {path}")


if __name__ == "__main__":
    main()

"""The catalog's cost on the chat hot path: PostgreSQL against SQLite, side by side in one run.
Gateways attached to one instant upstream (`stub_engine.py`), so that the catalog is the only
difference between them: one per database, each with the default snapshot cache
(`LORAFLEET_CATALOG_CACHE_S=1`) and without it (`0`: every request reads its key and deployment from
the catalog). The phases alternate gateway by gateway, round after round.

    .venv/bin/python loadtests/bench_catalog.py [--rounds 3] [--requests 2000] [--clients 16,64]
        [--postgres-url postgresql+psycopg://lorafleet:lorafleet@127.0.0.1:5432/postgres]

The PostgreSQL role must be allowed to create databases (`make services` starts such a server): the
benchmark creates one of its own and drops it afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from harness import BENCH_LIMITS, own_cpu_s, run_load, spread, wait_healthy
from rich.console import Console
from rich.table import Table
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from lorafleet.serve.dev.local_server import LocalServer
from lorafleet.serve.engine.command import free_port
from lorafleet.serve.gateway_client import LorafleetClient

console = Console(width=160)
HERE = Path(__file__).parent


@contextlib.contextmanager
def postgres_database(server_url: str) -> Iterator[str]:
    """A new database on that server, dropped afterwards."""
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    name = f"lorafleet_bench_{uuid.uuid4().hex[:8]}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", default="16,64")
    parser.add_argument("--deployments", type=int, default=8)
    parser.add_argument(
        "--postgres-url", default="postgresql+psycopg://lorafleet:lorafleet@127.0.0.1:5432/postgres"
    )
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]

    from lorafleet.train.random_adapter import make_random_adapter
    from lorafleet.train.tiny_model import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="lorafleet-catalog-"))
    with console.status("building the tiny model's config and an adapter"):
        base = build_tiny_model(work / "tiny")
        adapter = make_random_adapter(base, work / "a0", seed=0)
    stub_port = free_port()
    stub = subprocess.Popen(
        [sys.executable, str(HERE / "stub_engine.py"), "--port", str(stub_port)]
    )
    stub_url = f"http://127.0.0.1:{stub_port}"
    gateways: dict[tuple[str, str], LocalServer] = {}
    runs: dict[tuple[str, str, int], list[dict]] = {}
    try:
        wait_healthy(stub_url, stub)
        with (
            postgres_database(args.postgres_url) as pg_cached,
            postgres_database(args.postgres_url) as pg_uncached,
        ):
            catalogs = {
                ("SQLite", "1"): f"sqlite:///{work / 'cached.db'}",
                ("PostgreSQL", "1"): pg_cached,
                ("SQLite", "0"): f"sqlite:///{work / 'uncached.db'}",
                ("PostgreSQL", "0"): pg_uncached,
            }
            for (database, ttl), url in catalogs.items():
                gateways[(database, ttl)] = LocalServer.start(
                    base,
                    work / f"home-{database}-{ttl}",
                    engine_url=stub_url,
                    engine_api_key="stub",
                    database_url=url,
                    catalog_cache_s=ttl,
                    **BENCH_LIMITS,
                )
            targets = {}
            for name, gateway in gateways.items():
                gateway.wait_ready()
                key = LorafleetClient(gateway.url, gateway.admin_key).create_tenant("bench")[
                    "api_key"
                ]
                tenant = LorafleetClient(gateway.url, key)
                tenant.push_adapter("a", adapter)
                for i in range(args.deployments):
                    tenant.deploy(f"d{i}", "a")
                targets[name] = key
            models = [f"d{i}" for i in range(args.deployments)]
            for r in range(args.rounds + 1):  # round 0 warms up
                for conc in clients:
                    for (database, ttl), gateway in gateways.items():
                        pid = gateway.process.pid
                        cpu0 = own_cpu_s(pid)
                        phase = run_load(
                            gateway.url,
                            targets[(database, ttl)],
                            models,
                            args.requests,
                            conc,
                            seed=r,
                        )
                        cpu_s = own_cpu_s(pid) - cpu0
                        if r:
                            runs.setdefault((database, ttl, conc), []).append(
                                {
                                    "rps": phase.rps,
                                    "p50": phase.p50,
                                    "failed": phase.failed,
                                    "errors": phase.errors,
                                    "cpu_ms": cpu_s / args.requests * 1000,
                                }
                            )
            for gateway in gateways.values():
                gateway.stop()
            gateways.clear()
    finally:
        for gateway in gateways.values():
            gateway.stop()
        stub.terminate()
    report(runs, clients, args.rounds)


def report(runs: dict[tuple[str, str, int], list[dict]], clients: list[int], rounds: int) -> None:
    table = Table(title=f"the catalog on the chat hot path, {rounds} rounds — median [min–max]")
    for column in (
        "load",
        "snapshot cache",
        "catalog",
        "req/s",
        "p50 (ms)",
        "gateway CPU per request (ms)",
        "PostgreSQL ÷ SQLite req/s",
        "PostgreSQL ÷ SQLite CPU",
    ):
        table.add_column(column, justify="right")
    failed: dict[str, int] = {}
    for conc in clients:
        for ttl, cache in (("1", "1 s (default)"), ("0", "off")):
            sqlite, postgres = runs[("SQLite", ttl, conc)], runs[("PostgreSQL", ttl, conc)]
            for database, rows in (("SQLite", sqlite), ("PostgreSQL", postgres)):
                for x in rows:
                    for error, count in x["errors"].items():
                        key = f"{database}, cache {cache}, {conc} clients: {error}"
                        failed[key] = failed.get(key, 0) + count
                ratios = ("", "")
                if database == "PostgreSQL":  # per round: both measured back to back
                    ratios = (
                        spread([p["rps"] / s["rps"] for p, s in zip(postgres, sqlite)], digits=3),
                        spread(
                            [p["cpu_ms"] / s["cpu_ms"] for p, s in zip(postgres, sqlite)], digits=3
                        ),
                    )
                table.add_row(
                    f"{conc} clients",
                    cache,
                    database,
                    spread([x["rps"] for x in rows], digits=0),
                    spread([x["p50"] for x in rows], 1000, 2),
                    spread([x["cpu_ms"] for x in rows], digits=3),
                    *ratios,
                )
    console.print(table)
    if failed:
        console.print(
            "[red]failed requests:[/red] " + "; ".join(f"{k} ×{n}" for k, n in failed.items())
        )
        raise SystemExit(1)
    medians = {k: statistics.median(x["rps"] for x in v) for k, v in runs.items()}
    console.print(
        "default cache, PostgreSQL ÷ SQLite req/s: "
        + ", ".join(
            f"{c} clients {medians[('PostgreSQL', '1', c)] / medians[('SQLite', '1', c)]:.3f}"
            for c in clients
        )
    )


if __name__ == "__main__":
    main()

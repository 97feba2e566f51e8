"""The request log's cost in the catalog: bytes per request (its row and indexes), what a million
requests add, how fast the gateway's batched writes go in and how fast retention takes rows out,
on SQLite and on PostgreSQL side by side in one run.

Rows go in through the gateway's own writer (`RequestLog`: a batch per flush, as many rows as
`--rate` requests per second leave in a flush period), dated `--rate` per second; retention then
deletes the older half through garbage collection's own rules, and as many rows are written again
to see whether the catalog reuses their space (it grows only where it does not).

    .venv/bin/python loadtests/bench_request_log.py [--rows 200000] [--rate 100]
        [--postgres-url postgresql+psycopg://lorafleet:lorafleet@127.0.0.1:5432/postgres]

The PostgreSQL role must be allowed to create databases (`make services` starts such a server):
the benchmark creates one of its own and drops it afterwards. `--postgres-url ''` skips it.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench_catalog import postgres_database
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from sqlalchemy import func, select, text

from lorafleet.adapters.catalog import RequestRecord, open_catalog
from lorafleet.adapters.garbage import DAY_S, Retention, _apply_retention
from lorafleet.adapters.tenants import create_tenant
from lorafleet.serve.feedback.request_log import LoggedRequest, RequestLog, new_request_id
from lorafleet.serve.metrics import Metrics
from lorafleet.serve.settings import Settings

console = Console(width=160)
MB = 1000**2


@dataclass(frozen=True)
class Cost:
    backend: str
    bytes_per_row: float  # the table and its indexes
    write_rows_s: float  # rows per second the batched writer puts in
    delete_rows_s: float  # rows per second retention takes out
    # size after deleting half and writing as many rows again ÷ before: 1 where the catalog reuses
    # the space of deleted rows, up to 1.5 where it does not
    growth_after_reuse: float


def _rows(tenant_id: int, start: float, rate: float, first: int, n: int) -> list[LoggedRequest]:
    """`n` rows as the chat path hands them over: a deployment's answer, its adapter's digest,
    tokens, latency and confidence."""
    return [
        LoggedRequest(
            request_id=new_request_id(),
            tenant_id=tenant_id,
            key_id=1,
            at=start + (first + i) / rate,
            status=200,
            error_code=None,
            prompt_tokens=812,
            completion_tokens=64,
            latency_s=0.4213,
            stream=i % 3 == 0,
            deployment_id=1,
            deployment="invoices",
            rollout_id=None,
            variant="stable",
            digest="45040a7c538f41f38e394e6cf50bcb412074e1a771976464b09257ca94c7f445",
            confidence_mean=-0.2957,
            confidence_min=-0.9555,
        )
        for i in range(n)
    ]


def _size(engine, backend: str) -> int:
    """Bytes of the requests table and its indexes."""
    with engine.connect() as db:
        if backend == "sqlite":
            return db.exec_driver_sql(
                "SELECT sum(pgsize) FROM dbstat WHERE name = 'requests' "
                "OR name IN (SELECT name FROM sqlite_schema WHERE tbl_name = 'requests' "
                "AND type = 'index')"
            ).scalar_one()
        return db.execute(text("SELECT pg_total_relation_size('requests')")).scalar_one()


def measure(backend: str, url: str, rows: int, rate: float, progress: Progress) -> Cost:
    engine, sessions = open_catalog(url)
    try:
        with sessions() as session:
            tenant, _ = create_tenant(session, "acme")
            tenant_id = tenant.id
        flush_s = Settings().request_log_flush_s
        batch = max(1, round(rate * flush_s))
        writer = RequestLog(sessions, Metrics(), flush_s)
        start = time.time() - 2 * rows / rate  # the rows end a run's length ago

        def write(first: int, count: int, task) -> float:
            spent = 0.0
            for at in range(first, first + count, batch):
                for row in _rows(tenant_id, start, rate, at, min(batch, first + count - at)):
                    writer.add(row)
                t0 = time.perf_counter()
                writer.flush()
                spent += time.perf_counter() - t0
                progress.advance(task, batch)
            return spent

        task = progress.add_task(f"{backend}: writing {rows:,} rows", total=rows)
        spent = write(0, rows, task)
        if backend == "postgresql":
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as db:
                db.exec_driver_sql("VACUUM ANALYZE requests")
        with sessions() as session:
            assert session.scalar(select(func.count()).select_from(RequestRecord)) == rows
        size = _size(engine, backend)

        # retention: everything older than the middle row goes, as gc deletes it
        middle = start + rows / 2 / rate
        now = middle + DAY_S
        t0 = time.perf_counter()
        deleted = _apply_retention(sessions, Retention(requests_days=1.0), now, False)["requests"]
        delete_s = time.perf_counter() - t0
        if backend == "postgresql":  # autovacuum's work, done now
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as db:
                db.exec_driver_sql("VACUUM requests")
        task = progress.add_task(f"{backend}: writing {deleted:,} more", total=deleted)
        write(rows, deleted, task)
        return Cost(
            backend,
            size / rows,
            rows / spent,
            deleted / delete_s,
            _size(engine, backend) / size,
        )
    finally:
        engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--rate", type=float, default=100, help="requests per second")
    parser.add_argument(
        "--postgres-url", default="postgresql+psycopg://lorafleet:lorafleet@127.0.0.1:5432/postgres"
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lorafleet-request-log-"))
    costs = []
    with Progress(console=console, transient=True) as progress:
        sqlite_url = f"sqlite:///{work / 'catalog.db'}"
        costs.append(measure("sqlite", sqlite_url, args.rows, args.rate, progress))
        if args.postgres_url:
            with postgres_database(args.postgres_url) as url:
                costs.append(measure("postgresql", url, args.rows, args.rate, progress))

    month = args.rate * 30 * DAY_S
    table = Table(
        title=f"the request log: {args.rows:,} rows written in batches of {args.rate:g} req/s "
        "× the flush period"
    )
    for column in (
        "catalog",
        "bytes per request = MB per million",
        f"GB kept for 30 days at {args.rate:g} req/s",
        "writes (rows/s)",
        "retention deletes (rows/s)",
        "size after ½ deleted and as many written",
    ):
        table.add_column(column, justify="right")
    for c in costs:
        table.add_row(
            c.backend,
            f"{c.bytes_per_row:.0f}",
            f"{c.bytes_per_row * month / 1000**3:.1f}",
            f"{c.write_rows_s:,.0f}",
            f"{c.delete_rows_s:,.0f}",
            f"{c.growth_after_reuse:.2f}×",
        )
    console.print(table)


if __name__ == "__main__":
    main()

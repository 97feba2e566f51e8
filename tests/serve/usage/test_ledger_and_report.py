"""Usage on its way to the catalog and back out as the report, on real SQLite and PostgreSQL
catalogs (no engine): the ledger sums requests per day and row, every flush adds to the stored
rows (two gateways at once included), a failed write is kept for the next, and the report groups,
totals and writes CSV from the same rows."""

from __future__ import annotations

import csv
import io
import threading
from datetime import UTC, date, datetime

import pytest

from lorafleet.adapters.catalog import (
    Adapter,
    AdapterVersion,
    RequestRecord,
    Tenant,
    UsageDay,
    open_catalog,
)
from lorafleet.errors import InvalidRequest
from lorafleet.serve.feedback.request_log import LoggedRequest, new_request_id
from lorafleet.serve.metrics import Metrics
from lorafleet.serve.usage import records, report
from lorafleet.serve.usage.ledger import UsageLedger
from lorafleet.serve.usage.periods import period_end, period_start, reset_at, utc_day
from lorafleet.serve.usage.prices import NANOS, Prices

DIGEST = "d" * 64
DAY_1 = datetime(2026, 11, 30, 23, 59, 59, tzinfo=UTC).timestamp()
DAY_2 = datetime(2026, 12, 1, 0, 0, 1, tzinfo=UTC).timestamp()


def _request(
    tenant_id: int,
    at: float,
    status: int = 200,
    deployment: str = "reader",
    batch: bool = False,
    prompt: int = 10,
    completion: int = 4,
    images: int = 1,
) -> LoggedRequest:
    return LoggedRequest(
        request_id=new_request_id(),
        tenant_id=tenant_id,
        key_id=None,
        at=at,
        status=status,
        error_code=None if status == 200 else "engine_error",
        prompt_tokens=prompt,
        completion_tokens=completion,
        latency_s=0.1,
        stream=False,
        deployment=deployment,
        digest=DIGEST if deployment else "",
        batch_id="batch_1" if batch else None,
        images=images,
        prefill_s=0.25,
        decode_s=0.5,
    )


@pytest.fixture
def catalog(catalog_url):
    _, sessions = open_catalog(catalog_url)
    with sessions() as session:
        tenants = [Tenant(name=name, key_hash=name) for name in ("acme", "other")]
        session.add_all(tenants)
        session.flush()
        adapter = Adapter(tenant_id=tenants[0].id, name="ext")
        session.add(adapter)
        session.flush()
        session.add(
            AdapterVersion(
                adapter_id=adapter.id,
                version=2,
                digest=DIGEST,
                rank=8,
                alpha=16,
                target_modules=["q_proj"],
                size_bytes=1,
            )
        )
        session.commit()
        return sessions, [t.id for t in tenants]


def test_prices_turn_usage_into_billionths_of_the_currency():
    prices = Prices(
        prompt_per_million=2.0, completion_per_million=10.0, per_image=0.01, per_engine_hour=36.0
    )
    # 1000 prompt tokens 0.002, 100 completion 0.001, 2 images 0.02, 10 s of engine 0.1
    assert prices.cost_nanos(1000, 100, 2, 10.0) == round(0.123 * NANOS)
    assert Prices(0, 0, 0, 0).cost_nanos(10**9, 10**9, 10**6, 1e6) == 0
    overridden = prices.overridden({"per_image": 1, "unknown": 5, "per_engine_hour": None})
    assert (overridden.per_image, overridden.per_engine_hour) == (1.0, 36.0)


def test_periods_are_utc_days_and_calendar_months():
    assert utc_day(DAY_1) == date(2026, 11, 30) and utc_day(DAY_2) == date(2026, 12, 1)
    assert period_start("month", DAY_1) == date(2026, 11, 1)
    assert period_end("month", date(2026, 12, 1)) == date(2027, 1, 1)
    assert period_end("day", date(2026, 12, 31)) == date(2027, 1, 1)
    assert reset_at("day", date(2026, 11, 30)) == DAY_2 - 1


def test_the_ledger_sums_per_day_and_row_and_every_flush_adds(catalog):
    sessions, (acme, other) = catalog
    ledger = UsageLedger(sessions, Metrics(), flush_s=1.0)
    for at in (DAY_1, DAY_1, DAY_2):
        ledger.add(_request(acme, at), cost_nanos=100)
    ledger.add(_request(acme, DAY_2, batch=True), cost_nanos=100)
    ledger.add(_request(acme, DAY_2, status=500), cost_nanos=0)
    ledger.add(_request(other, DAY_2, deployment=""), cost_nanos=0)
    assert ledger.flush() == 5  # rows: (acme, day 1), (acme, day 2) live, batch, failed; other's
    ledger.add(_request(acme, DAY_1), cost_nanos=100)
    assert ledger.flush() == 1 and ledger.flush() == 0
    with sessions() as session:
        rows = {
            (r.tenant_id, r.day, r.batch, r.failed): r
            for r in session.query(UsageDay).order_by(UsageDay.day)
        }
    day_1 = rows[(acme, date(2026, 11, 30), False, False)]
    assert (day_1.requests, day_1.prompt_tokens, day_1.completion_tokens) == (3, 30, 12)
    assert (day_1.images, day_1.cost_nanos) == (3, 300)
    assert day_1.prefill_s == pytest.approx(0.75) and day_1.decode_s == pytest.approx(1.5)
    assert rows[(acme, date(2026, 12, 1), True, False)].requests == 1
    assert rows[(acme, date(2026, 12, 1), False, True)].requests == 1
    assert rows[(other, date(2026, 12, 1), False, False)].deployment == ""


def test_a_failed_write_is_kept_and_written_with_the_next(catalog, tmp_path):
    sessions, (acme, _) = catalog
    _, broken = open_catalog(f"sqlite:///{tmp_path / 'elsewhere.db'}")
    with broken() as session:  # a catalog that refuses the write
        session.execute(UsageDay.__table__.delete())
        session.connection().exec_driver_sql("DROP TABLE usage_days")
        session.commit()
    metrics = Metrics()
    ledger = UsageLedger(broken, metrics, flush_s=1.0)
    ledger.add(_request(acme, DAY_1), cost_nanos=7)
    assert ledger.flush() == 0
    assert metrics.usage_flush_failures._value.get() == 1
    ledger.add(_request(acme, DAY_1), cost_nanos=7)  # meanwhile
    ledger.sessions = sessions
    assert ledger.flush() == 1
    with sessions() as session:
        (row,) = session.query(UsageDay).all()
    assert (row.requests, row.cost_nanos) == (2, 14)


def test_two_gateways_flushing_the_same_rows_at_once_lose_nothing(catalog):
    sessions, (acme, other) = catalog
    ledgers = [UsageLedger(sessions, Metrics(), flush_s=1.0) for _ in range(2)]
    rounds = 25

    def work(ledger: UsageLedger) -> None:
        for _ in range(rounds):
            for tenant in (other, acme):  # the same rows, each gateway in its own order
                ledger.add(_request(tenant, DAY_2), cost_nanos=1)
            ledger.flush()

    threads = [threading.Thread(target=work, args=(ledger,)) for ledger in ledgers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with sessions() as session:
        counts = {r.tenant_id: r.requests for r in session.query(UsageDay)}
    assert counts == {acme: 2 * rounds, other: 2 * rounds}


def test_the_report_groups_totals_and_writes_the_same_rows_as_csv(catalog):
    sessions, (acme, other) = catalog
    ledger = UsageLedger(sessions, Metrics(), flush_s=1.0)
    prices = Prices(1.0, 1.0, 0.5, 0.0)
    for request in (
        _request(acme, DAY_1),
        _request(acme, DAY_2, prompt=20),
        _request(acme, DAY_2, batch=True),
        _request(acme, DAY_2, status=503, prompt=999),
        _request(other, DAY_2),
    ):
        cost = (
            prices.cost_nanos(request.prompt_tokens, request.completion_tokens, request.images, 0)
            if request.status == 200
            else 0
        )
        ledger.add(request, cost)
    ledger.flush()
    with sessions() as session:
        flat = report.usage_rows(session, [acme], date(2026, 11, 1), date(2026, 12, 31), [])
        by_day = report.usage_rows(
            session, [acme], date(2026, 11, 1), date(2026, 12, 31), ["day", "adapter"]
        )
        everyone = report.usage_rows(
            session, None, date(2026, 12, 1), date(2026, 12, 1), ["tenant"]
        )
        only_day_1 = report.usage_rows(session, [acme], date(2026, 11, 30), date(2026, 11, 30), [])
    # live and batch apart; the failed request counted, its tokens not
    live, batch = flat
    assert (live.kind, live.requests, live.failed_requests) == ("live", 2, 1)
    assert (live.prompt_tokens, live.completion_tokens, live.images) == (30, 8, 2)
    assert live.cost == pytest.approx((30 + 8) / 1e6 + 2 * 0.5)
    assert live.engine_seconds == pytest.approx(1.5)  # answered only
    assert (batch.kind, batch.requests) == ("batch", 1)
    assert live.day is None and live.tenant is None
    assert [(r.day, r.kind, r.adapter) for r in by_day] == [
        (date(2026, 11, 30), "live", "ext@2"),
        (date(2026, 12, 1), "live", "ext@2"),
        (date(2026, 12, 1), "batch", "ext@2"),
    ]
    assert {r.tenant for r in everyone} == {"acme", "other"}
    assert only_day_1[0].requests == 1
    total = report.total_of(flat)
    assert (total.requests, total.failed_requests, total.prompt_tokens) == (3, 1, 40)
    # CSV: the header first, then the rows as JSON has them
    text = report.to_csv(by_day, ["day", "adapter"], "EUR")
    assert text.splitlines()[0] == (
        "day,adapter,digest,kind,requests,failed_requests,prompt_tokens,completion_tokens,"
        "images,engine_seconds,cost,currency"
    )
    for line, row in zip(csv.DictReader(io.StringIO(text)), by_day, strict=True):
        assert line["day"] == row.day.isoformat() and line["digest"] == DIGEST
        assert int(line["prompt_tokens"]) == row.prompt_tokens
        assert float(line["cost"]) == row.cost and line["currency"] == "EUR"


def test_report_parameters_are_checked_with_clear_errors():
    assert report.parse_group_by(["day,deployment", "adapter"], all_tenants=False) == [
        "day",
        "deployment",
        "adapter",
    ]
    with pytest.raises(InvalidRequest, match="unknown tenant"):
        report.parse_group_by(["tenant"], all_tenants=False)
    assert report.parse_group_by(["tenant"], all_tenants=True) == ["tenant"]
    with pytest.raises(InvalidRequest, match="unknown week"):
        report.parse_group_by(["week"], all_tenants=True)
    with pytest.raises(InvalidRequest, match="YYYY-MM-DD"):
        report.parse_day("12/01/2026", "start", date(2026, 12, 1))
    assert report.parse_day(None, "start", date(2026, 12, 1)) == date(2026, 12, 1)


def test_report_ranges_are_checked(catalog):
    sessions, (acme, _) = catalog
    with sessions() as session:
        with pytest.raises(InvalidRequest, match="before start"):
            report.usage_rows(session, [acme], date(2026, 12, 2), date(2026, 12, 1), [])
        with pytest.raises(InvalidRequest, match="at most"):
            report.usage_rows(session, [acme], date(2020, 1, 1), date(2026, 12, 1), [])


def test_the_request_log_keeps_each_requests_images_and_engine_times(catalog):
    from lorafleet.serve.feedback.request_log import RequestLog

    sessions, (acme, _) = catalog
    log = RequestLog(sessions, Metrics(), flush_s=1.0)
    log.add(_request(acme, DAY_1, images=3))
    log.flush()
    with sessions() as session:
        row = session.query(RequestRecord).one()
    assert (row.images, row.prefill_s, row.decode_s) == (3, 0.25, 0.5)


def test_a_periods_spending_is_the_answered_requests_of_the_period(catalog):
    sessions, (acme, _) = catalog
    ledger = UsageLedger(sessions, Metrics(), flush_s=1.0)
    ledger.add(_request(acme, DAY_1), cost_nanos=5)  # November
    ledger.add(_request(acme, DAY_2), cost_nanos=7)  # December
    ledger.add(_request(acme, DAY_2, status=500), cost_nanos=0)
    ledger.flush()
    with sessions() as session:
        december = records.period_spent(session, acme, "month", date(2026, 12, 1))
        november = records.period_spent(session, acme, "month", date(2026, 11, 1))
        day = records.period_spent(session, acme, "day", date(2026, 11, 30))
    assert (december.tokens, december.cost_nanos) == (14, 7)
    assert (november.tokens, november.cost_nanos) == (14, 5) and day == november

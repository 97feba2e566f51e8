"""The request log's buffer and feedback's catalog rules on real SQLite and PostgreSQL catalogs
(no engine)."""

from __future__ import annotations

import threading
import time

import pytest
from pydantic import ValidationError

from lorafleet.adapters.catalog import Feedback, RequestRecord, Tenant, open_catalog
from lorafleet.errors import InvalidRequest
from lorafleet.serve.feedback.confidence import Confidence, summarize, token_logprobs
from lorafleet.serve.feedback.records import (
    TimeRange,
    feedback_page,
    parse_time,
    record_feedback,
    request_page,
)
from lorafleet.serve.feedback.request_log import LoggedRequest, RequestLog, new_request_id
from lorafleet.serve.feedback.schemas import FeedbackCreate
from lorafleet.serve.metrics import Metrics


def _row(tenant_id: int, request_id: str, at: float, status: int = 200) -> LoggedRequest:
    return LoggedRequest(
        request_id=request_id,
        tenant_id=tenant_id,
        key_id=1,
        at=at,
        deployment_id=7,
        deployment="d",
        rollout_id=3,
        variant="canary",
        digest="a" * 64,
        status=status,
        error_code=None,
        prompt_tokens=10,
        completion_tokens=4,
        latency_s=0.25,
        stream=False,
        confidence_mean=-0.5,
        confidence_min=-2.0,
    )


@pytest.fixture
def catalog(catalog_url):
    _, sessions = open_catalog(catalog_url)
    with sessions() as session:
        tenants = [Tenant(name=name, key_hash=name) for name in ("acme", "other")]
        session.add_all(tenants)
        session.commit()
        return sessions, [t.id for t in tenants]


def test_rows_wait_in_the_buffer_until_a_flush_writes_them_all_at_once(catalog):
    sessions, (acme, _) = catalog
    log = RequestLog(sessions, Metrics(), flush_s=60)
    ids = [new_request_id() for _ in range(3)]
    for i, request_id in enumerate(ids):
        log.add(_row(acme, request_id, 1000.0 + i))
    with sessions() as session:
        assert session.query(RequestRecord).count() == 0  # nothing per request
    assert log.flush() == 3 and log.flush() == 0
    with sessions() as session:
        assert sorted(r.request_id for r in session.query(RequestRecord)) == sorted(ids)


def test_a_full_buffer_drops_the_oldest_and_counts_them(catalog):
    sessions, (acme, _) = catalog
    metrics = Metrics()
    log = RequestLog(sessions, metrics, flush_s=60, max_pending=2)
    for i in range(5):
        log.add(_row(acme, new_request_id(), float(i)))
    assert log.flush() == 2
    assert metrics.registry.get_sample_value("lorafleet_request_log_dropped_total") == 3
    with sessions() as session:
        assert sorted(r.at for r in session.query(RequestRecord)) == [3.0, 4.0]


def test_a_refused_batch_is_dropped_and_counted_not_retried_forever(catalog):
    sessions, (acme, _) = catalog
    metrics = Metrics()
    log = RequestLog(sessions, metrics, flush_s=60)
    same = new_request_id()
    log.add(_row(acme, same, 1.0))
    log.add(_row(acme, same, 2.0))  # a duplicate id: the catalog refuses the batch
    assert log.flush() == 0
    assert metrics.registry.get_sample_value("lorafleet_request_log_dropped_total") == 2
    log.add(_row(acme, new_request_id(), 3.0))
    assert log.flush() == 1  # the next batch is written


def test_find_request_sees_this_gateways_buffer_and_waits_for_anothers(catalog):
    sessions, (acme, other) = catalog
    mine, theirs = (
        RequestLog(sessions, Metrics(), flush_s=0.2),
        RequestLog(sessions, Metrics(), flush_s=0.2),
    )
    local, remote = new_request_id(), new_request_id()
    mine.add(_row(acme, local, 1.0))
    with sessions() as session:
        # its own buffer is written
        assert mine.find_request(session, acme, local, wait_s=0).request_id == local
    theirs.add(_row(acme, remote, 2.0))
    threading.Timer(0.3, theirs.flush).start()  # the other gateway's next flush
    with sessions() as session:
        started = time.monotonic()
        assert mine.find_request(session, acme, remote, wait_s=5).request_id == remote
        assert time.monotonic() - started < 4
        started = time.monotonic()
        # another tenant's: at once
        assert mine.find_request(session, other, remote, wait_s=5) is None
        assert mine.find_request(session, acme, "not-an-id", wait_s=5) is None
        assert time.monotonic() - started < 1


def test_feedback_is_one_row_per_request_and_copies_its_route(catalog):
    sessions, (acme, _) = catalog
    log = RequestLog(sessions, Metrics(), flush_s=60)
    request_id, failed = new_request_id(), new_request_id()
    log.add(_row(acme, request_id, 100.0))
    log.add(_row(acme, failed, 101.0, status=503))
    log.flush()
    with sessions() as session:
        tenant = session.get(Tenant, acme)
        request = log.find_request(session, acme, request_id, wait_s=0)
        row, created = record_feedback(
            session,
            tenant,
            request,
            FeedbackCreate(id=request_id, score=-1, correction="{}"),
            1,
            200.0,
        )
        assert created and (row.value, row.variant, row.rollout_id, row.at) == (
            0.0,
            "canary",
            3,
            100.0,
        )
        row, created = record_feedback(
            session, tenant, request, FeedbackCreate(id=request_id, score=0.75), 1, 300.0
        )
        assert not created and (row.value, row.correction, row.created_at, row.updated_at) == (
            0.75,
            None,
            200.0,
            300.0,
        )
        assert session.query(Feedback).count() == 1
        with pytest.raises(InvalidRequest, match="has no answer to judge"):
            record_feedback(
                session,
                tenant,
                log.find_request(session, acme, failed, wait_s=0),
                FeedbackCreate(id=failed, score=1),
                1,
                300.0,
            )


@pytest.mark.parametrize("score", [2, -0.5, 1.5, -2])
def test_scores_are_thumbs_or_on_the_unit_interval(score):
    with pytest.raises(ValidationError, match="score must be -1 or 1"):
        FeedbackCreate(id="x", score=score)
    assert (
        FeedbackCreate(id="x", score=-1).value == 0.0
        and FeedbackCreate(id="x", score=0.3).value == 0.3
    )


def test_pages_go_from_newest_to_oldest_within_the_time_range(catalog):
    sessions, (acme, other) = catalog
    log = RequestLog(sessions, Metrics(), flush_s=60)
    ids = [new_request_id() for _ in range(5)]
    for i, request_id in enumerate(ids):
        log.add(_row(acme, request_id, 100.0 + i))
    log.add(_row(other, new_request_id(), 102.0))
    log.flush()
    with sessions() as session:
        tenant = session.get(Tenant, acme)
        record_feedback(
            session,
            tenant,
            log.find_request(session, acme, ids[3], wait_s=0),
            FeedbackCreate(id=ids[3], score=1),
            None,
            200.0,
        )
        first = request_page(session, tenant, TimeRange(since=101.0), None, None, 2)
        assert [r.id for r in first.data] == [ids[4], ids[3]] and first.data[1].feedback == 1
        second = request_page(session, tenant, TimeRange(since=101.0), None, first.next_cursor, 2)
        assert [r.id for r in second.data] == [ids[2], ids[1]] and second.next_cursor is None
        assert [
            r.id for r in request_page(session, tenant, TimeRange(until=101.0), None, None, 10).data
        ] == ids[:1]
        assert request_page(session, tenant, TimeRange(), "other-deployment", None, 10).data == []
        for bad in ("x", "²", "9" * 40, "-1"):
            with pytest.raises(InvalidRequest, match="invalid cursor"):
                request_page(session, tenant, TimeRange(), None, bad, 10)
        data, cursor = feedback_page(session, tenant, TimeRange(), "d", None, 10)
        assert [f.id for f in data] == [ids[3]] and cursor is None


def test_times_are_epoch_seconds_or_iso_8601():
    assert parse_time("1700000000", "since") == 1_700_000_000
    assert parse_time("2023-11-14T22:13:20Z", "since") == 1_700_000_000
    # UTC unless it says otherwise
    assert parse_time("2023-11-14T22:13:20", "since") == 1_700_000_000
    assert parse_time(None, "since") is None
    for bad in ("yesterday", "nan", "inf"):
        with pytest.raises(InvalidRequest, match="'since'"):
            parse_time(bad, "since")


def test_confidence_is_the_mean_and_least_of_the_finite_token_logprobs():
    choice = {
        "logprobs": {
            "content": [
                {"logprob": -0.5},
                {"logprob": -1.5},
                {"logprob": float("-inf")},
                {"token": "x"},
            ]
        }
    }
    assert list(token_logprobs(choice)) == [-0.5, -1.5]
    assert summarize(list(token_logprobs(choice))) == Confidence(mean=-1.0, least=-1.5)
    assert summarize([]) is None and list(token_logprobs({"logprobs": None})) == []

"""A batch's input lines as checked at upload, its files and batches in a real catalog (SQLite and
PostgreSQL): a tenant's own only, the limits, the lease that lets one gateway record a line once,
and the output and error files in OpenAI's line shape. (Through the API and the engine:
test_batches_api.py.)"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator

import pytest
from sqlalchemy.orm import sessionmaker

from lorafleet.adapters.catalog import BatchLine, Tenant, open_catalog
from lorafleet.errors import Conflict, InvalidRequest, NotFound, QuotaExceeded
from lorafleet.serve.batches import records
from lorafleet.serve.batches.lines import read_lines
from lorafleet.serve.batches.results import result_files

BODY = {"model": "reader", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def _line(custom_id: str, **changes) -> str:
    request = {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions"}
    request["body"] = BODY
    return json.dumps(request | changes)


def _file(*lines: str) -> bytes:
    return ("\n".join(lines) + "\n").encode()


def test_a_files_lines_are_read_in_order_blank_lines_skipped():
    read = read_lines(_file(_line("a"), "", _line("b")), 10_000, 0, {"reader"})
    assert [(r.line, r.custom_id, r.body["model"]) for r in read] == [
        (0, "a", "reader"),
        (1, "b", "reader"),
    ]


@pytest.mark.parametrize(
    ("bad", "said"),
    [
        ("{not json", "line 2: not valid JSON"),
        ("[1, 2]", "line 2: not a JSON object"),
        (_line("a"), "line 2: custom_id 'a' is not unique"),
        (_line(""), "line 2: 'custom_id' must be a string"),
        (_line("x", method="GET"), "line 2: 'method' must be \"POST\""),
        (_line("x", url="/v1/embeddings"), "line 2: 'url' must be '/v1/chat/completions'"),
        (_line("x", body={**BODY, "model": "nope"}), "line 2: deployment 'nope' does not exist"),
        (_line("x", body={**BODY, "messages": []}), "line 2: 'body.messages' must be"),
        (_line("x", body={**BODY, "stream": True}), "line 2: 'body.stream' must be false"),
        (_line("x", extra=1), "line 2: unknown field(s) extra"),
        (_line("x", body={**BODY, "messages": [{"content": "y" * 5000}]}), "line 2: larger than"),
    ],
)
def test_a_bad_line_is_refused_naming_it(bad: str, said: str):
    with pytest.raises(InvalidRequest) as refused:
        read_lines(_file(_line("a"), bad), 4000, 0, {"reader"})
    assert said in refused.value.message, refused.value.message
    assert refused.value.status == 400


def test_more_lines_than_the_tenants_limit_are_refused_naming_the_first_over_it():
    with pytest.raises(InvalidRequest, match="line 3: the file has more than 2 requests"):
        read_lines(_file(_line("a"), _line("b"), _line("c")), 10_000, 2, {"reader"})
    with pytest.raises(InvalidRequest, match="not UTF-8"):
        read_lines(b"\xff\xfe", 10_000, 0, {"reader"})
    with pytest.raises(InvalidRequest, match="no request lines"):
        read_lines(b"\n\n", 10_000, 0, {"reader"})


@pytest.fixture
def sessions(catalog_url: str) -> Iterator[sessionmaker]:
    engine, made = open_catalog(catalog_url)
    yield made
    engine.dispose()


def _tenant(sessions: sessionmaker, name: str) -> int:
    with sessions() as session:
        tenant = Tenant(name=name, key_hash=hashlib.sha256(name.encode()).hexdigest())
        session.add(tenant)
        session.commit()
        return tenant.id


def _input_file(sessions: sessionmaker, tenant_id: int, lines: int = 3) -> str:
    with sessions() as session:
        return records.add_file(
            session, tenant_id, "batch", "in.jsonl", "d" * 64, 100, lines, 0, 1000.0
        ).id


def test_files_and_batches_are_their_tenants_alone(sessions):
    acme, globex = _tenant(sessions, "acme"), _tenant(sessions, "globex")
    file_id = _input_file(sessions, acme)
    with sessions() as session:
        batch = records.create_batch(
            session, acme, file_id, "/v1/chat/completions", "24h", None, 0, 0, 1000.0
        )
        assert (batch.status, batch.total, batch.expires_at) == ("validating", 3, 1000.0 + 86400)
        for lookup in (
            lambda: records.get_file(session, globex, file_id),
            lambda: records.get_batch(session, globex, batch.id),
            lambda: records.cancel_batch(session, globex, batch.id, 1001.0),
            lambda: records.create_batch(
                session, globex, file_id, "/v1/chat/completions", "24h", None, 0, 0, 1000.0
            ),
        ):
            with pytest.raises(NotFound):
                lookup()
        assert records.list_files(session, globex, None, None, 10) == []
        assert [b.id for b in records.list_batches(session, acme, None, 10)] == [batch.id]
        # an unfinished batch's input stays
        with pytest.raises(Conflict, match="cancel it first"):
            records.delete_file(session, acme, file_id)


def test_limits_on_files_batches_and_lines(sessions):
    acme = _tenant(sessions, "acme")
    file_id = _input_file(sessions, acme, lines=5)
    with sessions() as session:
        with pytest.raises(QuotaExceeded, match="stores 1 files"):
            records.add_file(session, acme, "batch", "b.jsonl", "e" * 64, 1, 1, 1, 1000.0)
        with pytest.raises(InvalidRequest, match="has 5 requests; this tenant's batches take at"):
            records.create_batch(
                session, acme, file_id, "/v1/chat/completions", "24h", None, 0, 4, 1000.0
            )
        records.create_batch(session, acme, file_id, "/v1/chat/completions", "24h", None, 1, 5, 1.0)
        with pytest.raises(QuotaExceeded, match="1 batches not yet finished"):
            records.create_batch(
                session, acme, file_id, "/v1/chat/completions", "24h", None, 1, 5, 1.0
            )


def _row(batch_id: str, line: int, status: int = 200) -> BatchLine:
    return BatchLine(
        batch_id=batch_id,
        line=line,
        custom_id=f"c{line}",
        request_id=f"chatcmpl-{line}",
        status=status,
        body={"choices": []} if status == 200 else {"error": {"message": "no"}},
        at=1.0,
    )


def test_one_gateway_at_a_time_records_each_line_once_and_a_takeover_goes_on(sessions):
    acme = _tenant(sessions, "acme")
    file_id = _input_file(sessions, acme, lines=3)
    with sessions() as session:
        batch_id = records.create_batch(
            session, acme, file_id, "/v1/chat/completions", "24h", None, 0, 0, 1000.0
        ).id
        assert records.claim(session, "g1", 1000.0, 30) == {batch_id: "validating"}
        assert records.claim(session, "g2", 1010.0, 30) == {}  # g1's lease holds
        records.start(session, batch_id, "g1", 1010.0)
        assert records.record_line(session, batch_id, "g1", _row(batch_id, 0)).counted
        assert not records.record_line(session, batch_id, "g2", _row(batch_id, 1)).counted
        # g1 stops renewing: g2 takes over after the lease, and g1 can record nothing more
        assert records.claim(session, "g2", 1031.0, 30) == {batch_id: "in_progress"}
        assert records.record_line(session, batch_id, "g1", _row(batch_id, 1)).lost
        again = records.record_line(session, batch_id, "g2", _row(batch_id, 0))
        assert not again.counted and not again.lost  # finished before: never counted twice
        assert records.record_line(session, batch_id, "g2", _row(batch_id, 1, status=400)).counted
        batch = records.get_batch(session, acme, batch_id)
        session.refresh(batch)
        assert (batch.completed, batch.failed) == (1, 1)
        assert [r.line for r in records.finished_lines(session, batch_id)] == [0, 1]
        assert records.finish(session, batch_id, "g2", "completed", "file-o", "file-e", 1040.0)
        session.refresh(batch)
        assert (batch.status, batch.completed_at, batch.owner) == ("completed", 1040.0, None)
        assert records.finished_lines(session, batch_id) == []  # the files hold them now
        with pytest.raises(Conflict, match="cannot be cancelled"):
            records.cancel_batch(session, acme, batch_id, 1050.0)


def test_a_cancelled_batch_stops_once(sessions):
    acme = _tenant(sessions, "acme")
    file_id = _input_file(sessions, acme)
    with sessions() as session:
        batch = records.create_batch(
            session, acme, file_id, "/v1/chat/completions", "24h", None, 0, 0, 1000.0
        )
        cancelled = records.cancel_batch(session, acme, batch.id, 1001.0)
        assert (cancelled.status, cancelled.cancelling_at) == ("cancelling", 1001.0)
        assert records.cancel_batch(session, acme, batch.id, 1002.0).cancelling_at == 1001.0


def test_the_output_and_error_files_have_openais_line_shape():
    requests = read_lines(
        _file(_line("ok"), _line("refused"), _line("never")), 10_000, 0, {"reader"}
    )
    finished = [_row("batch_x", 0), _row("batch_x", 1, status=400)]
    output, errors = result_files("batch_x", requests, finished, "cancelled")
    (answered,) = [json.loads(line) for line in output.splitlines()]
    assert answered["custom_id"] == "c0" and answered["error"] is None
    assert answered["response"] == {
        "status_code": 200,
        "request_id": "chatcmpl-0",
        "body": {"choices": []},
    }
    assert answered["id"].startswith("batch_req_")
    refused, never = [json.loads(line) for line in errors.splitlines()]
    assert refused["response"]["status_code"] == 400 and refused["error"] is None
    assert never["custom_id"] == "never" and never["response"] is None
    assert never["error"]["code"] == "batch_cancelled"


def test_the_cli_makes_batch_lines_of_chat_requests_and_of_training_examples():
    from lorafleet.errors import LorafleetError
    from lorafleet.serve.cli.batch import batch_lines

    chat = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    example = json.dumps(
        {
            "messages": [
                {"role": "user", "content": "What is it?"},
                {"role": "assistant", "content": "a red circle"},
            ]
        }
    )
    made = batch_lines("\n".join([chat, "", example, _line("own")]), "reader")
    lines = read_lines(made, 10_000, 0, {"reader"})
    assert [(r.custom_id, r.body["model"]) for r in lines] == [
        ("line-1", "reader"),
        ("line-3", "reader"),
        ("own", "reader"),
    ]
    assert lines[0].body["max_tokens"] == 4
    assert lines[1].body["messages"] == [{"role": "user", "content": "What is it?"}]
    with pytest.raises(LorafleetError, match="line 1: no model: pass --deployment"):
        batch_lines(chat, None)

"""Request ids, answer confidence, feedback and the request log through the real gateway and
engine, with the unmodified `openai` SDK."""

from __future__ import annotations

import math
import time

import httpx
import pytest

from tests.helpers import assert_openai_error, image_messages, poll_until, upload_folder

MAX_TOKENS = 6


@pytest.fixture(scope="module")
def deployed(server, make_adapter):
    """Two tenants, each with an adapter deployed as `assistant`."""
    import uuid

    from tests.conftest import TenantHandle

    handles = []
    with server.admin() as admin:
        for seed in (3, 4):
            created = admin.post(
                "/admin/tenants", json={"name": f"fb-{seed}-{uuid.uuid4().hex[:6]}"}
            ).json()
            handle = TenantHandle(name=created["name"], api_key=created["api_key"], url=server.url)
            with handle.http() as http:
                version = upload_folder(http, "ext", make_adapter(seed))
                response = http.put(
                    "/v1/deployments/assistant", json={"adapter": f"ext@{version['version']}"}
                )
                assert response.status_code == 200, response.text
            handles.append(handle)
    return handles


def _chat(tenant, **extra) -> httpx.Response:
    with tenant.http() as http:
        response = http.post(
            "/v1/chat/completions",
            json={
                "model": "assistant",
                "messages": image_messages(),
                "max_tokens": MAX_TOKENS,
                "temperature": 0,
                **extra,
            },
        )
    assert response.status_code == 200, response.text
    return response


def _logged(tenant, request_id: str) -> dict:
    """The request's row in the request log, once the gateway has written it."""

    def find():
        with tenant.http() as http:
            rows = http.get("/v1/requests", params={"limit": 50}).json()["data"]
        return next((row for row in rows if row["id"] == request_id), None)

    return poll_until(find, 15, f"request {request_id} in the request log")


def test_every_response_carries_its_id_in_the_header_and_the_body(deployed):
    tenant = deployed[0]
    response = _chat(tenant)
    request_id = response.headers["x-request-id"]
    assert (
        response.json()["id"] == request_id
        and request_id.startswith("chatcmpl-")
        and len(request_id) == 41
    )
    assert _chat(tenant).headers["x-request-id"] != request_id  # one per request
    client = tenant.openai()
    stream = client.chat.completions.create(
        model="assistant",
        messages=image_messages(),
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
    )
    ids = {chunk.id for chunk in stream}
    assert len(ids) == 1 and ids.pop().startswith("chatcmpl-")
    with tenant.http() as http:  # errors after admission carry one too
        error = http.post(
            "/v1/chat/completions", json={"model": "no-such", "messages": image_messages()}
        )
    assert error.status_code == 404 and error.headers["x-request-id"].startswith("chatcmpl-")
    logged = _logged(tenant, error.headers["x-request-id"])  # logged too, without a route
    assert (logged["status"], logged["error_code"], logged["deployment"]) == (
        404,
        "model_not_found",
        "",
    )


def test_logprobs_are_hidden_unless_asked_and_the_asked_answer_is_unchanged(deployed):
    client = deployed[0].openai()
    plain = client.chat.completions.create(
        model="assistant", messages=image_messages(), max_tokens=MAX_TOKENS, temperature=0
    )
    assert plain.choices[0].logprobs is None  # the gateway asked the engine for them, and hid them
    asked = client.chat.completions.create(
        model="assistant",
        messages=image_messages(),
        max_tokens=MAX_TOKENS,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = asked.choices[0].logprobs.content
    assert asked.choices[0].message.content == plain.choices[0].message.content
    assert len(content) == asked.usage.completion_tokens and all(
        len(t.top_logprobs) == 2 for t in content
    )
    stream = client.chat.completions.create(
        model="assistant",
        messages=image_messages(),
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
    )
    chunks = [c for c in stream if c.choices]
    assert all(c.choices[0].logprobs is None for c in chunks)
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks)
        == plain.choices[0].message.content
    )

    # the request log holds what the client saw: the answer's mean and least token log-probability
    row = _logged(deployed[0], asked.id)
    values = [t.logprob for t in content]
    assert math.isclose(
        row["confidence_mean"], sum(values) / len(values), rel_tol=1e-6, abs_tol=1e-9
    )
    assert math.isclose(row["confidence_min"], min(values), rel_tol=1e-6, abs_tol=1e-9)
    assert row["confidence_mean"] <= 0 and row["completion_tokens"] == len(values)


def test_feedback_is_scoped_to_the_tenant_idempotent_per_id_and_validated(deployed):
    mine, theirs = deployed
    # feedback right away: the log row may still be buffered
    request_id = _chat(mine).headers["x-request-id"]
    with mine.http() as http:
        first = http.post(
            "/v1/feedback",
            json={
                "id": request_id,
                "score": -1,
                "correction": "a blue square",
                "comment": "wrong colour",
            },
        )
        assert first.status_code == 201, first.text
        assert (first.json()["value"], first.json()["deployment"], first.json()["variant"]) == (
            0.0,
            "assistant",
            "stable",
        )
        again = http.post("/v1/feedback", json={"id": request_id, "score": 1})  # changed their mind
        assert (
            again.status_code == 200
            and again.json()["value"] == 1.0
            and again.json()["correction"] is None
        )
        listed = [f for f in http.get("/v1/feedback").json()["data"] if f["id"] == request_id]
        # one row per request: nothing counted twice
        assert len(listed) == 1 and listed[0]["score"] == 1
        for bad in (
            {"id": request_id, "score": 2},
            {"id": request_id, "score": -0.5},
            {"id": request_id},
            {"id": request_id, "score": 1, "extra": True},
            {"score": 1},
        ):
            assert_openai_error(http.post("/v1/feedback", json=bad), 400)
    with theirs.http() as http:  # another tenant's id does not exist for them, and is not changed
        started = time.monotonic()
        assert (
            assert_openai_error(
                http.post("/v1/feedback", json={"id": request_id, "score": -1}), 404
            )["code"]
            == "request_not_found"
        )
        assert time.monotonic() - started < 1.0  # known to be another tenant's: no wait for the log
        assert_openai_error(
            http.post("/v1/feedback", json={"id": "chatcmpl-" + "0" * 32, "score": 1}), 404
        )
        assert all(f["id"] != request_id for f in http.get("/v1/feedback").json()["data"])
    with mine.http() as http:
        assert (
            next(f for f in http.get("/v1/feedback").json()["data"] if f["id"] == request_id)[
                "score"
            ]
            == 1
        )


def test_the_request_log_pages_filters_by_time_and_shows_feedback(deployed):
    tenant, other = deployed
    before = time.time()
    ids = [_chat(tenant).headers["x-request-id"] for _ in range(3)]
    _logged(tenant, ids[-1])
    with tenant.http() as http:
        http.post("/v1/feedback", json={"id": ids[1], "score": 0.25})
        page = http.get("/v1/requests", params={"since": before, "limit": 2}).json()
        assert [row["id"] for row in page["data"]] == ids[:0:-1]  # newest first
        rest = http.get(
            "/v1/requests", params={"since": before, "limit": 2, "cursor": page["next_cursor"]}
        ).json()
        assert [row["id"] for row in rest["data"]] == ids[:1] and rest["next_cursor"] is None
        row = page["data"][1]
        assert row["feedback"] == 0.25 and row["status"] == 200 and row["deployment"] == "assistant"
        assert (
            row["variant"] == "stable" and len(row["adapter"]) == 64 and row["key_id"] is not None
        )
        assert row["latency_s"] > 0 and row["prompt_tokens"] > 0 and row["completion_tokens"] > 0
        iso = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(before + 3600))
        assert http.get("/v1/requests", params={"since": iso}).json()["data"] == []
        assert assert_openai_error(http.get("/v1/requests", params={"since": "yesterday"}), 400)[
            "code"
        ] == ("invalid_time")
        assert (
            assert_openai_error(http.get("/v1/requests", params={"cursor": "x"}), 400)["code"]
            == "invalid_cursor"
        )
    with other.http() as http:  # every tenant sees its own requests only
        assert not {
            row["id"] for row in http.get("/v1/requests", params={"limit": 1000}).json()["data"]
        } & set(ids)

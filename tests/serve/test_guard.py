"""The request guard's parts alone: reading the bearer key from raw headers, and bounding bodies
as they arrive."""

from __future__ import annotations

import json

import pytest
from fastapi import FastAPI, Request

from lorafleet.errors import Unauthorized
from lorafleet.serve.api.errors import install_error_handlers
from lorafleet.serve.api.guard import UPLOAD_PATHS, BodyLimit, bearer_from_headers


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"   ",
        b"Bearer",
        b"Bearer   ",
        b"Basic dXNlcjpwYXNz",
        b"Token abc",
        "Bearer kéy".encode("latin-1"),
        b"Bearer \xff\xfe",
        b"Bearer a\x00b",
        b"Bearer two words",
        b"bearer\tabc",
    ],
)
def test_malformed_authorization_headers_are_401(value):
    with pytest.raises(Unauthorized):
        bearer_from_headers([(b"authorization", value)])


def test_a_missing_header_is_401_and_a_bearer_key_is_read_in_any_case():
    with pytest.raises(Unauthorized, match="missing API key"):
        bearer_from_headers([(b"content-type", b"application/json")])
    assert bearer_from_headers([(b"authorization", b"bEaReR  lf-abc_DEF-1 ")]) == "lf-abc_DEF-1"


def test_upload_routes_are_told_apart():
    assert UPLOAD_PATHS.match("/v1/adapters") and UPLOAD_PATHS.match(
        "/v1/deployments/prod/validation"
    )
    assert not UPLOAD_PATHS.match("/v1/chat/completions") and not UPLOAD_PATHS.match(
        "/v1/adapters/x/versions/1"
    )


async def _run(app, headers: list[tuple[bytes, bytes]], chunks: list[bytes]) -> tuple[int, bytes]:
    """Drive an ASGI app with a body sent in chunks (as a chunked request arrives); return status
    and body."""
    messages = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ]
    sent: list[dict] = []

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "headers": headers,
        "query_string": b"",
        "http_version": "1.1",
        "scheme": "http",
        "server": ("t", 80),
        "root_path": "",
    }
    await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def _echo_app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/v1/chat/completions")
    async def echo(request: Request) -> dict:
        return {"bytes": len(await request.body())}

    return app


async def test_a_chunked_body_over_the_limit_is_413_while_it_arrives():
    guarded = BodyLimit(_echo_app(), max_upload_bytes=10_000, max_request_bytes=1000)
    status, body = await _run(guarded, [], [b"x" * 600, b"x" * 600, b"x" * 600])
    assert status == 413
    assert json.loads(body)["error"]["code"] == "payload_too_large"
    assert (await _run(guarded, [], [b"x" * 400, b"x" * 400]))[0] == 200


async def test_a_declared_length_over_the_limit_or_malformed_is_refused_before_reading():
    guarded = BodyLimit(_echo_app(), max_upload_bytes=10_000, max_request_bytes=1000)
    assert (await _run(guarded, [(b"content-length", b"5000")], [b""]))[0] == 413
    assert (await _run(guarded, [(b"content-length", b"-1")], [b""]))[0] == 400

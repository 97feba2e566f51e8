"""Hostile requests at the door of the real server: malformed authentication, bodies that never
end or nest without end, and slow clients; each gets a clear 4xx (or simply waits) and the server
stays responsive."""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlparse

import httpx
import pytest

from tests.helpers import assert_openai_error

ROUTES = [
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/adapters"),
    ("PUT", "/v1/deployments/x/validation"),
    ("GET", "/v1/models"),
    ("POST", "/admin/tenants"),
    ("GET", "/admin/tenants"),
]


def _raw(url: str, request: bytes, timeout: float = 10.0) -> tuple[int, bytes]:
    """Send raw bytes (headers httpx would refuse to send), return the status and what came back."""
    parsed = urlparse(url)
    with socket.create_connection((parsed.hostname, parsed.port), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        length = next(
            (
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ),
            0,
        )
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
    return int(head.split(b" ")[1]), rest


MALFORMED = [
    b"",
    b"Bearer",
    b"Basic dXNlcjpwYXNz",
    "Bearer \u00e9t\u00e9".encode("latin-1"),
    b"Bearer \xff\xfe\xfd",
    b"Bearer a b",
]


@pytest.mark.parametrize("authorization", MALFORMED, ids=repr)
@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_malformed_authorization_is_401_never_500(server, method, path, authorization):
    header = b"Authorization: " + authorization + b"\r\n" if authorization else b""
    status, body = _raw(
        server.url,
        f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
        "Content-Type: application/json\r\nConnection: close\r\n".encode()
        + header
        + b"\r\n{}",
    )
    assert status == 401, body
    assert set(json.loads(body)["error"]) >= {"message", "type", "code"}


@pytest.mark.parametrize("path", ["/v1/adapters", "/v1/chat/completions", "/admin/tenants"])
def test_authentication_comes_before_the_body_is_read(server, path):
    """A client with a wrong key that announces a huge body gets its 401 at once, without sending
    the body."""
    t0 = time.monotonic()
    status, _ = _raw(
        server.url,
        f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\n"
        "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 400000000\r\n"
        "Connection: close\r\n\r\n--b\r\n".encode(),
        timeout=10,
    )
    assert status == 401 and time.monotonic() - t0 < 5


def test_a_chunked_body_over_the_limit_is_413(server, new_tenant):
    tenant = new_tenant()

    def endless():
        yield b'{"model": "prod", "messages": [{"role": "user", "content": "'
        for _ in range(200):
            yield b"x" * 1024 * 1024  # 200 MiB > LORAFLEET_MAX_REQUEST_BYTES (64 MiB)

    with tenant.http() as http:
        response = http.post(
            "/v1/chat/completions", content=endless(), headers={"Content-Type": "application/json"}
        )
    assert_openai_error(response, 413, "larger than the limit")


def test_deep_or_malformed_json_is_400(server, new_tenant):
    tenant = new_tenant()
    with tenant.http() as http:
        deep = '{"model": "prod", "messages": [' + "[" * 100_000 + "]" * 100_000 + "]}"
        assert_openai_error(http.post("/v1/chat/completions", content=deep), 400, "nested")
        nested = {"model": "prod", "messages": [{"role": "user", "content": "hi"}], "x": {}}
        node = nested["x"]
        for _ in range(200):
            node["a"] = {}
            node = node["a"]
        assert_openai_error(http.post("/v1/chat/completions", json=nested), 400, "nested deeper")
        for body in (b"\xff\xfe", b"[1, 2]", b'{"model": 5, "messages": []}', b"{" * 10):
            assert http.post("/v1/chat/completions", content=body).status_code == 400
        # a FastAPI-parsed route
        assert http.put("/v1/deployments/x", content="[" * 100_000).status_code == 400


def test_slow_uploads_do_not_exhaust_the_catalog_pool(server, new_tenant):
    """Sixty clients each start an upload and then stall (more than the pool's 40 + 10
    connections): other requests keep their speed, and the stalled ones hold no catalog
    connection."""
    tenant = new_tenant()
    parsed = urlparse(server.url)
    stalled = []
    try:
        for _ in range(60):
            sock = socket.create_connection((parsed.hostname, parsed.port), timeout=10)
            sock.sendall(
                "POST /v1/adapters HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {tenant.api_key}\r\n"
                "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 10000000\r\n\r\n"
                '--b\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\n'.encode()
                + b"x" * 65536
            )
            stalled.append(sock)
        with tenant.http() as http:
            t0 = time.monotonic()
            for _ in range(5):
                assert http.get("/v1/adapters").status_code == 200
            assert time.monotonic() - t0 < 5
        in_use = [
            line
            for line in httpx.get(server.metrics_url).text.splitlines()
            if line.startswith("lorafleet_catalog_connections_in_use ")
        ]
        assert float(in_use[0].split()[1]) <= 5, in_use
    finally:
        for sock in stalled:
            sock.close()

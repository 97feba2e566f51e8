"""Per-tenant limits on the real server: 429 in OpenAI's shape with the headers the openai SDK
reads, tokens counted from the engine's usage, storage quotas, and counters shared by two gateway
processes through Redis."""

from __future__ import annotations

import stat
import threading
import time
from pathlib import Path

import httpx
import pytest

from lorafleet.serve.dev.local_server import LocalServer
from tests.helpers import assert_openai_error, image_messages, upload_folder

RATE_HEADERS = (
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
)


@pytest.fixture
def deployed(server, new_tenant, make_adapter):
    """A tenant with one deployment ("prod")."""
    tenant = new_tenant()
    with tenant.http() as http:
        upload_folder(http, "ext", make_adapter(1))
        http.put("/v1/deployments/prod", json={"adapter": "ext@1"}).raise_for_status()
    return tenant


def _limit(server, tenant: str, **limits: int) -> None:
    with server.admin() as admin:
        admin.put(f"/admin/tenants/{tenant}/limits", json=limits).raise_for_status()


def _chat(http: httpx.Client, **extra) -> httpx.Response:
    return http.post(
        "/v1/chat/completions",
        json={"model": "prod", "messages": image_messages(), "max_tokens": 2, **extra},
    )


def test_every_response_carries_the_rate_headers_and_the_limit_gives_429(server, deployed):
    _limit(server, deployed.name, rpm=3)
    with deployed.http() as http:
        answers = [_chat(http) for _ in range(3)]
        assert [a.status_code for a in answers] == [200, 200, 200]
        assert all(set(RATE_HEADERS) <= set(a.headers) for a in answers)
        assert [a.headers["x-ratelimit-remaining-requests"] for a in answers] == ["2", "1", "0"]
        refused = _chat(http)
        error = assert_openai_error(refused, 429, "requests per minute")
        assert (error["type"], error["code"]) == (
            "rate_limit_error",
            "requests_per_minute_exceeded",
        )
        assert 1 <= int(refused.headers["Retry-After"]) <= 60 and set(RATE_HEADERS) <= set(
            refused.headers
        )
        not_found = http.post("/v1/chat/completions", json={"model": "nope", "messages": []})
        # counted before anything else: a flood of bad requests is limited too
        assert not_found.status_code == 429
    with server.admin() as admin:
        assert (
            'lorafleet_rate_limited_total{limit="requests_per_minute_exceeded",tenant="'
            + deployed.name
            in admin.get("/metrics").text
        )


def test_an_error_after_admission_carries_the_headers_too(server, deployed):
    with deployed.http() as http:
        missing = http.post(
            "/v1/chat/completions", json={"model": "nope", "messages": image_messages()}
        )
    assert missing.status_code == 404 and "x-ratelimit-remaining-requests" in missing.headers


def test_tokens_per_minute_count_the_engines_usage(server, deployed):
    with deployed.http() as http:
        used = _chat(http).json()["usage"]["total_tokens"]
        _limit(server, deployed.name, tpm=used)  # room for one more answer, not two
        first = _chat(http)
        assert first.status_code == 200 and first.headers["x-ratelimit-limit-tokens"] == str(used)
        assert first.headers["x-ratelimit-remaining-tokens"] == str(used)  # counted when it ends
        second = _chat(http)
        error = assert_openai_error(second, 429, "tokens per minute")
        assert error["code"] == "tokens_per_minute_exceeded"
        assert second.headers["x-ratelimit-remaining-tokens"] == "0"


def test_the_openai_sdk_waits_out_a_concurrency_429_by_itself(server, deployed):
    """Concurrency 1: a slow streamed request holds the slot; the SDK's call gets 429 +
    Retry-After, waits, and succeeds on its own retry once the stream has ended."""
    _limit(server, deployed.name, concurrency=1)
    started = threading.Event()

    def slow_stream() -> None:
        with (
            deployed.http() as http,
            http.stream(
                "POST",
                "/v1/chat/completions",
                json={
                    "model": "prod",
                    "messages": image_messages(),
                    # long enough to be refused beside it
                    "max_tokens": 120,
                    "stream": True,
                    "ignore_eos": True,
                },
            ) as response,
        ):
            assert response.status_code == 200
            started.set()
            for _ in response.iter_bytes():
                pass

    holder = threading.Thread(target=slow_stream)
    holder.start()
    assert started.wait(60)
    with deployed.http() as http:
        refused = _chat(http)
    assert_openai_error(refused, 429, "in flight")
    assert refused.headers["Retry-After"] == "1"
    import openai

    # Retry-After is 1 s: 120 retries wait out a stream of up to two minutes
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=deployed.api_key, max_retries=120)
    answer = client.chat.completions.with_raw_response.create(
        model="prod", max_tokens=2, messages=image_messages()
    )
    holder.join(120)
    assert answer.http_response.status_code == 200
    assert answer.retries_taken >= 1  # it was refused first and retried by itself


def test_storage_limits_refuse_an_upload_over_them_and_keep_nothing(
    server, new_tenant, make_adapter
):
    tenant = new_tenant()
    _limit(server, tenant.name, adapters=1)
    with tenant.http() as http:
        upload_folder(http, "ext", make_adapter(1))
        before = server.stored_digests()
        archive_owner = make_adapter(2)
        from lorafleet.serve.gateway_client import pack_adapter

        archive = pack_adapter(archive_owner)
        try:
            with open(archive, "rb") as f:
                refused = http.post(
                    "/v1/adapters", data={"name": "ext"}, files={"file": ("a.tar.gz", f)}
                )
        finally:
            archive.unlink()
        error = assert_openai_error(refused, 429, "1 adapter version")
        assert (
            error["type"] == "insufficient_quota" and refused.headers["x-should-retry"] == "false"
        )
        assert server.stored_digests() == before
        _limit(server, tenant.name, adapters=0, adapter_bytes=100)  # unlimited count, 100 bytes
        assert_openai_error(_upload(http, make_adapter(3)), 429, "bytes")


def _upload(http: httpx.Client, folder: Path) -> httpx.Response:
    from lorafleet.serve.gateway_client import pack_adapter

    archive = pack_adapter(folder)
    try:
        with open(archive, "rb") as f:
            return http.post("/v1/adapters", data={"name": "more"}, files={"file": ("a.tar.gz", f)})
    finally:
        archive.unlink()


def test_two_gateways_share_the_counters_through_redis(server, redis_url, tmp_path):
    """Two gateway processes on one catalog, attached to one engine, counting in one Redis: a
    tenant allowed 4 requests a minute gets 4 in all, whichever gateway it calls."""
    home = tmp_path / "gateway-a"
    token = server.env["LORAFLEET_ENGINE_API_KEY"]
    shared = dict(
        limits_url=redis_url,
        engine_url=server.engine_url,
        engine_api_key=token,
        database_url=f"sqlite:///{home / 'catalog.db'}",
        store_url=f"file://{home / 'adapters'}",
        max_model_len="512",
        dtype="float32",
    )
    a = LocalServer.start(server.base, home, **shared)
    b = LocalServer.start(server.base, tmp_path / "gateway-b", admin_key=a.admin_key, **shared)
    try:
        a.wait_ready(120)
        b.wait_ready(120)
        with httpx.Client(
            base_url=a.url, headers={"Authorization": f"Bearer {a.admin_key}"}
        ) as admin:
            key = admin.post("/admin/tenants", json={"name": "shared"}).json()["api_key"]
            admin.put("/admin/tenants/shared/limits", json={"rpm": 4}).raise_for_status()
        statuses = []
        for gateway in (a, b, a, b, a, b):
            with httpx.Client(
                base_url=gateway.url, headers={"Authorization": f"Bearer {key}"}, timeout=60
            ) as http:
                # b reads the new tenant's limits within LORAFLEET_CATALOG_CACHE_S
                deadline = time.monotonic() + 10
                while http.get("/v1/models").status_code == 401 and time.monotonic() < deadline:
                    time.sleep(0.2)
                statuses.append(
                    http.post(
                        "/v1/chat/completions", json={"model": "none", "messages": []}
                    ).status_code
                )
        # 4 admitted in all (no deployment: 404), then refused
        assert statuses == [404, 404, 404, 404, 429, 429]
        # the SQLite catalog: owner only
        assert stat.S_IMODE((home / "catalog.db").stat().st_mode) & 0o077 == 0
    finally:
        a.stop()
        b.stop()

"""Usage and budgets across two gateway processes on one catalog, attached to the session's engine,
counting in one Redis: a budget spent through one gateway stops the tenant on the other; a gateway
stopped right after its requests writes their usage on the way out; one killed outright loses
nothing that was flushed, and its budget still holds when it is back."""

from __future__ import annotations

import signal

import httpx
import pytest

from lorafleet.serve.dev.local_server import LocalServer
from tests.conftest import NEAR_BASE_STD
from tests.helpers import assert_openai_error, poll_until, upload_folder

pytestmark = [pytest.mark.engine, pytest.mark.redis]

REQUEST = {
    "model": "reader",
    "messages": [{"role": "user", "content": "Name a colour."}],
    "max_tokens": 10,
}


def _client(gateway: LocalServer, key: str) -> httpx.Client:
    return httpx.Client(
        base_url=gateway.url, headers={"Authorization": f"Bearer {key}"}, timeout=120
    )


def _total(gateway: LocalServer, key: str) -> dict:
    with _client(gateway, key) as http:
        response = http.get("/v1/usage")
    assert response.status_code == 200, response.text
    return response.json()["total"]


def test_two_gateways_share_budgets_and_lose_no_usage(server, redis_url, make_adapter, tmp_path):
    shared = dict(
        limits_url=redis_url,
        engine_url=server.engine_url,
        engine_api_key=server.env["LORAFLEET_ENGINE_API_KEY"],
        database_url=f"sqlite:///{tmp_path / 'catalog.db'}",
        store_url=f"file://{tmp_path / 'adapters'}",
        max_model_len="512",
        dtype="float32",
        usage_flush_s="1",
        catalog_cache_s="1",
    )
    a = LocalServer.start(server.base, tmp_path / "a", **shared)
    b = LocalServer.start(server.base, tmp_path / "b", admin_key=a.admin_key, **shared)
    try:
        a.wait_ready(120)
        b.wait_ready(120)
        with _client(a, a.admin_key) as admin:
            key = admin.post("/admin/tenants", json={"name": "metered"}).json()["api_key"]
        with _client(a, key) as http:
            upload_folder(http, "ext", make_adapter(3, 8, std=NEAR_BASE_STD))
            http.put("/v1/deployments/reader", json={"adapter": "ext@1"}).raise_for_status()
        received = 0

        def chat(gateway: LocalServer) -> httpx.Response:
            nonlocal received
            with _client(gateway, key) as http:
                response = http.post("/v1/chat/completions", json=REQUEST)
            if response.status_code == 200:
                received += response.json()["usage"]["total_tokens"]
            return response

        # b writes its usage when it stops, not only every flush period
        for _ in range(3):
            assert chat(b).status_code == 200
        b.stop()
        total = _total(a, key)
        assert total["prompt_tokens"] + total["completion_tokens"] == received
        b.process = b._spawn()
        b.wait_ready(120)

        with _client(a, a.admin_key) as admin:
            admin.put(
                "/admin/tenants/metered/budgets/day", json={"tokens": received + 150}
            ).raise_for_status()
        answered = 0
        while (response := chat(a)).status_code == 200:
            answered += 1
            assert answered < 40, "the budget never stopped the tenant"
        assert_openai_error(response, 429, "day budget")
        # the other gateway counts in the same Redis: refused at once
        assert_openai_error(chat(b), 429, "day budget")

        # every answer's usage is in the catalog (flushed every second); then a is killed
        def flushed() -> bool:
            total = _total(b, key)
            return total["prompt_tokens"] + total["completion_tokens"] == received

        poll_until(flushed, 30, "both gateways' usage in the catalog")
        a.process.send_signal(signal.SIGKILL)
        a.process.wait(30)
        a.process = a._spawn()
        a.wait_ready(120)
        total = _total(a, key)
        assert total["prompt_tokens"] + total["completion_tokens"] == received
        assert total["requests"] == 3 + answered  # refusals are not usage
        assert_openai_error(chat(a), 429, "day budget")
        with _client(a, a.admin_key) as admin:
            events = admin.get("/admin/audit", params={"tenant": "metered"}).json()
        assert [e["action"] for e in events].count("budget.exceeded") == 1
    finally:
        for gateway in (a, b):
            if gateway.process.poll() is None:
                gateway.stop()


def test_a_restarted_gateway_counts_the_period_from_the_catalog(server, make_adapter, tmp_path):
    """Counters in the gateway's memory (`memory://`): after a restart they start again from the
    usage the catalog holds for the period, so the budget is not forgotten."""
    gateway = LocalServer.start(
        server.base,
        tmp_path / "solo",
        engine_url=server.engine_url,
        engine_api_key=server.env["LORAFLEET_ENGINE_API_KEY"],
        max_model_len="512",
        dtype="float32",
        usage_flush_s="0.5",
    )
    try:
        gateway.wait_ready(120)
        with _client(gateway, gateway.admin_key) as admin:
            key = admin.post("/admin/tenants", json={"name": "solo"}).json()["api_key"]
        with _client(gateway, key) as http:
            upload_folder(http, "ext", make_adapter(3, 8, std=NEAR_BASE_STD))
            http.put("/v1/deployments/reader", json={"adapter": "ext@1"}).raise_for_status()
            spent = sum(
                http.post("/v1/chat/completions", json=REQUEST).json()["usage"]["total_tokens"]
                for _ in range(3)
            )
        with _client(gateway, gateway.admin_key) as admin:
            admin.put(
                "/admin/tenants/solo/budgets/month", json={"tokens": spent + 1}
            ).raise_for_status()
        with _client(gateway, key) as http:
            assert http.post("/v1/chat/completions", json=REQUEST).status_code == 200
        gateway.restart()  # stopped, as a deployment's rollout would: its usage written on the way
        gateway.wait_ready(120)
        with _client(gateway, key) as http:
            refused = http.post("/v1/chat/completions", json=REQUEST)
        assert_openai_error(refused, 429, "month budget")
    finally:
        gateway.stop()

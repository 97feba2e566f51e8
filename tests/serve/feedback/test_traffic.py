"""A deployment's live traffic from the request log, on real SQLite and PostgreSQL catalogs (no
engine): exact counts and rates, percentiles as numpy computes them, the window's edges, and `GET
/v1/deployments/{d}/traffic` through the gateway's key check and error handlers."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict

import httpx
import numpy as np
import pytest
from sqlalchemy.orm import sessionmaker

from lorafleet.adapters.catalog import Deployment, RequestRecord
from lorafleet.adapters.tenants import create_tenant
from lorafleet.serve.api import adapters
from lorafleet.serve.feedback import traffic
from lorafleet.serve.feedback.request_log import LoggedRequest, new_request_id
from lorafleet.serve.feedback.traffic import deployment_traffic
from tests.helpers import assert_openai_error, catalog_app
from tests.serve.feedback.conftest import Place

NOW = 1_000_000.0
CANARY = "b" * 64


def _row(
    place: Place,
    at: float,
    status: int = 200,
    latency_s: float = 0.1,
    variant: str = "stable",
    digest: str | None = None,
) -> LoggedRequest:
    """One request-log row of the place's deployment, as the gateway buffers it."""
    return LoggedRequest(
        request_id=new_request_id(),
        tenant_id=place.tenant_id,
        key_id=None,
        at=at,
        deployment_id=place.deployment_id,
        deployment=place.deployment,
        variant=variant,
        digest=place.digest if digest is None else digest,
        status=status,
        error_code=None if status == 200 else "error",
        prompt_tokens=0,
        completion_tokens=0,
        latency_s=latency_s,
        stream=False,
    )


def _log(sessions: sessionmaker, rows: list[LoggedRequest]) -> None:
    with sessions() as session:
        session.add_all([RequestRecord(**asdict(row)) for row in rows])
        session.commit()


def _traffic(sessions: sessionmaker, place: Place, window_s: float = 300.0, now: float = NOW):
    with sessions() as session:
        return deployment_traffic(
            session, session.get_one(Deployment, place.deployment_id), window_s, now
        )


def _percentiles(latencies_s: list[float]) -> tuple[float, float]:
    p50, p95 = np.percentile(1000 * np.asarray(latencies_s), [50, 95])
    return float(p50), float(p95)


def test_traffic_counts_errors_and_latency_in_total_and_per_variant(sessions, place):
    mine, neighbour, rival = place(), place(deployment="other"), place(tenant="rival")
    stable_ok = [0.1, 0.2, 0.3, 0.4, 1.0]
    canary_ok = [0.25, 0.35]
    _log(
        sessions,
        [
            *(_row(mine, NOW - 10 * (i + 1), latency_s=x) for i, x in enumerate(stable_ok)),
            _row(mine, NOW - 300, latency_s=0.5),  # on the window's edge: in
            _row(mine, NOW - 300.5, 500, latency_s=9.0),  # just before it: out
            _row(mine, NOW - 5, 500, latency_s=0.05),
            _row(mine, NOW - 6, 429),
            _row(mine, NOW - 7, 404),
            *(
                _row(mine, NOW - 20 - i, latency_s=x, variant="canary", digest=CANARY)
                for i, x in enumerate(canary_ok)
            ),
            _row(mine, NOW - 1, 503, variant="canary", digest=CANARY),
            # other deployments: never counted
            _row(neighbour, NOW - 1, 500),
            _row(rival, NOW - 1, 500),
        ],
    )
    t = _traffic(sessions, mine)
    everything = [*stable_ok, 0.5, *canary_ok]
    assert (t.deployment, t.window_s, t.requests, t.errors, t.client_errors) == (
        "invoice",
        300.0,
        12,
        2,
        2,
    )
    assert t.per_s == pytest.approx(12 / 300) and t.error_rate == pytest.approx(2 / 12)
    assert (t.latency_ms.p50, t.latency_ms.p95) == pytest.approx(_percentiles(everything))
    assert t.latency_ms.mean == pytest.approx(1000 * np.mean(everything))
    canary, stable = t.variants  # by variant name
    assert (
        canary.variant,
        canary.digest,
        canary.requests,
        canary.errors,
        canary.client_errors,
    ) == ("canary", CANARY, 3, 1, 0)
    assert canary.error_rate == pytest.approx(1 / 3) and canary.per_s == pytest.approx(3 / 300)
    assert (canary.latency_ms.p50, canary.latency_ms.p95) == pytest.approx(_percentiles(canary_ok))
    assert canary.latency_ms.mean == pytest.approx(300.0)
    assert (
        stable.variant,
        stable.digest,
        stable.requests,
        stable.errors,
        stable.client_errors,
    ) == ("stable", mine.digest, 9, 1, 2)
    assert (stable.latency_ms.p50, stable.latency_ms.p95) == pytest.approx(
        _percentiles([*stable_ok, 0.5])
    )
    assert stable.latency_ms.mean == pytest.approx(1000 * np.mean([*stable_ok, 0.5]))


def test_one_variant_on_two_adapters_is_two_rows(sessions, place):
    mine = place()
    # a deploy switched it meanwhile
    _log(sessions, [_row(mine, NOW - 1), _row(mine, NOW - 2, digest=CANARY)])
    t = _traffic(sessions, mine)
    assert [(v.variant, v.digest, v.requests) for v in t.variants] == sorted(
        [("stable", mine.digest, 1), ("stable", CANARY, 1)]
    )


def test_without_requests_rates_and_latency_are_null(sessions, place):
    mine = place()
    _log(sessions, [_row(mine, NOW - 400)])  # outside the window
    t = _traffic(sessions, mine)
    assert (t.requests, t.per_s, t.errors, t.client_errors, t.error_rate, t.variants) == (
        0,
        0.0,
        0,
        0,
        None,
        [],
    )
    assert (t.latency_ms.p50, t.latency_ms.p95, t.latency_ms.mean) == (None, None, None)
    _log(sessions, [_row(mine, NOW - 1, 502), _row(mine, NOW - 2, 400)])  # requests, none answered
    t = _traffic(sessions, mine)
    assert (t.requests, t.errors, t.client_errors, t.error_rate) == (2, 1, 1, 0.5)
    assert (t.latency_ms.p50, t.latency_ms.p95, t.latency_ms.mean) == (None, None, None)


def test_percentiles_come_from_the_newest_answered_rows_and_the_mean_from_all(
    sessions, place, monkeypatch
):
    monkeypatch.setattr(traffic, "MAX_LATENCY_ROWS", 3)
    mine = place()
    _log(
        sessions,
        [
            *(_row(mine, NOW - 100 - i, latency_s=5.0) for i in range(4)),
            *(_row(mine, NOW - 1 - i, latency_s=x) for i, x in enumerate([0.1, 0.2, 0.3])),
            # an error: neither sampled nor in the mean
            _row(mine, NOW - 0.5, 500, latency_s=7.0),
        ],
    )
    t = _traffic(sessions, mine)
    assert (t.latency_ms.p50, t.latency_ms.p95) == pytest.approx(_percentiles([0.1, 0.2, 0.3]))
    assert t.latency_ms.mean == pytest.approx(1000 * (4 * 5.0 + 0.6) / 7)
    assert t.requests == 8


# --- the route ---


@pytest.fixture
def api(sessions: sessionmaker, place: Callable[..., Place]) -> Iterator[tuple]:
    """The registry routes over the catalog: tenant acme's key, its deployment `invoice`, and
    tenant rival's deployment `secret`."""
    with sessions() as session:
        _, key = create_tenant(session, "acme")
        create_tenant(session, "rival")
    app = catalog_app(sessions, adapters.router)
    yield app, key, place(), place(tenant="rival", deployment="secret")


def _client(app, key: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://gateway",
        headers={"Authorization": f"Bearer {key}"},
    )


async def test_the_route_answers_the_last_window_with_what_this_gateway_just_served(sessions, api):
    app, key, mine, _ = api
    now = time.time()
    _log(sessions, [_row(mine, now - 10, latency_s=0.2), _row(mine, now - 600, latency_s=0.2)])
    app.state.gateway.request_log.add(_row(mine, now - 1, 500))  # still in this gateway's buffer
    async with _client(app, key) as http:
        response = await http.get("/v1/deployments/invoice/traffic")
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["window_s"], body["requests"], body["errors"]) == (300.0, 2, 1)
        assert body["latency_ms"] == {
            "p50": pytest.approx(200.0),
            "p95": pytest.approx(200.0),
            "mean": pytest.approx(200.0),
        }
        assert [(v["variant"], v["requests"], v["per_s"]) for v in body["variants"]] == [
            ("stable", 2, pytest.approx(2 / 300))
        ]
        wide = (await http.get("/v1/deployments/invoice/traffic", params={"window_s": 3600})).json()
        assert (wide["window_s"], wide["requests"]) == (3600.0, 3)


async def test_another_tenants_deployment_is_not_found(api):
    app, key, _, _ = api
    async with _client(app, key) as http:
        for name in ("secret", f"none-{uuid.uuid4().hex[:6]}"):
            error = assert_openai_error(
                await http.get(f"/v1/deployments/{name}/traffic"), 404, name
            )
            assert error["code"] == "model_not_found"


@pytest.mark.parametrize("window", ["9.99", "86400.5", "-300", "nan", "inf", "five"])
async def test_a_window_out_of_range_is_a_400_in_openai_shape(api, window):
    app, key, _, _ = api
    async with _client(app, key) as http:
        response = await http.get("/v1/deployments/invoice/traffic", params={"window_s": window})
    error = assert_openai_error(response, 400, "window_s")
    assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_request")


async def test_the_window_bounds_themselves_are_accepted(api):
    app, key, _, _ = api
    async with _client(app, key) as http:
        for window in (10, 86400):
            response = await http.get(
                "/v1/deployments/invoice/traffic", params={"window_s": window}
            )
            assert response.status_code == 200 and response.json()["window_s"] == window

"""A rollout's time series on real SQLite and PostgreSQL catalogs (no engine): samples and
feedback per variant and period with exact numbers, nulls where a rate has no denominator, the
default period length, and `GET /v1/deployments/{d}/rollout/series` through the gateway's key
check and error handlers."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from sqlalchemy.orm import sessionmaker

from lorafleet.adapters.catalog import (
    Adapter,
    AdapterVersion,
    Deployment,
    Feedback,
    Rollout,
    RolloutSample,
    Tenant,
    open_catalog,
)
from lorafleet.adapters.tenants import create_tenant
from lorafleet.errors import InvalidRequest
from lorafleet.serve.api import rollouts
from lorafleet.serve.feedback.request_log import new_request_id
from lorafleet.serve.rollouts.phases import Phase
from lorafleet.serve.rollouts.series import default_bucket_s, rollout_series
from tests.helpers import assert_openai_error, catalog_app

START = 1_000_000.0
VARIANTS = [
    {"label": label, "version_id": v, "digest": str(v) * 64, "ref": f"m@{v}", "weight": 50.0}
    for label, v in (("canary", 2), ("stable", 1))
]


@dataclass(frozen=True)
class Catalog:
    sessions: sessionmaker
    key: str  # tenant acme's
    rollout_id: int  # of acme's deployment `d`: a canary from START to START + 600
    other_rollout_id: int  # rival's


def _deployment(
    session, tenant: Tenant, name: str, kind: str = "canary", finished: float | None = START + 600
):
    adapter = Adapter(tenant_id=tenant.id, name=f"m-{name}")
    versions = [
        AdapterVersion(
            adapter=adapter,
            version=i,
            digest=str(i) * 64,
            rank=8,
            alpha=16,
            target_modules=["q_proj"],
            size_bytes=1,
        )
        for i in (1, 2)
    ]
    deployment = Deployment(tenant_id=tenant.id, name=name, stable=versions[0])
    session.add_all([adapter, *versions, deployment])
    if kind:
        rollout = Rollout(
            deployment=deployment,
            kind=kind,
            phase=Phase.PROMOTED,
            salt="s",
            variants=VARIANTS,
            steps=[50, 100],
            step_index=1,
            params={},
            created_by="t",
            created_at=START,
            finished_at=finished,
        )
        session.add(rollout)
        session.flush()
        return rollout.id
    return None


@pytest.fixture
def catalog(catalog_url: str) -> Iterator[Catalog]:
    engine, sessions = open_catalog(catalog_url)
    with sessions() as session:
        acme, key = create_tenant(session, "acme")
        rival, _ = create_tenant(session, "rival")
        rollout_id = _deployment(session, acme, "d")
        _deployment(session, acme, "plain", kind="")
        _deployment(session, acme, "split", kind="ab")
        other = _deployment(session, rival, "theirs")
        session.commit()
    yield Catalog(sessions, key, rollout_id, other)
    engine.dispose()


def _sample(
    rollout_id: int,
    variant: str,
    at: float,
    ok: bool = True,
    latency_s: float = 0.1,
    format_valid: bool | None = None,
) -> RolloutSample:
    return RolloutSample(
        rollout_id=rollout_id,
        step_index=0,
        variant=variant,
        unit="u",
        ok=ok,
        latency_s=latency_s,
        output_tokens=3,
        format_valid=format_valid,
        at=at,
        confidence=None,
    )


def _feedback(rollout_id: int | None, variant: str, at: float, value: float) -> Feedback:
    return Feedback(
        tenant_id=1,
        request_id=new_request_id(),
        deployment_id=1,
        deployment="d",
        rollout_id=rollout_id,
        variant=variant,
        digest="x",
        score=value,
        value=value,
        correction=None,
        at=at,
        created_at=at,
        updated_at=at,
    )


def _serve(catalog: Catalog) -> None:
    """Known samples and feedback in periods 0, 1, 2 and 5 of 10 s, and rows that must not count."""
    r = catalog.rollout_id
    with catalog.sessions() as session:
        session.add_all(
            [
                _sample(r, "canary", START, latency_s=0.1, format_valid=True),
                _sample(r, "canary", START + 5, latency_s=0.3, format_valid=False),
                # an error: no latency, no format
                _sample(r, "canary", START + 9.5, ok=False, latency_s=2.0),
                _feedback(r, "canary", START + 1, 1.0),
                _feedback(r, "canary", START + 2, 0.0),
                _sample(
                    r, "canary", START + 20, latency_s=0.2
                ),  # on a period's edge: the later period
                _feedback(r, "canary", START + 55, 1.0),  # feedback alone in its period
                _sample(r, "stable", START + 0.5, latency_s=0.5, format_valid=True),
                _sample(r, "stable", START + 10, ok=False),
                # a label no longer in the routing table: listed last
                _sample(r, "old-label", START + 1),
                # before the start: out
                _sample(r, "canary", START - 1),
                _feedback(r, "canary", START - 1, 0.0),
                _sample(catalog.other_rollout_id, "canary", START + 1),
                _feedback(None, "canary", START + 1, 0.0),
            ]
        )
        session.commit()


def _rfc3339(at: float) -> str:
    """How the API writes a time."""
    return dt.datetime.fromtimestamp(at, dt.UTC).isoformat().replace("+00:00", "Z")


def _bucket(
    start: float,
    requests: int = 0,
    errors: int = 0,
    latency: float | None = None,
    checked: int = 0,
    valid: int = 0,
    judged: int = 0,
    mean: float | None = None,
) -> dict:
    return {
        "start": _rfc3339(start),
        "requests": requests,
        "errors": errors,
        "error_rate": errors / requests if requests else None,
        "latency_ms_mean": latency,
        "format_checked": checked,
        "format_valid": valid,
        "format_validity": valid / checked if checked else None,
        "feedback_count": judged,
        "feedback_mean": mean,
    }


EXPECTED = [
    {
        "variant": "canary",
        "buckets": [
            _bucket(START, 3, 1, 200.0, 2, 1, 2, 0.5),
            _bucket(START + 20, 1, 0, 200.0),
            _bucket(START + 50, judged=1, mean=1.0),
        ],
    },
    {
        "variant": "stable",
        "buckets": [_bucket(START, 1, 0, 500.0, 1, 1), _bucket(START + 10, 1, 1)],
    },
    {"variant": "old-label", "buckets": [_bucket(START, 1, 0, 100.0)]},
]


def _rounded(value: Any) -> Any:
    """Floats to 9 places, inside lists and dicts: the catalog's sums and means are exact up to
    rounding."""
    if isinstance(value, float):
        return round(value, 9)
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


def _series(
    catalog: Catalog,
    bucket_s: float | None,
    now: float = START + 1000,
    rollout_id: int | None = None,
):
    with catalog.sessions() as session:
        return rollout_series(
            session, session.get_one(Rollout, rollout_id or catalog.rollout_id), bucket_s, now
        )


def test_samples_and_feedback_are_summed_per_variant_and_period(catalog):
    _serve(catalog)
    series = _series(catalog, 10.0)
    assert (series.rollout_id, series.bucket_s, series.start.timestamp()) == (
        catalog.rollout_id,
        10.0,
        START,
    )
    assert _rounded(series.model_dump(mode="json")["variants"]) == _rounded(EXPECTED)


def test_a_longer_period_merges_the_buckets(catalog):
    _serve(catalog)
    canary = _series(catalog, 60.0).variants[0]
    assert _rounded([b.model_dump(mode="json") for b in canary.buckets]) == _rounded(
        [_bucket(START, 4, 1, 200.0, 2, 1, 3, 2 / 3)]
    )


def test_a_rollout_without_samples_lists_its_variants_without_periods(catalog):
    series = _series(catalog, None)
    assert [(v.variant, v.buckets) for v in series.variants] == [("canary", []), ("stable", [])]


@pytest.mark.parametrize(
    ("span_s", "bucket_s"), [(0, 5), (300, 5), (301, 6), (600, 10), (3600, 60), (86400, 1440)]
)
def test_the_default_period_gives_at_most_60_of_at_least_5_s(span_s, bucket_s):
    assert default_bucket_s(span_s) == bucket_s and span_s / bucket_s <= 60


def test_the_default_period_follows_the_span_of_a_running_rollout(catalog):
    assert _series(catalog, None).bucket_s == 10.0  # finished: its 600 s, whatever the time now
    with catalog.sessions() as session:
        session.get_one(Rollout, catalog.rollout_id).finished_at = None
        session.commit()
    assert _series(catalog, None, now=START + 120).bucket_s == 5.0
    assert _series(catalog, None, now=START + 6000).bucket_s == 100.0


def test_a_period_that_cuts_the_span_too_finely_is_refused(catalog):
    with catalog.sessions() as session:
        session.get_one(Rollout, catalog.rollout_id).finished_at = START + 20_000
        session.commit()
    with pytest.raises(InvalidRequest, match="more than 10000 periods: pass at least 2") as refused:
        _series(catalog, 1.0)
    assert refused.value.code == "too_many_periods"
    assert _series(catalog, 2.0).bucket_s == 2.0


# --- the route ---


def _client(catalog: Catalog) -> httpx.AsyncClient:
    app = catalog_app(catalog.sessions, rollouts.router)
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://gateway",
        headers={"Authorization": f"Bearer {catalog.key}"},
    )


async def test_the_route_answers_the_deployments_rollout_series(catalog):
    _serve(catalog)
    async with _client(catalog) as http:
        response = await http.get("/v1/deployments/d/rollout/series", params={"bucket_s": 10})
        assert response.status_code == 200, response.text
        assert _rounded(response.json()) == _rounded(
            {
                "rollout_id": catalog.rollout_id,
                "bucket_s": 10.0,
                "start": _rfc3339(START),
                "variants": EXPECTED,
            }
        )
        default = (await http.get("/v1/deployments/d/rollout/series")).json()
        # 600 s / 60
        assert default["bucket_s"] == 10.0 and _rounded(default["variants"]) == _rounded(EXPECTED)
        rollout = (await http.get("/v1/deployments/d/rollout")).json()
        assert rollout["id"] == default["rollout_id"]


async def test_without_a_rollout_it_is_the_rollout_routes_404(catalog):
    async with _client(catalog) as http:
        for name in ("plain", "split"):  # an A/B test is not a rollout, as for GET .../rollout
            for path in (
                f"/v1/deployments/{name}/rollout/series",
                f"/v1/deployments/{name}/rollout",
            ):
                assert (
                    assert_openai_error(await http.get(path), 404, name)["code"]
                    == "rollout_not_found"
                )
        error = assert_openai_error(
            await http.get("/v1/deployments/theirs/rollout/series"), 404, "theirs"
        )
        # another tenant's deployment does not exist for acme
        assert error["code"] == "model_not_found"


@pytest.mark.parametrize("bucket", ["0.5", "3600.5", "0", "nan", "five"])
async def test_a_period_out_of_range_is_a_400_in_openai_shape(catalog, bucket):
    async with _client(catalog) as http:
        response = await http.get("/v1/deployments/d/rollout/series", params={"bucket_s": bucket})
    error = assert_openai_error(response, 400, "bucket_s")
    assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_request")


async def test_too_many_periods_is_a_400_naming_the_least_period(catalog):
    with catalog.sessions() as session:
        session.get_one(Rollout, catalog.rollout_id).finished_at = START + 20_000
        session.commit()
    async with _client(catalog) as http:
        response = await http.get("/v1/deployments/d/rollout/series", params={"bucket_s": 1})
    assert assert_openai_error(response, 400, "pass at least 2")["code"] == "too_many_periods"

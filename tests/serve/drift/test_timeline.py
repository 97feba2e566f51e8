"""The feedback timeline of live versions, counted by the catalog's own aggregates (SQLite and
PostgreSQL)."""

from __future__ import annotations

import itertools

import pytest

from lorafleet.adapters.catalog import (
    Adapter,
    AdapterVersion,
    Deployment,
    Feedback,
    RequestRecord,
    Rollout,
    Tenant,
    open_catalog,
)
from lorafleet.serve.drift.timeline import Window, feedback_timeline
from lorafleet.serve.rollouts.phases import Phase

HOUR = 3600
WHOLE_HOUR = 472_222 * HOUR  # 2023-11-14 22:00 UTC
NOW = WHOLE_HOUR + 0.25 * HOUR  # a quarter into the hour: the window ends at the next whole hour
_ids = itertools.count()


def _catalog(url: str):
    """Tenant acme: deployment `d` (stable m@1, canary m@2 at 10 % in a progressing rollout) and
    deployment `e`."""
    _, sessions = open_catalog(url)
    with sessions() as session:
        tenant = Tenant(name="acme", key_hash="k")
        session.add(tenant)
        session.flush()
        adapter = Adapter(tenant_id=tenant.id, name="m")
        v1, v2 = (
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
        )
        d, e = (Deployment(tenant_id=tenant.id, name=name, stable=v1) for name in ("d", "e"))
        session.add_all([v1, v2, d, e])
        session.flush()
        rollout = Rollout(
            deployment=d,
            kind="canary",
            phase=Phase.PROGRESSING,
            salt="s",
            steps=[10, 100],
            step_index=0,
            params={},
            created_by="t",
            created_at=NOW,
            variants=[
                {
                    "label": label,
                    "version_id": v.id,
                    "digest": v.digest,
                    "ref": f"m@{v.version}",
                    "weight": weight,
                }
                for label, v, weight in (("canary", v2, 10.0), ("stable", v1, 90.0))
            ],
        )
        session.add(rollout)
        session.flush()
        d.rollout_id = rollout.id
        session.commit()
        return sessions, tenant.id, d.id, e.id


def _request(
    session,
    tenant_id: int,
    deployment_id: int,
    digest: str,
    at: float,
    status: int = 200,
    feedback: float | None = None,
) -> None:
    request_id = f"chatcmpl-{next(_ids):032x}"
    session.add(
        RequestRecord(
            request_id=request_id,
            tenant_id=tenant_id,
            at=at,
            deployment_id=deployment_id,
            deployment="d",
            digest=digest,
            status=status,
            latency_s=0.1,
        )
    )
    if feedback is not None:
        session.add(
            Feedback(
                tenant_id=tenant_id,
                request_id=request_id,
                deployment_id=deployment_id,
                deployment="d",
                digest=digest,
                score=feedback,
                value=feedback,
                at=at,
                created_at=NOW,
                updated_at=NOW,
            )
        )


def test_each_live_version_gets_its_answered_requests_and_feedback_per_period(catalog_url):
    sessions, tenant_id, d, e = _catalog(catalog_url)
    window = Window.ending_at(NOW, HOUR, 3)
    assert (window.start, window.end) == (WHOLE_HOUR - 2 * HOUR, WHOLE_HOUR + HOUR)
    stable, canary = "1" * 64, "2" * 64
    first, last = window.start, window.end - HOUR  # the oldest period, and the current one
    with sessions() as session:
        for at, value in (
            (first, 1.0),
            (first + 10, 0.0),
            (first + 20, None),
            (first + HOUR - 1, None),
        ):
            _request(session, tenant_id, d, stable, at, feedback=value)
        # failed: no answer to count
        _request(session, tenant_id, d, stable, first + 30, status=500)
        _request(session, tenant_id, d, stable, last + 5, feedback=0.5)
        _request(session, tenant_id, d, stable, last + 6)
        _request(session, tenant_id, d, stable, first - 1, feedback=1.0)  # before the window
        # the same version on another deployment
        _request(session, tenant_id, e, stable, last, feedback=0.0)
        _request(session, tenant_id, d, "3" * 64, last, feedback=0.0)  # a version no longer live
        _request(session, tenant_id, d, canary, first + HOUR, feedback=1.0)
        session.commit()
    with sessions() as session:
        timelines = {
            t.variant: t for t in feedback_timeline(session, session.get_one(Deployment, d), window)
        }
    assert set(timelines) == {"canary", "stable"}
    assert (
        timelines["stable"].version,
        timelines["stable"].adapter,
        timelines["stable"].bucket_s,
    ) == ("m@1", stable, HOUR)
    assert [p.start.timestamp() for p in timelines["stable"].periods] == [first, first + HOUR, last]
    assert [(p.requests, p.feedback, p.rate, p.mean) for p in timelines["stable"].periods] == [
        (4, 2, 0.5, pytest.approx(0.5)),
        (0, 0, None, None),
        (2, 1, 0.5, pytest.approx(0.5)),
    ]
    assert [(p.requests, p.feedback, p.rate, p.mean) for p in timelines["canary"].periods] == [
        (0, 0, None, None),
        (1, 1, 1.0, pytest.approx(1.0)),
        (0, 0, None, None),
    ]


def test_a_deployment_without_traffic_has_empty_periods(catalog_url):
    sessions, _, _, e = _catalog(catalog_url)
    with sessions() as session:
        [timeline] = feedback_timeline(
            session, session.get_one(Deployment, e), Window.ending_at(NOW)
        )
    assert timeline.variant == "stable" and len(timeline.periods) == 24
    assert (
        timeline.periods[-1].start.timestamp()
        <= NOW
        < timeline.periods[-1].start.timestamp() + HOUR
    )
    assert all(
        (p.requests, p.feedback, p.rate, p.mean) == (0, 0, None, None) for p in timeline.periods
    )

"""Users' feedback and answer confidence per variant on a real catalog (SQLite and PostgreSQL, no
engine): the controller rolls a canary back on a feedback regression only when asked to, and the
rollout's status reports both signals with their intervals."""

from __future__ import annotations

import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi import FastAPI
from sqlalchemy.orm import sessionmaker

from lorafleet.adapters.catalog import (
    Adapter,
    AdapterVersion,
    Deployment,
    RequestRecord,
    Rollout,
    RolloutSample,
    Tenant,
    open_catalog,
)
from lorafleet.adapters.store import BlobStore, LocalStore
from lorafleet.serve.api.rollouts import _ab_status, rollout_public, router
from lorafleet.serve.engine.client import EngineClient
from lorafleet.serve.feedback.records import record_feedback
from lorafleet.serve.feedback.schemas import FeedbackCreate
from lorafleet.serve.metrics import Metrics
from lorafleet.serve.rollouts.phases import Phase
from lorafleet.serve.rollouts.reconciler import RolloutController
from lorafleet.serve.rollouts.statistics import (
    Moments,
    bounded_difference,
    bounded_mean,
    welch_difference,
)
from tests.helpers import on_loopback

VARIANTS = [
    {"label": label, "version_id": v, "digest": str(v) * 64, "ref": f"m@{v}", "weight": 50.0}
    for label, v in (("canary", 2), ("stable", 1))
]


def _catalog(url: str, kind: str = "canary", **params) -> tuple[sessionmaker, int]:
    """A tenant, two versions of one adapter and a deployment with a progressing 50/50 rollout
    whose look is due."""
    _, sessions = open_catalog(url)
    with sessions() as session:
        tenant = Tenant(name="acme", key_hash="k")
        session.add(tenant)
        session.flush()
        adapter = Adapter(tenant_id=tenant.id, name="m")
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
        deployment = Deployment(tenant_id=tenant.id, name="d", stable=versions[0])
        variants = (
            VARIANTS if kind == "canary" else [{**v, "label": v["ref"]} for v in VARIANTS[::-1]]
        )
        rollout = Rollout(
            deployment=deployment,
            kind=kind,
            phase=Phase.PROGRESSING if kind == "canary" else Phase.RUNNING,
            salt="s",
            variants=variants,
            steps=[50, 80, 100] if kind == "canary" else [],
            step_index=0,
            params={"to": "m@2", "min_requests": 1000, **params} if kind == "canary" else {},
            created_by="t",
            created_at=time.time(),
            last_look_at=0.0,
        )
        session.add_all([adapter, *versions, deployment, rollout])
        session.flush()
        deployment.rollout_id = rollout.id
        session.commit()
        return sessions, rollout.id


def _serve(
    sessions: sessionmaker,
    rollout_id: int | None,
    variant: str,
    n: int,
    confidence: float | None = -0.5,
    up: int = 0,
    down: int = 0,
) -> None:
    """n answered requests of a variant (samples and request-log rows), `up` + `down` of them
    judged by users through the feedback API's own function."""
    now = time.time()
    with sessions() as session:
        tenant = session.get_one(Tenant, 1)
        ids = [f"chatcmpl-{uuid.uuid4().hex}" for _ in range(n)]
        for i, request_id in enumerate(ids):
            session.add(
                RequestRecord(
                    request_id=request_id,
                    tenant_id=tenant.id,
                    at=now,
                    deployment_id=1,
                    deployment="d",
                    rollout_id=rollout_id,
                    variant=variant,
                    digest="x",
                    status=200,
                    latency_s=0.2,
                )
            )
            if rollout_id is not None:
                session.add(
                    RolloutSample(
                        rollout_id=rollout_id,
                        step_index=0,
                        variant=variant,
                        unit=f"{variant}{i}",
                        ok=True,
                        latency_s=0.2 + 0.001 * (i % 7),
                        output_tokens=10,
                        format_valid=None,
                        at=now,
                        confidence=None if confidence is None else confidence - 0.01 * (i % 3),
                    )
                )
        session.commit()
        for k, request_id in enumerate(ids[: up + down]):
            request = session.query(RequestRecord).filter_by(request_id=request_id).one()
            record_feedback(
                session,
                tenant,
                request,
                FeedbackCreate(id=request_id, score=1 if k < up else -1),
                None,
                now,
            )


def _controller(sessions: sessionmaker) -> RolloutController:
    store, metrics = LocalStore(Path(tempfile.mkdtemp())), Metrics()  # the engine is never started
    return RolloutController(
        sessions,
        EngineClient(store, metrics),
        BlobStore(store.root / "validation", ".jsonl"),
        metrics,
        "a",
        tick_s=1,
        lease_s=30,
    )


async def _look(sessions: sessionmaker, rollout_id: int) -> Rollout:
    controller = _controller(sessions)
    assert controller._lease(rollout_id)
    await controller.reconcile(rollout_id)
    with sessions() as session:
        rollout = session.get_one(Rollout, rollout_id)
        session.expunge(rollout)
        return rollout


@pytest.mark.parametrize("enabled", [True, False])
async def test_a_canary_users_judge_worse_is_rolled_back_only_with_feedback_rollback(
    catalog_url, enabled
):
    sessions, rollout_id = _catalog(catalog_url, feedback_rollback=enabled, feedback_min=20)
    _serve(sessions, rollout_id, "canary", 60, up=6, down=24)
    _serve(sessions, rollout_id, "stable", 60, up=27, down=3)
    rollout = await _look(sessions, rollout_id)
    with sessions() as session:
        decision = session.get_one(Rollout, rollout_id).decisions[-1]
        numbers = {m["metric"]: m for m in decision.numbers}
    if enabled:
        assert (rollout.phase, rollout.reason, decision.action) == (
            Phase.ROLLED_BACK,
            "FeedbackRegressed",
            "rollback",
        )
        assert (
            numbers["feedback"]["status"] == "failed" and numbers["feedback"]["n_candidate"] == 30
        )
        assert "feedback worse: mean 0.200 (n=30) vs 0.900 (n=30)" in rollout.message
    else:  # the same feedback decides nothing: the step waits for its requests
        assert (rollout.phase, rollout.reason, decision.action) == (
            Phase.PROGRESSING,
            "SampleTooSmall",
            "extend",
        )
        assert "feedback" not in numbers
    assert numbers["confidence"]["status"] == "successful" and numbers["confidence"]["extra"] == {
        "informational": True
    }


async def test_feedback_is_judged_over_the_whole_rollout_but_not_before_its_minimum(catalog_url):
    sessions, rollout_id = _catalog(catalog_url, feedback_rollback=True, feedback_min=20)
    _serve(sessions, rollout_id, "canary", 40, up=2, down=17)  # 19 judged: one short of the minimum
    _serve(sessions, rollout_id, "stable", 40, up=20)
    # judged, but served outside this rollout: never counted
    _serve(sessions, None, "canary", 5, down=5)
    rollout = await _look(sessions, rollout_id)
    assert rollout.phase == Phase.PROGRESSING
    with sessions() as session:
        stored = session.get_one(Rollout, rollout_id)
        # the next step: no requests yet, the feedback stays
        stored.step_index, stored.last_look_at = 1, 0.0
        session.commit()
    _serve(sessions, rollout_id, "canary", 1, down=1)
    rollout = await _look(sessions, rollout_id)
    assert (rollout.phase, rollout.reason) == (Phase.ROLLED_BACK, "FeedbackRegressed")


def test_rollout_status_reports_feedback_and_confidence_per_variant(catalog_url):
    sessions, rollout_id = _catalog(catalog_url)
    _serve(sessions, rollout_id, "canary", 40, confidence=-1.0, up=3, down=7)
    _serve(sessions, rollout_id, "stable", 50, confidence=-0.5, up=16, down=4)
    with sessions() as session:
        session.add(
            RolloutSample(
                rollout_id=rollout_id,
                step_index=0,
                variant="canary",
                unit="x",
                ok=False,
                latency_s=0.1,
                output_tokens=0,
                format_valid=None,
                at=time.time(),
                confidence=None,
            )
        )
        session.commit()
        public = rollout_public(session.get_one(Rollout, rollout_id))
    feedback = {f.variant: f for f in public.feedback}
    canary, stable = feedback["canary"], feedback["stable"]
    assert (canary.requests, canary.count, canary.rate, canary.mean) == (
        40,
        10,
        0.25,
        pytest.approx(0.3),
    )
    assert (stable.requests, stable.count, stable.rate, stable.mean) == (
        50,
        20,
        0.4,
        pytest.approx(0.8),
    )
    expected = bounded_difference(
        Moments.of([1.0] * 3 + [0.0] * 7), Moments.of([1.0] * 16 + [0.0] * 4)
    )
    assert canary.difference == pytest.approx(-0.5) and canary.difference_interval == pytest.approx(
        expected.interval
    )
    assert canary.interval == pytest.approx(
        bounded_mean(Moments.of([1.0] * 3 + [0.0] * 7)).interval
    )
    assert canary.difference_interval[1] < 0 < canary.interval[0]
    assert (stable.difference, stable.difference_interval) == (None, None)  # the reference itself
    confidence = {c.variant: c for c in public.confidence}
    values = {
        v: [c - 0.01 * (i % 3) for i in range(n)]
        for v, c, n in (("canary", -1.0, 40), ("stable", -0.5, 50))
    }
    assert (confidence["canary"].count, confidence["stable"].count) == (40, 50)
    assert confidence["canary"].mean == pytest.approx(sum(values["canary"]) / 40)
    welch = welch_difference(Moments.of(values["canary"]), Moments.of(values["stable"]))
    assert welch.value == pytest.approx(-0.5, abs=1e-3)
    assert confidence["canary"].difference == pytest.approx(welch.value)
    assert confidence["canary"].difference_interval == pytest.approx(welch.interval)
    assert confidence["stable"].difference is None


def test_rollout_status_without_feedback_or_confidence_has_no_numbers(catalog_url):
    sessions, rollout_id = _catalog(catalog_url)
    _serve(sessions, rollout_id, "canary", 1, confidence=None)
    with sessions() as session:
        public = rollout_public(session.get_one(Rollout, rollout_id))
    canary = next(f for f in public.feedback if f.variant == "canary")
    assert (
        canary.requests,
        canary.count,
        canary.rate,
        canary.mean,
        canary.interval,
        canary.difference,
    ) == (1, 0, 0.0, None, None, None)
    stable = next(f for f in public.feedback if f.variant == "stable")
    assert (stable.requests, stable.rate) == (0, None)
    assert [(c.variant, c.count, c.mean, c.interval) for c in public.confidence] == [
        ("canary", 0, None, None),
        ("stable", 0, None, None),
    ]


def test_ab_status_compares_feedback_and_confidence_against_the_first_variant(catalog_url):
    sessions, rollout_id = _catalog(catalog_url, kind="ab")
    _serve(sessions, rollout_id, "m@1", 30, confidence=-0.4, up=18, down=2)
    _serve(sessions, rollout_id, "m@2", 30, confidence=-0.9, up=5, down=15)
    with sessions() as session:
        status = _ab_status(session, session.get_one(Rollout, rollout_id))
    summary = {v["variant"]: v for v in status["variants"]}
    assert (summary["m@1"]["feedback_count"], summary["m@1"]["feedback_mean"]) == (
        20,
        pytest.approx(0.9),
    )
    assert summary["m@2"]["feedback_rate"] == pytest.approx(20 / 30)
    assert summary["m@2"]["confidence_mean"] == pytest.approx(-0.91)
    (comparison,) = status["comparisons"]
    assert comparison["against"] == "m@1" and comparison["feedback"]["diff"] == pytest.approx(-0.65)
    assert comparison["feedback"]["interval"][1] < 0 and comparison["logprob"]["interval"][1] < 0
    feedback = {f["variant"]: f for f in status["rollout"]["feedback"]}
    assert (
        feedback["m@2"]["difference"] == pytest.approx(-0.65)
        and feedback["m@1"]["difference"] is None
    )
    # one quantity, one number: the A/B page's differences are the rollout's own (the console
    # shows the first, `ab status` the second)
    assert comparison["feedback"]["interval"] == pytest.approx(
        feedback["m@2"]["difference_interval"]
    )
    confidence = {c["variant"]: c for c in status["rollout"]["confidence"]}
    assert comparison["logprob"]["diff"] == pytest.approx(confidence["m@2"]["difference"])
    assert comparison["logprob"]["interval"] == pytest.approx(
        confidence["m@2"]["difference_interval"]
    )


@pytest.fixture
def rollouts_api(catalog_url) -> Iterator[tuple[str, sessionmaker, int]]:
    """The real rollouts routes on loopback HTTP over a real catalog; every request is tenant
    acme's (the gateway's key check is not what these tests are about)."""
    sessions, rollout_id = _catalog(catalog_url)
    app = FastAPI()
    app.include_router(router)
    app.state.gateway = SimpleNamespace(
        sessions=sessions, controller=SimpleNamespace(gate_progress={})
    )

    @app.middleware("http")
    async def as_acme(request, call_next):
        request.state.tenant = SimpleNamespace(id=1)
        return await call_next(request)

    with on_loopback(app) as url:
        yield url, sessions, rollout_id


def test_cli_rollout_status_prints_feedback_per_variant_and_the_confidence(rollouts_api):
    from typer.testing import CliRunner

    from lorafleet.serve.cli import app

    url, sessions, rollout_id = rollouts_api
    _serve(sessions, rollout_id, "canary", 40, confidence=-1.0, up=3, down=7)
    _serve(sessions, rollout_id, "stable", 50, confidence=-0.5, up=16, down=4)
    result = CliRunner().invoke(
        app, ["rollout", "status", "d", "--url", url, "--api-key", "k"], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    header = next(line for line in lines if "feedback n" in line)
    assert "mean [95% CI]" in header and "diff vs stable [95% CI]" in header
    canary = next(line for line in lines if line.startswith("│ canary") and "0.250" in line)
    judged = Moments.of([1.0] * 3 + [0.0] * 7)
    mean, diff = (
        bounded_mean(judged),
        bounded_difference(judged, Moments.of([1.0] * 16 + [0.0] * 4)),
    )
    assert f"0.300 [{mean.low:.3f}, {mean.high:.3f}]" in canary
    assert f"-0.500 [{diff.low:+.3f}, {diff.high:+.3f}]" in canary
    assert "│ 40 " in canary and "│ 10 " in canary
    stable = next(line for line in lines if line.startswith("│ stable") and "0.400" in line)
    assert "0.800 [" in stable and stable.rstrip("│ ").endswith("-")
    confidence = next(line for line in lines if line.startswith("confidence canary"))
    assert (
        "mean log-prob -1.010 [" in confidence and "(n=40); diff vs stable -0.500 [" in confidence
    )
    assert next(line for line in lines if line.startswith("confidence stable")).endswith(
        "(n=50) (informational)"
    )

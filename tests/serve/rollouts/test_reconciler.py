"""The controller's lease and stale-write guard on a real SQLite catalog (no engine needed)."""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

from lorafleet.adapters.catalog import (
    Adapter,
    AdapterVersion,
    Deployment,
    Rollout,
    Tenant,
    open_catalog,
)
from lorafleet.adapters.store import BlobStore, LocalStore
from lorafleet.errors import Conflict
from lorafleet.serve.api.rollouts import _command
from lorafleet.serve.engine.client import EngineClient
from lorafleet.serve.metrics import Metrics
from lorafleet.serve.rollouts import state as rollouts
from lorafleet.serve.rollouts.phases import Phase
from lorafleet.serve.rollouts.reconciler import RolloutController
from lorafleet.serve.rollouts.state import Tick, apply_tick


def _catalog(url: str):
    _, sessions = open_catalog(url)
    with sessions() as session:
        tenant = Tenant(name="acme", key_hash="k")
        session.add(tenant)
        session.flush()
        adapter = Adapter(tenant_id=tenant.id, name="m")
        session.add(adapter)
        session.flush()
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
        session.add_all([*versions, deployment])
        session.flush()
        rollout = Rollout(
            deployment=deployment,
            kind="canary",
            phase=Phase.PROGRESSING,
            salt="s",
            variants=[],
            steps=[10, 100],
            step_index=0,
            params={"to": "m@2"},
            created_by="t",
            created_at=time.time(),
        )
        session.add(rollout)
        session.commit()
        return sessions, rollout.id


def _parts() -> tuple[EngineClient, BlobStore, Metrics]:
    """Real collaborators; the engine is never started (nothing here needs it)."""
    store, metrics = LocalStore(Path(tempfile.mkdtemp())), Metrics()
    return EngineClient(store, metrics), BlobStore(store.root / "validation", ".jsonl"), metrics


def _controller(
    sessions, owner: str, lease_s: float = 30, clock: Callable[[], float] = time.time
) -> RolloutController:
    return RolloutController(sessions, *_parts(), owner, tick_s=1, lease_s=lease_s, clock=clock)


def test_only_one_gateway_holds_a_rollout_until_its_lease_expires(catalog_url):
    sessions, rollout_id = _catalog(catalog_url)
    now = [time.time()]  # both gateways' clock, moved on by the test

    def clock() -> float:
        return now[0]

    a = _controller(sessions, "a", lease_s=0.5, clock=clock)
    b = _controller(sessions, "b", clock=clock)
    assert a._lease(rollout_id)
    assert not b._lease(rollout_id)  # a second gateway does not act while the lease is alive
    assert a._lease(rollout_id)  # the owner renews
    now[0] += 0.6
    assert b._lease(rollout_id)  # a gateway that stopped renewing loses the rollout
    assert not a._lease(rollout_id)


def test_released_lease_is_taken_over_at_once(catalog_url):
    sessions, rollout_id = _catalog(catalog_url)
    a, b = _controller(sessions, "a"), _controller(sessions, "b")
    assert a._lease(rollout_id)
    a.release()
    assert b._lease(rollout_id)


def test_a_decision_made_on_a_stale_snapshot_is_not_written(catalog_url):
    sessions, rollout_id = _catalog(catalog_url)
    a = _controller(sessions, "a")
    assert a._lease(rollout_id)
    snapshot = SimpleNamespace(id=rollout_id, revision=1)
    with sessions() as session:  # a user pauses between the snapshot and the write
        session.get(Rollout, rollout_id).phase = Phase.PAUSED
        session.commit()

    def advance(session, rollout):
        rollout.step_index = 1
        session.commit()

    assert asyncio.run(a._write(snapshot, advance)) is False
    with sessions() as session:
        assert session.get(Rollout, rollout_id).step_index == 0


@pytest.mark.parametrize(
    ("look", "expected"), [("extend", Phase.ABORTED), ("rollback", Phase.ROLLED_BACK)]
)
def test_a_user_command_that_races_a_look_is_judged_on_the_fresh_rollout(
    catalog_url, look, expected
):
    sessions, rollout_id = _catalog(catalog_url)
    with sessions() as session:
        session.get(Deployment, 1).rollout_id = rollout_id
        session.get(Rollout, rollout_id).variants = [
            {
                "label": label,
                "version_id": v,
                "digest": str(v) * 64,
                "ref": f"m@{v}",
                "weight": weight,
            }
            for label, v, weight in (("canary", 2, 10.0), ("stable", 1, 90.0))
        ]
        session.commit()
    looked = []

    def abort_after_a_look(target: Deployment, rollout: Rollout | None) -> Rollout:
        # the controller writes its look between the user's read and the user's write
        if not looked:
            with sessions() as controller:
                apply_tick(
                    controller,
                    controller.get(Rollout, rollout_id),
                    Tick(look, "R", "a look", []),
                    0,
                    "controller:a",
                    time.time(),
                )
            looked.append(look)
        return rollouts.abort(session, target, rollout, "tenant:acme", time.time())

    with sessions() as session:
        tenant = session.get(Tenant, 1)
        # the look changed nothing the abort depends on: it is applied
        if expected is Phase.ABORTED:
            assert _command(session, tenant, "d", abort_after_a_look).phase == Phase.ABORTED
        # the controller finished the rollout first: the abort is refused for that, not for the
        # timing
        else:
            with pytest.raises(Conflict, match="cannot abort on 'd': there is no canary rollout"):
                _command(session, tenant, "d", abort_after_a_look)
    with sessions() as session:
        rollout = session.get(Rollout, rollout_id)
        assert (rollout.phase, rollout.looks, [d.action for d in rollout.decisions]) == (
            expected,
            1,
            [look, "abort"] if expected is Phase.ABORTED else [look],
        )


def test_drift_monitor_finds_versions_without_a_baseline_and_claims_replays_once(catalog_url):
    from lorafleet.adapters.catalog import ValidationRun, ValidationSet
    from lorafleet.serve.drift.monitor import DriftMonitor
    from lorafleet.serve.settings import Settings

    sessions, rollout_id = _catalog(catalog_url)
    with sessions() as session:
        # nothing but the stable version is live
        session.get(Rollout, rollout_id).phase = Phase.PROMOTED
        deployment = session.get(Deployment, 1)
        deployment.validation_set = ValidationSet(
            tenant_id=deployment.tenant_id,
            digest="v" * 64,
            metric="exact_match",
            items=1,
            size_bytes=1,
        )
        session.commit()
    settings = Settings(base="x", drift_replay_s=3600)
    monitors = []
    for _ in range(2):
        engine, validation_store, metrics = _parts()
        monitors.append(DriftMonitor(sessions, engine, validation_store, metrics, settings, "none"))
    assert monitors[0]._without_baseline() == [1]  # a new stable version: baseline at the next tick
    assert monitors[0]._claim("drift_replay_at", 3600) == [1]
    # the other gateway does not replay it too
    assert monitors[1]._claim("drift_replay_at", 3600) == []
    with sessions() as session:
        deployment = session.get(Deployment, 1)
        session.add(
            ValidationRun(
                deployment_id=1,
                version_id=deployment.stable_id,
                validation_set_id=deployment.validation_set_id,
                variant="stable",
                kind="baseline",
                at=time.time(),
                engine="e",
                score=1.0,
                scores=[1.0],
                outputs=["a"],
                output_tokens=[1],
                exact_match_rate=1.0,
            )
        )
        session.commit()
    assert monitors[1]._without_baseline() == []


async def test_a_slow_validation_gate_does_not_hold_up_the_other_rollouts(catalog_url):
    """The gate of one rollout waits on an engine that accepts but never answers; in the same
    tick the other rollout's look is still decided and written, and the gate keeps running in its
    own task."""
    from lorafleet.adapters.catalog import ValidationSet

    silent: list[asyncio.StreamWriter] = []
    engine_port = await asyncio.start_server(
        lambda _, writer: silent.append(writer), "127.0.0.1", 0
    )
    sessions, progressing = _catalog(catalog_url)
    engine, validation_store, metrics = _parts()
    engine = EngineClient(engine.store, metrics, port=engine_port.sockets[0].getsockname()[1])
    engine.mark_up()
    item = {
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    }
    digest = validation_store.put((json.dumps(item) + "\n").encode())
    variants = [
        {"label": label, "version_id": v, "digest": str(v) * 64, "ref": f"m@{v}", "weight": weight}
        for label, v, weight in (("canary", 2, 10.0), ("stable", 1, 90.0))
    ]
    with sessions() as session:
        session.get_one(Rollout, progressing).variants = variants
        session.get_one(Rollout, progressing).last_look_at = 0.0  # a look is due
        gated = Deployment(
            tenant_id=1,
            name="g",
            stable_id=1,
            validation_set=ValidationSet(
                tenant_id=1, digest=digest, metric="exact_match", items=1, size_bytes=1
            ),
        )
        gating = Rollout(
            deployment=gated,
            kind="canary",
            phase=Phase.GATING,
            salt="t",
            variants=variants,
            steps=[10, 100],
            step_index=-1,
            params={"to": "m@2"},
            created_by="t",
            created_at=time.time(),
        )
        session.add_all([gated, gating])
        session.commit()
        gating_id = gating.id
    controller = RolloutController(
        sessions, engine, validation_store, metrics, "a", tick_s=1, lease_s=30
    )
    try:
        await asyncio.wait_for(controller.tick(), 10)
        with sessions() as session:
            assert session.get_one(Rollout, progressing).looks == 1  # decided while the gate waits
            assert session.get_one(Rollout, gating_id).phase == Phase.GATING
        assert not controller._gates[gating_id].done()
        await asyncio.wait_for(controller.tick(), 10)  # the next tick does not start a second gate
        assert len(controller._gates) == 1
    finally:
        await controller.stop()
        engine_port.close()
    assert controller._gates == {}

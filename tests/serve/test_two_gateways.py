"""Two `lorafleet serve` processes, each with its own engine, on one PostgreSQL catalog and one
S3 store: what one gateway is given the other serves, and what runs once per fleet (a rollout's
controller, drift looks, scheduled replays) runs once, handed over when its gateway dies."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import httpx
import pytest
from sqlalchemy import select

from lorafleet.adapters.catalog import (
    Decision,
    Deployment,
    DriftCheck,
    Rollout,
    ValidationRun,
    open_catalog,
)
from lorafleet.serve.dev.local_server import LocalServer
from lorafleet.serve.gateway_client import inline_images
from tests.conftest import NEAR_BASE_STD
from tests.helpers import image_messages, poll_until, upload_folder
from tests.postgres import postgres_database

pytestmark = [pytest.mark.engine, pytest.mark.postgres]

LEASE_S = 4.0
REPLAY_S = 8.0


@dataclass
class Fleet:
    a: LocalServer
    b: LocalServer
    database_url: str
    store_url: str

    def gateways(self) -> tuple[LocalServer, LocalServer]:
        return self.a, self.b

    def admin(self, gateway: LocalServer) -> httpx.Client:
        return httpx.Client(
            base_url=gateway.url,
            headers={"Authorization": f"Bearer {gateway.admin_key}"},
            timeout=60,
        )


@pytest.fixture(scope="module")
def fleet(
    tiny_model: Path, s3_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fleet]:
    with postgres_database() as database_url:
        shared = dict(
            database_url=database_url,
            store_url=f"{s3_url}/fleet",
            max_model_len="512",
            dtype="float32",
            max_num_seqs="8",
            max_lora_rank="16",
            cpu_kvcache_gib="1",
            rollout_tick_s="0.5",
            rollout_lease_s=str(LEASE_S),
            drift_look_s="1",
            drift_window="10",
            drift_reservoir="64",
            drift_replay_s=str(REPLAY_S),
        )
        a = LocalServer.start(
            tiny_model, tmp_path_factory.mktemp("gateway-a"), gateway_id="gw-a", **shared
        )
        b = LocalServer.start(
            tiny_model,
            tmp_path_factory.mktemp("gateway-b"),
            gateway_id="gw-b",
            admin_key=a.admin_key,
            **shared,
        )
        try:
            a.wait_ready()
            b.wait_ready()
            yield Fleet(a, b, database_url, f"{s3_url}/fleet")
        finally:
            for gateway in (a, b):
                if gateway.process.poll() is None:
                    gateway.stop()


@pytest.fixture(scope="module")
def tenant(fleet: Fleet) -> dict[str, httpx.Client]:
    """One tenant, created through gateway a; its client on each gateway."""
    with fleet.admin(fleet.a) as admin:
        key = admin.post("/admin/tenants", json={"name": "fleet"}).json()["api_key"]
    return {
        name: httpx.Client(base_url=g.url, headers={"Authorization": f"Bearer {key}"}, timeout=120)
        for name, g in (("a", fleet.a), ("b", fleet.b))
    }


def _chat(http: httpx.Client, model: str) -> httpx.Response:
    response = http.post(
        "/v1/chat/completions",
        json={"model": model, "messages": image_messages(), "max_tokens": 4, "temperature": 0},
    )
    assert response.status_code == 200, response.text
    return response


def test_an_adapter_uploaded_through_one_gateway_is_served_by_the_other(
    fleet, tenant, make_adapter
):
    version = upload_folder(tenant["a"], "m", make_adapter(0, 8, std=NEAR_BASE_STD))
    tenant["a"].put("/v1/deployments/shared", json={"adapter": "m@1"}).raise_for_status()

    served = _chat(tenant["b"], "shared")
    assert served.headers["x-lorafleet-adapter"] == version["digest"]
    # fetched from S3 into b's cache
    assert (fleet.b.home / "cache" / "adapters" / version["digest"]).is_dir()
    assert not (fleet.b.home / "adapters").exists() or not any(
        (fleet.b.home / "adapters").iterdir()
    )
    bucket, prefix = fleet.store_url.removeprefix("s3://").split("/", 1)
    keys = {
        o["Key"]
        for o in boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]
    }
    assert f"{prefix}/adapters/{version['digest']}/manifest.json" in keys


def _scheduled_checks(runs: list[ValidationRun]) -> list[ValidationRun]:
    """The check runs of scheduled replays, by start time. A version without a baseline is
    replayed by every gateway at its next tick, claimed or not, and the later to finish records a
    check: that one started before the baseline ended, off the schedule."""
    baseline_end = min((r.at for r in runs if r.kind == "baseline"), default=float("inf"))
    return sorted(
        (
            r
            for r in runs
            if r.kind == "check" and r.started_at is not None and r.started_at >= baseline_end
        ),
        key=lambda r: r.started_at or 0.0,
    )


def test_drift_looks_and_scheduled_replays_run_once_for_the_fleet(fleet, tenant, tmp_path):
    from lorafleet.train.shapes import write_task

    http = tenant["a"]
    # the first test's upload
    http.put("/v1/deployments/watched", json={"adapter": "m@1"}).raise_for_status()
    validation = write_task("general", 8, tmp_path / "val.jsonl", seed=1)
    pushed = http.put(
        "/v1/deployments/watched/validation", files={"file": ("v.jsonl", inline_images(validation))}
    )
    assert pushed.status_code == 200, pushed.text
    for i in range(30):  # live traffic through both gateways: each samples what it serves
        _chat(tenant["a" if i % 2 else "b"], "watched")

    _, sessions = open_catalog(fleet.database_url)

    def history() -> tuple[list[ValidationRun], list[DriftCheck]]:
        with sessions() as session:
            deployment = session.scalar(select(Deployment.id).where(Deployment.name == "watched"))
            runs = session.scalars(
                select(ValidationRun)
                .where(ValidationRun.deployment_id == deployment)
                .order_by(ValidationRun.at)
            ).all()
            checks = session.scalars(
                select(DriftCheck)
                .where(DriftCheck.deployment_id == deployment)
                .order_by(DriftCheck.id)
            ).all()
            return list(runs), list(checks)

    poll_until(
        lambda: len(_scheduled_checks(history()[0])) >= 2, 6 * REPLAY_S, "two scheduled replays"
    )
    runs, checks = history()
    # both gateways found the version without one
    assert [r.kind for r in runs].count("baseline") == 1
    # Scheduled replays are claimed once per period by start time (`at`, when a replay ended, moves
    # with each replay's duration: seconds here, under load); two gateways replaying one period
    # would start moments apart
    starts = [r.started_at for r in _scheduled_checks(runs)]
    assert all(later - earlier >= 0.9 * REPLAY_S for earlier, later in zip(starts, starts[1:])), (
        starts
    )
    assert checks, "no drift look ran"
    for kind in ("input", "output"):
        looks = [c.look for c in checks if c.kind == kind and c.variant == checks[0].variant]
        # one look per number: never the same look by both
        assert looks == sorted(set(looks)), looks


def test_a_rollout_has_one_controller_and_the_other_takes_over_when_it_dies(
    fleet, tenant, make_adapter
):
    http = tenant["b"]
    # m@2 beside the first test's m@1
    upload_folder(http, "m", make_adapter(0, 4, std=NEAR_BASE_STD))
    http.put("/v1/deployments/rolled", json={"adapter": "m@1"}).raise_for_status()
    started = http.post(
        "/v1/deployments/rolled/rollout",
        json={
            "to": "m@2",
            "gate": False,
            "steps": [20, 50],
            "min_requests": 10**6,
            "interval_s": 3600,
        },
    )
    assert started.status_code == 202, started.text

    def owner() -> str | None:
        return http.get("/v1/deployments/rolled/rollout").json()["lease_owner"]

    first = poll_until(owner, 30, "a controller takes the rollout")
    for _ in range(8):  # held by one gateway while it lives, tick after tick
        assert owner() == first
        time.sleep(0.5)
    dead, survivor = (fleet.a, fleet.b) if first == "gw-a" else (fleet.b, fleet.a)
    dead.process.send_signal(signal.SIGKILL)  # no shutdown: its lease is not given up
    dead.process.wait(30)
    killed = time.monotonic()

    survivor_http = tenant["a" if survivor is fleet.a else "b"]
    survivor_http.get("/v1/deployments/rolled/rollout").raise_for_status()
    poll_until(
        lambda: (
            survivor_http.get("/v1/deployments/rolled/rollout").json()["lease_owner"]
            not in (None, first)
        ),
        LEASE_S + 10,
        "the other gateway takes the rollout over",
    )
    assert time.monotonic() - killed < LEASE_S + 10
    promoted = survivor_http.post("/v1/deployments/rolled/rollout/promote", json={"full": True})
    assert promoted.status_code == 200 and promoted.json()["phase"] == "Promoted", promoted.text
    _, sessions = open_catalog(fleet.database_url)
    with sessions() as session:
        rollout = session.scalar(
            select(Rollout).join(Deployment).where(Deployment.name == "rolled")
        )
        actors = {
            d.actor
            for d in session.scalars(select(Decision).where(Decision.rollout_id == rollout.id))
            if d.actor.startswith("controller:")
        }
    assert actors <= {"controller:gw-a", "controller:gw-b"}

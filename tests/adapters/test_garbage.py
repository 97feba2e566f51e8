"""Garbage collection on real catalogs (SQLite and PostgreSQL) and real store folders: what goes,
what never does, the delete races, retention rule by rule, the fleet-wide lease, and `lorafleet gc`.

Files get their age from `now`, not from sleeps: a file written during the test is "old" at now + 2
days. (Their status-change time, which a rename sets, cannot be backdated.)
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import sessionmaker
from typer.testing import CliRunner

from lorafleet.adapters import garbage
from lorafleet.adapters.catalog import (
    Adapter,
    AdapterVersion,
    Decision,
    Deployment,
    DriftCheck,
    Rollout,
    RolloutSample,
    Tenant,
    ValidationRun,
    ValidationSet,
    open_catalog,
)
from lorafleet.adapters.garbage import GC_LEASE, Removed, Retention, collect_garbage
from lorafleet.adapters.leases import take_lease
from lorafleet.adapters.store import BlobStore, LocalStore
from lorafleet.adapters.validate import CONFIG_FILE, WEIGHTS_FILE
from lorafleet.serve.cli import app
from lorafleet.serve.garbage_collector import GarbageCollector
from lorafleet.serve.settings import Settings

DAY = 86400.0
OLD = 2 * DAY  # past the default age bound (one day)
runner = CliRunner()


@pytest.fixture
def sessions(catalog_url: str) -> Iterator[sessionmaker]:
    engine, made = open_catalog(catalog_url)
    yield made
    engine.dispose()


@dataclass
class Stores:
    adapters: LocalStore
    validation: BlobStore
    scratch: Path


@pytest.fixture
def stores(tmp_path: Path) -> Stores:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    return Stores(
        LocalStore(tmp_path / "adapters"), BlobStore(tmp_path / "validation", ".jsonl"), scratch
    )


def _blob(store: LocalStore, char: str) -> str:
    digest = char * 64
    (store.root / digest).mkdir()
    (store.root / digest / CONFIG_FILE).write_text("{}")
    (store.root / digest / WEIGHTS_FILE).write_bytes(b"w" * 100)
    return digest


def _collect(
    sessions: sessionmaker,
    stores: Stores,
    age_s: float = OLD,
    dry_run: bool = False,
    retention: Retention = Retention(),
) -> garbage.GcReport:
    return collect_garbage(
        sessions,
        stores.adapters,
        stores.validation,
        [stores.scratch],
        retention,
        now=time.time() + age_s,
        dry_run=dry_run,
    )


@dataclass
class World:
    tenant_id: int
    version_id: int
    deployment_id: int
    validation_set_id: int


def _world(
    sessions: sessionmaker,
    digest: str = "a" * 64,
    validation_digest: str = "v" * 64,
    tenant: str = "acme",
) -> World:
    """A tenant with one adapter version, a deployment serving it, and the deployment's
    validation set."""
    with sessions() as s:
        t = Tenant(name=tenant, key_hash=hashlib.sha256(tenant.encode()).hexdigest())
        s.add(t)
        s.flush()
        adapter = Adapter(tenant_id=t.id, name="ext")
        version = AdapterVersion(
            adapter=adapter,
            version=1,
            digest=digest,
            rank=8,
            alpha=16.0,
            target_modules=["q_proj"],
            size_bytes=10,
        )
        vset = ValidationSet(
            tenant_id=t.id, digest=validation_digest, metric="exact_match", items=1, size_bytes=1
        )
        s.add_all([adapter, version, vset])
        s.flush()
        deployment = Deployment(
            tenant_id=t.id, name="invoice", stable_id=version.id, validation_set_id=vset.id
        )
        s.add(deployment)
        s.commit()
        return World(t.id, version.id, deployment.id, vset.id)


def _count(sessions: sessionmaker, table) -> int:
    with sessions() as s:
        return s.scalar(select(func.count()).select_from(table)) or 0


# --- blobs ---


def test_referenced_blobs_stay_and_old_orphans_go(sessions, stores):
    used = _blob(stores.adapters, "a")
    other_tenants = _blob(stores.adapters, "b")
    orphan = _blob(stores.adapters, "c")
    _world(sessions, used)
    _world(sessions, other_tenants, tenant="globex")  # a blob is shared across tenants
    report = _collect(sessions, stores)
    assert stores.adapters.exists(used) and stores.adapters.exists(other_tenants)
    assert not stores.adapters.exists(orphan)
    assert report.adapter_blobs == Removed(1, 102)
    assert not list(stores.adapters.temp_entries())  # the delete's `.del-` folder went too


def test_orphans_younger_than_the_bound_stay(sessions, stores):
    orphan = _blob(stores.adapters, "c")
    report = _collect(sessions, stores, age_s=60)
    assert stores.adapters.exists(orphan) and report.adapter_blobs == Removed()


def test_a_version_committed_during_the_delete_keeps_its_blob(sessions, stores):
    orphan = _blob(stores.adapters, "c")

    class RacingStore(LocalStore):
        def delete(self, digest, keep=lambda: False):
            def upload_commits_first() -> bool:
                _world(sessions, digest)  # after the collector's listing of referenced digests
                return keep()

            return super().delete(digest, keep=upload_commits_first)

    racing = RacingStore(stores.adapters.root)
    report = collect_garbage(
        sessions, racing, stores.validation, [], Retention(), now=time.time() + OLD
    )
    assert stores.adapters.exists(orphan) and report.adapter_blobs == Removed()


def test_validation_blobs_referenced_stay_orphans_go(sessions, stores):
    used = stores.validation.put(b"used\n")
    orphan = stores.validation.put(b"orphan\n")
    _world(sessions, validation_digest=used)
    report = _collect(sessions, stores)
    assert stores.validation.path(used).is_file() and not stores.validation.path(orphan).exists()
    assert report.validation_blobs == Removed(1, len(b"orphan\n"))


def test_a_validation_set_put_again_during_the_delete_stays(sessions, stores):
    data = b"re-uploaded\n"
    digest = stores.validation.put(data)

    class RacingBlobs(BlobStore):
        def delete(self, digest, keep=lambda: False, if_unmodified_since=None):
            # an upload of the same set, whose row commits after the collector's look
            self.put(data)
            return super().delete(digest, keep=keep, if_unmodified_since=if_unmodified_since)

    racing = RacingBlobs(stores.validation.root, ".jsonl")
    report = collect_garbage(
        sessions, stores.adapters, racing, [], Retention(), now=time.time() + OLD
    )
    assert stores.validation.path(digest).is_file() and report.validation_blobs == Removed()


def test_temporary_and_scratch_entries_go_once_old(sessions, stores):
    (stores.adapters.root / ".tmp-1").mkdir()
    (stores.adapters.root / ".tmp-1" / WEIGHTS_FILE).write_bytes(b"x" * 10)
    (stores.validation.root / ".del-2").write_bytes(b"y" * 5)
    (stores.scratch / "upload-3").mkdir()
    (stores.scratch / "upload-3" / "upload").write_bytes(b"z" * 7)
    young = _collect(sessions, stores, age_s=60)
    assert young.temp_entries == Removed() and young.scratch_entries == Removed()
    old = _collect(sessions, stores)
    assert old.temp_entries == Removed(2, 15) and old.scratch_entries == Removed(1, 7)
    assert not list(stores.adapters.temp_entries()) and not list(stores.validation.temp_entries())
    assert not list(stores.scratch.iterdir())


def test_remove_temp_refuses_a_blob(stores):
    digest = _blob(stores.adapters, "a")
    with pytest.raises(ValueError):
        stores.adapters.remove_temp(digest)
    assert stores.adapters.exists(digest)


# --- retention ---


def _rollout(session, world: World, finished_at: float | None, active: bool = False) -> Rollout:
    rollout = Rollout(
        deployment_id=world.deployment_id,
        kind="canary",
        phase="Progressing" if active else "Promoted",
        salt="s",
        variants=[],
        created_by="tenant:acme",
        created_at=0.0,
        finished_at=finished_at,
    )
    session.add(rollout)
    session.flush()
    if active:
        session.get_one(Deployment, world.deployment_id).rollout_id = rollout.id
    return rollout


def _decision(world: World, rollout: Rollout | None, at: float) -> Decision:
    return Decision(
        deployment_id=world.deployment_id,
        rollout_id=rollout.id if rollout else None,
        at=at,
        action="advance",
        reason="StepCompleted",
        message="",
        step_index=0,
        actor="controller:g",
    )


def _sample(rollout: Rollout, at: float) -> RolloutSample:
    return RolloutSample(
        rollout_id=rollout.id,
        step_index=0,
        variant="canary",
        unit="u",
        ok=True,
        latency_s=0.1,
        output_tokens=1,
        format_valid=None,
        at=at,
    )


def test_samples_and_decisions_of_rollouts_finished_before_the_cutoff_go(sessions, stores):
    world, now = _world(sessions), time.time()
    long_ago = now - 40 * DAY
    with sessions() as s:
        old = _rollout(s, world, finished_at=long_ago)
        recent = _rollout(s, world, finished_at=now - DAY)
        active = _rollout(s, world, finished_at=None, active=True)
        for rollout in (old, recent, active):
            s.add_all([_sample(rollout, long_ago), _decision(world, rollout, long_ago)])
        # e.g. `undo`
        s.add_all([_decision(world, None, long_ago), _decision(world, None, now - DAY)])
        s.commit()
        ids = {"old": old.id, "recent": recent.id, "active": active.id}
    report = collect_garbage(
        sessions,
        stores.adapters,
        stores.validation,
        [],
        Retention(rollout_samples_days=30, decisions_days=30),
        now=now,
    )
    assert report.rows == {"rollout_samples": 1, "decisions": 2}
    with sessions() as s:
        assert set(s.scalars(select(RolloutSample.rollout_id))) == {ids["recent"], ids["active"]}
        assert sorted(s.scalars(select(Decision.rollout_id)), key=str) == sorted(
            [ids["recent"], ids["active"], None], key=str
        )
        assert s.scalar(select(Decision.at).where(Decision.rollout_id.is_(None))) == now - DAY


def test_an_active_rollout_is_never_touched_even_when_long_finished_on_paper(sessions, stores):
    world, now = _world(sessions), time.time()
    with sessions() as s:  # inconsistent, but the deployment still routes by it: it is running
        rollout = _rollout(s, world, finished_at=now - 40 * DAY, active=True)
        s.add_all([_sample(rollout, now - 40 * DAY), _decision(world, rollout, now - 40 * DAY)])
        s.commit()
    report = collect_garbage(
        sessions,
        stores.adapters,
        stores.validation,
        [],
        Retention(rollout_samples_days=1, decisions_days=1),
        now=now,
    )
    assert report.rows == {"rollout_samples": 0, "decisions": 0}


def _check(world: World, at: float, look: int, kind: str = "input") -> DriftCheck:
    return DriftCheck(
        deployment_id=world.deployment_id,
        version_id=world.version_id,
        variant="all",
        kind=kind,
        at=at,
        look=look,
        p=0.5,
        q=0.5,
        drifted=False,
    )


def test_old_drift_checks_go_but_each_series_keeps_its_newest(sessions, stores):
    world, now = _world(sessions), time.time()
    with sessions() as s:
        # a series gone quiet
        s.add_all([_check(world, now - 50 * DAY, 1), _check(world, now - 40 * DAY, 2)])
        s.add_all(
            [_check(world, now - 50 * DAY, 1, "output"), _check(world, now - DAY, 2, "output")]
        )
        s.commit()
    report = collect_garbage(
        sessions, stores.adapters, stores.validation, [], Retention(drift_checks_days=30), now=now
    )
    assert report.rows == {"drift_checks": 2}
    with sessions() as s:
        assert sorted(s.execute(select(DriftCheck.kind, DriftCheck.look))) == [
            ("input", 2),
            ("output", 2),
        ]


def test_the_drift_monitor_numbers_looks_on_after_retention(sessions, stores):
    from lorafleet.serve.drift.monitor import _last_look

    world, now = _world(sessions), time.time()
    with sessions() as s:
        s.add_all(_check(world, now - (50 - look) * DAY, look) for look in range(1, 6))
        s.commit()
    collect_garbage(
        sessions, stores.adapters, stores.validation, [], Retention(drift_checks_days=1), now=now
    )
    with sessions() as s:
        assert _count(sessions, DriftCheck) == 1
        assert (
            _last_look(
                s, DriftCheck.deployment_id == world.deployment_id, DriftCheck.kind == "input"
            )
            == 5
        )


def _run(world: World, kind: str, at: float) -> ValidationRun:
    return ValidationRun(
        deployment_id=world.deployment_id,
        version_id=world.version_id,
        validation_set_id=world.validation_set_id,
        variant="stable",
        kind=kind,
        at=at,
        engine="e",
        score=1.0,
        scores=[1.0],
        outputs=["a"],
        output_tokens=[1],
        exact_match_rate=1.0,
    )


def test_old_check_replays_go_never_the_baseline_nor_the_newest_check(sessions, stores):
    world, now = _world(sessions), time.time()
    with sessions() as s:
        s.add_all(
            [
                _run(world, "baseline", now - 90 * DAY),
                _run(world, "check", now - 60 * DAY),
                _run(world, "check", now - 50 * DAY),
                _run(world, "check", now - 40 * DAY),
            ]
        )
        s.commit()
    report = collect_garbage(
        sessions,
        stores.adapters,
        stores.validation,
        [],
        Retention(validation_runs_days=30),
        now=now,
    )
    assert report.rows == {"validation_runs": 2}
    with sessions() as s:
        kept = sorted(s.execute(select(ValidationRun.kind, ValidationRun.at)))
    assert kept == [("baseline", now - 90 * DAY), ("check", now - 40 * DAY)]


def test_zero_retention_keeps_everything(sessions, stores):
    world, now = _world(sessions), time.time()
    with sessions() as s:
        rollout = _rollout(s, world, finished_at=now - 400 * DAY)
        s.add_all(
            [
                _sample(rollout, 0.0),
                _decision(world, rollout, 0.0),
                _check(world, 0.0, 1),
                _check(world, 1.0, 2),
                _run(world, "check", 0.0),
                _run(world, "check", 1.0),
            ]
        )
        s.commit()
    report = collect_garbage(sessions, stores.adapters, stores.validation, [], Retention(), now=now)
    assert report.rows == {}
    assert [_count(sessions, t) for t in (RolloutSample, Decision, DriftCheck, ValidationRun)] == [
        1,
        1,
        2,
        2,
    ]


def test_history_goes_in_batches(sessions, stores, monkeypatch):
    monkeypatch.setattr(garbage, "BATCH_ROWS", 3)
    world, now = _world(sessions), time.time()
    with sessions() as s:
        rollout = _rollout(s, world, finished_at=now - 40 * DAY)
        s.add_all(_sample(rollout, 0.0) for _ in range(10))
        s.commit()
    report = collect_garbage(
        sessions, stores.adapters, stores.validation, [], Retention(rollout_samples_days=1), now=now
    )
    assert report.rows == {"rollout_samples": 10} and _count(sessions, RolloutSample) == 0


def test_negative_retention_is_refused():
    with pytest.raises(ValueError, match="decisions_days"):
        Retention(decisions_days=-1)


def test_a_dry_run_deletes_nothing_and_counts_the_same(sessions, stores):
    world, now = _world(sessions), time.time()
    _blob(stores.adapters, "c")
    stores.validation.put(b"orphan\n")
    (stores.adapters.root / ".tmp-1").mkdir()
    (stores.scratch / "upload-3").mkdir()
    with sessions() as s:
        rollout = _rollout(s, world, finished_at=now - 40 * DAY)
        s.add_all(
            [
                _sample(rollout, 0.0),
                _decision(world, rollout, 0.0),
                _check(world, 0.0, 1),
                _check(world, 1.0, 2),
                _run(world, "check", 0.0),
                _run(world, "check", 1.0),
            ]
        )
        s.commit()
    retention = Retention(
        rollout_samples_days=1, decisions_days=1, drift_checks_days=1, validation_runs_days=1
    )
    listing = sorted(
        p.name
        for root in (stores.adapters.root, stores.validation.root, stores.scratch)
        for p in root.iterdir()
    )
    dry = collect_garbage(
        sessions, stores.adapters, stores.validation, [stores.scratch], retention, now + OLD, True
    )
    assert (
        sorted(
            p.name
            for root in (stores.adapters.root, stores.validation.root, stores.scratch)
            for p in root.iterdir()
        )
        == listing
    )
    assert [_count(sessions, t) for t in (RolloutSample, Decision, DriftCheck, ValidationRun)] == [
        1,
        1,
        2,
        2,
    ]
    real = collect_garbage(
        sessions, stores.adapters, stores.validation, [stores.scratch], retention, now + OLD
    )
    assert dry.dry_run and not real.dry_run
    assert dry.kinds() == real.kinds()
    assert all(removed.count == 1 for removed in real.kinds().values())


# --- the lease ---


class BlockingStore(LocalStore):
    """Holds a collection inside its listing until released."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.entered, self.release = threading.Event(), threading.Event()

    def digests(self):
        self.entered.set()
        assert self.release.wait(30)
        return super().digests()


def _collector(
    sessions, stores: Stores, owner: str, store: LocalStore | None = None
) -> GarbageCollector:
    return GarbageCollector(
        sessions,
        store or stores.adapters,
        stores.validation,
        [stores.scratch],
        Settings(),
        owner=owner,
    )


def test_of_two_concurrent_collectors_one_runs(sessions, stores):
    blocking = BlockingStore(stores.adapters.root)
    first = _collector(sessions, stores, "gateway-1", blocking)
    results: list = []
    thread = threading.Thread(target=lambda: results.append(first.run_once(every_s=3600)))
    thread.start()
    try:
        assert blocking.entered.wait(30)
        # held by the first
        assert _collector(sessions, stores, "gateway-2").run_once(every_s=3600) is None
    finally:
        blocking.release.set()
        thread.join(30)
    assert results and results[0] is not None
    second = _collector(sessions, stores, "gateway-2")
    assert second.run_once(every_s=3600) is None  # the fleet ran less than a period ago
    assert second.run_once(every_s=0) is not None  # a manual run does not wait for the period


def test_a_failed_run_gives_the_lease_back(sessions, stores):
    class BrokenStore(LocalStore):
        def digests(self):
            raise OSError("disk gone")

    with pytest.raises(OSError):
        _collector(sessions, stores, "gateway-1", BrokenStore(stores.adapters.root)).run_once(
            every_s=3600
        )
    # not counted as a run
    assert _collector(sessions, stores, "gateway-2").run_once(every_s=3600) is not None


def test_collector_exports_what_it_removed(sessions, stores):
    from lorafleet.serve.metrics import Metrics

    _blob(stores.adapters, "c")
    metrics = Metrics()
    settings = Settings(gc_temp_age_s=0)
    collector = GarbageCollector(
        sessions, stores.adapters, stores.validation, [stores.scratch], settings, "g", metrics
    )
    assert collector.run_once() is not None
    assert (
        metrics.registry.get_sample_value("lorafleet_gc_deleted_total", {"kind": "adapter_blobs"})
        == 1
    )


# --- the CLI ---


def _home(tmp_path: Path, catalog_url: str) -> tuple[dict[str, str], Path]:
    env = {
        "LORAFLEET_HOME": str(tmp_path / "home"),
        "LORAFLEET_DATABASE_URL": catalog_url,
        "LORAFLEET_GC_TEMP_AGE_S": "0",
    }  # what exists before the command counts as old
    return env, Settings(home=tmp_path / "home").home


def _row(output: str, name: str) -> list[str]:
    """The other cells of the table row that starts with `name`."""
    line = next(line for line in output.splitlines() if name in line)
    return [cell.strip() for cell in line.split("│") if cell.strip()][1:]


def test_cli_gc_dry_run_then_gc(tmp_path, sessions, catalog_url):
    env, home = _home(tmp_path, catalog_url)
    adapters = LocalStore(home / "adapters")
    used, orphan = _blob(adapters, "a"), _blob(adapters, "c")
    _world(sessions, used)
    dry = runner.invoke(app, ["gc", "--dry-run"], env=env)
    assert dry.exit_code == 0, dry.output
    assert "would remove" in dry.output and _row(dry.output, "orphan adapter blobs") == ["1", "102"]
    assert adapters.exists(orphan)
    assert "catalog history is kept" in dry.output
    done = runner.invoke(app, ["gc"], env=env | {"LORAFLEET_RETENTION_DECISIONS_DAYS": "30"})
    assert done.exit_code == 0, done.output
    assert "removed" in done.output and _row(done.output, "decisions rows") == ["0", "-"]
    assert adapters.exists(used) and not adapters.exists(orphan)


def test_cli_gc_waits_for_a_gateway_that_holds_the_lease(tmp_path, sessions, catalog_url):
    env, _ = _home(tmp_path, catalog_url)
    assert take_lease(sessions, GC_LEASE, "gateway-1", ttl_s=600)
    result = runner.invoke(app, ["gc"], env=env)
    assert result.exit_code == 1 and "another garbage collection is running" in result.output


def test_cli_gc_refuses_a_missing_sqlite_catalog(tmp_path):
    result = runner.invoke(app, ["gc", "--home", str(tmp_path / "nowhere")])
    assert result.exit_code == 1 and "no catalog at" in result.output
    assert not (tmp_path / "nowhere" / "catalog.db").exists()


# --- the S3 stores behind the same interface ---


def test_s3_orphans_go_and_referenced_blobs_stay(sessions, s3_url, tmp_path):
    from lorafleet.adapters.adapter_cache import AdapterCache
    from lorafleet.adapters.s3_store import S3AdapterStore, S3BlobStore, parse_s3_url
    from tests.adapters.test_s3_store import small_adapter

    location = parse_s3_url(f"{s3_url}/gc-{time.time_ns()}")
    store = S3AdapterStore(location, AdapterCache(tmp_path / "cache", 10**9))
    blobs = S3BlobStore(location.child("validation"), ".jsonl")
    used, orphan = (
        small_adapter(tmp_path / "used", seed=1),
        small_adapter(tmp_path / "orphan", seed=2),
    )
    store.put(used)
    store.put(orphan)
    kept_set, orphan_set = blobs.put(b"used\n"), blobs.put(b"orphan\n")
    _world(sessions, used.digest, kept_set)
    young = collect_garbage(sessions, store, blobs, [], Retention(), now=time.time() + 60)
    assert young.adapter_blobs.count == young.validation_blobs.count == 0
    report = collect_garbage(sessions, store, blobs, [], Retention(), now=time.time() + OLD)
    assert report.adapter_blobs.count == 1 and report.validation_blobs.count == 1
    assert {d for d, _ in store.digests()} == {used.digest} and {d for d, _ in blobs.digests()} == {
        kept_set
    }
    assert orphan_set != kept_set

"""Retention of the feedback loop's data by the garbage collector, on a real catalog and real
store folders: captures past their deployment's retention (or of a deployment that stopped
capturing) with the images only they showed, orphan capture images, the request log and feedback;
and what `lorafleet gc` reports of them."""

from __future__ import annotations

import time
from pathlib import Path

from sqlalchemy import select
from typer.testing import CliRunner

from lorafleet.adapters.catalog import Capture, Feedback, RequestRecord
from lorafleet.adapters.garbage import Removed, Retention, collect_garbage
from lorafleet.adapters.store import BlobStore, LocalStore
from lorafleet.serve.cli import app
from lorafleet.serve.garbage_collector import GarbageCollector
from lorafleet.serve.metrics import Metrics
from lorafleet.serve.settings import Settings

DAY = 86400.0
runner = CliRunner()


def _capture(
    sessions, images: BlobStore, place, request_id: str, at: float, pictures: list[bytes]
) -> None:
    digests = sorted({images.put(data) for data in pictures})
    with sessions() as s:
        s.add(
            Capture(
                request_id=request_id,
                tenant_id=place.tenant_id,
                deployment_id=place.deployment_id,
                deployment=place.deployment,
                variant="stable",
                digest=place.digest,
                at=at,
                messages=[{"role": "user", "content": "hi"}],
                answer="a",
                images=digests,
                confidence_mean=None,
                size_bytes=10,
            )
        )
        s.commit()


def _request_ids(sessions, table) -> set[str]:
    with sessions() as s:
        return set(s.scalars(select(table.request_id)))


def _collect(
    sessions,
    images: BlobStore,
    tmp_path: Path,
    now: float,
    retention: Retention = Retention(),
    dry_run: bool = False,
):
    return collect_garbage(
        sessions,
        LocalStore(tmp_path / "adapters"),
        BlobStore(tmp_path / "validation", ".jsonl"),
        [],
        retention,
        now,
        dry_run=dry_run,
        capture_store=images,
    )


def test_captures_past_their_deployment_retention_go_with_the_images_only_they_showed(
    sessions, images, place, tmp_path
):
    now = time.time()
    short = place(
        deployment="short", policy={"sample_rate": 1.0, "max_per_day": 10, "retention_days": 7.0}
    )
    long = place(
        deployment="long", policy={"sample_rate": 1.0, "max_per_day": 10, "retention_days": 90.0}
    )
    _capture(
        sessions, images, short, "short-old", now - 10 * DAY, [b"old picture", b"shared picture"]
    )
    _capture(sessions, images, short, "short-new", now - 1 * DAY, [b"new picture"])
    _capture(sessions, images, long, "long-old", now - 10 * DAY, [b"shared picture"])
    report = _collect(sessions, images, tmp_path, now)
    assert _request_ids(sessions, Capture) == {"short-new", "long-old"}
    assert report.rows["captures"] == 1 and report.capture_images == Removed(1, len(b"old picture"))
    assert len(list(images.digests())) == 2  # the new and the shared picture


def test_captures_of_a_deployment_that_stopped_capturing_go(sessions, images, place, tmp_path):
    now = time.time()
    stopped, capturing = place(deployment="stopped", policy=None), place(deployment="capturing")
    _capture(sessions, images, stopped, "leftover", now - 60, [b"a picture"])
    _capture(sessions, images, capturing, "kept", now - 60, [b"another picture"])
    report = _collect(sessions, images, tmp_path, now)
    assert _request_ids(sessions, Capture) == {"kept"} and report.rows["captures"] == 1
    assert report.capture_images is not None and report.capture_images.count == 1


def test_orphan_capture_images_go_once_old_referenced_ones_never(sessions, images, place, tmp_path):
    invoice = place()
    _capture(sessions, images, invoice, "kept", time.time(), [b"referenced"])
    orphan = images.put(b"an image whose capture was never committed")
    young = _collect(sessions, images, tmp_path, time.time() + 60)
    assert young.capture_images == Removed() and images.path(orphan).is_file()
    old = _collect(sessions, images, tmp_path, time.time() + 2 * DAY)
    assert old.capture_images == Removed(1, len(b"an image whose capture was never committed"))
    assert not images.path(orphan).exists() and len(list(images.digests())) == 1
    assert _request_ids(sessions, Capture) == {"kept"}  # 30 days of retention: not yet


def _log(sessions, place, request_id: str, at: float) -> None:
    with sessions() as s:
        s.add(
            RequestRecord(
                request_id=request_id,
                tenant_id=place.tenant_id,
                at=at,
                deployment_id=place.deployment_id,
                deployment=place.deployment,
                variant="stable",
                digest=place.digest,
                status=200,
                latency_s=0.1,
            )
        )
        s.add(
            Feedback(
                tenant_id=place.tenant_id,
                request_id=request_id,
                deployment_id=place.deployment_id,
                deployment=place.deployment,
                variant="stable",
                digest=place.digest,
                score=1,
                value=1.0,
                correction=None,
                comment="",
                at=at,
                created_at=at,
                updated_at=at,
            )
        )
        s.commit()


def test_the_request_log_and_feedback_go_after_their_own_retention(
    sessions, images, place, tmp_path
):
    invoice, now = place(), time.time()
    _log(sessions, invoice, "old", now - 100 * DAY)
    _log(sessions, invoice, "month", now - 40 * DAY)
    _log(sessions, invoice, "new", now - DAY)
    kept = _collect(sessions, images, tmp_path, now)
    assert "requests" not in kept.rows and "feedback" not in kept.rows  # 0 days: kept forever
    report = _collect(
        sessions, images, tmp_path, now, Retention(requests_days=30, feedback_days=90)
    )
    assert report.rows["requests"] == 2 and report.rows["feedback"] == 1
    assert _request_ids(sessions, RequestRecord) == {"new"} and _request_ids(
        sessions, Feedback
    ) == {"month", "new"}


def test_a_dry_run_counts_expired_captures_and_deletes_nothing(sessions, images, place, tmp_path):
    stopped = place(policy=None)
    _capture(sessions, images, stopped, "leftover", time.time() - 60, [b"a picture"])
    dry = _collect(sessions, images, tmp_path, time.time(), dry_run=True)
    assert dry.rows["captures"] == 1 and _request_ids(sessions, Capture) == {"leftover"}
    assert len(list(images.digests())) == 1


def test_the_collector_takes_retention_from_settings_and_exports_what_it_removed(
    sessions, images, place, tmp_path
):
    invoice, now = place(policy=None), time.time()
    _capture(sessions, images, invoice, "leftover", now - 60, [b"a picture"])
    _log(sessions, invoice, "old", now - 40 * DAY)  # the request log's default retention: 30 days
    metrics = Metrics()
    collector = GarbageCollector(
        sessions,
        LocalStore(tmp_path / "adapters"),
        BlobStore(tmp_path / "v", ".jsonl"),
        [],
        Settings(),
        "g",
        metrics,
        capture_store=images,
    )
    report = collector.run_once()
    assert report is not None and report.rows["requests"] == 1 and "feedback" not in report.rows
    for kind in ("captures", "capture_images", "requests"):
        assert (
            metrics.registry.get_sample_value("lorafleet_gc_deleted_total", {"kind": kind}) == 1
        ), kind
    without = GarbageCollector(
        sessions,
        LocalStore(tmp_path / "adapters"),
        BlobStore(tmp_path / "v", ".jsonl"),
        [],
        Settings(),
        "g",
    ).collect()
    # no capture store: not touched
    assert without.capture_images is None and "captures" not in without.rows


def test_cli_gc_collects_captures_in_the_gateway_capture_store(
    tmp_path, sessions, place, catalog_url
):
    env = {"LORAFLEET_HOME": str(tmp_path / "home"), "LORAFLEET_DATABASE_URL": catalog_url}
    images = BlobStore(Settings(home=tmp_path / "home").home / "captures", "")
    _capture(sessions, images, place(policy=None), "leftover", time.time() - 60, [b"a picture"])
    dry = runner.invoke(app, ["gc", "--dry-run"], env=env)
    assert dry.exit_code == 0, dry.output
    assert "captures rows" in dry.output and len(list(images.digests())) == 1
    # the request log's retention is not the rollouts' history
    assert "catalog history is kept" in dry.output
    done = runner.invoke(app, ["gc"], env=env)
    assert done.exit_code == 0, done.output
    line = next(line for line in done.output.splitlines() if "capture images" in line)
    assert [cell.strip() for cell in line.split("│") if cell.strip()][1:] == [
        "1",
        str(len(b"a picture")),
    ]
    assert list(images.digests()) == [] and _request_ids(sessions, Capture) == set()

"""The garbage collector of a gateway and of `lorafleet gc`: `collect_garbage` under the
fleet-wide "gc" lease, so gateways sharing a catalog collect once per `gc_interval_s` between
them, and never alongside a manual run."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from sqlalchemy.orm import sessionmaker
from starlette.concurrency import run_in_threadpool

from lorafleet.adapters.garbage import GC_LEASE, GcReport, Retention, collect_garbage
from lorafleet.adapters.leases import finish_lease, release_lease, take_lease
from lorafleet.adapters.store import AdapterStore, BlobStorage
from lorafleet.serve.metrics import Metrics
from lorafleet.serve.settings import Settings

__all__ = ["GarbageCollector", "retention_of", "GC_LEASE_S", "GC_POLL_S"]

log = logging.getLogger("lorafleet.gc")

# A run longer than this may overlap the next holder's: harmless (each delete is idempotent and
# race-safe), only wasted work; a gateway that dies mid-run holds up the fleet's collection this
# long.
GC_LEASE_S = 3600.0
# How often a gateway asks for the lease, at most: finer than the interval, so that the fleet's runs
# stay about one interval apart (asking only once per interval, a refusal just before it is due
# would wait a second one).
GC_POLL_S = 300.0


def retention_of(settings: Settings) -> Retention:
    """The retention and age bound these settings set."""
    return Retention(
        rollout_samples_days=settings.retention_rollout_samples_days,
        decisions_days=settings.retention_decisions_days,
        drift_checks_days=settings.retention_drift_checks_days,
        validation_runs_days=settings.retention_validation_runs_days,
        requests_days=settings.retention_requests_days,
        feedback_days=settings.retention_feedback_days,
        usage_days=settings.retention_usage_days,
        temp_age_s=settings.gc_temp_age_s,
    )


class GarbageCollector:
    """Collects garbage when it holds the "gc" lease: periodically in a gateway, or once from the
    CLI. Without a capture store, captured requests and their images are left alone."""

    def __init__(
        self,
        sessions: sessionmaker,
        store: AdapterStore,
        validation_store: BlobStorage,
        tmp_dirs: list[Path],
        settings: Settings,
        owner: str,
        metrics: Metrics | None = None,
        capture_store: BlobStorage | None = None,
    ) -> None:
        self.sessions, self.store, self.validation_store = sessions, store, validation_store
        self.tmp_dirs, self.settings, self.owner, self.metrics = tmp_dirs, settings, owner, metrics
        self.capture_store = capture_store
        # checked now: a negative setting fails at start, not at a run
        self.retention = retention_of(settings)

    def collect(self, now: float | None = None, dry_run: bool = False) -> GcReport:
        """One collection, without the lease (a dry run needs none: it deletes nothing)."""
        return collect_garbage(
            self.sessions,
            self.store,
            self.validation_store,
            self.tmp_dirs,
            self.retention,
            time.time() if now is None else now,
            dry_run=dry_run,
            capture_store=self.capture_store,
        )

    def run_once(self, every_s: float = 0.0, now: float | None = None) -> GcReport | None:
        """One collection if this process gets the lease; None if another holds it, or the
        fleet's last run finished less than `every_s` seconds ago. A failed run gives the lease
        back without counting as one."""
        if not take_lease(self.sessions, GC_LEASE, self.owner, GC_LEASE_S, every_s):
            return None
        try:
            report = self.collect(now)
        except BaseException:
            release_lease(self.sessions, GC_LEASE, self.owner)
            raise
        finish_lease(self.sessions, GC_LEASE, self.owner)
        if self.metrics is not None:
            for kind, removed in report.kinds().items():
                self.metrics.gc_deleted.labels(kind=kind).inc(removed.count)
        return report

    async def run(self) -> None:
        """The gateway's loop (returns at once when `gc_interval_s` is 0). A run continues in its
        thread if the loop is cancelled, and gives up its lease at its end."""
        interval = self.settings.gc_interval_s
        if interval <= 0:
            return
        while True:
            await asyncio.sleep(min(interval, GC_POLL_S))
            try:
                report = await run_in_threadpool(self.run_once, interval)
            except Exception:  # noqa: BLE001 - the next period tries again
                log.exception("garbage collection failed")
                continue
            if report is not None:
                log.info(
                    "garbage collected: %s",
                    ", ".join(
                        f"{kind} {removed.count}" for kind, removed in report.kinds().items()
                    ),
                )

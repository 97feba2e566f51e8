"""`lorafleet gc`: garbage collection on the catalog and stores the settings name (gateways also
run it periodically), under the same fleet-wide lease as theirs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from lorafleet.adapters.garbage import GcReport
from lorafleet.errors import LorafleetError
from lorafleet.serve.cli.common import console

__all__ = ["gc"]

_NAMES = {
    "adapter_blobs": "orphan adapter blobs",
    "validation_blobs": "orphan validation sets",
    "temp_entries": "temporary store entries",
    "scratch_entries": "scratch entries",
    "capture_images": "capture images (orphans, and of expired captures)",
}
# the history that LORAFLEET_RETENTION_*_DAYS of 0 keeps (the request log has a default retention;
# captures have their deployment's)
_HISTORY = {"rollout_samples", "decisions", "drift_checks", "validation_runs"}


def gc(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only show what would be removed.")
    ] = False,
    home: Annotated[
        Optional[Path], typer.Option(help="State folder (catalog, adapters, logs).")
    ] = None,
) -> None:
    """Remove orphan blobs, old temporary and scratch entries, catalog history past
    LORAFLEET_RETENTION_*, and captured requests past their deployment's retention."""
    from sqlalchemy.engine import make_url

    from lorafleet.adapters.catalog import open_catalog
    from lorafleet.serve.garbage_collector import GarbageCollector
    from lorafleet.serve.gateway import open_capture_store, open_stores, scratch_dir
    from lorafleet.serve.rollouts.reconciler import new_gateway_id
    from lorafleet.serve.settings import Settings

    try:
        settings = Settings(home=home) if home is not None else Settings()
        _require_catalog(settings.database_url)
        _, sessions = open_catalog(settings.database_url)
        store, validation_store = open_stores(settings)
        collector = GarbageCollector(
            sessions,
            store,
            validation_store,
            [scratch_dir(settings)],
            settings,
            owner=f"cli:{new_gateway_id()}",
            capture_store=open_capture_store(settings),
        )
        console.print(
            f"catalog {make_url(settings.database_url).render_as_string()}, "
            f"store {settings.store_url}",
            highlight=False,
            soft_wrap=True,
        )
        report = collector.collect(dry_run=True) if dry_run else collector.run_once()
    except (ValueError, OSError) as exc:
        raise LorafleetError(str(exc)) from exc
    if report is None:
        raise LorafleetError(
            'another garbage collection is running (it holds the fleet\'s "gc" lease): '
            "try again later"
        )
    console.print(_table(report))
    if not _HISTORY & set(report.rows):
        console.print(
            "catalog history is kept (rollout samples, decisions, drift checks, validation "
            "runs): no LORAFLEET_RETENTION_*_DAYS is set for it"
        )


def _require_catalog(url: str) -> None:
    """A SQLite catalog must exist already: a new, empty one (the wrong home, a missing
    LORAFLEET_DATABASE_URL) references no blob, so every stored one would look orphaned."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if (
        parsed.get_backend_name() == "sqlite"
        and parsed.database
        and not Path(parsed.database).is_file()
    ):
        raise LorafleetError(
            f"no catalog at {parsed.database}: set LORAFLEET_HOME or LORAFLEET_DATABASE_URL as the "
            "gateways have them"
        )


def _table(report: GcReport) -> Table:
    table = Table("what", "would remove" if report.dry_run else "removed", "bytes")
    for kind, removed in report.kinds().items():
        name = _NAMES.get(kind, f"{kind} rows")
        table.add_row(name, str(removed.count), str(removed.bytes) if kind in _NAMES else "-")
    return table

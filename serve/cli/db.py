"""`lorafleet db`: the catalog database itself (on this machine, from the settings): its schema
revision, upgrades, backups."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Optional

import typer
from sqlalchemy import Engine

from lorafleet.serve.cli.common import console, group

__all__ = ["db"]

db = group(
    "The catalog database: its schema revision, upgrades and backups (LORAFLEET_DATABASE_URL)."
)

Home = Annotated[
    Optional[Path],
    typer.Option(help="State folder (its catalog.db, unless LORAFLEET_DATABASE_URL)."),
]


@contextlib.contextmanager
def _catalog(home: Path | None) -> Iterator[Engine]:
    from lorafleet.adapters.catalog import connect_catalog
    from lorafleet.serve.settings import Settings

    engine = connect_catalog((Settings(home=home) if home else Settings()).database_url)
    try:
        yield engine
    finally:
        engine.dispose()


def _missing_file(engine: Engine) -> Path | None:
    """A SQLite catalog that does not exist yet (looking must not create it)."""
    from lorafleet.adapters.migrate import sqlite_path

    path = sqlite_path(engine)
    return path if path is not None and not path.exists() else None


@db.command("current")
def db_current(home: Home = None) -> None:
    """The catalog's revision, this release's (head), and whether it is behind."""
    from lorafleet.adapters.migrate import catalog_revision, head_revision

    with _catalog(home) as engine:
        if (missing := _missing_file(engine)) is not None:
            console.print(
                f"no catalog at {missing} yet (the first `lorafleet serve` creates it); "
                f"this release's revision: {head_revision()}",
                highlight=False,
                soft_wrap=True,
            )
            return
        state = catalog_revision(engine)
    console.print(
        f"catalog: {state.catalog}\nrevision: {state.label}\nthis release: {state.head}",
        highlight=False,
        soft_wrap=True,
    )
    if state.behind:
        console.print("behind: run `lorafleet db upgrade`", highlight=False)
    elif not state.known:
        console.print(
            "ahead: a newer lorafleet upgraded it; this release cannot serve it", highlight=False
        )
    else:
        console.print(
            "up to date" if state.at_head else "new: created at the first start", highlight=False
        )


@db.command("upgrade")
def db_upgrade(home: Home = None) -> None:
    """Bring the catalog to this release's revision (SQLite: after a backup copy next to it)."""
    from lorafleet.adapters.migrate import bring_to_head, head_revision

    with _catalog(home) as engine:
        done = bring_to_head(engine, upgrade=True)
    if done is None:
        console.print(f"the catalog is at {head_revision()} already", highlight=False)
        return
    what = "created at" if done.created else f"upgraded from {done.from_revision or 'none'} to"
    console.print(
        f"catalog {done.catalog} {what} {done.to_revision}", highlight=False, soft_wrap=True
    )
    if done.backup:
        console.print(f"its copy from before: {done.backup}", highlight=False, soft_wrap=True)


@db.command("backup")
def db_backup(
    out: Annotated[Path, typer.Option("--out", help="A new file for the copy.")], home: Home = None
) -> None:
    """Copy a SQLite catalog while gateways use it (online backup); PostgreSQL: pg_dump (docs:
    Upgrades and backups)."""
    from lorafleet.adapters.migrate import backup_sqlite

    with _catalog(home) as engine:
        copy = backup_sqlite(engine, out.expanduser().resolve())
    console.print(f"catalog copied to {copy}", highlight=False, soft_wrap=True)

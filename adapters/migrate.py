"""The catalog's schema revisions (Alembic scripts in `lorafleet.adapters.migrations`): where a
catalog stands, and bringing it to this release's head.

A new, empty catalog is created at head without asking. One that is behind, or was made before
revisions (by lorafleet 0.1.0 or earlier, adopted as it is), is upgraded only when asked (`lorafleet
db upgrade`, `lorafleet serve --upgrade`), a SQLite file after an online backup copy next to it.
Gateways starting together take turns: PostgreSQL under an advisory lock (its DDL is transactional:
all of an upgrade or none of it), SQLite under a lock file; whoever gets the turn looks again, and
finds the work done.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect, text

from lorafleet.errors import (
    CatalogBehind,
    CatalogUnknownRevision,
    Conflict,
    InvalidRequest,
    NotFound,
)

__all__ = [
    "CatalogRevision",
    "Upgrade",
    "alembic_config",
    "head_revision",
    "catalog_revision",
    "bring_to_head",
    "backup_sqlite",
    "sqlite_path",
]

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
# one PostgreSQL advisory lock id ("lfcatalg") for every catalog upgrade
UPGRADE_LOCK_ID = 0x6C66_6361_7461_6C67
# every catalog since the first release has it: without it and a revision, it is new
FIRST_TABLE = "tenants"


@dataclass(frozen=True)
class CatalogRevision:
    """Where one catalog stands: its revision (None: not stamped), this release's head, and
    whether it is new."""

    catalog: str  # its URL without the password
    current: str | None
    head: str
    known: bool  # `current` is one of this release's revisions (or None)
    new: bool  # no tables and no revision: created at head without asking

    @property
    def at_head(self) -> bool:
        return self.current == self.head

    @property
    def behind(self) -> bool:
        """An existing catalog that this release can upgrade, and must before serving it."""
        return self.known and not self.at_head and not self.new

    @property
    def label(self) -> str:
        """Its revision, said for people."""
        if self.current is not None:
            return self.current
        return "none (a new catalog)" if self.new else "none (made by lorafleet 0.1.0 or earlier)"


@dataclass(frozen=True)
class Upgrade:
    """One upgrade done: from which revision to head, and the copy of the SQLite file taken
    first."""

    catalog: str
    from_revision: str | None  # None: a new catalog, or one made before revisions
    to_revision: str
    created: bool  # it was new (empty): made at `to_revision`
    # None: nothing to copy (a new catalog) or not SQLite (PostgreSQL rolls a failure back)
    backup: Path | None


@cache
def _scripts() -> ScriptDirectory:
    return ScriptDirectory(str(MIGRATIONS))


def alembic_config(connection: Connection) -> Config:
    """Alembic's configuration for the catalog's migrations, run on `connection` (no
    alembic.ini)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection  # what env.py migrates
    return config


def head_revision() -> str:
    """The revision this release serves."""
    head = _scripts().get_current_head()
    assert head is not None, "the migrations have no revision"
    return head


def catalog_revision(engine: Engine) -> CatalogRevision:
    """Where the catalog behind `engine` stands (nothing is written)."""
    with engine.connect() as connection:
        return _revision(connection)


def _revision(connection: Connection) -> CatalogRevision:
    current = MigrationContext.configure(connection).get_current_revision()
    known = current is None or current in {
        script.revision for script in _scripts().walk_revisions()
    }
    new = current is None and not inspect(connection).has_table(FIRST_TABLE)
    return CatalogRevision(
        catalog=_shown(connection.engine),
        current=current,
        head=head_revision(),
        known=known,
        new=new,
    )


def bring_to_head(engine: Engine, upgrade: bool) -> Upgrade | None:
    """Create a new catalog, or upgrade one that is behind if `upgrade` (else `CatalogBehind`);
    None when it was at head already. A revision this release does not know is
    `CatalogUnknownRevision`."""
    state = catalog_revision(engine)
    if state.at_head:  # every start of a current catalog: no lock taken
        return None
    # refused without waiting for a turn; but tables without a revision may be a
    if state.current is not None:
        # new catalog that another gateway is creating (SQLite's DDL is not atomic here)
        _refuse(state, upgrade)
    with _upgrade_turn(engine) as connection:
        state = _revision(connection)  # another gateway may have done it while this one waited
        if state.at_head:
            return None
        _refuse(state, upgrade)
        backup = None if state.new else _backup_before(engine, state)
        command.upgrade(alembic_config(connection), "head")  # on this connection, inside this turn
    done = Upgrade(
        catalog=state.catalog,
        from_revision=state.current,
        to_revision=state.head,
        created=state.new,
        backup=backup,
    )
    if backup:
        log.info(
            "catalog %s upgraded from %s to %s; its copy from before: %s",
            done.catalog,
            state.label,
            done.to_revision,
            backup,
        )
    else:
        log.info("catalog %s brought from %s to %s", done.catalog, state.label, done.to_revision)
    return done


def _refuse(state: CatalogRevision, upgrade: bool) -> None:
    if not state.known:
        raise CatalogUnknownRevision(
            f"the catalog {state.catalog} is at revision {state.current}, which this release does "
            f"not know (its newest is {state.head}): a newer lorafleet upgraded it; run that "
            "release, or restore the copy made before that upgrade",
            catalog=state.catalog,
            revision=state.current,
            head=state.head,
        )
    if state.behind and not upgrade:
        raise CatalogBehind(
            f"the catalog {state.catalog} is at revision {state.label}, "
            f"this release needs {state.head}: "
            "run `lorafleet db upgrade` (or `lorafleet serve --upgrade`)",
            catalog=state.catalog,
            revision=state.current,
            head=state.head,
        )


@contextlib.contextmanager
def _upgrade_turn(engine: Engine) -> Iterator[Connection]:
    """A connection in a transaction that one process at a time holds for this catalog."""
    database = sqlite_path(engine)
    with (
        _file_lock(database) if database else contextlib.nullcontext(),
        engine.begin() as connection,
    ):
        if connection.dialect.name == "postgresql":  # released as the transaction ends
            connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": UPGRADE_LOCK_ID})
        yield connection


@contextlib.contextmanager
def _file_lock(database: Path) -> Iterator[None]:
    # SQLite's own locks do not wait for a schema change to finish (and this driver does not run DDL
    # in a transaction): a lock file next to the catalog gives processes and threads their turns
    with open(database.with_name(database.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield  # released as the file closes


def _backup_before(engine: Engine, state: CatalogRevision) -> Path | None:
    database = sqlite_path(engine)
    if database is None:
        return None
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return backup_sqlite(
        engine,
        database.with_name(f"{database.name}.before-{state.current or 'unversioned'}-{stamp}"),
    )


def backup_sqlite(engine: Engine, out: Path) -> Path:
    """A consistent copy of a SQLite catalog, taken while gateways use it (SQLite's online backup
    API)."""
    database = sqlite_path(engine)
    if database is None:
        url = engine.url  # as libpq takes it, without the driver name or the password
        where = (
            f"postgresql://{url.username or ''}@{url.host or ''}"
            f"{f':{url.port}' if url.port else ''}/{url.database}"
        )
        raise InvalidRequest(
            f"the catalog {_shown(engine)} is not a SQLite file: back a PostgreSQL catalog up with "
            f"pg_dump, e.g. `pg_dump --format=custom --file {out} {where}` "
            "(docs: Upgrades and backups)"
        )
    if not database.exists():
        raise NotFound(f"there is no catalog at {database}")
    if out.exists():
        raise Conflict(f"{out} exists: a backup goes to a new file")
    out.parent.mkdir(parents=True, exist_ok=True)
    with (
        contextlib.closing(sqlite3.connect(database)) as source,
        contextlib.closing(sqlite3.connect(out)) as copy,
    ):
        source.backup(copy)
    return out


def sqlite_path(engine: Engine) -> Path | None:
    """The catalog's file, if it is a SQLite one (None: PostgreSQL, or SQLite in memory)."""
    if engine.dialect.name != "sqlite" or engine.url.database in (None, "", ":memory:"):
        return None
    return Path(engine.url.database)


def _shown(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=True)

"""Catalog migrations on real SQLite files and PostgreSQL databases: the models and the revisions
agree, revision 0001 is 0.1.0's schema, a 0.1.0 catalog is refused until asked, then upgraded
with every row still served, and gateways starting together on one catalog all start."""

from __future__ import annotations

import contextlib
import functools
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, select, text

from lorafleet.adapters.catalog import Base, ValidationRun, open_catalog
from lorafleet.adapters.leases import take_lease
from lorafleet.adapters.migrate import alembic_config, catalog_revision, head_revision
from lorafleet.adapters.registry import get_deployment, register_version, resolve_version
from lorafleet.adapters.tenants import authenticate, list_keys
from lorafleet.adapters.validate import ValidatedAdapter
from lorafleet.errors import CatalogBehind, CatalogUnknownRevision
from lorafleet.serve.api.drift import drift_history
from lorafleet.serve.api.rollouts import latest_canary
from tests.conftest import ON_POSTGRESQL
from tests.old_catalog import create_schema, insert_rows
from tests.postgres import postgres_database


@pytest.fixture
def new_database(tmp_path: Path) -> Iterator[Callable[[str], str]]:
    """Factory: another new, empty database on "sqlite" or "postgresql" (dropped afterwards)."""
    made = iter(range(100))
    with contextlib.ExitStack() as stack:

        def make(dialect: str) -> str:
            if dialect == "sqlite":
                return f"sqlite:///{tmp_path / f'db-{next(made)}.db'}"
            return stack.enter_context(postgres_database())

        yield make


def _dialect(url: str) -> str:
    return "sqlite" if url.startswith("sqlite") else "postgresql"


def _upgrade_to(url: str, revision: str) -> None:
    engine = create_engine(url)
    with engine.begin() as connection:
        command.upgrade(alembic_config(connection), revision)
    engine.dispose()


def _schema(url: str) -> dict[str, dict]:
    """Every table as the database describes it (alembic_version aside)."""
    engine = create_engine(url)
    described = inspect(engine)
    tables = {}
    for name in sorted(set(described.get_table_names()) - {"alembic_version"}):
        tables[name] = {
            "columns": [
                (c["name"], str(c["type"]), c["nullable"], c.get("default"))
                for c in described.get_columns(name)
            ],
            "primary key": described.get_pk_constraint(name),
            "foreign keys": sorted(map(repr, described.get_foreign_keys(name))),
            "indexes": sorted(map(repr, described.get_indexes(name))),
            "unique": sorted(map(repr, described.get_unique_constraints(name))),
        }
    engine.dispose()
    return tables


def _sqlite_ddl(url: str) -> set[tuple]:
    with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as connection:
        return set(
            connection.execute(
                "SELECT type, name, tbl_name, sql FROM sqlite_master "
                "WHERE tbl_name != 'alembic_version'"
            )
        )


def _versions(url: str) -> list[str]:
    engine = create_engine(url)
    with engine.connect() as connection:
        found = list(connection.scalars(text("SELECT version_num FROM alembic_version")))
    engine.dispose()
    return found


def test_the_models_and_the_migrations_agree(empty_catalog_url):
    db, _ = open_catalog(empty_catalog_url)
    with db.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    assert catalog_revision(db).at_head
    db.dispose()


@pytest.mark.parametrize("dialect", ["sqlite", ON_POSTGRESQL])
def test_revision_0001_makes_the_catalog_0_1_0_made(dialect, new_database):
    made_by_010, made_by_0001 = new_database(dialect), new_database(dialect)
    create_schema(made_by_010)
    _upgrade_to(made_by_0001, "0001")
    assert _schema(made_by_0001) == _schema(made_by_010)
    assert len(_schema(made_by_0001)) == 14
    if dialect == "sqlite":  # the very same statements
        assert _sqlite_ddl(made_by_0001) == _sqlite_ddl(made_by_010)


def test_a_0_1_0_catalog_is_refused_then_upgraded_and_every_row_still_serves(
    empty_catalog_url, tmp_path
):
    create_schema(empty_catalog_url)
    rows = insert_rows(empty_catalog_url)
    with pytest.raises(CatalogBehind) as refused:
        open_catalog(empty_catalog_url)
    message = refused.value.message
    assert (
        "lorafleet db upgrade" in message
        and f"needs {head_revision()}" in message
        and "\n" not in message
    )
    assert ":lorafleet@" not in message  # the URL is named without its password
    # by revisions 0002, 0003, 0007 and 0008
    added_since = {"leases", "requests", "feedback", "captures", "files", "batches", "batch_lines"}
    added_since |= {"usage_days", "budgets"}
    # refused: untouched
    assert _schema(empty_catalog_url).keys() == {t for t in Base.metadata.tables} - added_since

    db, sessions = open_catalog(empty_catalog_url, upgrade=True)
    assert catalog_revision(db).at_head and _versions(empty_catalog_url) == [head_revision()]
    with sessions() as session:
        tenant = authenticate(session, rows.key)
        assert tenant.name == rows.tenant and len(list_keys(session, tenant)) == 1
        deployment = get_deployment(session, tenant, rows.deployment)
        assert (deployment.stable.digest, deployment.previous_stable.digest) == (
            rows.digests[1],
            rows.digests[0],
        )
        assert deployment.validation_set.items == 40
        assert resolve_version(session, tenant, f"{rows.adapter}@1").digest == rows.digests[0]
        history = latest_canary(session, tenant, rows.deployment)
        assert (
            history.phase == "Promoted"
            and tuple(d.action for d in history.decisions) == rows.decisions
        )
        drift = drift_history(rows.deployment, session, tenant)
        assert (len(drift.checks), len(drift.runs)) == (rows.drift_checks, rows.validation_runs)
        new, _ = register_version(
            session,
            tenant,
            rows.adapter,
            ValidatedAdapter(
                path=Path("."),
                digest="d" * 64,
                rank=8,
                alpha=16.0,
                target_modules=("q_proj",),
                size_bytes=10,
            ),
        )
        assert new.version == 3  # numbering goes on where 0.1.0 left it
        assert deployment.capture is None  # 0003: nothing is captured until the tenant opts in
        runs = session.scalars(select(ValidationRun)).all()
        # replays from before recorded none
        assert runs and all(run.confidences is None for run in runs)
    assert take_lease(sessions, "gc", "gw-1", ttl_s=60)  # the table this release added
    db.dispose()


def test_a_catalog_at_0003_is_upgraded_to_0004_and_its_rows_have_no_manifest_and_no_replay_start(
    empty_catalog_url,
):
    _upgrade_to(empty_catalog_url, "0003")
    rows = insert_rows(empty_catalog_url)  # every column 0.1.0 wrote is still there at 0003
    before = _schema(empty_catalog_url)
    _upgrade_to(empty_catalog_url, "0004")
    after = _schema(empty_catalog_url)
    added = _added_columns(before, after)
    assert added == {("adapter_versions", "manifest"), ("validation_runs", "started_at")}
    assert all(
        column[2]
        for table, name in added
        for column in after[table]["columns"]
        if column[0] == name
    )
    engine = create_engine(empty_catalog_url)
    with engine.connect() as connection:  # SQL NULL, as the rows were written: not JSON's null
        versions = (
            connection.execute(
                text("SELECT digest FROM adapter_versions WHERE manifest IS NULL ORDER BY version")
            )
            .scalars()
            .all()
        )
        runs = (
            connection.execute(text("SELECT kind FROM validation_runs WHERE started_at IS NULL"))
            .scalars()
            .all()
        )
    engine.dispose()
    assert (tuple(versions), len(runs)) == (rows.digests, rows.validation_runs)

    db, sessions = open_catalog(empty_catalog_url, upgrade=True)  # on to head, through the models
    manifest = {"adapter_digest": "d" * 64, "training": {"steps": 3, "val_losses": [0.9, 0.5]}}
    with sessions() as session:
        tenant = authenticate(session, rows.key)
        assert [
            resolve_version(session, tenant, f"{rows.adapter}@{n}").manifest for n in (1, 2)
        ] == [None, None]
        assert [run.started_at for run in session.scalars(select(ValidationRun))] == [None]
        register_version(
            session,
            tenant,
            rows.adapter,
            ValidatedAdapter(
                path=Path("."),
                digest="d" * 64,
                rank=8,
                alpha=16.0,
                target_modules=("q_proj",),
                size_bytes=10,
                manifest=manifest,
            ),
        )
    with sessions() as session:
        assert (
            resolve_version(session, authenticate(session, rows.key), f"{rows.adapter}@3").manifest
            == manifest
        )
    db.dispose()


@pytest.mark.parametrize("dialect", ["sqlite", ON_POSTGRESQL])
def test_revision_0004_downgrades_to_the_schema_of_0003(dialect, new_database):
    at_0003, down_from_0004 = new_database(dialect), new_database(dialect)
    _upgrade_to(at_0003, "0003")
    _upgrade_to(down_from_0004, "0004")
    engine = create_engine(down_from_0004)
    with engine.begin() as connection:
        command.downgrade(alembic_config(connection), "0003")
    engine.dispose()
    assert _schema(down_from_0004) == _schema(at_0003)


def test_a_sqlite_catalog_is_copied_before_its_upgrade(tmp_path):
    database = tmp_path / "catalog.db"
    create_schema(f"sqlite:///{database}")
    rows = insert_rows(f"sqlite:///{database}")
    db, _ = open_catalog(f"sqlite:///{database}", upgrade=True)
    db.dispose()
    [copy] = tmp_path.glob("catalog.db.before-unversioned-*")
    with contextlib.closing(sqlite3.connect(copy)) as old:
        assert old.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert old.execute("SELECT name, key_hash FROM tenants").fetchall() == [
            (rows.tenant, old.execute("SELECT key_hash FROM api_keys").fetchone()[0])
        ]
        assert old.execute("SELECT count(*) FROM decisions").fetchone() == (len(rows.decisions),)
        assert not old.execute(
            "SELECT name FROM sqlite_master WHERE name = 'alembic_version'"
        ).fetchall()


def test_a_catalog_at_an_older_revision_is_upgraded_when_asked(empty_catalog_url):
    _upgrade_to(empty_catalog_url, "0001")
    with pytest.raises(CatalogBehind, match="is at revision 0001, this release needs"):
        open_catalog(empty_catalog_url)
    db, sessions = open_catalog(empty_catalog_url, upgrade=True)
    assert take_lease(sessions, "gc", "gw-1", ttl_s=60)
    db.dispose()


def test_a_catalog_made_after_0_1_0_by_create_all_is_adopted(empty_catalog_url):
    """Unreleased main between 0.1.0 and revisions created today's tables at start, with no
    revision."""
    engine = create_engine(empty_catalog_url)
    Base.metadata.create_all(engine)
    engine.dispose()
    db, _ = open_catalog(empty_catalog_url, upgrade=True)
    with db.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    db.dispose()


def test_a_revision_from_a_newer_release_is_refused_even_with_upgrade(empty_catalog_url):
    db, _ = open_catalog(empty_catalog_url)
    with db.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    db.dispose()
    with pytest.raises(
        CatalogUnknownRevision, match="revision 9999, which this release does not know"
    ):
        open_catalog(empty_catalog_url, upgrade=True)


def _all_at_once(
    count: int, start: Callable[[], None], stagger_s: float = 0.01
) -> list[BaseException]:
    """Run `start` in `count` threads, begun a few milliseconds apart: the later ones look at the
    catalog while the first is making or upgrading it (the window where a half-made catalog
    looked like an old one)."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(count)

    def run(index: int) -> None:
        barrier.wait()
        time.sleep(index * stagger_s)
        try:
            start()
        except BaseException as exc:  # the failure under test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def _open_and_close(url: str, upgrade: bool = False) -> None:
    db, _ = open_catalog(url, upgrade=upgrade)
    db.dispose()


@pytest.mark.parametrize("dialect", ["sqlite", ON_POSTGRESQL])
def test_gateways_opening_one_new_catalog_at_once_all_start_at_head(dialect, new_database):
    for _ in range(3):  # the race is timing-dependent: a few tries, each on a new database
        url = new_database(dialect)
        assert _all_at_once(6, functools.partial(_open_and_close, url)) == []
        assert _versions(url) == [head_revision()]


def test_gateways_upgrading_one_old_catalog_at_once_all_start_and_one_upgrades(
    empty_catalog_url, tmp_path
):
    create_schema(empty_catalog_url)
    rows = insert_rows(empty_catalog_url)
    assert _all_at_once(4, lambda: _open_and_close(empty_catalog_url, upgrade=True)) == []
    assert _versions(empty_catalog_url) == [head_revision()]
    if _dialect(empty_catalog_url) == "sqlite":
        assert len(list(tmp_path.glob("catalog.db.before-*"))) == 1
    _, sessions = open_catalog(empty_catalog_url)
    with sessions() as session:
        assert len(list_keys(session, authenticate(session, rows.key))) == 1


def test_a_catalog_at_0004_is_upgraded_to_0005_and_its_versions_change_the_language_model(
    empty_catalog_url,
):
    _upgrade_to(empty_catalog_url, "0004")
    rows = insert_rows(empty_catalog_url)
    before = _schema(empty_catalog_url)
    _upgrade_to(empty_catalog_url, "0005")
    added = _added_columns(before, _schema(empty_catalog_url))
    assert added == {("adapter_versions", "parts")}
    db, sessions = open_catalog(empty_catalog_url, upgrade=True)
    with sessions() as session:
        tenant = authenticate(session, rows.key)
        old = [resolve_version(session, tenant, f"{rows.adapter}@{n}") for n in (1, 2)]
        assert [(v.parts, v.touches) for v in old] == [(None, ["language"])] * 2
        register_version(
            session,
            tenant,
            rows.adapter,
            ValidatedAdapter(
                path=Path("."),
                digest="e" * 64,
                rank=8,
                alpha=16.0,
                target_modules=("qkv",),
                size_bytes=10,
                parts=("connector", "vision"),
            ),
        )
    with sessions() as session:
        new = resolve_version(session, authenticate(session, rows.key), f"{rows.adapter}@3")
        assert new.touches == ["connector", "vision"]
    db.dispose()


@pytest.mark.parametrize("dialect", ["sqlite", ON_POSTGRESQL])
def test_revision_0005_downgrades_to_the_schema_of_0004(dialect, new_database):
    at_0004, down_from_0005 = new_database(dialect), new_database(dialect)
    _upgrade_to(at_0004, "0004")
    _upgrade_to(down_from_0005, "0005")
    engine = create_engine(down_from_0005)
    with engine.begin() as connection:
        command.downgrade(alembic_config(connection), "0004")
    engine.dispose()
    assert _schema(down_from_0005) == _schema(at_0004)


def test_a_catalog_at_0005_is_upgraded_to_0006_and_its_deployments_take_the_default_objective(
    empty_catalog_url,
):
    _upgrade_to(empty_catalog_url, "0005")
    rows = insert_rows(empty_catalog_url)
    before = _schema(empty_catalog_url)
    _upgrade_to(empty_catalog_url, "0006")
    added = _added_columns(before, _schema(empty_catalog_url))
    assert added == {("deployments", "objective")}
    db, sessions = open_catalog(empty_catalog_url, upgrade=True)
    with sessions() as session:
        tenant = authenticate(session, rows.key)
        deployment = get_deployment(session, tenant, rows.deployment)
        assert deployment.objective is None  # the gateway's default
        deployment.objective = "lorafleet-critical"
        session.commit()
    with sessions() as session:
        tenant = authenticate(session, rows.key)
        assert get_deployment(session, tenant, rows.deployment).objective == "lorafleet-critical"
    db.dispose()


@pytest.mark.parametrize("dialect", ["sqlite", ON_POSTGRESQL])
def test_revision_0006_downgrades_to_the_schema_of_0005(dialect, new_database):
    at_0005, down_from_0006 = new_database(dialect), new_database(dialect)
    _upgrade_to(at_0005, "0005")
    _upgrade_to(down_from_0006, "0006")
    engine = create_engine(down_from_0006)
    with engine.begin() as connection:
        command.downgrade(alembic_config(connection), "0005")
    engine.dispose()
    assert _schema(down_from_0006) == _schema(at_0005)


def _added_columns(before: dict, after: dict) -> set[tuple[str, str]]:
    """(table, column) of every column in the schema `after` that `before` lacks."""
    return {
        (table, column[0])
        for table in after
        for column in after[table]["columns"]
        if column not in before[table]["columns"]
    }


@pytest.mark.parametrize("dialect", ["sqlite", ON_POSTGRESQL])
def test_revision_0007_adds_the_batch_tables_and_downgrades_to_the_schema_of_0006(
    dialect, new_database
):
    at_0006, down_from_0007 = new_database(dialect), new_database(dialect)
    _upgrade_to(at_0006, "0006")
    _upgrade_to(down_from_0007, "0007")
    assert {"files", "batches", "batch_lines"} <= set(_schema(down_from_0007))
    engine = create_engine(down_from_0007)
    with engine.begin() as connection:
        command.downgrade(alembic_config(connection), "0006")
    engine.dispose()
    assert _schema(down_from_0007) == _schema(at_0006)


@pytest.mark.parametrize("dialect", ["sqlite", ON_POSTGRESQL])
def test_revision_0008_adds_usage_and_budgets_and_downgrades_to_the_schema_of_0007(
    dialect, new_database
):
    at_0007, down_from_0008 = new_database(dialect), new_database(dialect)
    _upgrade_to(at_0007, "0007")
    _upgrade_to(down_from_0008, "0008")
    schema = _schema(down_from_0008)
    assert {"usage_days", "budgets"} <= set(schema)
    columns = {table: {c[0] for c in schema[table]["columns"]} for table in schema}
    assert {"images", "prefill_s", "decode_s"} <= columns["requests"]
    assert "prices" in columns["tenant_policies"]
    engine = create_engine(down_from_0008)
    with engine.begin() as connection:
        command.downgrade(alembic_config(connection), "0007")
    engine.dispose()
    assert _schema(down_from_0008) == _schema(at_0007)

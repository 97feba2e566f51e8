"""`lorafleet db current | upgrade | backup`, and `lorafleet serve` on a catalog that is behind:
exit codes and printed lines, on a real 0.1.0 SQLite catalog (and a PostgreSQL one for `backup`'s
refusal)."""

from __future__ import annotations

import contextlib
import json
import sqlite3

import pytest
from typer.testing import CliRunner

from lorafleet.adapters.migrate import head_revision
from lorafleet.serve.cli import app
from tests.factories import TINY_BASE_CONFIG
from tests.old_catalog import create_schema, insert_rows
from tests.postgres import postgres_database

runner = CliRunner()


def test_db_current_upgrade_and_backup_of_a_0_1_0_catalog(tmp_path):
    env = {"LORAFLEET_HOME": str(tmp_path)}
    missing = runner.invoke(app, ["db", "current"], env=env)
    assert missing.exit_code == 0 and "no catalog at" in missing.output
    assert not (tmp_path / "catalog.db").exists()  # looking created nothing
    create_schema(f"sqlite:///{tmp_path / 'catalog.db'}")
    rows = insert_rows(f"sqlite:///{tmp_path / 'catalog.db'}")

    behind = runner.invoke(app, ["db", "current"], env=env)
    assert behind.exit_code == 0, behind.output
    assert (
        "made by lorafleet 0.1.0 or earlier" in behind.output
        and f"this release: {head_revision()}" in behind.output
    )
    assert "run `lorafleet db upgrade`" in behind.output

    copied = runner.invoke(app, ["db", "backup", "--out", str(tmp_path / "copy.db")], env=env)
    assert copied.exit_code == 0 and "catalog copied to" in copied.output
    with contextlib.closing(sqlite3.connect(tmp_path / "copy.db")) as copy:
        assert copy.execute("SELECT name FROM tenants").fetchall() == [(rows.tenant,)]
    again = runner.invoke(app, ["db", "backup", "--out", str(tmp_path / "copy.db")], env=env)
    assert again.exit_code == 1 and "exists" in again.output

    upgraded = runner.invoke(app, ["db", "upgrade"], env=env)
    assert upgraded.exit_code == 0, upgraded.output
    assert (
        f"upgraded from none to {head_revision()}" in upgraded.output
        and "its copy from before:" in upgraded.output
    )
    assert len(list(tmp_path.glob("catalog.db.before-unversioned-*"))) == 1
    current = runner.invoke(app, ["db", "current"], env=env)
    assert f"revision: {head_revision()}" in current.output and "up to date" in current.output
    done = runner.invoke(app, ["db", "upgrade"], env=env)
    assert done.exit_code == 0 and "already" in done.output


def test_serve_on_a_catalog_behind_exits_with_one_line_naming_the_command(tmp_path):
    create_schema(f"sqlite:///{tmp_path / 'catalog.db'}")
    base = tmp_path / "base"  # what the gateway reads of a base (it is read first)
    base.mkdir()
    (base / "config.json").write_text(json.dumps(TINY_BASE_CONFIG))
    result = runner.invoke(
        app,
        ["serve", "--base", str(base), "--home", str(tmp_path)],
        env={"LORAFLEET_ADMIN_KEY": "k", "COLUMNS": "80"},
    )
    assert result.exit_code == 1
    [line] = result.output.strip().splitlines()
    assert (
        line.startswith("CatalogBehind: the catalog sqlite:///")
        and "run `lorafleet db upgrade`" in line
    )
    assert "Traceback" not in result.output


@pytest.mark.postgres
def test_backup_of_a_postgresql_catalog_points_to_pg_dump(tmp_path):
    with postgres_database() as url:
        result = runner.invoke(
            app,
            ["db", "backup", "--out", str(tmp_path / "copy.dump")],
            env={"LORAFLEET_DATABASE_URL": url},
        )
    assert result.exit_code == 1 and "pg_dump --format=custom" in result.output
    assert ":lorafleet@" not in result.output  # no password printed

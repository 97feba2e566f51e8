"""Alembic's entry point: migrate the connection lorafleet hands over (or, for `alembic` run by a
developer, the `sqlalchemy.url` of its ini), comparing against the catalog's models."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine

from lorafleet.adapters.catalog import Base


def _migrate(connection: Connection) -> None:
    # SQLite alters a table by copying it (batch mode): a future revision's ALTER needs it there
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def _run() -> None:
    config = context.config
    if context.is_offline_mode():
        raise SystemExit("lorafleet's migrations run online only (`lorafleet db upgrade`)")
    if (given := config.attributes.get("connection")) is not None:
        _migrate(given)
        return
    engine = create_engine(config.get_main_option("sqlalchemy.url") or "")
    with engine.connect() as own:
        _migrate(own)
    engine.dispose()


# run by Alembic; merely imported (e.g. by the tests' module walk), it does nothing
if hasattr(context, "config"):
    _run()

"""Throwaway PostgreSQL databases for the tests, on the server `make services` starts (or
LORAFLEET_TEST_POSTGRES_URL: a role that may create databases, on any server)."""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Iterator

import pytest
from psycopg.errors import InsufficientPrivilege
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError, ProgrammingError

# Read at import: the autouse fixture `clean_environ` hides LORAFLEET_* settings from the tests
# themselves.
ADMIN_URL = os.environ.get(
    "LORAFLEET_TEST_POSTGRES_URL",
    "postgresql+psycopg://lorafleet:lorafleet@127.0.0.1:5432/postgres",
)


@contextlib.contextmanager
def postgres_database(template: str = "") -> Iterator[str]:
    """A new database, empty or a copy of `template` (a database nobody is connected to); dropped
    afterwards (with any connection a test left open)."""
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT", pool_size=1)
    name = f"lf_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as connection:
            connection.execute(
                text(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
            )
    except OperationalError as exc:
        admin.dispose()
        pytest.fail(
            f"PostgreSQL is not reachable at {make_url(ADMIN_URL).render_as_string()}: "
            f"`make services` starts it ({exc.orig})"
        )
    try:
        yield make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        _drop(admin, name)
        admin.dispose()


def _drop(admin: Engine, name: str, timeout_s: float = 30.0) -> None:
    """Drop a database and the connections on it. FORCE may not end a connection of another role:
    an autovacuum worker (the server's own) on the new database makes the drop fail until it has
    finished, in moments, so the drop is tried again until then."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with admin.connect() as connection:
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            return
        except ProgrammingError as exc:
            if not isinstance(exc.orig, InsufficientPrivilege) or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def database_name(url: str) -> str:
    return make_url(url).database or ""

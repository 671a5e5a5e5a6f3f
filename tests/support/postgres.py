"""Fixtures of the PostgreSQL subsystem (see tests/conftest.py).

Each test gets its own schema ``imt_<run>x<n>`` in the test database (every
connection's ``search_path``), dropped with CASCADE afterwards, so tests never
see each other's rows and the suite can run beside a live cluster.

``pg_schema``   a schema with every migration applied (its name)
``pg_fresh_schema``   a unique schema name, not created (migration tests)
``pg``          a started :class:`~imcluster.db.PostgresService` on ``pg_schema``
``pg_factory``  ``await make(schema, **kw)``: more services, all stopped afterwards
``pg_admin``    a blocking psycopg2 cursor (autocommit) outside any pool, e.g.
                to ``pg_terminate_backend`` a pool's connections
"""

from __future__ import annotations

import psycopg2
import pytest
import pytest_twisted

from imcluster.db import PostgresService, apply_migrations_sync
from tests.support.ids import POSTGRES_DSN, unique
from tests.support.services import Made

#: everything here is local: fail fast
TEST_TIMEOUT = 5.0


def admin_connection():
    """A blocking autocommit psycopg2 connection to the test database."""
    conn = psycopg2.connect(POSTGRES_DSN, connect_timeout=5, application_name="imcluster-tests")
    conn.autocommit = True
    return conn


def drop_schema(name: str) -> None:
    """DROP SCHEMA ``name`` CASCADE (if it exists)."""
    if not name.startswith("imt_"):
        raise ValueError(f"refusing to drop a schema the tests did not create: {name!r}")
    conn = admin_connection()
    try:
        conn.cursor().execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
    finally:
        conn.close()


def terminate_backends(cursor, application_name: str) -> int:
    """``pg_terminate_backend`` every connection with ``application_name``; returns how many."""
    cursor.execute(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE application_name = %s AND pid <> pg_backend_pid()", (application_name,))
    return cursor.fetchone()[0]


@pytest.fixture
def pg_admin():
    """A blocking psycopg2 cursor (autocommit) on the test database, outside every pool."""
    conn = admin_connection()
    try:
        yield conn.cursor()
    finally:
        conn.close()


@pytest.fixture
def pg_fresh_schema():
    """A unique schema name that does not exist yet; dropped (if created) afterwards."""
    name = unique("imt_")
    yield name
    drop_schema(name)


@pytest.fixture
def pg_schema(pg_fresh_schema):
    """A private schema with every migration applied; dropped afterwards."""
    apply_migrations_sync(POSTGRES_DSN, pg_fresh_schema, TEST_TIMEOUT)
    return pg_fresh_schema


@pytest_twisted.async_yield_fixture
async def pg_factory():
    """``await make(schema, dsn=..., start=True, **kw)``: started PostgresServices, stopped afterwards.

    Each gets a unique ``application_name`` (``svc.application_name``), so a
    test can find and terminate exactly its own backends.
    """
    made = Made()

    async def make(schema: str, dsn: str = POSTGRES_DSN, start: bool = True, **kw) -> PostgresService:
        kw.setdefault("pool_size", 2)
        kw.setdefault("connect_timeout", TEST_TIMEOUT)
        kw.setdefault("application_name", unique("imt-"))
        return await made.add(PostgresService(dsn, schema=schema, **kw), start)

    yield make
    await made.stop_all()


@pytest_twisted.async_fixture
async def pg(pg_schema, pg_factory):
    """A started PostgresService (2 connections) on this test's migrated schema."""
    return await pg_factory(pg_schema)


async def undelivered_keys(store, user_id: str, page: int) -> list[tuple[str, int]]:
    """Every ``(sessionId, seq)`` of ``user_id``'s undelivered messages, paging as sync does."""
    seen, after = [], None
    while True:
        chunk = await store.undelivered_page(user_id, after, page)
        if not chunk:
            return seen
        seen += [(m["sessionId"], m["seq"]) for m in chunk]
        after = seen[-1]

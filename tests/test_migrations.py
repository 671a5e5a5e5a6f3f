"""Schema migrations: ordered, recorded, idempotent, safe to race, and the schema they build."""

from __future__ import annotations

import threading

import pytest
import pytest_twisted
from twisted.internet import defer

from imcluster.db import (
    Migration,
    MigrationError,
    apply_migrations,
    apply_migrations_sync,
    load_migrations,
)
from tests.support.ids import POSTGRES_DSN


def test_shipped_migrations_are_ordered_and_named():
    """Migration files are found in the installed package, in version order, with their names."""
    migrations = load_migrations()
    assert [m.version for m in migrations] == sorted({m.version for m in migrations})
    assert migrations[0].version == "0001" and migrations[0].name == "initial"
    assert "CREATE TABLE messagerecv" in migrations[0].sql


def test_apply_twice_is_a_no_op_and_recorded(pg_fresh_schema, pg_admin):
    """`imcluster migrate` run twice applies nothing the second time and records each file once."""
    names = [str(m) for m in load_migrations()]
    seen = []
    applied = apply_migrations_sync(POSTGRES_DSN, pg_fresh_schema, on_applied=lambda m: seen.append(str(m)))
    assert [str(m) for m in applied] == names == seen
    assert apply_migrations_sync(POSTGRES_DSN, pg_fresh_schema) == []
    pg_admin.execute(f'SELECT version, name, applied_at IS NOT NULL FROM "{pg_fresh_schema}".schema_migrations '
                     'ORDER BY version')
    assert [f"{v}_{n}" for v, n, _ in pg_admin.fetchall()] == names


def _constraints(cursor, schema, table):
    cursor.execute(
        "SELECT c.contype, array_agg(a.attname ORDER BY k.ord) "
        "FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid "
        "JOIN pg_namespace n ON n.oid = t.relnamespace "
        "CROSS JOIN LATERAL unnest(c.conkey) WITH ORDINALITY AS k(attnum, ord) "
        "JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = k.attnum "
        "WHERE n.nspname = %s AND t.relname = %s AND c.contype IN ('p', 'u') "
        "GROUP BY c.oid, c.contype", (schema, table))
    return {(kind, tuple(cols)) for kind, cols in cursor.fetchall()}


def test_schema_has_the_keys_the_flows_rely_on(pg_schema, pg_admin):
    """De-duplication, gap-free order and per-recipient delivery rest on these keys existing."""
    recv = _constraints(pg_admin, pg_schema, "messagerecv")
    assert ("u", ("sender_id", "client_msg_id")) in recv
    assert ("u", ("session_id", "seq")) in recv
    assert ("p", ("id",)) in recv
    assert ("p", ("user_id", "msg_id")) in _constraints(pg_admin, pg_schema, "messagesend")
    assert ("p", ("session_id", "user_id")) in _constraints(pg_admin, pg_schema, "session_member")
    assert ("p", ("id",)) in _constraints(pg_admin, pg_schema, "session")
    pg_admin.execute("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = %s", (pg_schema,))
    indexes = dict(pg_admin.fetchall())
    assert "WHERE (status <> 'delivered'::text)" in indexes["messagesend_undelivered"]
    assert "messagesend_msg" in indexes and "session_member_user" in indexes
    pg_admin.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = %s", (pg_schema,))
    assert {r[0] for r in pg_admin.fetchall()} >= {
        "schema_migrations", "session", "session_member", "messagerecv", "messagesend", "device"}
    # push targets (0005): one per (user, device), looked up by user
    assert ("p", ("user_id", "device_id")) in _constraints(pg_admin, pg_schema, "device")


def test_concurrent_migrators_apply_each_file_once(pg_fresh_schema, pg_admin):
    """Two `imcluster migrate` racing on one schema neither fail nor apply a file twice."""
    results, errors = [], []

    def run():
        try:
            results.append(apply_migrations_sync(POSTGRES_DSN, pg_fresh_schema))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    applied = sorted(str(m) for r in results for m in r)
    assert applied == [str(m) for m in load_migrations()]
    pg_admin.execute(f'SELECT count(*) FROM "{pg_fresh_schema}".schema_migrations')
    assert pg_admin.fetchone()[0] == len(load_migrations())


def test_failing_migration_rolls_back_and_names_itself(pg_fresh_schema, pg_admin):
    """A broken migration file is reported by name and leaves nothing half-applied behind it."""
    good = Migration("0001", "good", "CREATE TABLE a (x int);")
    bad = Migration("0002", "bad", "CREATE TABLE b (x int); CREATE TABLE c (;")
    with pytest.raises(MigrationError, match="0002_bad"):
        apply_migrations_sync(POSTGRES_DSN, pg_fresh_schema, migrations=[good, bad])
    pg_admin.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
                     (pg_fresh_schema,))
    assert {r[0] for r in pg_admin.fetchall()} == {"schema_migrations", "a"}
    fixed = Migration("0002", "bad", "CREATE TABLE b (x int);")
    assert [str(m) for m in apply_migrations_sync(POSTGRES_DSN, pg_fresh_schema, migrations=[good, fixed])] == [
        "0002_bad"]


@pytest_twisted.ensureDeferred
async def test_processor_path_migrates_through_the_pool(pg_factory, pg_fresh_schema):
    """`improcessor --migrate` creates the schema and applies everything through its own pool, racing safely."""
    a = await pg_factory(pg_fresh_schema)
    b = await pg_factory(pg_fresh_schema)
    first, second = await defer.gatherResults([apply_migrations(a), b.apply_migrations()])
    assert sorted(str(m) for m in first + second) == [str(m) for m in load_migrations()]
    assert await a.apply_migrations() == []
    assert await a.run_query("SELECT count(*) FROM messagesend") == [(0,)]

"""PostgresService against the real PostgreSQL: queries, transactions, and surviving lost connections.

Every test runs in its own schema (``pg_schema``); connections are killed
with ``pg_terminate_backend`` on the pool's own backends only (found by the
service's unique ``application_name``).
"""

from __future__ import annotations

import psycopg2
import psycopg2.errors
import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

from imcluster.config import PROCESSOR, load_config
from imcluster.db import DatabaseUnavailable, PostgresService, mogrify_rows
from tests.support.postgres import terminate_backends


def sleep(seconds: float) -> defer.Deferred:
    return task.deferLater(reactor, seconds, lambda: None)


async def eventually(check, timeout: float = 5.0, step: float = 0.02):
    """Wait until ``check()`` is truthy (fails the test after ``timeout``)."""
    waited = 0.0
    while not check():
        if waited >= timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        await sleep(step)
        waited += step


def running(cursor, application_name: str, statement: str) -> int:
    """How many backends of ``application_name`` are running ``statement`` now (pg_stat_activity)."""
    cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s AND state = 'active' "
                   "AND strpos(query, %s) > 0", (application_name, statement))
    return cursor.fetchone()[0]


@pytest_twisted.ensureDeferred
async def test_query_runs_in_the_private_schema(pg, pg_schema):
    """SQL lands in the configured schema, or tests and tenants would share tables."""
    rows = await pg.run_query("SELECT current_schema(), %s::int + 1", (41,))
    assert rows == [(pg_schema, 42)]
    assert pg.connected
    await eventually(lambda: pg.live_connections() == 2)


@pytest_twisted.ensureDeferred
async def test_operation_returns_the_row_count(pg):
    """A bulk update must report how many rows it touched (acks count what they marked)."""
    assert await pg.run_operation("INSERT INTO session (id) VALUES ('a'), ('b'), ('c')") == 3
    assert await pg.run_operation("UPDATE session SET last_seq = 5 WHERE id <> %s", ("a",)) == 2
    assert await pg.run_query("SELECT id, last_seq FROM session ORDER BY id") == [
        ("a", 0), ("b", 5), ("c", 5)]


@pytest_twisted.ensureDeferred
async def test_interaction_commits_and_returns_its_result(pg):
    """An interaction's writes are committed together and its return value comes back."""
    async def create(cursor, sid, members):
        await cursor.execute("INSERT INTO session (id) VALUES (%s)", (sid,))
        values = mogrify_rows(cursor, "(%s, %s)", [(sid, m) for m in members])
        await cursor.execute("INSERT INTO session_member (session_id, user_id) VALUES " + values)
        await cursor.execute("SELECT count(*) FROM session_member WHERE session_id = %s", (sid,))
        return cursor.fetchone()[0]

    assert await pg.run_interaction(create, "s-1", ["alice", "bob", "o'brien", "zoë"]) == 4
    rows = await pg.run_query("SELECT user_id FROM session_member ORDER BY user_id")
    assert [r[0] for r in rows] == ["alice", "bob", "o'brien", "zoë"]


@pytest_twisted.ensureDeferred
async def test_failed_interaction_rolls_back_everything(pg):
    """A transaction that fails halfway must leave no partial rows (no half-stored message)."""
    class Boom(Exception):
        pass

    def half(cursor):
        d = cursor.execute("INSERT INTO session (id) VALUES ('half')")

        def fail(_):
            raise Boom("after the first insert")

        return d.addCallback(fail)

    with pytest.raises(Boom):
        await pg.run_interaction(half)
    assert await pg.run_query("SELECT count(*) FROM session") == [(0,)]


@pytest_twisted.ensureDeferred
async def test_connections_never_jit_compile(pg):
    """A store statement whose estimate looks costly would spend 100+ ms being JIT-compiled."""
    assert [await pg.run_query("SHOW jit") for _ in range(pg.pool_size + 1)] == [[("off",)]] * (pg.pool_size + 1)


@pytest_twisted.ensureDeferred
async def test_commit_sent_with_the_last_statement(pg):
    """An interaction that commits with its last statement must keep its writes, or lose them all on error."""
    async def both(cursor, sid):
        await cursor.execute("INSERT INTO session (id) VALUES (%s)", (sid,))
        await cursor.execute("INSERT INTO session_member (session_id, user_id) VALUES (%s, 'a') -- no rows",
                             (sid,), commit=True)
        return "done"

    assert await pg.run_interaction(both, "c-1") == "done"
    assert await pg.run_query("SELECT count(*) FROM session_member WHERE session_id = 'c-1'") == [(1,)]
    # the statement sent with COMMIT fails: nothing of the interaction stays
    with pytest.raises(psycopg2.errors.ForeignKeyViolation):
        await pg.run_interaction(lambda c: c.execute(
            "INSERT INTO session (id) VALUES ('c-2'); "
            "INSERT INTO session_member (session_id, user_id) VALUES ('nope', 'a')", commit=True))
    assert await pg.run_query("SELECT id FROM session ORDER BY id") == [("c-1",)]

    async def after_commit(cursor):
        await cursor.execute("SELECT 1", commit=True)
        await cursor.execute("SELECT 2")

    with pytest.raises(RuntimeError, match="after COMMIT"):
        await pg.run_interaction(after_commit)
    # every connection is still usable, none was lost
    assert [await pg.run_query("SELECT 3") for _ in range(5)] == [[(3,)]] * 5
    assert pg.reconnects == 0


@pytest_twisted.ensureDeferred
async def test_sql_error_propagates_and_the_pool_stays_usable(pg):
    """A constraint violation reaches the caller as such and does not poison the connection."""
    await pg.run_operation("INSERT INTO session (id) VALUES ('dup')")

    async def insert_twice(cursor):
        await cursor.execute("INSERT INTO session (id) VALUES ('other')")
        await cursor.execute("INSERT INTO session (id) VALUES ('dup')")

    for _ in range(3):  # more than the pool size: every connection saw an error
        with pytest.raises(psycopg2.errors.UniqueViolation):
            await pg.run_interaction(insert_twice)
    assert await pg.run_query("SELECT id FROM session") == [("dup",)]
    assert pg.reconnects == 0


@pytest_twisted.ensureDeferred
async def test_statement_timeout_is_not_a_dead_connection(pg):
    """A cancelled slow statement fails alone; the pool must not reconnect over it."""
    async def slow(cursor):
        await cursor.execute("SET LOCAL statement_timeout = '50ms'")
        await cursor.execute("SELECT pg_sleep(1)")

    with pytest.raises(psycopg2.errors.QueryCanceled):
        await pg.run_interaction(slow)
    assert await pg.run_query("SELECT 1") == [(1,)]
    assert pg.reconnects == 0


@pytest_twisted.ensureDeferred
async def test_saturated_pool_queues_work(pg_factory, pg_schema):
    """More concurrent work than connections waits its turn instead of failing."""
    db = await pg_factory(pg_schema, pool_size=1)
    results = await defer.gatherResults(
        [db.run_query("SELECT %s::int, pg_sleep(0.02)", (i,)) for i in range(5)])
    assert [r[0][0] for r in results] == [0, 1, 2, 3, 4]


@pytest_twisted.ensureDeferred
async def test_serialization_failure_is_run_again(pg):
    """A transaction PostgreSQL rolled back (deadlock, serialization) is retried, not lost."""
    runs = []

    async def flaky(cursor):
        runs.append(1)
        await cursor.execute("INSERT INTO session (id) VALUES (%s)", (f"s{len(runs)}",))
        if len(runs) == 1:
            raise psycopg2.errors.SerializationFailure("could not serialize access")
        return len(runs)

    assert await pg.run_interaction(flaky, idempotent=False) == 2
    assert await pg.run_query("SELECT id FROM session") == [("s2",)]


@pytest_twisted.ensureDeferred
async def test_statement_rolled_back_by_a_deadlock_is_run_again(pg):
    """One of two statements that deadlock would fail instead of being applied (acknowledgements lost)."""
    await pg.run_operation("INSERT INTO session (id) VALUES ('a'), ('b')")

    def both(first, second, seq):
        # one autocommit string: an implicit transaction that holds its first lock while sleeping
        return pg.run_operation(
            "UPDATE session SET last_seq = last_seq + %s WHERE id = %s; SELECT pg_sleep(0.3); "
            "UPDATE session SET last_seq = last_seq + %s WHERE id = %s", (seq, first, seq, second))

    await defer.gatherResults([both("a", "b", 1), both("b", "a", 10)], consumeErrors=True)
    assert await pg.run_query("SELECT id, last_seq FROM session ORDER BY id") == [("a", 11), ("b", 11)]


@pytest_twisted.ensureDeferred
async def test_recovers_after_its_backends_are_terminated(pg_factory, pg_schema, pg_admin):
    """After PostgreSQL drops every pool connection, the next work succeeds without a restart."""
    db = await pg_factory(pg_schema, pool_size=4)
    await db.run_operation("INSERT INTO session (id) VALUES ('before')")
    await eventually(lambda: db.live_connections() == 4)
    assert terminate_backends(pg_admin, db.application_name) == 4
    # right away: every idle connection is dead but may not know it yet; the work still goes through
    assert await db.run_query("SELECT id FROM session") == [("before",)]
    await eventually(lambda: db.reconnects >= 4 and db.live_connections() == 4)
    assert db.connected
    # and again, once the pool has noticed the deaths on its own
    assert terminate_backends(pg_admin, db.application_name) == 4
    await eventually(lambda: db.reconnects >= 8)
    assert await db.run_operation("INSERT INTO session (id) VALUES ('after')") == 1


@pytest_twisted.ensureDeferred
async def test_idempotent_work_in_flight_is_run_again(pg, pg_admin):
    """An idempotent transaction cut off by a lost connection is re-run and succeeds."""
    runs = []

    async def work(cursor):
        runs.append(1)
        await cursor.execute("INSERT INTO session (id) VALUES (%s) ON CONFLICT DO NOTHING", ("idem",))
        if len(runs) == 1:
            await cursor.execute("SELECT pg_sleep(2)")  # killed while in here
        return len(runs)

    d = pg.run_interaction(work, idempotent=True)
    await eventually(lambda: running(pg_admin, pg.application_name, "pg_sleep(2)") == 1)
    assert terminate_backends(pg_admin, pg.application_name) >= 1
    # run again, maybe more than once: the first statement of a run may go to
    # another killed connection that has not noticed yet
    assert await d >= 2
    assert await pg.run_query("SELECT id FROM session") == [("idem",)]


@pytest_twisted.ensureDeferred
async def test_non_idempotent_work_in_flight_fails_unavailable(pg, pg_admin):
    """Work that must not run twice fails with DatabaseUnavailable when its connection dies mid-way."""
    runs = []

    async def work(cursor):
        runs.append(1)
        await cursor.execute("SELECT pg_sleep(2)")

    await eventually(lambda: pg.live_connections() == 2)
    d = pg.run_query("SELECT pg_sleep(2)", idempotent=False)
    d2 = pg.run_interaction(work, idempotent=False)
    await eventually(lambda: runs and running(pg_admin, pg.application_name, "pg_sleep(2)") == 2)
    assert terminate_backends(pg_admin, pg.application_name) == 2
    with pytest.raises(DatabaseUnavailable, match="outcome unknown"):
        await d
    with pytest.raises(DatabaseUnavailable, match="outcome unknown"):
        await d2
    assert runs == [1]
    assert await pg.run_query("SELECT 1") == [(1,)]


@pytest_twisted.ensureDeferred
async def test_postgres_down_at_start_does_not_crash(pg_factory):
    """A daemon starting while PostgreSQL is down keeps running; work fails fast, not forever."""
    db = await pg_factory("public", dsn="postgresql://root@127.0.0.1:1/test", connect_timeout=0.3)
    assert db.running and not db.connected
    with pytest.raises(DatabaseUnavailable, match="no live connection"):
        await db.run_query("SELECT 1")
    await db.stopService()
    with pytest.raises(DatabaseUnavailable, match="not running"):
        await db.run_query("SELECT 1")


@pytest_twisted.ensureDeferred
async def test_stopping_fails_waiting_work(pg_factory, pg_schema):
    """Stopping lets running work finish, fails what waits, and leaves no connection behind."""
    db = await pg_factory(pg_schema, pool_size=1)
    running = db.run_query("SELECT pg_sleep(0.2), 1")
    waiting = db.run_query("SELECT 2")
    await db.stopService()
    assert (await running)[0][1] == 1
    with pytest.raises(DatabaseUnavailable):
        await waiting
    assert not db.connected


def test_bad_dsn_and_schema_are_refused_at_once():
    """A malformed DSN or schema is a configuration error at start, not an endless retry."""
    with pytest.raises(ValueError, match="invalid PostgreSQL DSN"):
        PostgresService("not a dsn")
    with pytest.raises(ValueError, match="schema"):
        PostgresService("postgresql://root@127.0.0.1/test", schema='x"; DROP TABLE session; --')


@pytest_twisted.ensureDeferred
async def test_service_mogrify_builds_multi_row_values(pg):
    """Multi-row VALUES quote every value safely (executemany does not work in async mode)."""
    values = pg.mogrify("(%s, %s)", [("q'1", "x"), ("q2", None)])
    assert values == "('q''1', 'x'),('q2', NULL)"
    await pg.run_operation("INSERT INTO session_member (session_id, user_id) "
                           "SELECT * FROM (VALUES " + values + ") v WHERE false")


def test_from_config_uses_the_configured_dsn_password_schema_and_pool():
    """The processor's settings (DSN, password, schema, pool size, timeout) reach the pool."""
    config = load_config(PROCESSOR, {
        "postgres": "postgresql://imc@db.internal:6432/im", "postgres_password": "s3cr:t",
        "postgres_schema": "tenant_a", "postgres_pool_size": "7", "postgres_timeout": "2.5"}, environ={})
    db = PostgresService.from_config(config)
    assert db.dsn == "postgresql://imc:s3cr%3At@db.internal:6432/im"
    assert (db.schema, db.pool_size, db.timeout) == ("tenant_a", 7, 2.5)
    assert db.application_name == "imcluster-processor"
    assert "s3cr" not in db.where and db.where == "imc@db.internal:6432/im"


@pytest_twisted.ensureDeferred
async def test_every_statement_is_bounded_by_postgres_statement_timeout(pg_schema, pg_factory):
    """A statement stuck on a lock or a hung server would hold a processor's window for ever."""
    config = load_config(PROCESSOR, {"postgres_schema": pg_schema, "postgres_statement_timeout": 0.2}, None, {})
    assert config.postgres_statement_timeout == 0.2
    db = await pg_factory(pg_schema, statement_timeout=config.postgres_statement_timeout)
    started = reactor.seconds()
    with pytest.raises(psycopg2.errors.QueryCanceled):
        await db.run_query("SELECT pg_sleep(5)")
    assert reactor.seconds() - started < 2.0
    assert await db.run_query("SELECT 1") == [(1,)]  # the connection stays usable
    default = PostgresService.from_config(load_config(PROCESSOR, {"postgres_schema": pg_schema}, None, {}))
    assert default.statement_timeout == 30.0

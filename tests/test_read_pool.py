"""ReadPool (``--postgres-replica``): which reads go to a replica, and where they go when it is gone.

The replica's streaming itself is tests/test_postgres_replica.py (slow, a
private primary and replica); here a second pool on the shared server stands
in for a replica, told apart by its ``application_name``.
"""

from __future__ import annotations

import pytest_twisted

from imcluster.config import load_config
from imcluster.db import ReadPool
from imcluster.store.postgres import MessageStore
from tests.support.private import free_port


@pytest_twisted.ensureDeferred
async def test_history_and_session_reads_go_to_the_replica_and_writes_to_the_primary(pg, pg_factory, pg_schema):
    """A replica pool that history never used, or that took writes, would make --postgres-replica a no-op or worse."""
    replica = await pg_factory(pg_schema)
    pool = ReadPool(pg, [replica])
    store = MessageStore(pg, 100, reader=pool)
    await store.create_session("alice", ["bob"], "room")
    assert pool.replica_reads == 0  # a write: the primary
    await store.get_session("room")
    await store.user_sessions("alice")
    await store.history("alice", "room")
    assert (pool.replica_reads, pool.primary_reads) == (4, 0)  # history: membership, then the page
    # sync and routing reads stay on the primary
    await store.undelivered_page("bob", None, 10)
    await store.session_members(["room"])
    assert pool.replica_reads == 4


@pytest_twisted.ensureDeferred
async def test_reads_fall_back_to_the_primary_while_no_replica_answers(pg, pg_factory, pg_schema):
    """History would fail for everyone while the only replica is down, though the primary answers."""
    dead = await pg_factory(pg_schema, dsn=f"postgresql://root@127.0.0.1:{free_port()}/test", connect_timeout=0.5)
    pool = ReadPool(pg, [dead])
    store = MessageStore(pg, 100, reader=pool)
    await store.create_session("alice", ["bob"], "room")
    assert (await store.get_session("room"))["members"] == ["alice", "bob"]
    assert await store.history("alice", "room") == []
    assert pool.replica_reads == 0 and pool.primary_reads == 3


def test_replicas_come_from_the_config_with_their_own_application_name():
    """An operator could not tell replica connections from primary ones in pg_stat_activity."""
    config = load_config("api", {"jwt_secret": "x", "postgres_replica": ["postgresql://r1/db", "postgresql://r2/db"],
                                 "postgres_password": "pw"})
    pool = ReadPool.from_config(config, primary=object())
    assert [r.name for r in pool.replicas] == ["postgres-replica-1", "postgres-replica-2"]
    assert {r.application_name for r in pool.replicas} == {"imcluster-api-replica"}
    assert all(":pw@" in r.dsn for r in pool.replicas)
    assert ReadPool.from_config(load_config("processor", {}), primary=object()).replicas == []

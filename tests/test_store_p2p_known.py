"""The store remembers committed 1:1 sessions (no create statement per window) without trusting it blindly."""

from __future__ import annotations

import pytest_twisted

from imcluster.store import Incoming
from imcluster.store.postgres import MessageStore

SID = "p2p:alice:bob"


@pytest_twisted.ensureDeferred
async def test_known_p2p_session_deleted_by_hand_is_created_again(pg_schema, pg_factory):
    """A message to a 1:1 session an operator deleted would be refused no_session until a restart."""
    db = await pg_factory(pg_schema, pool_size=2)
    store = MessageStore(db, 1000)
    [first] = await store.store_messages([Incoming("alice", "m1", SID, {"t": 1})])
    assert first.ok and first.seq == 1 and SID in store.p2p_known
    [second] = await store.store_messages([Incoming("bob", "m2", SID, {"t": 2})])
    assert second.ok and second.seq == 2 and second.recipients == ["alice"]
    await db.run_operation("DELETE FROM session WHERE id = %s", (SID,))
    [again] = await store.store_messages([Incoming("alice", "m3", SID, {"t": 3})])
    assert again.ok and again.seq == 1 and again.recipients == ["bob"]
    assert await store.session_members([SID]) == {SID: ["alice", "bob"]}


@pytest_twisted.ensureDeferred
async def test_p2p_session_of_a_rolled_back_batch_is_not_remembered(pg_schema, pg_factory):
    """A 1:1 session created in a batch that rolled back would be taken as existing: its next message refused."""
    db = await pg_factory(pg_schema, pool_size=2)
    store = MessageStore(db, 1000)

    txn = await store.begin_window([Incoming("alice", "m1", SID, {"t": 1})])
    assert txn.recipients == ["bob"]
    await txn.abort()  # the caller could not ask who is online: rolled back
    assert SID not in store.p2p_known
    [stored] = await store.store_messages([Incoming("alice", "m1", SID, {"t": 1})])
    assert stored.ok and not stored.duplicate and stored.seq == 1

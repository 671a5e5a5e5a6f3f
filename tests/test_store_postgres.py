"""The message store on the real PostgreSQL: concurrency, races, paging at volume, query plans."""

from __future__ import annotations

import json

import pytest_twisted
from twisted.internet import defer, reactor, task

from imcluster.store import Incoming
from imcluster.store.postgres import FIRST_PAGES_SQL, UNDELIVERED_SQL, MessageStore
from tests.support.postgres import undelivered_keys

CAP = 1000


async def wait_until_blocked(db, application_name, timeout=5.0):
    """Wait until a backend of ``application_name`` waits for a lock."""
    for _ in range(int(timeout / 0.01)):
        rows = await db.run_query(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s AND wait_event_type = 'Lock'",
            (application_name,))
        if rows[0][0]:
            return
        await task.deferLater(reactor, 0.01, lambda: None)
    raise AssertionError(f"{application_name} never waited for a lock")


class Gate:
    """An interaction that does ``sql`` and then holds its transaction open until ``release()``."""

    def __init__(self, db, statements):
        self.opened = defer.Deferred()
        self._release = defer.Deferred()
        self.statements = statements
        self.done = db.run_interaction(self._hold, idempotent=False)

    async def _hold(self, cursor):
        for sql, params in self.statements:
            await cursor.execute(sql, params)
        self.opened.callback(None)
        await self._release

    def release(self):
        self._release.callback(None)
        return self.done


@pytest_twisted.ensureDeferred
async def test_two_processors_store_into_one_group_gap_free(pg_schema, pg_factory):
    """Two processors would give a group repeated or missing seq numbers, or store a message twice."""
    db1, db2 = await pg_factory(pg_schema, pool_size=3), await pg_factory(pg_schema, pool_size=3)
    s1, s2 = MessageStore(db1, CAP), MessageStore(db2, CAP)
    await s1.create_session("alice", ["bob", "carol", "dave"], "g")
    senders = ["alice", "bob", "carol"]
    keys = [(senders[i % 3], f"m{i}") for i in range(600)]
    batches = [keys[i:i + 40] for i in range(0, len(keys), 40)]

    def run(store, order):
        # each processor sees every message (redelivery) in its own order, 3 batches in flight
        return [store.store_messages([Incoming(s, c, "g", {"k": c}) for s, c in batches[i]]) for i in order]

    n = len(batches)
    work = run(s1, range(n)) + run(s2, reversed(range(n))) + run(s1, range(0, n, 2))
    results = [r for batch in await defer.gatherResults(work, consumeErrors=True) for r in batch]
    assert all(r.ok for r in results)
    by_key = {}
    for r in results:
        by_key.setdefault((r.sender, r.client_msg_id), set()).add((r.msg_id, r.seq))
    assert all(len(v) == 1 for v in by_key.values()), "one key answered with two msgIds"
    rows = await db1.run_query("SELECT seq, sender_id, client_msg_id FROM messagerecv WHERE session_id = 'g' "
                               "ORDER BY seq")
    assert [r[0] for r in rows] == list(range(1, len(keys) + 1))
    assert sorted((r[1], r[2]) for r in rows) == sorted(keys)
    assert (await db1.run_query("SELECT last_seq FROM session WHERE id = 'g'"))[0][0] == len(keys)
    # every message has exactly its three recipients' rows
    counts = await db1.run_query("SELECT count(*), count(DISTINCT msg_id) FROM messagesend")
    assert counts[0] == (3 * len(keys), len(keys))


@pytest_twisted.ensureDeferred
async def test_a_second_processor_waits_for_the_session_lock(pg_schema, pg_factory):
    """Two processors storing into one group at once would both take the same seq: one batch runs
    again, or fails outright once its race retries run out."""
    db1, db2 = await pg_factory(pg_schema, pool_size=1), await pg_factory(pg_schema, pool_size=1)
    other = await pg_factory(pg_schema, pool_size=2)
    s1, s2 = MessageStore(db1, CAP), MessageStore(db2, CAP)
    await s1.create_session("alice", ["bob"], "g")
    # the race, forced: the first processor's writing statement waits behind a table lock,
    # after it has read last_seq (and locked the session, if it does lock it)
    gate = Gate(other, [("LOCK TABLE messagerecv IN SHARE MODE", None)])
    await gate.opened
    first = s1.store_messages([Incoming("alice", "a1", "g", 1)])
    await wait_until_blocked(other, db1.application_name)
    # ... and now the second one reads the same session
    second = s2.store_messages([Incoming("bob", "b1", "g", 2)])
    await wait_until_blocked(other, db2.application_name)
    await gate.release()
    [a], [b] = await first, await second
    assert s1.race_retries == s2.race_retries == 0, "a batch read last_seq while another held the session"
    assert (a.seq, b.seq) == (1, 2)
    rows = await other.run_query("SELECT seq, client_msg_id FROM messagerecv WHERE session_id = 'g' ORDER BY seq")
    assert rows == [(1, "a1"), (2, "b1")]


@pytest_twisted.ensureDeferred
async def test_lost_race_on_client_msg_id_answers_the_original(pg_schema, pg_factory):
    """A message racing with its own copy on another processor would fail or be stored twice."""
    db = await pg_factory(pg_schema)
    store = MessageStore(db, CAP)
    await store.create_session("alice", ["bob"], "g1")
    await store.create_session("alice", ["bob"], "g2")
    other = await pg_factory(pg_schema, pool_size=1)
    # another processor has inserted alice's "c1" (into g2) and not committed yet
    gate = Gate(other, [
        ("UPDATE session SET last_seq = 1 WHERE id = 'g2'", None),
        ("INSERT INTO messagerecv (session_id, seq, sender_id, client_msg_id, body) "
         "VALUES ('g2', 1, 'alice', 'c1', '\"first\"')", None),
        ("INSERT INTO messagesend (user_id, msg_id, session_id, seq) "
         "SELECT 'bob', id, 'g2', 1 FROM messagerecv WHERE client_msg_id = 'c1'", None)])
    await gate.opened
    mine = await pg_factory(pg_schema, pool_size=1)
    loser = MessageStore(mine, CAP)
    d = loser.store_messages([Incoming("alice", "c1", "g1", "second"), Incoming("alice", "c2", "g1", "ok")])
    await wait_until_blocked(db, mine.application_name)  # on the unique key
    await gate.release()
    first, second = await d
    assert loser.race_retries == 1
    assert first.duplicate and (first.session_id, first.seq, first.body) == ("g2", 1, "first")
    assert first.recipients == ["bob"]
    assert not second.duplicate and (second.session_id, second.seq) == ("g1", 1)  # no gap left behind
    assert (await db.run_query("SELECT last_seq FROM session WHERE id = 'g1'"))[0][0] == 1


@pytest_twisted.ensureDeferred
async def test_member_added_while_waiting_for_the_session_lock(pg_schema, pg_factory):
    """A member added during a send would miss the message, or get it without being a recipient."""
    db = await pg_factory(pg_schema)
    store = MessageStore(db, CAP)
    await store.create_session("alice", ["bob"], "g")
    other = await pg_factory(pg_schema, pool_size=1)
    # an admin (another daemon) holds the session lock while adding carol
    gate = Gate(other, [("SELECT 1 FROM session WHERE id = 'g' FOR UPDATE", None),
                        ("INSERT INTO session_member (session_id, user_id) VALUES ('g', 'carol')", None)])
    await gate.opened
    mine = await pg_factory(pg_schema, pool_size=1)
    d = MessageStore(mine, CAP).store_messages([Incoming("alice", "a1", "g", "hi"),
                                                Incoming("carol", "c1", "g", "me too")])
    await wait_until_blocked(db, mine.application_name)  # on the session lock
    await gate.release()
    first, second = await d
    assert first.recipients == ["bob", "carol"]
    assert second.ok and second.recipients == ["alice", "bob"]
    rows = await db.run_query("SELECT user_id FROM messagesend WHERE msg_id = %s ORDER BY user_id",
                              (int(first.msg_id),))
    assert [r[0] for r in rows] == ["bob", "carol"]


async def fill_backlog(store, db, sessions=40, per_session=50, others=3):
    """``sessions`` x ``per_session`` messages to bob (and ``others`` more users), batches of 500."""
    sids = [f"s{i:02d}" if i % 2 else f"S{i:02d}" for i in range(sessions)]
    users = ["bob"] + [f"u{i}" for i in range(others)]
    for sid in sids:
        await store.create_session("alice", users, sid)
    batch = [Incoming("alice", f"{sid}-{k}", sid, {"k": k}) for k in range(per_session) for sid in sids]
    for i in range(0, len(batch), 500):
        await store.store_messages(batch[i:i + 500])
    await db.run_operation("ANALYZE")
    return sids


@pytest_twisted.ensureDeferred
async def test_undelivered_paging_over_a_large_backlog(pg_schema, pg_factory):
    """A sync of a long backlog would skip, repeat or misorder messages between pages."""
    db = await pg_factory(pg_schema)
    store = MessageStore(db, CAP)
    sids = await fill_backlog(store, db)
    # some already acknowledged, some being sent
    page = await store.undelivered_page("bob", None, 2000)
    assert len(page) == 2000
    acked = [m["msgId"] for m in page[::7]]
    assert await store.mark_delivered([("bob", acked)]) == len(acked)
    assert await store.mark_sending([("bob", m["msgId"]) for m in page[1::5]]) > 0
    expected = [(m["sessionId"], m["seq"]) for m in page if m["msgId"] not in set(acked)]
    assert expected == sorted(expected, key=lambda k: (k[0].encode(), k[1]))
    assert [k[0] for k in expected[:1]] == [sorted(sids, key=str.encode)[0]]
    seen = await undelivered_keys(store, "bob", 300)
    assert seen == expected
    assert len(set(seen)) == len(seen)


def _nodes(plan):
    yield plan
    for child in plan.get("Plans", []):
        yield from _nodes(child)


@pytest_twisted.ensureDeferred
async def test_undelivered_page_is_an_index_range_scan(pg_schema, pg_factory):
    """Every sync page would sort the user's whole backlog (slow syncs for users with many messages)."""
    db = await pg_factory(pg_schema)
    store = MessageStore(db, CAP)
    await fill_backlog(store, db, sessions=40, per_session=50, others=9)
    for after in [("", 0), ("S10", 20)]:
        rows = await db.run_query("EXPLAIN (FORMAT JSON) " + UNDELIVERED_SQL, ("bob", after[0], after[1], 500))
        plan = rows[0][0]
        plan = json.loads(plan) if isinstance(plan, str) else plan
        nodes = list(_nodes(plan[0]["Plan"]))
        assert not [n for n in nodes if n["Node Type"] in ("Sort", "Incremental Sort")], nodes
        scans = [n for n in nodes if n.get("Relation Name") == "messagesend"]
        assert [(n["Node Type"], n.get("Index Name")) for n in scans] == [("Index Scan", "messagesend_undelivered")]


@pytest_twisted.ensureDeferred
async def test_first_pages_of_many_users_are_index_range_scans(pg_schema, pg_factory):
    """The one statement for a batch of syncs would sort or scan every user's backlog."""
    db = await pg_factory(pg_schema)
    store = MessageStore(db, CAP)
    await fill_backlog(store, db, sessions=40, per_session=50, others=9)
    rows = await db.run_query("EXPLAIN (FORMAT JSON) " + FIRST_PAGES_SQL, (["bob", "o1", "o2"], 500))
    plan = rows[0][0]
    plan = json.loads(plan) if isinstance(plan, str) else plan
    nodes = list(_nodes(plan[0]["Plan"]))
    scans = [n for n in nodes if n.get("Relation Name") == "messagesend"]
    assert [(n["Node Type"], n.get("Index Name")) for n in scans] == [("Index Scan", "messagesend_undelivered")]


@pytest_twisted.ensureDeferred
async def test_concurrent_acks_and_marks_do_not_deadlock(pg_schema, pg_factory):
    """Two processors applying overlapping acknowledgements would deadlock and stall acks."""
    db1, db2 = await pg_factory(pg_schema, pool_size=3), await pg_factory(pg_schema, pool_size=3)
    s1, s2 = MessageStore(db1, CAP), MessageStore(db2, CAP)
    users = [f"u{i}" for i in range(20)]
    await s1.create_session("alice", users, "g")
    stored = await s1.store_messages([Incoming("alice", f"a{i}", "g", i) for i in range(100)])
    ids = [r.msg_id for r in stored]
    forward = [(u, ids) for u in users]
    backward = [(u, list(reversed(ids))) for u in reversed(users)]
    pairs = [(u, i) for u in users for i in ids]
    work = []
    for _ in range(3):
        work += [s1.mark_delivered(forward[:15]), s2.mark_delivered(backward[:15]),
                 s1.mark_sending(pairs), s2.mark_sending(list(reversed(pairs))),
                 s2.mark_delivered(forward[5:]), s1.mark_delivered(backward[5:])]
    counts = await defer.gatherResults(work, consumeErrors=True)
    delivered = sum(c for i, c in enumerate(counts) if i % 6 not in (2, 3))
    assert delivered == len(users) * len(ids)  # every row became delivered exactly once
    rows = await db1.run_query("SELECT status, count(*) FROM messagesend GROUP BY status")
    assert rows == [("delivered", len(users) * len(ids))]


@pytest_twisted.ensureDeferred
async def test_online_recipients_rows_are_inserted_sending(pg_schema, pg_factory):
    """Online recipients' rows would stay pending (or offline ones become sending) and cost a second UPDATE."""
    db = await pg_factory(pg_schema, pool_size=2)
    store = MessageStore(db, CAP)
    await store.create_session("alice", ["bob", "carol", "dave"], "g")
    [dup_key] = await store.store_messages([Incoming("alice", "x0", "g", {"t": 1})])
    txn = await store.begin_window(
        [Incoming("alice", "x1", "g", {"t": 1}), Incoming("bob", "x2", "g", {"t": 2}),
         Incoming("alice", "x0", "g", {"t": 1})])
    assert txn.recipients == ["alice", "bob", "carol", "dave"]  # of the new messages only
    assert txn.decided[:2] == [None, None] and txn.decided[2].duplicate
    results = await txn.commit(["bob", "dave", "zed"])  # zed: no row of this window
    assert results[2].duplicate and results[2].msg_id == dup_key.msg_id
    rows = dict(((u, str(m)), s) for u, m, s in await db.run_query("SELECT user_id, msg_id, status FROM messagesend"))
    m1, m2 = results[0].msg_id, results[1].msg_id
    assert {k: v for k, v in rows.items() if k[1] in (m1, m2)} == {
        ("bob", m1): "sending", ("carol", m1): "pending", ("dave", m1): "sending",
        ("alice", m2): "pending", ("carol", m2): "pending", ("dave", m2): "sending"}
    assert all(v == "pending" for k, v in rows.items() if k[1] == dup_key.msg_id)


@pytest_twisted.ensureDeferred
async def test_a_window_holds_its_session_locks_until_commit_or_abort(pg_schema, pg_factory):
    """A window begun beside another would take the same seq, or an aborted one keep its locks."""
    db = await pg_factory(pg_schema, pool_size=3)
    store = MessageStore(db, CAP)
    await store.create_session("alice", ["bob"], "g")
    first = await store.begin_window([Incoming("alice", "a1", "g", 1)])
    second = store.begin_window([Incoming("bob", "b1", "g", 2)])
    await wait_until_blocked(db, db.application_name)  # on the session lock
    assert not second.called
    await first.abort()
    txn = await second
    [b1] = await txn.commit(["alice"])
    assert b1.seq == 1  # the aborted window's seq was never taken
    third = await store.begin_window([Incoming("alice", "a1", "g", 1)])
    [a1] = await third.commit()
    assert a1.seq == 2 and not a1.duplicate
    assert await db.run_query("SELECT count(*) FROM messagerecv") == [(2,)]


"""The message store: one contract, run on the real PostgreSQL and on FakeStore.

Every test here runs twice: on :class:`imcluster.store.postgres.MessageStore`
over a private PostgreSQL schema (migrations applied, dropped afterwards)
and on :class:`imcluster.testing.FakeStore`, so the fake that the processor's
unit tests use behaves like the real thing. Concurrency, paging at volume and
query plans are PostgreSQL-only: ``tests/test_store_postgres.py``.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from zope.interface.verify import verifyObject

from imcluster.db import apply_migrations
from imcluster.interfaces import IMessageStore, IWindowTransaction, Unavailable
from imcluster.store import P2P_SESSION_ID_MAX, Incoming, Rejected, Stored, StoreError, StoreUnavailable, WindowAborted
from imcluster.store.postgres import MessageStore
from imcluster.testing import FakeStore
from tests.support.postgres import undelivered_keys

TS = 1764160000123
#: the group size cap of these tests (config max_group_size)
GROUP_CAP = 20


@pytest.fixture(params=["postgres", "fake"])
def backend(request):
    return request.param


@pytest_twisted.async_fixture
async def store(backend, pg_fresh_schema, pg_factory):
    """The store under test: MessageStore on a fresh migrated schema, or FakeStore; group cap GROUP_CAP."""
    if backend == "fake":
        return FakeStore(max_group_size=GROUP_CAP)
    db = await pg_factory(pg_fresh_schema)
    await apply_migrations(db)
    return MessageStore(db, GROUP_CAP)


_DEFAULT = object()


def msg(sender, cmid, session, body=_DEFAULT, ts=TS, **kw):
    return Incoming(sender, cmid, session, {"text": cmid} if body is _DEFAULT else body, ts, **kw)


async def group(store, creator="alice", members=("bob", "carol"), sid="g1"):
    return await store.create_session(creator, list(members), sid)


async def expect_error(d, code):
    with pytest.raises(StoreError) as info:
        await d
    assert info.value.code == code, info.value
    return info.value


@pytest_twisted.ensureDeferred
async def test_implements_interface(store):
    """The processor could call a method the store does not have."""
    assert verifyObject(IMessageStore, store)


@pytest_twisted.ensureDeferred
async def test_new_messages_get_gap_free_seq_and_recipients(store):
    """Messages would arrive with gaps or repeated seq, or go to the sender instead of the others."""
    await group(store)
    out = await store.store_messages([msg("alice", "a1", "g1"), msg("bob", "b1", "g1"), msg("alice", "a2", "g1")])
    assert [r.seq for r in out] == [1, 2, 3]
    assert all(isinstance(r, Stored) and r.ok and not r.duplicate for r in out)
    assert out[0].recipients == ["bob", "carol"]
    assert out[1].recipients == ["alice", "carol"]
    assert len({r.msg_id for r in out}) == 3 and all(r.msg_id.isdigit() for r in out)
    assert out[0].ts_ms == TS and out[0].body == {"text": "a1"} and out[0].session_id == "g1"
    more = await store.store_messages([msg("carol", "c1", "g1")])
    assert more[0].seq == 4
    assert int(more[0].msg_id) > int(out[2].msg_id)


@pytest_twisted.ensureDeferred
async def test_duplicate_returns_original_to_undelivered_recipients(store):
    """A resent message would be stored twice, or re-routed to someone who already acknowledged it."""
    await group(store)
    [first] = await store.store_messages([msg("alice", "a1", "g1", {"text": "hi"}, ts=TS)])
    assert await store.mark_delivered([("bob", [first.msg_id])]) == 1
    [again] = await store.store_messages([msg("alice", "a1", "g1", {"text": "changed"}, ts=TS + 5000)])
    assert again.duplicate and again.ok
    assert (again.msg_id, again.seq, again.ts_ms, again.body) == (first.msg_id, 1, TS, {"text": "hi"})
    assert again.recipients == ["carol"]
    # the same clientMsgId from another sender is another message
    [other] = await store.store_messages([msg("bob", "a1", "g1")])
    assert not other.duplicate and other.seq == 2


@pytest_twisted.ensureDeferred
async def test_stored_keys_names_exactly_the_messages_stored(store):
    """De-duplication before moderation would moderate a stored message again, or skip a new one."""
    await group(store)
    await store.store_messages([msg("alice", "a1", "g1"), msg("bob", "b1", "g1")])
    found = await store.stored_keys([("alice", "a1"), ("alice", "b1"), ("bob", "b1"), ("carol", "a1"),
                                     ("bad id", "a1"), ("alice", "")])
    assert found == {("alice", "a1"), ("bob", "b1")}
    assert await store.stored_keys([]) == set()


@pytest_twisted.ensureDeferred
async def test_duplicate_within_one_batch(store):
    """A message repeated in one window would get two seq numbers."""
    await group(store)
    out = await store.store_messages([msg("alice", "a1", "g1"), msg("bob", "b1", "g1"), msg("alice", "a1", "g1")])
    assert [r.seq for r in out] == [1, 2, 1]
    assert [r.duplicate for r in out] == [False, False, True]
    assert out[2].msg_id == out[0].msg_id and out[2].recipients == ["bob", "carol"]
    assert (await store.get_session("g1"))["lastSeq"] == 2
    # later copies are answered like the first, whatever session they name
    out = await store.store_messages([msg("alice", "a2", "g1"), msg("alice", "a2", "nope"),
                                      msg("dave", "d1", "g1"), msg("dave", "d1", "p2p:dave:erin")])
    assert (out[0].seq, out[1].seq, out[1].duplicate, out[1].session_id) == (3, 3, True, "g1")
    assert [r.code for r in out[2:]] == ["not_member", "not_member"]
    assert await store.session_members(["p2p:dave:erin"]) == {}


@pytest_twisted.ensureDeferred
async def test_bad_messages_do_not_fail_batch_mates(store):
    """One bad message in a window would lose the good messages sent with it."""
    await group(store)
    await store.create_session("dan", [], "solo")
    big = await store.create_session("alice", [f"u{i}" for i in range(GROUP_CAP - 1)], "big")
    assert len(big[1]) == GROUP_CAP
    batch = [
        msg("alice", "ok1", "g1"),
        msg("dan", "x1", "g1"),  # not a member
        msg("alice", "x2", "nope"),  # no such session
        msg("alice", "x3", "p2p:bob:alice"),  # not sorted
        msg("alice", "x4", "p2p:alice:alice"),  # not two users
        msg("alice", "x5", "p2p:alice:b!b"),  # not a user id
        msg("carol", "x6", "p2p:alice:bob"),  # not one of the two
        msg("alice", "x7", "g1", {"text": "nul\x00"}),  # jsonb cannot hold it
        msg("alice", "x8", "g1", float("nan")),
        msg("alice", "", "g1"),  # no clientMsgId
        msg("alice", "x9", "has space"),
        msg("alice", "x10", ["g1"]),
        msg("alice", "ok2", "g1"),
        msg("alice", "ok3", "big"),
    ]
    out = await store.store_messages(batch)
    codes = [r.code if isinstance(r, Rejected) else "ok" for r in out]
    assert codes == ["ok", "not_member", "no_session", "no_session", "no_session", "no_session", "not_member",
                     "bad_frame", "bad_frame", "bad_frame", "no_session", "no_session", "ok", "ok"]
    assert [r.client_msg_id for r in out[1:9]] == ["x1", "x2", "x3", "x4", "x5", "x6", "x7", "x8"]
    assert (out[0].seq, out[12].seq) == (1, 2)
    assert len(out[13].recipients) == GROUP_CAP - 1
    # a failed p2p message does not create its session
    assert await store.session_members(["p2p:alice:bob", "p2p:bob:alice", "g1"]) == {
        "g1": ["alice", "bob", "carol"]}
    assert all(not r.ok for r in out[1:12])


@pytest_twisted.ensureDeferred
async def test_window_transaction_names_recipients_and_inserts_online_rows_sending(store):
    """Online recipients' rows would stay pending (a second UPDATE per window) or offline ones become sending."""
    await group(store, members=("bob", "carol", "dave"))
    [old] = await store.store_messages([msg("alice", "a0", "g1")])
    txn = await store.begin_window([msg("alice", "a1", "g1"), msg("bob", "b1", "g1"), msg("alice", "a0", "g1"),
                                    msg("zed", "z1", "g1")])
    verifyObject(IWindowTransaction, txn)
    assert txn.recipients == ["alice", "bob", "carol", "dave"]  # of the new messages only
    assert txn.decided[:2] == [None, None]
    assert txn.decided[2].duplicate and txn.decided[2].msg_id == old.msg_id
    assert txn.decided[3].code == "not_member"
    a1, b1, dup, refused = await txn.commit(["bob", "dave", "zed"])  # zed has no row here
    assert (a1.seq, b1.seq, dup.seq, dup.duplicate, refused.ok) == (2, 3, 1, True, False)
    # only the offline recipients' rows are still pending: mark_sending changes them alone
    pairs = [(u, a1.msg_id) for u in ("bob", "carol", "dave")] + [(u, b1.msg_id) for u in ("alice", "carol", "dave")]
    assert await store.mark_sending(pairs) == 3
    assert await store.mark_sending([(u, old.msg_id) for u in ("bob", "carol", "dave")]) == 3  # the duplicate's
    # store_messages is begin_window + commit(()): every row pending
    [c1] = await store.store_messages([msg("carol", "c1", "g1")])
    assert await store.mark_sending([(u, c1.msg_id) for u in ("alice", "bob", "dave")]) == 3


@pytest_twisted.ensureDeferred
async def test_window_transaction_abort_stores_nothing_and_lets_the_next_window_on(store):
    """A window given up (Redis down) would leave half a batch, or hold its session for ever."""
    await group(store)
    txn = await store.begin_window([msg("alice", "a1", "g1"), msg("bob", "b1", "p2p:bob:zoe")])
    assert txn.recipients == ["bob", "carol", "zoe"]
    # a second window on the same session waits for the first (its locks), then takes the next seq
    second = store.begin_window([msg("carol", "c1", "g1")])
    await txn.abort()
    await txn.abort()  # twice is harmless
    with pytest.raises(WindowAborted):
        await txn.commit(["bob"])  # too late: the answer is the abort
    [c1] = await (await second).commit()
    assert c1.seq == 1  # the aborted window took no seq
    assert await store.session_members(["p2p:bob:zoe"]) == {}  # nor created its 1:1 session
    assert [m["clientMsgId"] for m in await store.history("alice", "g1")] == ["c1"]
    # the same messages again are new, not duplicates of the rolled-back ones
    txn = await store.begin_window([msg("alice", "a1", "g1")])
    [a1] = await txn.commit(["bob"])
    assert (a1.seq, a1.duplicate) == (2, False)


@pytest_twisted.ensureDeferred
async def test_windows_take_seq_in_the_order_they_began(store):
    """Two windows in flight would interleave or repeat seq numbers of one session."""
    await group(store)
    first = await store.begin_window([msg("alice", "a1", "g1"), msg("alice", "a2", "g1")])
    second = store.begin_window([msg("bob", "b1", "g1")])
    out = await first.commit(["bob"])
    [b1] = await (await second).commit([])
    assert [r.seq for r in out] + [b1.seq] == [1, 2, 3]


@pytest_twisted.ensureDeferred
async def test_a_window_with_nothing_new_needs_no_answer(store):
    """A window of duplicates and refusals would hold its session until a commit it does not need."""
    await group(store)
    await store.store_messages([msg("alice", "a1", "g1")])
    txn = await store.begin_window([msg("alice", "a1", "g1"), msg("zed", "z1", "g1")])
    assert txn.recipients == []
    [b1] = await store.store_messages([msg("bob", "b1", "g1")])  # not held up by the open window
    assert b1.seq == 2
    dup, refused = await txn.commit()
    assert dup.duplicate and refused.code == "not_member"
    assert await (await store.begin_window([])).commit() == []


@pytest_twisted.ensureDeferred
async def test_unavailable_is_the_store_error_not_the_drivers(backend, store):
    """The processor would dead-letter messages during a PostgreSQL outage (a driver error it does not know)."""
    await group(store)
    if backend == "fake":
        store.available = False
    else:
        await store.db.stopService()
    for d in (store.begin_window([msg("alice", "a1", "g1")]), store.store_messages([msg("alice", "a2", "g1")]),
              store.history("alice", "g1"), store.mark_delivered([("bob", ["1"])]), store.get_session("g1"),
              store.create_session("alice", ["bob"], "g2"), store.read("alice", "g1", 1)):
        with pytest.raises(StoreUnavailable) as info:
            await d
        assert isinstance(info.value, Unavailable)


@pytest_twisted.ensureDeferred
async def test_one_to_one_session_of_two_longest_user_ids_exists(store):
    """Two users with 128-character ids could not talk 1:1 (their 261-character session id refused)."""
    a, b = "a" * 128, "b" * 128
    sid = f"p2p:{a}:{b}"
    assert len(sid) == 261 == P2P_SESSION_ID_MAX
    assert await store.history(a, sid) == []  # exists implicitly before its first message
    assert await store.read(b, sid, 5) == (0, [a, b])
    [m1] = await store.store_messages([msg(a, "m1", sid)])
    txn = await store.begin_window([msg(b, "m2", sid)])
    assert txn.recipients == [a]
    [m2] = await txn.commit([a])
    assert (m1.ok, m1.seq, m1.recipients, m2.seq) == (True, 1, [b], 2)
    assert [(m["clientMsgId"], m["from"]) for m in await store.history(b, sid)] == [("m1", a), ("m2", b)]
    assert await store.session_members([sid]) == {sid: [a, b]}
    assert (await store.get_session(sid))["kind"] == "p2p"
    assert [s["sessionId"] for s in await store.user_sessions(a)] == [sid]
    await expect_error(store.history("c", sid), "not_member")
    # only 1:1 ids are that long: a group's id stays within 128 characters
    await expect_error(store.create_session("alice", ["bob"], "g" * 129), "bad_request")
    assert await store.create_session("alice", ["bob"], "g" * 128) == ("g" * 128, ["alice", "bob"])
    await expect_error(store.create_session(a, [b], sid), "conflict")
    [r] = await store.store_messages([msg(a, "x", f"p2p:{a}:{b}x")])  # a 129-character user id
    assert r.code == "no_session"


@pytest_twisted.ensureDeferred
async def test_group_above_the_cap_refuses_messages(store):
    """A session that grew past the configured cap would fan out without limit."""
    await store.create_session("alice", [f"u{i}" for i in range(GROUP_CAP - 1)], "big")
    store.max_group_size = GROUP_CAP - 1  # the operator lowered the cap
    [r] = await store.store_messages([msg("alice", "a1", "big")])
    assert isinstance(r, Rejected) and r.code == "too_large"


@pytest_twisted.ensureDeferred
async def test_p2p_session_is_created_by_its_first_message(store):
    """Two users could not talk 1:1 without creating a session first."""
    sid = "p2p:alice:bob"
    assert await store.history("bob", sid) == []
    # it exists implicitly (PROTOCOL.md "Sessions"): closed to anyone else, as for messages
    await expect_error(store.history("carol", sid), "not_member")
    await expect_error(store.read("carol", sid, 1), "not_member")
    assert await store.read("alice", sid, 5) == (0, ["alice", "bob"])
    out = await store.store_messages([msg("bob", "b1", sid), msg("alice", "a1", sid)])
    assert [(r.seq, r.recipients) for r in out] == [(1, ["alice"]), (2, ["bob"])]
    info = await store.get_session(sid)
    assert (info["kind"], info["members"], info["lastSeq"], info["owners"]) == ("p2p", ["alice", "bob"], 2, [])
    await expect_error(store.history("carol", sid), "not_member")
    [r] = await store.store_messages([msg("carol", "c1", sid)])
    assert r.code == "not_member"
    assert [s["sessionId"] for s in await store.user_sessions("alice")] == [sid]


@pytest_twisted.ensureDeferred
async def test_trusted_sender_needs_no_membership(store):
    """The admin's server-side publish as `system` would be refused as not_member."""
    await group(store)
    out = await store.store_messages([msg("system", "s1", "g1", trusted=True),
                                      msg("system", "s2", "p2p:alice:bob", trusted=True),
                                      msg("system", "s3", "nope", trusted=True)])
    assert out[0].recipients == ["alice", "bob", "carol"] and out[0].seq == 1
    assert out[1].recipients == ["alice", "bob"] and out[1].seq == 1
    assert out[2].code == "no_session"


@pytest_twisted.ensureDeferred
async def test_body_comes_back_as_the_same_json(store):
    """A body would change meaning between the live delivery and sync or history."""
    await group(store)
    bodies = [{"text": "héllo ✓ 😀", "n": [1, 2.5, -3, None, True], "o": {"k": {"z": "%s %(x)s '\""}}},
              "plain", 42, None, [], {"": ""}]
    out = await store.store_messages([msg("alice", f"a{i}", "g1", b) for i, b in enumerate(bodies)])
    assert [r.body for r in out] == bodies
    page = await store.undelivered_page("bob", None, 100)
    assert [m["body"] for m in page] == bodies
    hist = await store.history("carol", "g1")
    assert [m["body"] for m in hist] == bodies


@pytest_twisted.ensureDeferred
async def test_ts_is_the_same_in_reply_sync_and_history(store):
    """A client would see one message with different times in its reply, sync and history."""
    await group(store)
    [r] = await store.store_messages([msg("alice", "a1", "g1", ts=1764160000999)])
    [live] = await store.undelivered_page("bob", None, 10)
    [hist] = await store.history("alice", "g1")
    assert r.ts_ms == live["ts"] == hist["ts"] == 1764160000999
    assert live == {"msgId": r.msg_id, "sessionId": "g1", "seq": 1, "from": "alice", "clientMsgId": "a1",
                    "body": {"text": "a1"}, "ts": 1764160000999}
    [untimed] = await store.store_messages([msg("alice", "a2", "g1", ts=None)])
    [h2] = await store.history("alice", "g1", before_seq=3, limit=1)
    assert untimed.ts_ms == h2["ts"] and untimed.ts_ms > 1_600_000_000_000


@pytest_twisted.ensureDeferred
async def test_mark_sending_only_moves_pending(store):
    """An acknowledged message would become undelivered again and be re-sent on every sync."""
    await group(store)
    [a, b] = await store.store_messages([msg("alice", "a1", "g1"), msg("alice", "a2", "g1")])
    assert await store.mark_delivered([("bob", [a.msg_id])]) == 1
    n = await store.mark_sending([("bob", a.msg_id), ("bob", b.msg_id), ("carol", int(a.msg_id)),
                                  ("bob", "junk"), ("alice", a.msg_id), ("bob", b.msg_id)])
    assert n == 2
    assert await store.mark_sending([("bob", b.msg_id)]) == 0  # already sending
    # sending rows are still undelivered, and sync sends them
    assert [m["msgId"] for m in await store.undelivered_page("bob", None, 10)] == [b.msg_id]
    assert [m["msgId"] for m in await store.undelivered_page("carol", None, 10)] == [a.msg_id, b.msg_id]
    assert await store.mark_delivered([("carol", [a.msg_id, b.msg_id])]) == 2


@pytest_twisted.ensureDeferred
async def test_mark_delivered_ignores_other_users_and_junk(store):
    """Acknowledging someone else's or a made-up msgId would hide messages from their recipient."""
    await group(store)
    [a] = await store.store_messages([msg("alice", "a1", "g1")])
    junk = ["", "abc", "-1", "0", "1e3", "99999999999999999999", None, 3.5, True, [1], a.msg_id + " "]
    n = await store.mark_delivered([("carol", junk), ("dave", [a.msg_id]), ("alice", [a.msg_id]),
                                    ("bob\x00", [a.msg_id]), ("bob", [str(int(a.msg_id) + 1000)])])
    assert n == 0
    assert [m["msgId"] for m in await store.undelivered_page("bob", None, 10)] == [a.msg_id]
    assert [m["msgId"] for m in await store.undelivered_page("carol", None, 10)] == [a.msg_id]
    assert await store.mark_delivered([("bob", [a.msg_id, a.msg_id]), ("carol", [int(a.msg_id)])]) == 2
    assert await store.mark_delivered([("bob", [a.msg_id])]) == 0
    assert await store.undelivered_page("bob", None, 10) == []
    assert await store.mark_delivered([]) == 0 and await store.mark_sending([]) == 0


@pytest_twisted.ensureDeferred
async def test_undelivered_pages_in_byte_order_without_duplicates(store):
    """Sync would skip, repeat or misorder messages across pages."""
    # byte order: upper case before lower case, "-" before "0", unlike most locales
    sids = ["b", "B", "a-1", "a0", "A"]
    for sid in sids:
        await store.create_session("alice", ["bob"], sid)
    batch = [msg("alice", f"{sid}-{k}", sid) for k in range(3) for sid in sids]
    await store.store_messages(batch)
    seen = await undelivered_keys(store, "bob", 4)
    assert seen == [(sid, seq) for sid in sorted(sids, key=str.encode) for seq in (1, 2, 3)]
    assert await store.undelivered_page("alice", None, 10) == []  # the sender has no rows
    assert await store.undelivered_page("bad user", None, 10) == []


@pytest_twisted.ensureDeferred
async def test_first_pages_of_many_users_are_their_undelivered_pages(store):
    """A batch of syncs read by one statement would give a user another's rows, or a different page."""
    sids = ["b", "B", "a-1", "A"]
    for sid in sids:
        await store.create_session("alice", ["bob", "carol"], sid)
    await store.create_session("dave", ["erin"], "d")
    await store.store_messages([msg("alice", f"{sid}-{k}", sid) for k in range(3) for sid in sids])
    await store.store_messages([msg("dave", "d-1", "d")])
    first = await store.undelivered_page("carol", None, 10)
    await store.mark_delivered([("carol", [first[0]["msgId"], first[3]["msgId"]])])
    users = ["bob", "carol", "erin", "alice", "bob", "bad user", "nobody"]
    for limit in (1, 5, 100):
        pages = await store.undelivered_first_pages(users, limit)
        assert sorted(pages) == sorted(set(users))
        for user in set(users):
            assert pages[user] == await store.undelivered_page(user, None, limit), (user, limit)
    assert len((await store.undelivered_first_pages(["bob"], 5))["bob"]) == 5
    assert await store.undelivered_first_pages([], 5) == {}


@pytest_twisted.ensureDeferred
async def test_history_pages(store):
    """History would return the wrong window, the wrong order, or other people's sessions."""
    await group(store)
    await store.store_messages([msg("alice", f"a{i}", "g1") for i in range(1, 251)])
    newest = await store.history("bob", "g1")
    assert [m["seq"] for m in newest] == list(range(201, 251))  # default 50, ascending
    assert set(newest[0]) == {"msgId", "seq", "from", "clientMsgId", "body", "ts"}
    page = await store.history("bob", "g1", before_seq=100, limit=50)
    assert [m["seq"] for m in page] == list(range(50, 100))
    assert [m["seq"] for m in await store.history("bob", "g1", before_seq=3, limit=50)] == [1, 2]
    assert await store.history("bob", "g1", before_seq=1) == []
    assert len(await store.history("bob", "g1", limit=1000)) == 200  # capped
    assert len(await store.history("bob", "g1", limit=0)) == 1
    await expect_error(store.history("dave", "g1"), "not_member")
    await expect_error(store.history("bob", "nope"), "no_session")
    await expect_error(store.history("bob", "bad id\x00"), "no_session")


@pytest_twisted.ensureDeferred
async def test_read_cursor_moves_forward_only_and_clamps(store):
    """Read receipts would move backwards, past the last message, or reach non-members."""
    await group(store)
    await store.store_messages([msg("alice", f"a{i}", "g1") for i in range(5)])
    assert await store.read("bob", "g1", 3) == (3, ["alice", "bob", "carol"])
    assert (await store.read("bob", "g1", 2))[0] == 3
    assert (await store.read("bob", "g1", 99))[0] == 5
    assert (await store.read("bob", "g1", -7))[0] == 5
    assert (await store.read("bob", "g1", 2**70))[0] == 5
    assert [m["seq"] for m in await store.history("bob", "g1", before_seq=2**70, limit=2)] == [4, 5]
    await expect_error(store.read("dave", "g1", 1), "not_member")
    await expect_error(store.read("bob", "nope", 1), "no_session")
    # a 1:1 session exists implicitly: before its first message its cursor clamps to 0
    assert await store.read("bob", "p2p:alice:bob", 1) == (0, ["alice", "bob"])
    await expect_error(store.read("bob", "p2p:alice:bobby", 1), "not_member")


@pytest_twisted.ensureDeferred
async def test_user_sessions_count_unread_except_own(store):
    """The unread badge would count the user's own messages or ignore the read cursor."""
    await group(store)
    await store.create_session("carol", ["bob"], "g2")
    await store.store_messages([msg("alice", "a1", "g1"), msg("bob", "b1", "g1"), msg("alice", "a2", "g1"),
                                msg("carol", "c1", "g2")])
    listing = await store.user_sessions("bob")
    assert listing == [{"sessionId": "g1", "kind": "group", "lastSeq": 3, "unread": 2},
                       {"sessionId": "g2", "kind": "group", "lastSeq": 1, "unread": 1}]
    await store.read("bob", "g1", 2)
    assert (await store.user_sessions("bob"))[0]["unread"] == 1
    await store.read("bob", "g1", 3)
    assert (await store.user_sessions("bob"))[0]["unread"] == 0
    assert (await store.user_sessions("alice"))[0]["unread"] == 1  # bob's message only
    assert await store.user_sessions("nobody") == []


@pytest_twisted.ensureDeferred
async def test_create_session_rules(store):
    """Sessions could be created with bad ids, without their creator, twice, or beyond the cap."""
    assert await store.create_session("carol", ["bob", "alice", "bob"], "r:1") == ("r:1", ["alice", "bob", "carol"])
    info = await store.get_session("r:1")
    assert info["owners"] == ["carol"] and info["kind"] == "group" and info["lastSeq"] == 0
    await expect_error(store.create_session("alice", ["dave"], "r:1"), "conflict")
    sid, members = await store.create_session("alice", ["bob"])
    assert sid and members == ["alice", "bob"]
    assert (await store.get_session(sid))["owners"] == ["alice"]
    for bad_id in ["", "x" * 129, "has space", "sémi", "a\x00"]:
        await expect_error(store.create_session("alice", ["bob"], bad_id), "bad_request")
    await expect_error(store.create_session("alice", ["b b"], "r2"), "bad_request")
    await expect_error(store.create_session("alice", ["bob"], "r2", kind="channel"), "bad_request")
    await expect_error(store.create_session("alice", ["bob"], "r2", kind="p2p"), "bad_request")
    await expect_error(store.create_session("alice", [f"u{i}" for i in range(GROUP_CAP)], "r3"), "too_large")
    assert (await store.create_session("alice", [f"u{i}" for i in range(GROUP_CAP - 1)], "r3"))[0] == "r3"
    # p2p: ids only as the canonical id of the creator and one other member
    await expect_error(store.create_session("alice", ["bob"], "p2p:bob:alice"), "bad_request")
    await expect_error(store.create_session("alice", ["bob", "carol"], "p2p:alice:bob"), "bad_request")
    await expect_error(store.create_session("carol", ["bob"], "p2p:alice:bob"), "bad_request")
    await expect_error(store.create_session("alice", ["bob"], "p2p:x"), "bad_request")
    assert await store.create_session("bob", ["alice"], "p2p:alice:bob") == ("p2p:alice:bob", ["alice", "bob"])
    assert (await store.get_session("p2p:alice:bob"))["kind"] == "p2p"
    await expect_error(store.create_session("alice", ["bob"], "p2p:alice:bob"), "conflict")
    assert await store.create_session("carol", ["alice"], kind="p2p") == ("p2p:alice:carol", ["alice", "carol"])
    # the admin creates sessions it is not in
    assert await store.create_session(None, ["erin"], "adm") == ("adm", ["erin"])
    assert (await store.get_session("adm"))["owners"] == []
    await expect_error(store.create_session(None, [], "adm2"), "bad_request")


@pytest_twisted.ensureDeferred
async def test_add_remove_members(store):
    """Members would not change, or a p2p session could gain a third user."""
    await group(store)
    assert await store.add_remove_members("g1", add=["dave", "erin"], remove=["carol"]) == [
        "alice", "bob", "dave", "erin"]
    [r] = await store.store_messages([msg("alice", "a1", "g1")])
    assert r.recipients == ["bob", "dave", "erin"]
    [r] = await store.store_messages([msg("carol", "c1", "g1")])
    assert r.code == "not_member"
    assert await store.add_remove_members("g1", remove=["nobody"]) == ["alice", "bob", "dave", "erin"]
    await expect_error(store.add_remove_members("g1", add=["x"], remove=["x"]), "bad_request")
    await expect_error(store.add_remove_members("g1", add=["x y"]), "bad_request")
    await expect_error(store.add_remove_members("g1", add=[f"u{i}" for i in range(GROUP_CAP)]), "too_large")
    assert len((await store.get_session("g1"))["members"]) == 4  # the refused change left nothing behind
    await expect_error(store.add_remove_members("nope", add=["x"]), "no_session")
    await store.store_messages([msg("alice", "p1", "p2p:alice:bob")])
    await expect_error(store.add_remove_members("p2p:alice:bob", add=["carol"]), "bad_request")


@pytest_twisted.ensureDeferred
async def test_session_members_and_get_session(store):
    """Routing would look up the wrong members."""
    await group(store)
    await store.create_session("dave", ["erin"], "g2")
    assert await store.session_members(["g1", "g2", "nope", "bad id"]) == {
        "g1": ["alice", "bob", "carol"], "g2": ["dave", "erin"]}
    assert await store.session_members([]) == {}
    await expect_error(store.get_session("nope"), "no_session")


# --- events in the session's order (PROTOCOL.md 1.1) ------------------------------------------

from imcluster.store import Event  # noqa: E402


def recall(sender, msg_id, ts=TS + 1000, window=120.0, **kw):
    return Event("recall", sender, f"recall:{msg_id}", ref=msg_id, ts_ms=ts, window=window, **kw)


def edit(sender, msg_id, body, key="e1", ts=TS + 1000, window=86400.0, **kw):
    return Event("edit", sender, key, ref=msg_id, body=body, ts_ms=ts, window=window, **kw)


@pytest_twisted.ensureDeferred
async def test_recall_is_the_next_entry_and_the_original_shows_it(store):
    """A recall would not take the next seq, reach the members, or leave the original's body readable."""
    await group(store)
    [m] = await store.store_messages([msg("alice", "a1", "g1")])
    stored, members = await store.store_event(recall("alice", m.msg_id))
    assert (stored.seq, stored.kind, stored.ref, stored.body) == (2, "recall", m.msg_id, None)
    assert stored.recipients == ["bob", "carol"] and members == ["alice", "bob", "carol"]
    page = await store.history("bob", "g1")
    assert page[0]["msgId"] == m.msg_id and page[0]["recalled"] is True and page[0]["body"] is None
    assert page[1]["kind"] == "recall" and page[1]["ref"] == m.msg_id and page[1]["seq"] == 2
    # the same recall again: the first one (a window run again stores nothing twice)
    again, _ = await store.store_event(recall("alice", m.msg_id))
    assert again.duplicate and again.msg_id == stored.msg_id
    # synced like a message, with its kind
    sync = await store.undelivered_page("bob", None, 10)
    assert [(e["seq"], e.get("kind")) for e in sync] == [(1, None), (2, "recall")]
    [next_one] = await store.store_messages([msg("bob", "b1", "g1")])
    assert next_one.seq == 3


@pytest_twisted.ensureDeferred
async def test_recall_and_edit_refusals(store):
    """Someone else, a late sender, an event, an unknown id or an outsider could change a message."""
    await group(store)
    await store.create_session("dave", [], "g2")
    [m] = await store.store_messages([msg("alice", "a1", "g1")])
    await expect_error(store.store_event(recall("bob", m.msg_id)), "not_allowed")
    await expect_error(store.store_event(recall("alice", m.msg_id, ts=TS + 121000)), "not_allowed")
    await expect_error(store.store_event(edit("bob", m.msg_id, "x")), "not_allowed")
    await expect_error(store.store_event(edit("alice", m.msg_id, "x", ts=TS + 86401000)), "not_allowed")
    await expect_error(store.store_event(recall("alice", "999999999")), "no_message")
    await expect_error(store.store_event(recall("alice", "junk")), "no_message")
    await expect_error(store.store_event(recall("dave", m.msg_id)), "no_message")
    await expect_error(store.store_event(Event("recall", "alice", "r:x", session_id="g2", ref=m.msg_id)),
                       "no_message")
    ev, _ = await store.store_event(edit("alice", m.msg_id, "fixed"))
    await expect_error(store.store_event(recall("alice", ev.msg_id)), "not_allowed")
    await expect_error(store.store_event(edit("alice", ev.msg_id, "y", key="e2")), "not_allowed")
    # the admin (trusted) recalls any message at any time
    admin, _ = await store.store_event(recall("system", m.msg_id, ts=TS + 10**9, window=None, trusted=True))
    assert admin.seq == 3
    await expect_error(store.store_event(edit("alice", m.msg_id, "z", key="e3")), "not_allowed")


@pytest_twisted.ensureDeferred
async def test_edit_shows_the_latest_body_and_events_are_not_unread(store):
    """History would show the first body, or the unread badge would count recalls, edits and joins."""
    await group(store)
    [m] = await store.store_messages([msg("alice", "a1", "g1")])
    await store.store_event(edit("alice", m.msg_id, {"text": "v2"}, key="e1"))
    await store.store_event(edit("alice", m.msg_id, {"text": "v3"}, key="e2"))
    page = await store.history("carol", "g1")
    assert page[0]["body"] == {"text": "v3"} and page[0]["edited"] is True
    assert [e.get("kind") for e in page] == [None, "edit", "edit"] and page[2]["body"] == {"text": "v3"}
    listing = {s["sessionId"]: s for s in await store.user_sessions("bob")}
    assert listing["g1"]["unread"] == 1 and listing["g1"]["lastSeq"] == 3


@pytest_twisted.ensureDeferred
async def test_members_event_reaches_the_removed_member_last(store):
    """A removed member would miss its removal, or keep getting the session's messages after it."""
    await group(store)
    [before] = await store.store_messages([msg("alice", "a1", "g1")])
    stored, members = await store.store_event(
        Event("members", "alice", "m1", session_id="g1", add=("dave",), remove=("bob",), ts_ms=TS))
    assert stored.kind == "members" and stored.body == {"added": ["dave"], "removed": ["bob"]}
    assert stored.seq == 2 and stored.recipients == ["bob", "carol", "dave"]
    assert members == ["alice", "carol", "dave"]
    [after] = await store.store_messages([msg("carol", "c1", "g1")])
    assert after.recipients == ["alice", "dave"]
    sync = await store.undelivered_page("bob", None, 10)
    assert [e["seq"] for e in sync] == [1, 2] and sync[-1]["kind"] == "members"
    nothing, members = await store.store_event(Event("members", "alice", "m2", session_id="g1", add=("dave",)))
    assert nothing is None and members == ["alice", "carol", "dave"]
    await expect_error(store.store_event(Event("members", "alice", "m3", session_id="nope", add=("x",))),
                       "no_session")


@pytest_twisted.ensureDeferred
async def test_session_created_with_its_members_event(store):
    """The members of a new group would not learn of it: no event at seq 1."""
    sid, members, stored = await store.create_session_with_event("alice", ["bob", "carol"], "g9", ts_ms=TS)
    assert (sid, members) == ("g9", ["alice", "bob", "carol"])
    assert stored.seq == 1 and stored.kind == "members" and stored.recipients == ["bob", "carol"]
    assert stored.body == {"added": ["alice", "bob", "carol"], "removed": []}
    assert (await store.get_session("g9"))["lastSeq"] == 1
    [m] = await store.store_messages([msg("bob", "b1", "g9")])
    assert m.seq == 2
    await expect_error(store.create_session_with_event("alice", [], "g9"), "conflict")


@pytest_twisted.ensureDeferred
async def test_delivered_flag_and_receipts_in_p2p(store):
    """The sender would never learn that the other phone got its 1:1 message."""
    sid = "p2p:alice:bob"
    [m1, m2] = await store.store_messages([msg("alice", "a1", sid), msg("alice", "a2", sid)])
    [g] = await store.store_messages([msg("bob", "b1", sid)])
    page = await store.history("alice", sid)
    assert [e.get("delivered") for e in page] == [False, False, None]
    count, receipts = await store.mark_delivered_receipts([("bob", [m1.msg_id])])
    assert count == 1 and receipts == [{"sessionId": sid, "userId": "bob", "msgIds": [m1.msg_id]}]
    page = await store.history("alice", sid)
    assert [e.get("delivered") for e in page] == [True, False, None]
    assert [e.get("delivered") for e in await store.history("bob", sid)] == [None, None, False]
    assert await store.mark_delivered_receipts([("bob", [m1.msg_id])]) == (0, [])
    await group(store)
    [gm] = await store.store_messages([msg("alice", "x1", "g1")])
    assert await store.mark_delivered_receipts([("bob", [gm.msg_id])]) == (1, [])  # groups: no receipt
    assert "delivered" not in (await store.history("alice", "g1"))[0]


@pytest_twisted.ensureDeferred
async def test_read_cursors_of_every_member(store):
    """GET /v1/sessions/{id}/read would miss members or show stale cursors."""
    await group(store)
    await store.store_messages([msg("alice", "a1", "g1"), msg("alice", "a2", "g1")])
    await store.read("bob", "g1", 2)
    assert await store.read_cursors("g1") == [
        {"userId": "alice", "seq": 0}, {"userId": "bob", "seq": 2}, {"userId": "carol", "seq": 0}]
    assert await store.read_cursors("p2p:x:y") == [{"userId": "x", "seq": 0}, {"userId": "y", "seq": 0}]
    await expect_error(store.read_cursors("nope"), "no_session")

"""The Python client against a real cluster: real ``twistd`` gateways and a processor.

The conversation goes on while gateways die (SIGKILL) and stop (SIGTERM):
every message is stored once, answered once, and handled once by its
recipient, in ``seq`` order.
"""

from __future__ import annotations

import time

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

from imcluster.client import Client, ClientError, SendError, is_event, p2p_session_id
from imcluster.protocol import CLIENT_TYPES
from tests.support.postgres import admin_connection

pytestmark = pytest.mark.slow

WAIT = 30.0


async def sleep(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


async def eventually(check, timeout: float = WAIT, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s (last: {value!r})")
        await sleep(0.05)


def within(d: defer.Deferred, seconds: float = WAIT) -> defer.Deferred:
    """``d``, failing with a TimeoutError after ``seconds`` (a test never hangs)."""
    return d.addTimeout(seconds, reactor)


def stored_count(schema: str, session_id: str) -> int:
    conn = admin_connection()
    try:
        cur = conn.cursor()
        cur.execute(f'SET search_path TO "{schema}"')
        cur.execute("SELECT count(*), count(DISTINCT seq) FROM messagerecv WHERE session_id = %s",
                    (session_id,))
        total, distinct = cur.fetchone()
        assert total == distinct
        return total
    finally:
        conn.close()


class Inbox:
    """What one user's on_message handler saw."""

    def __init__(self) -> None:
        self.frames: list[dict] = []

    def __call__(self, frame: dict) -> None:
        self.frames.append(frame)

    def texts_from(self, sender: str) -> list[str]:
        return [f["body"]["text"] for f in self.frames if f["from"] == sender]


def make_client(urls, cluster, user, inbox, **kw) -> Client:
    # fast retries and pings: a dead gateway is noticed and left within the test's time
    return Client(urls, get_token=lambda: cluster.token(user), on_message=inbox, device=f"test-{user}",
                  retry_initial=0.2, retry_max=2.0, ping_interval=1.0, ping_timeout=2.0, **kw)


@pytest_twisted.ensureDeferred
async def test_conversation_survives_gateway_kill_and_stop(cluster):
    """A user whose gateway dies mid-conversation would lose, duplicate or reorder messages."""
    gw1, gw2, _ = await defer.gatherResults(
        [cluster.start_gateway(), cluster.start_gateway(), cluster.start_processor()])
    a_inbox, b_inbox = Inbox(), Inbox()
    # alice on gw1 over raw TCP, bob on gw2 over WebSocket; each lists the other gateway as fallback
    alice = make_client([f"tcp://127.0.0.1:{gw1.tcp_port}", gw2.ws_url], cluster, "alice", a_inbox)
    bob = make_client([gw2.ws_url, f"tcp://127.0.0.1:{gw1.tcp_port}"], cluster, "bob", b_inbox)
    session = p2p_session_id("alice", "bob")
    try:
        first = await within(alice.start())
        assert first["serverId"] != (await within(bob.start()))["serverId"]

        sends: list[defer.Deferred] = []
        n = 60
        for i in range(n):
            sends.append(alice.send(session, {"text": f"a{i}"}))
            sends.append(bob.send(session, {"text": f"b{i}"}))
            if i == n // 3:
                # alice's gateway crashes with messages, replies and deliveries in flight
                await eventually(lambda: len(b_inbox.frames) >= 5, what="bob received some of alice's")
                burst = [alice.send(session, {"text": f"a{i}.{j}"}) for j in range(10)]
                sends += burst
                await sleep(0.005)
                unanswered = sum(1 for d in burst if not d.called)
                await gw1.kill()
            await sleep(0.01)
        replies = await within(defer.gatherResults(sends))
        assert unanswered > 0, "the kill came too late to test resending"
        assert alice.connections == 2 and alice.url == gw2.ws_url

        # then bob's gateway stops cleanly: bob skips the dead gateway and lands on a new one
        gw3 = await cluster.start_gateway()
        bob.urls.append(gw3.ws_url)
        alice.urls.append(f"tcp://127.0.0.1:{gw3.tcp_port}")
        await gw2.stop()
        late = [alice.send(session, {"text": "a-late"}), bob.send(session, {"text": "b-late"})]
        replies += await within(defer.gatherResults(late))

        seqs = sorted(r["seq"] for r in replies)
        total = 2 * n + 10 + 2
        assert seqs == list(range(1, total + 1)), "every message stored once, seq without gaps"
        want_a = [f"a{i}" for i in range(n)] + ["a-late"]
        k = n // 3
        want_a[k + 1:k + 1] = [f"a{k}.{j}" for j in range(10)]
        want_b = [f"b{i}" for i in range(n)] + ["b-late"]
        await eventually(lambda: len(b_inbox.frames) >= n + 11 and len(a_inbox.frames) >= n + 1,
                         what="every message handled")
        await sleep(0.5)  # a late duplicate would show now
        assert b_inbox.texts_from("alice") == want_a, "bob handles alice's messages once, in order"
        assert a_inbox.texts_from("bob") == want_b, "alice handles bob's messages once, in order"
        assert [f["seq"] for f in b_inbox.frames] == sorted(f["seq"] for f in b_inbox.frames)
        assert stored_count(cluster.pg_schema, session) == total
        page = await within(bob.history(session, limit=200))
        assert [m["seq"] for m in page] == list(range(1, total + 1))
    finally:
        await within(defer.gatherResults([alice.stop(), bob.stop()]))


@pytest_twisted.ensureDeferred
async def test_errors_history_read_and_sessions(cluster):
    """An application would wait forever on a refused send, or miss read receipts and new groups."""
    gw, _ = await defer.gatherResults([cluster.start_gateway(), cluster.start_processor()])
    receipts: list[dict] = []
    carol_inbox = Inbox()
    alice = Client(gw.ws_url, cluster.token("alice"))
    carol = Client(f"tcp://127.0.0.1:{gw.tcp_port}", cluster.token("carol"), on_message=carol_inbox,
                   on_read_receipt=receipts.append)
    try:
        await within(defer.gatherResults([alice.start(), carol.start()]))
        with pytest.raises(SendError) as e:
            await within(alice.send(p2p_session_id("bob", "carol"), {"text": "not mine"}))
        assert e.value.code == "not_member"
        created = await within(alice.create_session(["carol"]))
        group = created["sessionId"]
        assert created["members"] == ["alice", "carol"]
        reply = await within(alice.send(group, {"text": "hello group"}))
        # a version 1.1 server also stores (and delivers) the group's members event first
        messages = lambda: [f for f in carol_inbox.frames if not is_event(f)]  # noqa: E731
        await eventually(messages, what="carol got the group message")
        assert messages()[0]["msgId"] == reply["msgId"]
        assert all(f.get("kind") == "members" for f in carol_inbox.frames if is_event(f))
        alice.read(group, reply["seq"])
        await eventually(lambda: receipts, what="carol got alice's read receipt")
        assert receipts[0] == {"type": "read_receipt", "sessionId": group, "userId": "alice",
                               "seq": reply["seq"]}
        with pytest.raises(Exception) as e:
            await within(carol.history("no-such-session"))
        assert getattr(e.value, "code", None) == "no_session"
    finally:
        await within(defer.gatherResults([alice.stop(), carol.stop()]))


@pytest_twisted.ensureDeferred
async def test_long_polling_client_chats_with_a_websocket_client(cluster):
    """A Python client on the HTTP streaming endpoint (long polling) could not chat, sync or reconnect."""
    gw1, gw2, _ = await defer.gatherResults(
        [cluster.start_gateway(), cluster.start_gateway(), cluster.start_processor()])
    a_inbox, b_inbox = Inbox(), Inbox()
    stream_url = f"http://127.0.0.1:{gw1.stream_port}"
    alice = make_client(stream_url, cluster, "alice", a_inbox)
    bob = make_client(gw2.ws_url, cluster, "bob", b_inbox)
    session = p2p_session_id("alice", "bob")
    try:
        reply = await within(alice.start())
        assert alice.url == stream_url and "stream" not in reply
        await within(bob.start())
        # both ways, in order, once each
        sends = []
        for i in range(20):
            sends.append(alice.send(session, {"text": f"a{i}"}))
            sends.append(bob.send(session, {"text": f"b{i}"}))
        await within(defer.gatherResults(sends))
        await eventually(lambda: len(a_inbox.frames) >= 20 and len(b_inbox.frames) >= 20, what="both ways")
        assert b_inbox.texts_from("alice") == [f"a{i}" for i in range(20)]
        assert a_inbox.texts_from("bob") == [f"b{i}" for i in range(20)]

        # alice goes away; bob writes; alice's next connection (a "reload") gets it by sync
        await within(alice.stop())
        missed = await within(bob.send(session, {"text": "while you were away"}))
        a_inbox2 = Inbox()
        alice = make_client(stream_url, cluster, "alice", a_inbox2)
        await within(alice.start())
        await eventually(lambda: a_inbox2.frames, what="the missed message, by sync")
        assert [f["msgId"] for f in a_inbox2.frames] == [missed["msgId"]]
        page = await within(alice.history(session, limit=100))
        assert len(page) == 41
        alice.read(session, page[-1]["seq"])
        back = await within(alice.send(session, {"text": "back"}))
        await eventually(lambda: "back" in b_inbox.texts_from("alice"), what="bob got alice's answer")
        assert back["seq"] == 42
    finally:
        await within(defer.gatherResults([alice.stop(), bob.stop()]))


#: typing and live presence (PROTOCOL.md 1.1) are in the tree: their steps run
LIVE = {"typing", "presence_subscribe"} <= CLIENT_TYPES


@pytest.mark.skipif("recall" not in CLIENT_TYPES, reason="the server side of PROTOCOL.md 1.1 is not in this tree yet")
@pytest_twisted.ensureDeferred
async def test_version_1_1_features_between_two_gateways(cluster):
    """The Python client would miss what version 1.1 adds: recall and edit (also in history), typing,
    live presence across gateways, delivery receipts and the delivered flag, and a too large frame
    would close its connection instead of failing alone."""
    gw1, gw2, _ = await defer.gatherResults(
        [cluster.start_gateway(), cluster.start_gateway(), cluster.start_processor()])
    session = p2p_session_id("alice", "bob")
    a_in, b_in = Inbox(), Inbox()
    a_presence, a_typing, a_delivered = [], [], []
    alice = make_client([gw1.ws_url], cluster, "alice", a_in, on_presence=a_presence.append,
                        on_typing=a_typing.append, on_delivery_receipt=a_delivered.append)
    bob = make_client([f"tcp://127.0.0.1:{gw2.tcp_port}"], cluster, "bob", b_in)
    try:
        await within(alice.start())
        if LIVE:
            reply = await within(alice.subscribe_presence(["bob"]))
            assert reply["users"][0]["online"] is False
        await within(bob.start())
        if LIVE:
            await eventually(lambda: alice.presence.get("bob", {}).get("online") is True, 6.0, "bob online")

        sent = await within(alice.send(session, {"text": "meet at 10"}))
        await eventually(lambda: b_in.frames, what="bob received")
        await eventually(lambda: a_delivered, 10.0, "a delivery receipt")
        assert sent["msgId"] in a_delivered[0]["msgIds"] and a_delivered[0]["userId"] == "bob"
        page = await within(alice.history(session))
        assert page[-1]["delivered"] is True

        if LIVE:
            assert bob.typing(session) is True and bob.typing(session) is False  # throttled
            await eventually(lambda: a_typing, 5.0, "typing forwarded")
            assert a_typing[0]["userId"] == "bob" and a_typing[0]["sessionId"] == session

        edited = await within(alice.edit(sent["msgId"], {"text": "meet at 11"}))
        oops = await within(alice.send(session, {"text": "wrong chat"}))
        recalled = await within(alice.recall(oops["msgId"]))
        assert recalled["seq"] > edited["seq"] > sent["seq"]
        await eventually(lambda: len(b_in.frames) == 4, what="bob got the events")
        kinds = [(f.get("kind"), f.get("ref")) for f in b_in.frames]
        assert kinds == [(None, None), ("edit", sent["msgId"]), (None, None), ("recall", oops["msgId"])]
        page = {m["msgId"]: m for m in await within(bob.history(session))}
        assert page[sent["msgId"]]["body"] == {"text": "meet at 11"} and page[sent["msgId"]]["edited"] is True
        assert page[oops["msgId"]]["recalled"] is True and page[oops["msgId"]]["body"] is None
        try:
            await within(bob.recall(sent["msgId"]))
            raise AssertionError("bob recalled alice's message")
        except ClientError as e:
            assert e.code == "not_allowed"

        try:
            await within(alice.send(session, {"text": "x" * 70_000}))
            raise AssertionError("a 70,000-character message was sent")
        except SendError as e:
            assert e.code == "too_large"
        after = await within(alice.send(session, {"text": "still connected"}))
        assert after["seq"] == recalled["seq"] + 1 and alice.connections == 1

        await within(bob.stop())
        if LIVE:
            await eventually(lambda: alice.presence["bob"]["online"] is False, 6.0, "bob offline")
            assert [p["online"] for p in a_presence] == [False, True, False]
    finally:
        await within(defer.gatherResults([alice.stop(), bob.stop()]))

"""The client over real sockets (WebSocket, raw TCP, both with TLS) against the in-process FakeServer."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

from imcluster.client import Client, p2p_session_id
from imcluster.client.testing import FakeServer
from imcluster.testing import self_signed_cert

WAIT = 10.0
SESSION = p2p_session_id("alice", "bob")


async def sleep(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


def within(d: defer.Deferred, seconds: float = WAIT) -> defer.Deferred:
    return d.addTimeout(seconds, reactor)


async def eventually(check, what: str, timeout: float = WAIT):
    deadline = reactor.seconds() + timeout
    while not check():
        if reactor.seconds() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        await sleep(0.01)


@pytest.fixture
def server():
    s = FakeServer()
    yield s
    pytest_twisted.blockon(defer.ensureDeferred(s.stop()))


def client(server, urls, user, inbox=None, **kw) -> Client:
    kw.setdefault("retry_initial", 0.05)
    kw.setdefault("retry_max", 0.5)
    return Client(urls, get_token=lambda: server.token(user),
                  on_message=inbox.append if inbox is not None else None, **kw)


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
@pytest_twisted.ensureDeferred
async def test_websocket_and_tcp_talk(server, tmp_path, tls):
    """A WebSocket user and a raw TCP user (with TLS: wss and tcps) could not talk to each other."""
    trust = None
    if tls:
        cert, key, trust = self_signed_cert(tmp_path)
        ep = f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"
        ws, tcp = await server.listen("ws", ep), await server.listen("tcp", ep)
        ws_url, tcp_url = f"wss://127.0.0.1:{ws}/ws", f"tcps://127.0.0.1:{tcp}"
    else:
        ws, tcp = await server.listen("ws"), await server.listen("tcp")
        ws_url, tcp_url = f"ws://127.0.0.1:{ws}/ws", f"tcp://127.0.0.1:{tcp}"
    a_in, b_in = [], []
    alice = client(server, ws_url, "alice", a_in, tls_trust=trust)
    bob = client(server, tcp_url, "bob", b_in, tls_trust=trust)
    try:
        await within(defer.gatherResults([alice.start(), bob.start()]))
        r1 = await within(alice.send(SESSION, {"text": "über ✓"}))
        r2 = await within(bob.send(SESSION, {"text": "back"}))
        assert (r1["seq"], r2["seq"]) == (1, 2)
        await eventually(lambda: a_in and b_in, "both received")
        assert b_in[0]["body"] == {"text": "über ✓"} and a_in[0]["body"] == {"text": "back"}
        page = await within(alice.history(SESSION))
        assert [m["seq"] for m in page] == [1, 2]
    finally:
        await within(defer.gatherResults([alice.stop(), bob.stop()]))


@pytest_twisted.ensureDeferred
async def test_tls_with_untrusted_certificate_never_connects(server, tmp_path):
    """A client that accepted any certificate would hand its token to an impostor."""
    cert, key, _ = self_signed_cert(tmp_path)
    port = await server.listen("tcp", f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}")
    alice = client(server, f"tcps://127.0.0.1:{port}", "alice")
    try:
        started = alice.start()
        await sleep(0.5)
        assert not started.called and server.hub.auths == []
    finally:
        await within(alice.stop())
    started.addErrback(lambda f: None)


@pytest_twisted.ensureDeferred
async def test_lost_reply_is_resent_and_not_duplicated(server):
    """A reply lost with its gateway would make the client store (and the peer see) the message twice."""
    tcp, ws = await server.listen("tcp"), await server.listen("ws")
    b_in = []
    alice = client(server, [f"tcp://127.0.0.1:{tcp}", f"ws://127.0.0.1:{ws}/ws"], "alice")
    bob = client(server, f"ws://127.0.0.1:{ws}/ws", "bob", b_in)
    try:
        await within(defer.gatherResults([alice.start(), bob.start()]))
        server.hub.hold_replies = True
        d = alice.send(SESSION, {"text": "once"})
        await eventually(lambda: b_in, "bob got it live")
        assert not d.called
        server.hub.hold_replies = False
        for conn in server.open_connections():
            if conn.user_id == "alice":
                conn._adapter.transport.abortConnection()
        reply = await within(d)
        assert reply["msgId"] == b_in[0]["msgId"] and reply["seq"] == 1
        assert alice.connections == 2 and alice.url.startswith("ws://")
        await sleep(0.2)
        assert len(b_in) == 1
        assert sum(1 for _, f in server.hub.frames if f["type"] == "message") == 2
    finally:
        await within(defer.gatherResults([alice.stop(), bob.stop()]))


@pytest_twisted.ensureDeferred
async def test_offline_messages_arrive_with_sync_and_duplicates_are_dropped(server):
    """Messages sent while a user was offline would be lost, or shown twice after a reconnect."""
    ws = await server.listen("ws")
    url = f"ws://127.0.0.1:{ws}/ws"
    alice = client(server, url, "alice")
    b_in, synced = [], []
    bob = client(server, url, "bob", b_in, on_sync_done=synced.append)
    try:
        await within(alice.start())
        for i in range(3):
            await within(alice.send(SESSION, {"n": i}))
        await within(bob.start())
        await eventually(lambda: len(b_in) == 3, "the sync")
        assert synced == [3]
        # the server forgets bob's acknowledgements: the next sync repeats everything
        first_acks = [f for u, f in server.hub.frames if u == "bob" and f["type"] == "message_send_reply"]
        assert sorted(sum((f["msgIds"] for f in first_acks), [])) == sorted(f["msgId"] for f in b_in)
        server.hub.undelivered["bob"] = {f["msgId"]: dict(f) for f in b_in}
        for conn in server.open_connections():
            if conn.user_id == "bob":
                conn._adapter.transport.abortConnection()
        await eventually(lambda: len(synced) == 2, "the second sync")
        await eventually(lambda: server.hub.undelivered["bob"] == {}, "duplicates acknowledged again")
        assert [f["body"]["n"] for f in b_in] == [0, 1, 2]
    finally:
        await within(defer.gatherResults([alice.stop(), bob.stop()]))


@pytest_twisted.ensureDeferred
async def test_going_away_moves_client_to_other_gateway(server):
    """Clients of a gateway that stops would sit in backoff instead of moving at once."""
    tcp, ws = await server.listen("tcp"), await server.listen("ws")
    # going away: within going_away_spread (jitter), not after a backoff of retry_initial
    alice = client(server, [f"tcp://127.0.0.1:{tcp}", f"ws://127.0.0.1:{ws}/ws"], "alice", retry_initial=5.0,
                   going_away_spread=1.0)
    try:
        await within(alice.start())
        server.going_away()
        await eventually(lambda: alice.connections == 2, "reconnected", timeout=2.0)
        assert alice.url.startswith("ws://")
        assert (await within(alice.send(SESSION, 1)))["seq"] == 1
    finally:
        await within(alice.stop())


@pytest_twisted.ensureDeferred
async def test_unavailable_is_retried_until_stored(server):
    """A processor outage would fail sends that a retry a moment later would store."""
    ws = await server.listen("ws")
    alice = client(server, f"ws://127.0.0.1:{ws}/ws", "alice")
    try:
        await within(alice.start())
        server.hub.unavailable = True
        d = alice.send(SESSION, 1)
        h = alice.history(SESSION)
        await sleep(0.3)
        assert not d.called and not h.called
        server.hub.unavailable = False
        assert (await within(d))["seq"] == 1
        assert [m["seq"] for m in await within(h)] == [1]
    finally:
        await within(alice.stop())

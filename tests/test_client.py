"""Client core rules on fake links and a fake clock (no sockets): PROTOCOL.md as an application sees it."""

from __future__ import annotations

import time

import pytest
from twisted.internet import defer, task

from imcluster.auth import mint_token
from imcluster.client import AuthFailed, Client, ClientError, ClientStopped, Disconnected, SendError
from imcluster.client.core import READY, STOPPED, WAITING

SECRET = "unit-test-secret-0123456789abcdef"
URLS = ["ws://gw1.test/ws", "tcp://gw2.test:8081"]
SESSION = "p2p:alice:bob"


class FakeLink:
    """A connection as the client core sees it; the test plays the gateway."""

    def __init__(self, url, handler):
        self.url = url
        self.handler = handler
        self.sent: list[dict] = []
        self.lost = False
        self.aborted = False

    def send(self, frame):
        assert not self.lost, f"sent on a lost link: {frame}"
        self.sent.append(frame)

    def close(self):
        self.lose(1000, "closed by client")

    def abort(self):
        self.aborted = True
        self.lose(None, "aborted")

    def lose(self, code=None, reason="gone"):
        if not self.lost:
            self.lost = True
            self.handler.link_lost(self, code, reason)

    def receive(self, frame):
        self.handler.frame_received(self, frame)

    def of_type(self, kind):
        return [f for f in self.sent if f["type"] == kind]

    def auth_ok(self, user="alice"):
        assert self.sent and self.sent[0]["type"] == "auth"
        self.receive({"type": "auth_reply", "ok": True, "userId": user, "connId": f"gw##{id(self)}",
                      "serverId": "gw"})

    def reply_ok(self, frame, seq, msg_id=None):
        self.receive({"type": "message_reply", "ok": True, "clientMsgId": frame["clientMsgId"],
                      "msgId": msg_id or f"m{seq}", "sessionId": frame["sessionId"], "seq": seq, "ts": 1})


class FakeConnector:
    """Records connection attempts; the test decides how each ends."""

    def __init__(self):
        self.attempts: list[tuple[str, defer.Deferred, object]] = []
        self.links: list[FakeLink] = []

    def __call__(self, url, handler):
        d = defer.Deferred()
        self.attempts.append((url, d, handler))
        return d

    def succeed(self) -> FakeLink:
        url, d, handler = self.attempts[-1]
        link = FakeLink(url, handler)
        self.links.append(link)
        d.callback(link)
        return link

    def fail(self):
        self.attempts[-1][1].errback(ConnectionRefusedError("refused"))


def make(clock=None, **kw):
    clock = clock or task.Clock()
    connector = FakeConnector()
    kw.setdefault("token", mint_token(SECRET, "alice", 3600))
    client = Client(URLS, reactor=clock, connector=connector, **kw)
    return client, clock, connector


def connect_only(clock, connector) -> FakeLink:
    """Run timers until the next attempt starts and let it connect."""
    before = len(connector.attempts)
    for _ in range(600):
        clock.advance(0.1)
        if len(connector.attempts) > before:
            break
    return connector.succeed()


def connect(client, clock, connector, user="alice") -> FakeLink:
    """Run timers until the next attempt starts, let it connect, and authenticate it."""
    link = connect_only(clock, connector)
    link.auth_ok(user)
    return link


def no_timers_left(clock):
    return [c for c in clock.getDelayedCalls() if c.active()] == []


def test_auth_then_ready():
    """A client that does not send its token (or device) first could never authenticate."""
    states = []
    client, clock, connector = make(device="phone", on_state=states.append)
    started = client.start()
    clock.advance(0)
    link = connector.succeed()
    assert link.sent == [{"type": "auth", "token": client._token, "device": "phone"}]
    assert not started.called
    link.auth_ok()
    assert started.result["userId"] == "alice" and client.user_id == "alice"
    assert states == ["connecting", "authenticating", "ready"]
    assert connector.attempts[0][0] == URLS[0]


def test_send_waits_for_auth_and_fires_with_reply():
    """Messages sent before the connection is ready would be lost or sent unauthenticated."""
    client, clock, connector = make()
    client.start()
    d = client.send(SESSION, {"text": "hi"}, client_msg_id="c1")
    clock.advance(0)
    link = connector.succeed()
    assert link.of_type("message") == []
    link.auth_ok()
    [frame] = link.of_type("message")
    assert frame == {"type": "message", "clientMsgId": "c1", "sessionId": SESSION, "body": {"text": "hi"}}
    link.reply_ok(frame, 1)
    assert d.result["seq"] == 1 and d.result["msgId"] == "m1"


def test_unanswered_messages_are_resent_in_order_with_same_ids_on_next_gateway():
    """A gateway dying before it answered would lose messages, or store them twice under new ids."""
    client, clock, connector = make()
    client.start()
    link = connect(client, clock, connector)
    ds = [client.send(SESSION, {"n": i}) for i in range(5)]
    sent = link.of_type("message")
    link.reply_ok(sent[0], 1)
    link.lose(None, "connection lost")
    assert client.state == WAITING
    clock.advance(client.retry_initial)  # a lost ready connection is replaced quickly
    link2 = connector.succeed()
    assert link2.url == URLS[1], "the next gateway of the list"
    link2.auth_ok()
    resent = link2.of_type("message")
    assert [f["clientMsgId"] for f in resent] == [f["clientMsgId"] for f in sent[1:]]
    for i, f in enumerate(resent):
        link2.reply_ok(f, i + 2)
    assert [d.result["seq"] for d in ds] == [1, 2, 3, 4, 5]


def test_in_flight_window():
    """An unbounded burst would trip the gateway's rate limit instead of queueing locally."""
    client, clock, connector = make(max_in_flight=2)
    client.start()
    link = connect(client, clock, connector)
    for i in range(5):
        client.send(SESSION, i)
    assert len(link.of_type("message")) == 2
    link.reply_ok(link.of_type("message")[0], 1)
    assert len(link.of_type("message")) == 3


def test_retryable_and_final_errors():
    """'unavailable' must be retried with the same clientMsgId; 'not_member' must fail the call."""
    client, clock, connector = make()
    client.start()
    link = connect(client, clock, connector)
    d1 = client.send(SESSION, 1, client_msg_id="c1")
    d2 = client.send("other", 2, client_msg_id="c2")
    link.receive({"type": "message_reply", "ok": False, "clientMsgId": "c1",
                  "error": {"code": "unavailable", "message": "later"}})
    link.receive({"type": "message_reply", "ok": False, "clientMsgId": "c2",
                  "error": {"code": "not_member", "message": "no"}})
    failure = []
    d2.addErrback(failure.append)
    assert failure[0].check(SendError) and failure[0].value.code == "not_member"
    assert len(link.of_type("message")) == 2
    clock.advance(client.retry_initial)
    assert [f["clientMsgId"] for f in link.of_type("message")] == ["c1", "c2", "c1"]
    link.reply_ok(link.of_type("message")[-1], 7)
    assert d1.result["seq"] == 7


def test_error_frame_with_ref_answers_the_message():
    """A rate_limited error frame for a message would otherwise leave the send hanging."""
    client, clock, connector = make()
    client.start()
    link = connect(client, clock, connector)
    d = client.send(SESSION, 1, client_msg_id="c1")
    link.receive({"type": "error", "code": "rate_limited", "message": "slow down", "ref": "c1"})
    clock.advance(client.retry_initial)
    assert len(link.of_type("message")) == 2
    link.reply_ok(link.of_type("message")[-1], 1)
    assert d.called


def test_same_client_msg_id_twice_shares_the_reply():
    """An application retrying a send itself must not get a second message."""
    client, clock, connector = make()
    client.start()
    link = connect(client, clock, connector)
    d1 = client.send(SESSION, 1, client_msg_id="c1")
    d2 = client.send(SESSION, 1, client_msg_id="c1")
    assert len(link.of_type("message")) == 1
    link.reply_ok(link.of_type("message")[0], 3)
    assert d1.result is d2.result


def message(msg_id, seq, session=SESSION, sender="bob"):
    return {"type": "message_send", "msgId": msg_id, "sessionId": session, "seq": seq, "from": sender,
            "clientMsgId": f"c{msg_id}", "body": {"seq": seq}, "ts": 1}


def test_received_messages_handled_once_then_acknowledged_together():
    """Duplicate deliveries would show twice; an ack before handling could lose a message."""
    handled = []
    client, clock, connector = make(on_message=handled.append, sync_hold=0)
    client.start()
    link = connect(client, clock, connector)
    link.receive(message("1", 1))
    link.receive(message("2", 2))
    link.receive(message("1", 1))
    assert [f["msgId"] for f in handled] == ["1", "2"]
    assert link.of_type("message_send_reply") == []
    clock.advance(0)
    assert link.of_type("message_send_reply") == [{"type": "message_send_reply", "msgIds": ["1", "2", "1"]}]


def test_slow_handler_holds_next_message_and_its_ack():
    """A message acknowledged before the application processed it is lost if the app crashes."""
    calls = []

    def handler(frame):
        d = defer.Deferred()
        calls.append((frame["msgId"], d))
        return d

    client, clock, connector = make(on_message=handler, sync_hold=0)
    client.start()
    link = connect(client, clock, connector)
    link.receive(message("1", 1))
    link.receive(message("2", 2))
    assert [c[0] for c in calls] == ["1"]
    clock.advance(0)
    assert link.of_type("message_send_reply") == []
    calls[0][1].callback(None)
    assert [c[0] for c in calls] == ["1", "2"]
    clock.advance(0)
    assert link.of_type("message_send_reply") == [{"type": "message_send_reply", "msgIds": ["1"]}]


def test_failing_handler_leaves_message_unacknowledged():
    """A message the application failed to handle must come again, not be acknowledged."""
    attempts = []

    def handler(frame):
        attempts.append(frame["msgId"])
        if len(attempts) == 1:
            raise RuntimeError("disk full")

    client, clock, connector = make(on_message=handler, sync_hold=0)
    client.start()
    link = connect(client, clock, connector)
    link.receive(message("1", 1))
    clock.advance(0)
    assert link.of_type("message_send_reply") == []
    link.receive(message("1", 1))  # the next sync brings it again
    clock.advance(0)
    assert attempts == ["1", "1"]
    assert link.of_type("message_send_reply") == [{"type": "message_send_reply", "msgIds": ["1"]}]


def test_sync_and_live_deliveries_are_merged_in_seq_order():
    """Right after a reconnect, live messages overtaking the sync would reach the app out of order."""
    handled = []
    synced = []
    client, clock, connector = make(on_message=handled.append, on_sync_done=synced.append)
    client.start()
    link = connect(client, clock, connector)
    link.receive(message("9", 9))      # live, newer
    link.receive(message("7", 7))      # sync
    link.receive(message("8", 8))
    link.receive(message("3", 1, session="g1"))
    assert handled == []
    link.receive({"type": "sync_done", "count": 2})
    assert [(f["sessionId"], f["seq"]) for f in handled] == [("g1", 1), (SESSION, 7), (SESSION, 8), (SESSION, 9)]
    assert synced == [2]
    link.receive(message("10", 10))
    assert handled[-1]["seq"] == 10


def test_a_second_sync_done_from_a_server_resync_is_harmless():
    """A re-sync after a server-side loss would confuse a client that took sync_done for 'just connected'."""
    handled = []
    synced = []
    client, clock, connector = make(on_message=handled.append, on_sync_done=synced.append)
    client.start()
    link = connect(client, clock, connector)
    link.receive({"type": "sync_done", "count": 0})
    link.receive(message("5", 5))  # live
    link.receive(message("5", 5))  # the re-sync brings it again, with one it had missed
    link.receive(message("4", 4))
    link.receive({"type": "sync_done", "count": 2})
    clock.advance(0)
    assert [f["seq"] for f in handled] == [5, 4]  # each once, nothing held back
    assert synced == [0, 2]
    assert client.state == "ready"
    acked = [m for f in link.of_type("message_send_reply") for m in f["msgIds"]]
    assert sorted(set(acked)) == ["4", "5"]


def test_sync_hold_is_bounded():
    """A sync_done that never comes must not keep messages from the application for ever."""
    handled = []
    client, clock, connector = make(on_message=handled.append, sync_hold=5)
    client.start()
    link = connect(client, clock, connector)
    link.receive(message("1", 1))
    clock.advance(4.9)
    assert handled == []
    clock.advance(0.2)
    assert len(handled) == 1


def test_backoff_grows_rotates_urls_and_is_capped():
    """Hammering a dead gateway, or never trying the other one, keeps users offline."""
    client, clock, connector = make(retry_initial=1.0, retry_max=8.0)
    client.start()
    clock.advance(0)
    delays = []
    for _ in range(7):
        connector.fail()
        call = [c for c in clock.getDelayedCalls() if c.active()][0]
        delays.append(call.getTime() - clock.seconds())
        clock.advance(delays[-1])
    assert [url for url, _, _ in connector.attempts[:4]] == [URLS[0], URLS[1], URLS[0], URLS[1]]
    for i, delay in enumerate(delays):
        top = min(8.0, 2 ** i)
        assert top / 2 <= delay <= top
    link = connector.succeed()
    link.auth_ok()
    link.lose()
    call = [c for c in clock.getDelayedCalls() if c.active()][0]
    assert call.getTime() - clock.seconds() <= 1.0, "backoff starts over after a success"


def test_going_away_reconnects_at_once_to_another_gateway():
    """A gateway that stops gracefully must send its clients elsewhere without delay."""
    client, clock, connector = make()
    client.start()
    link = connect(client, clock, connector)
    link.receive({"type": "error", "code": "going_away", "message": "bye"})  # the TCP way
    link.lose(None, "closed")
    clock.advance(client.going_away_spread)
    assert len(connector.attempts) == 2 and connector.attempts[1][0] == URLS[1]
    link2 = connector.succeed()
    link2.auth_ok()
    link2.lose(1001, "going away")  # the WebSocket way
    clock.advance(client.going_away_spread)
    assert len(connector.attempts) == 3


def test_clients_of_a_gateway_going_away_spread_their_reconnects():
    """All clients of a drained gateway reconnecting (and syncing) in the same instant overload the next."""
    delays = []
    for _ in range(50):
        client, clock, connector = make()
        client.start()
        link = connect(client, clock, connector)
        link.lose(1001, "going away")
        call = [c for c in clock.getDelayedCalls() if c.active()][0]
        delays.append(call.getTime() - clock.seconds())
        client.stop()
    assert all(0 <= d <= 3.0 for d in delays)
    assert max(delays) - min(delays) > 1.5, f"reconnects not spread: {sorted(delays)}"
    assert sum(1 for d in delays if d < 0.1) < 10


def test_refused_static_token_is_fatal():
    """A client retrying a refused token for ever would hide the problem from the application."""
    states = []
    client, clock, connector = make(on_state=states.append)
    started = client.start()
    pending = client.send(SESSION, 1)
    clock.advance(0)
    link = connector.succeed()
    link.receive({"type": "auth_reply", "ok": False, "error": {"code": "invalid_token", "message": "bad"}})
    link.lose(4001, "auth failed")
    errors = []
    started.addErrback(errors.append)
    pending.addErrback(errors.append)
    assert [e.type for e in errors] == [AuthFailed, AuthFailed]
    assert states[-1] == "failed" and not client.running
    assert no_timers_left(clock)
    assert client.when_ready().addErrback(lambda f: f.type).result is AuthFailed


def test_kicked_client_does_not_come_back_on_its_own():
    """A kicked client that reconnected at once would undo the operator's kick (HTTP-API.md kick)."""
    states = []
    client, clock, connector = make(on_state=states.append, get_token=lambda: mint_token(SECRET, "alice", 3600))
    started = client.start()
    link = connect(client, clock, connector)
    link.receive({"type": "error", "code": "kicked"})
    link.lose(4004, "kicked")
    clock.advance(60)
    assert len(connector.attempts) == 1, "it connected again"
    assert states[-1] == "failed" and not client.running
    assert no_timers_left(clock)
    assert client.when_ready().addErrback(lambda f: f.value.code).result == "kicked"
    assert started.called


def test_revoked_static_token_is_fatal():
    """A revoked token (PROTOCOL.md 1.1) retried for ever would hammer every gateway in vain."""
    states = []
    client, clock, connector = make(on_state=states.append)
    started = client.start()
    clock.advance(0)
    link = connector.succeed()
    link.receive({"type": "auth_reply", "ok": False, "error": {"code": "token_revoked", "message": "revoked"}})
    link.lose(4004, "token revoked")
    clock.advance(60)
    assert len(connector.attempts) == 1, "it tried the revoked token again"
    errors = []
    started.addErrback(errors.append)
    assert errors and errors[0].check(AuthFailed) and errors[0].value.code == "token_revoked"
    assert states[-1] == "failed" and not client.running


def test_refused_token_with_get_token_asks_again():
    """An expired token must be replaced from get_token, not end the client."""
    tokens = iter(["expired", mint_token(SECRET, "alice", 3600)])
    client, clock, connector = make(token=None, get_token=lambda: next(tokens))
    started = client.start()
    clock.advance(0)
    link = connector.succeed()
    assert link.sent[0]["token"] == "expired"
    link.receive({"type": "auth_reply", "ok": False, "error": {"code": "token_expired", "message": "old"}})
    link.lose(4001, "auth failed")
    clock.advance(60)
    link2 = connector.succeed()
    assert link2.sent[0]["token"] != "expired"
    link2.auth_ok()
    assert started.called


def test_tokens_from_get_token_refused_again_and_again_are_fatal():
    """A get_token that keeps giving bad tokens would make the client retry for ever, silently."""
    client, clock, connector = make(token=None, get_token=lambda: "bad", max_auth_failures=3)
    started = client.start()
    for _ in range(3):
        link = connect_only(clock, connector)
        link.receive({"type": "auth_reply", "ok": False, "error": {"code": "invalid_token", "message": "no"}})
        link.lose(4001, "auth failed")
    errors = []
    started.addErrback(errors.append)
    assert errors and errors[0].check(AuthFailed) and not client.running
    assert no_timers_left(clock)


def test_token_refreshed_before_it_expires():
    """A connection whose token expires is closed by the gateway; the client must refresh in time."""
    issued = []

    def get_token():
        issued.append(mint_token(SECRET, "alice", 300))
        return issued[-1]

    client, clock, connector = make(token=None, get_token=get_token, refresh_margin=60)
    client.start()
    link = connect(client, clock, connector)
    assert len(issued) == 1
    exp = time.time() + 300
    clock.advance(exp - time.time() - 62)
    assert len(issued) == 1
    clock.advance(5)
    assert len(issued) == 2
    assert link.sent[-1] == {"type": "auth", "token": issued[1]}
    link.auth_ok()  # the refresh's auth_reply
    assert client.state == READY and len(connector.attempts) == 1


def test_silent_gateway_is_dropped_after_ping_timeout():
    """A half-open connection would leave the client 'connected' and deaf for ever."""
    client, clock, connector = make(ping_interval=30, ping_timeout=10)
    client.start()
    link = connect(client, clock, connector)
    clock.advance(30)
    assert link.of_type("ping") == [{"type": "ping"}]
    link.receive({"type": "pong"})
    clock.advance(10)
    assert not link.aborted
    clock.advance(20)
    assert len(link.of_type("ping")) == 2
    clock.advance(10)
    assert link.aborted and client.state == WAITING


def test_history_by_id_repeated_after_reconnect():
    """A history page requested just before a reconnect would never arrive."""
    client, clock, connector = make()
    client.start()
    link = connect(client, clock, connector)
    d1 = client.history(SESSION, before_seq=10, limit=2)
    d2 = client.history(SESSION)
    h1, h2 = link.of_type("history")
    assert h1["beforeSeq"] == 10 and h1["limit"] == 2 and h1["id"] != h2["id"]
    link.receive({"type": "history_reply", "id": h2["id"], "sessionId": SESSION, "messages": [{"seq": 9}]})
    assert d2.result == [{"seq": 9}] and not d1.called
    link.lose()
    link2 = connect(client, clock, connector)
    [again] = link2.of_type("history")
    assert again == h1
    link2.receive({"type": "history_reply", "id": h1["id"], "sessionId": SESSION, "messages": []})
    assert d1.result == []


def test_request_errors_and_session_create():
    """A refused history or session_create must fail its Deferred with the server's code."""
    client, clock, connector = make()
    client.start()
    link = connect(client, clock, connector)
    d = client.history("nope")
    link.receive({"type": "error", "code": "no_session", "message": "no", "ref": link.of_type("history")[0]["id"]})
    errors = []
    d.addErrback(errors.append)
    assert errors[0].check(ClientError) and errors[0].value.code == "no_session"
    ok = client.create_session(["bob"], session_id="g1")
    frame = link.of_type("session_create")[0]
    assert frame["members"] == ["bob"] and frame["sessionId"] == "g1"
    link.receive({"type": "session_reply", "id": frame["id"], "ok": True, "sessionId": "g1",
                  "members": ["alice", "bob"]})
    assert ok.result["members"] == ["alice", "bob"]
    lost = client.create_session(["carol"])
    link.lose()
    lost.addErrback(errors.append)
    assert errors[1].check(Disconnected), "a session_create is not repeated blindly"


def test_read_cursor_sent_once_and_again_after_reconnect():
    """Read receipts would go missing across a reconnect, or move the cursor backwards."""
    client, clock, connector = make()
    client.start()
    client.read(SESSION, 3)  # not connected yet: kept
    link = connect(client, clock, connector)
    client.read(SESSION, 5)
    client.read(SESSION, 4)
    assert link.of_type("read") == [{"type": "read", "sessionId": SESSION, "seq": 3},
                                    {"type": "read", "sessionId": SESSION, "seq": 5}]
    link.lose()
    link2 = connect(client, clock, connector)
    assert link2.of_type("read") == [{"type": "read", "sessionId": SESSION, "seq": 5}]


def test_read_receipts_reach_the_application():
    """Read receipts from other members would be invisible."""
    receipts = []
    client, clock, connector = make(on_read_receipt=receipts.append)
    client.start()
    link = connect(client, clock, connector)
    receipt = {"type": "read_receipt", "sessionId": SESSION, "userId": "bob", "seq": 4}
    link.receive(receipt)
    assert receipts == [receipt]


def test_send_timeout():
    """An application that asked for a bound must not wait longer for a reply."""
    client, clock, connector = make(send_timeout=5)
    client.start()
    connect(client, clock, connector)
    d = client.send(SESSION, 1)
    clock.advance(5)
    errors = []
    d.addErrback(errors.append)
    assert errors[0].check(defer.TimeoutError)
    assert client._in_flight == 0


def test_stop_fails_pending_and_leaves_no_timer():
    """A stopped client that keeps reconnecting (or leaves callers waiting) leaks."""
    client, clock, connector = make()
    client.start()
    link = connect(client, clock, connector)
    pending = client.send(SESSION, 1)
    stopped = client.stop()
    assert link.lost and stopped.called
    errors = []
    pending.addErrback(errors.append)
    assert errors[0].check(ClientStopped)
    assert client.state == STOPPED
    assert no_timers_left(clock)
    assert len(connector.attempts) == 1
    with pytest.raises(ClientStopped):
        client.read(SESSION, 1)
    assert client.when_ready().addErrback(lambda f: f.type).result is ClientStopped


def test_bad_urls_are_refused_at_once():
    """A typo in a gateway URL would otherwise show only as endless reconnects."""
    with pytest.raises(ValueError):
        Client(["ftp://gw/ws"], "t")
    with pytest.raises(ValueError):
        Client([], "t")
    # http(s):// is a gateway's --stream endpoint (long polling)
    assert Client(["http://gw:8082", "https://gw"], "t").urls == ["http://gw:8082", "https://gw"]


# --- frame size (issue 16, rough edge 1) -------------------------------------------------------------


def test_oversized_message_is_refused_before_it_is_sent():
    """70,000 characters went out, the gateway closed (1009), and the client sent them again after
    every reconnect while the next message waited behind them."""
    client, clock, connector = make()
    client.start()
    link = connect(client, clock, connector)
    big = client.send(SESSION, {"text": "x" * 70_000})
    failure = []
    big.addErrback(failure.append)
    assert failure and failure[0].check(SendError) and failure[0].value.code == "too_large"
    assert "65536" in failure[0].value.message
    small = client.send(SESSION, {"text": "next"})
    assert [f["body"] for f in link.of_type("message")] == [{"text": "next"}]
    link.reply_ok(link.of_type("message")[0], 1)
    assert small.result["seq"] == 1
    # an edit or any request is measured too
    edit = client.edit("m1", {"text": "y" * 70_000})
    edit.addErrback(failure.append)
    assert failure[-1].value.code == "too_large" and not link.of_type("edit")


def test_frame_the_gateway_closed_for_is_failed_and_never_sent_again():
    """A gateway whose limit is below the client's closes with 1009: resending that frame after each
    reconnect loops for ever (19 WebSockets in 45 s) and holds back every later message."""
    client, clock, connector = make()
    client.start()
    link = connect(client, clock, connector)
    big = client.send(SESSION, {"text": "x" * 40_000})
    small = client.send(SESSION, {"text": "small"})
    failure = []
    big.addErrback(failure.append)
    link.lose(1009, "message too big")
    assert failure and failure[0].value.code == "too_large"
    link2 = connect(client, clock, connector)
    assert [f["body"] for f in link2.of_type("message")] == [{"text": "small"}]
    link2.reply_ok(link2.of_type("message")[0], 1)
    assert small.result["seq"] == 1
    assert client.max_frame_size < 40_200
    again = client.send(SESSION, {"text": "x" * 40_000})
    again.addErrback(failure.append)
    assert failure[-1].value.code == "too_large" and len(link2.of_type("message")) == 1


def test_tcp_too_large_error_then_close_fails_the_frame():
    """On raw TCP the gateway says too_large in an error frame, then closes: the same rule applies."""
    client, clock, connector = make()
    client.start()
    link = connect(client, clock, connector)
    big = client.send(SESSION, {"text": "x" * 30_000})
    failure = []
    big.addErrback(failure.append)
    link.receive({"type": "error", "code": "too_large", "message": "frame too large"})
    link.lose(None, "closed")
    assert failure and failure[0].value.code == "too_large"
    link2 = connect(client, clock, connector)
    assert link2.of_type("message") == []


def test_auth_reply_may_lower_the_frame_limit():
    """A client that kept 64 KiB against a gateway announcing less would be closed for its frames."""
    client, clock, connector = make()
    client.start()
    clock.advance(0)
    link = connector.succeed()
    link.receive({"type": "auth_reply", "ok": True, "userId": "alice", "connId": "c", "serverId": "gw",
                  "maxFrameSize": 1000})
    failure = []
    client.send(SESSION, {"text": "x" * 1000}).addErrback(failure.append)
    assert failure[0].value.code == "too_large" and not link.of_type("message")


# --- version 1.1 frames ------------------------------------------------------------------------------


def test_recall_and_edit_are_requests_answered_by_id():
    """recall/edit without their replies matched would leave the application waiting."""
    client, clock, connector = make()
    client.start()
    link = connect(client, clock, connector)
    recalled = client.recall("m7")
    edited = client.edit("m8", {"text": "fixed"})
    [r] = link.of_type("recall")
    [e] = link.of_type("edit")
    assert r["msgId"] == "m7" and e == {"type": "edit", "id": e["id"], "msgId": "m8", "body": {"text": "fixed"}}
    link.receive({"type": "edit_reply", "id": e["id"], "ok": False,
                  "error": {"code": "not_allowed", "message": "too late"}})
    link.receive({"type": "recall_reply", "id": r["id"], "ok": True, "msgId": "e1", "sessionId": SESSION,
                  "seq": 9})
    assert recalled.result["seq"] == 9
    failure = []
    edited.addErrback(failure.append)
    assert failure[0].check(ClientError) and failure[0].value.code == "not_allowed"
    # not repeated blindly after a drop (it may have been applied)
    lost = client.recall("m9")
    link.lose()
    lost.addErrback(failure.append)
    assert failure[-1].check(Disconnected)


def test_events_reach_on_message_and_are_acknowledged():
    """An event not handed over (or not acknowledged) would come again with every sync."""
    inbox = []
    client, clock, connector = make(on_message=inbox.append, sync_hold=0)
    client.start()
    link = connect(client, clock, connector)
    link.receive({"type": "message_send", "msgId": "e1", "sessionId": SESSION, "seq": 4, "from": "bob",
                  "kind": "recall", "ref": "m3", "body": None, "ts": 1})
    clock.advance(0)
    assert inbox[0]["kind"] == "recall" and link.of_type("message_send_reply")[0]["msgIds"] == ["e1"]


def test_typing_is_throttled_to_one_per_second_per_session():
    """A typing frame per key press is refused by the server and wastes everybody's bandwidth."""
    typed = []
    client, clock, connector = make(on_typing=typed.append)
    client.start()
    assert client.typing(SESSION) is False  # not connected: dropped, never queued
    link = connect(client, clock, connector)
    sent = [client.typing(SESSION) for _ in range(5)]
    assert sent == [True, False, False, False, False]
    assert client.typing("g1") is True
    clock.advance(0.5)
    assert client.typing(SESSION) is False
    clock.advance(0.6)
    assert client.typing(SESSION) is True
    assert len(link.of_type("typing")) == 3
    link.receive({"type": "typing", "sessionId": SESSION, "userId": "bob"})
    assert typed == [{"type": "typing", "sessionId": SESSION, "userId": "bob"}]


def test_presence_subscriptions_survive_reconnects_and_report_changes():
    """Subscriptions end with the connection: a client that did not make them again would show a
    peer online for ever after a reconnect."""
    changes = []
    client, clock, connector = make(on_presence=changes.append)
    client.start()
    link = connect(client, clock, connector)
    d = client.subscribe_presence(["bob", "carol"])
    [sub] = link.of_type("presence_subscribe")
    assert sub["users"] == ["bob", "carol"]
    link.receive({"type": "presence_reply", "id": sub["id"], "ok": True,
                  "users": [{"userId": "bob", "online": True, "since": 5}, {"userId": "carol", "online": False}]})
    assert d.result["ok"] is True
    assert [(c["userId"], c["online"]) for c in changes] == [("bob", True), ("carol", False)]
    link.receive({"type": "presence", "userId": "carol", "online": True, "ts": 7})
    assert client.presence["carol"]["online"] is True
    client.subscribe_presence(["dave"])  # unanswered when the connection drops
    link.lose()
    link2 = connect(client, clock, connector)
    sub2 = link2.of_type("presence_subscribe")[-1]
    assert sorted(sub2["users"]) == ["bob", "carol", "dave"], "every subscription is made again"
    del changes[:]
    # bob went offline while we were away; carol did not change: bob's change is reported, and
    # dave's first state
    link2.receive({"type": "presence_reply", "id": sub2["id"], "ok": True,
                   "users": [{"userId": "bob", "online": False}, {"userId": "carol", "online": True, "since": 7},
                             {"userId": "dave", "online": False}]})
    assert [(c["userId"], c["online"]) for c in changes] == [("bob", False), ("dave", False)]
    client.unsubscribe_presence(["bob"])
    assert link2.of_type("presence_unsubscribe")[0]["users"] == ["bob"]
    link2.receive({"type": "presence", "userId": "bob", "online": True, "ts": 9})
    assert len(changes) == 2


def test_delivery_receipts_reach_the_application():
    receipts = []
    client, clock, connector = make(on_delivery_receipt=receipts.append)
    client.start()
    link = connect(client, clock, connector)
    frame = {"type": "delivery_receipt", "sessionId": SESSION, "userId": "bob", "msgIds": ["m1"]}
    link.receive(frame)
    assert receipts == [frame]


def test_stream_link_413_fails_the_one_frame_and_splits_a_batch():
    """On the streaming transport a frame over the gateway's limit is answered 413: silently dropped,
    the message stayed "sending" until a reconnect sent it again."""
    from imcluster.client.links import StreamLink, _encode

    class Handler:
        def __init__(self):
            self.frames = []

        def frame_received(self, link, frame):
            self.frames.append(frame)

        def link_lost(self, link, code, reason):
            pass

    handler = Handler()
    link = StreamLink(task.Clock(), "http://gw.test:8082", handler)
    posted = []
    link._request = lambda method, path, body=None, timeout=None: posted.append(body) or defer.Deferred()
    link.stream_id = "s1"
    a = {"type": "message", "clientMsgId": "a", "sessionId": SESSION, "body": {"text": "x" * 100}}
    b = {"type": "message", "clientMsgId": "b", "sessionId": SESSION, "body": {"text": "y"}}
    link._queue = [_encode(a), _encode(b)]
    link._pump()
    assert posted[-1].startswith(b"[")  # one batch of two
    link._posted((413, b""))
    assert posted[-1] == _encode(a)  # then one by one
    link._posted((413, b""))
    assert handler.frames == [{"type": "error", "code": "too_large", "ref": "a",
                               "message": "the gateway refused the frame for its size (413)"}]
    assert posted[-1] == _encode(b)
    link._posted((204, b""))
    assert len(posted) == 3

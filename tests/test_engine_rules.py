"""PROTOCOL.md's framing and auth rules, each on every transport adapter (WebSocket, raw TCP, HTTP streaming).

Unit tests: the real adapters over a StringTransport, time on a task.Clock,
a FakeHub. Every test ends by checking that the connection left no delayed
call behind and that the hub heard of its end exactly once.

This is the adapters' contract suite (``ITransportAdapter``): a new
transport adds its name to the ``kind`` fixture (and to ``ClientHarness``)
and must pass every test that takes ``kind``.
"""

import json
import time

import pytest
from prometheus_client import REGISTRY
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

from imcluster.gateway import transport
from imcluster.testing import ClientHarness, FakeHub, gateway_config


# FakeAuthenticator tokens (the hub's clock starts at 0)
A1 = "user:alice:3600"
A2 = "user:alice:7200"
B1 = "user:bob:3600"
EXPIRED = "expired:alice"


class Unavailable(Exception):
    pass


@pytest.fixture(params=["ws", "tcp", "stream"])
def kind(request):
    return request.param


@pytest.fixture(params=["ws", "tcp"])
def socket_kind(request):
    """The transports on which a connection exists before its auth (a streaming one is born by it)."""
    return request.param


@pytest.fixture
def make_hub():
    hubs = []

    def make(**config):
        config.setdefault("ws_ping_interval", 0)  # autobahn's pings have their own tests
        hub = FakeHub(config=gateway_config(**config))
        hub.harnesses = []
        hubs.append(hub)
        return hub

    yield make
    for hub in hubs:
        for h in hub.harnesses:
            if not h.lost:
                h.drop()
        assert hub.clock.getDelayedCalls() == [], "a timer outlived its connection"
        # connection_lost exactly once per accepted connection
        assert sorted(map(id, hub.lost)) == sorted(map(id, hub.made))


@pytest.fixture
def hub(make_hub):
    return make_hub()


def client(hub, kind, **kw):
    h = ClientHarness(hub, kind, **kw)
    hub.harnesses.append(h)
    return h


def authed(hub, kind, token=A1, **kw):
    h = client(hub, kind, **kw)
    h.send({"type": "auth", "token": token})
    frames = h.frames()
    assert frames[0]["type"] == "auth_reply" and frames[0]["ok"], frames
    return h


def port_of(h, port=40001):
    """The port that names ``h``'s connection: its socket's; a streaming one's number above 65535."""
    if h.kind == "stream":
        assert h.conn.port > 65535
        return h.conn.port
    return port


def closed_with(h, ws_code, tcp_error):
    """The close a user sees: the WebSocket code, or the TCP error frame then close."""
    frames = h.frames()
    assert h.closed
    if h.kind == "ws":
        assert h.close_code == ws_code
    elif tcp_error is not None:
        assert frames and frames[-1]["type"] == "error" and frames[-1]["code"] == tcp_error, frames
    h.finish()
    return frames


def metric(name, **labels):
    return REGISTRY.get_sample_value(name, labels) or 0.0


# --- framing


def test_frame_over_size_limit_closes(make_hub, kind):
    """A client sending a frame over max_frame_size is closed (1009 / too_large), not served."""
    hub = make_hub(max_frame_size=1024)
    h = authed(hub, kind)
    h.send({"type": "message", "clientMsgId": "c", "sessionId": "s", "body": "x" * 2000})
    closed_with(h, 1009, "too_large")
    assert hub.forwarded == []


def test_frame_at_size_limit_is_accepted(make_hub, kind):
    """A frame of exactly max_frame_size bytes is still served."""
    hub = make_hub(max_frame_size=1024)
    h = authed(hub, kind)
    frame = '{"type":"message","clientMsgId":"c","sessionId":"s","body":"%s"}'
    frame = frame % ("x" * (1024 - len(frame % "")))
    assert len(frame) == 1024
    h.send(frame)
    assert not h.closed
    assert len(hub.forwarded) == 1


def test_tcp_too_large_announced_length_closes_before_body(make_hub):
    """A TCP client announcing a huge frame is closed at once, without the server buffering it."""
    hub = make_hub(max_frame_size=1024)
    h = authed(hub, "tcp")
    h.send_raw((10**9).to_bytes(4, "big") + b"{")
    closed_with(h, None, "too_large")


def test_bad_frame_gets_error_and_stays_open(hub, kind):
    """Malformed JSON gets bad_frame and the connection keeps working."""
    h = authed(hub, kind)
    h.send(b"{not json")
    h.send({"no": "type"})
    h.send({"type": "unknown"})
    assert [f["code"] for f in h.frames()] == ["bad_frame"] * 3
    h.send({"type": "ping"})
    assert h.frames() == [{"type": "pong"}]
    assert not h.closed


def test_eleven_bad_frames_in_a_row_close(hub, kind):
    """More than 10 bad frames in a row close the connection; 10 do not."""
    h = authed(hub, kind)
    for _ in range(10):
        h.send(b"garbage")
    assert len(h.frames()) == 10
    assert not h.closed
    h.send(b"garbage")
    frames = closed_with(h, 1008, "bad_frame")
    assert frames[-1]["code"] == "bad_frame"


def test_good_frame_resets_bad_count(hub, kind):
    """10 bad + a good one + 10 bad keeps the connection: only bad frames in a row count."""
    h = authed(hub, kind)
    for _ in range(10):
        h.send(b"garbage")
    h.send({"type": "ping"})
    for _ in range(10):
        h.send(b"garbage")
    assert not h.closed
    assert h.frames()[10] == {"type": "pong"}


def test_bad_frames_before_auth_also_count(hub, socket_kind):
    """An unauthenticated client spewing garbage is closed as well."""
    h = client(hub, socket_kind)
    for _ in range(11):
        h.send(b"[")
    closed_with(h, 1008, "bad_frame")


def test_invalid_message_answered_on_its_client_msg_id(hub, kind):
    """A message that fails validation gets message_reply bad_frame for its clientMsgId."""
    h = authed(hub, kind)
    h.send({"type": "message", "clientMsgId": "c-9", "sessionId": "s", "body": "a\u0000b"})
    h.send({"type": "message", "clientMsgId": "", "sessionId": "s", "body": 1})
    frames = h.frames()
    assert frames[0]["type"] == "message_reply" and frames[0]["ok"] is False
    assert frames[0]["clientMsgId"] == "c-9" and frames[0]["error"]["code"] == "bad_frame"
    assert frames[1]["type"] == "error" and frames[1]["code"] == "bad_frame"
    assert hub.forwarded == []


def test_binary_websocket_message_is_bad_frame(hub):
    """A binary WebSocket message gets bad_frame and counts towards the bad-frame close."""
    h = authed(hub, "ws")
    h.send_binary(b'{"type":"ping"}')
    assert h.frames()[0]["code"] == "bad_frame"
    assert not h.closed
    for _ in range(10):
        h.send_binary()
    closed_with(h, 1008, None)


def test_ping_pong(hub, kind):
    """A client pinging with {"type":"ping"} gets {"type":"pong"}."""
    h = authed(hub, kind)
    h.send({"type": "ping"})
    assert h.frames() == [{"type": "pong"}]


def test_websocket_ping_control_frame_gets_pong(make_hub):
    """A WebSocket ping control frame is answered by a pong with the same payload."""
    from imcluster.testing import ws_frame
    hub = make_hub()
    h = authed(hub, "ws")
    h.send_raw(ws_frame(b"hb", opcode=9))
    h.frames()
    assert (10, b"hb") in h.controls


# --- timers


def test_idle_timeout_closes(hub, kind):
    """A client that sends nothing for idle_timeout is closed; any frame resets the clock."""
    h = authed(hub, kind)
    hub.clock.advance(80)
    h.send(b"garbage")  # even a bad frame is a sign of life
    hub.clock.advance(80)
    assert not h.closed
    hub.clock.advance(10)
    closed_with(h, 1000, "idle_timeout")


def test_websocket_ping_flood_without_reading_closed_as_slow_consumer(make_hub):
    """Pongs are pending output: a client flooding pings and not reading is closed 4003, before auth too."""
    from imcluster.testing import ws_frame
    hub = make_hub(output_buffer_limit=5000, slow_consumer_grace=1.0)
    for authenticate in (True, False):
        h = authed(hub, "ws") if authenticate else client(hub, "ws")
        h.conn.pauseProducing()  # the transport's buffer is full: the client does not read
        ping = ws_frame(b"p" * 125, opcode=9)
        for _ in range(50):  # 6 KB of pongs
            h.send_raw(ping)
        assert not h.closed  # within the grace
        hub.clock.advance(1.0)
        closed_with(h, 4003, "slow_consumer")
        h.controls.clear()


def test_websocket_slow_consumer_is_no_longer_read(make_hub):
    """Closed 4003, a WebSocket client is not read any more (as TCP's loseConnection does); other closes still are."""
    hub = make_hub(output_buffer_limit=5000, slow_consumer_grace=1.0)
    h = authed(hub, "ws")
    h.conn.pauseProducing()  # the client does not read
    for _ in range(3):
        h.conn.send_frame({"type": "message", "body": "x" * 3000})
    hub.clock.advance(1.0)
    closed_with(h, 4003, "slow_consumer")
    assert h.transport.producerState == "paused"
    h.finish()
    other = authed(hub, "ws")
    other.conn.close(4003, "told by the hub")  # the same code, but not the engine's slow-consumer rule
    assert other.closed and other.transport.producerState == "producing"
    other.finish()


def test_websocket_no_pongs_once_closing(make_hub):
    """A client being closed gets no more pongs: its pending output stays bounded."""
    from imcluster.testing import ws_frame
    hub = make_hub()
    h = authed(hub, "ws")
    h.conn.close(4003, "slow consumer")
    h.frames()
    h.controls.clear()
    h.send_raw(ws_frame(b"p" * 125, opcode=9))
    assert h.controls == []
    h.finish()


def test_websocket_pongs_keep_connection_alive(make_hub):
    """A browser that only answers the server's pings is not closed as idle."""
    from imcluster.testing import ws_frame
    hub = make_hub(ws_ping_interval=30)
    h = authed(hub, "ws")
    for _ in range(8):  # 240 s, well past idle_timeout
        hub.clock.advance(30)
        h.frames()
        pings = [payload for opcode, payload in h.controls if opcode == 9]
        assert pings, "the server should ping"
        h.controls.clear()
        h.send_raw(ws_frame(pings[-1], opcode=10))
    assert not h.closed


def test_websocket_client_not_answering_pings_is_dropped(make_hub):
    """A WebSocket peer that never answers pings is dropped after the ping timeout."""
    hub = make_hub(ws_ping_interval=5)
    h = authed(hub, "ws")
    hub.clock.advance(5)
    hub.clock.advance(6)
    assert h.closed
    h.finish()


def test_auth_timeout_closes_4001(hub, socket_kind):
    """A connection that never authenticates is closed after auth_timeout (4001 / auth_timeout)."""
    h = client(hub, socket_kind)
    hub.clock.advance(9.9)
    assert not h.closed
    hub.clock.advance(0.2)
    closed_with(h, 4001, "auth_timeout")


def test_auth_in_time_cancels_auth_timeout(hub, kind):
    """Authenticating in time means no auth_timeout later."""
    h = client(hub, kind)
    hub.clock.advance(9)
    h.send({"type": "auth", "token": A1})
    hub.clock.advance(5)
    h.send({"type": "ping"})
    assert h.frames()[-1] == {"type": "pong"}
    assert not h.closed


def test_token_expiry_closes_4002(hub, kind):
    """When the token's exp passes without refresh the server closes (4002 / token_expired)."""
    h = authed(hub, kind)
    for _ in range(40):  # stay active so idle_timeout does not interfere
        hub.clock.advance(89)
        h.send({"type": "ping"})
    assert hub.clock.seconds() < 3600
    assert not h.closed
    hub.clock.advance(3600 - hub.clock.seconds())
    closed_with(h, 4002, "token_expired")


def test_refresh_postpones_expiry(hub, kind):
    """A refresh with a fresh token for the same user moves the expiry close to the new exp."""
    h = authed(hub, kind)
    h.send({"type": "auth", "token": A2})
    reply = h.frames()[0]
    assert reply == {"type": "auth_reply", "ok": True, "userId": "alice",
                     "connId": f"gw-0000##10.1.2.3##{port_of(h)}", "serverId": "gw-0000"}
    assert hub.auths[-1][2] is True  # refresh=True
    assert len(hub.syncs) == 1  # a refresh does not sync again
    while hub.clock.seconds() < 7100:
        hub.clock.advance(80)
        h.send({"type": "ping"})
    assert not h.closed
    hub.clock.advance(7200 - hub.clock.seconds())
    closed_with(h, 4002, "token_expired")


def test_expired_by_leeway_token_closes_at_once(make_hub, kind):
    """A token accepted within the JWT leeway but already past exp does not buy extra time."""
    from imcluster.auth import JWTAuthenticator, mint_token
    hub = make_hub()
    hub.authenticator = JWTAuthenticator(secret="s" * 32, leeway=10)
    now = time.time()
    hub.clock.advance(now)  # the real authenticator checks exp against the wall clock
    token = mint_token("s" * 32, "alice", 5, now=now - 10)  # expired 5 s ago
    h = authed(hub, kind, token=token)
    hub.clock.advance(0)
    closed_with(h, 4002, "token_expired")


# --- authentication


def test_auth_reply_format_and_sync(hub, kind):
    """auth_reply ok carries exactly userId, connId and serverId, and a sync is requested after it."""
    h = client(hub, kind)
    h.send({"type": "auth", "token": A1, "device": "iphone"})
    assert h.frames() == [{"type": "auth_reply", "ok": True, "userId": "alice",
                           "connId": f"gw-0000##10.1.2.3##{port_of(h)}", "serverId": "gw-0000"}]
    conn = h.conn
    assert (conn.user_id, conn.device, conn.peer_key, conn.transport_name) == (
        "alice", "iphone", f"10.1.2.3##{port_of(h)}", kind)
    assert hub.auths == [(conn, conn.identity, False)]
    assert hub.syncs == [conn]


@pytest.mark.parametrize("token,code", [("forged", "invalid_token"), (EXPIRED, "token_expired"),
                                        ("user:not a user", "invalid_token")])
def test_auth_failure_replies_and_closes_4001(hub, kind, token, code):
    """A bad token gets auth_reply ok:false with its code, then close 4001."""
    before = metric("imcluster_auth_failures_total", code=code)
    h = client(hub, kind)
    h.send({"type": "auth", "token": token})
    frames = closed_with(h, 4001, None)
    assert frames[0]["type"] == "auth_reply" and frames[0]["ok"] is False
    assert frames[0]["error"]["code"] == code
    assert len(frames) == 1  # TCP: no error frame after the auth_reply
    assert metric("imcluster_auth_failures_total", code=code) == before + 1
    assert hub.auths == []


def test_not_authenticated_before_auth(hub, socket_kind):
    """Frames before auth get not_authenticated (with their ref) and the connection stays open."""
    h = client(hub, socket_kind)
    h.send({"type": "message", "clientMsgId": "c-1", "sessionId": "s", "body": 1})
    h.send({"type": "history", "sessionId": "s", "id": "q-1"})
    h.send({"type": "ping"})
    frames = h.frames()
    assert [(f["type"], f["code"], f.get("ref")) for f in frames] == [
        ("error", "not_authenticated", "c-1"), ("error", "not_authenticated", "q-1"),
        ("error", "not_authenticated", None)]
    assert not h.closed
    assert hub.forwarded == []
    h.send({"type": "auth", "token": A1})
    assert h.frames()[0]["ok"] is True


def test_reauth_with_other_user_closes(hub, kind):
    """A token for another user on an authenticated connection is invalid_token, then close 4001."""
    h = authed(hub, kind)
    h.send({"type": "auth", "token": B1})
    frames = closed_with(h, 4001, None)
    assert frames[0]["error"]["code"] == "invalid_token"
    assert h.conn.user_id == "alice"


def test_failed_refresh_closes(hub, kind):
    """An expired token sent as a refresh is token_expired, then close 4001."""
    h = authed(hub, kind)
    h.send({"type": "auth", "token": EXPIRED})
    frames = closed_with(h, 4001, None)
    assert frames[0]["error"]["code"] == "token_expired"


def test_hub_cannot_record_auth(hub, socket_kind):
    """When Redis is down the client gets auth_reply unavailable, stays open, and may retry."""
    hub.auth_failure = Unavailable("redis down")
    h = client(hub, socket_kind)
    h.send({"type": "auth", "token": A1})
    h.send({"type": "ping"})
    frames = h.frames()
    assert frames[0] == {"type": "auth_reply", "ok": False,
                         "error": {"code": "unavailable", "message": frames[0]["error"]["message"]}}
    assert frames[1]["code"] == "not_authenticated"
    assert not h.closed and h.conn.user_id is None
    assert hub.syncs == []
    hub.auth_failure = None
    h.send({"type": "auth", "token": A1})
    assert h.frames()[0]["ok"] is True


def test_frames_after_auth_wait_for_auth_reply(hub, kind):
    """A client that pipelines auth and its first frames gets them processed in order."""
    hub.hold_auth = True
    h = client(hub, kind)
    h.send({"type": "auth", "token": A1})
    h.send({"type": "message", "clientMsgId": "c-1", "sessionId": "s", "body": 1})
    h.send({"type": "ping"})
    assert h.frames() == [] and hub.forwarded == []
    hub.held.pop().callback(None)
    frames = h.frames()
    assert [f["type"] for f in frames] == ["auth_reply", "pong"]
    assert [f["clientMsgId"] for _, f in hub.forwarded] == ["c-1"]


def test_auth_timeout_while_hub_records(hub, kind):
    """A connection whose auth never completes is still closed by the auth timeout."""
    hub.hold_auth = True
    h = client(hub, kind)
    h.send({"type": "auth", "token": A1})
    hub.clock.advance(10)
    closed_with(h, 4001, "auth_timeout")
    hub.held.pop().callback(None)  # late answer: ignored
    assert h.frames() == []


def test_sync_request_failure_is_reported(hub, kind):
    """If the sync cannot be requested the client is told instead of waiting for sync_done forever."""
    hub.sync_failure = Unavailable("amqp down")
    h = client(hub, kind)
    h.send({"type": "auth", "token": A1})
    frames = h.frames()
    assert frames[0]["ok"] is True
    assert frames[1]["type"] == "error" and frames[1]["code"] == "unavailable"


# --- forwarding, rate limit, output


def test_frames_forwarded_to_hub(hub, kind):
    """Every processor-bound frame type reaches the hub validated."""
    h = authed(hub, kind)
    sent = [
        {"type": "message", "clientMsgId": "c", "sessionId": "s", "body": {"t": 1}},
        {"type": "message_send_reply", "msgIds": ["1"]},
        {"type": "history", "sessionId": "s"},
        {"type": "read", "sessionId": "s", "seq": 3},
        {"type": "session_create", "id": "r", "members": ["bob"]},
    ]
    for f in sent:
        h.send(f)
    assert h.frames() == []
    got = [f for _, f in hub.forwarded]
    assert [f["type"] for f in got] == [f["type"] for f in sent]
    assert got[2]["limit"] == 50
    assert all(c is h.conn for c, _ in hub.forwarded)


def test_forward_failure_answers_unavailable(hub, kind):
    """When the frame cannot be queued the client gets unavailable (message_reply for a message)."""
    hub.forward_failure = Unavailable("publish timed out")
    h = authed(hub, kind)
    h.send({"type": "message", "clientMsgId": "c-7", "sessionId": "s", "body": 1})
    h.send({"type": "history", "sessionId": "s", "id": 5})
    frames = h.frames()
    assert frames[0]["type"] == "message_reply" and frames[0]["ok"] is False
    assert frames[0]["clientMsgId"] == "c-7" and frames[0]["error"]["code"] == "unavailable"
    assert frames[1] == {"type": "error", "code": "unavailable", "message": frames[1]["message"], "ref": 5}
    assert not h.closed


def test_rate_limit(make_hub, kind):
    """Frames over the per-connection rate get rate_limited instead of being processed."""
    hub = make_hub(rate_limit=2, rate_burst=3)
    h = authed(hub, kind)  # auth takes no token
    for i in range(4):
        h.send({"type": "message", "clientMsgId": f"c-{i}", "sessionId": "s", "body": i})
    h.send({"type": "history", "sessionId": "s", "id": "h"})
    frames = h.frames()
    assert [f["clientMsgId"] for _, f in hub.forwarded] == ["c-0", "c-1", "c-2"]
    assert frames[0]["type"] == "message_reply" and frames[0]["error"]["code"] == "rate_limited"
    assert frames[0]["clientMsgId"] == "c-3"
    assert frames[1] == {"type": "error", "code": "rate_limited", "message": frames[1]["message"],
                         "ref": "h"}
    hub.clock.advance(1)  # two tokens back
    h.send({"type": "history", "sessionId": "s"})
    assert hub.forwarded[-1][1]["type"] == "history"
    assert not h.closed


def test_acks_pings_and_auth_never_rate_limited(make_hub, kind):
    """A member acknowledging each delivery in its own frame must not get rate_limited (its messages would stay undelivered)."""
    hub = make_hub(rate_limit=1, rate_burst=2)
    h = authed(hub, kind)
    for i in range(2):
        h.send({"type": "read", "sessionId": "s", "seq": i})
    h.send({"type": "read", "sessionId": "s", "seq": 9, "id": "r"})  # the bucket is empty now
    assert h.frames()[0]["code"] == "rate_limited"
    for i in range(200):
        h.send({"type": "message_send_reply", "msgIds": [str(i + 1)]})
        h.send({"type": "ping"})
    h.send({"type": "auth", "token": A2})
    frames = h.frames()
    assert [f for f in frames if f.get("code") == "rate_limited" or "error" in f] == []
    assert sum(f["type"] == "pong" for f in frames) == 200
    assert frames[-1]["type"] == "auth_reply" and frames[-1]["ok"]
    acks = [f for _, f in hub.forwarded if f["type"] == "message_send_reply"]
    assert len(acks) == 200
    h.send({"type": "read", "sessionId": "s", "seq": 10, "id": "r2"})  # still limited: no token came back
    assert h.frames()[0]["code"] == "rate_limited"


def test_ack_with_more_than_1000_msg_ids_is_a_bad_frame(hub, kind):
    """An acknowledgement is exempt from the rate limit, so its size is capped (PROTOCOL.md: 1000 msgIds)."""
    h = authed(hub, kind)
    h.send({"type": "message_send_reply", "msgIds": ["1"] * 1000})
    h.send({"type": "message_send_reply", "msgIds": ["1"] * 1001})
    frames = h.frames()
    assert [f["code"] for f in frames] == ["bad_frame"]
    assert len(hub.forwarded) == 1


@pytest.mark.parametrize("exp", ["1e400", "nan", "inf", "253402300800"])
def test_token_with_unusable_exp_is_invalid_token(hub, kind, exp):
    """A token whose exp no timer can hold is refused outright, never left half-authenticated."""
    h = client(hub, kind)
    h.send({"type": "auth", "token": f"user:alice:{exp}"})
    frames = closed_with(h, 4001, None)
    assert frames[0]["type"] == "auth_reply" and frames[0]["error"]["code"] == "invalid_token"
    assert hub.auths == []


def test_engine_refuses_unusable_exp_even_from_a_lax_authenticator(make_hub, kind):
    """Whatever an authenticator lets through, an exp of 10**400 must not leave the connection half-authenticated."""
    from imcluster.auth import Identity

    class Lax:
        def authenticate(self, token):
            return Identity("alice", 10**400, {})

    hub = make_hub()
    hub.authenticator = Lax()
    h = client(hub, kind)
    h.send({"type": "auth", "token": "x"})
    frames = closed_with(h, 4001, None)
    assert frames[0]["error"]["code"] == "invalid_token"
    assert hub.auths == []


MESSAGE_SEND = {"type": "message_send", "msgId": "1", "sessionId": "s", "seq": 1, "from": "bob",
                "body": "x" * 900, "ts": 1}


def test_slow_consumer_closed_4003(make_hub, kind):
    """A client that stops reading is closed once pending output stays over the limit (4003 / slow_consumer)."""
    hub = make_hub(output_buffer_limit=5000, slow_consumer_grace=1.0)
    h = authed(hub, kind)
    conn = h.conn
    if kind != "stream":  # (an event stream's channel relays to it)
        assert h.transport.producer is conn  # registered on the transport
    conn.pauseProducing()  # the transport's buffer is full
    for _ in range(6):
        conn.send_frame(MESSAGE_SEND)
    assert not h.closed  # over the limit, within the grace period
    hub.clock.advance(1.0)
    closed_with(h, 4003, "slow_consumer")
    conn.send_frame(MESSAGE_SEND)  # after close: dropped, no error


def test_slow_consumer_big_burst_to_stalled_client_closes_after_grace(make_hub, kind):
    """A burst many times the limit (a sync page of big messages) closes only a client that does not take it."""
    hub = make_hub(output_buffer_limit=5000, slow_consumer_grace=1.0)
    h = authed(hub, kind)
    h.conn.pauseProducing()
    for _ in range(25):
        h.conn.send_frame(MESSAGE_SEND)
    assert not h.closed  # a reading client may drain it within the grace
    hub.clock.advance(1.0)
    closed_with(h, 4003, "slow_consumer")


def test_slow_consumer_draining_client_is_kept(make_hub, kind):
    """A client still reading a burst bigger than the limit (PROTOCOL.md: "stops reading") was closed as slow."""
    hub = make_hub(output_buffer_limit=5000, slow_consumer_grace=1.0)
    h = authed(hub, kind)
    pending = [25000]
    h.proto.buffered_bytes = lambda: pending[0]
    h.conn.pauseProducing()
    for _ in range(25):
        h.conn.send_frame(MESSAGE_SEND)
    pending[0] = 18000  # took 7000 bytes (more than the limit) during the grace: reading
    hub.clock.advance(1.0)
    assert not h.closed
    pending[0] = 16000  # then only 2000: it has (nearly) stopped reading
    hub.clock.advance(1.0)
    closed_with(h, 4003, "slow_consumer")


def test_output_buffer_max_bounds_even_a_reading_client(make_hub, kind):
    """The gateway's memory per connection is bounded: past output_buffer_max a client is closed at once."""
    hub = make_hub(output_buffer_limit=5000, output_buffer_max=20000, slow_consumer_grace=1.0)
    h = authed(hub, kind)
    pending = [0]
    h.proto.buffered_bytes = lambda: pending[0]
    h.conn.pauseProducing()
    for n in range(1, 6):
        pending[0] = n * 5000
        h.conn.send_frame(MESSAGE_SEND)
        if pending[0] <= 20000:
            assert not h.closed, pending[0]
    closed_with(h, 4003, "slow_consumer")  # at 25000 bytes, without waiting for the grace


def test_burst_to_reading_client_is_not_slow_consumer(make_hub, kind):
    """A client that drains a burst within the grace period (resumeProducing) is kept."""
    hub = make_hub(output_buffer_limit=5000, slow_consumer_grace=1.0)
    h = authed(hub, kind)
    conn = h.conn
    for _ in range(3):
        conn.pauseProducing()
        for _ in range(8):
            conn.send_encoded('{"type":"x","pad":"%s"}' % ("y" * 1000))
        hub.clock.advance(0.5)
        conn.resumeProducing()
    hub.clock.advance(5)
    h.send({"type": "ping"})
    assert not h.closed
    assert len(h.frames()) == 25


def test_send_encoded_str_and_bytes(hub, kind):
    """A delivery serialized once by the hub reaches the client intact."""
    h = authed(hub, kind)
    h.conn.send_encoded('{"type":"message_send","body":"é"}')
    h.conn.send_encoded(b'{"type":"sync_done","count":0}')
    assert h.frames() == [{"type": "message_send", "body": "é"}, {"type": "sync_done", "count": 0}]


def test_going_away(hub, kind):
    """A stopping gateway tells clients to reconnect elsewhere (1001 / going_away)."""
    h = authed(hub, kind)
    h.conn.going_away()
    closed_with(h, 1001, "going_away")


def test_hub_close_maps_code_for_tcp(hub, kind):
    """conn.close(4003) reaches a TCP client as error slow_consumer."""
    h = authed(hub, kind)
    h.conn.close(4003, "too slow")
    closed_with(h, 4003, "slow_consumer")


def test_refused_connection(hub, kind):
    """A gateway at capacity refuses: WebSocket handshake 503, TCP error unavailable then close."""
    hub.refuse = True
    h = client(hub, kind)
    if kind == "stream":
        h.send({"type": "auth", "token": A1})  # POST /stream
        assert h.status == 503 and h.frames()[0]["code"] == "unavailable"
    elif kind == "ws":
        assert h.status == 503
        assert h.transport.disconnecting
    else:
        assert h.frames()[0]["code"] == "unavailable"
        assert h.transport.disconnecting
    assert h.conn is None
    hub.clock.advance(60)  # the TCP abort timer
    h.finish()
    assert hub.lost == [] and hub.made == []


def test_connection_lost_once_on_client_drop(hub, kind):
    """A vanished client is removed from the hub exactly once, timers and all."""
    h = authed(hub, kind)
    h.drop()
    if kind == "stream":
        h.conn.connection_lost()  # a second notification changes nothing
    else:
        h.proto.connectionLost(Failure(ConnectionDone()))  # a second notification changes nothing
    assert hub.lost == [h.conn]


def test_tcp_close_aborts_client_that_never_reads(make_hub):
    """A closing TCP connection whose client does not read is dropped after close_timeout."""
    hub = make_hub(close_timeout=3)
    h = authed(hub, "tcp")
    h.conn.going_away()
    assert h.transport.disconnecting and not h.transport.disconnected
    hub.clock.advance(3)
    assert h.transport.disconnected  # aborted
    h.finish()


def test_metrics_counted(hub, kind):
    """Operators see frames, bytes, errors and closes in the metrics."""
    errors = metric("imcluster_errors_total", code="bad_frame")
    frames_in = metric("imcluster_frames_in_total", transport=kind, type="ping")
    out = metric("imcluster_frames_out_total", transport=kind)
    closes = metric("imcluster_closes_total", reason="going_away")
    h = authed(hub, kind)
    h.send({"type": "ping"})
    h.send(b"nope")
    h.conn.going_away()
    assert metric("imcluster_errors_total", code="bad_frame") == errors + 1
    assert metric("imcluster_frames_in_total", transport=kind, type="ping") == frames_in + 1
    assert metric("imcluster_frames_out_total", transport=kind) >= out + 3
    assert metric("imcluster_closes_total", reason="going_away") == closes + 1
    assert metric("imcluster_bytes_in_total", transport=kind) > 0
    h.finish()


def test_connection_objects_provide_the_interface(hub, kind):
    """The hub can rely on IClientConnection, for the real connection and for the fake."""
    from zope.interface.verify import verifyObject

    from imcluster.interfaces import IClientConnection
    from imcluster.testing import FakeConnection
    h = authed(hub, kind)
    assert verifyObject(IClientConnection, h.conn)
    assert verifyObject(IClientConnection, FakeConnection())


def test_adapters_provide_the_transport_interface(hub, kind):
    """The engine can rely on ITransportAdapter, whatever the transport."""
    from zope.interface.verify import verifyObject

    from imcluster.interfaces import ITransportAdapter
    h = authed(hub, kind, ip="10.9.8.7", port=4321)
    assert verifyObject(ITransportAdapter, h.proto)
    assert h.proto.transport_name == h.conn.transport_name == kind
    assert h.proto.client_address == ("10.9.8.7", port_of(h, 4321))
    assert h.conn.peer_key == f"10.9.8.7##{port_of(h, 4321)}"
    pending = h.proto.buffered_bytes()  # a StringTransport cannot tell: None
    assert pending is None or pending >= 0


@pytest.mark.parametrize("reason", transport.CLOSE_REASONS, ids=lambda r: r.name)
def test_every_close_reason_rendered(hub, kind, reason):
    """Each of PROTOCOL.md's closes reaches the client the transport's way: close code, or error frame then close."""
    h = authed(hub, kind)
    h.proto.close_for(reason)
    frames = closed_with(h, reason.code, reason.error)
    if kind == "ws":
        assert frames == [] and h.close_reason == reason.text
    elif reason.error is None:
        assert frames == []  # the client was told by an earlier frame
    else:
        assert frames == [{"type": "error", "code": reason.error, "message": reason.text}]


def test_engine_runs_on_any_adapter(make_hub):
    """A third transport plugs into the engine by providing ITransportAdapter alone (no engine change)."""
    from zope.interface import implementer
    from zope.interface.verify import verifyObject

    from imcluster.gateway.engine import ClientConnection
    from imcluster.interfaces import ITransportAdapter

    @implementer(ITransportAdapter)
    class Recording:
        transport_name = "test"
        client_address = ("10.0.0.9", 9)
        conn = None

        def __init__(self):
            self.written = []
            self.closed = []

        def write_message(self, data):
            self.written.append(data)

        def buffered_bytes(self):
            return None

        def close_for(self, reason):
            transport.write_farewell(self, reason)
            self.closed.append(reason)

    hub = make_hub()
    adapter = Recording()
    assert verifyObject(ITransportAdapter, adapter)
    conn = adapter.conn = ClientConnection(hub, adapter)
    assert conn.open()
    conn.frame_received(b'{"type":"auth","token":"%s"}' % A1.encode())
    conn.frame_received(b'{"type":"ping"}')
    conn.going_away()
    conn.going_away()  # once closing, nothing more reaches the adapter
    assert [json.loads(d)["type"] for d in adapter.written] == ["auth_reply", "pong", "error"]
    assert adapter.closed == [transport.GOING_AWAY]
    assert conn.conn_id == "gw-0000##10.0.0.9##9" and conn.transport_name == "test"
    conn.connection_lost()
    assert hub.lost == [conn]


@pytest.mark.parametrize("reason", [transport.KICKED, transport.TOKEN_REVOKED], ids=lambda r: r.name)
def test_kick_and_revoke_send_their_error_on_every_transport(hub, kind, reason):
    """An operator's kick or revoke: the `error` frame (kicked / token_revoked) on every transport, then close 4004."""
    h = authed(hub, kind)
    h.conn.kick(reason)
    h.conn.kick(reason)  # once closing, nothing more
    frames = closed_with(h, 4004, reason.name)
    assert [f for f in frames if f["type"] == "error"] == [
        {"type": "error", "code": reason.name, "message": reason.text}]

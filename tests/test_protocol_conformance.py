"""Black-box conformance of a real cluster to PROTOCOL.md, statement by statement.

Written against /work/shared/PROTOCOL.md alone, as an independent client
author would: real ``twistd imgateway`` / ``twistd improcessor`` processes,
raw WebSocket, TCP and HTTP streaming clients (tests/support/clients.py),
nothing of imcluster imported. Transport-independent statements run on every
transport: ``ws``, ``tcp``, ``stream`` (Server-Sent Events) and ``poll``
(long polling); the statements about a connection before its ``auth`` run on
the socket transports only (a streaming connection is born by its ``auth``:
``POST /stream``). One cluster serves the whole module (two ordinary gateways, one
"strict" gateway with short timers and a small rate limit, one processor);
every test uses its own users and sessions so tests never see each other.
"""

from __future__ import annotations

import json
import struct
import time
import uuid
from decimal import Decimal
from pathlib import Path

import jwt
import pytest
import pytest_twisted
from psycopg2 import sql
from twisted.internet import defer

from tests.support.bus import cleanup_namespace
from tests.support.clients import FrameTimeout, connect_stream, connect_tcp, connect_ws
from tests.support.cluster import Cluster, _delete_redis_prefix
from tests.support.http import http_call, metric_value
from tests.support.redis import TEST_TIMEOUT
from tests.support.ids import POSTGRES_DSN, unique
from tests.support.postgres import admin_connection, drop_schema
from tests.support.waiting import eventually, sleep

pytestmark = pytest.mark.slow

TRANSPORTS = ["ws", "tcp", "stream", "poll"]
#: transports on which a connection exists before its auth (and is idle unless it sends)
SOCKETS = ["ws", "tcp"]
#: the HTTP streaming transport, as an event stream and as long polling
STREAMS = ("stream", "poll")
WAIT = 15.0
#: how long "nothing more arrives" is watched for
QUIET = 0.4

# the strict gateway's timers and rate limit (configurable per PROTOCOL.md)
STRICT_AUTH_TIMEOUT = 1.5
STRICT_IDLE_TIMEOUT = 2.5
STRICT_RATE = 1.0
STRICT_BURST = 5
STRICT_OUTPUT_LIMIT = 65536
STRICT_STREAM_RESUME = 5.0
STRICT_HEADER_TIMEOUT = 1.0
STRICT_ORIGIN = "http://chat.example"
STRICT_AUD = "imc-audience"
STRICT_ISS = "imc-issuer"


class Env:
    """The module's cluster: ``gw`` and ``gw2`` ordinary gateways, ``strict`` one with short timers."""

    def __init__(self, cluster: Cluster, gw, gw2, strict) -> None:
        self.cluster = cluster
        self.gw = gw
        self.gw2 = gw2
        self.strict = strict

    def token(self, user: str, ttl: float = 3600, **claims) -> str:
        return self.cluster.token(user, ttl, **claims)

    def strict_token(self, user: str, ttl: float = 3600, **claims) -> str:
        """A token the strict gateway accepts (it checks ``aud`` and ``iss``)."""
        return self.cluster.token(user, ttl, **{"aud": STRICT_AUD, "iss": STRICT_ISS, **claims})


@pytest_twisted.async_yield_fixture(scope="module")
async def env(tmp_path_factory):
    from imcluster.db import apply_migrations_sync  # the schema only: the test talks wire protocol

    namespace = unique("imt")
    prefix = unique("imt:") + ":"
    schema = unique("imt_")
    apply_migrations_sync(POSTGRES_DSN, schema, 10.0)
    cluster = Cluster(tmp_path_factory.mktemp("conformance"), namespace, prefix, schema)
    try:
        # history tests send a few hundred frames in a burst: not a rate-limit test there
        gws = await defer.gatherResults([
            cluster.start_gateway(rate_limit=2000, rate_burst=2000),
            cluster.start_gateway(rate_limit=2000, rate_burst=2000),
            cluster.start_gateway(auth_timeout=STRICT_AUTH_TIMEOUT, idle_timeout=STRICT_IDLE_TIMEOUT,
                                  rate_limit=STRICT_RATE, rate_burst=STRICT_BURST,
                                  jwt_audience=STRICT_AUD, jwt_issuer=STRICT_ISS,
                                  output_buffer_limit=STRICT_OUTPUT_LIMIT, slow_consumer_grace=0.3,
                                  stream_resume=STRICT_STREAM_RESUME, http_header_timeout=STRICT_HEADER_TIMEOUT,
                                  allowed_origins=[STRICT_ORIGIN], metrics=True),
        ], consumeErrors=True)
        await cluster.start_processor()
        yield Env(cluster, *gws)
    finally:
        await cluster.shutdown()
        if cluster.processes:
            print(cluster.report())
        await cleanup_namespace(namespace, cluster.extra_queues, cluster.amqp_url)
        await _delete_redis_prefix(prefix)
        drop_schema(schema)


async def acknowledged(env, user: str, msg_ids: list[str]) -> None:
    """Wait until PostgreSQL has ``user``'s rows of ``msg_ids`` ``delivered``: the acks were applied."""
    conn = admin_connection()
    query = sql.SQL("SELECT count(*) FROM {}.messagesend WHERE user_id = %s AND msg_id = ANY(%s) "
                    "AND status = 'delivered'").format(sql.Identifier(env.cluster.pg_schema))
    ids = [int(m) for m in msg_ids]

    def applied() -> bool:
        with conn.cursor() as cursor:
            cursor.execute(query, (user, ids))
            return cursor.fetchone()[0] == len(ids)

    try:
        await eventually(applied, WAIT, what=f"{user}'s acks of {msg_ids} stored")
    finally:
        conn.close()



async def slow_consumer_closes(gw) -> float:
    """How many connections ``gw`` closed as slow consumers (its /metrics)."""
    r = await http_call(gw.metrics_port, "GET", "/metrics")
    return metric_value(r.text, "imcluster_closes_total", {"reason": "slow_consumer"})


# --- helpers: what any client author writes first


async def connect(gw, transport: str, path: str = "/ws"):
    if transport == "ws":
        return await connect_ws(f"ws://127.0.0.1:{gw.ws_port}{path}")
    if transport in STREAMS:
        return connect_stream(gw.stream_port, "sse" if transport == "stream" else "poll")
    return await connect_tcp(gw.tcp_port)


class Conn:
    """One authenticated connection: the raw client, its auth_reply and its sync."""

    def __init__(self, user: str, client, reply: dict, sync: list[dict], done: dict) -> None:
        self.user = user
        self.client = client
        self.reply = reply
        self.sync = sync
        self.done = done

    def send(self, frame: dict) -> None:
        self.client.send(frame)

    async def next(self, frame_type: str, timeout: float = WAIT) -> dict:
        """The next frame of ``frame_type`` (other frames are skipped, they stay in ``received``)."""
        return await self.client.receive_type(frame_type, timeout)

    def of_type(self, frame_type: str) -> list[dict]:
        return [f for f in self.client.received if f.get("type") == frame_type]

    async def request(self, frame: dict, reply_type: str) -> dict:
        self.send(frame)
        return await self.next(reply_type)

    async def message(self, session: str, body, cmid: str | None = None) -> dict:
        """Send one ``message`` and return its ``message_reply``."""
        cmid = cmid or unique("c")
        self.send({"type": "message", "clientMsgId": cmid, "sessionId": session, "body": body})
        while True:
            reply = await self.next("message_reply")
            if reply["clientMsgId"] == cmid:
                return reply

    async def history(self, session: str, **kw) -> dict:
        return await self.request({"type": "history", "sessionId": session, **kw}, "history_reply")

    def close(self) -> None:
        if self.client.connected:
            self.client.close()


async def login(env: Env, user: str, transport: str = "ws", gw=None, device: str | None = None) -> Conn:
    """Connect, authenticate and read the sync up to ``sync_done``."""
    gw = gw or env.gw
    client = await connect(gw, transport)
    token = env.strict_token(user) if gw is env.strict else env.token(user)
    reply = await client.auth(token, device=device)
    assert reply.get("ok") is True, reply
    frames = await client.receive_until("sync_done", timeout=WAIT)
    return Conn(user, client, reply, frames[:-1], frames[-1])


async def create_session(conn: Conn, members: list[str], session: str | None = None) -> dict:
    frame = {"type": "session_create", "id": unique("r"), "members": members}
    if session is not None:
        frame["sessionId"] = session
    reply = await conn.request(frame, "session_reply")
    assert reply["ok"] is True, reply
    return reply


async def members_event(conn: Conn, sid: str) -> dict:
    """The ``members`` event a new group's members get first (PROTOCOL.md 1.1: ``session_create``, seq 1)."""
    frame = await conn.next("message_send")
    assert frame["sessionId"] == sid and frame["kind"] == "members" and frame["seq"] == 1, frame
    return frame


def messages_only(frames: list[dict]) -> list[dict]:
    """``frames`` without the 1.1 events (entries with a ``kind``)."""
    return [f for f in frames if "kind" not in f]


def p2p(a: str, b: str) -> str:
    x, y = sorted((a, b), key=lambda u: u.encode("utf-8"))
    return f"p2p:{x}:{y}"


def users(n: int, prefix: str = "u") -> list[str]:
    return [unique(prefix) for _ in range(n)]


async def wait_closed(client, timeout: float = WAIT):
    """The WebSocket close (code, reason), or None for TCP; fails if the server keeps it open."""
    return await client.closed.addTimeout(timeout, _reactor())


def _reactor():
    from twisted.internet import reactor
    return reactor


async def still_open(client, user: str | None = None) -> None:
    """Prove the connection is open and answering with a good frame (not a bad one, which would
    count towards the bad-frames-in-a-row limit): ``history`` when authenticated as ``user``,
    else ``ping`` (answered ``not_authenticated``)."""
    if user is None:
        client.send({"type": "ping"})
        frame = await client.receive_type("error")
        assert frame["code"] == "not_authenticated", frame
        return
    ref = unique("probe")
    client.send({"type": "history", "sessionId": p2p(user, "nobody"), "id": ref})
    frame = await client.receive_type("history_reply")
    assert frame["messages"] == []


def canon(value):
    """A JSON value with numbers compared as JSON numbers (decimal), so 1e2 == 100."""
    return json.loads(json.dumps(value), parse_float=Decimal, parse_int=Decimal)


def local_peer(client) -> tuple[str, int]:
    """The client's end of the socket that named the connection (a streaming one: its POST /stream)."""
    host = client.transport.getHost()
    return host.host, host.port


# ====================================================================== Framing


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest_twisted.ensureDeferred
async def test_framing_frames_are_json_objects_both_ways(env, transport):
    """A client reading one JSON object per frame would choke on anything else the server sends."""
    alice = await login(env, unique("u"), transport)
    bad = await alice.request({"type": "nonsense"}, "error")
    for frame in alice.client.received:
        assert isinstance(frame, dict) and isinstance(frame.get("type"), str), frame
    assert bad["code"] == "bad_frame"
    alice.close()


@pytest_twisted.ensureDeferred
async def test_framing_websocket_any_path_is_accepted(env):
    """A browser client configured with another path than /ws could not connect."""
    client = await connect(env.gw, "ws", path="/some/other/path?x=1")
    reply = await client.auth(env.token(unique("u")))
    assert reply["ok"] is True
    client.close()


@pytest_twisted.ensureDeferred
async def test_framing_websocket_binary_message_is_bad_frame_and_stays_open(env):
    """A WebSocket binary message would go unanswered or drop the connection."""
    client = await connect(env.gw, "ws")
    client.send_binary(b'{"type":"ping"}')
    frame = await client.receive()
    assert frame["type"] == "error" and frame["code"] == "bad_frame", frame
    reply = await client.auth(env.token(unique("u")))
    assert reply["ok"] is True
    client.close()


@pytest_twisted.ensureDeferred
async def test_framing_websocket_binary_messages_count_as_bad_frames(env):
    """Binary messages would not count towards the bad-frames-in-a-row limit."""
    client = await connect(env.gw, "ws")
    for _ in range(11):
        client.send_binary(b"\x00\x01")
    await wait_closed(client)  # PROTOCOL.md names no close code for it
    assert len([f for f in client.received if f.get("code") == "bad_frame"]) >= 10


@pytest_twisted.ensureDeferred
async def test_framing_tcp_length_prefix_is_big_endian_and_may_arrive_in_pieces(env):
    """A TCP client whose frames arrive split across segments would never be answered."""
    client = await connect(env.gw, "tcp")
    payload = json.dumps({"type": "auth", "token": env.token(unique("u"))}).encode()
    data = struct.pack(">I", len(payload)) + payload
    for i in range(0, len(data), 7):
        client.send_raw(data[i:i + 7])
        await sleep(0.005)
    reply = await client.receive_type("auth_reply", skip=())
    assert reply["ok"] is True
    client.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest_twisted.ensureDeferred
async def test_framing_frame_of_exactly_the_limit_is_accepted(env, transport):
    """A frame of exactly 65536 bytes of JSON (inside the default limit) would close the connection."""
    alice = await login(env, unique("u"), transport)
    frame = {"type": "nonsense", "id": "big", "pad": ""}
    size = len(json.dumps(frame, separators=(",", ":")).encode())
    frame["pad"] = "x" * (65536 - size)
    assert len(json.dumps(frame, separators=(",", ":")).encode()) == 65536
    reply = await alice.request(frame, "error")
    assert reply["code"] == "bad_frame" and reply.get("ref") == "big"
    await still_open(alice.client, alice.user)
    alice.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest_twisted.ensureDeferred
async def test_framing_frame_over_the_limit_closes(env, transport):
    """A frame over 65536 bytes would be accepted, or close without the documented code/error."""
    alice = await login(env, unique("u"), transport)
    alice.send({"type": "message", "clientMsgId": "big", "sessionId": "s", "body": "x" * 65536})
    closed = await wait_closed(alice.client)
    if transport == "ws":
        assert closed[0] == 1009, closed
    else:
        errors = alice.of_type("error")
        assert errors and errors[-1]["code"] == "too_large", alice.client.received
        assert not alice.of_type("message_reply")


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("authed", [False, True], ids=["before-auth", "after-auth"])
@pytest_twisted.ensureDeferred
async def test_framing_malformed_frames_are_bad_frame_and_stay_open(env, transport, authed):
    """Malformed JSON, non-objects or a missing/unknown type would close or go unanswered."""
    if authed:
        conn = await login(env, unique("u"), transport)
        client = conn.client
    elif transport in STREAMS:
        pytest.skip("a streaming connection is born by its auth (POST /stream)")
    else:
        client = await connect(env.gw, transport)
    texts = [
        "{not json",
        "",
        "[1,2,3]",
        '"a string"',
        "42",
        "null",
        "{}",
        '{"type":null}',
        '{"type":42}',
        '{"type":"no_such_type"}',
        '{"kind":"message"}',
    ]
    if transport in STREAMS:
        # a POST body that is a JSON array is that many frames: one non-object here
        texts[texts.index("[1,2,3]")] = "[1]"
    for text in texts:
        if transport == "ws":
            client.send_text(text)
        else:
            client.send_frame_bytes(text.encode())
        frame = await client.receive()
        assert frame["type"] == "error" and frame["code"] == "bad_frame", (text, frame)
        assert isinstance(frame["message"], str)
        if text == '{"type":42}':
            # a good frame restarts the count of bad frames in a row (11 texts here)
            await still_open(client, conn.user if authed else None)
    await sleep(QUIET)
    assert client.connected
    client.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest_twisted.ensureDeferred
async def test_framing_ten_bad_frames_in_a_row_are_tolerated_the_eleventh_closes(env, transport):
    """The connection would close after 10 bad frames, or stay open after more than 10 in a row."""
    conn = await login(env, unique("u"), transport)
    client = conn.client
    for _ in range(10):
        client.send({"type": "nope"})
    for _ in range(10):
        assert (await client.receive())["code"] == "bad_frame"
    # a good frame resets the count: 10 more bad ones are tolerated again
    reply = await conn.history(p2p(conn.user, unique("u")))
    assert reply["messages"] == []
    for _ in range(10):
        client.send({"type": "nope"})
    for _ in range(10):
        assert (await client.receive())["code"] == "bad_frame"
    await sleep(QUIET)
    assert client.connected
    client.send({"type": "nope"})  # the 11th in a row
    await wait_closed(client)


@pytest_twisted.ensureDeferred
async def test_framing_tcp_invalid_utf8_is_bad_frame(env):
    """A TCP frame that is not UTF-8 would crash the connection or go unanswered."""
    client = await connect(env.gw, "tcp")
    client.send_frame_bytes(b'{"type":"\xff\xfe"}')
    frame = await client.receive()
    assert frame["type"] == "error" and frame["code"] == "bad_frame"
    await still_open(client)
    client.close()


@pytest_twisted.ensureDeferred
async def test_framing_tcp_ping_gets_pong(env):
    """A TCP client's keepalive ping would go unanswered."""
    conn = await login(env, unique("u"), "tcp")
    conn.send({"type": "ping"})
    assert await conn.client.receive() == {"type": "pong"}
    conn.close()


@pytest.mark.parametrize("transport", ["ws", "tcp", "stream"])
@pytest_twisted.ensureDeferred
async def test_framing_idle_connection_is_closed(env, transport):
    """A connection that sends nothing would be kept open forever."""
    # (a long-polling client is never idle: each poll is traffic, as a WebSocket pong is)
    client = await connect(env.strict, transport)
    reply = await client.auth(env.strict_token(unique("u")))
    assert reply["ok"] is True
    started = time.monotonic()
    await wait_closed(client, STRICT_IDLE_TIMEOUT + 5)
    assert time.monotonic() - started >= STRICT_IDLE_TIMEOUT - 1.0


# ====================================================================== Authentication


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest_twisted.ensureDeferred
async def test_auth_success_reply_shape_and_conn_id(env, transport):
    """auth_reply would carry other fields, or a connId that is not <serverId>##<ip>##<port>."""
    user = unique("u")
    client = await connect(env.gw, transport)
    reply = await client.auth(env.token(user), device="phone 1")
    assert set(reply) == {"type", "ok", "userId", "connId", "serverId"}, reply
    assert reply["type"] == "auth_reply" and reply["ok"] is True and reply["userId"] == user
    uuid.UUID(reply["serverId"])
    ip, port = local_peer(client)
    if transport in STREAMS:
        # named by the client's address and a number above every TCP port (docs/protocol.rst):
        # its HTTP sockets come and go, and their ports are reused by others
        server_id, conn_ip, conn_port = reply["connId"].split("##")
        assert (server_id, conn_ip) == (reply["serverId"], ip) and int(conn_port) > 65535
    else:
        assert reply["connId"] == f"{reply['serverId']}##{ip}##{port}"
    done = await client.receive_type("sync_done")
    assert done == {"type": "sync_done", "count": 0}
    client.close()


@pytest_twisted.ensureDeferred
async def test_auth_connections_on_one_gateway_share_its_server_id(env):
    """Two connections to one gateway would report different serverIds (or equal connIds)."""
    a = await login(env, unique("u"), "ws")
    b = await login(env, unique("u"), "tcp")
    c = await login(env, unique("u"), "ws", gw=env.gw2)
    assert a.reply["serverId"] == b.reply["serverId"] != c.reply["serverId"]
    assert a.reply["connId"] != b.reply["connId"]
    for x in (a, b, c):
        x.close()


def _bad_tokens(env: Env, user: str) -> dict[str, tuple[str, str]]:
    now = int(time.time())
    return {
        "garbage": ("not.a.jwt", "invalid_token"),
        "wrong-secret": (jwt.encode({"sub": user, "exp": now + 3600}, "other-secret-0123456789abcdefghij",
                                    algorithm="HS256"), "invalid_token"),
        "no-exp": (jwt.encode({"sub": user}, env.cluster.jwt_secret, algorithm="HS256"), "invalid_token"),
        "bad-sub-chars": (env.token("bad user!"), "invalid_token"),
        "sub-too-long": (env.token("a" * 129), "invalid_token"),
        "empty-sub": (env.token(""), "invalid_token"),
        "expired": (env.token(user, ttl=-3600), "token_expired"),
        "alg-none": (jwt.encode({"sub": user, "exp": now + 3600}, None, algorithm="none"), "invalid_token"),
    }


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("case", ["garbage", "wrong-secret", "no-exp", "bad-sub-chars", "sub-too-long",
                                  "empty-sub", "expired", "alg-none"])
@pytest_twisted.ensureDeferred
async def test_auth_failure_reply_then_close_4001(env, transport, case):
    """A bad token would be accepted, answered in another shape or code, or leave the connection open."""
    token, code = _bad_tokens(env, unique("u"))[case]
    client = await connect(env.gw, transport)
    reply = await client.auth(token)
    assert set(reply) == {"type", "ok", "error"}, reply
    assert reply["ok"] is False and set(reply["error"]) == {"code", "message"}
    assert reply["error"]["code"] == code and isinstance(reply["error"]["message"], str)
    closed = await wait_closed(client)
    if transport == "ws":
        assert closed[0] == 4001, closed


@pytest_twisted.ensureDeferred
async def test_auth_sub_of_128_allowed_characters_is_accepted(env):
    """A user id using the whole alphabet and the full 128 characters would be refused."""
    user = ("Az09_.@-" + unique("u"))
    user = (user * 20)[:128]
    client = await connect(env.gw, "tcp")
    reply = await client.auth(env.token(user))
    assert reply["ok"] is True and reply["userId"] == user
    client.close()


@pytest.mark.parametrize("transport", SOCKETS)
@pytest_twisted.ensureDeferred
async def test_auth_other_frames_before_auth_get_not_authenticated_and_stay_open(env, transport):
    """Frames before auth would be processed, dropped silently, or close the connection."""
    user = unique("u")
    client = await connect(env.gw, transport)
    frames = [
        {"type": "message", "clientMsgId": "c1", "sessionId": p2p(user, "x"), "body": 1},
        {"type": "history", "sessionId": p2p(user, "x"), "id": "h1"},
        {"type": "read", "sessionId": p2p(user, "x"), "seq": 1},
        {"type": "message_send_reply", "msgIds": []},
        {"type": "session_create", "members": [], "id": "r1"},
    ]
    for frame in frames:
        client.send(frame)
    got = [await client.receive() for _ in frames]
    for frame, answer in zip(frames, got):
        assert answer["type"] == "error" and answer["code"] == "not_authenticated", (frame, answer)
    assert got[0].get("ref") == "c1" and got[1].get("ref") == "h1"
    reply = await client.auth(env.token(user))
    assert reply["ok"] is True
    client.close()


@pytest.mark.parametrize("transport", SOCKETS)
@pytest_twisted.ensureDeferred
async def test_auth_timeout_closes(env, transport):
    """A connection that never authenticates would be kept open."""
    client = await connect(env.strict, transport)
    started = time.monotonic()
    await sleep(0.5)
    client.send({"type": "ping"})  # other frames do not stand in for auth
    assert (await client.receive())["code"] == "not_authenticated"
    closed = await wait_closed(client, STRICT_AUTH_TIMEOUT + 5)
    assert time.monotonic() - started >= STRICT_AUTH_TIMEOUT - 0.5
    if transport == "ws":
        assert closed[0] == 4001, closed
    else:
        assert client.received and client.received[-1]["type"] == "error"
        assert client.received[-1]["code"] == "auth_timeout"


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest_twisted.ensureDeferred
async def test_auth_refresh_same_sub_and_expiry(env, transport):
    """A refresh would be refused or not extend the connection; an expired token would keep it open."""
    user = unique("u")
    refreshed = await connect(env.gw, transport)
    expiring = await connect(env.gw, transport)
    for c in (refreshed, expiring):
        assert (await c.auth(env.token(user, ttl=2)))["ok"] is True
        await c.receive_type("sync_done")
    again = await refreshed.auth(env.token(user, ttl=3600))
    assert set(again) == {"type", "ok", "userId", "connId", "serverId"}, again
    assert again["ok"] is True and again["userId"] == user
    ip, port = local_peer(refreshed)
    if transport in STREAMS:
        assert again["connId"].split("##")[:2] == [again["serverId"], ip]
    else:
        assert again["connId"] == f"{again['serverId']}##{ip}##{port}"
    closed = await wait_closed(expiring, 10)
    if transport == "ws":
        assert closed[0] == 4002, closed
    else:
        assert expiring.received[-1]["type"] == "error"
        assert expiring.received[-1]["code"] == "token_expired"
    assert refreshed.connected
    await still_open(refreshed, user)
    # a refresh is not a new login: no second sync (docs/protocol.rst)
    assert [f["type"] for f in refreshed.received].count("sync_done") == 1
    refreshed.close()


# ====================================================================== Sync


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest_twisted.ensureDeferred
async def test_sync_order_count_and_own_messages(env, transport):
    """A sync out of byte order, with a wrong count, or holding the user's own messages."""
    tag = unique("")
    alice, bob = f"Z{tag}", f"a{tag}"   # byte order: "Z" < "a" (a locale sorts them the other way)
    a = await login(env, alice, transport)
    ids = [f"B{tag}", f"_{tag}", f"a{tag}", f"c-{tag}"]
    for sid in ids:
        await create_session(a, [bob], sid)
    sent = {f"event-{sid}": (sid, 1) for sid in ids}  # each group's members event (PROTOCOL.md 1.1)
    # interleaved across sessions, so that store order is not the expected order
    for n in range(3):
        for sid in reversed(ids + [p2p(alice, bob)]):
            r = await a.message(sid, {"n": n})
            assert r["ok"] is True, r
            sent[r["msgId"]] = (sid, r["seq"])
    b = await login(env, bob, transport)
    got = [(f["sessionId"], f["seq"]) for f in b.sync]
    assert all(f["type"] == "message_send" for f in b.sync)
    expected = sorted(sent.values(), key=lambda k: (k[0].encode("utf-8"), k[1]))
    assert got == expected
    assert b.done == {"type": "sync_done", "count": len(b.sync)}
    # the sender's own messages are not in the sender's sync (another device, never acked)
    a2 = await login(env, alice, transport, gw=env.gw2)
    assert a2.sync == [] and a2.done["count"] == 0
    for c in (a, b, a2):
        c.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest_twisted.ensureDeferred
async def test_sync_holds_exactly_the_unacknowledged(env, transport):
    """Acknowledged messages would come again, or unacknowledged ones would be lost, at the next auth."""
    alice, bob = users(2)
    a = await login(env, alice, transport)
    b = await login(env, bob, transport)
    sid = p2p(alice, bob)
    replies = [await a.message(sid, n) for n in range(4)]
    live = [await b.next("message_send") for _ in replies]
    assert [f["msgId"] for f in live] == [r["msgId"] for r in replies]
    b.send({"type": "message_send_reply", "msgIds": [live[0]["msgId"], live[2]["msgId"]]})
    await acknowledged(env, bob, [live[0]["msgId"], live[2]["msgId"]])
    b.close()
    b2 = await login(env, bob, transport)
    assert [f["msgId"] for f in b2.sync] == [live[1]["msgId"], live[3]["msgId"]]
    assert b2.done["count"] == 2
    # the sync's message_send frames are acknowledged like live ones
    b2.send({"type": "message_send_reply", "msgIds": [f["msgId"] for f in b2.sync]})
    await acknowledged(env, bob, [f["msgId"] for f in b2.sync])
    b3 = await login(env, bob, transport, gw=env.gw2)
    assert b3.sync == [] and b3.done["count"] == 0
    for c in (a, b2, b3):
        c.close()


# ====================================================================== Sending a message


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest_twisted.ensureDeferred
async def test_message_reply_shape(env, transport):
    """message_reply would lack or add fields, or carry wrong types."""
    alice, bob = users(2)
    a = await login(env, alice, transport)
    before = int(time.time() * 1000)
    reply = await a.message(p2p(alice, bob), {"text": "hi"}, cmid="c-123")
    after = int(time.time() * 1000)
    assert set(reply) == {"type", "ok", "clientMsgId", "msgId", "sessionId", "seq", "ts"}, reply
    assert reply["ok"] is True and reply["clientMsgId"] == "c-123"
    assert reply["sessionId"] == p2p(alice, bob) and reply["seq"] == 1
    assert isinstance(reply["msgId"], str) and reply["msgId"]
    assert isinstance(reply["ts"], int) and before - 5000 <= reply["ts"] <= after + 5000
    a.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest_twisted.ensureDeferred
async def test_message_seq_gap_free_per_session_one_reply_each(env, transport):
    """seq would skip, repeat or be shared across sessions; a frame would get no reply or two."""
    alice, bob, carol = users(3)
    a = await login(env, alice, transport)
    s1, s2 = p2p(alice, bob), p2p(alice, carol)
    cmids = []
    for n in range(20):
        for sid in (s1, s2):
            cmid = unique("c")
            cmids.append((cmid, sid))
            a.send({"type": "message", "clientMsgId": cmid, "sessionId": sid, "body": n})
    replies = [await a.next("message_reply") for _ in cmids]
    # a barrier: anything answered twice would have arrived by now
    await a.history(s1)
    await sleep(QUIET)
    assert len(a.of_type("message_reply")) == len(cmids)
    assert sorted(r["clientMsgId"] for r in replies) == sorted(c for c, _ in cmids)
    for sid in (s1, s2):
        seqs = [r["seq"] for r in replies if r["sessionId"] == sid]
        assert sorted(seqs) == list(range(1, 21)), seqs
    assert len({r["msgId"] for r in replies}) == 40
    a.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest_twisted.ensureDeferred
async def test_message_reply_comes_after_storage(env, transport):
    """A message acknowledged with message_reply would not yet be readable (not stored)."""
    alice, bob = users(2)
    a = await login(env, alice, transport)
    b = await login(env, bob, transport, gw=env.gw2)
    sid = p2p(alice, bob)
    for n in range(5):
        reply = await a.message(sid, n)
        # another connection, another gateway: only the database can know it
        page = await b.history(sid)
        assert page["messages"][-1]["msgId"] == reply["msgId"]
        assert page["messages"][-1]["seq"] == n + 1
    a.close()
    b.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest_twisted.ensureDeferred
async def test_message_duplicate_repeats_reply_and_skips_acknowledged_recipients(env, transport):
    """A resent clientMsgId would store a second message, or reach a recipient that acknowledged it."""
    alice, bob, carol = users(3)
    a = await login(env, alice, transport)
    b = await login(env, bob, transport)
    c = await login(env, carol, transport)
    sid = (await create_session(a, [bob, carol]))["sessionId"]
    for conn in (b, c):
        await members_event(conn, sid)
    first = await a.message(sid, {"v": 1}, cmid="dup-1")
    got_b = await b.next("message_send")
    await c.next("message_send")
    b.send({"type": "message_send_reply", "msgIds": [got_b["msgId"]]})
    await acknowledged(env, bob, [got_b["msgId"]])
    # resent after a "reconnect", even with another body
    a.close()
    a = await login(env, alice, transport, gw=env.gw2)
    again = await a.message(sid, {"v": 2}, cmid="dup-1")
    assert set(again) == set(first)
    assert (again["msgId"], again["seq"], again["sessionId"]) == (first["msgId"], first["seq"], sid)
    nxt = await a.message(sid, {"v": 3})
    assert nxt["seq"] == first["seq"] + 1
    # bob acknowledged: his next frame is the next message, not the duplicate
    following = await b.next("message_send")
    assert following["msgId"] == nxt["msgId"]
    assert [f["msgId"] for f in messages_only(b.of_type("message_send"))] == [first["msgId"], nxt["msgId"]]
    # carol did not: she may get it again, with the same msgId
    await c.next("message_send")
    for f in messages_only(c.of_type("message_send")):
        assert f["msgId"] in (first["msgId"], nxt["msgId"])
        if f["msgId"] == first["msgId"]:
            assert f["seq"] == first["seq"] and f["body"] == {"v": 1}
    page = await a.history(sid)
    assert [(m["seq"], m["body"]) for m in messages_only(page["messages"])] == [(2, {"v": 1}), (3, {"v": 3})]
    for x in (a, b, c):
        x.close()


@pytest_twisted.ensureDeferred
async def test_message_duplicate_in_another_session_repeats_the_first(env):
    """A clientMsgId reused in another session would create a second message."""
    alice, bob, carol = users(3)
    a = await login(env, alice, "tcp")
    first = await a.message(p2p(alice, bob), "x", cmid="same")
    again = await a.message(p2p(alice, carol), "y", cmid="same")
    assert again["ok"] is True
    assert (again["msgId"], again["seq"]) == (first["msgId"], first["seq"])
    page = await a.history(p2p(alice, carol))
    assert page["messages"] == []
    a.close()


BODIES = [
    {"text": "hi", "nested": {"a": [1, 2, {"b": None}], "t": True, "f": False}},
    "a plain string",
    "",
    "unicode: é ü 中文 😀 \u2028 \\u0000 literal backslash-u",
    0,
    -7,
    12345678901234567890,
    1.5,
    -0.25,
    1e100,
    None,
    True,
    False,
    [],
    [1, "two", None, [3.5], {"k": "v"}],
    {},
    {"z": 1, "a": 2, "m": {"y": 1, "b": 2}},
]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest_twisted.ensureDeferred
async def test_message_body_any_json_value_same_meaning(env, transport):
    """A body that is not an object, or numbers/strings/null, would be refused or altered."""
    alice, bob = users(2)
    a = await login(env, alice, transport)
    b = await login(env, bob, transport, gw=env.gw2)
    sid = p2p(alice, bob)
    for body in BODIES:
        reply = await a.message(sid, body)
        assert reply["ok"] is True, (body, reply)
        live = await b.next("message_send")
        assert canon(live["body"]) == canon(body), (body, live["body"])
        assert type(live["body"]) is type(body) or isinstance(body, float)
    page = await b.history(sid)
    assert [canon(m["body"]) for m in page["messages"]] == [canon(x) for x in BODIES]
    a.close()
    b.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest_twisted.ensureDeferred
async def test_message_nul_in_body_is_bad_frame(env, transport):
    """A body string holding U+0000 would be stored (or crash the store) instead of bad_frame."""
    alice, bob = users(2)
    a = await login(env, alice, transport)
    for n, body in enumerate(["a\u0000b", {"k": "\u0000"}, ["x", ["\u0000"]], {"\u0000": 1}]):
        reply = await a.message(p2p(alice, bob), body, cmid=f"nul-{n}")
        assert reply == {"type": "message_reply", "ok": False, "clientMsgId": f"nul-{n}",
                         "error": {"code": "bad_frame", "message": reply["error"]["message"]}}, reply
    assert (await a.history(p2p(alice, bob)))["messages"] == []
    a.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest_twisted.ensureDeferred
async def test_message_validation_failures(env, transport):
    """An invalid message would be answered in the wrong frame (message_reply vs error) or not at all."""
    alice, bob = users(2)
    a = await login(env, alice, transport)
    sid = p2p(alice, bob)
    with_cmid = [
        {"type": "message", "clientMsgId": "v-1", "body": 1},                          # no sessionId
        {"type": "message", "clientMsgId": "v-2", "sessionId": sid},                  # no body
        {"type": "message", "clientMsgId": "v-3", "sessionId": 5, "body": 1},         # not a string
        {"type": "message", "clientMsgId": "v-4", "sessionId": "", "body": 1},
    ]
    for frame in with_cmid:
        a.send(frame)
        reply = await a.client.receive()
        assert set(reply) == {"type", "ok", "clientMsgId", "error"}, reply
        assert reply["type"] == "message_reply" and reply["ok"] is False
        assert reply["clientMsgId"] == frame["clientMsgId"] and reply["error"]["code"] == "bad_frame"
    without = [
        {"type": "message", "sessionId": sid, "body": 1},
        {"type": "message", "clientMsgId": "", "sessionId": sid, "body": 1},
        {"type": "message", "clientMsgId": "x" * 65, "sessionId": sid, "body": 1},
        {"type": "message", "clientMsgId": 17, "sessionId": sid, "body": 1},
        {"type": "message", "clientMsgId": None, "sessionId": sid, "body": 1},
    ]
    for frame in without:
        a.send(frame)
        reply = await a.client.receive()
        assert reply["type"] == "error" and reply["code"] == "bad_frame", (frame, reply)
    ok = await a.message(sid, 1, cmid="y" * 64)
    assert ok["ok"] is True and ok["seq"] == 1
    a.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest_twisted.ensureDeferred
async def test_message_not_member_and_no_session(env, transport):
    """Sending to a session one is not in, or that does not exist, would be stored or misreported."""
    alice, bob, carol = users(3)
    b = await login(env, bob, transport)
    group = (await create_session(b, [carol]))["sessionId"]
    a = await login(env, alice, transport)
    cases = [
        (group, "not_member"),
        (p2p(bob, carol), "not_member"),
        (unique("nosuch"), "no_session"),
    ]
    for sid, code in cases:
        reply = await a.message(sid, "x", cmid=unique("c"))
        assert set(reply) == {"type", "ok", "clientMsgId", "error"}, reply
        assert reply["ok"] is False and reply["error"]["code"] == code, (sid, reply)
        assert isinstance(reply["error"]["message"], str)
    # nothing was stored in the session alice may not write to
    assert messages_only((await b.history(group))["messages"]) == []
    a.close()
    b.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest_twisted.ensureDeferred
async def test_message_rate_limited(env, transport):
    """A flood of messages would all be processed, or be dropped without their one reply each."""
    alice, bob = users(2)
    a = await login(env, alice, transport, gw=env.strict)
    cmids = [unique("c") for _ in range(8)]
    for cmid in cmids:
        a.send({"type": "message", "clientMsgId": cmid, "sessionId": p2p(alice, bob), "body": 1})
    replies = [await a.next("message_reply") for _ in cmids]
    await sleep(QUIET)
    assert sorted(r["clientMsgId"] for r in a.of_type("message_reply")) == sorted(cmids)
    limited = [r for r in replies if not r["ok"]]
    assert limited, replies
    for r in limited:
        assert set(r) == {"type", "ok", "clientMsgId", "error"}
        assert r["error"]["code"] == "rate_limited"
    a.close()


# ====================================================================== Delivery


@pytest_twisted.ensureDeferred
async def test_delivery_every_connection_of_every_member_except_the_sending_one(env):
    """A member's device (or the sender's other device) would miss a message, or the sender get its own."""
    alice, bob, carol, dave = users(4)
    a1 = await login(env, alice, "ws")
    a2 = await login(env, alice, "tcp", gw=env.gw2)
    b1 = await login(env, bob, "tcp")
    b2 = await login(env, bob, "ws", gw=env.gw2)
    c1 = await login(env, carol, "ws", gw=env.gw2)
    d1 = await login(env, dave, "ws")
    sid = (await create_session(a1, [bob, carol]))["sessionId"]
    for conn in (a2, b1, b2, c1):  # the creator's other device too
        await members_event(conn, sid)
    reply = await a1.message(sid, {"text": "hi"}, cmid="c-123")
    expected = {"type": "message_send", "msgId": reply["msgId"], "sessionId": sid, "seq": reply["seq"],
                "from": alice, "clientMsgId": "c-123", "body": {"text": "hi"}, "ts": reply["ts"]}
    for conn in (a2, b1, b2, c1):
        frame = await conn.next("message_send")
        assert frame == expected, (conn.user, frame)
    await sleep(QUIET)
    assert a1.of_type("message_send") == []
    assert d1.of_type("message_send") == []
    for conn in (a2, b1, b2, c1):
        assert len(messages_only(conn.of_type("message_send"))) == 1
    for conn in (a1, a2, b1, b2, c1, d1):
        conn.close()


@pytest_twisted.ensureDeferred
async def test_delivery_ack_from_one_device_and_foreign_acks_ignored(env):
    """An ack by another user (or of unknown ids) would mark a message delivered, or be answered with an error."""
    alice, bob, carol = users(3)
    a = await login(env, alice, "tcp")
    b = await login(env, bob, "ws")
    c = await login(env, carol, "ws")
    sid = (await create_session(a, [bob, carol]))["sessionId"]
    event_b, event_c = await members_event(b, sid), await members_event(c, sid)
    m = await a.message(sid, "x")
    await b.next("message_send")
    await c.next("message_send")
    # carol acknowledges it (for herself) and junk; alice acknowledges her own; none counts for bob
    c.send({"type": "message_send_reply", "msgIds": [event_c["msgId"], m["msgId"], "999999999999", "not-a-msg-id",
                                                      "0"]})
    a.send({"type": "message_send_reply", "msgIds": [m["msgId"]]})
    b.send({"type": "message_send_reply", "msgIds": []})
    await a.history(sid)
    await c.history(sid)
    await sleep(QUIET)
    for conn in (a, b, c):
        assert conn.of_type("error") == [], conn.client.received
    b.close()
    b2 = await login(env, bob, "tcp", gw=env.gw2)
    assert [f["msgId"] for f in b2.sync] == [event_b["msgId"], m["msgId"]]
    c2 = await login(env, carol, "tcp", gw=env.gw2)
    assert c2.sync == []
    for conn in (a, b2, c, c2):
        conn.close()


# ====================================================================== History


@pytest_twisted.ensureDeferred
async def test_history_paging(env):
    """History would include beforeSeq, ignore the default or cap of limit, or not be ascending."""
    alice, bob = users(2)
    a = await login(env, alice, "tcp")
    sid = p2p(alice, bob)
    for n in range(250):
        a.send({"type": "message", "clientMsgId": f"h-{n}", "sessionId": sid, "body": n})
    replies = [await a.next("message_reply") for _ in range(250)]
    assert all(r["ok"] for r in replies)
    assert sorted(r["seq"] for r in replies) == list(range(1, 251))
    b = await login(env, bob, "ws")

    def seqs(reply):
        return [m["seq"] for m in reply["messages"]]

    newest = await b.history(sid)
    assert set(newest) == {"type", "sessionId", "messages"} and newest["sessionId"] == sid
    assert seqs(newest) == list(range(201, 251))
    assert seqs(await b.history(sid, beforeSeq=100, limit=50)) == list(range(50, 100))
    assert seqs(await b.history(sid, beforeSeq=100)) == list(range(50, 100))
    assert seqs(await b.history(sid, limit=1000)) == list(range(51, 251))
    assert seqs(await b.history(sid, beforeSeq=251, limit=200)) == list(range(51, 251))
    assert seqs(await b.history(sid, beforeSeq=5, limit=50)) == [1, 2, 3, 4]
    assert seqs(await b.history(sid, beforeSeq=1)) == []
    assert seqs(await b.history(sid, beforeSeq=0)) == []
    assert seqs(await b.history(sid, beforeSeq=None, limit=None)) == list(range(201, 251))
    echoed = await b.history(sid, limit=1, id="h-9")
    assert echoed["id"] == "h-9" and seqs(echoed) == [250]
    assert seqs(await b.history(sid, beforeSeq=10**6, limit=2)) == [249, 250]
    page = await b.history(sid, beforeSeq=3, limit=1)
    (m,) = page["messages"]
    assert {"msgId", "seq", "from", "body", "ts"} <= set(m)
    assert m["seq"] == 2 and m["from"] == alice and m["body"] == 1 and m["msgId"] == replies[1]["msgId"]
    assert m["ts"] == replies[1]["ts"]
    a.close()
    b.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest_twisted.ensureDeferred
async def test_history_not_member_and_no_session_are_error_frames(env, transport):
    """Reading a session one is not in (or that does not exist) would return messages or another frame."""
    alice, bob, carol = users(3)
    b = await login(env, bob, transport)
    group = (await create_session(b, [carol]))["sessionId"]
    await b.message(group, "secret")
    a = await login(env, alice, transport)
    for sid, code in [(group, "not_member"), (p2p(bob, carol), "not_member"),
                      (unique("nosuch"), "no_session")]:
        ref = unique("h")
        a.send({"type": "history", "sessionId": sid, "id": ref})
        frame = await a.client.receive()
        assert frame["type"] == "error" and frame["code"] == code, (sid, frame)
        assert frame.get("ref") == ref and isinstance(frame["message"], str)
    a.close()
    b.close()


# ====================================================================== Read receipts


@pytest_twisted.ensureDeferred
async def test_read_receipts(env):
    """A read receipt would miss a member's device, echo to the reader's own connection, move back or overrun."""
    alice, bob, carol = users(3)
    a = await login(env, alice, "tcp")
    b1 = await login(env, bob, "ws")
    b2 = await login(env, bob, "tcp", gw=env.gw2)
    c = await login(env, carol, "ws", gw=env.gw2)
    sid = (await create_session(a, [bob, carol]))["sessionId"]
    for n in range(3):
        await a.message(sid, n)
    b1.send({"type": "read", "sessionId": sid, "seq": 2})
    expected = {"type": "read_receipt", "sessionId": sid, "userId": bob, "seq": 2}
    for conn in (a, b2, c):
        assert await conn.next("read_receipt") == expected
    # backwards: the cursor stays at 2, and the receipt says so
    b2.send({"type": "read", "sessionId": sid, "seq": 1})
    for conn in (a, b1, c):
        assert await conn.next("read_receipt") == expected
    # beyond the last seq: clamped to 4 (seq 1 is the group's members event)
    b1.send({"type": "read", "sessionId": sid, "seq": 99})
    clamped = {"type": "read_receipt", "sessionId": sid, "userId": bob, "seq": 4}
    for conn in (a, b2, c):
        assert await conn.next("read_receipt") == clamped
    await sleep(QUIET)
    # every connection but the sending one, once per read
    assert [f["seq"] for f in a.of_type("read_receipt")] == [2, 2, 4]
    assert [f["seq"] for f in c.of_type("read_receipt")] == [2, 2, 4]
    assert [f["seq"] for f in b1.of_type("read_receipt")] == [2]
    assert [f["seq"] for f in b2.of_type("read_receipt")] == [2, 4]
    for conn in (a, b1, b2, c):
        conn.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest_twisted.ensureDeferred
async def test_read_not_member_and_no_session(env, transport):
    """A read on a session one is not in would move a cursor or send receipts."""
    alice, bob, carol = users(3)
    b = await login(env, bob, transport)
    group = (await create_session(b, [carol]))["sessionId"]
    await b.message(group, "x")
    a = await login(env, alice, transport)
    for sid, code in [(group, "not_member"), (p2p(bob, carol), "not_member"), (unique("nosuch"), "no_session")]:
        a.send({"type": "read", "sessionId": sid, "seq": 1, "id": "rd"})
        frame = await a.client.receive()
        assert frame["type"] == "error" and frame["code"] == code and frame.get("ref") == "rd", frame
    await sleep(QUIET)
    assert b.of_type("read_receipt") == []
    a.close()
    b.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest_twisted.ensureDeferred
async def test_read_in_an_implicit_p2p_session_without_messages(env, transport):
    """Reading one's own 1:1 session before its first message would be an error (it exists implicitly)."""
    alice, bob = users(2)
    a = await login(env, alice, transport)
    b = await login(env, bob, transport, gw=env.gw2)
    sid = p2p(alice, bob)
    a.send({"type": "read", "sessionId": sid, "seq": 5, "id": "rd"})
    # clamped to the last seq, 0: bob learns alice's cursor like any other
    assert await b.next("read_receipt") == {"type": "read_receipt", "sessionId": sid, "userId": alice,
                                            "seq": 0}
    assert a.of_type("error") == []
    m = await b.message(sid, "first")
    assert m["ok"] is True and m["seq"] == 1
    a.close()
    b.close()


# ====================================================================== Errors


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest_twisted.ensureDeferred
async def test_error_frame_shape_and_ref(env, transport):
    """error frames would lack code/message, or not point back at the offending frame."""
    a = await login(env, unique("u"), transport)
    a.send({"type": "what", "id": "id-1"})
    frame = await a.client.receive()
    assert set(frame) == {"type", "code", "message", "ref"}, frame
    assert frame["code"] == "bad_frame" and frame["ref"] == "id-1" and isinstance(frame["message"], str)
    a.send({"type": "what", "clientMsgId": "cm-1"})
    assert (await a.client.receive())["ref"] == "cm-1"
    a.send({"type": "what"})
    frame = await a.client.receive()
    assert frame["type"] == "error" and frame.get("ref") is None
    a.close()


# ====================================================================== Sessions


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest_twisted.ensureDeferred
async def test_session_create_reply_and_creator_member(env, transport):
    """session_reply would have another shape, or leave the creator out of the members."""
    alice, bob, carol = users(3)
    a = await login(env, alice, transport)
    b = await login(env, bob, transport)
    sid = unique("room")
    a.send({"type": "session_create", "id": "r-1", "members": [carol, bob], "sessionId": sid})
    reply = await a.next("session_reply")
    assert reply == {"type": "session_reply", "id": "r-1", "ok": True, "sessionId": sid,
                     "members": sorted([alice, bob, carol])}
    # no sessionId: the server picks one; the creator alone is a session too
    reply = await a.request({"type": "session_create", "id": "r-2", "members": []}, "session_reply")
    assert reply["ok"] is True and reply["id"] == "r-2" and reply["members"] == [alice]
    assert isinstance(reply["sessionId"], str) and reply["sessionId"]
    # naming oneself does not make a second membership
    reply = await a.request({"type": "session_create", "id": "r-3", "members": [alice, bob]}, "session_reply")
    assert reply["members"] == sorted([alice, bob])
    # members may send; the creator and others receive
    await members_event(b, sid)  # PROTOCOL.md 1.1: the new group's seq 1
    m = await b.message(sid, "hello")
    assert m["ok"] is True and m["seq"] == 2
    assert (await a.next("message_send"))["msgId"] == m["msgId"]
    a.close()
    b.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest_twisted.ensureDeferred
async def test_session_p2p_implicit_and_only_its_two_users(env, transport):
    """The 1:1 session would need creating, accept a third sender, or exist under an unsorted id."""
    tag = unique("")
    alice, bob, carol = f"a{tag}", f"B{tag}", f"c{tag}"  # byte order: "B..." < "a..."
    sid = f"p2p:{bob}:{alice}"
    a = await login(env, alice, transport)
    b = await login(env, bob, transport, gw=env.gw2)
    c = await login(env, carol, transport)
    r1 = await a.message(sid, "hi bob")
    assert r1["ok"] is True and r1["sessionId"] == sid and r1["seq"] == 1
    assert (await b.next("message_send"))["msgId"] == r1["msgId"]
    r2 = await b.message(sid, "hi alice")
    assert r2["ok"] is True and r2["seq"] == 2
    assert (await a.next("message_send"))["msgId"] == r2["msgId"]
    r3 = await c.message(sid, "let me in")
    assert r3["ok"] is False and r3["error"]["code"] == "not_member"
    unsorted = await a.message(f"p2p:{alice}:{bob}", "wrong order")
    assert unsorted["ok"] is False and unsorted["error"]["code"] == "no_session", unsorted
    myself = await a.message(f"p2p:{alice}:{alice}", "me")
    assert myself["ok"] is False and myself["error"]["code"] == "no_session", myself
    page = await a.history(sid)
    assert [m["seq"] for m in page["messages"]] == [1, 2]
    for conn in (a, b, c):
        conn.close()


# ====================================================================== more edges


@pytest_twisted.ensureDeferred
async def test_framing_tcp_announced_oversize_length_closes_at_once(env):
    """A TCP client announcing a huge frame would make the server wait (and buffer) for it."""
    client = await connect(env.gw, "tcp")
    client.send_raw(struct.pack(">I", 10**9))
    await wait_closed(client, 5)
    assert client.received and client.received[-1]["type"] == "error"
    assert client.received[-1]["code"] == "too_large"


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest_twisted.ensureDeferred
async def test_framing_limit_counts_bytes_not_characters(env, transport):
    """The size limit would count characters: a frame of multibyte text over 65536 bytes would pass."""
    alice = await login(env, unique("u"), transport)
    at_limit = {"type": "nonsense", "id": "mb", "pad": ""}
    size = len(json.dumps(at_limit, separators=(",", ":"), ensure_ascii=False).encode())
    at_limit["pad"] = "é" * ((65536 - size) // 2) + "x" * ((65536 - size) % 2)
    text = json.dumps(at_limit, separators=(",", ":"), ensure_ascii=False)
    assert len(text.encode()) == 65536
    if transport == "ws":
        alice.client.send_text(text)
    else:
        alice.client.send_frame_bytes(text.encode())
    assert (await alice.next("error"))["ref"] == "mb"
    over = json.dumps({"type": "nonsense", "pad": "é" * 32800}, ensure_ascii=False)
    assert len(over) < 65536 < len(over.encode())
    if transport == "ws":
        alice.client.send_text(over)
    else:
        alice.client.send_frame_bytes(over.encode())
    closed = await wait_closed(alice.client)
    if transport == "ws":
        assert closed[0] == 1009


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest_twisted.ensureDeferred
async def test_auth_audience_and_issuer_checked_when_configured(env, transport):
    """A token for another audience or issuer would be accepted by a gateway configured to check them."""
    user = unique("u")
    cases = [
        (env.token(user), "invalid_token"),                                  # neither claim
        (env.token(user, aud="other", iss=STRICT_ISS), "invalid_token"),
        (env.token(user, aud=STRICT_AUD, iss="other"), "invalid_token"),
    ]
    for token, code in cases:
        client = await connect(env.strict, transport)
        reply = await client.auth(token)
        assert reply["ok"] is False and reply["error"]["code"] == code, reply
        await wait_closed(client)
    client = await connect(env.strict, transport)
    assert (await client.auth(env.strict_token(user)))["ok"] is True
    client.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest_twisted.ensureDeferred
async def test_auth_then_frames_back_to_back(env, transport):
    """Frames sent right behind auth (before auth_reply) would be refused as not_authenticated."""
    alice, bob = users(2)
    client = await connect(env.gw, transport)
    client.send({"type": "auth", "token": env.token(alice)})
    client.send({"type": "message", "clientMsgId": "fast", "sessionId": p2p(alice, bob), "body": 1})
    reply = await client.receive_type("message_reply")
    assert reply["ok"] is True and reply["seq"] == 1
    assert [f["type"] for f in client.received][0] == "auth_reply"
    assert not [f for f in client.received if f.get("code") == "not_authenticated"]
    client.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest_twisted.ensureDeferred
async def test_auth_refresh_for_another_sub_is_refused(env, transport):
    """A connection could switch to another user by sending auth again."""
    alice, bob = users(2)
    a = await login(env, alice, transport)
    reply = await a.client.auth(env.token(bob))
    assert reply["ok"] is False and reply["error"]["code"] == "invalid_token"
    closed = await wait_closed(a.client)
    if transport == "ws":
        assert closed[0] == 4001


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest_twisted.ensureDeferred
async def test_message_same_client_msg_id_twice_back_to_back(env, transport):
    """The same clientMsgId sent twice in a burst would store two messages or get one reply."""
    alice, bob = users(2)
    a = await login(env, alice, transport)
    b = await login(env, bob, transport)
    sid = p2p(alice, bob)
    for _ in range(2):
        a.send({"type": "message", "clientMsgId": "twice", "sessionId": sid, "body": "x"})
    r1, r2 = await a.next("message_reply"), await a.next("message_reply")
    assert r1["ok"] is True and (r1["msgId"], r1["seq"]) == (r2["msgId"], r2["seq"])
    assert [m["seq"] for m in (await a.history(sid))["messages"]] == [1]
    first = await b.next("message_send")
    await sleep(QUIET)
    assert {f["msgId"] for f in b.of_type("message_send")} == {first["msgId"]}
    a.close()
    b.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest_twisted.ensureDeferred
async def test_session_create_existing_id_is_refused(env, transport):
    """Creating a session under an id that exists would take it over or add members silently."""
    alice, bob, carol = users(3)
    a = await login(env, alice, transport)
    sid = (await create_session(a, [bob]))["sessionId"]
    c = await login(env, carol, transport)
    reply = await c.request({"type": "session_create", "id": "again", "members": [], "sessionId": sid},
                            "session_reply")
    assert set(reply) == {"type", "id", "ok", "error"}, reply
    assert reply["ok"] is False and reply["id"] == "again" and reply["error"]["code"] == "conflict"
    assert (await c.message(sid, "in?"))["error"]["code"] == "not_member"
    a.close()
    c.close()


@pytest_twisted.ensureDeferred
async def test_sync_across_pages_keeps_byte_order(env):
    """A sync longer than one server page would repeat, skip or reorder messages."""
    tag = unique("")
    alice, bob = f"s{tag}", f"r{tag}"
    a = await login(env, alice, "tcp")
    sessions = [f"B{tag}", f"a{tag}"]
    for sid in sessions:
        await create_session(a, [bob], sid)
    n = 0
    for k in range(330):
        for sid in sessions:
            a.send({"type": "message", "clientMsgId": f"p{n}", "sessionId": sid, "body": k})
            n += 1
    replies = [await a.next("message_reply") for _ in range(n)]
    assert all(r["ok"] for r in replies)
    b = await login(env, bob, "ws")
    got = [(f["sessionId"], f["seq"]) for f in b.sync]
    # seq 1 of each group is its members event (PROTOCOL.md 1.1)
    assert got == [(sid, seq) for sid in sessions for seq in range(1, 332)]
    assert b.done["count"] == n + len(sessions)
    a.close()
    b.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest_twisted.ensureDeferred
async def test_server_frames_larger_than_the_client_limit_are_delivered(env, transport):
    """A near-limit message (its message_send is bigger) or a big history page would never arrive."""
    alice, bob = users(2)
    a = await login(env, alice, "tcp")
    b = await login(env, bob, transport, gw=env.gw2)
    sid = p2p(alice, bob)
    frame = {"type": "message", "clientMsgId": "big", "sessionId": sid, "body": ""}
    frame["body"] = "x" * (65536 - len(json.dumps(frame, separators=(",", ":")).encode()))
    a.send(frame)
    assert (await a.next("message_reply"))["ok"] is True
    for n in range(3):
        assert (await a.message(sid, "y" * 60000))["ok"] is True
    live = await b.next("message_send")
    assert live["body"] == frame["body"]
    page = await b.history(sid)
    assert [len(m["body"]) for m in page["messages"]] == [len(frame["body"])] + [60000] * 3
    a.close()
    b.close()


def summary(client) -> list:
    """What a client received, with big bodies cut (a failure message stays readable)."""
    return [{k: (v[:20] + "..." if isinstance(v, str) and len(v) > 40 else v) for k, v in f.items()}
            for f in client.received]


async def send_big_backlog(env, sender: str, recipient: str, n: int, size: int = 60000) -> str:
    a = await login(env, sender, "tcp")
    sid = p2p(sender, recipient)
    for i in range(n):
        a.send({"type": "message", "clientMsgId": f"big{i}", "sessionId": sid, "body": "z" * size})
    for _ in range(n):
        assert (await a.next("message_reply"))["ok"] is True
    a.close()
    return sid


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest_twisted.ensureDeferred
async def test_reading_client_gets_a_big_sync_and_history(env, transport):
    """A reading client with a backlog of big messages was closed as a slow consumer on every sync."""
    alice, bob = users(2)
    sid = await send_big_backlog(env, alice, bob, 100)  # 6 MB: more than 4 x output_buffer_limit
    client = await connect(env.gw, transport)
    assert (await client.auth(env.token(bob)))["ok"] is True
    try:
        done = await client.receive_type("sync_done", 30)
    except FrameTimeout:
        raise AssertionError(f"no sync_done: {summary(client)[-3:]} "
                             f"close={getattr(client, 'close_code', None)}") from None
    assert done["count"] == 100
    client.send({"type": "history", "sessionId": sid, "limit": 200})
    page = await client.receive_type("history_reply", 30)
    assert len(page["messages"]) == 100
    assert client.connected
    client.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest_twisted.ensureDeferred
async def test_slow_consumer_is_closed(env, transport):
    """A client that stops reading would make the gateway buffer without bound."""
    alice, bob = users(2)
    sid = await send_big_backlog(env, alice, bob, 40)
    b = await login(env, bob, transport, gw=env.strict)  # reads its 2.4 MB sync: not slow
    assert b.done["count"] == 40
    before = await slow_consumer_closes(env.strict)
    b.client.pause_reading()
    for _ in range(4):  # ~10 MB of history_reply: more than the kernel's buffers hold
        b.send({"type": "history", "sessionId": sid, "limit": 200})
    keepalive = None
    if transport == "poll":
        # a polling client that stops polling is idle to the gateway, unlike a socket that stops
        # reading: its keepalive pings (POSTs) go on, as a real client's would
        from twisted.internet import task
        keepalive = task.LoopingCall(b.send, {"type": "ping"})
        keepalive.start(0.5)
    try:
        # bob reads nothing, so only the gateway can tell that it closed him
        await eventually(lambda: defer.ensureDeferred(slow_consumer_closes(env.strict)).addCallback(
            lambda n: n > before), WAIT, what="the strict gateway closing a slow consumer")
    finally:
        if keepalive is not None:
            keepalive.stop()
    b.client.resume_reading()
    closed = await wait_closed(b.client, 30)
    if transport == "ws":
        assert closed[0] == 4003, closed
    else:
        last = b.client.received[-1]
        assert last["type"] == "error" and last["code"] == "slow_consumer", summary(b.client)[-2:]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest_twisted.ensureDeferred
async def test_big_numbers_are_capped_or_clamped_not_refused(env, transport):
    """A limit "capped at 200" or a read "clamped to the last seq" would be refused when the number is huge."""
    alice, bob = users(2)
    a = await login(env, alice, transport)
    b = await login(env, bob, transport)
    sid = p2p(alice, bob)
    for n in range(3):
        await a.message(sid, n)
    huge = 2**64 + 5
    page = await a.history(sid, limit=huge)
    assert [m["seq"] for m in page["messages"]] == [1, 2, 3]
    page = await a.history(sid, beforeSeq=huge, limit=2)
    assert [m["seq"] for m in page["messages"]] == [2, 3]
    a.send({"type": "read", "sessionId": sid, "seq": huge})
    assert await b.next("read_receipt") == {"type": "read_receipt", "sessionId": sid, "userId": alice,
                                            "seq": 3}
    assert a.of_type("error") == []
    a.close()
    b.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest_twisted.ensureDeferred
async def test_messages_racing_a_login_arrive_live_or_in_the_sync(env, transport):
    """A message stored while its recipient logs in would fall between the sync and live delivery."""
    alice, bob = users(2)
    a = await login(env, alice, "tcp")
    sid = p2p(alice, bob)
    for n in range(150):
        a.send({"type": "message", "clientMsgId": f"r{n}", "sessionId": sid, "body": n})
        if n == 50:
            client = await connect(env.gw2, transport)
            client.send({"type": "auth", "token": env.token(bob)})
        if n % 10 == 0:
            await sleep(0.005)
    replies = [await a.next("message_reply") for _ in range(150)]
    expected = {r["msgId"] for r in replies}

    def got():
        return {f["msgId"] for f in client.received if f.get("type") == "message_send"}

    await eventually(lambda: got() >= expected, WAIT, "every message, live or in the sync")
    assert any(f.get("type") == "sync_done" for f in client.received)
    a.close()
    client.close()


@pytest_twisted.ensureDeferred
async def test_client_msg_id_is_unique_per_sender_only(env):
    """Two users choosing the same clientMsgId would get each other's message as a duplicate."""
    alice, bob = users(2)
    a = await login(env, alice, "tcp")
    b = await login(env, bob, "ws")
    sid = p2p(alice, bob)
    ra = await a.message(sid, "from alice", cmid="same-id")
    rb = await b.message(sid, "from bob", cmid="same-id")
    assert ra["ok"] and rb["ok"] and ra["msgId"] != rb["msgId"] and (ra["seq"], rb["seq"]) == (1, 2)
    a.close()
    b.close()


@pytest_twisted.ensureDeferred
async def test_tcp_keepalive_pings_keep_an_idle_connection_open(env):
    """A TCP client that only sends keepalive pings would be closed as idle."""
    client = await connect(env.strict, "tcp")
    assert (await client.auth(env.strict_token(unique("u"))))["ok"] is True
    for _ in range(4):  # 4 s of pings, one a second: longer than the 2.5 s idle timeout
        await sleep(1.0)
        client.send({"type": "ping"})
        assert (await client.receive_type("pong")) == {"type": "pong"}
    assert client.connected
    client.close()


@pytest_twisted.ensureDeferred
async def test_message_rejected_by_moderation(env):
    """A message the moderation refuses would be stored, delivered, or answered in another shape."""
    alice, bob = users(2)
    a = await login(env, alice, "tcp")
    b = await login(env, bob, "ws")
    sid = p2p(alice, bob)
    badwords = Path(__file__).resolve().parents[1] / "imcluster" / "data" / "badwords.txt"
    with open(badwords, encoding="utf-8") as f:  # the default keyword filter's list
        word = next(w.strip() for w in f if w.strip() and not w.startswith("#"))
    reply = await a.message(sid, {"text": f"well {word} this"}, cmid="mod-1")
    assert set(reply) == {"type", "ok", "clientMsgId", "error"}, reply
    assert reply["ok"] is False and reply["clientMsgId"] == "mod-1" and reply["error"]["code"] == "rejected"
    ok = await a.message(sid, "fine")
    assert ok["seq"] == 1  # nothing was stored for the rejected one
    assert [f["msgId"] for f in [await b.next("message_send")]] == [ok["msgId"]]
    a.close()
    b.close()


# ====================================================================== HTTP streaming transport


async def ucir_fields(env, user: str) -> dict:
    """``UCIR##<user>`` in Redis (ARCHITECTURE.md): the user's live connections."""
    from imcluster.registry import RedisService
    from tests.support.ids import REDIS_URL

    svc = RedisService(REDIS_URL, prefix=env.cluster.redis_prefix, timeout=TEST_TIMEOUT)
    await svc.startService()
    try:
        fields = await svc.execute("HGETALL", env.cluster.redis_prefix + f"UCIR##{{{user}}}")
    finally:
        await svc.stopService()
    if isinstance(fields, dict):
        return fields
    fields = list(fields or [])
    return dict(zip(fields[::2], fields[1::2]))


@pytest.mark.parametrize("transport", STREAMS)
@pytest_twisted.ensureDeferred
async def test_stream_resume_after_a_drop_gets_every_frame_once(env, transport):
    """A client whose event stream (or poll) dropped would lose frames, or get some twice, on resuming."""
    alice, bob = users(2)
    a = await login(env, alice, "tcp")
    b = await login(env, bob, transport, gw=env.gw2)
    sid = p2p(alice, bob)
    first = await a.message(sid, 0)
    assert (await b.next("message_send"))["msgId"] == first["msgId"]
    # frames written to a stream the client no longer reads, then the stream drops (a proxy,
    # a flaky network) while messages keep coming: the client resumes from the last id it has
    b.client.pause_reading()
    sent = [first["msgId"]] + [(await a.message(sid, n))["msgId"] for n in range(1, 15)]
    await sleep(QUIET)
    listening = b.client._listening
    if listening is not None and listening.transport is not None:
        listening.transport.abortConnection()
    sent += [(await a.message(sid, n))["msgId"] for n in range(15, 30)]
    b.client.resume_reading()
    await eventually(lambda: len(b.of_type("message_send")) >= 30, WAIT, "30 deliveries after the resume")
    await sleep(QUIET)
    assert [f["msgId"] for f in b.of_type("message_send")] == sent
    a.close()
    b.close()


@pytest.mark.parametrize("transport", STREAMS)
@pytest_twisted.ensureDeferred
async def test_stream_connection_without_a_stream_is_closed_like_a_socket(env, transport):
    """A streaming client that went away would stay online (in Redis) forever."""
    user = unique("u")
    b = await login(env, user, transport, gw=env.strict)
    assert len(await ucir_fields(env, user)) == 1
    stream_id = b.client.stream_id
    b.close()  # no event stream, no poll from now on
    started = time.monotonic()

    async def gone() -> bool:
        return await ucir_fields(env, user) == {}

    await eventually(lambda: defer.ensureDeferred(gone()), STRICT_STREAM_RESUME + WAIT,
                     what="the connection's UCIR entry removed")
    assert time.monotonic() - started >= STRICT_STREAM_RESUME - 0.5
    r = await http_call(env.strict.stream_port, "GET", f"/stream/{stream_id}?after=0")
    assert r.status == 404
    r = await http_call(env.strict.stream_port, "POST", f"/stream/{stream_id}", {"type": "ping"})
    assert r.status == 404


@pytest_twisted.ensureDeferred
async def test_stream_resume_from_before_what_is_kept_closes_with_resume_lost(env):
    """A resume the gateway can no longer honour would silently skip frames instead of closing."""
    alice, bob = users(2)
    await send_big_backlog(env, alice, bob, 30)  # 1.8 MB: more than stream_resume_bytes
    b = await login(env, bob, "stream")
    assert b.done["count"] == 30
    b.client.pause_reading()
    b.client._listening.transport.abortConnection()
    b.client.last_id = 1  # as a client that lost everything after its first event
    b.client.resume_reading()
    closed = await wait_closed(b.client)
    assert closed is None
    assert b.client.received[-1]["type"] == "error" and b.client.received[-1]["code"] == "resume_lost"


@pytest_twisted.ensureDeferred
async def test_stream_id_is_an_unguessable_capability_not_the_token(env):
    """The stream id would be guessable, the token itself, or the token/id would reach a URL or a log."""
    user = unique("u")
    token = env.token(user)
    ids = []
    for _ in range(2):
        r = await http_call(env.gw.stream_port, "POST", "/stream", {"type": "auth", "token": token})
        assert r.status == 200 and r.json["ok"] is True
        ids.append(r.json["stream"])
    for stream_id in ids:
        assert len(stream_id) >= 22 and token not in stream_id and stream_id not in token  # >= 128 bits
    assert ids[0] != ids[1]
    guess = ids[0][:-2] + ("AA" if not ids[0].endswith("AA") else "BB")
    assert (await http_call(env.gw.stream_port, "GET", f"/stream/{guess}?after=0")).status == 404
    assert (await http_call(env.gw.stream_port, "POST", f"/stream/{guess}", {"type": "ping"})).status == 404
    refused = await http_call(env.gw.stream_port, "POST", "/stream", {"type": "auth", "token": "not.a.jwt"})
    assert refused.json["ok"] is False and "stream" not in refused.json
    assert refused.json["error"]["code"] == "invalid_token"
    # a bad auth leaves nothing: the gateway's log names neither the token nor an id
    log = env.gw.log_text()
    assert token not in log and not any(i in log for i in ids)


@pytest_twisted.ensureDeferred
async def test_stream_bodies_over_the_frame_size_are_413(env):
    """A streaming client could make the gateway hold a body of any size."""
    big = json.dumps({"type": "auth", "token": "x" * 70000}).encode()
    r = await http_call(env.gw.stream_port, "POST", "/stream", raw=big)
    assert r.status == 413
    b = await login(env, unique("u"), "poll")
    r = await http_call(env.gw.stream_port, "POST", f"/stream/{b.client.stream_id}", raw=b" " * 65537)
    assert r.status == 413
    await wait_closed(b.client)
    assert b.client.received[-1]["code"] == "too_large"


@pytest_twisted.ensureDeferred
async def test_stream_listener_has_a_header_deadline(env):
    """A client trickling its request headers (slowloris) would hold a stream socket forever."""
    from tests.support.clients import connect_tcp as raw_connect
    client = await raw_connect(env.strict.stream_port)
    client.send_raw(b"GET /stream/x?after=0 HTTP/1.1\r\nHost: a\r\n")
    started = time.monotonic()
    for _ in range(10):
        if not client.connected:
            break
        await sleep(0.3)
        if client.connected:
            client.send_raw(b"X-Slow: 1\r\n")
    await wait_closed(client, 5)
    assert time.monotonic() - started < STRICT_HEADER_TIMEOUT + 2


@pytest_twisted.ensureDeferred
async def test_stream_cors_for_allowed_origins_only(env):
    """A page of an allowed origin could not use the stream endpoint, or any other origin could."""
    port = env.strict.stream_port
    pre = await http_call(port, "OPTIONS", "/stream", headers={
        "Origin": STRICT_ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    assert pre.status == 204 and pre.header("access-control-allow-origin") == STRICT_ORIGIN
    assert "POST" in pre.header("access-control-allow-methods")
    assert "content-type" in pre.header("access-control-allow-headers").lower()
    ok = await http_call(port, "POST", "/stream", {"type": "auth", "token": env.strict_token(unique("u"))},
                         headers={"Origin": STRICT_ORIGIN})
    assert ok.status == 200 and ok.header("access-control-allow-origin") == STRICT_ORIGIN
    evil = await http_call(port, "POST", "/stream", {"type": "auth", "token": env.strict_token(unique("u"))},
                           headers={"Origin": "http://evil.example"})
    assert evil.status == 403 and evil.header("access-control-allow-origin") is None

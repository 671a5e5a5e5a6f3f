"""PROTOCOL.md 1.1 "Typing" and "Presence" on a real cluster, statement by statement.

Real ``twistd imgateway`` (two of them) and ``twistd improcessor``
processes, raw WebSocket, TCP and HTTP streaming clients, as in
tests/test_protocol_conformance.py (whose client helpers this module
reuses). The conformance statements run on every transport; the
integration ones (two gateways, rate limit, flaps, a gateway killed with
SIGKILL, webhook events) on WebSocket and TCP.
"""

from __future__ import annotations

import json
import time

import pytest
import pytest_twisted
from twisted.internet import defer, threads

from tests.support.bus import cleanup_namespace
from tests.support.cluster import Cluster, _delete_redis_prefix
from tests.support.ids import POSTGRES_DSN, unique
from tests.support.postgres import drop_schema
from tests.support.waiting import eventually, sleep
from tests.test_protocol_conformance import Conn, create_session, p2p
from tests.test_protocol_conformance import login as _login

pytestmark = pytest.mark.slow

TRANSPORTS = ["ws", "tcp", "stream", "poll"]
WAIT = 15.0
#: PROTOCOL.md: presence changes reach subscribers within 5 s
PRESENCE_BOUND = 5.0
PRESENCE_MAX = 5
TYPING_INTERVAL = 1.0


class Env:
    """Two gateways and a processor; ``gw`` and ``gw2`` as the conformance helpers expect."""

    def __init__(self, cluster: Cluster, gw, gw2) -> None:
        self.cluster = cluster
        self.gw = gw
        self.gw2 = gw2
        self.strict = None

    def token(self, user: str, ttl: float = 3600, **claims) -> str:
        return self.cluster.token(user, ttl, **claims)


@pytest_twisted.async_yield_fixture(scope="module")
async def env(tmp_path_factory):
    from imcluster.db import apply_migrations_sync

    namespace = unique("imp")
    prefix = unique("imp:") + ":"
    schema = unique("imt_p")
    apply_migrations_sync(POSTGRES_DSN, schema, 10.0)
    cluster = Cluster(tmp_path_factory.mktemp("presence"), namespace, prefix, schema)
    try:
        opts = dict(rate_limit=2000, rate_burst=2000, presence_max=PRESENCE_MAX, typing_interval=TYPING_INTERVAL,
                    webhook_url="http://127.0.0.1:9/hooks")
        gws = await defer.gatherResults([cluster.start_gateway(**opts), cluster.start_gateway(**opts)],
                                        consumeErrors=True)
        await cluster.start_processor()
        yield Env(cluster, *gws)
    finally:
        await cluster.shutdown()
        if cluster.processes:
            print(cluster.report())
        await cleanup_namespace(namespace, [f"{namespace}.webhooks", *cluster.extra_queues], cluster.amqp_url)
        await _delete_redis_prefix(prefix)
        drop_schema(schema)


_OPEN: list[Conn] = []


async def login(*args, **kw) -> Conn:
    """The conformance suite's login; the connection is closed after the test."""
    conn = await _login(*args, **kw)
    _OPEN.append(conn)
    return conn


@pytest.fixture(autouse=True)
def _close_connections():
    """A streaming client left open polls a gateway that is gone after the module: close them all."""
    yield
    while _OPEN:
        _OPEN.pop().close()


async def quiet(conn: Conn, frame_type: str, seconds: float = 0.6) -> list[dict]:
    """The frames of ``frame_type`` that arrive within ``seconds`` (none expected, usually)."""
    before = len(conn.of_type(frame_type))
    await sleep(seconds)
    return conn.of_type(frame_type)[before:]


async def subscribe(conn: Conn, users: list[str]) -> dict:
    rid = unique("r")
    reply = await conn.request({"type": "presence_subscribe", "id": rid, "users": users}, "presence_reply")
    assert reply.get("id") == rid, reply
    return reply


async def next_presence(conn: Conn, user: str, online: bool, timeout: float = WAIT) -> tuple[dict, float]:
    """The next ``presence`` frame about ``user``; it must say ``online``. Returns it and how long it took."""
    start = time.monotonic()
    while True:
        frame = await conn.next("presence", timeout)
        if frame["userId"] == user:
            assert frame["online"] is online, frame
            return frame, time.monotonic() - start


# ============================================================ conformance, every transport


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest_twisted.ensureDeferred
async def test_typing_reaches_the_other_members_and_the_senders_other_devices(env, transport):
    """A member's "typing..." must show on the other members' screens and the sender's other devices."""
    alice, bob = unique("alice"), unique("bob")
    a1 = await login(env, alice, transport)
    a2 = await login(env, alice, "ws", gw=env.gw2)
    b1 = await login(env, bob, transport, gw=env.gw2)
    b2 = await login(env, bob, "tcp")
    session = (await create_session(a1, [bob]))["sessionId"]
    a1.send({"type": "typing", "sessionId": session})
    for conn in (a2, b1, b2):
        frame = await conn.next("typing")
        assert frame == {"type": "typing", "sessionId": session, "userId": alice}
    assert await quiet(a1, "typing") == [], "the sending connection gets no typing back"
    assert a1.of_type("error") == [] and a1.of_type("typing_reply") == []


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest_twisted.ensureDeferred
async def test_typing_in_a_1to1_session_that_has_no_message_yet(env, transport):
    """Typing the very first message to someone must show up: the 1:1 session exists implicitly."""
    alice, bob = unique("alice"), unique("bob")
    a = await login(env, alice, transport)
    b = await login(env, bob, transport, gw=env.gw2)
    a.send({"type": "typing", "sessionId": p2p(alice, bob)})
    assert await b.next("typing") == {"type": "typing", "sessionId": p2p(alice, bob), "userId": alice}


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest_twisted.ensureDeferred
async def test_typing_from_a_non_member_is_not_member(env, transport):
    """An outsider must not be able to show "typing..." in someone else's conversation."""
    alice, bob, eve = unique("alice"), unique("bob"), unique("eve")
    a = await login(env, alice, transport)
    b = await login(env, bob, "ws")
    e = await login(env, eve, transport, gw=env.gw2)
    session = (await create_session(a, [bob]))["sessionId"]
    e.send({"type": "typing", "sessionId": session, "id": "t-1"})
    err = await e.next("error")
    assert err["code"] == "not_member" and err.get("ref") == "t-1", err
    e.send({"type": "typing", "sessionId": p2p(alice, bob)})
    assert (await e.next("error"))["code"] == "not_member"
    assert await quiet(b, "typing") == [] and await quiet(a, "typing", 0.1) == []


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest_twisted.ensureDeferred
async def test_typing_bad_frames(env, transport):
    """A typing frame without a session must be refused like any malformed frame, the connection kept."""
    a = await login(env, unique("alice"), transport)
    for frame in ({"type": "typing"}, {"type": "typing", "sessionId": 7}, {"type": "typing", "sessionId": ""}):
        a.send(frame)
        assert (await a.next("error"))["code"] == "bad_frame"


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest_twisted.ensureDeferred
async def test_presence_subscribe_reply_then_changes(env, transport):
    """A contact list must show who is online now, then follow each login and logout live."""
    alice, bob, carol = unique("alice"), unique("bob"), unique("carol")
    a = await login(env, alice, transport)
    b = await login(env, bob, "tcp", gw=env.gw2)
    reply = await subscribe(a, [bob, carol])
    assert reply["ok"] is True
    entries = {e["userId"]: e for e in reply["users"]}
    assert set(entries) == {bob, carol}
    assert entries[bob]["online"] is True and isinstance(entries[bob]["since"], int)
    assert abs(entries[bob]["since"] - time.time() * 1000) < 60_000
    assert entries[carol] == {"userId": carol, "online": False}
    c = await login(env, carol, "ws")
    frame, took = await next_presence(a, carol, True)
    assert set(frame) == {"type", "userId", "online", "ts"} and took < PRESENCE_BOUND
    b.close()
    frame, took = await next_presence(a, bob, False)
    assert took < PRESENCE_BOUND and frame["ts"] >= entries[bob]["since"]
    # unsubscribed: nothing more about carol
    rid = unique("r")
    reply = await a.request({"type": "presence_unsubscribe", "id": rid, "users": [carol]}, "presence_reply")
    assert reply == {"type": "presence_reply", "id": rid, "ok": True, "users": []}
    c.close()
    assert [f for f in await quiet(a, "presence", 1.5) if f["userId"] == carol] == []
    assert a.of_type("error") == []


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest_twisted.ensureDeferred
async def test_presence_max_is_too_large_and_changes_nothing(env, transport):
    """A client asking for more than presence_max users must be told why, and keep what it had."""
    alice = unique("alice")
    a = await login(env, alice, transport)
    first = [unique("f") for _ in range(PRESENCE_MAX - 1)]
    assert (await subscribe(a, first))["ok"] is True
    rid = unique("r")
    reply = await a.request({"type": "presence_subscribe", "id": rid, "users": [unique("x"), unique("y")]},
                            "presence_reply")
    assert reply["ok"] is False and reply["error"]["code"] == "too_large" and reply["id"] == rid, reply
    # the first ones are still followed: one of them logging in is told
    assert (await subscribe(a, [first[0], unique("z")]))["ok"] is True  # exactly at the limit
    await login(env, first[0], "ws", gw=env.gw2)
    await next_presence(a, first[0], True)


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest_twisted.ensureDeferred
async def test_presence_bad_frames(env, transport):
    """Malformed presence frames must be refused, the connection kept."""
    a = await login(env, unique("alice"), transport)
    for frame in ({"type": "presence_subscribe"}, {"type": "presence_subscribe", "users": "bob"},
                  {"type": "presence_subscribe", "users": ["a#b"]}, {"type": "presence_unsubscribe"}):
        a.send(frame)
        assert (await a.next("error"))["code"] == "bad_frame"


# ============================================================ integration, two gateways


@pytest_twisted.ensureDeferred
async def test_typing_rate_limit_one_a_second_per_connection_and_session(env):
    """A client hammering "typing" must cost the others one frame a second per session, not a flood."""
    alice, bob = unique("alice"), unique("bob")
    a = await login(env, alice, "tcp")
    b = await login(env, bob, "ws", gw=env.gw2)
    s1 = (await create_session(a, [bob]))["sessionId"]
    s2 = (await create_session(a, [bob]))["sessionId"]
    for _ in range(20):
        a.send({"type": "typing", "sessionId": s1})
        a.send({"type": "typing", "sessionId": s2})
    await sleep(0.8)
    got = b.of_type("typing")
    assert sorted(f["sessionId"] for f in got) == sorted([s1, s2]), got
    await sleep(TYPING_INTERVAL)
    a.send({"type": "typing", "sessionId": s1})
    await eventually(lambda: len(b.of_type("typing")) == 3, WAIT, what="the next second's typing")
    assert [f["sessionId"] for f in await quiet(b, "typing", 0.5)] == []
    assert a.of_type("error") == []


@pytest_twisted.ensureDeferred
async def test_presence_flaps_never_repeat_a_state(env):
    """A user flapping between online and offline must never be shown twice in a row in one state."""
    alice, bob = unique("alice"), unique("bob")
    a = await login(env, alice, "ws")
    a2 = await login(env, alice, "tcp", gw=env.gw2)
    await subscribe(a, [bob])
    await subscribe(a2, [bob])
    for i in range(8):
        gw = env.gw if i % 2 else env.gw2
        b = await login(env, bob, "ws" if i % 3 else "tcp", gw=gw)
        if i % 2:
            # a second device overlapping the first: no change at all
            b2 = await login(env, bob, "tcp", gw=env.gw2)
            b.close()
            await sleep(0.05)
            b2.close()
        else:
            b.close()
    await sleep(3.0)
    for conn in (a, a2):
        states = [f["online"] for f in conn.of_type("presence") if f["userId"] == bob]
        assert states, "the flaps must show"
        assert all(x != y for x, y in zip(states, states[1:])), states
        assert states[0] is True and states[-1] is False, states
        stamps = [f["ts"] for f in conn.of_type("presence") if f["userId"] == bob]
        assert stamps == sorted(stamps)


@pytest_twisted.ensureDeferred
async def test_presence_second_device_is_no_change_and_last_one_is(env):
    """Opening a second device must not show as a change; closing both must show offline once."""
    alice, bob = unique("alice"), unique("bob")
    a = await login(env, alice, "ws")
    b1 = await login(env, bob, "ws", gw=env.gw2)
    await subscribe(a, [bob])
    b2 = await login(env, bob, "tcp")
    b1.close()
    assert [f for f in await quiet(a, "presence", 1.5) if f["userId"] == bob] == []
    b2.close()
    await next_presence(a, bob, False)


def _drain_webhooks(amqp_url: str, queue: str) -> list[dict]:
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        ch = conn.channel()
        out = []
        while True:
            method, props, body = ch.basic_get(queue, auto_ack=True)
            if method is None:
                return out
            assert props.delivery_mode == 2, "events must be persistent"
            events = json.loads(body)
            assert isinstance(events, list)
            out.extend(events)
    finally:
        conn.close()


@pytest_twisted.ensureDeferred
async def test_presence_webhook_events(env):
    """A business server must hear user.online and user.offline once per change, with a unique eventId."""
    bob = unique("bob")
    queue = f"{env.cluster.namespace}.webhooks"
    b = await login(env, bob, "ws", gw=env.gw2)
    b2 = await login(env, bob, "tcp")
    b.close()
    await sleep(0.5)
    b2.close()
    deadline = time.monotonic() + WAIT
    mine: list[dict] = []
    while time.monotonic() < deadline:
        events = await threads.deferToThread(_drain_webhooks, env.cluster.amqp_url, queue)
        mine += [e for e in events if e["data"]["userId"] == bob]
        if any(e["event"] == "user.offline" for e in mine):
            break
        await sleep(0.3)
    assert [e["event"] for e in mine] == ["user.online", "user.offline"], mine
    for e in mine:
        assert set(e) == {"event", "eventId", "key", "data"} and e["key"] == f"user:{bob}"
        assert set(e["data"]) == {"userId", "ts"} and len(e["eventId"]) == 32
    assert mine[0]["eventId"] != mine[1]["eventId"] and mine[0]["data"]["ts"] < mine[1]["data"]["ts"]


# ============================================================ a gateway killed without exiting


@pytest_twisted.ensureDeferred
async def test_presence_of_a_killed_gateways_users_turns_offline_fast(cluster, pg_schema):
    """Users of a gateway that crashed must show offline within seconds, not after --server-ttl."""
    ttl = 60.0
    grace = 2.0
    opts = dict(server_ttl=ttl, heartbeat=20.0)
    gw1 = await cluster.start_gateway(**opts)
    gw2 = await cluster.start_gateway(**opts)
    await cluster.start_processor(presence_grace=grace, presence_check=0.5, **opts)
    env = Env(cluster, gw1, gw2)
    alice, bob, carol = unique("alice"), unique("bob"), unique("carol")
    a = await login(env, alice, "ws")
    await login(env, bob, "tcp", gw=gw2)
    await login(env, carol, "ws", gw=gw2)
    c2 = await login(env, carol, "ws")  # carol is on gw1 too: she stays online
    await sleep(1.0)  # the processor sees gw2's liveness channel at least once
    reply = await subscribe(a, [bob, carol])
    assert all(e["online"] for e in reply["users"])
    start = time.monotonic()
    assert await gw2.kill() == -9
    frame, _ = await next_presence(a, bob, False, timeout=ttl)
    took = time.monotonic() - start
    print(f"offline {took:.2f}s after SIGKILL (presence_grace {grace}s, --server-ttl {ttl}s)")
    assert took < grace + 4.0 < ttl, f"offline after {took:.1f}s (grace {grace}s, --server-ttl {ttl}s)"
    assert [f for f in await quiet(a, "presence", 1.0) if f["userId"] == carol] == []
    # and the presence of a user who comes back on the surviving gateway follows
    await login(env, bob, "ws")
    await next_presence(a, bob, True, timeout=PRESENCE_BOUND)
    assert c2.client.connected


@pytest_twisted.ensureDeferred
async def test_presence_of_a_killed_gateway_without_the_liveness_watch_within_server_ttl(cluster, pg_schema):
    """Without the liveness watch, a crashed gateway's users must still go offline within --server-ttl."""
    ttl = 4.0
    gw1 = await cluster.start_gateway(server_ttl=ttl, heartbeat=1.0)
    gw2 = await cluster.start_gateway(server_ttl=ttl, heartbeat=1.0)
    await cluster.start_processor(presence_check=0, server_ttl=ttl, heartbeat=1.0)
    env = Env(cluster, gw1, gw2)
    alice, bob = unique("alice"), unique("bob")
    a = await login(env, alice, "tcp")
    await login(env, bob, "ws", gw=gw2)
    assert (await subscribe(a, [bob]))["users"][0]["online"] is True
    start = time.monotonic()
    assert await gw2.kill() == -9
    await next_presence(a, bob, False, timeout=ttl + 10)
    took = time.monotonic() - start
    print(f"offline {took:.2f}s after SIGKILL without the liveness watch (--server-ttl {ttl}s)")
    # the key expires at most --server-ttl after the last refresh; the reaper runs every --heartbeat
    assert took <= ttl + 1.0 + 1.5, f"offline after {took:.1f}s (--server-ttl {ttl}s, --heartbeat 1s)"

"""End to end: real ``twistd imgateway`` and ``twistd improcessor`` processes, real WS and TCP clients.

Two gateways and two processors on the test's namespace, Redis prefix and
PostgreSQL schema (tests/support/cluster.py), heartbeat 1 s and server TTL
3 s so that expiry and reaping fit in a test.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict

import pytest
import pytest_twisted
from twisted.internet import defer

from imcluster.registry import RedisService
from tests.support.clients import connect_tcp, connect_ws
from tests.support.ids import REDIS_URL
from tests.support.postgres import admin_connection
from tests.support.waiting import eventually as _eventually, sleep

pytestmark = pytest.mark.slow

WAIT = 30.0


def eventually(check, timeout: float = WAIT, what: str = "condition"):
    return _eventually(check, timeout, what)


def query(schema: str, sql: str, *args) -> list:
    conn = admin_connection()
    try:
        cur = conn.cursor()
        cur.execute(f'SET search_path TO "{schema}"')
        cur.execute(sql, args or None)
        return cur.fetchall()
    finally:
        conn.close()


class User:
    """One connected client and everything it received, split by type."""

    def __init__(self, name: str, client) -> None:
        self.name = name
        self.client = client
        self.server_id = None
        self.sync_count = None

    async def login(self, token: str) -> "User":
        reply = await self.client.auth(token)
        assert reply["ok"], reply
        self.server_id = reply["serverId"]
        done = await self.client.receive_type("sync_done", timeout=WAIT)
        self.sync_count = done["count"]
        return self

    def of_type(self, kind: str) -> list[dict]:
        return [f for f in self.client.received if f.get("type") == kind]


async def connect(cluster, gateway, name: str, tcp: bool) -> User:
    client = await (connect_tcp(gateway.tcp_port) if tcp else connect_ws(gateway.ws_url))
    return await User(name, client).login(cluster.token(name))


async def start(cluster, gateways: int = 2, processors: int = 2, **processor_opts):
    gws = await defer.gatherResults([cluster.start_gateway() for _ in range(gateways)])
    prs = []
    for _ in range(processors):  # one at a time: readiness counts consumers
        prs.append(await cluster.start_processor(**processor_opts))
    return gws, prs


async def send_all(senders: list[User], session: str, per_sender: int, pace: float = 0.0) -> None:
    """Every sender sends ``per_sender`` messages, all interleaved (no waiting for replies)."""
    for n in range(per_sender):
        for u in senders:
            u.client.send({"type": "message", "clientMsgId": f"{u.name}-{n}", "sessionId": session,
                           "body": {"n": n, "by": u.name}})
        if pace:
            await sleep(pace)


async def replies_of(users: list[User], n: int) -> list[dict]:
    """Every reply once ``n`` distinct clientMsgIds of each user are answered (a resend repeats its reply)."""
    await eventually(lambda: all(len({r["clientMsgId"] for r in u.of_type("message_reply")}) >= n
                                 for u in users), WAIT, f"{n} messages of each answered")
    return [r for u in users for r in u.of_type("message_reply")]


def plain(frames: list[dict]) -> list[dict]:
    """``message_send`` frames of messages, not of the 1.1 events (which carry a ``kind``)."""
    return [f for f in frames if "kind" not in f]


@pytest_twisted.ensureDeferred
async def test_200_concurrent_messages_from_4_senders_land_in_order_once_for_everyone(cluster, pg_schema):
    """Concurrent senders on two gateways and two processors would get gaps, duplicates or lost deliveries."""
    gws, _ = await start(cluster)
    names = ["s0", "s1", "s2", "s3", "r0", "r1"]
    users = [await connect(cluster, gws[n % 2], name, tcp=n % 3 == 0) for n, name in enumerate(names)]
    senders = users[:4]
    senders[0].client.send({"type": "session_create", "id": "c", "sessionId": "room",
                            "members": names[1:]})
    created = await senders[0].client.receive_type("session_reply", timeout=WAIT)
    assert created["ok"] and created["members"] == sorted(names)
    await send_all(senders, "room", 50)
    replies = await replies_of(senders, 50)
    assert all(r["ok"] for r in replies), [r for r in replies if not r["ok"]][:3]
    # seq 1 is the group's members event (PROTOCOL.md 1.1); nothing answered twice either
    assert sorted(r["seq"] for r in replies) == list(range(2, 202))
    by_msg = {r["msgId"]: r for r in replies}
    assert len(by_msg) == 200
    for u in users:
        expected = {m for m, r in by_msg.items() if not r["clientMsgId"].startswith(u.name + "-")}
        await eventually(lambda u=u, e=expected: len(plain(u.of_type("message_send"))) >= len(e), WAIT,
                         f"{u.name} receives {len(expected)} messages")
        got = Counter(f["msgId"] for f in plain(u.of_type("message_send")))
        assert set(got) == expected and max(got.values()) == 1, u.name  # each exactly once
        # per sender, in the order sent (one session, seq increasing)
        for s in senders:
            seqs = [f["seq"] for f in u.of_type("message_send") if f["from"] == s.name]
            assert seqs == sorted(seqs)
    rows = query(pg_schema, "SELECT seq FROM messagerecv WHERE session_id = 'room' ORDER BY seq")
    assert [s for (s,) in rows] == list(range(1, 202))
    for u in users:
        u.client.close()


@pytest_twisted.ensureDeferred
async def test_kill_9_of_a_processor_mid_stream_loses_and_duplicates_nothing(cluster, pg_schema):
    """A processor crash would lose accepted messages, store some twice, or leave members without them."""
    gws, prs = await start(cluster, batch_size=20)
    names = ["s0", "s1", "s2", "s3", "r0"]
    users = [await connect(cluster, gws[n % 2], name, tcp=n % 2 == 1) for n, name in enumerate(names)]
    senders = users[:4]
    senders[0].client.send({"type": "session_create", "id": "c", "sessionId": "room", "members": names[1:]})
    assert (await senders[0].client.receive_type("session_reply", timeout=WAIT))["ok"]
    sending = defer.Deferred.fromCoroutine(send_all(senders, "room", 50, pace=0.01))
    await eventually(lambda: sum(len(u.of_type("message_reply")) for u in senders) >= 40, WAIT, "40 replies")
    assert await prs[0].kill() == -9
    await sending
    replies = await replies_of(senders, 50)
    assert all(r["ok"] for r in replies)
    by_cmid = defaultdict(set)
    for r in replies:
        by_cmid[r["clientMsgId"]].add((r["msgId"], r["seq"]))
    assert len(by_cmid) == 200 and all(len(v) == 1 for v in by_cmid.values())  # a resend repeats the original
    rows = query(pg_schema, "SELECT seq, sender_id, client_msg_id FROM messagerecv WHERE kind = 'message' "
                            "ORDER BY seq")
    assert [r[0] for r in rows] == list(range(2, 202))  # seq 1: the group's members event (PROTOCOL.md 1.1)
    assert len({(r[1], r[2]) for r in rows}) == 200
    msg_ids = {m for v in by_cmid.values() for m, _ in v}
    for u in users:
        mine = {m for c, v in by_cmid.items() if c.startswith(u.name + "-") for m, _ in v}
        await eventually(lambda u=u, e=msg_ids - mine: {f["msgId"] for f in u.of_type("message_send")} >= e,
                         WAIT, f"{u.name} has every message")
    assert prs[1].running


@pytest_twisted.ensureDeferred
async def test_kill_9_of_a_gateway_reaps_it_and_its_users_sync_on_reconnect(cluster, pg_schema, redis_prefix):
    """A crashed gateway would leave its users 'online' for ever and their messages undelivered."""
    gws, _ = await start(cluster, processors=1)
    alice = await connect(cluster, gws[0], "alice", tcp=False)
    bob = await connect(cluster, gws[1], "bob", tcp=True)
    dead_id = bob.server_id
    redis = RedisService(REDIS_URL, prefix=redis_prefix, timeout=5.0)
    await redis.startService()
    try:
        assert await redis.connections_of(["bob"]) != {"bob": {}}
        assert await gws[1].kill() == -9
        killed_at = time.monotonic()
        for n in range(5):
            alice.client.send({"type": "message", "clientMsgId": f"a{n}", "sessionId": "p2p:alice:bob",
                               "body": {"n": n}})
        replies = await replies_of([alice], 5)
        assert all(r["ok"] for r in replies)

        async def reaped() -> bool:
            return (await redis.connections_of(["bob"]) == {"bob": {}}
                    and dead_id not in await redis.servers())

        await eventually(reaped, 10.0, "the dead gateway reaped")
        # server_ttl 3 s + heartbeat 1 s, plus the polling and a busy machine
        assert time.monotonic() - killed_at < 3.0 + 1.0 + 2.0
        assert await redis.connections_of(["alice"]) != {"alice": {}}  # the live gateway's users stay
    finally:
        await redis.stopService()
    back = await connect(cluster, gws[0], "bob", tcp=True)
    assert back.sync_count == 5
    assert [f["body"] for f in back.of_type("message_send")] == [{"n": n} for n in range(5)]
    back.client.send({"type": "message_send_reply", "msgIds": [f["msgId"] for f in back.of_type("message_send")]})
    await eventually(lambda: query(pg_schema, "SELECT count(*) FROM messagesend WHERE status = 'delivered'")
                     == [(5,)], WAIT, "acknowledged rows delivered")

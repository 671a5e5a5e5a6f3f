"""ProcessorService in-process on the real RabbitMQ, Redis and PostgreSQL.

The test plays the gateways: it registers gateways and connections in Redis
through the registry, publishes items to ``<ns>.server`` and consumes the
``<ns>.gateway.<uuid>`` queues (docs/internals.rst).
"""

from __future__ import annotations

import json
import time
import uuid as uuidlib
from collections import defaultdict

import pytest
import pytest_twisted
from twisted.internet import defer

from imcluster.config import PROCESSOR, load_config
from imcluster.processor.filters import KeywordFilter
from imcluster.processor.reaper import Reaper
from imcluster.processor.service import ProcessorService
from imcluster.store.postgres import MessageStore
from tests.support.postgres import terminate_backends
from tests.support.waiting import eventually as _eventually, sleep

WAIT = 10.0


def eventually(check, timeout: float = WAIT, what: str = "condition"):
    return _eventually(check, timeout, what)
INFO = {"ip": "127.0.0.1", "port": 1, "tcpPort": 2, "startedAt": 0}


class Gateways:
    """The test as gateways: Redis entries through the registry, queues on its own bus."""

    def __init__(self, bus, registry):
        self.bus = bus
        self.registry = registry
        self.frames = defaultdict(list)  # conn_id -> frames received, in order
        self.bodies = defaultdict(list)  # gateway uuid -> bodies
        self.ports = 0

    async def add(self, queue: bool = True, ttl: float = 60.0) -> str:
        uuid = uuidlib.uuid4().hex
        await self.registry.register_server(uuid, INFO, ttl)
        if queue:
            await self.bus.consume(self.bus.gateway_queue(uuid), lambda m, u=uuid: self._got(u, m), prefetch=100)
        return uuid

    def _got(self, uuid, msg):
        body = json.loads(msg.body)
        self.bodies[uuid].append(body)
        for item in body["items"]:
            for conn_id in item["connIds"]:
                self.frames[conn_id].extend(item["frames"])
        msg.ack()

    async def connect(self, uuid: str, user: str) -> str:
        self.ports += 1
        await self.registry.add_connections(uuid, [(user, "10.1.1.1", self.ports, {"device": None})])
        return f"{uuid}##10.1.1.1##{self.ports}"

    def send(self, *items) -> defer.Deferred:
        body = json.dumps({"v": 1, "items": list(items)}).encode()
        return self.bus.publish(self.bus.server_key(), body)

    def of_type(self, conn_id: str, kind: str) -> list[dict]:
        return [f for f in self.frames[conn_id] if f["type"] == kind]

    async def wait(self, conn_id: str, kind: str, n: int = 1, timeout: float = WAIT) -> list[dict]:
        return await eventually(lambda: len(self.of_type(conn_id, kind)) >= n and self.of_type(conn_id, kind),
                                timeout, f"{n} {kind} frames for {conn_id}")


def frame(conn_id, user, f):
    return {"kind": "frame", "userId": user, "serverId": conn_id.split("##")[0], "connId": conn_id,
            "ts": int(time.time() * 1000), "frame": f}


def message(conn_id, user, cmid, session, body=None):
    return frame(conn_id, user, {"type": "message", "clientMsgId": cmid, "sessionId": session,
                                 "body": {"text": f"hi {cmid}"} if body is None else body})


@pytest.fixture
def processor_config(namespace, redis_prefix, pg_schema):
    def make(**changes):
        values = dict(namespace=namespace, redis_prefix=redis_prefix, postgres_schema=pg_schema,
                      batch_wait=0.005, retry_delay=0.1, retry_max_delay=0.5, publish_timeout=2.0,
                      redis_timeout=2.0, unroutable_hold=5.0, filters=[])
        values.update(changes)
        return load_config(PROCESSOR, {}, environ={}).replace(**values)
    return make


@pytest_twisted.async_yield_fixture
async def rig(processor_config, bus_factory, redis_service, redis_factory, pg, pg_factory, pg_schema):
    """``await rig.processor(**config)``: started processors (own bus, Redis, pool); ``rig.gw``: the gateways."""
    made = []
    gateway_bus = await bus_factory()

    class Rig:
        store = MessageStore(pg, 1000)
        gw = Gateways(gateway_bus, redis_service)
        pools = []

        async def processor(self, filters=(), **changes):
            config = processor_config(**changes)
            bus = await bus_factory()
            redis = await redis_factory()
            db = await pg_factory(pg_schema, pool_size=config.postgres_pool_size)
            self.pools.append(db)
            svc = ProcessorService(config, bus, redis, MessageStore(db, 1000), list(filters),
                                   reaper=Reaper(redis))
            svc.startService()
            made.append(svc)
            await svc.ready
            return svc

    yield Rig()
    for svc in made:
        if svc.running:
            await svc.stopService()


def rows(pg, sql, *args) -> defer.Deferred:
    return pg.run_query(sql, args or None)


@pytest_twisted.ensureDeferred
async def test_messages_acks_history_reads_sessions_and_moderation(rig, pg):
    """The basic flows would break on the real services (reply, route, ack, history, receipts, sessions)."""
    await rig.processor(filters=[KeywordFilter(["darn"])])
    gw = rig.gw
    g1, g2 = await gw.add(), await gw.add()
    a1, a2 = await gw.connect(g1, "alice"), await gw.connect(g2, "alice")
    b1, z1 = await gw.connect(g2, "bob"), await gw.connect(g1, "zed")
    await gw.send(frame(a1, "alice", {"type": "session_create", "id": "r1", "members": ["bob", "carol"],
                                      "sessionId": "team"}))
    [created] = await gw.wait(a1, "session_reply")
    assert created == {"type": "session_reply", "id": "r1", "ok": True, "sessionId": "team",
                       "members": ["alice", "bob", "carol"]}
    await gw.send(message(a1, "alice", "m1", "team"), message(a1, "alice", "m2", "team", {"t": "darn"}),
                  message(z1, "zed", "z1", "team"), message(a1, "alice", "m3", "nope"))
    replies = await gw.wait(a1, "message_reply", 3)
    assert replies[0]["ok"] and replies[0]["seq"] == 2  # seq 1: the group's members event
    assert replies[1]["error"]["code"] == "rejected"
    assert replies[2]["error"]["code"] == "no_session"
    [zr] = await gw.wait(z1, "message_reply")
    assert zr["error"]["code"] == "not_member"
    event, sent = await gw.wait(b1, "message_send", 2)
    assert event["kind"] == "members" and event["seq"] == 1 and event["from"] == "alice"
    assert sent["msgId"] == replies[0]["msgId"] and sent["body"] == {"text": "hi m1"}
    assert [f["msgId"] for f in await gw.wait(a2, "message_send", 2)] == [event["msgId"], sent["msgId"]]
    assert gw.of_type(a1, "message_send") == []
    # rows become sending once the publish is confirmed (the frames may arrive first)
    await eventually(lambda: rows(pg, "SELECT user_id, status FROM messagesend ORDER BY user_id").addCallback(
        lambda r: r == [("bob", "sending")] * 2 + [("carol", "pending")] * 2), what="bob sending, carol pending")
    # acknowledgement, history, read receipt, errors
    await gw.send(frame(b1, "bob", {"type": "message_send_reply", "msgIds": [event["msgId"], sent["msgId"], "12345"]}),
                  frame(b1, "bob", {"type": "history", "sessionId": "team", "id": "h1"}),
                  frame(z1, "zed", {"type": "history", "sessionId": "team"}),
                  frame(b1, "bob", {"type": "read", "sessionId": "team", "seq": 7}))
    [history] = await gw.wait(b1, "history_reply")
    assert [m["seq"] for m in history["messages"]] == [1, 2] and history["id"] == "h1"
    [err] = await gw.wait(z1, "error")
    assert err["code"] == "not_member"
    receipt = {"type": "read_receipt", "sessionId": "team", "userId": "bob", "seq": 2}
    assert (await gw.wait(a1, "read_receipt")) == [receipt] == await gw.wait(a2, "read_receipt")
    assert gw.of_type(b1, "read_receipt") == []
    await eventually(lambda: rows(pg, "SELECT status FROM messagesend WHERE user_id = 'bob'")
                     .addCallback(lambda r: r == [("delivered",)] * 2), what="bob's rows delivered")


@pytest_twisted.ensureDeferred
async def test_two_processors_racing_on_duplicates_store_once_and_answer_the_original(rig, pg):
    """Two processors handling a resend at once would store it twice or answer different msgIds."""
    await rig.processor(prefetch=1, batch_wait=0.0)
    await rig.processor(prefetch=1, batch_wait=0.0)
    gw = rig.gw
    g1 = await gw.add()
    a1 = await gw.connect(g1, "alice")
    b1 = await gw.connect(g1, "bob")
    await rig.store.create_session("alice", ["bob"], "race")
    sends = []
    for n in range(20):
        for copy in range(2):  # each clientMsgId in two queue messages: one per processor
            sends.append(gw.send(message(a1, "alice", f"m{n}", "race")))
    await defer.gatherResults(sends)
    replies = await gw.wait(a1, "message_reply", 40, timeout=20)
    by_cmid = defaultdict(set)
    for r in replies:
        assert r["ok"], r
        by_cmid[r["clientMsgId"]].add((r["msgId"], r["seq"]))
    assert all(len(v) == 1 for v in by_cmid.values()) and len(by_cmid) == 20
    stored = await rows(pg, "SELECT seq FROM messagerecv ORDER BY seq")
    assert [s for (s,) in stored] == list(range(1, 21))
    assert {f["msgId"] for f in gw.of_type(b1, "message_send")} == {next(iter(v))[0] for v in by_cmid.values()}


@pytest_twisted.ensureDeferred
async def test_sync_pages_a_backlog_and_reports_the_count(rig, pg):
    """A user back from a long absence would miss messages or get a wrong sync_done count."""
    await rig.processor(sync_page_size=100)
    gw = rig.gw
    g1 = await gw.add()
    a1 = await gw.connect(g1, "alice")
    await rig.store.create_session("alice", ["bob"], "s1")
    await rig.store.create_session("alice", ["bob"], "s0")
    for chunk in range(5):
        await gw.send(*[message(a1, "alice", f"m{chunk}-{n}", "s1" if n % 3 else "s0") for n in range(50)])
    await gw.wait(a1, "message_reply", 250, timeout=20)
    b1 = await gw.connect(g1, "bob")
    await gw.send({"kind": "sync", "userId": "bob", "serverId": g1, "connId": b1, "ts": 0})
    [done] = await gw.wait(b1, "sync_done", timeout=20)
    frames = gw.frames[b1]
    assert done == {"type": "sync_done", "count": 250} and frames[-1] == done
    order = [(f["sessionId"], f["seq"]) for f in frames[:-1]]
    assert order == sorted(order) and len(set(order)) == 250
    pages = [body for body in gw.bodies[g1] if body["items"][0]["connIds"] == [b1]]
    assert [len(p["items"][0]["frames"]) for p in pages] == [100, 100, 51]  # one publish per page
    await eventually(lambda: rows(pg, "SELECT count(*) FROM messagesend WHERE status = 'sending'").addCallback(
        lambda r: r == [(250,)]), what="synced rows sending")


@pytest_twisted.ensureDeferred
async def test_unroutable_gateway_is_marked_dead_and_reaped_when_its_key_expires(rig, redis_service):
    """A crashed gateway would be published to for ever and keep its users 'online'."""
    svc = await rig.processor(heartbeat=0.2)
    gw = rig.gw
    g1 = await gw.add()
    dead = await gw.add(queue=False, ttl=1.0)  # registered, but its queue is gone
    a1 = await gw.connect(g1, "alice")
    await gw.connect(dead, "bob")
    await rig.store.create_session("alice", ["bob"], "s")
    await gw.send(message(a1, "alice", "m1", "s"))
    await gw.wait(a1, "message_reply")
    await eventually(lambda: svc.router.is_dead(dead), what="gateway marked dead")
    assert await redis_service.connections_of(["bob"]) != {"bob": {}}  # key alive: not reaped yet
    reaper = svc.router.on_unroutable.__self__
    # the crashed gateway's WSSERVER_ key expires (ttl 1 s): poll Redis for it, then reap
    await eventually(lambda: redis_service.alive([dead]).addCallback(lambda alive: not alive),
                     what="the dead gateway's key expired")
    assert await reaper.check(dead) is True
    assert await redis_service.connections_of(["bob"]) == {"bob": {}}
    assert dead not in await redis_service.servers()


@pytest_twisted.ensureDeferred
async def test_garbage_on_the_queue_is_dead_lettered(rig, bus_factory):
    """A message no processor can read would be redelivered for ever and block the queue."""
    svc = await rig.processor()
    gw = rig.gw
    await gw.bus.publish(gw.bus.server_key(), b"\x00 not json")
    g1 = await gw.add()
    a1 = await gw.connect(g1, "alice")
    await gw.send(message(a1, "alice", "m1", "p2p:alice:bob"))
    [reply] = await gw.wait(a1, "message_reply")
    assert reply["ok"] and reply["sessionId"] == "p2p:alice:bob"
    dead = []
    watcher = await bus_factory()
    await watcher.consume(watcher.dead_queue(), lambda m: (dead.append(m.body), m.ack()))
    await eventually(lambda: dead, what="dead-lettered message")
    assert dead == [b"\x00 not json"]
    assert svc.running


@pytest.mark.parametrize("batch_size, windows", [(20, 1), (5, 3)])
@pytest_twisted.ensureDeferred
async def test_postgres_connections_killed_mid_stream_lose_nothing(rig, pg, pg_admin, batch_size, windows):
    """PostgreSQL dropping the processor's connections would lose or duplicate messages (windows overlapping too)."""
    svc = await rig.processor(batch_size=batch_size, windows=windows)
    pool = rig.pools[-1]
    gw = rig.gw
    g1 = await gw.add()
    senders = [await gw.connect(g1, f"u{n}") for n in range(4)]
    b1 = await gw.connect(g1, "bob")
    await rig.store.create_session("u0", ["u1", "u2", "u3", "bob"], "grp")
    killed = 0
    for burst in range(10):
        await defer.gatherResults([
            gw.send(*[message(c, f"u{n}", f"b{burst}-{k}", "grp") for k in range(5)])
            for n, c in enumerate(senders)])
        if burst in (2, 5, 7):
            await sleep(0.01)
            killed += terminate_backends(pg_admin, pool.application_name)
    expected = {f"b{b}-{k}" for b in range(10) for k in range(5)}
    for n, c in enumerate(senders):
        # a message handled twice (a retried batch) is answered twice: wait for every clientMsgId
        await eventually(lambda c=c: {r["clientMsgId"] for r in gw.of_type(c, "message_reply")} == expected,
                         30, f"replies to u{n}")
        assert all(r["ok"] for r in gw.of_type(c, "message_reply"))
    stored = await rows(pg, "SELECT seq FROM messagerecv WHERE session_id = 'grp' ORDER BY seq")
    assert [s for (s,) in stored] == list(range(1, 201))
    assert killed >= 1
    msgs = {f["msgId"] for f in gw.of_type(b1, "message_send")}
    assert len(msgs) == 200
    assert svc.running


@pytest_twisted.ensureDeferred
async def test_rabbitmq_dropping_the_processor_connection_mid_stream_loses_nothing(rig, pg, rabbitmq_close):
    """A broker-side disconnect would lose messages in flight or leave senders without replies."""
    svc = await rig.processor(batch_size=10)
    gw = rig.gw
    g1 = await gw.add()
    a1 = await gw.connect(g1, "alice")
    b1 = await gw.connect(g1, "bob")
    await rig.store.create_session("alice", ["bob"], "s")
    sends = []
    closing = None
    for n in range(30):  # paced over ~1.5 s: rabbitmqctl closes the connection in the middle
        sends.append(gw.send(*[message(a1, "alice", f"m{n}-{k}", "s") for k in range(5)]))
        if n == 5:
            closing = defer.ensureDeferred(rabbitmq_close(svc.bus.connection_name))
        await sleep(0.05)
    await defer.gatherResults(sends)
    assert await closing == 1
    # a redelivered message is answered again (same msgId): wait for every clientMsgId
    await eventually(lambda: len({r["clientMsgId"] for r in gw.of_type(a1, "message_reply")}) == 150,
                     30, "a reply for every message")
    by_cmid = defaultdict(set)
    for r in gw.of_type(a1, "message_reply"):
        assert r["ok"]
        by_cmid[r["clientMsgId"]].add(r["msgId"])
    assert all(len(v) == 1 for v in by_cmid.values())
    stored = await rows(pg, "SELECT seq FROM messagerecv ORDER BY seq")
    assert [s for (s,) in stored] == list(range(1, 151))
    await eventually(lambda: {f["msgId"] for f in gw.of_type(b1, "message_send")}
                     >= {m for v in by_cmid.values() for m in v}, what="bob has every message")
    await eventually(lambda: svc.bus.reconnects >= 1, what="the processor reconnected")


@pytest_twisted.ensureDeferred
async def test_windows_in_flight_together_keep_each_sessions_order(rig, pg):
    """Overlapping windows would give a sender's messages seq numbers, or deliveries, out of send order."""
    svc = await rig.processor(windows=3, batch_size=4, batch_wait=0.0)
    running, most = [0], [0]
    real_run = svc.pipeline.run

    def counting_run(window):
        running[0] += 1
        most[0] = max(most[0], running[0])

        def finished(result):
            running[0] -= 1
            return result
        return real_run(window).addBoth(finished)

    svc.pipeline.run = counting_run
    gw = rig.gw
    g1 = await gw.add()
    a1, b1 = await gw.connect(g1, "alice"), await gw.connect(g1, "bob")
    sessions = ["s0", "s1", "s2"]
    for sid in sessions:
        await rig.store.create_session("alice", ["bob"], sid)
    n = 240
    # one queue message each, published back to back: the processor runs many small windows
    await defer.gatherResults([gw.send(message(a1, "alice", f"m{i}", sessions[i % 3])) for i in range(n)])
    replies = await gw.wait(a1, "message_reply", n, timeout=30)
    sent = await gw.wait(b1, "message_send", n, timeout=30)
    assert most[0] > 1, "the windows never overlapped: the test shows nothing"
    for sid in sessions:
        mine = [r for r in replies if r["sessionId"] == sid]
        # seq follows send order (RabbitMQ keeps the publish order on one queue)...
        assert [r["clientMsgId"] for r in sorted(mine, key=lambda r: r["seq"])] == \
            [f"m{i}" for i in range(n) if sessions[i % 3] == sid]
        # ...and bob receives each session's messages in seq order, none missing
        assert [f["seq"] for f in sent if f["sessionId"] == sid] == list(range(1, n // 3 + 1))

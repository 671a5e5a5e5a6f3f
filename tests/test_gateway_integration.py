"""Two real gateways in one process, on the real Redis and RabbitMQ, with real clients.

The test plays the processor: it consumes ``<ns>.processor``, checks the
envelopes (docs/internals.rst) and publishes deliveries to
``<ns>.wsserver.<uuid>``. Redis keys are read raw (ARCHITECTURE.md layout).
"""

from __future__ import annotations

import json
import time

import pytest_twisted
from twisted.internet import defer, protocol, reactor
from twisted.protocols import portforward

from imcluster.auth import JWTAuthenticator, mint_token
from imcluster.gateway.service import GatewayService
from imcluster.testing import gateway_config
from tests.support.clients import connect_tcp, connect_ws
from tests.support.services import Made
from tests.support.waiting import eventually as _eventually
from tests.support.waiting import sleep

SECRET = "integration-secret-0123456789abcdef"
HEARTBEAT = 0.5
PUBLISH_TIMEOUT = 1.0
WAIT = 5.0


def eventually(check, timeout: float = WAIT, what: str = "condition"):
    return _eventually(check, timeout, what)


def token(user: str) -> str:
    return mint_token(SECRET, user, 3600)


class Processor:
    """The test's stand-in for improcessor: collects items, publishes deliveries."""

    def __init__(self, bus):
        self.bus = bus
        self.bodies: list[dict] = []
        self.items: list[dict] = []  # every item received and not yet taken

    def _got(self, msg) -> None:
        body = json.loads(msg.body)
        self.bodies.append(body)
        self.items.extend(body["items"])
        msg.ack()

    async def next_of(self, kind: str, conn_id: str, timeout: float = WAIT) -> dict:
        """The first item of ``kind`` from ``conn_id`` (items of other connections stay)."""
        def find():
            for i, item in enumerate(self.items):
                if item["kind"] == kind and item["connId"] == conn_id:
                    return self.items.pop(i)
            return None

        return await eventually(find, timeout, f"{kind} item from {conn_id}")

    def deliver(self, gateway_id: str, items: list[dict]) -> defer.Deferred:
        body = json.dumps({"v": 1, "items": items}).encode()
        return self.bus.publish(self.bus.gateway_key(gateway_id), body, mandatory=True)


@pytest_twisted.async_fixture
async def processor(bus_factory):
    bus = await bus_factory()
    p = Processor(bus)
    await bus.consume(bus.processor_queue(), p._got, prefetch=1000)
    return p


@pytest_twisted.async_yield_fixture
async def make_gateway(namespace, redis_prefix, redis_factory, bus_factory):
    """``await make(**config)``: a started GatewayService on its own Redis and AMQP connections."""
    made = Made()

    async def make(amqp_url: str | None = None, **overrides) -> GatewayService:
        settings = dict(
            namespace=namespace, redis_prefix=redis_prefix, jwt_secret=SECRET,
            ws=["tcp:0:interface=127.0.0.1"], tcp=["tcp:0:interface=127.0.0.1"],
            heartbeat=HEARTBEAT, server_ttl=5.0, publish_timeout=PUBLISH_TIMEOUT,
            advertise="127.0.0.1", goodbye_timeout=2.0)
        settings.update(overrides)
        config = gateway_config(**settings)
        redis = await redis_factory(timeout=2.0)
        kw = {"url": amqp_url} if amqp_url else {}
        bus = await bus_factory(publish_timeout=config.publish_timeout, **kw)
        return await made.add(GatewayService(config, redis, bus, JWTAuthenticator.from_config(config)))

    yield make
    await made.stop_all()


@pytest_twisted.async_fixture
async def redis(redis_service):
    """Raw access to the test's Redis prefix (the keys are deleted afterwards)."""
    return redis_service


def ws_url(gw: GatewayService) -> str:
    return f"ws://127.0.0.1:{gw.port_of('ws')}/ws"


async def authed_ws(gw, user):
    client = await connect_ws(ws_url(gw))
    reply = await client.auth(token(user), device="web")
    assert reply["ok"], reply
    return client, reply["connId"]


async def authed_tcp(gw, user):
    client = await connect_tcp(gw.port_of("tcp"))
    reply = await client.auth(token(user), device="app")
    assert reply["ok"], reply
    return client, reply["connId"]


async def closed(client):
    client.close()
    await client.closed.addTimeout(WAIT, reactor)


@pytest_twisted.ensureDeferred
async def test_frames_are_forwarded_with_identity_and_sync_follows_auth(make_gateway, processor):
    """Processors must know who sent each frame, and every fresh auth must ask for a sync."""
    gw1, gw2 = await make_gateway(), await make_gateway()
    ws, ws_conn = await authed_ws(gw1, "alice")
    tcp, tcp_conn = await authed_tcp(gw2, "bob")
    assert ws_conn.startswith(gw1.server_id + "##127.0.0.1##")
    assert tcp_conn.startswith(gw2.server_id + "##127.0.0.1##")

    sync = await processor.next_of("sync", ws_conn)
    assert sync.keys() == {"kind", "userId", "serverId", "connId", "ts"}
    assert sync["userId"] == "alice" and sync["serverId"] == gw1.server_id
    sync = await processor.next_of("sync", tcp_conn)
    assert sync["userId"] == "bob" and sync["serverId"] == gw2.server_id

    frame = {"type": "message", "clientMsgId": "c-1", "sessionId": "s-1", "body": {"text": "hé"}}
    ws.send(frame)
    tcp.send(dict(frame, clientMsgId="c-2"))
    item = await processor.next_of("frame", ws_conn)
    assert item.keys() == {"kind", "userId", "serverId", "connId", "ts", "frame"}
    assert item["userId"] == "alice" and item["serverId"] == gw1.server_id
    assert item["frame"] == frame
    assert abs(item["ts"] / 1000 - time.time()) < 30
    item = await processor.next_of("frame", tcp_conn)
    assert item["userId"] == "bob" and item["frame"]["clientMsgId"] == "c-2"
    assert all(b["v"] == 1 for b in processor.bodies)

    # a burst from one client travels in a few coalesced publishes, in order
    before = len(processor.bodies)
    burst = [dict(frame, clientMsgId=f"b-{i}") for i in range(50)]
    for f in burst:
        ws.send(f)
    got = [(await processor.next_of("frame", ws_conn))["frame"] for _ in burst]
    assert got == burst
    assert len(processor.bodies) - before < 10, "frames of one burst must share publishes"
    await closed(ws)
    await closed(tcp)


@pytest_twisted.ensureDeferred
async def test_deliveries_reach_every_connection_of_a_user_on_both_gateways(make_gateway, processor):
    """A message must reach all of a user's devices, wherever they are connected, and nobody else."""
    gw1, gw2 = await make_gateway(), await make_gateway()
    a1, a1_conn = await authed_ws(gw1, "alice")
    a2, a2_conn = await authed_tcp(gw2, "alice")
    a3, a3_conn = await authed_tcp(gw1, "alice")
    b1, b1_conn = await authed_ws(gw1, "bob")
    for c in (a1, a2, a3, b1):
        assert c.received[-1]["type"] == "auth_reply"
    msgs = [{"type": "message_send", "msgId": str(i), "sessionId": "s", "seq": i, "from": "carol",
             "clientMsgId": f"c{i}", "body": {"n": i}, "ts": 1} for i in (1, 2, 3)]
    await processor.deliver(gw1.server_id, [{"connIds": [a1_conn, a3_conn], "frames": msgs[:2]},
                                            {"connIds": [a1_conn, a3_conn], "frames": msgs[2:]}])
    await processor.deliver(gw2.server_id, [{"connIds": [a2_conn], "frames": msgs}])
    for client in (a1, a2, a3):
        got = [await client.receive() for _ in msgs]
        assert got == msgs, "in order, every one"
    # a reply names one connection; a gone connection is skipped
    reply = {"type": "message_reply", "ok": True, "clientMsgId": "x", "msgId": "9", "sessionId": "s",
             "seq": 9, "ts": 1}
    await processor.deliver(gw1.server_id, [{"connIds": [f"{gw1.server_id}##127.0.0.1##1", b1_conn],
                                             "frames": [reply]}])
    assert await b1.receive() == reply
    await sleep(0.2)
    assert a1.pending() == 0 and a3.pending() == 0 and a2.pending() == 0
    for c in (a1, a2, a3, b1):
        await closed(c)


async def raw_state(redis, prefix, uuid, users):
    """The gateway's keys, read raw."""
    server = await redis.execute("GET", f"{prefix}WSSERVER_{{{uuid}}}")
    ttl = await redis.execute("PTTL", f"{prefix}WSSERVER_{{{uuid}}}")
    servers = set(await redis.execute("SMEMBERS", f"{prefix}WSSERVERS"))
    wsconns = set(await redis.execute("SMEMBERS", f"{prefix}WSCONNS##{{{uuid}}}"))
    ucir = {}
    for u in users:
        flat = await redis.execute("HGETALL", f"{prefix}UCIR##{{{u}}}")
        ucir[u] = {flat[i]: json.loads(flat[i + 1]) for i in range(0, len(flat), 2)}
    return server, ttl, servers, wsconns, ucir


@pytest_twisted.ensureDeferred
async def test_redis_keys_after_auth_and_disconnect(make_gateway, redis, redis_prefix):
    """Routing state in Redis must follow ARCHITECTURE.md exactly, and vanish with the connection."""
    gw1, gw2 = await make_gateway(), await make_gateway()
    ws, ws_conn = await authed_ws(gw1, "alice")
    tcp, tcp_conn = await authed_tcp(gw1, "alice")
    other, other_conn = await authed_ws(gw2, "alice")
    server, ttl, servers, wsconns, ucir = await raw_state(redis, redis_prefix, gw1.server_id, ["alice"])
    info = json.loads(server)
    assert info.keys() == {"ip", "port", "tcpPort", "startedAt"}
    assert info["ip"] == "127.0.0.1"
    assert info["port"] == gw1.port_of("ws") and info["tcpPort"] == gw1.port_of("tcp")
    assert abs(info["startedAt"] - time.time()) < 60
    assert 0 < ttl <= 5000
    assert servers == {gw1.server_id, gw2.server_id}
    ws_peer, tcp_peer = ws_conn.split("##", 1)[1], tcp_conn.split("##", 1)[1]
    assert wsconns == {f"alice##{ws_peer}", f"alice##{tcp_peer}"}
    assert set(ucir["alice"]) == {ws_conn, tcp_conn, other_conn}
    meta = ucir["alice"][ws_conn]
    assert meta.keys() == {"device", "authedAt", "exp"} and meta["device"] == "web"
    assert ucir["alice"][tcp_conn]["device"] == "app"
    assert abs(meta["exp"] - (time.time() + 3600)) < 60

    await closed(ws)
    await eventually(lambda: redis.execute("HLEN", f"{redis_prefix}UCIR##{{alice}}").addCallback(lambda n: n == 2),
                     what="UCIR field removed")
    _, _, _, wsconns, ucir = await raw_state(redis, redis_prefix, gw1.server_id, ["alice"])
    assert wsconns == {f"alice##{tcp_peer}"}
    assert set(ucir["alice"]) == {tcp_conn, other_conn}
    await closed(tcp)
    await closed(other)
    await eventually(lambda: redis.execute("EXISTS", f"{redis_prefix}UCIR##{{alice}}").addCallback(lambda n: n == 0),
                     what="UCIR hash gone")
    assert await redis.execute("EXISTS", f"{redis_prefix}WSCONNS##{{{gw1.server_id}}}") == 0


@pytest_twisted.ensureDeferred
async def test_reregisters_within_a_heartbeat_after_redis_data_loss(make_gateway, redis, redis_prefix):
    """If Redis loses its data, the gateway and its users must be routable again within a heartbeat."""
    from tests.support.redis import delete_prefix

    gw = await make_gateway()
    clients = [await authed_ws(gw, f"u{i}") for i in range(3)] + [await authed_tcp(gw, "u0")]
    before = await raw_state(redis, redis_prefix, gw.server_id, ["u0", "u1", "u2"])
    assert len(before[3]) == 4
    await delete_prefix(redis, redis_prefix)
    started = time.monotonic()

    async def restored():
        now = await raw_state(redis, redis_prefix, gw.server_id, ["u0", "u1", "u2"])
        return now[0] is not None and now[2:] == before[2:]

    await eventually(restored, timeout=HEARTBEAT * 2 + 1.0, what="re-registration")
    assert time.monotonic() - started <= HEARTBEAT * 2 + 1.0
    for c, _ in clients:
        await closed(c)


class _CuttableProxy(portforward.ProxyFactory):
    """A TCP forwarder to RabbitMQ that a test can cut (the broker becomes unreachable)."""

    def __init__(self, host, port):
        super().__init__(host, port)
        self.servers = set()

    def buildProtocol(self, addr):  # noqa: N802
        p = super().buildProtocol(addr)
        servers = self.servers
        made, lost = p.connectionMade, p.connectionLost
        p.connectionMade = lambda: (servers.add(p), made())[1]
        p.connectionLost = lambda reason: (servers.discard(p), lost(reason))[1]
        return p


@pytest_twisted.ensureDeferred
async def test_unreachable_broker_gives_unavailable_within_publish_timeout(make_gateway):
    """A client must learn within publish_timeout that its message was not taken, so it can retry."""
    from urllib.parse import urlsplit

    from tests.support.ids import AMQP_URL

    parts = urlsplit(AMQP_URL)
    proxy = _CuttableProxy(parts.hostname, parts.port or 5672)
    proxy.noisy = False
    listening = reactor.listenTCP(0, proxy, interface="127.0.0.1")
    url = f"amqp://guest:guest@127.0.0.1:{listening.getHost().port}/%2F"
    try:
        gw = await make_gateway(amqp_url=url)
        ws, _ = await authed_ws(gw, "alice")
        tcp, _ = await authed_tcp(gw, "bob")
        await listening.stopListening()
        for p in list(proxy.servers):
            p.transport.abortConnection()
        await eventually(lambda: not gw.bus.connected, what="gateway sees the broker gone")
        started = time.monotonic()
        ws.send({"type": "message", "clientMsgId": "m-1", "sessionId": "s", "body": "hi"})
        tcp.send({"type": "history", "sessionId": "s"})
        reply = await ws.receive_type("message_reply", timeout=PUBLISH_TIMEOUT + 2)
        assert reply["ok"] is False and reply["clientMsgId"] == "m-1"
        assert reply["error"]["code"] == "unavailable"
        error = await tcp.receive_type("error", timeout=PUBLISH_TIMEOUT + 2)
        assert error["code"] == "unavailable"
        assert time.monotonic() - started <= PUBLISH_TIMEOUT + 0.5
        assert ws.connected and tcp.connected, "the client stays connected and may retry"
        await closed(ws)
        await closed(tcp)
    finally:
        if listening.connected:
            await listening.stopListening()
        for p in list(proxy.servers):
            p.transport.abortConnection()


@pytest_twisted.ensureDeferred
async def test_stop_says_going_away_and_removes_every_key(make_gateway, redis, redis_prefix):
    """On SIGTERM clients must be told to reconnect elsewhere and no routing entry may linger."""
    gw, peer = await make_gateway(), await make_gateway()
    ws, _ = await authed_ws(gw, "alice")
    tcp, _ = await authed_tcp(gw, "bob")
    keep, keep_conn = await authed_ws(peer, "alice")
    started = time.monotonic()
    await gw.stopService()
    assert time.monotonic() - started < 3.0
    code, _ = await ws.closed.addTimeout(WAIT, reactor)
    assert code == 1001
    await tcp.closed.addTimeout(WAIT, reactor)
    assert tcp.received[-1]["type"] == "error" and tcp.received[-1]["code"] == "going_away"
    server, _, servers, wsconns, ucir = await raw_state(redis, redis_prefix, gw.server_id, ["alice", "bob"])
    assert server is None and wsconns == set()
    assert servers == {peer.server_id}
    assert set(ucir["alice"]) == {keep_conn} and ucir["bob"] == {}
    await closed(keep)


@pytest_twisted.ensureDeferred
async def test_nacked_publish_gives_unavailable(make_gateway, processor, namespace):
    """When the broker refuses a message (nack), the client must be told so it can retry."""
    from imcluster.bus import Nacked
    from tests.support.bus import rabbitmqctl

    gw = await make_gateway()
    ws, _ = await authed_ws(gw, "alice")
    policy = f"{namespace}-reject"
    await rabbitmqctl("set_policy", "--apply-to", "queues", policy, rf"^{namespace}\.processor$",
                      '{"max-length":0,"overflow":"reject-publish"}')
    try:
        async def refused():
            try:
                await processor.bus.publish(processor.bus.server_key(), b'{"v":1,"items":[]}')
            except Nacked:
                return True
            return False

        await eventually(refused, what="the broker nacks publishes")
        started = time.monotonic()
        ws.send({"type": "message", "clientMsgId": "n-1", "sessionId": "s", "body": "hi"})
        reply = await ws.receive_type("message_reply", skip=("sync_done",))
        assert reply["ok"] is False and reply["clientMsgId"] == "n-1"
        assert reply["error"]["code"] == "unavailable"
        assert time.monotonic() - started < PUBLISH_TIMEOUT
    finally:
        await rabbitmqctl("clear_policy", policy)
    await closed(ws)


@pytest_twisted.ensureDeferred
async def test_tls_listeners(make_gateway, tmp_path, redis, redis_prefix):
    """ssl: endpoint strings must give working TLS listeners whose bound ports are registered."""
    from autobahn.twisted.websocket import WebSocketClientFactory
    from twisted.internet import ssl
    from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS

    from imcluster.testing import self_signed_cert
    from tests.support.clients import TCPClient, WSClient

    cert, key, pem = self_signed_cert(str(tmp_path))
    desc = f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"
    gw = await make_gateway(ws=[desc], tcp=[desc])
    info = json.loads(await redis.execute("GET", f"{redis_prefix}WSSERVER_{{{gw.server_id}}}"))
    assert info["port"] == gw.port_of("ws") > 0 and info["tcpPort"] == gw.port_of("tcp") > 0
    tls = ssl.optionsForClientTLS("localhost", trustRoot=ssl.Certificate.loadPEM(pem))

    def endpoint(port):
        return wrapClientTLS(tls, TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=WAIT))

    tcp = await endpoint(gw.port_of("tcp")).connect(protocol.Factory.forProtocol(TCPClient))
    assert (await tcp.auth(token("alice")))["ok"]
    factory = WebSocketClientFactory(f"wss://localhost:{gw.port_of('ws')}/ws")
    factory.protocol = WSClient
    ws = await endpoint(gw.port_of("ws")).connect(factory)
    await ws.opened.addTimeout(WAIT, reactor)
    assert (await ws.auth(token("bob")))["ok"]
    await closed(ws)
    await closed(tcp)

"""The WebSocket adapter: Autobahn over real loopback (and TLS) connections, plus handshake units."""

from __future__ import annotations

import pytest
import pytest_twisted
from autobahn.twisted.websocket import WebSocketClientFactory
from autobahn.websocket.compress import PerMessageDeflateOffer, PerMessageDeflateResponseAccept
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.ssl import Certificate, optionsForClientTLS

from imcluster.testing import ClientHarness, FakeHub, gateway_config, self_signed_cert
from tests.support.clients import WSClient, connect_ws

TIMEOUT = 10


async def sleep(seconds):
    await task.deferLater(reactor, seconds, lambda: None)


async def wait_for(predicate, timeout=TIMEOUT):
    deadline = reactor.seconds() + timeout
    while not predicate():
        assert reactor.seconds() < deadline, "condition never became true"
        await sleep(0.01)


def connect_compressed(url):
    return connect_ws(
        url,
        perMessageCompressionOffers=[PerMessageDeflateOffer()],
        perMessageCompressionAccept=lambda response: PerMessageDeflateResponseAccept(response))


@pytest_twisted.ensureDeferred
async def test_auth_ping_and_forward_over_loopback(gateways):
    """A browser can authenticate, ping and send a message over a real WebSocket."""
    gw = gateways()
    port = await gw.listen("ws")
    client = await connect_ws(f"ws://127.0.0.1:{port}/ws")
    reply = await client.auth("user:alice")
    local_port = client.transport.getHost().port
    assert reply == {"type": "auth_reply", "ok": True, "userId": "alice",
                     "connId": f"gw-0000##127.0.0.1##{local_port}", "serverId": "gw-0000"}
    client.send({"type": "ping"})
    assert await client.receive() == {"type": "pong"}
    client.send({"type": "message", "clientMsgId": "c-1", "sessionId": "s-1", "body": {"text": "hi"}})
    await wait_for(lambda: gw.hub.forwarded)
    assert gw.hub.forwarded[0][1]["clientMsgId"] == "c-1"
    client.close()
    await client.closed
    await wait_for(lambda: gw.hub.lost)


@pytest_twisted.ensureDeferred
async def test_any_path_is_accepted(gateways):
    """Clients configured with another path than /ws still connect."""
    gw = gateways()
    port = await gw.listen("ws")
    for path in ("/", "/im/socket"):
        client = await connect_ws(f"ws://127.0.0.1:{port}{path}")
        assert (await client.auth("user:bob"))["ok"] is True
        client.close()
        await client.closed


@pytest_twisted.ensureDeferred
async def test_too_large_message_closes_1009(gateways):
    """A message over max_frame_size closes the WebSocket with 1009."""
    gw = gateways(max_frame_size=65536)
    port = await gw.listen("ws")
    client = await connect_ws(f"ws://127.0.0.1:{port}/ws")
    await client.auth("user:alice")
    client.send_text('{"type":"ping","pad":"' + "x" * 70000 + '"}')
    code, _ = await client.closed.addTimeout(TIMEOUT, reactor)
    assert code == 1009
    assert gw.hub.forwarded == []


@pytest_twisted.ensureDeferred
async def test_compression_negotiated_and_bounded(gateways):
    """permessage-deflate works, and a small compressed message inflating past the limit closes 1009."""
    # Autobahn stops reading after failing the message: the close completes by close_timeout
    gw = gateways(compression=True, max_frame_size=65536, close_timeout=0.3)
    port = await gw.listen("ws")
    client = await connect_compressed(f"ws://127.0.0.1:{port}/ws")
    assert client._perMessageCompress is not None  # negotiated
    assert (await client.auth("user:alice"))["ok"] is True
    client.send({"type": "ping", "pad": "y" * 1000})
    assert await client.receive() == {"type": "pong"}
    client.send_text('{"type":"ping","pad":"' + "x" * 1_000_000 + '"}')  # ~1 kB on the wire
    code, _ = await client.closed.addTimeout(TIMEOUT, reactor)
    assert code == 1009


@pytest_twisted.ensureDeferred
async def test_compression_off(gateways):
    """With compression off the server does not accept permessage-deflate."""
    gw = gateways(compression=False)
    port = await gw.listen("ws")
    client = await connect_compressed(f"ws://127.0.0.1:{port}/ws")
    assert client._perMessageCompress is None
    assert (await client.auth("user:alice"))["ok"] is True
    client.close()
    await client.closed


class _Slowloris(protocol.Protocol):
    def __init__(self):
        self.lost = defer.Deferred()

    def connectionMade(self):  # noqa: N802
        self.transport.write(b"GET /ws HTTP/1.1\r\nHost: localhost\r\n")  # never finishes

    def connectionLost(self, reason):  # noqa: N802
        self.lost.callback(None)


@pytest_twisted.ensureDeferred
async def test_handshake_timeout_drops_slowloris(gateways):
    """A client that never finishes its opening handshake is dropped after handshake_timeout."""
    gw = gateways(handshake_timeout=0.3)
    port = await gw.listen("ws")
    started = reactor.seconds()
    client = await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(
        protocol.Factory.forProtocol(_Slowloris))
    await client.lost.addTimeout(TIMEOUT, reactor)
    assert reactor.seconds() - started < 3
    assert gw.hub.made == []  # never reached the hub


#: what a slow-consumer test lets the gateway hold: the limit, one grace period of the
#: flood below and the kernel's socket buffers; far below output_buffer_max (SLOW_MAX)
SLOW_LIMIT = 256 * 1024
SLOW_MAX = 64 << 20
SLOW_BOUND = 16 << 20


@pytest_twisted.ensureDeferred
async def test_slow_consumer_closed_4003_over_loopback(gateways):
    """A browser that stops reading is closed with 4003 soon after its pending output passes the limit,
    before the gateway holds megabytes for it."""
    gw = gateways(output_buffer_limit=SLOW_LIMIT, output_buffer_max=SLOW_MAX, slow_consumer_grace=0.2,
                  close_timeout=10)
    port = await gw.listen("ws")
    client = await connect_ws(f"ws://127.0.0.1:{port}/ws")
    await client.auth("user:alice")
    await wait_for(lambda: gw.hub.made and gw.hub.made[0].authenticated)
    conn = gw.hub.made[0]
    client.pause_reading()
    frame = ('{"type":"message_send","body":"%s"}' % ("z" * 60000)).encode()
    written = 0

    def flood():
        nonlocal written
        for _ in range(4):
            if conn.is_open:
                conn.send_encoded(frame)
                written += len(frame)

    loop = task.LoopingCall(flood)
    loop.start(0.01)
    try:
        await wait_for(lambda: not conn.is_open or written > SLOW_MAX, timeout=15)
    finally:
        loop.stop()
    # what the gateway took for this client bounds what it holds: the close came from the
    # grace rule, not from the output_buffer_max backstop
    assert written < SLOW_BOUND, f"the gateway took {written} bytes for a client that reads nothing"
    client.transport.resumeProducing()
    # the gateway no longer reads a slow consumer, so it never sees the client's close
    # reply and drops the socket only close_timeout later: the 4003 is the close frame
    await wait_for(lambda: client.remoteCloseCode is not None)
    assert client.remoteCloseCode == 4003
    client.abort()
    code, _ = await client.closed.addTimeout(TIMEOUT, reactor)
    assert code == 4003


@pytest_twisted.ensureDeferred
async def test_wss_over_tls(gateways, tmp_path):
    """Browsers can use wss:// on an ssl: endpoint, and the client address is the real peer's."""
    cert, key, pem = self_signed_cert(tmp_path)
    gw = gateways()
    port = await gw.listen("ws", f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}")
    factory = WebSocketClientFactory(f"wss://localhost:{port}/ws")
    factory.protocol = WSClient
    endpoint = wrapClientTLS(optionsForClientTLS("localhost", trustRoot=Certificate.loadPEM(pem)),
                             TCP4ClientEndpoint(reactor, "127.0.0.1", port))
    client = await endpoint.connect(factory)
    await client.opened.addTimeout(TIMEOUT, reactor)
    reply = await client.auth("user:alice")
    assert reply["ok"] is True
    assert reply["connId"].startswith("gw-0000##127.0.0.1##")
    client.send({"type": "ping"})
    assert await client.receive() == {"type": "pong"}
    client.close()
    await client.closed


# --- handshake units (StringTransport)


def harness(headers=None, host="localhost:8080", **config):
    config.setdefault("ws_ping_interval", 0)
    hub = FakeHub(config=gateway_config(**config))
    return hub, ClientHarness(hub, "ws", headers=headers, host=host, ip="10.9.9.9", port=5555)


@pytest.mark.parametrize("headers,ip", [
    ({"X-Forwarded-For": "6.6.6.6, 1.2.3.4"}, "1.2.3.4"),      # the hop our proxy added
    ({"X-Real-IP": "5.6.7.8", "X-Forwarded-For": "1.2.3.4"}, "5.6.7.8"),
    ({"X-Forwarded-For": "2001:db8::1"}, "2001:db8::1"),
    ({"X-Forwarded-For": "not-an-ip"}, "10.9.9.9"),           # garbage: the socket's peer
    ({}, "10.9.9.9"),
])
def test_trust_proxy_takes_client_address_from_headers(headers, ip):
    """Behind a trusted proxy, connIds carry the client's address, not the proxy's."""
    hub, h = harness(headers=headers, trust_proxy=True)
    assert h.conn.ip == ip
    assert h.conn.peer_key == f"{ip}##5555"
    assert h.conn.conn_id == f"gw-0000##{ip}##5555"
    h.drop()


def test_forwarded_headers_ignored_without_trust_proxy():
    """A client cannot spoof its address with X-Forwarded-For when no proxy is trusted."""
    hub, h = harness(headers={"X-Forwarded-For": "1.2.3.4", "X-Real-IP": "5.6.7.8"})
    assert h.conn.ip == "10.9.9.9"
    h.drop()


def test_external_port_checked_against_host_header():
    """Behind a load balancer on 443, a Host of :443 is accepted and another port refused."""
    hub, h = harness(host="chat.example.com:443", external_port=443)
    assert h.status == 101
    h.drop()
    hub, h = harness(host="chat.example.com:8080", external_port=443)
    assert h.status == 400
    assert h.conn is None and hub.made == []
    h.drop()


def test_no_delayed_calls_after_handshake_failure():
    """A failed handshake leaves no Autobahn timer behind on the hub's clock."""
    hub, h = harness(host="x:1", external_port=443, handshake_timeout=5)
    h.drop()
    assert hub.clock.getDelayedCalls() == []


def test_autobahn_debug_arguments_are_not_coloured():
    """Every frame sent would pay for ANSI-colouring Autobahn's (unlogged) debug arguments where click is installed."""
    import autobahn.util

    import imcluster.gateway.websocket  # noqa: F401 (the module turns the colours off)

    assert autobahn.util.hltype(test_autobahn_debug_arguments_are_not_coloured) == \
        f"<{__name__}.test_autobahn_debug_arguments_are_not_coloured>"


def test_handshake_over_max_handshake_size_gets_431():
    """An endless header would fill the gateway's memory: past max_handshake_size the client gets 431 and is closed."""
    from imcluster.testing import ws_handshake
    hub = FakeHub(config=gateway_config(ws_ping_interval=0, max_handshake_size=4096))
    h = ClientHarness(hub, "ws", handshake=False)
    h.send_raw(b"GET /ws HTTP/1.1\r\nHost: x\r\nX-Pad: ")
    for _ in range(4):
        h.send_raw(b"a" * 1000)
    assert not h.transport.disconnecting  # 4033 bytes
    h.send_raw(b"a" * 100)  # 4133 bytes, no end of header
    assert h.status == 431
    assert h.transport.disconnecting and h.conn is None
    h.drop()
    assert hub.made == [] and hub.sockets == 0
    assert hub.clock.getDelayedCalls() == []
    # a handshake of exactly the limit, byte by byte, and a frame right behind it, is fine
    request = ws_handshake(headers={"X-Pad": ""})
    request = request[:-4] + b"a" * (4096 - len(request)) + b"\r\n\r\n"
    assert len(request) == 4096
    h = ClientHarness(hub, "ws", handshake=False)
    for i in range(len(request) - 1):
        h.send_raw(request[i:i + 1])
    from imcluster.testing import ws_frame
    h.send_raw(request[-1:] + ws_frame(b'{"type":"auth","token":"user:alice:3600"}'))
    assert h.status == 101
    assert h.frames()[0]["ok"] is True
    h.drop()


def test_handshake_timeout_drops_a_slow_handshake():
    """A client trickling its handshake is dropped after handshake_timeout."""
    hub, h = FakeHub(config=gateway_config(ws_ping_interval=0, handshake_timeout=5)), None
    h = ClientHarness(hub, "ws", handshake=False)
    h.send_raw(b"GET /ws HTTP/1.1\r\n")
    hub.clock.advance(4.9)
    assert not h.transport.disconnecting
    hub.clock.advance(0.2)
    assert h.transport.disconnecting
    h.drop()
    assert hub.clock.getDelayedCalls() == [] and hub.sockets == 0


def test_over_max_connections_closed_before_the_handshake():
    """A gateway at max_connections spends nothing on a newcomer: closed right after accept, handshakes counted."""
    hub = FakeHub(config=gateway_config(ws_ping_interval=0, max_connections=2))
    first = ClientHarness(hub, "ws", handshake=False)  # a handshake in progress holds a slot
    second = ClientHarness(hub, "tcp")
    third = ClientHarness(hub, "ws", handshake=False)
    assert third.transport.disconnecting and third.transport.value() == b""
    third.send_raw(b"GET /ws HTTP/1.1\r\n")  # never read
    third.drop()
    fourth = ClientHarness(hub, "tcp")
    assert fourth.transport.disconnecting and fourth.transport.value() == b""
    fourth.drop()
    assert hub.sockets == 2 and hub.made == [second.conn]
    first.drop()
    fifth = ClientHarness(hub, "ws")
    assert fifth.status == 101
    for h in (second, fifth):
        h.drop()
    assert hub.sockets == 0

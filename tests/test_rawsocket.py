"""The raw TCP adapter: 4-byte big-endian length framing, over StringTransport and real loopback/TLS."""

from __future__ import annotations

import pytest_twisted
from twisted.internet import protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.ssl import Certificate, optionsForClientTLS

from imcluster.testing import (ClientHarness, FakeHub, gateway_config, self_signed_cert,
                               tcp_encode)
from tests.support.clients import TCPClient, connect_tcp

TIMEOUT = 10


def harness(**config):
    hub = FakeHub(config=gateway_config(**config))
    return hub, ClientHarness(hub, "tcp")


def auth(h):
    h.send({"type": "auth", "token": "user:alice:3600"})
    assert h.frames()[0]["ok"] is True


def test_frame_split_into_single_bytes():
    """A frame that arrives one byte at a time is processed once, when complete."""
    hub, h = harness()
    auth(h)
    data = tcp_encode({"type": "ping"})
    for i in range(len(data) - 1):
        h.send_raw(data[i:i + 1])
        assert h.frames() == []
    h.send_raw(data[-1:])
    assert h.frames() == [{"type": "pong"}]
    h.drop()


def test_many_frames_in_one_write_and_a_partial_tail():
    """Pipelined frames in one TCP segment are all answered, in order; a partial tail waits."""
    hub, h = harness()
    auth(h)
    ping = tcp_encode({"type": "ping"})
    bad = tcp_encode(b"nope")
    tail = tcp_encode({"type": "ping"})
    h.send_raw(ping + bad + ping + tail[:3])
    assert [f["type"] for f in h.frames()] == ["pong", "error", "pong"]
    h.send_raw(tail[3:])
    assert h.frames() == [{"type": "pong"}]
    h.drop()


def test_invalid_utf8_and_empty_frames_are_bad_frames():
    """Invalid UTF-8 or an empty frame gets bad_frame and the connection stays open."""
    hub, h = harness()
    auth(h)
    h.send_raw(tcp_encode(b"\xff\xfe\xfd"))
    h.send_raw(tcp_encode(b""))
    assert [f["code"] for f in h.frames()] == ["bad_frame", "bad_frame"]
    assert not h.closed
    h.drop()


def test_frame_of_exactly_max_size_waits_for_its_body():
    """Announcing max_frame_size is allowed: the server waits for the body instead of closing."""
    hub, h = harness(max_frame_size=100)
    h.send_raw((100).to_bytes(4, "big") + b"{")
    assert not h.closed
    h.send_raw((101).to_bytes(4, "big"))  # completes nothing; still waiting for 99 bytes
    assert not h.closed
    h.drop()


def test_too_large_announced_in_pieces():
    """A length prefix split across segments is still checked before any body is buffered."""
    hub, h = harness(max_frame_size=1000)
    h.send_raw(b"\x00\x01")
    assert not h.closed
    h.send_raw(b"\x00\x00")  # 65536 > 1000
    frames = h.frames()
    assert frames == [{"type": "error", "code": "too_large", "message": "frame too large"}]
    assert h.closed
    assert h.proto._buffer == bytearray()
    h.send_raw(b"x" * 10000)  # ignored after the close
    assert h.frames() == []
    h.finish()
    hub.clock.advance(60)
    assert hub.clock.getDelayedCalls() == []


# --- real sockets


async def wait_for(predicate, timeout=TIMEOUT):
    deadline = reactor.seconds() + timeout
    while not predicate():
        assert reactor.seconds() < deadline, "condition never became true"
        await task.deferLater(reactor, 0.01, lambda: None)


@pytest_twisted.ensureDeferred
async def test_auth_and_ping_over_loopback(gateways):
    """An APP can authenticate and ping over a real TCP connection."""
    gw = gateways()
    port = await gw.listen("tcp")
    client = await connect_tcp(port)
    reply = await client.auth("user:alice")
    assert reply["connId"] == f"gw-0000##127.0.0.1##{client.transport.getHost().port}"
    client.send({"type": "ping"})
    assert await client.receive() == {"type": "pong"}
    client.close()
    await client.closed
    await wait_for(lambda: gw.hub.lost)


@pytest_twisted.ensureDeferred
async def test_tls_endpoint(gateways, tmp_path):
    """APPs can connect over TLS (ssl: endpoint) and are identified by their real address."""
    cert, key, pem = self_signed_cert(tmp_path)
    gw = gateways()
    port = await gw.listen("tcp", f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}")
    endpoint = wrapClientTLS(optionsForClientTLS("localhost", trustRoot=Certificate.loadPEM(pem)),
                             TCP4ClientEndpoint(reactor, "127.0.0.1", port))
    client = await endpoint.connect(protocol.Factory.forProtocol(TCPClient))
    reply = await client.auth("user:alice")
    assert reply["ok"] is True
    assert reply["connId"].startswith("gw-0000##127.0.0.1##")
    client.send({"type": "ping"})
    assert await client.receive() == {"type": "pong"}
    client.send_frame_bytes(b"[")  # bad frame over TLS: answered, stays open
    assert (await client.receive())["code"] == "bad_frame"
    client.close()
    await client.closed
    await wait_for(lambda: gw.hub.lost)


#: what a slow-consumer test lets the gateway hold: the limit, one grace period of the
#: flood below and the kernel's socket buffers; far below output_buffer_max (SLOW_MAX)
SLOW_LIMIT = 256 * 1024
SLOW_MAX = 64 << 20
SLOW_BOUND = 16 << 20


@pytest_twisted.ensureDeferred
async def test_slow_consumer_over_loopback(gateways):
    """An APP that stops reading gets error slow_consumer, then the connection closes, before the
    gateway holds megabytes for it."""
    gw = gateways(output_buffer_limit=SLOW_LIMIT, output_buffer_max=SLOW_MAX, slow_consumer_grace=0.2,
                  close_timeout=10)
    port = await gw.listen("tcp")
    client = await connect_tcp(port)
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
    await client.closed.addTimeout(TIMEOUT, reactor)
    assert client.received[-1] == {"type": "error", "code": "slow_consumer", "message": "slow consumer"}
    assert client.received[0]["type"] == "auth_reply"
    assert {f["type"] for f in client.received[1:-1]} == {"message_send"}  # intact frames before it


@pytest_twisted.ensureDeferred
async def test_refused_over_loopback(gateways):
    """A gateway that takes no more connections says unavailable and closes."""
    gw = gateways()
    gw.hub.refuse = True
    port = await gw.listen("tcp")
    client = await connect_tcp(port)
    await client.closed.addTimeout(TIMEOUT, reactor)
    assert client.received == [{"type": "error", "code": "unavailable",
                                "message": "the server takes no new connections; try again later"}]
    assert gw.hub.made == [] and gw.hub.lost == []
    # the abort timer of the refused connection was cancelled when it closed
    assert not [c for c in reactor.getDelayedCalls() if c.active() and "_abort" in repr(c.func)]

"""The gateway engine's two sides: one contract suite over the fakes and the real things.

The hub (what :class:`~imcluster.gateway.engine.ClientConnection` calls):
:class:`~imcluster.testing.FakeHub` and the real
:class:`~imcluster.gateway.service.GatewayService` (on FakeRegistry and
FakeBus). Each hub is driven by the real engine behind the real raw TCP
adapter, as a client sees it: connection accounting, the auth being recorded
(or not), the sync request, forwarding and its failure, and the cleanup
when the connection ends.

The connection (what the hub calls): :class:`~imcluster.testing.FakeConnection`
and the real ``ClientConnection`` (behind the WebSocket or TCP adapter):
identity attributes, frames sent, closing, going away.
"""

from __future__ import annotations

import json

import pytest
from twisted.internet import protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from zope.interface.verify import verifyObject

from imcluster import protocol as p
from imcluster.bus import Unavailable
from imcluster.gateway.service import GatewayService
from imcluster.interfaces import IAuthenticator, IClientConnection
from imcluster.testing import (
    ClientHarness, FakeAuthenticator, FakeBus, FakeConnection, FakeHub, FakeRegistry, gateway_config,
)

NS = "hc"
PREFIX = "hc:"

# --- the hub side


class FakeHubSide:
    """FakeHub, and how a test reads what it recorded."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_764_160_000)
        self.hub = FakeHub(clock=self.clock)

    def settle(self, seconds: float = 0) -> None:
        self.clock.advance(seconds)

    def open_count(self) -> int:
        return len([c for c in self.hub.made if c not in self.hub.lost])

    def user_of(self, conn):
        return self.hub.user_of(conn)

    def forwarded(self) -> list:
        return [(c.conn_id, frame) for c, frame in self.hub.forwarded]

    def syncs(self) -> list:
        return [c.conn_id for c in self.hub.syncs]

    def break_recording(self) -> None:
        self.hub.auth_failure = TimeoutError("Redis add_connections got no reply")

    def break_forwarding(self) -> None:
        self.hub.forward_failure = Unavailable("no confirm within 5s")


class RealHubSide:
    """A started GatewayService on FakeRegistry and FakeBus; the test reads the items it publishes."""

    def __init__(self) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(1_764_160_000)
        config = gateway_config(ws=["tcp:0"], tcp=["tcp:0"], redis_prefix=PREFIX, namespace=NS,
                                publish_timeout=5.0, ws_ping_interval=0)
        self.registry = FakeRegistry(PREFIX, clock=self.clock)
        self.bus = FakeBus(NS, publish_timeout=5.0, clock=self.clock)
        self.bus.startService()
        processor = FakeBus(NS, publish_timeout=5.0, clock=self.clock, broker=self.bus.broker)
        processor.startService()
        self.items = []
        processor.consume(processor.processor_queue(), self._got, prefetch=1000)
        factories = {"ws": lambda hub: protocol.Factory(), "tcp": lambda hub: protocol.Factory()}
        self.hub = GatewayService(config, self.registry, self.bus, FakeAuthenticator(clock=self.clock),
                                  reactor=self.clock, factories=factories)
        assert self.hub.startService().called

    def _got(self, message) -> None:
        self.items.extend(json.loads(message.body)["items"])
        message.ack()

    def settle(self, seconds: float = 0) -> None:
        self.clock.advance(seconds)

    def open_count(self) -> int:
        return len(self.hub.connections)

    def user_of(self, conn):
        user = self.hub.connections.user_of(conn)
        if user is not None:
            # recorded means: where processors look it up
            fields = self.registry.store.execute("HGETALL", f"{PREFIX}UCIR##{{{user}}}")[::2]
            assert f"{self.hub.server_id}##{conn.ip}##{conn.port}" in fields
        return user

    def forwarded(self) -> list:
        return [(i["connId"], i["frame"]) for i in self.items if i["kind"] == "frame"]

    def syncs(self) -> list:
        return [i["connId"] for i in self.items if i["kind"] == "sync"]

    def break_recording(self) -> None:
        self.registry.set_available(False)

    def break_forwarding(self) -> None:
        self.bus.set_available(False)


@pytest.fixture(params=["fake", "real"])
def side(request):
    """The hub under test: FakeHub, or the real GatewayService on fakes."""
    return FakeHubSide() if request.param == "fake" else RealHubSide()


def client(side, port=40001) -> ClientHarness:
    """A raw TCP client on the real engine and adapter, talking to ``side``'s hub."""
    return ClientHarness(side.hub, "tcp", ip="10.1.2.3", port=port)


def login(side, user="alice", port=40001) -> ClientHarness:
    c = client(side, port)
    c.send({"type": "auth", "token": FakeAuthenticator.token(user)})
    side.settle()
    [reply] = [f for f in c.frames() if f["type"] == "auth_reply"]
    assert reply["ok"] is True, reply
    return c


def test_hub_has_what_the_engine_reads(side):
    """The engine would fail on its first connection: a hub attribute it reads is missing."""
    hub = side.hub
    assert isinstance(hub.server_id, str) and hub.server_id
    assert verifyObject(IAuthenticator, hub.authenticator)
    assert hub.clock.seconds() == 1_764_160_000
    assert hub.config.max_frame_size > 0


def test_accepted_connections_are_counted_until_they_end(side):
    """A gateway would count connections that are gone, and refuse clients once 'full' of ghosts."""
    a, b = client(side, 40001), client(side, 40002)
    assert side.open_count() == 2
    a.drop()
    b.drop()
    b.drop()
    side.settle()
    assert side.open_count() == 0


def test_sockets_over_max_connections_are_closed_before_a_byte(side):
    """A full gateway would spend a socket (and a handshake) on every newcomer, and count lost ones forever."""
    side.hub.config = side.hub.config.replace(max_connections=2)
    a, b = client(side, 40001), client(side, 40002)
    c = client(side, 40003)
    assert c.transport.disconnecting and c.transport.value() == b""
    c.drop()
    assert side.open_count() == 2
    a.drop()
    side.settle()
    d = client(side, 40004)
    assert not d.transport.disconnecting and side.open_count() == 2
    for h in (b, d):
        h.drop()
    side.settle()
    e, f = client(side, 40005), client(side, 40006)
    assert not (e.transport.disconnecting or f.transport.disconnecting)


def test_not_accepting_refuses_with_unavailable(side):
    """A stopping gateway would take new clients that it is about to drop."""
    side.hub.accepting = False
    c = client(side)
    assert c.frames() == [{"type": "error", "code": "unavailable",
                           "message": "the server takes no new connections; try again later"}]
    assert c.closed
    c.drop()
    assert side.open_count() == 0


def test_auth_is_recorded_and_a_sync_requested(side):
    """After auth_reply ok the user would not be reachable, or would never get the undelivered messages."""
    c = login(side)
    side.settle()
    assert side.user_of(c.conn) == "alice"
    assert side.syncs() == [c.conn.conn_id]
    assert c.conn.conn_id == f"{side.hub.server_id}##10.1.2.3##40001"


def test_auth_that_cannot_be_recorded_is_unavailable(side):
    """A client would believe it is reachable while the gateway could not record it."""
    side.break_recording()
    c = client(side)
    c.send({"type": "auth", "token": FakeAuthenticator.token("alice")})
    side.settle()
    assert c.frames() == [p.auth_reply_error(p.UNAVAILABLE, "the server could not record the connection; retry")]
    assert not c.closed and not c.conn.authenticated
    assert side.user_of(c.conn) is None


def test_frames_are_forwarded_with_their_connection(side):
    """A message would reach the processors without saying whose connection sent it."""
    c = login(side)
    frame = {"type": "message", "clientMsgId": "c-1", "sessionId": "s-1", "body": {"t": "hi"}}
    c.send(frame)
    side.settle()
    assert side.forwarded() == [(c.conn.conn_id, frame)]
    assert c.frames() == []  # nothing to say until the processor answers


def test_forward_failure_is_unavailable_to_the_client(side):
    """A message the gateway could not pass on would be lost silently instead of retried by the client."""
    c = login(side)
    side.break_forwarding()
    c.send({"type": "message", "clientMsgId": "c-1", "sessionId": "s-1", "body": 1})
    side.settle()
    side.settle(5.0)  # publish_timeout: the real bus gives up on an unconfirmed publish
    [error] = c.frames()
    assert error["type"] == "message_reply" and error["ok"] is False and error["clientMsgId"] == "c-1"
    assert error["error"]["code"] == "unavailable"
    assert not c.closed


def test_connection_end_removes_the_user(side):
    """A user whose connection ended would still look online and be routed to."""
    c = login(side)
    other = login(side, "bob", 40002)
    c.drop()
    side.settle()
    assert side.user_of(c.conn) is None
    assert side.user_of(other.conn) == "bob"
    assert side.open_count() == 1


# --- the connection side


class FakeConnectionSide:
    """FakeConnection: what it recorded is what a client would have seen."""

    def __init__(self, kind: str) -> None:
        self.conn = FakeConnection(ip="10.1.2.3", port=40001, server_id="gw-0000", transport_name=kind)

    def received(self) -> list:
        out, self.conn.sent[:] = list(self.conn.sent), []
        return out

    def close_code(self):
        return self.conn.closed[0] if self.conn.closed else None


class EngineConnectionSide:
    """The real ClientConnection behind its adapter: what the client reads off the wire."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.harness = ClientHarness(FakeHub(), kind, ip="10.1.2.3", port=40001)
        self.conn = self.harness.conn

    def received(self) -> list:
        return self.harness.frames()

    def close_code(self):
        if self.kind == "ws":
            return self.harness.close_code
        return self.harness.closed or None


@pytest.fixture(params=["fake-ws", "fake-tcp", "real-ws", "real-tcp"])
def conn_side(request):
    """The connection under test: FakeConnection or the real engine, over WebSocket or TCP."""
    impl, kind = request.param.split("-")
    return FakeConnectionSide(kind) if impl == "fake" else EngineConnectionSide(kind)


def test_connection_names_itself_as_the_hub_expects(conn_side):
    """Deliveries would go to the wrong socket: the hub keys connections by these names."""
    conn = conn_side.conn
    assert verifyObject(IClientConnection, conn)
    assert (conn.ip, conn.port, conn.peer_key) == ("10.1.2.3", 40001, "10.1.2.3##40001")
    assert conn.conn_id == "gw-0000##10.1.2.3##40001"
    assert conn.user_id is None and conn.transport_name in ("ws", "tcp")


def test_frames_sent_reach_the_client_in_order(conn_side):
    """A delivery serialised once for many connections would arrive mangled or out of order."""
    conn = conn_side.conn
    first = {"type": "message_send", "msgId": "1", "body": "é"}
    conn.send_frame(first)
    conn.send_encoded(b'{"type":"message_send","msgId":"2"}')
    conn.send_encoded('{"type":"message_send","msgId":"3"}')
    assert conn_side.received() == [first, {"type": "message_send", "msgId": "2"},
                                    {"type": "message_send", "msgId": "3"}]


def test_close_ends_delivery(conn_side):
    """Frames written after the hub closed a connection would still go out."""
    conn = conn_side.conn
    conn.close(4003, "slow consumer")
    conn.send_frame({"type": "message_send", "msgId": "late"})
    frames = conn_side.received()
    if conn.transport_name == "tcp":
        assert frames == [{"type": "error", "code": "slow_consumer", "message": "slow consumer"}]
    else:
        assert frames == [] and conn_side.close_code() == 4003
    assert conn_side.close_code()


def test_going_away_tells_the_client_to_reconnect_elsewhere(conn_side):
    """A client of a stopping gateway would not know to reconnect to another one."""
    conn = conn_side.conn
    conn.going_away()
    frames = conn_side.received()
    if conn.transport_name == "tcp":
        assert frames == [{"type": "error", "code": "going_away", "message": "server going away"}]
    else:
        assert frames == [] and conn_side.close_code() == 1001

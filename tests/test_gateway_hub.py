"""GatewayService as the engine's hub, on fakes (FakeRegistry, a recording bus, a memory reactor).

The real-service behaviour is in test_gateway_integration.py; these pin the
batching, ordering and failure rules where time and failures are controlled.
"""

from __future__ import annotations

import json

import pytest
from twisted.internet import defer, protocol
from twisted.internet.testing import MemoryReactorClock

from imcluster.auth import Identity
from imcluster.bus import Unavailable
from imcluster.gateway.service import GatewayService, GatewayStopping, declared_port, with_backlog
from imcluster.testing import FakeBus, FakeConnection, FakeRegistry, gateway_config

PREFIX = "hub:"
NS = "t"


class Hub:
    """A started GatewayService on FakeRegistry and FakeBus (memory reactor), plus helpers."""

    def __init__(self, **config):
        self.reactor = MemoryReactorClock()
        self.reactor.advance(1_764_160_000)
        self.config = gateway_config(ws=["tcp:0"], tcp=["tcp:0"], heartbeat=10.0, server_ttl=30.0,
                                     redis_prefix=PREFIX, namespace=NS, publish_timeout=5.0, **config)
        self.registry = FakeRegistry(PREFIX, clock=self.reactor)
        self.bus = FakeBus(NS, publish_timeout=5.0, clock=self.reactor)
        self.bus.startService()
        # the test plays the processor on the same broker
        self.processor = FakeBus(NS, publish_timeout=5.0, clock=self.reactor, broker=self.bus.broker)
        self.processor.startService()
        self.items = []  # every item the processors got, in order
        self.processor.consume(self.processor.processor_queue(), self._processor_got, prefetch=1000)
        factories = {"ws": lambda hub: protocol.Factory(), "tcp": lambda hub: protocol.Factory()}
        self.gw = GatewayService(self.config, self.registry, self.bus, authenticator=None,
                                 reactor=self.reactor, factories=factories)
        d = self.gw.startService()
        assert d.called, "start must not wait on fakes"
        self.store = self.registry.store
        self.uuid = self.gw.server_id

    def _processor_got(self, msg):
        self.items.append(json.loads(msg.body))
        msg.ack()

    def bodies(self):
        """Bodies published by the gateway to <ns>.server."""
        return [json.loads(body) for rk, body, _, _ in self.bus.published if rk == f"{NS}.server"]

    def deliver(self, doc):
        """Publish a delivery to this gateway's queue, as a processor does."""
        body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
        result(self.processor.publish(self.processor.gateway_key(self.uuid), body, mandatory=True))
        self.turn()

    def unacked(self):
        return sum(len(c.unacked) for c in self.bus.consumers)

    def turn(self):
        """End the reactor turn: callLater(0) work runs."""
        self.reactor.advance(0)

    def connect(self, port, transport="ws", device=None):
        conn = FakeConnection(ip="10.0.0.1", port=port, server_id=self.uuid,
                              transport_name=transport, device=device)
        assert self.gw.connection_made(conn)
        return conn

    def auth(self, conn, user, exp=1_764_200_000, refresh=False):
        d = self.gw.authenticated(conn, Identity(user, exp), refresh)
        conn.user_id = user
        return d

    def ucir(self, user):
        return self.store.execute("HGETALL", f"{PREFIX}UCIR##{{{user}}}")

    def wsconns(self):
        return sorted(self.store.execute("SMEMBERS", f"{PREFIX}WSCONNS##{{{self.uuid}}}"))


def result(d):
    """The result of a fired Deferred (raises its failure)."""
    out = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


def test_start_registers_then_consumes_then_listens():
    """A gateway must be findable in Redis and consuming its queue before any client can connect."""
    h = Hub()
    info = json.loads(h.store.execute("GET", f"{PREFIX}WSSERVER_{{{h.uuid}}}"))
    assert set(info) == {"ip", "port", "tcpPort", "startedAt"}
    assert h.store.execute("SMEMBERS", f"{PREFIX}WSSERVERS") == [h.uuid]
    consumer = h.bus.consumers[0]
    assert consumer.queue.name == f"t.gateway.{h.uuid}" and consumer.exclusive
    assert len(h.reactor.tcpServers) == 2
    assert h.gw.accepting


def test_each_start_gets_a_new_uuid():
    """A restarted gateway must not reuse the dead one's uuid (the reaper would remove the new entries)."""
    h = Hub()
    first = h.uuid
    result(h.gw.stopService())
    result(h.gw.startService())
    assert h.gw.server_id != first


def test_declared_port():
    """WSSERVER_ must name the configured ports even before listening."""
    assert declared_port("tcp:8080") == 8080
    assert declared_port("tcp:8080:interface=127.0.0.1") == 8080
    assert declared_port("ssl:port=8443:privateKey=k.pem") == 8443
    assert declared_port("unix:/tmp/x") == 0


def _entries(h):
    """The gateway's Redis keys, without the users' presence states (they stay, offline)."""
    return [k for k in h.store.keys(PREFIX) if "PRESENCE##" not in k]


def test_auths_of_one_turn_are_one_pipeline():
    """A thundering herd of reconnecting clients must cost one Redis round trip per turn, not one each."""
    h = Hub()
    conns = [h.connect(40000 + i, device="web") for i in range(50)]
    before = h.registry.round_trips
    ds = [h.auth(c, f"u{i % 10}") for i, c in enumerate(conns)]
    assert not any(d.called for d in ds), "the reply must wait until Redis has the entry"
    h.turn()
    assert all(d.called for d in ds)
    # the entries, then the presence check of their users: two pipelines written back to back
    assert h.registry.round_trips == before + 2
    assert len(h.wsconns()) == 50
    fields = h.ucir("u3")
    meta = json.loads(fields[fields.index(f"{h.uuid}##10.0.0.1##40003") + 1])
    assert meta == {"device": "web", "authedAt": 1_764_160_000, "exp": 1_764_200_000}
    assert "token" not in json.dumps(fields)


def test_disconnect_removes_entries():
    """A disconnected client must not stay routable in Redis."""
    h = Hub()
    a, b = h.connect(1), h.connect(2)
    result_a, result_b = h.auth(a, "alice"), h.auth(b, "alice")
    h.turn()
    result(result_a), result(result_b)
    h.gw.connection_lost(a)
    h.turn()
    assert h.ucir("alice") == [f"{h.uuid}##10.0.0.1##2", h.ucir("alice")[1]]
    assert h.wsconns() == ["alice##10.0.0.1##2"]
    h.gw.connection_lost(b)
    h.turn()
    assert h.ucir("alice") == [] and h.wsconns() == []


def test_auth_then_disconnect_in_one_turn_writes_nothing():
    """A client that vanishes right after auth must not leave an entry behind."""
    h = Hub()
    a = h.connect(1)
    d = h.auth(a, "alice")
    h.gw.connection_lost(a)
    before = h.registry.round_trips
    h.turn()
    assert d.called
    assert h.registry.round_trips == before
    assert h.ucir("alice") == [] and h.wsconns() == []


def test_auth_fails_when_redis_is_down_and_connection_stays_unauthenticated():
    """With Redis down the client gets auth_reply unavailable and must not be routable."""
    h = Hub()
    a = h.connect(1)
    h.registry.set_available(False)
    d = h.auth(a, "alice")
    h.turn()
    with pytest.raises(TimeoutError):
        result(d)
    assert h.gw.connections.user_of(a) is None
    assert h.gw.connections.unauthenticated(a.peer_key) is a
    h.registry.set_available(True)
    d = h.auth(a, "alice")
    h.turn()
    result(d)
    assert h.gw.connections.user_of(a) == "alice"
    assert h.wsconns() == ["alice##10.0.0.1##1"]


def test_refresh_updates_exp():
    """After a token refresh, operators must see the new expiry."""
    h = Hub()
    a = h.connect(1)
    h.auth(a, "alice", exp=100)
    h.turn()
    d = h.auth(a, "alice", exp=200, refresh=True)
    h.turn()
    result(d)
    assert json.loads(h.ucir("alice")[1])["exp"] == 200


def test_forwards_of_one_turn_are_one_publish():
    """Under load the gateway must coalesce frames (one publish per reactor turn)."""
    h = Hub()
    a = h.connect(1)
    h.auth(a, "alice")
    h.turn()
    h.bus.set_available(False)  # confirms wait until the broker is back
    frames = [{"type": "message", "clientMsgId": f"c{i}", "sessionId": "s", "body": i} for i in range(5)]
    ds = [h.gw.forward(a, f) for f in frames]
    h.turn()
    assert not any(d.called for d in ds), "a frame is forwarded only once the broker confirms"
    h.bus.set_available(True)
    assert all(d.called for d in ds)
    assert len(h.bodies()) == 1
    body = h.bodies()[0]
    assert h.items == [body]
    assert body["v"] == 1
    assert [i["frame"] for i in body["items"]] == frames
    item = body["items"][0]
    assert item["kind"] == "frame" and item["userId"] == "alice" and item["serverId"] == h.uuid
    assert item["connId"] == f"{h.uuid}##10.0.0.1##1" and item["ts"] == 1_764_160_000_000


def test_publish_batch_limit_flushes_at_once():
    """A batch never grows past publish_batch items."""
    h = Hub(publish_batch=3)
    a = h.connect(1)
    h.auth(a, "alice")
    h.turn()
    for i in range(7):
        h.gw.forward(a, {"type": "read", "sessionId": "s", "seq": i})
    assert [len(b["items"]) for b in h.bodies()] == [3, 3]
    h.turn()
    assert [len(b["items"]) for b in h.bodies()] == [3, 3, 1]


def test_publish_failure_fails_every_frame_within_publish_timeout():
    """When the broker is unreachable, every sender of the batch must hear of it within publish_timeout."""
    h = Hub()
    a = h.connect(1)
    h.auth(a, "alice")
    h.turn()
    h.bus.set_available(False)
    ds = [h.gw.forward(a, {"type": "read", "sessionId": "s", "seq": i}) for i in range(3)]
    h.turn()
    h.reactor.advance(4.9)
    assert not any(d.called for d in ds)
    h.reactor.advance(0.1)
    for d in ds:
        with pytest.raises(Unavailable):
            result(d)


def test_sync_request_after_auth_and_retried():
    """A sync request must not be lost when the broker is briefly unreachable."""
    h = Hub(retry_delay=0.5, retry_max_delay=2.0)
    a = h.connect(1)
    h.auth(a, "alice")
    h.turn()
    h.bus.set_available(False)
    done = h.gw.request_sync(a)
    h.turn()
    h.reactor.advance(5.0)  # the publish fails...
    assert not done.called
    h.bus.set_available(True)
    h.reactor.advance(0.5)  # ... and is retried
    h.turn()
    assert done.called
    # the reconnect also asks for a sync of every connection again (tests/test_gateway_healing.py)
    [item] = [i for body in h.items for i in body["items"] if not i.get("resync")]
    assert item["kind"] == "sync" and "frame" not in item
    assert item["userId"] == "alice" and item["connId"] == a.conn_id and item["serverId"] == h.uuid


def test_sync_retry_stops_when_connection_goes():
    """No retry timer may outlive its connection."""
    h = Hub()
    a = h.connect(1)
    h.auth(a, "alice")
    h.turn()
    h.bus.set_available(False)
    done = h.gw.request_sync(a)
    h.turn()
    h.reactor.advance(5.0)
    h.gw.connection_lost(a)
    assert done.called
    h.bus.set_available(True)
    h.reactor.advance(60)
    assert h.items == []


def test_acks_are_retried_until_published():
    """An acknowledgement sent while RabbitMQ is down must not be lost (ARCHITECTURE.md failure rules)."""
    h = Hub()
    a = h.connect(1)
    h.auth(a, "alice")
    h.turn()
    h.bus.set_available(False)
    done = h.gw.forward(a, {"type": "message_send_reply", "msgIds": ["7"]})
    h.turn()
    h.reactor.advance(6.0)  # past publish_timeout: the first attempt failed
    assert not done.called
    h.bus.set_available(True)
    h.reactor.advance(30.0)
    h.turn()
    assert done.called and done.result is None
    acks = [i for i in h.items for i in i["items"] if i["kind"] == "frame"]
    assert [i["frame"] for i in acks] == [{"type": "message_send_reply", "msgIds": ["7"]}]
    assert acks[0]["userId"] == "alice"


def test_a_message_is_not_retried_by_the_gateway():
    """A `message` that could not be published fails (the client is told `unavailable`) instead of waiting."""
    h = Hub()
    a = h.connect(1)
    h.auth(a, "alice")
    h.turn()
    h.bus.set_available(False)
    d = h.gw.forward(a, {"type": "message", "clientMsgId": "c1", "sessionId": "s", "body": 1})
    failures = []
    d.addErrback(failures.append)
    h.turn()
    h.reactor.advance(6.0)
    assert len(failures) == 1


def test_delivery_goes_to_named_connections_in_order_then_acks():
    """Deliveries must reach every named live connection, in order, and be acked."""
    h = Hub()
    a, b, c = h.connect(1), h.connect(2, "tcp"), h.connect(3)
    for conn, user in ((a, "alice"), (b, "alice"), (c, "bob")):
        h.auth(conn, user)
    h.turn()
    frames = [{"type": "message_send", "msgId": str(i), "body": {"t": "é"}} for i in range(3)]
    h.deliver({"v": 1, "items": [
        {"connIds": [a.conn_id, b.conn_id, f"{h.uuid}##10.0.0.1##999"], "frames": frames},
        {"connIds": [c.conn_id], "frames": [{"type": "sync_done", "count": 0}]},
    ]})
    assert a.sent == frames and b.sent == frames
    assert c.sent == [{"type": "sync_done", "count": 0}]
    assert h.unacked() == 0


@pytest.mark.parametrize("body", [
    b"not json", b"[]", b'{"v":2,"items":[]}', b'{"v":1}',
    json.dumps({"v": 1, "items": [{"connIds": "x", "frames": []}]}).encode(),
])
def test_malformed_delivery_is_acked_and_ignored(body):
    """A poison delivery must not crash the gateway nor be redelivered forever."""
    h = Hub()
    h.deliver(body)
    assert h.unacked() == 0
    assert h.bus.queue_depth(f"t.gateway.{h.uuid}") == 0


def test_malformed_item_does_not_block_good_ones():
    """One bad item must not cost the other recipients their delivery."""
    h = Hub()
    a = h.connect(1)
    h.auth(a, "alice")
    h.turn()
    h.deliver({"v": 1, "items": [{"connIds": [a.conn_id], "frames": "x"},
                                 {"connIds": [a.conn_id], "frames": [{"type": "pong"}]}]})
    assert a.sent == [{"type": "pong"}] and h.unacked() == 0


def test_heartbeat_reregisters_everything_after_data_loss():
    """If Redis loses its data, routing to this gateway's users must come back within a heartbeat."""
    h = Hub(redis_batch=2)
    conns = [h.connect(i + 1) for i in range(5)]
    for i, c in enumerate(conns):
        h.auth(c, f"u{i}")
    h.turn()
    h.registry.flush()
    assert h.wsconns() == []
    h.reactor.advance(10.0)
    assert len(h.wsconns()) == 5
    assert h.store.execute("SMEMBERS", f"{PREFIX}WSSERVERS") == [h.uuid]
    assert h.store.execute("PTTL", f"{PREFIX}WSSERVER_{{{h.uuid}}}") > 0
    assert json.loads(h.ucir("u4")[1])["exp"] == 1_764_200_000


def test_reconnect_reregisters_everything():
    """A Redis restart without persistence must not leave this gateway's users unroutable."""
    h = Hub()
    a = h.connect(1)
    h.auth(a, "alice")
    h.turn()
    result(h.registry.simulate_reconnect(lose_data=True))
    assert h.wsconns() == ["alice##10.0.0.1##1"]
    assert h.store.execute("EXISTS", f"{PREFIX}WSSERVER_{{{h.uuid}}}") == 1


def test_failed_resync_is_retried_by_the_next_heartbeat():
    """A re-registration interrupted by another Redis failure must be completed later."""
    h = Hub()
    a = h.connect(1)
    h.auth(a, "alice")
    h.turn()
    h.registry.flush()
    h.registry.set_available(False)
    h.registry.simulate_reconnect().addErrback(lambda f: None)  # fails: Redis down again
    h.registry.set_available(True)
    # the key is re-created by the refresh, but the connections are still missing
    h.reactor.advance(10.0)
    assert h.wsconns() == ["alice##10.0.0.1##1"]


def test_failed_remove_is_retried():
    """A disconnect while Redis is down must not leave a stale entry forever."""
    h = Hub()
    a = h.connect(1)
    h.auth(a, "alice")
    h.turn()
    h.registry.set_available(False)
    h.gw.connection_lost(a)
    h.turn()
    h.registry.set_available(True)
    assert h.wsconns() == ["alice##10.0.0.1##1"]
    h.reactor.advance(10.0)
    assert h.wsconns() == [] and h.ucir("alice") == []


def test_refusal_while_stopping():
    """A stopping gateway must refuse new clients (they go to another one); max_connections: the socket slots."""
    h = Hub()
    h.connect(1)
    assert h.gw.connection_made(FakeConnection(port=3, server_id=h.uuid))
    h.gw.stopService()
    assert not h.gw.connection_made(FakeConnection(port=4, server_id=h.uuid))


def test_socket_slots_bound_every_socket_and_count_refusals():
    """Sockets still in their handshake count towards max_connections; each refusal shows in the metrics."""
    from prometheus_client import REGISTRY

    def refused():
        return REGISTRY.get_sample_value("imcluster_closes_total", {"reason": "max_connections"}) or 0.0

    h = Hub(max_connections=2)
    before = refused()
    assert h.gw.socket_opened() and h.gw.socket_opened()
    assert not h.gw.socket_opened() and not h.gw.socket_opened()
    assert refused() == before + 2 and h.gw.open_sockets == 2
    h.gw.socket_closed()
    assert h.gw.socket_opened()


def test_graceful_stop():
    """SIGTERM: listeners stop first, every client goes away, every Redis entry is removed."""
    h = Hub()
    conns = [h.connect(i + 1) for i in range(3)]
    h.auth(conns[0], "alice")
    h.auth(conns[1], "bob")
    h.turn()
    events = []
    for _, _, port in h.gw.ports:
        port.stopListening = lambda: events.append("listener stopped")
    for c in conns:
        c.going_away = (lambda c: lambda: (events.append("going away"), FakeConnection.going_away(c)))(c)
    unregister = h.registry.unregister_server
    h.registry.unregister_server = lambda uuid: (events.append("redis cleanup"), unregister(uuid))[1]
    h.bus.set_available(False)
    h.gw.forward(conns[0], {"type": "read", "sessionId": "s", "seq": 1})
    d = h.gw.stopService()
    assert events == ["listener stopped"] * 2 + ["going away"] * 3 + ["redis cleanup"]
    assert all(c.went_away for c in conns)
    # every entry is gone; what stays is the users' presence state, offline
    assert [k for k in h.store.keys(PREFIX) if "PRESENCE##" not in k] == []
    assert {k: h.store.execute("GET", k)[-2:] for k in h.store.keys(PREFIX)} == {
        f"{PREFIX}PRESENCE##{{alice}}": ":0", f"{PREFIX}PRESENCE##{{bob}}": ":0"}
    with pytest.raises(GatewayStopping):
        result(h.gw.authenticated(conns[2], Identity("carol", 1), False))
    # the clients close: the stop goes on to drain the publish made before it
    for c in conns:
        h.gw.connection_lost(c)
    assert [k for k in h.store.keys(PREFIX) if "PRESENCE##" not in k] == []
    assert not d.called
    h.turn()
    h.bus.set_available(True)
    assert d.called
    assert len(h.items) == 1
    assert len(h.gw.connections) == 0


def test_stop_does_not_wait_forever_for_clients():
    """A client that never closes must not hold the gateway past goodbye_timeout."""
    h = Hub(goodbye_timeout=2.0)
    h.connect(1)
    d = h.gw.stopService()
    assert not d.called
    h.reactor.advance(2.0)
    assert d.called


def test_listeners_get_a_large_backlog():
    """Twisted's default backlog of 50 makes a reconnect storm wait for SYN retransmits."""
    h = Hub(listen_backlog=777)
    assert [backlog for _, _, backlog, _ in h.reactor.tcpServers] == [777, 777]
    assert with_backlog("tcp:80:backlog=5", 777) == "tcp:80:backlog=5"
    assert with_backlog("unix:/x", 777) == "unix:/x"


def test_advertise_address():
    """WSSERVER_ must carry a reachable address: the configured one, else a non-loopback one if any."""
    from imcluster.gateway.service import advertise_address

    assert advertise_address("10.1.2.3") == "10.1.2.3"
    ip = advertise_address(None)
    assert ip == "127.0.0.1" or not ip.startswith("127.")


def test_tap_builds_the_tree_so_that_listeners_stop_first():
    """Stopping in the wrong order would close Redis/AMQP before the gateway cleaned up."""
    from imcluster.gateway.tap import Options, makeService

    options = Options()
    options.parseOptions(["--jwt-secret", "x" * 32, "--ws", "tcp:0", "--tcp", "tcp:0", "--stream", "tcp:0",
                          "--metrics", "tcp:0:interface=127.0.0.1"])
    root = makeService(options)
    assert [s.name for s in root] == [
        "redis", "amqp", "metrics", "gateway"]
    gateway = root.getServiceNamed("gateway")
    assert gateway.registry is root.getServiceNamed("redis")
    assert gateway.bus is root.getServiceNamed("amqp")
    # the gateway's own children: stopped in reverse, so the listeners stop first
    assert [s.name for s in gateway] == ["heartbeat", "ws tcp:0", "tcp tcp:0", "stream tcp:0"]


def test_listeners_and_heartbeat_start_after_registration_and_stop_first():
    """No client may connect before the gateway is in Redis and consuming; on SIGTERM listeners close first."""
    h = Hub()
    listeners = [s for s in h.gw if s.name != "heartbeat"]
    assert [s.kind for s in listeners] == ["ws", "tcp"]
    assert all(s.running for s in h.gw)
    events = []
    for s in h.gw:
        stop = s.stopService
        s.stopService = (lambda s, stop: lambda: (events.append(s.name), stop())[1])(s, stop)
    unregister = h.registry.unregister_server
    h.registry.unregister_server = lambda uuid: (events.append("redis cleanup"), unregister(uuid))[1]
    result(h.gw.stopService())
    assert events == ["tcp tcp:0", "ws tcp:0", "heartbeat", "redis cleanup"]
    assert h.gw.ports == [] and h.gw.port_of("ws") == 0
    assert h.reactor.getDelayedCalls() == []  # the heartbeat's timer is gone


def test_gateway_that_cannot_listen_keeps_no_heartbeat():
    """A failed start (port taken) must not leave a heartbeat refreshing a gateway nobody can reach."""
    from twisted.internet.error import CannotListenError

    class Taken(MemoryReactorClock):
        def listenTCP(self, port, factory, backlog=50, interface=""):
            if self.tcpServers:
                raise CannotListenError(interface, port, OSError("in use"))
            return super().listenTCP(port, factory, backlog, interface)

    reactor = Taken()
    config = gateway_config(ws=["tcp:0"], tcp=["tcp:0"], heartbeat=10.0, server_ttl=30.0,
                            redis_prefix=PREFIX, namespace=NS)
    bus = FakeBus(NS, clock=reactor)
    bus.startService()
    gw = GatewayService(config, FakeRegistry(PREFIX, clock=reactor), bus, authenticator=None,
                        reactor=reactor, factories={"ws": lambda hub: protocol.Factory(),
                                                    "tcp": lambda hub: protocol.Factory()})
    with pytest.raises(CannotListenError):
        result(gw.startService())
    assert not any(s.running for s in gw)
    assert not gw.accepting
    assert reactor.getDelayedCalls() == []  # no heartbeat timer left behind


def test_clean_stop_forgets_the_signal():
    """After a clean stop on SIGTERM, twistd must exit 0, not die by the signal."""
    from imcluster.service import DaemonService

    reactor = MemoryReactorClock()
    reactor._exitSignal = 15
    root = DaemonService("imgateway", 5.0, clock=reactor)
    root.startService()
    root.stopService()
    assert reactor._exitSignal is None


def test_clients_closing_after_the_goodbye_timeout_are_harmless():
    """A late close after the stop gave up waiting must not raise (nor re-create Redis entries)."""
    h = Hub(goodbye_timeout=1.0)
    a = h.connect(1)
    h.auth(a, "alice")
    h.turn()
    d = h.gw.stopService()
    h.reactor.advance(1.0)
    assert d.called
    h.gw.connection_lost(a)
    h.turn()
    assert _entries(h) == []


def test_nothing_re_registers_after_the_stop():
    """A Redis reconnect or heartbeat after SIGTERM must not leave the stopped gateway registered."""
    h = Hub()
    a = h.connect(1)
    h.auth(a, "alice")
    h.turn()
    h.gw.stopService()
    result(h.registry.simulate_reconnect())
    h.reactor.advance(30)
    assert _entries(h) == []

"""IMessageBus contract: one suite over FakeBus and the real AMQPService (local RabbitMQ).

Real-only tests below cover what only a broker can do: the broker closing
our connection (``rabbitmqctl close_connection``) and an unreachable broker.
"""

from __future__ import annotations

import time

import pytest
import pytest_twisted
from twisted.internet import defer, task
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from imcluster.bus import AMQPService, Nacked, QueueSpec, Unavailable, Unroutable
from imcluster.interfaces import IBusMessage, IMessageBus
from imcluster.testing import FakeBus
from tests.support.bus import TEST_TIMEOUT, close_connection, connection_pids, rabbitmqctl
from tests.support.ids import unique


def sleep(seconds: float) -> defer.Deferred:
    from twisted.internet import reactor
    return task.deferLater(reactor, seconds, lambda: None)


async def until(predicate, timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        await sleep(0.01)


class Inbox:
    """A consumer callback that keeps what it receives (and acks it when ``auto_ack``)."""

    def __init__(self, auto_ack: bool = False) -> None:
        self.auto_ack = auto_ack
        self.messages = []

    def __call__(self, msg) -> None:
        self.messages.append(msg)
        if self.auto_ack:
            msg.ack()

    @property
    def bodies(self) -> list[bytes]:
        return [m.body for m in self.messages]

    async def wait(self, n: int, timeout: float = 3.0) -> list:
        await until(lambda: len(self.messages) >= n, timeout, f"{n} messages (got {len(self.messages)})")
        return self.messages


@pytest.fixture(params=["fake", "real"])
def kind(request) -> str:
    return request.param


@pytest_twisted.async_yield_fixture
async def bus(kind, namespace, bus_factory):
    """The bus under test: a FakeBus, or an AMQPService on the local RabbitMQ."""
    if kind == "fake":
        from twisted.internet import reactor
        b = FakeBus(namespace, publish_timeout=TEST_TIMEOUT, clock=reactor)
        await b.startService()
        yield b
        if b.running:
            await b.stopService()
    else:
        yield await bus_factory()


@pytest_twisted.async_yield_fixture
async def make_peer(kind, bus, bus_factory):
    """``await make_peer()``: another bus on the same namespace and broker (another process)."""
    peers = []

    async def make():
        if kind == "fake":
            p = FakeBus(bus.namespace, publish_timeout=TEST_TIMEOUT, clock=bus.clock, broker=bus.broker)
            await p.startService()
            peers.append(p)
            return p
        return await bus_factory()

    yield make
    for p in peers:
        if p.running:
            await p.stopService()


async def break_connection(kind: str, bus) -> None:
    """The broker drops ``bus``'s connection; returns once it reconnected and its consumers are back."""
    before = bus.reconnects
    if kind == "fake":
        bus.simulate_reconnect()
    else:
        assert await close_connection(bus.connection_name) == 1
    await until(lambda: bus.reconnects > before and bus.connected
                and all(c.active for c in bus.consumers), 5.0, "reconnect")


def test_names_follow_architecture():
    """Gateways and processors built on either bus would use other queue and key names than the spec."""
    for b in (FakeBus("im"), AMQPService("amqp://guest:guest@127.0.0.1:5672/%2F", "im")):
        verifyObject(IMessageBus, b)
        assert b.server_key() == "im.server"
        assert b.gateway_key("u1") == "im.wsserver.u1"
        p = b.processor_queue()
        assert (p.name, p.routing_key, p.durable, p.exclusive) == ("im.processor", "im.server", True, False)
        assert p.arguments == {"x-dead-letter-exchange": "im.dlx"}
        g = b.gateway_queue("u1")
        assert (g.name, g.routing_key, g.durable, g.exclusive, g.auto_delete) == (
            "im.gateway.u1", "im.wsserver.u1", False, True, True)


@pytest_twisted.ensureDeferred
async def test_roundtrip(bus):
    """A client frame published by a gateway would never reach a processor."""
    inbox = Inbox(auto_ack=True)
    consumer = await bus.consume(bus.processor_queue(), inbox, prefetch=10)
    assert consumer.active
    await bus.publish(bus.server_key(), b'{"v":1}', headers={"origin": "gw1"})
    [msg] = await inbox.wait(1)
    verifyObject(IBusMessage, msg)
    assert msg.body == b'{"v":1}'
    assert msg.redelivered is False
    assert msg.routing_key == bus.server_key()
    assert msg.headers.get("origin") in ("gw1", b"gw1")


@pytest_twisted.ensureDeferred
async def test_pipelined_publishes_arrive_in_order(bus):
    """Messages of one connection would be applied out of order, or publishing would be one at a time."""
    inbox = Inbox(auto_ack=True)
    await bus.consume(bus.processor_queue(), inbox, prefetch=50)
    n = 300
    results = await defer.gatherResults([bus.publish(bus.server_key(), b"m%d" % i) for i in range(n)])
    assert results == [None] * n
    await inbox.wait(n)
    assert inbox.bodies == [b"m%d" % i for i in range(n)]


@pytest_twisted.ensureDeferred
async def test_unacked_messages_return_to_the_queue(bus):
    """A processor that stops before committing would lose the message, or an acked one would come back."""
    first = Inbox()
    c1 = await bus.consume(bus.processor_queue(), first, prefetch=10)
    await defer.gatherResults([bus.publish(bus.server_key(), b) for b in (b"a", b"b")])
    a, b = await first.wait(2)
    assert a.ack() is True
    assert a.ack() is False  # a second ack would close a real channel
    await c1.cancel()
    assert b.ack() is False  # its consumer is gone: the broker takes it back
    second = Inbox(auto_ack=True)
    await bus.consume(bus.processor_queue(), second, prefetch=10)
    [again] = await second.wait(1)
    assert again.body == b"b" and again.redelivered is True
    await sleep(0.1)
    assert second.bodies == [b"b"]


@pytest_twisted.ensureDeferred
async def test_nack_requeue_redelivers(bus):
    """A message a processor could not apply yet (database down) would be lost instead of retried."""
    inbox = Inbox()
    await bus.consume(bus.processor_queue(), inbox, prefetch=10)
    await bus.publish(bus.server_key(), b"retry me")
    [first] = await inbox.wait(1)
    assert first.redelivered is False
    first.nack(requeue=True)
    _, second = await inbox.wait(2)
    assert second.body == b"retry me" and second.redelivered is True
    second.ack()


@pytest_twisted.ensureDeferred
async def test_prefetch_window_is_honoured(bus):
    """A slow processor would be flooded with the whole queue instead of its prefetch window."""
    inbox = Inbox()
    await bus.consume(bus.processor_queue(), inbox, prefetch=3)
    await defer.gatherResults([bus.publish(bus.server_key(), b"%d" % i) for i in range(10)])
    await inbox.wait(3)
    await sleep(0.2)
    assert len(inbox.messages) == 3
    for m in list(inbox.messages):
        m.ack()
    await inbox.wait(6)
    await sleep(0.2)
    assert inbox.bodies == [b"%d" % i for i in range(6)]


@pytest_twisted.ensureDeferred
async def test_mandatory_publish_to_no_queue_is_unroutable(bus):
    """A processor would keep routing deliveries to a dead gateway, or stop routing to a live one."""
    live = unique("gw")
    await bus.consume(bus.gateway_queue(live), Inbox(auto_ack=True), exclusive=True)
    with pytest.raises(Unroutable):
        await bus.publish(bus.gateway_key("nobody"), b"x", mandatory=True)
    # many in flight at once: each outcome belongs to its own publish
    keys = [bus.gateway_key(live) if i % 3 else bus.gateway_key("gone") for i in range(60)]
    results = await defer.DeferredList([bus.publish(k, b"%d" % i, mandatory=True) for i, k in enumerate(keys)],
                                       consumeErrors=True)
    for (ok, value), key in zip(results, keys):
        if key.endswith(live):
            assert ok, value
        else:
            assert not ok and value.check(Unroutable), value
    # not mandatory: the broker drops it and confirms
    await bus.publish(bus.gateway_key("nobody"), b"x")


@pytest_twisted.ensureDeferred
async def test_a_refused_publish_fails_nacked(bus):
    """A message the broker refused (full queue) would be reported as delivered."""
    key = unique("k")
    full = QueueSpec(unique(bus.namespace + ".full"), key, durable=False, auto_delete=True,
                     arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
    inbox = Inbox()
    await bus.consume(full, inbox, prefetch=1)
    await bus.publish(key, b"held unacked")
    await inbox.wait(1)
    await bus.publish(key, b"ready")
    with pytest.raises(Nacked):
        await bus.publish(key, b"one too many")


@pytest_twisted.ensureDeferred
async def test_gateway_queue_vanishes_with_its_consumer(bus):
    """Deliveries for a gateway that has gone would pile up instead of coming back unroutable."""
    uuid = unique("gw")
    inbox = Inbox(auto_ack=True)
    c = await bus.consume(bus.gateway_queue(uuid), inbox, prefetch=10, exclusive=True)
    await bus.publish(bus.gateway_key(uuid), b"hello", mandatory=True)
    await inbox.wait(1)
    await c.cancel()
    with pytest.raises(Unroutable):
        await bus.publish(bus.gateway_key(uuid), b"late", mandatory=True)


@pytest_twisted.ensureDeferred
async def test_rejected_processor_message_is_dead_lettered(bus):
    """A poison message would be lost (or retried for ever) instead of kept in <ns>.dead."""
    inbox = Inbox()
    await bus.consume(bus.processor_queue(), inbox, prefetch=10)
    dead = Inbox(auto_ack=True)
    await bus.consume(bus.dead_queue(), dead, prefetch=10)
    await bus.publish(bus.server_key(), b"poison")
    [msg] = await inbox.wait(1)
    msg.nack(requeue=False)
    [corpse] = await dead.wait(1)
    assert corpse.body == b"poison"
    assert "x-death" in corpse.headers
    await sleep(0.05)
    assert len(inbox.messages) == 1


@pytest_twisted.ensureDeferred
async def test_processors_compete_on_one_queue(bus, make_peer):
    """Two processors would both handle the same client frame."""
    peer = await make_peer()
    a, b = Inbox(auto_ack=True), Inbox(auto_ack=True)
    await bus.consume(bus.processor_queue(), a, prefetch=1)
    await peer.consume(peer.processor_queue(), b, prefetch=1)
    await defer.gatherResults([bus.publish(bus.server_key(), b"%d" % i) for i in range(40)])
    await until(lambda: len(a.messages) + len(b.messages) >= 40, 3.0, "40 deliveries")
    await sleep(0.05)
    assert sorted(a.bodies + b.bodies) == sorted(b"%d" % i for i in range(40))
    assert a.messages and b.messages


@pytest_twisted.ensureDeferred
async def test_consumers_survive_a_lost_connection(kind, bus):
    """After a broker hiccup a gateway or processor would stop receiving, or an old ack would break the channel."""
    inbox = Inbox()
    await bus.consume(bus.processor_queue(), inbox, prefetch=10)
    uuid = unique("gw")
    deliveries = Inbox(auto_ack=True)
    await bus.consume(bus.gateway_queue(uuid), deliveries, prefetch=10, exclusive=True)
    await bus.publish(bus.server_key(), b"before")
    [old] = await inbox.wait(1)
    await break_connection(kind, bus)
    assert bus.reconnects == 1
    _, again = await inbox.wait(2)
    assert again.body == b"before" and again.redelivered is True
    assert old.ack() is False  # from the dead channel: ignored, not an error
    assert again.ack() is True
    await bus.publish(bus.server_key(), b"after")
    _, _, after = await inbox.wait(3)
    assert after.body == b"after"
    after.ack()
    # the exclusive gateway queue was declared again
    await bus.publish(bus.gateway_key(uuid), b"delivery", mandatory=True)
    assert (await deliveries.wait(1))[0].body == b"delivery"


@pytest_twisted.ensureDeferred
async def test_restart_listeners_run_once_the_queue_is_back(kind, bus):
    """A gateway that is not told its queue came back cannot ask for what was routed while it was gone."""
    uuid = unique("gw")
    deliveries = Inbox(auto_ack=True)
    consumer = await bus.consume(bus.gateway_queue(uuid), deliveries, prefetch=10, exclusive=True)
    restarts = []

    async def queue_back():
        # the queue exists again when the listener runs: a delivery routed now arrives
        await bus.publish(bus.gateway_key(uuid), b"after the restart", mandatory=True)
        restarts.append(consumer.active)

    down = []
    consumer.add_restart_listener(lambda since: (down.append(since), defer.ensureDeferred(queue_back()))[1])
    assert restarts == []  # the first start is no restart
    before = time.time()
    await break_connection(kind, bus)
    await until(lambda: restarts, 5.0, "restart listener")
    assert restarts == [True]
    # when the queue stopped being consumed (fake bus: its clock is the reactor too)
    assert before - 1 <= down[0] <= time.time()
    assert (await deliveries.wait(1))[0].body == b"after the restart"


@pytest_twisted.ensureDeferred
async def test_publish_after_stop_fails_at_once(bus):
    """A gateway shutting down would wait publish_timeout for every publish, or lose them silently."""
    await bus.stopService()
    started = time.monotonic()
    with pytest.raises(Unavailable):
        await bus.publish(bus.server_key(), b"late")
    assert time.monotonic() - started < 0.5


@pytest_twisted.ensureDeferred
async def test_broker_refusing_a_queue_fails_consume(bus):
    """A gateway whose queue name clashes with another connection's would start without deliveries."""
    spec = bus.processor_queue()
    clash = QueueSpec(spec.name, spec.routing_key, durable=True, arguments={"x-max-length": 5})
    with pytest.raises(Exception) as err:
        await bus.consume(clash, Inbox())
    assert "406" in str(err.value) or "PRECONDITION" in str(err.value)
    # the bus goes on working
    inbox = Inbox(auto_ack=True)
    await bus.consume(spec, inbox)
    await bus.publish(bus.server_key(), b"ok")
    await inbox.wait(1)


@pytest_twisted.ensureDeferred
async def test_topology_deleted_under_a_running_bus_comes_back(bus, make_peer):
    """An operator deleting the exchange or queues would silence a running daemon for good."""
    inbox = Inbox(auto_ack=True)
    await bus.consume(bus.processor_queue(), inbox)
    peer = await make_peer()
    await peer.delete_topology()
    # the publishing channel hits 404, reopens, declares everything again, resends
    await bus.publish(bus.server_key(), b"after the purge")
    [msg] = await inbox.wait(1, timeout=5.0)
    assert msg.body == b"after the purge"


@pytest_twisted.ensureDeferred
async def test_a_failing_callback_rejects_its_message_and_consuming_goes_on(bus):
    """One poison message crashing the callback would stall the queue or loop for ever."""
    seen = []

    def callback(msg):
        seen.append(msg.body)
        if msg.body == b"boom":
            raise ValueError("poison")
        msg.ack()

    await bus.consume(bus.processor_queue(), callback)
    dead = Inbox(auto_ack=True)
    await bus.consume(bus.dead_queue(), dead)
    await defer.gatherResults([bus.publish(bus.server_key(), b) for b in (b"boom", b"fine")])
    await until(lambda: len(seen) >= 2 and dead.messages, 3.0, "both handled")
    assert seen == [b"boom", b"fine"]
    assert dead.bodies == [b"boom"]


# --- fake only ---------------------------------------------------------------


def test_fake_publish_fails_unavailable_after_timeout_while_broker_down():
    """A unit test of a gateway could not simulate RabbitMQ being down."""
    clock = Clock()
    bus = FakeBus("imf", publish_timeout=5.0, clock=clock)
    bus.startService()
    inbox = Inbox(auto_ack=True)
    bus.consume(bus.processor_queue(), inbox)
    bus.set_available(False)
    assert not bus.connected
    late = bus.publish(bus.server_key(), b"late")
    clock.advance(4.9)
    assert not late.called
    clock.advance(0.1)
    failure = []
    late.addErrback(failure.append)
    assert failure and failure[0].check(Unavailable)
    assert "within 5s" in failure[0].getErrorMessage()
    bus.publish_backlog = 1
    waits = bus.publish(bus.server_key(), b"waits")
    full = bus.publish(bus.server_key(), b"no room")
    assert full.called and "already waiting" in str(full.result.value)
    full.addErrback(lambda f: None)
    clock.advance(1)
    bus.set_available(True)
    assert waits.called and bus.reconnects == 1
    assert inbox.bodies == [b"waits"]
    assert not clock.getDelayedCalls()


# --- real only ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_publish_while_rabbitmq_unreachable_fails_within_timeout(bus_factory):
    """A gateway would hang, or drop client frames silently, while RabbitMQ is down."""
    started = time.monotonic()
    bus = await bus_factory(url="amqp://guest:guest@127.0.0.1:1/%2F", publish_timeout=0.5)
    assert time.monotonic() - started < 0.5 + 0.5  # start does not wait for ever either
    assert not bus.connected
    started = time.monotonic()
    results = await defer.DeferredList([bus.publish(bus.server_key(), b"%d" % i) for i in range(3)],
                                       consumeErrors=True)
    elapsed = time.monotonic() - started
    for ok, failure in results:
        assert not ok and failure.check(Unavailable), failure
        assert "did not confirm within 0.5s" in failure.getErrorMessage()
    assert 0.4 <= elapsed < 0.5 + 0.3
    # the backlog is bounded: past it, publishes fail at once
    bus.publish_backlog = 2
    waiting = [bus.publish(bus.server_key(), b"w%d" % i) for i in range(2)]
    with pytest.raises(Unavailable, match="already waiting"):
        await bus.publish(bus.server_key(), b"no room")
    started = time.monotonic()
    await bus.stopService()
    assert time.monotonic() - started < 0.5 + 0.3
    for d in waiting:  # stopping fails what waited, at once
        with pytest.raises(Unavailable):
            await d


@pytest_twisted.ensureDeferred
async def test_publish_during_reconnect_waits_instead_of_failing(bus_factory):
    """A client frame sent while the broker connection is being re-established would be lost."""
    bus = await bus_factory()
    inbox = Inbox(auto_ack=True)
    await bus.consume(bus.processor_queue(), inbox)
    closing = defer.ensureDeferred(close_connection(bus.connection_name))
    sent = []
    deadline = time.monotonic() + 5
    # a steady stream across the disconnect and the reconnect
    while not (closing.called and bus.reconnects and bus.connected) or len(sent) < 20:
        assert time.monotonic() < deadline, "no reconnect"
        sent.append(bus.publish(bus.server_key(), b"%d" % len(sent)))
        await sleep(0.005)
    await defer.gatherResults(sent)
    await inbox.wait(len(sent))
    # at-least-once: a publish unconfirmed when the connection died is sent again
    assert set(inbox.bodies) == {b"%d" % i for i in range(len(sent))}
    assert bus.reconnects == 1


@pytest_twisted.ensureDeferred
async def test_connection_is_named_for_operators(bus_factory):
    """Operators could not tell imcluster's connections apart in rabbitmqctl."""
    bus = await bus_factory(connection_name=unique("imcluster-test-named-"))
    assert len(await connection_pids(bus.connection_name)) == 1
    await bus.stopService()
    assert await connection_pids(bus.connection_name) == []


@pytest_twisted.ensureDeferred
async def test_delete_topology_removes_the_namespace(bus_factory, namespace):
    """Test runs (or a decommissioned cluster) would leave exchanges and queues behind in RabbitMQ."""
    bus = await bus_factory()
    await bus.consume(bus.processor_queue(), Inbox())
    await bus.delete_topology()
    queues = await rabbitmqctl("list_queues", "name")
    exchanges = await rabbitmqctl("list_exchanges", "name")
    assert namespace + "." not in queues
    assert namespace + "." not in exchanges


@pytest_twisted.ensureDeferred
async def test_publishes_resume_only_once_the_consumers_queues_are_back(bus_factory):
    """A sync requested across a broker hiccup would be answered into the gap before the gateway's
    queue exists again, come back unroutable, and the client would never get sync_done."""
    bus = await bus_factory()
    uuid = unique("gw")
    deliveries = Inbox(auto_ack=True)
    await bus.consume(bus.gateway_queue(uuid), deliveries, prefetch=10, exclusive=True)
    [consumer] = bus.consumers
    closing = defer.ensureDeferred(close_connection(bus.connection_name))
    await until(lambda: not bus.connected, 5.0, "disconnect")
    active_at_confirm = []
    # waits for the reconnect; when the broker confirms it, a processor may already answer it
    sent = bus.publish(bus.server_key(), b"sync please")
    sent.addCallback(lambda _: active_at_confirm.append(consumer.active))
    await sent
    assert await closing == 1
    assert active_at_confirm == [True]
    await bus.publish(bus.gateway_key(uuid), b"sync page", mandatory=True)
    assert (await deliveries.wait(1))[0].body == b"sync page"


@pytest_twisted.ensureDeferred
async def test_declared_queues_take_publishes_and_one_exclusive_consumer(kind, bus, make_peer):
    """Webhook events or push requests published before any consumer were dropped; two processors consumed webhooks at once."""
    names = bus.names
    for q in (names.webhooks_queue(), names.push_queue()):
        assert (q.name, q.routing_key, q.durable, q.exclusive, q.auto_delete, q.arguments) == (
            f"{bus.namespace}.{q.name.split('.')[-1]}", q.name, True, False, False, {})
        await bus.declare_queue(q)
        await bus.publish(q.routing_key, b"[]", mandatory=True)  # a queue takes it
    await break_connection(kind, bus)  # declared again on the new connection
    await bus.publish(names.push_queue().routing_key, b"[]", mandatory=True)
    first = Inbox(auto_ack=True)
    await bus.consume(names.webhooks_queue(), first, prefetch=10, exclusive=True)
    peer = await make_peer()
    with pytest.raises(Exception) as refused:
        await peer.consume(names.webhooks_queue(), Inbox(), prefetch=10, exclusive=True)
    assert "403" in str(refused.value) or "ACCESS_REFUSED" in str(refused.value)
    assert len(await first.wait(1)) == 1

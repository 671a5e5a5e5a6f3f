"""FakeBus: an in-memory broker behind the IMessageBus contract (tests/test_contract_bus.py)."""

from __future__ import annotations

import collections
import re as _bus_re

from twisted.application import service as _bus_service
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import Logger
from zope.interface import implementer

from imcluster.bus import BusMessage, BusNames, ChannelError, Nacked, QueueSpec  # noqa: F401 (re-exported)
from imcluster.bus import TooLarge as _BusTooLarge
from imcluster.bus import Unavailable as _BusUnavailable
from imcluster.bus import Unroutable as _BusUnroutable
from imcluster.interfaces import IMessageBus as _IMessageBus


class _BrokerError:
    """The reason a fake channel closes, shaped like pika's ChannelClosedByBroker."""

    channel_error = True

    def __init__(self, code, text):
        self.reply_code, self.reply_text = code, text

    def __str__(self):
        return f"({self.reply_code}, {self.reply_text!r})"


class _FakeQueue:
    def __init__(self, spec, owner):
        self.spec = spec
        self.owner = owner  # the FakeBus of an exclusive queue
        self.messages = collections.deque()  # (body, headers, routing_key, redelivered)
        self.consumers = []
        self.rr = 0


def _topic_regex(pattern):
    # exact words, "*" (one word) and "#" (one or more words: enough for imcluster's keys)
    words = [{"*": r"[^.]+", "#": r".+"}.get(w, _bus_re.escape(w)) for w in pattern.split(".")]
    return _bus_re.compile(r"\.".join(words) + "$")


class FakeBroker:
    """An in-memory RabbitMQ shared by :class:`FakeBus` instances (like processes sharing a broker).

    Exchanges are topic (``*``/``#`` patterns) or fanout; queues hold
    messages until a consumer with room in its prefetch window takes them.
    ``deliveries_per_turn`` bounds one dispatch run (a consumer that nacks
    every message for ever must not hang a test); the rest continue on the
    clock's next turn.
    """

    deliveries_per_turn = 10000

    def __init__(self, clock=None):
        self.clock = clock if clock is not None else Clock()
        self.exchanges = {}  # name -> "topic" | "fanout"
        self.queues = {}  # name -> _FakeQueue
        self.bindings = []  # (exchange, pattern, regex, queue name)
        self._dispatching = False
        self._again = False
        self._later = None

    # -- declarations
    def declare_exchange(self, name, kind):
        if self.exchanges.setdefault(name, kind) != kind:
            raise ChannelError(_BrokerError(406, f"PRECONDITION_FAILED - exchange {name} is {self.exchanges[name]}"))

    def declare_queue(self, spec, owner, exchange):
        q = self.queues.get(spec.name)
        if q is None:
            q = self.queues[spec.name] = _FakeQueue(spec, owner if spec.exclusive else None)
        else:
            old = q.spec
            if q.owner is not None and q.owner is not owner:
                raise ChannelError(_BrokerError(405, f"RESOURCE_LOCKED - queue {spec.name} is exclusive to another connection"))
            if (old.durable, old.exclusive, old.auto_delete, dict(old.arguments)) != (
                    spec.durable, spec.exclusive, spec.auto_delete, dict(spec.arguments)):
                raise ChannelError(_BrokerError(406, f"PRECONDITION_FAILED - queue {spec.name} declared with other arguments"))
        if spec.routing_key is not None:
            ex = spec.exchange or exchange
            if ex not in self.exchanges:
                raise ChannelError(_BrokerError(404, f"NOT_FOUND - no exchange {ex}"))
            if not any(b[0] == ex and b[1] == spec.routing_key and b[3] == spec.name for b in self.bindings):
                self.bindings.append((ex, spec.routing_key, _topic_regex(spec.routing_key), spec.name))
        return q

    def delete_queue(self, name):
        q = self.queues.pop(name, None)
        self.bindings = [b for b in self.bindings if b[3] != name]
        if q is not None:
            for c in list(q.consumers):
                c._cancelled_by_broker()

    def delete_exchange(self, name):
        self.exchanges.pop(name, None)
        self.bindings = [b for b in self.bindings if b[0] != name]

    # -- routing
    def route(self, exchange, routing_key):
        """Names of the queues ``routing_key`` reaches through ``exchange``."""
        kind = self.exchanges.get(exchange)
        if kind is None:
            return None
        out = []
        for ex, _pattern, regex, qname in self.bindings:
            if ex == exchange and (kind == "fanout" or regex.match(routing_key)) and qname not in out:
                out.append(qname)
        return out

    def enqueue(self, qname, body, headers, routing_key, redelivered=False, front=False):
        q = self.queues.get(qname)
        if q is None:
            return
        item = (body, headers, routing_key, redelivered)
        if front:
            q.messages.appendleft(item)
        else:
            q.messages.append(item)

    def dead_letter(self, q, item, reason):
        dlx = q.spec.arguments.get("x-dead-letter-exchange")
        if not dlx:
            return
        body, headers, routing_key, _ = item
        headers = dict(headers or {})
        deaths = list(headers.get("x-death") or [])
        deaths.insert(0, {"reason": reason, "queue": q.spec.name, "count": 1,
                          "exchange": "", "routing-keys": [routing_key]})
        headers["x-death"] = deaths
        for qname in self.route(dlx, routing_key) or ():
            self.enqueue(qname, body, headers, routing_key)

    # -- delivery
    def dispatch(self):
        """Deliver what consumers have room for; re-entrant calls run in the outer loop."""
        if self._dispatching:
            self._again = True
            return
        self._dispatching = True
        budget = self.deliveries_per_turn
        try:
            self._again = True
            while self._again and budget > 0:
                self._again = False
                for q in list(self.queues.values()):
                    while q.messages and budget > 0:
                        c = self._next_consumer(q)
                        if c is None:
                            break
                        item = q.messages.popleft()
                        budget -= 1
                        c._deliver(q, item)
                        self._again = True
        finally:
            self._dispatching = False
        if budget <= 0 and (self._later is None or not self._later.active()):
            self._later = self.clock.callLater(0, self.dispatch)

    @staticmethod
    def _next_consumer(q):
        n = len(q.consumers)
        for i in range(n):
            c = q.consumers[(q.rr + i) % n]
            if c.has_room():
                q.rr = (q.rr + i + 1) % n
                return c
        return None


class _FakeConsumer:
    """A consumer of a :class:`FakeBus`: same surface as :class:`imcluster.bus.Consumer`."""

    def __init__(self, bus, spec, callback, prefetch, exclusive):
        self.bus = bus
        self.queue = spec
        self.callback = callback
        self.prefetch = prefetch
        self.exclusive = exclusive
        self.active = False
        self.cancelled = False
        self.ready = defer.Deferred()
        self.unacked = {}  # delivery tag -> (queue, item)
        self._channel = None  # a fresh object per "channel": messages of an old one are stale
        self._tags = 0
        self._restart_listeners = []
        self.starts = 0
        self.inactive_since = None

    def add_restart_listener(self, fn):
        """Call ``fn(down_since)`` each time the consumer is active again after a reconnect (as Consumer does)."""
        self._restart_listeners.append(fn)

    def __repr__(self):
        return f"<FakeConsumer {self.queue.name} active={self.active}>"

    def has_room(self):
        return self.active and len(self.unacked) < self.prefetch

    def start(self):
        broker, bus = self.bus.broker, self.bus
        try:
            if bus.exchange not in broker.exchanges:
                bus._declare_topology()
            q = broker.declare_queue(self.queue, bus, bus.exchange)
            if self.exclusive and q.consumers:
                raise ChannelError(_BrokerError(403, f"ACCESS_REFUSED - queue {self.queue.name} has consumers"))
            if any(c.exclusive for c in q.consumers):
                raise ChannelError(_BrokerError(403, f"ACCESS_REFUSED - queue {self.queue.name} has an exclusive consumer"))
        except ChannelError as e:
            if not self.ready.called:
                bus._consumers.pop(self, None)
                self.cancelled = True
                self.ready.errback(e)
            return
        self._channel = object()
        self._tags = 0
        q.consumers.append(self)
        self.active = True
        if not self.ready.called:
            self.ready.callback(self)
        self.starts += 1
        down_since, self.inactive_since = self.inactive_since, None
        if self.starts > 1:
            for fn in list(self._restart_listeners):
                defer.maybeDeferred(fn, down_since).addErrback(
                    lambda f: self.bus.log.failure("restart listener failed", f))
        broker.dispatch()

    def stop_channel(self, requeue=True):
        """The channel closes: unacknowledged messages go back (redelivered) to their queue."""
        if self.inactive_since is None:
            self.inactive_since = self.bus.clock.seconds()
        self.active = False
        self._channel = None
        broker = self.bus.broker
        left = []
        for q in list(broker.queues.values()):
            if self in q.consumers:
                q.consumers.remove(self)
                left.append(q)
        pending, self.unacked = self.unacked, {}
        if requeue:
            for q, item in reversed(list(pending.values())):
                if broker.queues.get(q.spec.name) is q:
                    body, headers, rk, _ = item
                    q.messages.appendleft((body, headers, rk, True))
        for q in left:
            # RabbitMQ deletes an auto-delete queue when its last consumer goes
            if q.spec.auto_delete and not q.consumers and broker.queues.get(q.spec.name) is q:
                broker.delete_queue(q.spec.name)

    def _deliver(self, q, item):
        body, headers, routing_key, redelivered = item
        self._tags += 1
        tag = self._tags
        self.unacked[tag] = (q, item)
        msg = BusMessage(body, redelivered, dict(headers or {}), routing_key, tag, self, self._channel)
        try:
            self.callback(msg)
        except Exception:
            self.bus.log.failure("FakeBus consumer callback of {queue} failed; rejecting the message",
                                 queue=self.queue.name)
            if not msg.settled:
                msg.nack(requeue=False)

    def settle(self, msg, ack, requeue):
        if msg._channel is None or msg._channel is not self._channel:
            return False  # stale: that "channel" died and the message was requeued
        entry = self.unacked.pop(msg.delivery_tag, None)
        if entry is None:
            return False
        q, item = entry
        broker = self.bus.broker
        if not ack:
            if requeue:
                body, headers, rk, _ = item
                q.messages.appendleft((body, headers, rk, True))
            else:
                broker.dead_letter(q, item, "rejected")
        broker.dispatch()
        return True

    def _cancelled_by_broker(self):
        # the queue was deleted: like AMQPService, declare it again and go on
        self.stop_channel(requeue=False)
        if not self.cancelled and self.bus.connected:
            self.start()

    def cancel(self):
        self.cancelled = True
        self.bus._consumers.pop(self, None)
        if not self.ready.called:
            self.ready.errback(defer.CancelledError(f"consumer of {self.queue.name} cancelled"))
            self.ready.addErrback(lambda f: None)
        self.stop_channel()
        self.bus.broker.dispatch()
        return defer.succeed(None)


@implementer(_IMessageBus)
class FakeBus(_bus_service.Service):
    """IMessageBus in memory, with AMQPService's semantics.

    Publishes are confirmed at once (the Deferred has fired when
    ``publish`` returns) and delivered synchronously to consumers with room
    in their prefetch window; ``mandatory`` with no bound queue fails with
    ``Unroutable``; ``nack(requeue=True)`` redelivers with
    ``redelivered=True``; ``nack(requeue=False)`` on the processor queue
    dead-letters to ``<ns>.dead`` (with an ``x-death`` header).

    ``set_available(False)`` simulates losing the broker: publishes wait and
    fail with ``Unavailable`` after ``publish_timeout`` on ``clock``;
    consumers lose their unacknowledged messages back to the queues and
    the connection's exclusive queues vanish. ``set_available(True)``
    reconnects (``reconnects`` + 1), declares everything again and sends
    what waited. ``published`` lists every confirmed publish as
    ``(routing_key, body, mandatory, headers)``. Several FakeBus may share
    one :class:`FakeBroker`.
    """

    log = Logger()

    def __init__(self, namespace="im", publish_timeout=5.0, clock=None, name="amqp",
                 broker=None, publish_backlog=10000, max_publish_bytes=8 * 1024 * 1024,
                 queue_type="classic"):
        self.broker = broker if broker is not None else FakeBroker(clock)
        self.clock = clock if clock is not None else self.broker.clock
        self.namespace = namespace
        self.names = BusNames(namespace, queue_type)
        self.exchange = self.names.exchange
        self.publish_timeout = publish_timeout
        self.publish_backlog = publish_backlog
        self.max_publish_bytes = max_publish_bytes
        self.setName(name)
        self.available = True
        self.reconnects = 0
        self.published = []
        self._ever_connected = False
        self._connected = False
        self._consumers = {}
        self._waiting = collections.deque()  # (deferred, args, timer)
        self._waiters = []
        self.extra_queues = []

    # -- names
    def server_key(self):
        return self.names.server_key()

    def gateway_key(self, uuid):
        return self.names.gateway_key(uuid)

    def processor_queue(self):
        return self.names.processor_queue()

    def gateway_queue(self, uuid):
        return self.names.gateway_queue(uuid)

    def dead_queue(self):
        return self.names.dead_queue()

    @property
    def connected(self):
        return self._connected

    @property
    def consumers(self):
        return list(self._consumers)

    def wait_connected(self):
        if self._connected:
            return defer.succeed(None)
        d = defer.Deferred(lambda d: d in self._waiters and self._waiters.remove(d))
        self._waiters.append(d)
        return d

    # -- lifecycle
    def startService(self):  # noqa: N802
        super().startService()
        if self.available:
            self._connect()
        return defer.succeed(None)

    def stopService(self):  # noqa: N802
        super().stopService()
        for c in list(self._consumers):
            c.cancel()
        self._fail_waiting("the AMQP service stopped")
        self._disconnect()
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            w.errback(defer.CancelledError("AMQP service stopped"))
        return defer.succeed(None)

    def set_available(self, available):
        """False: the broker is gone for this bus (see the class docstring); True: reconnect."""
        self.available = available
        if not available:
            self._disconnect()
        elif self.running and not self._connected:
            self._connect()

    def simulate_reconnect(self):
        """Lose the connection and get it back at once (consumers restart, unacked messages are redelivered)."""
        self.set_available(False)
        self.set_available(True)

    def _declare_topology(self):
        b, n = self.broker, self.names
        b.declare_exchange(n.exchange, "topic")
        b.declare_exchange(n.dlx, "fanout")
        b.declare_queue(n.dead_queue(), self, n.exchange)
        b.declare_queue(n.processor_queue(), self, n.exchange)
        for q in self.extra_queues:
            b.declare_queue(q, self, n.exchange)

    def declare_queue(self, queue):
        """AMQPService.declare_queue: now if connected, and on every reconnect."""
        if all(q.name != queue.name for q in self.extra_queues):
            self.extra_queues.append(queue)
        if self._connected:
            self.broker.declare_queue(queue, self, self.names.exchange)
        return defer.succeed(None)

    def _connect(self):
        self._declare_topology()
        self._connected = True
        if self._ever_connected:
            self.reconnects += 1
        self._ever_connected = True
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            w.callback(None)
        for c in list(self._consumers):
            c.start()
        waiting, self._waiting = self._waiting, collections.deque()
        for d, args, timer in waiting:
            if timer.active():
                timer.cancel()
            self._publish_now(*args).chainDeferred(d)

    def _disconnect(self):
        if not self._connected:
            return
        self._connected = False
        for c in list(self._consumers):
            c.stop_channel()
        b = self.broker
        for name, q in list(b.queues.items()):
            if q.owner is self:
                b.delete_queue(name)
        b.dispatch()

    def _fail_waiting(self, reason):
        waiting, self._waiting = self._waiting, collections.deque()
        for d, _args, timer in waiting:
            if timer.active():
                timer.cancel()
            d.errback(_BusUnavailable(f"RabbitMQ did not confirm: {reason}"))

    # -- publishing
    def publish(self, routing_key, body, mandatory=False, persistent=True, headers=None, exchange=None):
        if not isinstance(body, (bytes, bytearray)):
            return defer.fail(TypeError(f"AMQP body must be bytes, not {type(body).__name__}"))
        if len(body) > self.max_publish_bytes:
            return defer.fail(_BusTooLarge(f"a message of {len(body)} bytes to {routing_key!r} is above "
                                           f"max_publish_bytes ({self.max_publish_bytes})"))
        if not self.running:
            return defer.fail(_BusUnavailable("RabbitMQ did not confirm: the AMQP service is not running"))
        args = (routing_key, bytes(body), mandatory, headers, exchange)
        if self._connected:
            return self._publish_now(*args)
        if len(self._waiting) >= self.publish_backlog:
            return defer.fail(_BusUnavailable(
                f"RabbitMQ unreachable and {len(self._waiting)} publishes already waiting"))
        d = defer.Deferred()
        entry = [d, args, None]

        def expire():
            try:
                self._waiting.remove(tuple(entry))
            except ValueError:
                return
            d.errback(_BusUnavailable(
                f"RabbitMQ did not confirm within {self.publish_timeout:g}s: not connected (FakeBus unavailable)"))

        entry[2] = self.clock.callLater(self.publish_timeout, expire)
        self._waiting.append(tuple(entry))
        return d

    def dead_letter(self, body, reason):
        """AMQPService.dead_letter: ``body`` into ``<ns>.dead`` with header ``x-imcluster-reason``."""
        return self.publish("", bytes(body)[:self.max_publish_bytes],
                            headers={"x-imcluster-reason": reason[:1000]}, exchange=self.names.dlx)

    def _publish_now(self, routing_key, body, mandatory, headers, exchange=None):
        b = self.broker
        exchange = exchange or self.exchange
        queues = b.route(exchange, routing_key)
        if queues is None:
            # AMQPService: the 404 closes the publishing channel; the new one declares the topology again
            self._declare_topology()
            queues = b.route(exchange, routing_key)
        if not queues and mandatory:
            return defer.fail(_BusUnroutable(f"no queue is bound to {routing_key!r} on {self.exchange}"))
        for qname in queues:
            q = b.queues[qname]
            args = q.spec.arguments
            if (args.get("x-overflow") == "reject-publish" and "x-max-length" in args
                    and len(q.messages) >= int(args["x-max-length"])):
                return defer.fail(Nacked(f"RabbitMQ refused the message to {routing_key!r} (basic.nack)"))
        for qname in queues:
            b.enqueue(qname, body, dict(headers or {}), routing_key)
        self.published.append((routing_key, body, mandatory, headers))
        b.dispatch()
        return defer.succeed(None)

    # -- consuming
    def consume(self, queue, callback, prefetch=100, exclusive=False):
        if not self.running:
            return defer.fail(RuntimeError("AMQP service is not running"))
        c = _FakeConsumer(self, queue, callback, prefetch, exclusive)
        self._consumers[c] = None
        if self._connected:
            c.start()
        return c.ready

    def delete_topology(self, queues=()):
        """Delete this namespace's exchanges and queues (consumers are cancelled first)."""
        for c in list(self._consumers):
            c.cancel()
        n, b = self.names, self.broker
        for q in [n.processor_queue().name, n.dead, *queues]:
            b.delete_queue(q)
        b.delete_exchange(n.exchange)
        b.delete_exchange(n.dlx)
        return defer.succeed(None)

    # -- test helpers
    def queue_depth(self, name):
        """Ready (not delivered) messages in queue ``name`` (None if it does not exist)."""
        q = self.broker.queues.get(name)
        return None if q is None else len(q.messages)

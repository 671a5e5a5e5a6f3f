"""Test doubles of imcluster's roles, part of the public package (like treq.testing).

Each fake implements the same interface as the real service and is run
through the same contract tests (``tests/test_contract_*.py``).
Sections are owned by their subsystem; keep each fake next to its kin.
"""

from __future__ import annotations

# --- bus (FakeBus) -------------------------------------------------------

import collections as _bus_collections  # noqa: E402
import re as _bus_re  # noqa: E402

from twisted.application import service as _bus_service  # noqa: E402
from twisted.internet import defer as _bus_defer  # noqa: E402
from twisted.internet.task import Clock as _BusClock  # noqa: E402
from twisted.logger import Logger as _BusLogger  # noqa: E402
from zope.interface import implementer as _bus_implementer  # noqa: E402

from imcluster.bus import BusMessage, BusNames, ChannelError, Nacked, QueueSpec  # noqa: E402,F401
from imcluster.bus import Unavailable as _BusUnavailable  # noqa: E402
from imcluster.bus import Unroutable as _BusUnroutable  # noqa: E402
from imcluster.interfaces import IMessageBus as _IMessageBus  # noqa: E402


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
        self.messages = _bus_collections.deque()  # (body, headers, routing_key, redelivered)
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
        self.clock = clock if clock is not None else _BusClock()
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
        self.ready = _bus_defer.Deferred()
        self.unacked = {}  # delivery tag -> (queue, item)
        self._channel = None  # a fresh object per "channel": messages of an old one are stale
        self._tags = 0

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
        broker.dispatch()

    def stop_channel(self, requeue=True):
        """The channel closes: unacknowledged messages go back (redelivered) to their queue."""
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
            self.ready.errback(_bus_defer.CancelledError(f"consumer of {self.queue.name} cancelled"))
            self.ready.addErrback(lambda f: None)
        self.stop_channel()
        self.bus.broker.dispatch()
        return _bus_defer.succeed(None)


@_bus_implementer(_IMessageBus)
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

    log = _BusLogger()

    def __init__(self, namespace="im", publish_timeout=5.0, clock=None, name="amqp",
                 broker=None, publish_backlog=10000):
        self.broker = broker if broker is not None else FakeBroker(clock)
        self.clock = clock if clock is not None else self.broker.clock
        self.namespace = namespace
        self.names = BusNames(namespace)
        self.exchange = self.names.exchange
        self.publish_timeout = publish_timeout
        self.publish_backlog = publish_backlog
        self.setName(name)
        self.available = True
        self.reconnects = 0
        self.published = []
        self._ever_connected = False
        self._connected = False
        self._consumers = {}
        self._waiting = _bus_collections.deque()  # (deferred, args, timer)
        self._waiters = []

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
            return _bus_defer.succeed(None)
        d = _bus_defer.Deferred(lambda d: d in self._waiters and self._waiters.remove(d))
        self._waiters.append(d)
        return d

    # -- lifecycle
    def startService(self):  # noqa: N802
        super().startService()
        if self.available:
            self._connect()
        return _bus_defer.succeed(None)

    def stopService(self):  # noqa: N802
        super().stopService()
        for c in list(self._consumers):
            c.cancel()
        self._fail_waiting("the AMQP service stopped")
        self._disconnect()
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            w.errback(_bus_defer.CancelledError("AMQP service stopped"))
        return _bus_defer.succeed(None)

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
        waiting, self._waiting = self._waiting, _bus_collections.deque()
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
        waiting, self._waiting = self._waiting, _bus_collections.deque()
        for d, _args, timer in waiting:
            if timer.active():
                timer.cancel()
            d.errback(_BusUnavailable(f"RabbitMQ did not confirm: {reason}"))

    # -- publishing
    def publish(self, routing_key, body, mandatory=False, persistent=True, headers=None):
        if not isinstance(body, (bytes, bytearray)):
            return _bus_defer.fail(TypeError(f"AMQP body must be bytes, not {type(body).__name__}"))
        if not self.running:
            return _bus_defer.fail(_BusUnavailable("RabbitMQ did not confirm: the AMQP service is not running"))
        args = (routing_key, bytes(body), mandatory, headers)
        if self._connected:
            return self._publish_now(*args)
        if len(self._waiting) >= self.publish_backlog:
            return _bus_defer.fail(_BusUnavailable(
                f"RabbitMQ unreachable and {len(self._waiting)} publishes already waiting"))
        d = _bus_defer.Deferred()
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

    def _publish_now(self, routing_key, body, mandatory, headers):
        b = self.broker
        queues = b.route(self.exchange, routing_key)
        if queues is None:
            # AMQPService: the 404 closes the publishing channel; the new one declares the topology again
            self._declare_topology()
            queues = b.route(self.exchange, routing_key)
        if not queues and mandatory:
            return _bus_defer.fail(_BusUnroutable(f"no queue is bound to {routing_key!r} on {self.exchange}"))
        for qname in queues:
            q = b.queues[qname]
            args = q.spec.arguments
            if (args.get("x-overflow") == "reject-publish" and "x-max-length" in args
                    and len(q.messages) >= int(args["x-max-length"])):
                return _bus_defer.fail(Nacked(f"RabbitMQ refused the message to {routing_key!r} (basic.nack)"))
        for qname in queues:
            b.enqueue(qname, body, dict(headers or {}), routing_key)
        self.published.append((routing_key, body, mandatory, headers))
        b.dispatch()
        return _bus_defer.succeed(None)

    # -- consuming
    def consume(self, queue, callback, prefetch=100, exclusive=False):
        if not self.running:
            return _bus_defer.fail(RuntimeError("AMQP service is not running"))
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
        return _bus_defer.succeed(None)

    # -- test helpers
    def queue_depth(self, name):
        """Ready (not delivered) messages in queue ``name`` (None if it does not exist)."""
        q = self.broker.queues.get(name)
        return None if q is None else len(q.messages)

# --- registry (FakeRegistry) ---------------------------------------------

from twisted.application import service as _reg_service  # noqa: E402
from twisted.internet import defer as _reg_defer  # noqa: E402
from twisted.internet.task import Clock as _RegClock  # noqa: E402
from zope.interface import implementer as _reg_implementer  # noqa: E402

from imcluster.interfaces import IRegistry as _IRegistry  # noqa: E402
from imcluster.registry import RedisKeys as _RedisKeys  # noqa: E402
from imcluster.registry import ResponseError as _RedisResponseError  # noqa: E402
from imcluster.registry import dumps as _redis_dumps  # noqa: E402


class FakeRedisStore:
    """A dict that behaves like the part of Redis imcluster uses.

    Strings, sets and hashes with TTLs on ``clock`` (expired keys vanish as
    in Redis). :meth:`execute` takes raw commands (``PING GET SET(PX/EX/NX/XX)
    DEL EXISTS PTTL TTL EXPIRE PEXPIRE MGET INCR INCRBY SADD SREM SMEMBERS
    SISMEMBER SCARD SPOP HSET HGET HDEL HGETALL HLEN HEXISTS``) and gives
    txredisapi's reply shapes. Several :class:`FakeRegistry` may share one
    store, like processes sharing one Redis.
    """

    def __init__(self, clock=None):
        self.clock = clock if clock is not None else _RegClock()
        self.data: dict = {}
        self.expires: dict = {}

    # -- helpers
    def _alive(self, key):
        deadline = self.expires.get(key)
        if deadline is not None and self.clock.seconds() >= deadline:
            self.data.pop(key, None)
            self.expires.pop(key, None)
        return key in self.data

    def _get(self, key, kind):
        if not self._alive(key):
            return None
        value = self.data[key]
        if not isinstance(value, kind):
            raise _RedisResponseError("WRONGTYPE Operation against a key holding the wrong kind of value")
        return value

    def _delete(self, key):
        self.expires.pop(key, None)
        return self.data.pop(key, None) is not None

    def _drop_if_empty(self, key):
        # Redis removes empty sets and hashes
        if key in self.data and not self.data[key]:
            self._delete(key)

    def keys(self, prefix=""):
        """Live keys starting with ``prefix`` (a test helper, not a command)."""
        return sorted(k for k in list(self.data) if k.startswith(prefix) and self._alive(k))

    def flush(self, prefix=""):
        """Delete every key starting with ``prefix``: Redis losing (our part of) its data."""
        for k in self.keys(prefix):
            self._delete(k)

    def execute(self, command, *args):
        """Run one raw command synchronously; returns the reply or raises ResponseError."""
        args = [_redis_str(a) for a in args]
        fn = getattr(self, "_cmd_" + str(command).lower(), None)
        if fn is None:
            raise _RedisResponseError(f"unknown command '{command}' (FakeRedisStore)")
        try:
            return fn(*args)
        except TypeError as e:
            raise _RedisResponseError(f"wrong number of arguments for '{command}': {e}") from None

    # -- commands
    def _cmd_ping(self, *a):
        return a[0] if a else "PONG"

    def _cmd_get(self, key):
        return self._get(key, str)

    def _cmd_set(self, key, value, *opts):
        opts = [o.upper() for o in opts]
        ttl = None
        i = 0
        nx = xx = False
        while i < len(opts):
            o = opts[i]
            if o in ("PX", "EX"):
                n = int(opts[i + 1])
                ttl = n / 1000.0 if o == "PX" else float(n)
                i += 2
                continue
            nx, xx = nx or o == "NX", xx or o == "XX"
            i += 1
        exists = self._alive(key)
        if (nx and exists) or (xx and not exists):
            return None
        self.data[key] = value
        self.expires.pop(key, None)
        if ttl is not None:
            self.expires[key] = self.clock.seconds() + ttl
        return "OK"

    def _cmd_del(self, *keys):
        return sum(1 for k in keys if self._alive(k) and self._delete(k))

    def _cmd_exists(self, *keys):
        return sum(1 for k in keys if self._alive(k))

    def _cmd_pttl(self, key):
        if not self._alive(key):
            return -2
        if key not in self.expires:
            return -1
        return int(round((self.expires[key] - self.clock.seconds()) * 1000))

    def _cmd_ttl(self, key):
        ms = self._cmd_pttl(key)
        return ms if ms < 0 else int(round(ms / 1000.0))

    def _cmd_pexpire(self, key, ms):
        if not self._alive(key):
            return 0
        self.expires[key] = self.clock.seconds() + int(ms) / 1000.0
        return 1

    def _cmd_expire(self, key, seconds):
        return self._cmd_pexpire(key, int(seconds) * 1000)

    def _cmd_mget(self, *keys):
        return [self.data[k] if self._alive(k) and isinstance(self.data[k], str) else None for k in keys]

    def _cmd_incrby(self, key, n):
        value = int(self._get(key, str) or 0) + int(n)
        self.data[key] = str(value)
        return value

    def _cmd_incr(self, key):
        return self._cmd_incrby(key, 1)

    def _cmd_sadd(self, key, *members):
        s = self._get(key, set)
        if s is None:
            s = self.data[key] = set()
        before = len(s)
        s.update(members)
        return len(s) - before

    def _cmd_srem(self, key, *members):
        s = self._get(key, set)
        if s is None:
            return 0
        n = sum(1 for m in members if m in s)
        s.difference_update(members)
        self._drop_if_empty(key)
        return n

    def _cmd_smembers(self, key):
        return sorted(self._get(key, set) or ())

    def _cmd_sismember(self, key, member):
        return int(member in (self._get(key, set) or ()))

    def _cmd_scard(self, key):
        return len(self._get(key, set) or ())

    def _cmd_spop(self, key, count=None):
        s = self._get(key, set)
        if count is None:
            if not s:
                return None
            m = s.pop()
            self._drop_if_empty(key)
            return m
        out = []
        while s and len(out) < int(count):
            out.append(s.pop())
        self._drop_if_empty(key)
        return out

    def _cmd_hset(self, key, *fv):
        if not fv or len(fv) % 2:
            raise TypeError("field/value pairs")
        h = self._get(key, dict)
        if h is None:
            h = self.data[key] = {}
        n = 0
        for f, v in zip(fv[::2], fv[1::2]):
            n += f not in h
            h[f] = v
        return n

    def _cmd_hget(self, key, field):
        return (self._get(key, dict) or {}).get(field)

    def _cmd_hdel(self, key, *fields):
        h = self._get(key, dict)
        if h is None:
            return 0
        n = sum(1 for f in fields if h.pop(f, None) is not None)
        self._drop_if_empty(key)
        return n

    def _cmd_hgetall(self, key):
        out = []
        for f, v in (self._get(key, dict) or {}).items():
            out += [f, v]
        return out

    def _cmd_hlen(self, key):
        return len(self._get(key, dict) or {})

    def _cmd_hexists(self, key, field):
        return int(field in (self._get(key, dict) or {}))


def _redis_str(value):
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, float):
        return format(value, "f")
    return str(value)


@_reg_implementer(_IRegistry)
class FakeRegistry(_reg_service.Service):
    """IRegistry on a :class:`FakeRedisStore`, with the same semantics as RedisService.

    ``clock`` drives TTLs (``clock.advance(ttl)`` expires a gateway).
    ``flush()`` simulates Redis losing our data; ``simulate_reconnect()``
    fires the reconnect listeners; ``set_available(False)`` makes every call
    fail with TimeoutError, as the real service does while Redis is down.
    ``round_trips`` counts what the real service would send to Redis (one per
    call, one per reap chunk), so callers can test their batching.
    Lua scripts (``run_script``) are not supported.
    """

    def __init__(self, prefix="", clock=None, store=None, batch=1000, name="redis"):
        self.store = store if store is not None else FakeRedisStore(clock)
        self.clock = self.store.clock
        self.keys = _RedisKeys(prefix)
        self.prefix = prefix
        self.batch = batch
        self.timeout = 5.0
        self.setName(name)
        self.available = True
        self.reconnects = 0
        self.round_trips = 0
        self._listeners = []

    @property
    def connected(self):
        return self.available

    def add_reconnect_listener(self, fn):
        self._listeners.append(fn)

    def set_available(self, available):
        """False: every call fails (TimeoutError) until set back to True."""
        self.available = available

    def simulate_reconnect(self, lose_data=False):
        """Fire the reconnect listeners (after ``flush()`` when ``lose_data``); fires when they are done."""
        if lose_data:
            self.flush()
        self.reconnects += 1
        return _reg_defer.gatherResults(
            [_reg_defer.maybeDeferred(fn) for fn in list(self._listeners)], consumeErrors=True)

    def flush(self):
        """Delete every key under this registry's prefix (Redis lost our data)."""
        self.store.flush(self.prefix)

    def _call(self, what, fn, *args):
        if not self.available:
            return _reg_defer.fail(TimeoutError(f"Redis {what} got no reply within {self.timeout:g}s (not connected)"))
        self.round_trips += 1
        return _reg_defer.maybeDeferred(fn, *args)

    # -- raw access
    def execute(self, command, *args):
        return self._call(str(command).upper(), self.store.execute, command, *args)

    def pipeline(self, commands):
        commands = [tuple(c) for c in commands]
        if not commands:
            return _reg_defer.succeed([])

        def run():
            replies, error = [], None
            for c in commands:
                try:
                    replies.append(self.store.execute(*c))
                except _RedisResponseError as e:
                    error = error or e
                    replies.append(e)
            if error is not None:
                raise error
            return replies

        return self._call(f"pipeline of {len(commands)}", run)

    def run_script(self, script, keys, args):
        return _reg_defer.fail(NotImplementedError("FakeRegistry does not run Lua scripts"))

    # -- IRegistry
    def register_server(self, uuid, info, ttl):
        k, x = self.keys, self.store.execute

        def run():
            x("SET", k.server(uuid), _redis_dumps(info), "PX", max(1, int(round(ttl * 1000))))
            x("SADD", k.servers(), uuid)

        return self._call("register_server", run)

    def refresh_server(self, uuid, info, ttl):
        k, x = self.keys, self.store.execute

        def run():
            ms = max(1, int(round(ttl * 1000)))
            existed = x("SET", k.server(uuid), _redis_dumps(info), "PX", ms, "XX") is not None
            if not existed:
                x("SET", k.server(uuid), _redis_dumps(info), "PX", ms)
            x("SADD", k.servers(), uuid)
            return existed

        return self._call("script refresh_server", run)

    def _remove_server(self, uuid, force):
        k, x = self.keys, self.store.execute
        if not force and x("EXISTS", k.server(uuid)):
            self.round_trips += 1
            return -1, 0, False
        removed = 0
        while True:
            self.round_trips += 1
            members = x("SPOP", k.wsconns(uuid), self.batch)
            for m in members:
                user_id, ip, port = _RedisKeys.parse_wsconns_member(m)
                x("HDEL", k.ucir(user_id), k.conn_field(uuid, ip, port))
            removed += len(members)
            if not x("EXISTS", k.wsconns(uuid)):
                break
        if force:
            x("DEL", k.server(uuid))
        return 0, removed, bool(x("SREM", k.servers(), uuid))

    def unregister_server(self, uuid):
        if not self.available:
            return self._call("script reap_server", None)
        return _reg_defer.maybeDeferred(self._remove_server, uuid, True).addCallback(lambda r: r[1])

    def reap_server(self, uuid):
        if not self.available:
            return self._call("script reap_server", None)
        d = _reg_defer.maybeDeferred(self._remove_server, uuid, False)
        return d.addCallback(lambda r: r[0] == 0 and r[2])

    def add_connections(self, uuid, entries):
        k, x = self.keys, self.store.execute
        entries = [(u, ip, port, meta) for u, ip, port, meta in entries]
        if not entries:
            return _reg_defer.succeed(None)

        try:
            rows = [(k.ucir(u), k.conn_field(uuid, ip, port), _redis_dumps(meta), k.wsconns_member(u, ip, port))
                    for u, ip, port, meta in entries]
        except (ValueError, TypeError) as e:
            return _reg_defer.fail(e)  # nothing written, like RedisService

        def run():
            for key, field, value, member in rows:
                x("HSET", key, field, value)
                x("SADD", k.wsconns(uuid), member)

        return self._call("add_connections", run)

    def remove_connections(self, uuid, entries):
        k, x = self.keys, self.store.execute
        entries = [(u, ip, port) for u, ip, port, *_ in entries]
        if not entries:
            return _reg_defer.succeed(None)

        try:
            rows = [(k.ucir(u), k.conn_field(uuid, ip, port), k.wsconns_member(u, ip, port))
                    for u, ip, port in entries]
        except (ValueError, TypeError) as e:
            return _reg_defer.fail(e)

        def run():
            for key, field, member in rows:
                x("HDEL", key, field)
                x("SREM", k.wsconns(uuid), member)

        return self._call("remove_connections", run)

    def connections_of(self, user_ids):
        import json

        users = list(dict.fromkeys(user_ids))
        if not users:
            return _reg_defer.succeed({})

        def run():
            out = {}
            for u in users:
                flat = self.store.execute("HGETALL", self.keys.ucir(u))
                out[u] = {}
                for i in range(0, len(flat), 2):
                    try:
                        out[u][flat[i]] = json.loads(flat[i + 1])
                    except ValueError:
                        out[u][flat[i]] = {}  # as RedisService: a connection without meta
            return out

        return self._call("connections_of", run)

    def servers(self):
        return self._call("SMEMBERS", lambda: set(self.store.execute("SMEMBERS", self.keys.servers())))

    def alive(self, uuids):
        uuids = list(dict.fromkeys(uuids))
        if not uuids:
            return _reg_defer.succeed(set())
        return self._call("MGET", lambda: {u for u in uuids if self.store.execute("EXISTS", self.keys.server(u))})


# --- authenticator -------------------------------------------------------

from twisted.internet.task import Clock as _AuthClock  # noqa: E402
from zope.interface import implementer as _auth_implementer  # noqa: E402

from imcluster.auth import INVALID_TOKEN as _AUTH_INVALID  # noqa: E402
from imcluster.auth import TOKEN_EXPIRED as _AUTH_EXPIRED  # noqa: E402
from imcluster.auth import AuthError as _AuthError  # noqa: E402
from imcluster.auth import Identity as _Identity  # noqa: E402
from imcluster.auth import valid_user_id as _valid_user_id  # noqa: E402
from imcluster.interfaces import IAuthenticator as _IAuthenticator  # noqa: E402


@_auth_implementer(_IAuthenticator)
class FakeAuthenticator:
    """IAuthenticator without cryptography: the token names the user.

    ``"user:<id>"``
        valid; ``exp`` is ``clock.seconds() + ttl``.
    ``"user:<id>:<exp>"``
        valid until ``<exp>`` (seconds since the epoch, on ``clock``):
        ``token_expired`` once ``clock.seconds() >= exp``.
    ``"expired:<id>"``
        ``token_expired``.
    anything else, or an ``<id>`` outside PROTOCOL.md's charset
        ``invalid_token``.

    ``clock`` (default: a fresh ``Clock`` at 0) lets tests move time;
    ``tokens`` lists every token seen, in order.
    """

    def __init__(self, clock=None, ttl=3600.0):
        self.clock = clock if clock is not None else _AuthClock()
        self.ttl = ttl
        self.tokens: list = []

    @staticmethod
    def token(user_id, exp=None):
        """The token string for ``user_id`` (with an explicit ``exp`` when given)."""
        return f"user:{user_id}" if exp is None else f"user:{user_id}:{exp:g}"

    def authenticate(self, token):
        self.tokens.append(token)
        if not isinstance(token, str):
            raise _AuthError(_AUTH_INVALID, "token must be a non-empty string")
        kind, _, rest = token.partition(":")
        now = self.clock.seconds()
        if kind == "expired" and _valid_user_id(rest):
            raise _AuthError(_AUTH_EXPIRED, "token has expired")
        if kind != "user":
            raise _AuthError(_AUTH_INVALID, "token is not valid")
        user_id, _, exp_text = rest.partition(":")
        if not _valid_user_id(user_id):
            raise _AuthError(_AUTH_INVALID, "token 'sub' is not a valid user id")
        if exp_text:
            try:
                exp = float(exp_text)
            except ValueError:
                raise _AuthError(_AUTH_INVALID, "token 'exp' must be a number") from None
            if now >= exp:
                raise _AuthError(_AUTH_EXPIRED, "token has expired")
        else:
            exp = now + self.ttl
        return _Identity(user_id, exp, {"sub": user_id, "exp": exp})


# --- store (FakeStore / processor) ---------------------------------------

from twisted.internet import defer as _st_defer  # noqa: E402
from zope.interface import implementer as _st_implementer  # noqa: E402

from imcluster.interfaces import IMessageStore as _IMessageStore  # noqa: E402
from imcluster.processor import store as _st  # noqa: E402


class StoreUnavailable(Exception):
    """What a :class:`FakeStore` fails with while ``available`` is False (PostgreSQL down)."""


@_st_implementer(_IMessageStore)
class FakeStore:
    """:class:`imcluster.processor.store.MessageStore` in memory, same contract.

    ``tests/test_store.py`` runs one suite over both. ``available = False``
    makes every call fail with :class:`StoreUnavailable` (a transient error);
    ``calls`` records ``(method, args)`` for assertions; ``now_ms`` is the time
    of messages stored without ``ts_ms``.
    """

    def __init__(self, max_group_size=1000, now_ms=1764160000000):
        self.max_group_size = max_group_size
        self.now_ms = now_ms
        self.available = True
        self.calls = []
        self.sessions = {}  # id -> {"kind", "last_seq", "members": {user: {"role", "read_seq"}}}
        self.messages = {}  # msg_id (int) -> {"session_id","seq","sender","client_msg_id","body","ts"}
        self.by_key = {}  # (sender, client_msg_id) -> msg_id
        self.sends = {}  # (user_id, msg_id) -> status
        self._next_id = 1

    def _call(self, name, fn, *args):
        self.calls.append((name, args))
        if not self.available:
            return _st_defer.fail(StoreUnavailable(f"{name}: PostgreSQL unavailable"))
        return _st_defer.maybeDeferred(fn, *args)

    @staticmethod
    def _copy(body):
        # what jsonb would give back: a fresh JSON value of the same meaning
        return _st.json.loads(_st.json.dumps(body))

    # -- messages
    def store_messages(self, batch, locate=None, locked=None):
        # locate is never called: every row stays pending (the caller marks what it routes)
        if locked is not None:
            locked()  # one dict, no locks: nothing can overtake
        return self._call("store_messages", self._store, list(batch))

    def _store(self, batch):
        results, first = [], {}  # first: key -> answer to its first valid copy in this batch
        for m in batch:
            results.append(self._store_one(m, first))
        return results

    def _store_one(self, m, first):
        if not _st.valid_client_msg_id(m.client_msg_id) or not _st.valid_user_id(m.sender):
            return _st.Rejected(str(m.client_msg_id), "bad_frame", "bad sender or clientMsgId")
        if _st._json(m.body) is None:
            return _st.Rejected(m.client_msg_id, "bad_frame", "body is not storable JSON")
        key = (m.sender, m.client_msg_id)
        if key in first and key not in self.by_key:
            return _st.copy_answer(first[key])
        answer = self._decide(m, key)
        first.setdefault(key, answer)
        return answer

    def _decide(self, m, key):
        if key in self.by_key:
            msg_id = self.by_key[key]
            row = self.messages[msg_id]
            pending = sorted((u for (u, i), status in self.sends.items() if i == msg_id and status != "delivered"),
                             key=str.encode)
            return _st.Stored(str(msg_id), row["session_id"], row["seq"], row["ts"], m.sender, m.client_msg_id,
                              self._copy(row["body"]), pending, duplicate=True)
        if not _st.valid_session_id(m.session_id):
            return _st.Rejected(m.client_msg_id, "no_session", "no such session")
        pair = _st.parse_p2p(m.session_id)
        if pair is not None:
            if not m.trusted and m.sender not in pair:
                return _st.Rejected(m.client_msg_id, "not_member", "not a member of this session")
            if m.session_id not in self.sessions:
                self.sessions[m.session_id] = {"kind": "p2p", "last_seq": 0, "members": {
                    u: {"role": "member", "read_seq": 0} for u in pair}}
        session = self.sessions.get(m.session_id)
        if session is None:
            return _st.Rejected(m.client_msg_id, "no_session", "no such session")
        members = sorted(session["members"], key=str.encode)
        if not m.trusted and m.sender not in session["members"]:
            return _st.Rejected(m.client_msg_id, "not_member", "not a member of this session")
        if len(members) > self.max_group_size:
            return _st.Rejected(m.client_msg_id, "too_large",
                                f"the session has more than {self.max_group_size} members")
        session["last_seq"] += 1
        msg_id, self._next_id = self._next_id, self._next_id + 1
        ts = m.ts_ms if m.ts_ms is not None else self.now_ms
        self.messages[msg_id] = {"session_id": m.session_id, "seq": session["last_seq"], "sender": m.sender,
                                 "client_msg_id": m.client_msg_id, "body": self._copy(m.body), "ts": ts}
        self.by_key[key] = msg_id
        recipients = [u for u in members if u != m.sender]
        for u in recipients:
            self.sends[(u, msg_id)] = "pending"
        return _st.Stored(str(msg_id), m.session_id, session["last_seq"], ts, m.sender, m.client_msg_id,
                          m.body, recipients)

    def mark_sending(self, pairs):
        return self._call("mark_sending", self._mark, list(pairs), "sending")

    def mark_delivered(self, acks):
        pairs = [(user, msg_id) for user, msg_ids in acks for msg_id in msg_ids]
        return self._call("mark_delivered", self._mark, pairs, "delivered")

    def _mark(self, pairs, status):
        users, ids = _st.MessageStore._pairs(pairs)
        changed = 0
        for key in zip(users, ids):
            current = self.sends.get(key)
            if current is None or current == "delivered" or (status == "sending" and current != "pending"):
                continue
            self.sends[key] = status
            changed += 1
        return changed

    def _frame(self, msg_id, with_session=True):
        row = self.messages[msg_id]
        frame = {"msgId": str(msg_id), "sessionId": row["session_id"], "seq": row["seq"], "from": row["sender"],
                 "clientMsgId": row["client_msg_id"], "body": self._copy(row["body"]), "ts": row["ts"]}
        if not with_session:
            del frame["sessionId"]
        return frame

    def undelivered_page(self, user_id, after, limit):
        def page():
            keys = sorted((self.messages[i]["session_id"].encode(), self.messages[i]["seq"], i)
                          for (u, i), status in self.sends.items() if u == user_id and status != "delivered")
            if after is not None:
                keys = [k for k in keys if (k[0], k[1]) > (after[0].encode(), after[1])]
            return [self._frame(i) for _, _, i in keys[:max(1, int(limit))]]
        return self._call("undelivered_page", page)

    # -- sessions
    def _member_of(self, user_id, session_id):
        session = self.sessions.get(session_id)
        if session is None:
            raise _st.StoreError("no_session", "no such session")
        if user_id not in session["members"]:
            raise _st.StoreError("not_member", "not a member of this session")
        return session

    def history(self, user_id, session_id, before_seq=None, limit=None):
        def page():
            if session_id not in self.sessions:
                pair = _st.parse_p2p(session_id) if isinstance(session_id, str) else None
                if pair is not None:  # an implicit 1:1 session: empty for its two users only
                    if user_id is None or user_id in pair:
                        return []
                    raise _st.StoreError("not_member", "not a member of this session")
            self._member_of(user_id, session_id)
            n = _st.HISTORY_DEFAULT_LIMIT if limit is None else max(1, min(int(limit), _st.HISTORY_MAX_LIMIT))
            before = _st._BIGINT_MAX if before_seq is None else int(before_seq)
            rows = sorted((row["seq"], i) for i, row in self.messages.items()
                          if row["session_id"] == session_id and row["seq"] < before)
            return [self._frame(i, with_session=False) for _, i in rows[-n:]]
        return self._call("history", page)

    def read(self, user_id, session_id, seq):
        def move():
            pair = _st.parse_p2p(session_id) if isinstance(session_id, str) else None
            if pair is not None and session_id not in self.sessions:
                if user_id not in pair:  # an implicit 1:1 session without messages
                    raise _st.StoreError("not_member", "not a member of this session")
                return 0, list(pair)
            session = self._member_of(user_id, session_id)
            member = session["members"][user_id]
            member["read_seq"] = max(member["read_seq"], min(int(seq), session["last_seq"]))
            return member["read_seq"], sorted(session["members"], key=str.encode)
        return self._call("read", move)

    def create_session(self, creator, members, session_id=None, kind="group"):
        def create():
            sid, k, everyone = _st.check_new_session(creator, members, session_id, kind, self.max_group_size)
            if sid in self.sessions:
                raise _st.StoreError("conflict", f"session {sid} exists")
            self.sessions[sid] = {"kind": k, "last_seq": 0, "members": {
                u: {"role": "owner" if u == creator else "member", "read_seq": 0} for u in everyone}}
            return sid, everyone
        return self._call("create_session", create)

    def add_remove_members(self, session_id, add=(), remove=()):
        def change():
            a, r = _st.check_member_change(add, remove)
            session = self.sessions.get(session_id)
            if session is None:
                raise _st.StoreError("no_session", "no such session")
            if session["kind"] == "p2p" and (a or r):
                raise _st.StoreError("bad_request", "the members of a p2p session do not change")
            members = dict(session["members"])
            for u in r:
                members.pop(u, None)
            for u in a:
                members.setdefault(u, {"role": "member", "read_seq": 0})
            if len(members) > self.max_group_size:
                raise _st.StoreError("too_large", f"a session has at most {self.max_group_size} members")
            session["members"] = members
            return sorted(members, key=str.encode)
        return self._call("add_remove_members", change)

    def session_members(self, session_ids):
        return self._call("session_members", lambda: {
            sid: sorted(self.sessions[sid]["members"], key=str.encode)
            for sid in set(session_ids) if sid in self.sessions})

    def get_session(self, session_id):
        def get():
            session = self.sessions.get(session_id)
            if session is None:
                raise _st.StoreError("no_session", "no such session")
            members = sorted(session["members"], key=str.encode)
            return {"sessionId": session_id, "kind": session["kind"], "members": members,
                    "owners": [u for u in members if session["members"][u]["role"] == "owner"],
                    "lastSeq": session["last_seq"]}
        return self._call("get_session", get)

    def user_sessions(self, user_id):
        def listing():
            out = []
            for sid in sorted(self.sessions, key=str.encode):
                session = self.sessions[sid]
                if user_id not in session["members"]:
                    continue
                read_seq = session["members"][user_id]["read_seq"]
                unread = sum(1 for row in self.messages.values()
                             if row["session_id"] == sid and row["seq"] > read_seq and row["sender"] != user_id)
                out.append({"sessionId": sid, "kind": session["kind"], "lastSeq": session["last_seq"],
                            "unread": unread})
            return out
        return self._call("user_sessions", listing)

# --- client connection (FakeConnection) ----------------------------------

from twisted.internet import address as _cc_address  # noqa: E402
from twisted.internet import defer as _cc_defer  # noqa: E402
from twisted.internet import error as _cc_error  # noqa: E402
from twisted.internet.task import Clock as _CcClock  # noqa: E402
from twisted.internet.testing import StringTransport as _CcStringTransport  # noqa: E402
from twisted.python.failure import Failure as _CcFailure  # noqa: E402
from zope.interface import implementer as _cc_implementer  # noqa: E402

from imcluster.interfaces import IClientConnection as _IClientConnection  # noqa: E402


def gateway_config(**changes):
    """A gateway Config with defaults, a test JWT secret and ``changes`` applied."""
    from imcluster.config import GATEWAY, load_config
    config = load_config(GATEWAY, {"jwt_secret": "test-secret"}, environ={})
    return config.replace(**changes) if changes else config


class FakeHub:
    """The hub interface of GATEWAY.md, recording what a ClientConnection asks of it.

    The default authenticator is a :class:`FakeAuthenticator` on the hub's
    clock (tokens ``"user:alice"``, ``"user:alice:<exp>"``, ``"expired:alice"``).

    ``refuse``: connection_made answers False. ``forward_failure`` /
    ``auth_failure`` / ``sync_failure``: an exception the corresponding call
    fails with (None: succeeds). ``hold_auth``: hub.authenticated returns a
    Deferred kept in ``held`` for the test to fire.
    """

    def __init__(self, config=None, clock=None, authenticator=None, server_id="gw-0000"):
        self.server_id = server_id
        self.clock = clock if clock is not None else _CcClock()
        self.config = config if config is not None else gateway_config()
        self.authenticator = (authenticator if authenticator is not None
                              else FakeAuthenticator(clock=self.clock))
        self.accepting = True
        self.refuse = False
        self.made = []
        self.lost = []
        self.auths = []
        self.syncs = []
        self.forwarded = []
        self.forward_failure = None
        self.auth_failure = None
        self.sync_failure = None
        self.hold_auth = False
        self.held = []

    def connection_made(self, conn):
        if self.refuse or not self.accepting:
            return False
        self.made.append(conn)
        return True

    def authenticated(self, conn, identity, refresh):
        self.auths.append((conn, identity, refresh))
        if self.hold_auth:
            d = _cc_defer.Deferred()
            self.held.append(d)
            return d
        if self.auth_failure is not None:
            return _cc_defer.fail(self.auth_failure)
        return _cc_defer.succeed(None)

    def request_sync(self, conn):
        self.syncs.append(conn)
        if self.sync_failure is not None:
            return _cc_defer.fail(self.sync_failure)
        return _cc_defer.succeed(None)

    def forward(self, conn, frame):
        self.forwarded.append((conn, frame))
        if self.forward_failure is not None:
            return _cc_defer.fail(self.forward_failure)
        return _cc_defer.succeed(None)

    def connection_lost(self, conn):
        self.lost.append(conn)


@_cc_implementer(_IClientConnection)
class FakeConnection:
    """An IClientConnection that records what the hub sends it (for hub unit tests)."""

    def __init__(self, user_id=None, ip="10.0.0.1", port=40000, server_id="gw-0000",
                 transport_name="ws", device=None, identity=None, clock=None):
        self.transport_name = transport_name
        self.ip = ip
        self.port = port
        self.peer_key = f"{ip}##{port}"
        self.conn_id = f"{server_id}##{self.peer_key}"
        self.user_id = user_id
        self.device = device
        self.identity = identity
        self.connected_at = clock.seconds() if clock is not None else 0.0
        self.sent = []
        self.closed = None
        self.went_away = False

    def send_frame(self, frame):
        if self.closed is None:
            self.sent.append(frame)

    def send_encoded(self, data):
        import json
        if self.closed is None:
            self.sent.append(json.loads(data))

    def close(self, code, reason):
        if self.closed is None:
            self.closed = (code, reason)

    def going_away(self):
        self.went_away = True
        self.close(1001, "server going away")


# wire helpers: what a client puts on (and reads from) the wire


def _payload(frame):
    import json
    if isinstance(frame, bytes):
        return frame
    if isinstance(frame, str):
        return frame.encode("utf-8")
    return json.dumps(frame, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def tcp_encode(frame):
    """One raw-TCP frame: 4-byte big-endian length, then the JSON (dict, str or bytes)."""
    data = _payload(frame)
    return len(data).to_bytes(4, "big") + data


class TcpFrameReader:
    """Splits what a raw-TCP server wrote into decoded JSON frames."""

    def __init__(self):
        self.buffer = b""

    def feed(self, data):
        import json
        self.buffer += data
        frames = []
        while len(self.buffer) >= 4:
            length = int.from_bytes(self.buffer[:4], "big")
            if len(self.buffer) < 4 + length:
                break
            frames.append(json.loads(self.buffer[4:4 + length].decode("utf-8")))
            self.buffer = self.buffer[4 + length:]
        return frames


WS_KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def ws_handshake(path="/ws", host="localhost:8080", headers=None):
    """The opening handshake request of a WebSocket client (bytes)."""
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Key: {WS_KEY}", "Sec-WebSocket-Version: 13"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def ws_frame(payload, opcode=1, fin=True, mask=b"\x01\x02\x03\x04"):
    """One masked client frame (opcode 1 text, 2 binary, 8 close, 9 ping, 10 pong)."""
    if opcode == 1 and not isinstance(payload, bytes):
        payload = _payload(payload)
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + n.to_bytes(8, "big")
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


def ws_close_frame(code=1000, reason=b""):
    """A client close frame."""
    return ws_frame(code.to_bytes(2, "big") + reason, opcode=8)


class WsFrameReader:
    """Parses what a WebSocket server wrote: the HTTP response, then unmasked frames.

    ``feed`` returns ``(opcode, payload)`` pairs; ``status`` is the HTTP
    status of the handshake response once it arrived.
    """

    def __init__(self):
        self.buffer = b""
        self.status = None
        self.response = None

    def feed(self, data):
        self.buffer += data
        out = []
        if self.status is None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return out
            self.response = self.buffer[:end].decode("latin-1")
            self.status = int(self.response.split(" ", 2)[1])
            self.buffer = self.buffer[end + 4:]
            if self.status != 101:
                return out
        while len(self.buffer) >= 2:
            b0, b1 = self.buffer[0], self.buffer[1]
            n, pos = b1 & 0x7F, 2
            if n == 126:
                if len(self.buffer) < 4:
                    break
                n, pos = int.from_bytes(self.buffer[2:4], "big"), 4
            elif n == 127:
                if len(self.buffer) < 10:
                    break
                n, pos = int.from_bytes(self.buffer[2:10], "big"), 10
            if len(self.buffer) < pos + n:
                break
            out.append((b0 & 0x0F, self.buffer[pos:pos + n]))
            self.buffer = self.buffer[pos + n:]
        return out


class LenientStringTransport(_CcStringTransport):
    """A StringTransport whose unregisterProducer, like a real transport's, tolerates no producer."""

    def unregisterProducer(self):
        self.producer = None
        self.streaming = None


class ClientHarness:
    """Drives a gateway adapter (``'ws'`` or ``'tcp'``) over a StringTransport, as a client.

    ``send(frame)`` writes one frame (dict, str or bytes payload);
    ``frames()`` returns the JSON frames the server wrote since the last call;
    ``closed`` tells whether the server closed, ``close_code`` the WebSocket
    close code it sent. ``finish()`` completes a server-initiated close
    (answering the close handshake, then delivering connectionLost);
    ``drop()`` simulates the client vanishing.
    """

    def __init__(self, hub, kind, factory=None, ip="10.1.2.3", port=40001, path="/ws", headers=None,
                 host="localhost:8080", handshake=True):
        self.kind = kind
        if factory is None:
            if kind == "ws":
                from imcluster.gateway.websocket import make_websocket_factory
                factory = make_websocket_factory(hub)
            else:
                from imcluster.gateway.rawsocket import make_rawsocket_factory
                factory = make_rawsocket_factory(hub)
        self.factory = factory
        self.hub = hub
        addr = _cc_address.IPv4Address("TCP", ip, port)
        self.proto = factory.buildProtocol(addr)
        self.transport = LenientStringTransport(peerAddress=addr)
        self.reader = WsFrameReader() if kind == "ws" else TcpFrameReader()
        self.close_code = None
        self.close_reason = None
        self.controls = []
        self.lost = False
        self._pending = []
        self.proto.makeConnection(self.transport)
        if kind == "ws" and handshake:
            self.proto.dataReceived(ws_handshake(path=path, host=host, headers=headers))
        self._read()

    @property
    def status(self):
        """HTTP status of the WebSocket handshake response (None for TCP)."""
        return self.reader.status if self.kind == "ws" else None

    @property
    def conn(self):
        return self.proto.conn

    def _read(self):
        import json
        data = self.transport.value()
        self.transport.clear()
        if self.kind == "tcp":
            self._pending.extend(self.reader.feed(data))
            return
        for opcode, payload in self.reader.feed(data):
            if opcode == 1:
                self._pending.append(json.loads(payload.decode("utf-8")))
            elif opcode == 8:
                self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self.close_reason = payload[2:].decode("utf-8", "replace")
            else:
                self.controls.append((opcode, payload))

    def send_raw(self, data):
        """Bytes as they are (a partial frame, garbage...)."""
        if not self.lost:
            self.proto.dataReceived(data)
        self._read()

    def send(self, frame):
        """One frame: a dict (JSON), str or bytes payload."""
        if self.kind == "ws":
            self.send_raw(ws_frame(_payload(frame)))
        else:
            self.send_raw(tcp_encode(frame))

    def send_binary(self, payload=b"\x00\x01"):
        self.send_raw(ws_frame(payload, opcode=2))

    def frames(self):
        self._read()
        out, self._pending = self._pending, []
        return out

    @property
    def closed(self):
        """True once the server closed (close frame sent, or the TCP connection closing)."""
        self._read()
        return self.close_code is not None or self.transport.disconnecting or self.lost

    def finish(self):
        """Complete a close: answer the close handshake, then connectionLost."""
        self._read()
        if self.lost:
            return
        if self.kind == "ws" and self.close_code is not None and not self.transport.disconnecting:
            self.proto.dataReceived(ws_close_frame(self.close_code))
            self._read()
        self.lost = True
        self.proto.connectionLost(_CcFailure(_cc_error.ConnectionDone()))

    def drop(self):
        """The client vanishes (connection lost without a close)."""
        if not self.lost:
            self.lost = True
            self.proto.connectionLost(_CcFailure(_cc_error.ConnectionLost()))


def self_signed_cert(directory, hostname="localhost"):
    """Write a self-signed certificate for ``hostname`` (and 127.0.0.1) into ``directory``.

    Returns ``(cert_path, key_path, cert_pem)``; for ``ssl:`` server endpoint
    strings (``ssl:0:privateKey=<key>:certKey=<cert>``) and for clients that
    trust exactly this certificate.
    """
    import datetime
    import ipaddress
    import os

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName(hostname), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    cert_path = os.path.join(str(directory), "cert.pem")
    key_path = os.path.join(str(directory), "key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert_pem)
    with open(key_path, "wb") as f:
        f.write(key_pem)
    return cert_path, key_path, cert_pem


class LoopbackGateway:
    """A :class:`FakeHub` behind real listening adapters on the running reactor.

    For loopback tests of the WebSocket and raw TCP adapters with real
    clients: ``await listen('ws'|'tcp', endpoint)`` returns the port;
    ``await stop()`` closes the listeners, aborts server-side connections
    still open and waits until the hub heard of every one's end.
    """

    def __init__(self, reactor=None, **config):
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        config.setdefault("ws_ping_interval", 0)
        self.hub = FakeHub(config=gateway_config(**config), clock=reactor)
        self.ports = []

    async def listen(self, kind, endpoint="tcp:0:interface=127.0.0.1"):
        from twisted.internet.endpoints import serverFromString
        if kind == "ws":
            from imcluster.gateway.websocket import make_websocket_factory
            factory = make_websocket_factory(self.hub)
        else:
            from imcluster.gateway.rawsocket import make_rawsocket_factory
            factory = make_rawsocket_factory(self.hub)
        port = await serverFromString(self.reactor, endpoint).listen(factory)
        self.ports.append(port)
        return port.getHost().port

    def open_connections(self):
        return [c for c in self.hub.made if c not in self.hub.lost]

    async def stop(self, timeout=5.0):
        from twisted.internet import task
        for port in self.ports:
            await port.stopListening()
        self.ports = []
        for conn in self.open_connections():
            conn._adapter.transport.abortConnection()
        deadline = self.reactor.seconds() + timeout
        while self.open_connections():
            if self.reactor.seconds() > deadline:
                raise AssertionError(f"connections never ended: {self.open_connections()}")
            await task.deferLater(self.reactor, 0.01, lambda: None)

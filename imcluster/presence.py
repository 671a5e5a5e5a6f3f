"""Live presence: who is online, each change detected once in Redis, and told to who listens.

PROTOCOL.md 1.1 "Presence": a user is online while it has at least one
authenticated connection on a live gateway, i.e. while its
``UCIR##<userId>`` hash has a field (ARCHITECTURE.md's layout; a dead
gateway's fields go when it is reaped). This module turns changes of that
hash into *transitions*, in Redis, atomically, exactly once each:

``PRESENCE##{<userId>}`` (a string, after ``redis_prefix``)
    ``"<ts>:1"`` while the user is online, ``"<ts>:0"`` once it went offline
    (then with a TTL of :data:`OFFLINE_KEEP`). ``<ts>`` is the time of the
    last transition in ms (Redis' ``TIME``), and strictly increases per user:
    it is also the transition's *version*.

:data:`SYNC_SCRIPT` compares ``EXISTS UCIR##<user>`` with that state and,
when they differ, writes the new state and ``PUBLISH``\\ es it on the channel
of the same name (``PRESENCE##{<userId>}``). It touches one user's two keys
only (one shard, one hash tag) and is idempotent: whoever changes a
``UCIR`` hash runs it afterwards for the users it touched (the gateway's
connection writer, its re-registration and its unregistration at exit, the
reaper of dead gateways), pipelined, and only the call that flips the state
gets it back, so each transition is published once and becomes one webhook
event (``user.online`` / ``user.offline``) published by that caller. Two
gateways racing on one user (its last connection closing on one, a new one
opening on the other) publish either nothing or both transitions, in the
order Redis ran them: a subscriber never sees two frames in a row with the
same state, and a quick flap may be coalesced.

Gateways learn of transitions by subscribing (:class:`RedisSubscriber`, a
Redis connection of their own) to the channels of the users their
connections follow, and read the current states with :meth:`Tracker.states`
(``TIME`` + ``MGET``: the version tells which of a read and a published
transition is newer). The same connection subscribes
``WSALIVE##<uuid>`` for the gateway's life: ``PUBSUB NUMSUB`` of that
channel is 0 as soon as the gateway's process is gone (the kernel closes its
sockets on SIGKILL), which is how the processors find a gateway that died
without exiting long before its ``WSSERVER_<uuid>`` key expires
(``imcluster/processor/liveness.py``).

Sharding: ``PUBLISH`` reaches the subscribers of the Redis that ran the
script, so with several primaries a gateway keeps one pub/sub connection per
shard (:class:`ShardedSubscriber`), and each channel is subscribed on the
shard its hash tag names: ``PRESENCE##{<userId>}`` where the user's script
runs, ``WSALIVE##{<uuid>}`` where the gateway's ``WSSERVER_{<uuid>}`` is.
Behind Sentinel the pub/sub connection finds the master like the command
connections (:meth:`imcluster.registry.RedisNode.endpoint`) and subscribes
again on the promoted one after a failover (Sentinel drops the demoted
master's clients, pub/sub ones included).
"""

from __future__ import annotations

import collections
import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import txredisapi
from twisted.application.internet import ClientService
from twisted.internet import defer, protocol
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.logger import Logger
from twisted.python.failure import Failure

from imcluster import envelope, metrics
from imcluster.envelope import SEP

#: seconds an offline state is kept (a user that comes back later starts from Redis' clock again)
OFFLINE_KEEP = 7 * 86400

#: ``<prefix>PRESENCE##<userId>``: the state key, and the channel of its transitions
STATE_PREFIX = "PRESENCE" + SEP
#: ``<prefix>WSALIVE##{<uuid>}``: the channel a live gateway's presence connection subscribes
LIVENESS_PREFIX = "WSALIVE" + SEP


def state_key(prefix: str, user_id: str) -> str:
    """``<prefix>PRESENCE##{<userId>}``: the user's state (and the channel of its transitions).

    The hash tag is the user's, as ``UCIR##{<userId>}``'s (``RedisKeys.user_key``): the
    script touching both runs on one shard.
    """
    return f"{prefix}{STATE_PREFIX}{{{user_id}}}"


def user_of_channel(channel_tail: str) -> str:
    """The user of a channel name after ``<prefix>PRESENCE##``: ``{alice}`` -> ``alice``."""
    if channel_tail.startswith("{") and channel_tail.endswith("}"):
        return channel_tail[1:-1]
    return channel_tail


def liveness_channel(prefix: str, uuid: str) -> str:
    """``<prefix>WSALIVE##{<uuid>}``: subscribed by gateway ``uuid`` while its process lives.

    The hash tag is the gateway's, as ``WSSERVER_{<uuid>}``'s (``RedisKeys.gateway_key``):
    with several shards the gateway subscribes it on that shard, where the
    processors ask ``PUBSUB NUMSUB`` beside their ``MGET`` of the key.
    """
    return f"{prefix}{LIVENESS_PREFIX}{{{uuid}}}"


def parse_state(value: Any) -> tuple[int, bool] | None:
    """``"<ts>:<0|1>"`` -> ``(ts, online)``; None for anything else (a missing key)."""
    if not isinstance(value, str):
        return None
    ts, sep, flag = value.partition(":")
    if not sep or flag not in ("0", "1") or not ts.isdigit():
        return None
    return int(ts), flag == "1"


#: KEYS: UCIR##<user>, PRESENCE##<user>; ARGV: offline TTL (s).
#: Returns the new state "<ts>:<0|1>" when it changed (and was published), else nil.
SYNC_SOURCE = """
local online = redis.call('EXISTS', KEYS[1])
local cur = redis.call('GET', KEYS[2])
local v, s = 0, -1
if cur then
  local a, b = string.match(cur, '^(%d+):([01])$')
  if a then v = tonumber(a); s = tonumber(b) end
end
if s == online or (s == -1 and online == 0) then return false end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if now <= v then now = v + 1 end
local val = string.format('%.0f', now) .. ':' .. online
if online == 1 then
  redis.call('SET', KEYS[2], val)
else
  redis.call('SET', KEYS[2], val, 'EX', ARGV[1])
end
redis.call('PUBLISH', KEYS[2], val)
return val
"""


@dataclass(frozen=True)
class Script:
    """A Lua script sent with EVALSHA (loaded again when Redis forgot it)."""

    name: str
    source: str

    @property
    def sha(self) -> str:
        return hashlib.sha1(self.source.encode()).hexdigest()


SYNC_SCRIPT = Script("presence_sync", SYNC_SOURCE)


@dataclass(frozen=True)
class Transition:
    """A user went online or offline at ``ts`` (ms, Redis' clock), detected by the caller."""

    user_id: str
    online: bool
    ts: int


def _chunks(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


class Tracker:
    """Runs :data:`SYNC_SCRIPT` for users whose connections changed; publishes the webhook events.

    ``registry`` is the RedisService (or FakeRegistry) of the daemon: its
    ``pipeline`` carries the scripts, ``batch`` users a round trip. ``bus``
    and ``config`` (``webhook_url``, ``webhook_events``, ``retry_delay``,
    ``retry_max_delay``) enable the ``user.online`` / ``user.offline``
    events: one AMQP message (a JSON array, persistent) per call that found
    transitions, to ``<ns>.webhooks`` (docs/internals.rst).
    """

    log = Logger()

    def __init__(self, registry: Any, bus: Any = None, config: Any = None, clock: Any = None,
                 batch: int | None = None) -> None:
        self.registry = registry
        self.prefix = getattr(registry, "prefix", "") or ""
        self.ucir = registry.keys.ucir
        #: several shards: each user's script goes to its shard (run_script), TIME to the first
        self.sharded = len(getattr(registry, "nodes", ()) or ()) > 1
        self.batch = batch or getattr(registry, "batch", 1000) or 1000
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = clock
        self.webhooks: WebhookEvents | None = None
        if bus is not None and config is not None and getattr(config, "webhook_url", None):
            events = set(getattr(config, "webhook_events", None) or ())
            wanted = {n for n in (envelope.USER_ONLINE, envelope.USER_OFFLINE) if n in events}
            if wanted:
                self.webhooks = WebhookEvents(bus, wanted, clock, config)
        #: transitions this tracker detected (tests, operators' logs)
        self.detected = 0

    def start(self) -> defer.Deferred:
        """Declare ``<ns>.webhooks`` when events are published (on every reconnect too)."""
        if self.webhooks is not None:
            return self.webhooks.start()
        return defer.succeed(None)

    def stop(self) -> defer.Deferred:
        if self.webhooks is not None:
            return self.webhooks.stop()
        return defer.succeed(None)

    def reconcile(self, user_ids: Iterable[str]) -> defer.Deferred:
        """Bring the state of each user in line with its ``UCIR`` hash; fires with the transitions.

        ``batch`` scripts a pipeline, the pipelines sent at once (one round
        trip). Fails like the registry (``TimeoutError``, ``RegistryUnavailable``).
        """
        users = list(dict.fromkeys(user_ids))
        if not users:
            return defer.succeed([])
        d = defer.gatherResults([self._sync(chunk) for chunk in _chunks(users, self.batch)], consumeErrors=True)
        d.addErrback(lambda f: f.value.subFailure if isinstance(f.value, defer.FirstError) else f)

        def collected(results: list[list[Transition]]) -> list[Transition]:
            found = [t for part in results for t in part]
            if found:
                self.detected += len(found)
                metrics.PRESENCE_TRANSITIONS.inc(len(found))
                if self.webhooks is not None:
                    self.webhooks.add(found)
            return found

        return d.addCallback(collected)

    def _sync(self, users: list[str]) -> defer.Deferred:
        sha, ttl, ucir, prefix = SYNC_SCRIPT.sha, OFFLINE_KEEP, self.ucir, self.prefix
        if self.sharded:
            d = defer.gatherResults([self.registry.run_script(SYNC_SCRIPT, [ucir(u), state_key(prefix, u)], [ttl])
                                     for u in users], consumeErrors=True)
            d.addErrback(lambda f: f.value.subFailure if isinstance(f.value, defer.FirstError) else f)
            return d.addCallback(lambda replies: [Transition(u, st[1], st[0]) for u, st in
                                                  ((u, parse_state(v)) for u, v in zip(users, replies))
                                                  if st is not None])
        commands = [("EVALSHA", sha, 2, ucir(u), state_key(prefix, u), ttl) for u in users]

        def decode(replies: list) -> list[Transition]:
            out = []
            for user, value in zip(users, replies):
                state = parse_state(value)
                if state is not None:
                    out.append(Transition(user, state[1], state[0]))
            return out

        def noscript(f: Failure) -> Any:
            if "NOSCRIPT" not in str(f.value):
                return f
            # Redis restarted (or never saw it): load it, run the whole chunk again (idempotent)
            d = self.registry.execute("SCRIPT", "LOAD", SYNC_SCRIPT.source)
            return d.addCallback(lambda _: self.registry.pipeline(commands))

        return self.registry.pipeline(commands).addErrback(noscript).addCallback(decode)

    def states(self, user_ids: Sequence[str]) -> defer.Deferred:
        """``(t_ms, {user: (ts, online) or None})``: the users' states, read at Redis time ``t_ms``.

        One round trip (``TIME`` then ``MGET``). None: no state (never
        online, or offline for longer than :data:`OFFLINE_KEEP`, or Redis
        lost it): offline as of ``t_ms``.
        """
        users = list(user_ids)
        if not users:
            return defer.succeed((0, {}))
        keys = [state_key(self.prefix, u) for u in users]
        if self.sharded:
            d = defer.gatherResults([self.registry.nodes[0].execute("TIME"), self.registry.execute("MGET", *keys)],
                                    consumeErrors=True)
        else:
            d = self.registry.pipeline([("TIME",), ("MGET", *keys)])

        def decode(replies: list) -> tuple[int, dict]:
            t = replies[0]
            t_ms = int(t[0]) * 1000 + int(t[1]) // 1000
            return t_ms, {u: parse_state(v) for u, v in zip(users, replies[1])}

        return d.addCallback(decode)


class WebhookEvents:
    """``user.online`` / ``user.offline`` events, one AMQP message per batch, retried until published.

    Published persistent (with confirms) to ``<ns>.exchange`` with routing
    key ``<ns>.webhooks``; the queue ``<ns>.webhooks`` is declared on every
    connection (``bus.declare_queue``), so events published before any
    consumer ran are kept. A batch that fails is retried with backoff
    (``retry_delay`` .. ``retry_max_delay``) in order; at most
    :data:`MAX_PENDING` events wait (the oldest are dropped, and logged).
    """

    log = Logger()

    MAX_PENDING = 100_000

    def __init__(self, bus: Any, wanted: set[str], clock: Any, config: Any) -> None:
        self.bus = bus
        self.wanted = wanted
        self.clock = clock
        self.retry_delay = getattr(config, "retry_delay", 0.5)
        self.retry_max_delay = getattr(config, "retry_max_delay", 30.0)
        self.max_bytes = getattr(config, "max_publish_bytes", 8 * 1024 * 1024) - 4096
        namespace = getattr(bus, "namespace", None) or getattr(config, "namespace", "im")
        self.routing_key = f"{namespace}.webhooks"
        self._pending: collections.deque[dict] = collections.deque()
        self._sending = False
        self._retry: Any = None
        self._delay = self.retry_delay
        self._running = False
        self.published = 0

    def start(self) -> defer.Deferred:
        self._running = True
        declare = getattr(self.bus, "declare_queue", None)
        names = getattr(self.bus, "names", None)
        if declare is None or names is None or not hasattr(names, "webhooks_queue"):
            return defer.succeed(None)
        d = defer.maybeDeferred(declare, names.webhooks_queue())
        d.addErrback(lambda f: self.log.warn("declaring <ns>.webhooks failed ({err}); declared again on "
                                              "the next connection", err=f.getErrorMessage()))
        return d

    def stop(self) -> defer.Deferred:
        """Send what waits (one try; the AMQP service stops after us)."""
        self._running = False
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._pending and not self._sending:
            return self._send()
        return defer.succeed(None)

    def add(self, transitions: Sequence[Transition]) -> None:
        for t in transitions:
            name = envelope.USER_ONLINE if t.online else envelope.USER_OFFLINE
            if name in self.wanted:
                self._pending.append(envelope.presence_event(name, t.user_id, t.ts))
        dropped = 0
        while len(self._pending) > self.MAX_PENDING:
            self._pending.popleft()
            dropped += 1
        if dropped:
            self.log.warn("dropped {n} presence webhook events: RabbitMQ has not taken them", n=dropped)
        if self._pending and not self._sending and self._retry is None:
            self._send()

    def _send(self) -> defer.Deferred:
        batch = list(self._pending)
        bodies = envelope.events_bodies(batch, self.max_bytes)
        self._sending = True
        d = defer.gatherResults([self.bus.publish(self.routing_key, body, persistent=True) for body in bodies],
                                consumeErrors=True)

        def sent(_: Any) -> None:
            self._sending = False
            for _i in range(len(batch)):
                self._pending.popleft()
            self.published += len(batch)
            self._delay = self.retry_delay
            if self._pending:
                self._send()

        def failed(f: Failure) -> None:
            self._sending = False
            err = f.value.subFailure.getErrorMessage() if isinstance(f.value, defer.FirstError) else f.getErrorMessage()
            if not self._running:
                self.log.warn("{n} presence webhook events not published at exit: {err}", n=len(batch), err=err)
                return
            # published again as a whole: the receiver de-duplicates by eventId
            self.log.warn("publishing {n} presence webhook events failed ({err}); retrying in {delay}s",
                          n=len(batch), err=err, delay=self._delay)
            self._retry = self.clock.callLater(self._delay, self._retry_now)
            self._delay = min(self._delay * 2, self.retry_max_delay)

        return d.addCallbacks(sent, failed)

    def _retry_now(self) -> None:
        self._retry = None
        if self._pending and not self._sending:
            self._send()


# --- the pub/sub connection ---------------------------------------------------------


class _SubscriberProtocol(txredisapi.RedisProtocol):
    """txredisapi's handshake (AUTH), then our own handling of every pub/sub reply."""

    def __init__(self, owner: "RedisSubscriber", **kw: Any) -> None:
        super().__init__(**kw)
        self.owner = owner
        self.pubsub = False
        self.sent: set[str] = set()
        self.pings: collections.deque[defer.Deferred] = collections.deque()

    def replyReceived(self, reply: Any) -> None:  # noqa: N802 (txredisapi API)
        if not self.pubsub:
            return super().replyReceived(reply)
        if isinstance(reply, list) and reply:
            kind = reply[0]
            if kind == "message" and len(reply) == 3:
                self.owner._message(reply[1], reply[2])
                return
            if kind == "pong":
                if self.pings:
                    self.pings.popleft().callback(None)
                return
            if kind in ("subscribe", "unsubscribe"):
                return
        if reply == "PONG":  # PING before any SUBSCRIBE: a plain reply
            if self.pings:
                self.pings.popleft().callback(None)
            return
        if isinstance(reply, Exception):
            self.owner.log.warn("Redis pub/sub error: {err}", err=reply)

    def send(self, *args: Any) -> None:
        self.transport.write(self._build_command(*args))

    def ping(self) -> defer.Deferred:
        d = defer.Deferred()
        self.pings.append(d)
        self.send("PING")
        return d

    def connectionLost(self, why: Any) -> None:  # noqa: N802 (Twisted API)
        pings, self.pings = self.pings, collections.deque()
        for d in pings:
            d.errback(ConnectionError("Redis pub/sub connection lost"))
        super().connectionLost(why)


class _SentinelSubscriberProtocol(_SubscriberProtocol, txredisapi.SentinelRedisProtocol):
    """Behind Sentinel: ``ROLE`` first, and a link to an instance that is not the master is dropped
    (and tried again: the Sentinels are asked anew), as the command connections do."""


class _SubscriberFactory(protocol.Factory):
    noisy = False
    isLazy = True

    def __init__(self, owner: "RedisSubscriber") -> None:
        self.owner = owner
        #: txredisapi's SentinelRedisProtocol reads it: a master only
        self.is_master = True

    def buildProtocol(self, addr: Any) -> _SubscriberProtocol:  # noqa: N802 (Twisted API)
        o = self.owner
        kind = _SentinelSubscriberProtocol if o.sentinel else _SubscriberProtocol
        p = kind(o, charset="utf-8", password=o.password, dbid=None,
                 convertNumbers=False, username=o.username)
        p.factory = self
        p.whenConnected().addCallback(o._connected)
        return p

    def stopTrying(self) -> None:  # noqa: N802 (txredisapi calls it when AUTH fails)
        pass

    def connectionError(self, why: Any) -> None:  # noqa: N802
        self.owner.log.error("Redis refused the pub/sub connection: {why}", why=why)


class RedisSubscriber:
    """One Redis connection in pub/sub mode, re-established (and re-subscribed) after every loss.

    ``on_message(channel, data)`` gets every message. :meth:`subscribe`
    fires once Redis confirmed the subscriptions (a ``PING`` sent behind the
    ``SUBSCRIBE`` came back), so a read made afterwards cannot miss a change
    published after it. Listeners added with :meth:`add_reconnect_listener`
    run after a new connection is subscribed again (not the first): what
    was published meanwhile was missed.
    """

    log = Logger()

    #: channels per SUBSCRIBE command
    CHUNK = 1000

    #: reconnection backoff ceiling (seconds); 1 s behind Sentinel, as the command connections
    retry_max_delay = 2.0

    def __init__(self, host: str | None, port: int | None, password: str | None = None,
                 username: str | None = None, tls: bool = False, timeout: float = 5.0, clock: Any = None,
                 on_message: Callable[[str, str], Any] | None = None, endpoint: Any = None,
                 sentinel: bool = False) -> None:
        self.host = host
        self.port = port
        #: where to connect (an IStreamClientEndpoint); None: ``host``:``port``
        self.endpoint = endpoint
        #: behind Sentinel: check ``ROLE`` on every connection (a master only)
        self.sentinel = sentinel
        if sentinel:
            self.retry_max_delay = 1.0
        self.password = password
        self.username = username
        self.tls = tls
        self.timeout = timeout
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = clock
        self.on_message = on_message or (lambda channel, data: None)
        self.channels: set[str] = set()
        self._conn: _SubscriberProtocol | None = None
        self._client: ClientService | None = None
        self._ever = False
        self._waiters: list[defer.Deferred] = []
        self._listeners: list[Callable[[], Any]] = []
        self.reconnects = 0
        self.messages = 0

    @classmethod
    def for_node(cls, node: Any, **kw: Any) -> "RedisSubscriber":
        """A subscriber to one shard (a ``RedisNode``): its primary, or its Sentinel master."""
        if getattr(node, "spec", None) is not None and node.spec.master:
            return cls(None, None, password=node.password, username=node.username, tls=node.tls,
                       timeout=node.timeout, endpoint=node.endpoint(), sentinel=True, **kw)
        return cls(node.host, node.port, password=node.password, username=node.username,
                   tls=node.tls, timeout=node.timeout, **kw)

    @classmethod
    def for_registry(cls, registry: Any, **kw: Any) -> Any:
        """The pub/sub side of ``registry`` (a RedisService): a subscriber, or one per shard."""
        nodes = getattr(registry, "nodes", None) or [registry]
        if len(nodes) > 1:
            return ShardedSubscriber(registry, **kw)
        return cls.for_node(nodes[0], **kw)

    @property
    def connected(self) -> bool:
        return self._conn is not None

    def add_reconnect_listener(self, fn: Callable[[], Any]) -> None:
        self._listeners.append(fn)

    def start(self) -> defer.Deferred:
        """Connect; fires once subscribed (or after ``timeout``, logged: it keeps trying)."""
        from twisted.internet import reactor

        endpoint = self.endpoint
        if endpoint is None:
            endpoint = HostnameEndpoint(reactor, self.host, self.port, timeout=self.timeout)
            if self.tls:
                from twisted.internet.ssl import optionsForClientTLS
                endpoint = wrapClientTLS(optionsForClientTLS(self.host), endpoint)
        ceiling = self.retry_max_delay
        self._client = ClientService(endpoint, _SubscriberFactory(self),
                                     retryPolicy=lambda attempt: min(ceiling, 0.25 * 2 ** attempt))
        self._client.startService()
        return self._wait()

    def stop(self) -> defer.Deferred:
        client, self._client = self._client, None
        conn, self._conn = self._conn, None
        for w in self._waiters:
            if not w.called:
                w.errback(ConnectionError("Redis pub/sub stopped"))
        self._waiters = []
        if client is None:
            return defer.succeed(None)
        return client.stopService()

    def subscribe(self, channels: Iterable[str]) -> defer.Deferred:
        """Subscribe (besides the channels already subscribed); fires once Redis has them."""
        new = [c for c in channels if c not in self.channels]
        self.channels.update(new)
        conn = self._conn
        if conn is None:
            return self._wait()
        if not new:
            return defer.succeed(None)
        for chunk in _chunks(new, self.CHUNK):
            conn.send("SUBSCRIBE", *chunk)
        return self._bounded(conn.ping())

    def unsubscribe(self, channels: Iterable[str]) -> None:
        gone = [c for c in channels if c in self.channels]
        self.channels.difference_update(gone)
        conn = self._conn
        if conn is not None:
            for chunk in _chunks(gone, self.CHUNK):
                conn.send("UNSUBSCRIBE", *chunk)

    def _wait(self) -> defer.Deferred:
        d = defer.Deferred()
        self._waiters.append(d)
        return self._bounded(d)

    def _bounded(self, d: defer.Deferred) -> defer.Deferred:
        result = defer.Deferred()

        def timed_out() -> None:
            if not result.called:
                result.errback(TimeoutError(f"Redis pub/sub did not answer within {self.timeout:g}s"))

        timer = self.clock.callLater(self.timeout, timed_out)

        def done(r: Any) -> None:
            if timer.active():
                timer.cancel()
            if not result.called:
                (result.errback if isinstance(r, Failure) else result.callback)(r)

        d.addBoth(done)
        return result

    def _connected(self, conn: _SubscriberProtocol) -> None:
        if self._client is None:
            conn.transport.loseConnection()
            return
        conn.pubsub = True
        conn.sent = set(self.channels)
        for chunk in _chunks(sorted(conn.sent), self.CHUNK):
            conn.send("SUBSCRIBE", *chunk)
        conn.whenDisconnected().addCallback(self._lost)
        conn.ping().addCallbacks(lambda _: self._subscribed(conn), lambda f: None)

    def _subscribed(self, conn: _SubscriberProtocol) -> None:
        if not conn.connected or self._client is None:
            return
        # channels (un)subscribed while that SUBSCRIBE was in flight
        missing = self.channels - conn.sent
        extra = conn.sent - self.channels
        if extra:
            conn.send("UNSUBSCRIBE", *sorted(extra))
        if missing:
            conn.sent = set(self.channels)
            for chunk in _chunks(sorted(missing), self.CHUNK):
                conn.send("SUBSCRIBE", *chunk)
            conn.ping().addCallbacks(lambda _: self._subscribed(conn), lambda f: None)
            return
        self._conn = conn
        reconnect = self._ever
        self._ever = True
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            w.callback(None)
        if reconnect:
            self.reconnects += 1
            self.log.info("Redis pub/sub reconnected; {n} channels subscribed again", n=len(self.channels))
            for fn in list(self._listeners):
                defer.maybeDeferred(fn).addErrback(
                    lambda f: self.log.failure("pub/sub reconnect listener failed", f))

    def _lost(self, conn: _SubscriberProtocol) -> None:
        if self._conn is conn:
            self._conn = None
            if self._client is not None:
                self.log.warn("Redis pub/sub connection lost; reconnecting")

    def _message(self, channel: str, data: str) -> None:
        self.messages += 1
        try:
            self.on_message(channel, data)
        except Exception:
            self.log.failure("handling a pub/sub message on {channel} failed", channel=channel)


class ShardedSubscriber:
    """One :class:`RedisSubscriber` per shard of a RedisService, each channel on the shard of its hash tag.

    The same interface as one subscriber. ``PRESENCE##{<userId>}`` goes to
    the shard where that user's script runs (and PUBLISHes),
    ``WSALIVE##{<uuid>}`` to the gateway's shard, where the processors ask
    ``PUBSUB NUMSUB``. A subscribe fires once every shard concerned has its
    channels; a reconnect of one shard calls the listeners with that shard's
    channels (``fn(channels)``): only its users need reading again.
    """

    log = Logger()

    def __init__(self, registry: Any, on_message: Callable[[str, str], Any] | None = None,
                 clock: Any = None) -> None:
        self.registry = registry
        self.on_message = on_message or (lambda channel, data: None)
        self.shards = [RedisSubscriber.for_node(n, clock=clock, on_message=self._message) for n in registry.nodes]
        self._by_node = dict(zip(registry.nodes, self.shards))
        self._listeners: list[Callable[..., Any]] = []
        for sub in self.shards:
            sub.add_reconnect_listener(lambda sub=sub: self._reconnected(sub))

    def shard_of(self, channel: str) -> RedisSubscriber:
        return self._by_node[self.registry.node_for(channel)]

    def _groups(self, channels: Iterable[str]) -> dict[RedisSubscriber, list[str]]:
        groups: dict[RedisSubscriber, list[str]] = {}
        for c in channels:
            groups.setdefault(self.shard_of(c), []).append(c)
        return groups

    @property
    def channels(self) -> set[str]:
        return set().union(*(s.channels for s in self.shards))

    @property
    def connected(self) -> bool:
        return all(s.connected for s in self.shards)

    @property
    def reconnects(self) -> int:
        return sum(s.reconnects for s in self.shards)

    @property
    def messages(self) -> int:
        return sum(s.messages for s in self.shards)

    def add_reconnect_listener(self, fn: Callable[..., Any]) -> None:
        self._listeners.append(fn)

    def _reconnected(self, sub: RedisSubscriber) -> Any:
        channels = set(sub.channels)
        return defer.DeferredList([defer.maybeDeferred(fn, channels) for fn in list(self._listeners)],
                                  consumeErrors=True)

    def _message(self, channel: str, data: str) -> None:
        self.on_message(channel, data)

    def start(self) -> defer.Deferred:
        d = defer.gatherResults([s.start() for s in self.shards], consumeErrors=True)
        return d.addCallbacks(lambda _: None, _first_failure)

    def stop(self) -> defer.Deferred:
        return defer.gatherResults([s.stop() for s in self.shards], consumeErrors=True).addCallback(lambda _: None)

    def subscribe(self, channels: Iterable[str]) -> defer.Deferred:
        groups = self._groups(channels)
        if not groups:
            return defer.succeed(None)
        d = defer.gatherResults([s.subscribe(cs) for s, cs in groups.items()], consumeErrors=True)
        return d.addCallbacks(lambda _: None, _first_failure)

    def unsubscribe(self, channels: Iterable[str]) -> None:
        for s, cs in self._groups(channels).items():
            s.unsubscribe(cs)


def _first_failure(f: Failure) -> Failure:
    return f.value.subFailure if isinstance(f.value, defer.FirstError) else f


def subscriber_for(registry: Any, on_message: Callable[[str, str], Any], clock: Any = None) -> Any:
    """The pub/sub connection that goes with ``registry``: its own (a fake's), else a :class:`RedisSubscriber`."""
    make = getattr(registry, "subscriber", None)
    if make is not None:
        return make(on_message)
    return RedisSubscriber.for_registry(registry, clock=clock, on_message=on_message)

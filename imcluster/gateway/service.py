"""The gateway hub: what ties client connections to Redis and RabbitMQ.

:class:`GatewayService` implements the hub interface the connection engine
calls (``notes``: ``connection_made``, ``authenticated``, ``request_sync``,
``forward``, ``connection_lost``), hands out the ``max_connections`` slots
the transport adapters take per accepted socket (``socket_opened``,
``socket_closed``), and runs ARCHITECTURE.md's flows:

1. start: a new uuid; ``WSSERVER_<uuid>`` + ``WSSERVERS``; declare and
   consume ``<ns>.gateway.<uuid>``; then start the children: the heartbeat
   and one :class:`TransportListener` per ``--ws`` / ``--tcp`` / ``--stream`` endpoint
   (and write ``WSSERVER_<uuid>`` again with the ports actually bound);
2. connect / 3. auth / 7. disconnect: the connection maps
   (:class:`~imcluster.gateway.connections.ConnectionRegistry`) and the
   ``UCIR##<user>`` / ``WSCONNS##<uuid>`` entries, written in pipelines that
   gather every change of one reactor turn;
4. client frames are coalesced into ``{"v":1,"items":[...]}`` batches
   (:class:`imcluster.envelope.Publisher`), one persistent, confirmed
   publish per batch;
6. deliveries from the gateway queue are written, in order, to the named
   connections, each frame serialised once;
8. SIGTERM: the children stop in reverse (listeners first, then the
   heartbeat), clients are told "going away", every Redis entry of this
   gateway is removed, then the AMQP connection closes.

Typing and live presence (PROTOCOL.md 1.1) live in
:mod:`imcluster.gateway.presence`: ``typing`` frames pass a per-connection
and per-session gate before they are forwarded, ``presence_subscribe`` /
``presence_unsubscribe`` are answered here, and every change of connection
entries is followed by ``Tracker.reconcile`` for its users (transitions,
detected once in Redis: :mod:`imcluster.presence`).

A heartbeat (a :class:`~imcluster.service.GuardedLoop` child) refreshes
``WSSERVER_<uuid>``; when Redis has lost it (or after a Redis reconnect) the
gateway writes its key and every live connection again.

Healing (ARCHITECTURE.md, "deliveries heal by themselves"): whatever the
processors routed while this gateway's queue was gone (a broker restart, a
lost AMQP connection) or while its Redis entries were gone (the processors
saw its users offline) never reached its clients. So once its queue is
declared again, and once it is re-registered in Redis, the gateway asks the
processors to sync every connection it holds again (:meth:`GatewayService.resync_connections`):
one ``sync`` item per connection, ``publish_batch`` items a publish, at most
``resync_rate`` connections a second. Clients get what they missed, possibly
twice (same ``msgId``), and another ``sync_done``.
"""

from __future__ import annotations

import socket
import uuid as uuid_module
from typing import Any, Callable, Iterable

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from imcluster import envelope, metrics
from imcluster import protocol as client_protocol
from imcluster.presence import Tracker, subscriber_for
from imcluster.auth import TokenRevoked, is_revoked
from imcluster.protocol import encode_bytes
from imcluster.gateway.connections import ConnectionRegistry
from imcluster.gateway.presence import PresenceHub, TypingGate
from imcluster.registry import conn_meta, server_info
from imcluster.service import AsyncMultiService, GuardedLoop, with_timeout
from imcluster.web import ListenerService

# the gateway's transports, in listening order: the config option holding a
# transport's endpoints (--ws, --tcp, --stream) and the WSSERVER_ field of its
# first port (None: ARCHITECTURE.md fixes that JSON, and has no field for it)
TRANSPORTS = (("ws", "port"), ("tcp", "tcpPort"), ("stream", None))


class GatewayStopping(Exception):
    """The gateway is shutting down and records no new authentication."""


def advertise_address(configured: str | None = None) -> str:
    """The ``ip`` written to ``WSSERVER_<uuid>``.

    The configured address, else the first non-loopback address (the one the
    default route leaves from), else ``127.0.0.1``.
    """
    if configured:
        return configured
    for family, probe in ((socket.AF_INET, ("192.0.2.1", 9)), (socket.AF_INET6, ("2001:db8::1", 9))):
        try:
            # a UDP "connect" only picks a route; nothing is sent
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect(probe)
                ip = s.getsockname()[0]
        except OSError:
            continue
        if not _is_loopback(ip):
            return ip
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
            ip = info[4][0]
            if not _is_loopback(ip):
                return ip
    except OSError:
        pass
    return "127.0.0.1"


def _is_loopback(ip: str) -> bool:
    return ip.startswith("127.") or ip in ("::1", "0.0.0.0", "::")


def declared_port(description: str) -> int:
    """The port an endpoint string names (``tcp:8080``, ``ssl:port=443:...``), 0 if none.

    Used until the listener is bound; ``tcp:0`` is only known after listening.
    """
    kind, _, rest = description.partition(":")
    if kind not in ("tcp", "tcp6", "ssl", "ssl6", "le", "lets"):
        return 0
    positional = []
    for part in rest.split(":"):
        if "=" in part:
            key, _, value = part.partition("=")
            if key == "port" and value.isdigit():
                return int(value)
        else:
            positional.append(part)
    if positional and positional[0].isdigit():
        return int(positional[0])
    return 0


def with_backlog(description: str, backlog: int) -> str:
    """``description`` with ``backlog=<backlog>`` added to a TCP/TLS endpoint that sets none.

    Twisted listens with a backlog of 50: a reconnect storm (thousands of
    clients of a dead gateway arriving at once) overflows it and clients
    wait for SYN retransmits.
    """
    kind = description.partition(":")[0]
    if kind not in ("tcp", "tcp6", "ssl", "ssl6") or "backlog=" in description:
        return description
    return f"{description}:backlog={backlog}"


def default_factories() -> dict[str, Callable[[Any], Any]]:
    """The listening factory maker of each transport (each takes the hub)."""
    from imcluster.gateway.rawsocket import make_rawsocket_factory
    from imcluster.gateway.stream import make_stream_factory
    from imcluster.gateway.websocket import make_websocket_factory

    return {"ws": make_websocket_factory, "tcp": make_rawsocket_factory, "stream": make_stream_factory}


class TransportListener(ListenerService):
    """One ``--ws`` / ``--tcp`` endpoint of the gateway: a listener that knows its transport.

    ``kind`` is the transport (``"ws"``, ``"tcp"``), ``configured`` the
    endpoint as configured; it listens with a large backlog
    (:func:`with_backlog`).
    """

    def __init__(self, kind: str, description: str, factory: Any, backlog: int,
                 reactor: Any = None) -> None:
        super().__init__(with_backlog(description, backlog), factory, reactor)
        self.kind = kind
        self.configured = description
        self.setName(f"{kind} {description}")


#: seconds subtracted from the time a loss began, in a re-sync's ``since``: the
#: processors' clocks (and PostgreSQL's) may differ a little from the gateway's
RESYNC_MARGIN = 10.0


def _chunks(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def check_revoked(not_before: Any, identity: Any) -> Any:
    """Fail with :class:`~imcluster.auth.TokenRevoked` when ``identity``'s token falls under ``not_before``."""
    if is_revoked(getattr(identity, "claims", None), not_before):
        raise TokenRevoked()
    return None


# --- Redis writes of connection entries -----------------------------------------


class ConnectionWriter:
    """Gathers the ``UCIR`` / ``WSCONNS`` changes of one reactor turn into pipelines.

    An ``add`` fires when Redis has the entry (or fails with Redis' error);
    a ``remove`` is fire-and-forget: a failed one is kept and sent again by
    :meth:`retry_failed` (the heartbeat calls it). An add and a remove of the
    same entry in one turn cancel out. Everything queued before
    :meth:`flush` is written before anything queued after it (one Redis
    connection answers in order).
    """

    log = Logger()

    def __init__(self, registry: Any, server_id: str, clock: Any, batch: int,
                 still_live: Callable[[tuple], bool],
                 changed: Callable[[list[str]], Any] | None = None) -> None:
        self.registry = registry
        #: called with the users of each flush, once its writes are sent (presence: Tracker.reconcile)
        self.changed = changed
        self.server_id = server_id
        self.clock = clock
        self.batch = batch
        self.still_live = still_live  # (user, ip, port) -> True while that connection is authenticated here
        # (user, ip, port) -> (meta, [waiters])
        self._adds: dict[tuple, tuple[dict, list[defer.Deferred]]] = {}
        self._removes: dict[tuple, None] = {}
        self._failed: dict[tuple, None] = {}
        self._call: Any = None
        self._in_flight: set[defer.Deferred] = set()

    def add(self, user_id: str, ip: str, port: int, meta: dict) -> defer.Deferred:
        """Write one connection entry (HSET + SADD) with the others of this turn."""
        key = (user_id, ip, port)
        self._removes.pop(key, None)
        self._failed.pop(key, None)
        d = defer.Deferred()
        previous = self._adds.get(key)
        waiters = previous[1] if previous else []
        waiters.append(d)
        self._adds[key] = (meta, waiters)  # the latest meta wins
        self._schedule()
        return d

    def remove(self, user_id: str, ip: str, port: int) -> None:
        """Remove one connection entry (HDEL + SREM) with the others of this turn."""
        key = (user_id, ip, port)
        pending = self._adds.pop(key, None)
        if pending is not None:
            # never written: nothing to remove; whoever waited for it is done
            for d in pending[1]:
                d.callback(None)
            return
        self._removes[key] = None
        self._schedule()

    def retry_failed(self) -> None:
        """Queue again the removes that failed (Redis was down), unless the entry is live again."""
        failed, self._failed = self._failed, {}
        for key in failed:
            if not self.still_live(key):
                self.remove(*key)

    def forget_failed(self) -> None:
        """Drop failed removes (Redis was wiped: there is nothing left to remove)."""
        self._failed.clear()

    def _schedule(self) -> None:
        if self._call is None:
            self._call = self.clock.callLater(0, self.flush)

    def flush(self) -> None:
        """Send everything queued now: removes and adds, ``batch`` entries a pipeline."""
        if self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None
        removes, self._removes = list(self._removes), {}
        adds, self._adds = list(self._adds.items()), {}
        for chunk in _chunks(removes, self.batch):
            d = self.registry.remove_connections(self.server_id, chunk)
            d.addErrback(self._remove_failed, chunk)
            self._track(d)
        # the revocation check rides in the registration pipeline (no round trip of its own)
        add = getattr(self.registry, "add_connections_checked", None) or self.registry.add_connections
        for chunk in _chunks(adds, self.batch):
            entries = [(u, ip, port, meta) for (u, ip, port), (meta, _) in chunk]
            d = add(self.server_id, entries)
            d.addBoth(self._added, [(u, w) for (u, _, _), (_, ws) in chunk for w in ws])
            self._track(d)
        if self.changed is not None and (removes or adds):
            # sent behind the writes on the same Redis connection: Redis runs it after them
            self.changed(list(dict.fromkeys([k[0] for k in removes] + [k[0] for k, _ in adds])))

    def _track(self, d: defer.Deferred) -> None:
        self._in_flight.add(d)
        d.addBoth(lambda r: (self._in_flight.discard(d), r)[1])

    def _added(self, result: Any, waiters: list[tuple[str, defer.Deferred]]) -> None:
        # each add fires with its user's revocation (notBefore ms, or None)
        revoked = result if isinstance(result, dict) else {}
        for user_id, w in waiters:
            if isinstance(result, Failure):
                w.errback(result)
            else:
                w.callback(revoked.get(user_id))
        if isinstance(result, Failure):
            self.log.warn("writing {n} connection entries failed: {err}",
                          n=len(waiters), err=result.getErrorMessage())

    def _remove_failed(self, f: Failure, chunk: list[tuple]) -> None:
        self.log.warn("removing {n} connection entries failed ({err}); retried on the next heartbeat",
                      n=len(chunk), err=f.getErrorMessage())
        for key in chunk:
            self._failed[key] = None

    def drain(self) -> defer.Deferred:
        """Flush, then fire when every write sent so far has an answer."""
        self.flush()
        return defer.DeferredList(list(self._in_flight), consumeErrors=True)


# --- the hub ------------------------------------------------------------------------


class GatewayService(AsyncMultiService):
    """One gateway: the hub of its client connections (see the module docstring).

    ``registry`` provides IRegistry (``RedisService``), ``bus`` IMessageBus
    (``AMQPService``), ``authenticator`` IAuthenticator. ``factories`` maps
    ``"ws"`` / ``"tcp"`` to a callable building the listening factory from
    the hub (default: :func:`default_factories`).

    Its children, started once the gateway is registered and consuming its
    queue, and stopped in reverse before the goodbye::

        GuardedLoop "heartbeat"            refreshes WSSERVER_<uuid> every --heartbeat s
        TransportListener "ws <endpoint>"  one per --ws endpoint ...
        TransportListener "tcp <endpoint>" ... per --tcp endpoint ...
        TransportListener "stream <endpoint>" ... and per --stream endpoint: they stop first
    """

    log = Logger()

    def __init__(self, config: Any, registry: Any, bus: Any, authenticator: Any,
                 reactor: Any = None, factories: dict[str, Callable[[Any], Any]] | None = None,
                 name: str = "gateway") -> None:
        if reactor is None:
            from twisted.internet import reactor
        super().__init__(name)
        self.config = config
        self.registry = registry
        self.bus = bus
        self.authenticator = authenticator
        self.reactor = reactor
        self.clock = reactor
        self.factories = factories
        self.server_id: str | None = None
        self.accepting = False
        self.connections = ConnectionRegistry()
        self.info: dict | None = None
        self._stopping = False
        self._writer: ConnectionWriter | None = None
        self._publisher: envelope.Publisher | None = None
        self._listening_reconnects = False
        self._resync_running = False
        self._resync_again = False
        self._needs_resync = False
        self._retries: dict[defer.Deferred, tuple[Any, str | None]] = {}  # done -> (DelayedCall, owner)
        #: the current pass of resync_connections; a newer pass supersedes an older one
        self._conn_resync_generation = 0
        self._conn_resync_call: Any = None
        self._conn_resync_since: float | None = None
        self.conn_resyncs = 0  # passes started (tests, operators' logs)
        #: last time Redis was seen holding our entries (clock seconds), and the
        #: earliest time they may have been lost since, while a re-registration is due
        self._redis_ok_at: float | None = None
        self._redis_lost_since: float | None = None
        self._all_closed: defer.Deferred | None = None
        #: client sockets open on every listener, handshakes included (max_connections)
        self.open_sockets = 0
        self._refused_sockets = 0
        self._refusal_logged_at: float | None = None
        # a timer that survives a failing refresh (a TimerService would stop for good)
        self._heartbeat = GuardedLoop(config.heartbeat, self.heartbeat, "heartbeat", clock=self.clock, now=False)
        self._heartbeat.setServiceParent(self)
        self._listeners: list[TransportListener] = []
        self._add_listeners(factories if factories is not None else default_factories())
        # typing and live presence (imcluster/gateway/presence.py, imcluster/presence.py)
        self.tracker = Tracker(registry, bus, config, clock=self.clock, batch=config.redis_batch)
        self.typing = TypingGate(config.typing_interval, self.clock)
        self.presence = PresenceHub(config, self.tracker, self.clock,
                                    lambda on_message: subscriber_for(registry, on_message, self.clock))
        self.presence.on_reconnect = self._presence_reconnected
        self._reconcile_later: set[str] = set()
        self._local = {client_protocol.PRESENCE_SUBSCRIBE: self.presence.subscribe,
                       client_protocol.PRESENCE_UNSUBSCRIBE: self.presence.unsubscribe}

    def _add_listeners(self, factories: dict[str, Callable[[Any], Any]]) -> None:
        """One child per configured endpoint; one factory per transport, shared by its endpoints.

        A transport missing from ``factories`` is not listened on.
        """
        for kind, _ in TRANSPORTS:
            descriptions = getattr(self.config, kind, None) or []
            if not descriptions or kind not in factories:
                continue
            factory = factories[kind](self)
            for description in descriptions:
                listener = TransportListener(kind, description, factory, self.config.listen_backlog,
                                             self.reactor)
                if self.namedServices.get(listener.name) is not None:
                    # the same endpoint twice (tcp:0): names must be unique among children
                    listener.setName(f"{listener.name} #{len(self._listeners) + 1}")
                listener.setServiceParent(self)
                self._listeners.append(listener)

    # --- lifecycle

    @defer.inlineCallbacks
    def startService(self):  # noqa: N802 (Twisted API)
        """Flow 1: register in Redis, consume the gateway queue, then start the heartbeat and the listeners."""
        service.Service.startService(self)
        c = self.config
        self._stopping = False
        self.server_id = str(uuid_module.uuid4())
        self._writer = ConnectionWriter(self.registry, self.server_id, self.clock, c.redis_batch,
                                        self._entry_live, changed=self._reconcile)
        self._publisher = envelope.Publisher(self.bus, self.bus.server_key(), self.clock, c.publish_batch)
        self.info = server_info(
            advertise_address(c.advertise),
            declared_port(c.ws[0]) if c.ws else 0,
            declared_port(c.tcp[0]) if c.tcp else 0,
            int(self.clock.seconds()))
        self.log.info("gateway {uuid} starting: registering in Redis", uuid=self.server_id)
        # subscribed to WSALIVE##<uuid> before registering: processors judge liveness by it
        yield self.presence.start(self.server_id)
        yield self.tracker.start()
        yield self.registry.register_server(self.server_id, self.info, c.server_ttl)
        self._redis_ok_at = self.clock.seconds()
        if not self._listening_reconnects:
            self._listening_reconnects = True
            self.registry.add_reconnect_listener(self._redis_reconnected)
        queue = self.bus.gateway_queue(self.server_id)
        consumer = yield self.bus.consume(queue, self._on_delivery, prefetch=c.prefetch, exclusive=True)
        self._watch_queue(consumer)
        self.log.info("gateway {uuid} consuming its queue; opening listeners", uuid=self.server_id)
        self.accepting = True
        try:
            yield self.start_children()
        except Exception:
            # a gateway that cannot listen keeps no heartbeat nor half of its ports
            self.accepting = False
            yield self.stop_children()
            raise
        # with tcp:0 the ports are only known now
        bound = {field: self.port_of(kind) for kind, field in TRANSPORTS if field}
        if any(bound[k] != self.info[k] for k in bound):
            self.info = dict(self.info, **bound)
            yield self.registry.register_server(self.server_id, self.info, c.server_ttl)
        self.log.info("gateway {uuid} up: ws {ws} tcp {tcp} stream {stream} advertised as {ip}",
                      uuid=self.server_id, ws=self._bound("ws"), tcp=self._bound("tcp"),
                      stream=self._bound("stream"), ip=self.info["ip"])

    @property
    def ports(self) -> list[tuple[str, str, Any]]:
        """``(kind, configured endpoint, IListeningPort)`` of every bound listener, in order."""
        return [(lst.kind, lst.configured, lst.port) for lst in self._listeners if lst.port is not None]

    def port_of(self, kind: str) -> int:
        """The first bound port of the ``"ws"`` or ``"tcp"`` listeners (0 when none)."""
        for k, _, port in self.ports:
            if k == kind:
                return getattr(port.getHost(), "port", 0) or 0
        return 0

    def _bound(self, kind: str) -> list[str]:
        return [str(p.getHost()) for k, _, p in self.ports if k == kind]

    @defer.inlineCallbacks
    def stopService(self):  # noqa: N802
        """Flow 8: stop listening, say "going away", remove our Redis entries, drain publishes.

        The AMQP and Redis services stop after this one (they are earlier
        children of the daemon tree).
        """
        service.Service.stopService(self)
        self.accepting = False
        self._stopping = True
        c = self.config
        # the children stop in reverse: the listeners first (no new clients), then
        # the heartbeat, whose in-flight refresh must land before the cleanup, not
        # re-create the key after it
        yield self.stop_children()
        self._cancel_retries()
        self._conn_resync_generation += 1
        if self._conn_resync_call is not None and self._conn_resync_call.active():
            self._conn_resync_call.cancel()
        conns = list(self.connections)
        users = list(dict.fromkeys(u for u, _ in self.connections.authenticated()))
        self.log.info("gateway {uuid} stopping: {n} clients going away", uuid=self.server_id, n=len(conns))
        for conn in conns:
            try:
                conn.going_away()
            except Exception:
                self.log.failure("going_away failed on {conn}", conn=conn.conn_id)
        closed = self._wait_all_closed()
        if self.server_id is not None and self._writer is not None:
            # queued writes go first, so none of them lands after the cleanup
            self._writer.flush()
            try:
                removed = yield self.registry.unregister_server(self.server_id)
                self.log.info("gateway {uuid}: removed its Redis entries ({n} connections)",
                              uuid=self.server_id, n=removed)
            except Exception as e:
                self.log.error("gateway {uuid}: could not remove its Redis entries ({err}); "
                               "the reaper removes them once WSSERVER_ expires",
                               uuid=self.server_id, err=e)
            try:
                # its users without a connection elsewhere are offline now (presence frames, user.offline)
                yield self.tracker.reconcile(users)
            except Exception as e:
                self.log.warn("gateway {uuid}: presence of its {n} users not checked at exit ({err}); "
                              "their next login or logout corrects it", uuid=self.server_id, n=len(users), err=e)
        try:
            yield self._with_timeout(closed, c.goodbye_timeout, "clients closing")
        except TimeoutError:
            self.log.warn("{n} clients still open after {t}s; dropping them",
                          n=len(self.connections), t=c.goodbye_timeout)
        finally:
            self._all_closed = None
        try:
            yield self.presence.stop()
            yield self.tracker.stop()
        except Exception as e:
            self.log.warn("gateway {uuid}: stopping presence: {err}", uuid=self.server_id, err=e)
        if self._publisher is not None:
            yield self._publisher.drain()
        self.connections.clear()

    def _wait_all_closed(self) -> defer.Deferred:
        if len(self.connections) == 0:
            return defer.succeed(None)
        self._all_closed = defer.Deferred()
        return self._all_closed

    def _with_timeout(self, d: defer.Deferred, seconds: float, what: str) -> defer.Deferred:
        return with_timeout(d, seconds, self.clock, what)

    # --- heartbeat and re-registration

    def heartbeat(self) -> defer.Deferred:
        """Refresh ``WSSERVER_<uuid>``; if Redis had lost it, write everything of ours again."""
        d = self.registry.refresh_server(self.server_id, self.info, self.config.server_ttl)

        checked_at = self.clock.seconds()

        def refreshed(existed: bool) -> Any:
            if existed and not self._needs_resync:
                self._redis_ok_at = checked_at
            if not existed:
                self._redis_lost(self._redis_ok_at)
                self.log.warn("gateway {uuid}: WSSERVER_ key was gone (Redis lost its data?); "
                              "re-registering {n} connections",
                              uuid=self.server_id, n=self.connections.count(authenticated=True))
                self._needs_resync = True
                self._writer.forget_failed()
            if self._needs_resync:
                return self.resync()
            self._writer.retry_failed()
            if self._reconcile_later:
                users, self._reconcile_later = list(self._reconcile_later), set()
                self._reconcile(users)
            return None

        return d.addCallback(refreshed)

    def _redis_reconnected(self) -> Any:
        if not self.running or self._stopping or self.server_id is None:
            return None
        self.log.info("gateway {uuid}: Redis reconnected; re-registering", uuid=self.server_id)
        self._redis_lost(self._redis_ok_at)
        self._needs_resync = True
        return self.resync()

    @defer.inlineCallbacks
    def resync(self):
        """Write ``WSSERVER_<uuid>``, ``WSSERVERS`` and every live connection entry again.

        Batches of ``redis_batch`` connections, one pipeline each, one after
        the other. A second call while one runs makes it run once more.
        Until one whole pass succeeds, every heartbeat tries again.
        """
        if self._resync_running:
            self._resync_again = True
            return
        self._resync_running = True
        try:
            while True:
                if self._stopping:
                    return  # the cleanup must not be undone
                self._resync_again = False
                yield self.registry.register_server(self.server_id, self.info, self.config.server_ttl)
                snapshot = list(self.connections.authenticated())
                written = 0
                for chunk in _chunks(snapshot, self.config.redis_batch):
                    if self._stopping:
                        return
                    # built when sent: a connection gone meanwhile has had its
                    # remove queued already and must not be written back
                    entries = [(u, conn.ip, conn.port, self.connections.meta_of(conn))
                               for u, conn in chunk if self.connections.user_of(conn) == u]
                    if entries:
                        yield self.registry.add_connections(self.server_id, entries)
                        written += len(entries)
                        self._reconcile([e[0] for e in entries])
                if not self._resync_again:
                    self._needs_resync = False
                    self.log.info("gateway {uuid}: re-registered with {n} connections",
                                  uuid=self.server_id, n=written)
                    # routed while our entries were missing: lost; only now does routing see them again
                    since, self._redis_lost_since = self._redis_lost_since, None
                    self._redis_ok_at = self.clock.seconds()
                    self.resync_connections("re-registered in Redis", since)
                    return
        finally:
            self._resync_running = False

    # --- presence: transitions of this gateway's users

    def _reconcile(self, users: list[str]) -> None:
        """Detect (and publish) the presence transitions of ``users`` after their entries changed.

        A failure (Redis down) is tried again on the next heartbeat: the state
        must not stay behind the entries.
        """
        if not users:
            return

        def failed(f: Failure) -> None:
            self._reconcile_later.update(users)
            self.log.warn("presence of {n} users not checked ({err}); again on the next heartbeat",
                          n=len(users), err=f.getErrorMessage())

        self.tracker.reconcile(users).addErrback(failed)

    def _presence_reconnected(self) -> Any:
        """The presence connection was lost: a processor may have reaped us meanwhile; check at once."""
        if not self.running or self._stopping or self.server_id is None:
            return None
        return self.heartbeat()

    # --- healing: sync every connection again after a loss

    def _redis_lost(self, since: float | None) -> None:
        """Our Redis entries may have been lost at any time after ``since`` (None: unknown)."""
        if since is None:
            since = self.clock.seconds()
        if self._redis_lost_since is None or since < self._redis_lost_since:
            self._redis_lost_since = since

    def _watch_queue(self, consumer: Any) -> None:
        add = getattr(consumer, "add_restart_listener", None)
        if add is not None:
            add(self._queue_declared_again)

    def _queue_declared_again(self, down_since: float | None = None) -> None:
        if not self.running or self._stopping:
            return
        self.log.warn("gateway {uuid}: its queue was declared again (new AMQP connection or channel); "
                      "deliveries routed meanwhile were lost", uuid=self.server_id)
        self.resync_connections("queue declared again", down_since)

    def resync_connections(self, why: str, since: float | None = None) -> int:
        """Ask the processors to sync every authenticated connection again; returns how many.

        One ``sync`` item per connection, marked ``"resync": true`` and, when
        the loss began at a known time, ``"since"``: milliseconds since the
        epoch, :data:`RESYNC_MARGIN` earlier than ``since`` (clock seconds).
        A processor that honours ``since`` sends the connection every message
        of its user's sessions stored from then on, delivered or not (another
        device of the same user may have acknowledged what this connection
        never got); one that does not sends the undelivered ones, as after
        ``auth``. Published with the others of the reactor turn,
        ``publish_batch`` connections a turn and at most ``resync_rate`` a
        second; each request is retried while its connection lives (like the
        sync after ``auth``). A newer pass (another loss meanwhile)
        supersedes this one: it covers every connection again, from the
        earlier of the two ``since``.
        """
        if self._stopping or self._publisher is None:
            return 0
        pending = self._conn_resync_since
        if self._conn_resync_call is not None and pending is not None and since is not None:
            since = min(since, pending)  # the pass being superseded had not covered everyone
        elif self._conn_resync_call is not None and since is not None:
            since = None  # the older pass did not know when its loss began: neither do we
        self._conn_resync_since = since
        since_ms = None if since is None else int((since - RESYNC_MARGIN) * 1000)
        self._conn_resync_generation += 1
        generation = self._conn_resync_generation
        if self._conn_resync_call is not None and self._conn_resync_call.active():
            self._conn_resync_call.cancel()
        self._conn_resync_call = None
        snapshot = [conn for _, conn in self.connections.authenticated()]
        self.conn_resyncs += 1
        metrics.RESYNCS.inc(len(snapshot))
        self.log.info("gateway {uuid}: {why}; asking the processors to sync {n} connections again",
                      uuid=self.server_id, why=why, n=len(snapshot))
        batch = max(1, min(self.config.publish_batch, int(self.config.resync_rate) or 1))
        pause = batch / self.config.resync_rate

        def send(start: int) -> None:
            self._conn_resync_call = None
            if generation != self._conn_resync_generation or self._stopping:
                return
            for conn in snapshot[start:start + batch]:
                user_id = self.connections.user_of(conn)
                if user_id is None:
                    continue  # gone meanwhile (or no longer authenticated)
                item = envelope.sync_item(user_id, self.server_id, conn.conn_id,
                                          int(self.clock.seconds() * 1000), resync=True, since=since_ms)
                # a newer pass asks again for everyone: this request is then no longer wanted
                self._publish_retrying(item, lambda conn=conn: generation == self._conn_resync_generation
                                       and self.connections.user_of(conn) is not None, owner=conn.conn_id)
            if start + batch < len(snapshot):
                self._conn_resync_call = self.clock.callLater(pause, send, start + batch)
            else:
                self._conn_resync_since = None

        send(0)
        return len(snapshot)

    def _entry_live(self, key: tuple) -> bool:
        user_id, ip, port = key
        conn = self.connections.get(f"{self.server_id}##{ip}##{port}")
        return conn is not None and self.connections.user_of(conn) == user_id

    # --- socket slots (called by the transport adapters, before there is an engine)

    #: seconds between two log lines about sockets refused over max_connections
    REFUSAL_LOG_INTERVAL = 10.0

    def socket_opened(self) -> bool:
        """A listener accepted a client socket: take one of ``max_connections`` slots.

        Called before the socket is read (before any WebSocket handshake), so
        a gateway at its cap spends nothing on a newcomer: False tells the
        adapter to close it at once. Counted in ``imcluster_closes_total``
        (reason ``max_connections``) and logged at most every
        :data:`REFUSAL_LOG_INTERVAL` seconds. Every True is matched by one
        :meth:`socket_closed`.
        """
        if self.open_sockets < self.config.max_connections:
            self.open_sockets += 1
            return True
        metrics.CLOSES.labels(reason="max_connections").inc()
        self._refused_sockets += 1
        now = self.clock.seconds()
        if self._refusal_logged_at is None or now - self._refusal_logged_at >= self.REFUSAL_LOG_INTERVAL:
            self.log.warn("refused {n} new sockets: {limit} open is max_connections",
                          n=self._refused_sockets, limit=self.config.max_connections)
            self._refused_sockets = 0
            self._refusal_logged_at = now
        return False

    def socket_closed(self) -> None:
        """A socket that :meth:`socket_opened` admitted is gone."""
        self.open_sockets -= 1

    # --- the hub interface (called by the connection engine)

    def connection_made(self, conn: Any) -> bool:
        """Flow 2: enter ``conn`` in the unauthenticated map; False refuses it.

        ``max_connections`` is not checked here: every transport took a slot
        (:meth:`socket_opened`) before the engine existed.
        """
        if not self.accepting:
            return False
        return self.connections.add(conn)

    def authenticated(self, conn: Any, identity: Any, refresh: bool = False) -> defer.Deferred:
        """Flow 3: move ``conn`` to ``identity``'s user and record it in Redis.

        Fires once Redis has the entry (pipelined with the other auths of
        this turn). When Redis fails, a first auth is undone (the connection
        is unauthenticated again) and the Deferred fails.
        """
        if self._stopping:
            return defer.fail(GatewayStopping("the gateway is stopping"))
        if conn not in self.connections:
            return defer.succeed(None)  # it went away meanwhile: nothing to record
        user_id = identity.user_id
        meta = conn_meta(getattr(conn, "device", None), int(self.clock.seconds()), identity.exp)
        previous = self.connections.authenticate(conn, user_id, meta)
        if previous is not None and previous != user_id:
            self._writer.remove(previous, conn.ip, conn.port)
        d = self._writer.add(user_id, conn.ip, conn.port, meta)
        d.addCallback(check_revoked, identity)
        if refresh and previous == user_id:
            return d

        def failed(f: Failure) -> Failure:
            if self.connections.user_of(conn) == user_id:
                self.connections.deauthenticate(conn)
                # the write may have landed before the timeout: take it back
                if not self._stopping:
                    self._writer.remove(user_id, conn.ip, conn.port)
            return f

        return d.addErrback(failed)

    def control(self, ctl: Any) -> int:
        """An operator's kick or revoke (:class:`imcluster.envelope.Control`) for a user of this gateway.

        Closes that user's connections here (a revoke: those whose token was
        issued before ``notBefore``); returns how many.
        """
        from imcluster.gateway import transport as closes

        n = 0
        for conn in list(self.connections.of_user(ctl.user_id).values()):
            if ctl.action == envelope.REVOKE:
                if not is_revoked(getattr(conn.identity, "claims", None), ctl.not_before):
                    continue
                reason = closes.TOKEN_REVOKED
            else:
                reason = closes.KICKED
            conn.kick(reason)
            n += 1
        self.log.info("gateway {uuid}: {action} of {user} closed {n} connections",
                      uuid=self.server_id, action=ctl.action, user=ctl.user_id, n=n)
        return n

    def request_sync(self, conn: Any) -> defer.Deferred:
        """Ask the processors for ``conn``'s undelivered messages (a ``sync`` item).

        Retried while the connection lives (see :meth:`_publish_retrying`):
        a sync request is never dropped. Fires once published (None also when
        the connection went away first).
        """
        user_id = self.connections.user_of(conn)
        if user_id is None:
            return defer.succeed(None)
        return self._publish_retrying(
            self._item(envelope.SYNC, user_id, conn), lambda: self.connections.user_of(conn) is not None,
            owner=conn.conn_id)

    def forward(self, conn: Any, frame: dict) -> defer.Deferred:
        """Flow 4: publish a client frame to the processors, coalesced with others.

        Fires on the broker's confirm; fails with the bus' ``PublishError``
        (``Unavailable``, ``Nacked``) within ``publish_timeout``, and the client
        is told ``unavailable``. Acknowledgements (``message_send_reply``) are
        the exception: ARCHITECTURE.md's failure rules say they are never
        dropped, so they are retried until published (or the gateway stops);
        the client sees no error for them.
        """
        frame_type = frame.get("type")
        local = self._local.get(frame_type)
        if local is not None:
            # presence: answered here, never forwarded (imcluster/gateway/presence.py)
            return local(conn, frame)
        if frame_type == client_protocol.TYPING and not self.typing.allow(conn, frame["sessionId"]):
            return defer.succeed(None)  # PROTOCOL.md: more than one a second is dropped silently
        user_id = self.connections.user_of(conn) or getattr(conn, "user_id", None)
        item = self._item(envelope.FRAME, user_id, conn, frame)
        if frame_type == "message_send_reply":
            return self._publish_retrying(item, lambda: True)
        return self._publisher.submit(item)

    def _publish_retrying(self, item: envelope.Item, wanted: Callable[[], bool],
                          owner: str | None = None) -> defer.Deferred:
        """Publish ``item``; after a failure, retry with backoff while ``wanted()``.

        Backoff runs from ``retry_delay`` to ``retry_max_delay``. The
        Deferred fires (None) once published, or when ``wanted()`` turns
        false, the connection ``owner`` (a connId) goes away, or the gateway
        stops; it never fails.
        """
        done: defer.Deferred = defer.Deferred()

        def attempt(delay: float) -> None:
            self._retries.pop(done, None)
            if self._stopping or not wanted():
                done.callback(None)
                return

            def failed(f: Failure) -> None:
                if self._stopping or not wanted():
                    done.callback(None)
                    return
                self.log.warn("{kind} for {conn} not published ({err}); retrying in {delay}s",
                              kind=item.type or item.kind, conn=item.conn_id,
                              err=f.getErrorMessage(), delay=delay)
                next_delay = min(delay * 2, self.config.retry_max_delay)
                self._retries[done] = (self.clock.callLater(delay, attempt, next_delay), owner)

            self._publisher.submit(item).addCallbacks(lambda _: done.callback(None), failed)

        attempt(self.config.retry_delay)
        return done

    def _cancel_retries(self, owner: str | None = None) -> None:
        """Give up retried publishes: all of them, or those of connection ``owner``."""
        cancelled = [(done, call) for done, (call, o) in self._retries.items()
                     if owner is None or o == owner]
        for done, call in cancelled:
            del self._retries[done]
            if call.active():
                call.cancel()
            if not done.called:
                done.callback(None)

    def _item(self, kind: str, user_id: str, conn: Any, frame: dict | None = None) -> envelope.Item:
        return envelope.Item(kind, user_id, self.server_id, conn.conn_id, int(self.clock.seconds() * 1000), frame)

    def connection_lost(self, conn: Any) -> None:
        """Flow 7: forget ``conn`` and remove its Redis entry (pipelined with others)."""
        self._cancel_retries(owner=conn.conn_id)
        self.presence.connection_lost(conn)
        self.typing.forget(conn)
        user_id = self.connections.remove(conn)
        if user_id is not None and not self._stopping:
            # while stopping, unregister_server removes every entry at once
            self._writer.remove(user_id, conn.ip, conn.port)
        if self._all_closed is not None and len(self.connections) == 0:
            d, self._all_closed = self._all_closed, None
            if not d.called:
                d.callback(None)

    # --- flow 6: deliveries from the processors

    def _on_delivery(self, message: Any) -> None:
        """Write one AMQP message's deliveries to the named connections, in order, then ack.

        Body: ``{"v":1,"items":[{"connIds":[...],"frames":[...]}, ...]}``
        (:func:`imcluster.envelope.parse_deliveries`). Each frame is
        serialised once for all its connections. A malformed message (or
        item) is logged and acknowledged: retrying cannot fix it.
        """
        try:
            self._deliver(message.body)
        except Exception:
            self.log.failure("delivery failed; acknowledging it anyway")
        finally:
            message.ack()

    def _deliver(self, body: bytes) -> None:
        try:
            deliveries = envelope.parse_deliveries(body)
        except envelope.MalformedBatch as e:
            self.log.warn("malformed delivery ({err}); dropped: {body!r:.200}", err=e, body=body)
            return
        get = self.connections.get
        for delivery in deliveries:
            if isinstance(delivery, envelope.Control):
                self.control(delivery)
                continue
            targets = [conn for conn in (get(cid) for cid in delivery.conn_ids) if conn is not None]
            if not targets:
                continue
            encoded = [encode_bytes(frame) for frame in delivery.frames]
            for conn in targets:
                try:
                    for text in encoded:
                        conn.send_encoded(text)
                except Exception:
                    # one broken connection must not cost the others their delivery
                    self.log.failure("writing a delivery to {conn} failed", conn=conn.conn_id)

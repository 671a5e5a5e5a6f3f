"""The message bus: RabbitMQ through pika's Twisted adapter.

Names (ARCHITECTURE.md), all derived from the namespace ``<ns>``:

``<ns>.exchange``
    topic exchange, durable: every publish goes here.
``<ns>.processor``
    durable queue bound to ``<ns>.server``, dead-lettering to ``<ns>.dlx``;
    every processor consumes it. Every service declares it on connect, so
    frames that gateways publish before any processor ever ran are kept.
    A quorum queue with ``--queue-type quorum`` (:func:`queue_arguments`
    builds the arguments of every shared queue), so that it outlives a
    RabbitMQ node.
``<ns>.gateway.<uuid>``
    exclusive, auto-delete queue bound to ``<ns>.wsserver.<uuid>``.
``<ns>.dlx`` / ``<ns>.dead``
    fanout exchange and durable queue (quorum with ``--queue-type quorum``)
    holding dead-lettered messages.

``--amqp`` may name several nodes of one RabbitMQ cluster: the service
connects to one and moves on to the next when it goes (:class:`AMQPService`).

:class:`AMQPService` keeps one connection under a ``ClientService``
(exponential backoff). pika does not reconnect by itself, so on every new
connection the service opens a publishing channel (publisher confirms),
declares the topology again and restarts every consumer registered with
:meth:`AMQPService.consume`, each on its own channel so that a consumer's
channel error never stops publishing.

Publishes are pipelined: each one gets a Deferred that fires on the
broker's confirm. While the broker is unreachable they wait (a bounded
backlog) for the reconnect; publishes that were sent but not confirmed when
a connection died are sent again on the next one (at-least-once). Whatever
is not confirmed within ``publish_timeout`` seconds fails with
:class:`Unavailable`; nothing hangs and nothing is dropped silently.

pika's ``TwistedChannel`` keeps a single slot for a returned message, so a
``mandatory`` publish that comes back while other publishes are in flight
can be reported on the wrong Deferred; it also allocates a DeferredQueue per
consumer. This module therefore drives pika's plain ``Channel`` (through the
connection's ``_impl``), tracks confirms itself and identifies returned
messages by their ``message_id``.
"""

from __future__ import annotations

import collections
import itertools
import os
import random
import re
import socket
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import pika
import pika.exceptions
from pika import spec
from pika.adapters.twisted_connection import TwistedProtocolConnection
from twisted.application import service
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer, error, protocol
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from imcluster import interfaces, metrics
from imcluster.interfaces import IBusMessage, IMessageBus
from imcluster.service import with_timeout


# --- errors ------------------------------------------------------------------


class PublishError(interfaces.Unavailable):
    """A publish was not confirmed by the broker: the bus' "unavailable" error.

    Every kind (no confirm in time, a nack, unroutable) means "not taken
    now, try again": the processors retry the work (``interfaces.Unavailable``).
    """


class Unavailable(PublishError):
    """No confirm arrived within ``publish_timeout`` (broker unreachable, or slow), or the service stopped."""


class Nacked(PublishError):
    """The broker refused the message (basic.nack)."""


class Unroutable(PublishError):
    """A ``mandatory`` publish reached no queue (basic.return)."""


class Refused(Exception):
    """The broker can never take this message (its size, or a 406 that came back): poison, not transient.

    Not an ``interfaces.Unavailable``: retrying it fails the same way
    (ARCHITECTURE.md "Failure rules"). ``TooLarge`` is refused here, before
    it reaches the broker.
    """


class TooLarge(Refused):
    """The body is larger than ``max_publish_bytes``: never sent."""


#: the broker's 406 for a message above its max_message_size names that size
_MAX_SIZE_RE = re.compile(r"max size (\d+)")

#: a publish in flight while the broker closed the publishing channel this many
#: times (channel errors, not lost connections) is refused as poison
REFUSED_AFTER_CLOSES = 3


class ChannelError(interfaces.Unavailable):
    """An AMQP channel closed under an operation (the broker's reply code and text, when it said one).

    Transient to the processors, like a publish error (``interfaces.Unavailable``).
    """

    def __init__(self, reason: Any) -> None:
        self.reply_code = getattr(reason, "reply_code", None)
        self.reply_text = getattr(reason, "reply_text", None)
        #: True for a channel error of the broker (404, 405, 406, 403...), not a lost connection
        self.by_broker = isinstance(reason, pika.exceptions.ChannelClosedByBroker) or bool(
            getattr(reason, "channel_error", False))
        super().__init__(str(reason) if self.reply_code is None
                         else f"{self.reply_code} {self.reply_text}")


# --- names -------------------------------------------------------------------


@dataclass(frozen=True)
class QueueSpec:
    """A queue, how it is declared and the routing key that binds it to ``<ns>.exchange``.

    ``routing_key`` None: the queue is not bound to ``<ns>.exchange`` (the
    dead-letter queue is bound to ``<ns>.dlx`` instead).
    """

    name: str
    routing_key: str | None
    durable: bool = True
    exclusive: bool = False
    auto_delete: bool = False
    arguments: dict = field(default_factory=dict)
    exchange: str | None = None  # None: <ns>.exchange


#: ``--queue-type``: how the shared durable queues are declared (a queue's type never changes once it exists)
QUEUE_TYPES = ("classic", "quorum")


def queue_arguments(config: Any = None, single_active: bool = False, **arguments: Any) -> dict:
    """The ``x-``arguments of a shared durable queue: ``<ns>.processor``, ``<ns>.webhooks``, ``<ns>.push``, ``<ns>.dead``.

    ``config`` is a Config (its ``queue_type``), a queue type (``"classic"``
    or ``"quorum"``) or None (classic); ``arguments`` are the queue's own
    (e.g. ``{"x-dead-letter-exchange": ...}`` as ``**{...}``). Every daemon
    that declares one of these queues must build its arguments here: RabbitMQ
    refuses (406 PRECONDITION_FAILED, channel closed) a declare whose
    arguments differ from the queue's.

    ``quorum`` adds ``x-queue-type: quorum`` (a Raft-replicated queue on every
    node of a RabbitMQ cluster: it survives the loss of a minority of nodes).
    RabbitMQ's rules for quorum queues, which the callers here keep: durable,
    never exclusive nor auto-delete (gateway queues stay classic), no
    ``global`` basic.qos (a per-consumer prefetch is fine), dead-lettering
    through ``x-dead-letter-exchange`` works, and a redelivered message
    carries ``x-delivery-count``. No ``x-delivery-limit`` is set: the
    processors isolate poison themselves (``poison_after``, dead-lettered to
    ``<ns>.dead``), and a limit would dead-letter sound messages whose
    processors crashed a few times. ``classic`` adds nothing, so queues
    declared before this option existed stay equivalent.

    ``single_active``: the queue is consumed by one consumer at a time (the
    webhook sender). On a classic queue an exclusive consumer does that; a
    quorum queue does not enforce exclusive consumers (RabbitMQ 3.10, seen
    here: a second consumer was accepted and got half the messages), so a
    quorum queue gets ``x-single-active-consumer`` instead: the broker
    delivers to one consumer and hands over to the next when it goes.
    """
    if config is None or isinstance(config, str):
        queue_type = config or "classic"
    else:
        queue_type = getattr(config, "queue_type", None) or "classic"
    if queue_type not in QUEUE_TYPES:
        raise ValueError(f"queue type must be one of {', '.join(QUEUE_TYPES)}, got {queue_type!r}")
    args = dict(arguments)
    if queue_type == "quorum":
        args["x-queue-type"] = "quorum"
        if single_active:
            args["x-single-active-consumer"] = True
    return args


class BusNames:
    """The AMQP names of one namespace (ARCHITECTURE.md); ``queue_type`` is how its shared queues are declared."""

    def __init__(self, namespace: str, queue_type: str = "classic") -> None:
        self.namespace = namespace
        queue_arguments(queue_type)  # a bad type fails here, before anything connects
        self.queue_type = queue_type
        self.exchange = f"{namespace}.exchange"
        self.dlx = f"{namespace}.dlx"
        self.dead = f"{namespace}.dead"

    def server_key(self) -> str:
        """``<ns>.server``: client frames for the processors."""
        return f"{self.namespace}.server"

    def gateway_key(self, uuid: str) -> str:
        """``<ns>.wsserver.<uuid>``: deliveries to one gateway."""
        return f"{self.namespace}.wsserver.{uuid}"

    def processor_queue(self) -> QueueSpec:
        """``<ns>.processor``: durable, bound to ``<ns>.server``, dead-letters to ``<ns>.dlx``."""
        return QueueSpec(f"{self.namespace}.processor", self.server_key(), durable=True,
                         arguments=queue_arguments(self.queue_type, **{"x-dead-letter-exchange": self.dlx}))

    def shared_queue(self, name: str, routing_key: str | None, exchange: str | None = None,
                     single_active: bool = False, **arguments: Any) -> QueueSpec:
        """A durable queue shared by every daemon (``<ns>.webhooks``, ``<ns>.push``...), of ``queue_type``."""
        return QueueSpec(name, routing_key, durable=True, exchange=exchange,
                         arguments=queue_arguments(self.queue_type, single_active, **arguments))

    def gateway_queue(self, uuid: str) -> QueueSpec:
        """``<ns>.gateway.<uuid>``: exclusive, auto-delete, bound to ``<ns>.wsserver.<uuid>``."""
        return QueueSpec(f"{self.namespace}.gateway.{uuid}", self.gateway_key(uuid),
                         durable=False, exclusive=True, auto_delete=True)

    def dead_queue(self) -> QueueSpec:
        """``<ns>.dead``: durable, bound to the fanout ``<ns>.dlx``."""
        return self.shared_queue(self.dead, "", exchange=self.dlx)

    def webhooks_queue(self) -> QueueSpec:
        """``<ns>.webhooks``: durable, bound to ``<ns>.webhooks`` (events for business servers, HTTP-API.md)."""
        # one sender at a time (imcluster.processor.business): an exclusive consumer, or on a
        # quorum queue x-single-active-consumer (queue_arguments)
        return self.shared_queue(f"{self.namespace}.webhooks", f"{self.namespace}.webhooks", single_active=True)

    def push_queue(self) -> QueueSpec:
        """``<ns>.push``: durable, bound to ``<ns>.push`` (offline push requests for ``twistd impush``)."""
        return self.shared_queue(f"{self.namespace}.push", f"{self.namespace}.push")


# --- messages ------------------------------------------------------------------


@implementer(IBusMessage)
class BusMessage:
    """One delivered message; :meth:`ack` or :meth:`nack` it exactly once.

    Settling a message whose channel has died since (a reconnect) does
    nothing: the broker redelivers it. Settling twice does nothing either
    (a second ack would make the broker close the channel).
    """

    __slots__ = ("body", "redelivered", "headers", "routing_key", "delivery_tag",
                 "settled", "_owner", "_channel")

    def __init__(self, body: bytes, redelivered: bool, headers: dict, routing_key: str,
                 delivery_tag: int, owner: Any, channel: Any = None) -> None:
        self.body = body
        self.redelivered = redelivered
        self.headers = headers
        self.routing_key = routing_key
        self.delivery_tag = delivery_tag
        self.settled = False
        self._owner = owner
        self._channel = channel

    def ack(self) -> bool:
        """Acknowledge; True when the ack went to the broker, False when ignored (stale or settled)."""
        if self.settled:
            return False
        self.settled = True
        return self._owner.settle(self, True, False)

    def nack(self, requeue: bool = True) -> bool:
        """Reject: requeued, or dead-lettered (``<ns>.dead`` for the processor queue) when ``requeue`` is False."""
        if self.settled:
            return False
        self.settled = True
        return self._owner.settle(self, False, requeue)

    def __repr__(self) -> str:
        return (f"<BusMessage {self.routing_key} tag={self.delivery_tag} "
                f"redelivered={self.redelivered} {len(self.body)} bytes>")


# --- pika plumbing -------------------------------------------------------------


class _Channel:
    """A plain pika Channel with Deferred-returning RPCs that fail when the channel closes."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.closed_reason: Any = None
        self._pending: set[defer.Deferred] = set()
        self._close_listeners: list[Callable[["_Channel", Any], None]] = []
        self._closed_waiters: list[defer.Deferred] = []
        raw.add_on_close_callback(self._on_close)

    @classmethod
    def open(cls, conn: "_Protocol") -> defer.Deferred:
        """Open a channel on ``conn``; fires with a :class:`_Channel`."""
        d: defer.Deferred = defer.Deferred()
        holder: dict[str, _Channel] = {}

        def opened(_raw: Any) -> None:
            if not d.called:
                d.callback(holder["ch"])

        try:
            raw = conn._impl.channel(on_open_callback=opened)
        except Exception as e:  # connection closing or closed
            return defer.fail(ChannelError(e))
        ch = holder["ch"] = cls(raw)
        ch.on_close(lambda _ch, reason: d.called or d.errback(ChannelError(reason)))
        return d

    @property
    def is_open(self) -> bool:
        return self.closed_reason is None and self.raw.is_open

    def on_close(self, fn: Callable[["_Channel", Any], None]) -> None:
        """Call ``fn(channel, reason)`` once the channel is closed (by us, the broker or a lost connection)."""
        self._close_listeners.append(fn)

    def _on_close(self, _raw: Any, reason: Any) -> None:
        self.closed_reason = reason
        pending, self._pending = self._pending, set()
        for d in pending:
            if not d.called:
                d.errback(ChannelError(reason))
        for fn in list(self._close_listeners):
            fn(self, reason)
        waiters, self._closed_waiters = self._closed_waiters, []
        for w in waiters:
            w.callback(None)

    def rpc(self, method: str, **kw: Any) -> defer.Deferred:
        """Call the pika Channel method ``method``; fires with the broker's reply frame."""
        if self.closed_reason is not None:
            return defer.fail(ChannelError(self.closed_reason))
        d: defer.Deferred = defer.Deferred()
        self._pending.add(d)

        def reply(frame: Any) -> None:
            self._pending.discard(d)
            if not d.called:
                d.callback(frame)

        try:
            getattr(self.raw, method)(callback=reply, **kw)
        except Exception as e:  # channel closing, bad arguments
            self._pending.discard(d)
            return defer.fail(ChannelError(e))
        return d

    def close(self) -> defer.Deferred:
        """Close; fires once closed (at once when it already is)."""
        if self.closed_reason is not None:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._closed_waiters.append(d)
        if not self.raw.is_closing:
            try:
                self.raw.close()
            except Exception:  # already closing because the connection went away
                pass
        return d


class _Protocol(TwistedProtocolConnection):
    """pika's Twisted protocol, telling its owner when the TCP connection is gone."""

    def __init__(self, params: pika.ConnectionParameters, owner: "AMQPService") -> None:
        super().__init__(params)
        self.owner = owner
        self.open_error: Any = None
        self.close_reason: str | None = None

    def connectionMade(self) -> None:  # noqa: N802 (Twisted API)
        # Publishes and acks share this connection: with Nagle's algorithm on,
        # a confirm waits ~40 ms for the broker's delayed ACK. Measured here:
        # median confirmed publish 36.6 ms -> 0.6 ms with TCP_NODELAY.
        if hasattr(self.transport, "setTcpNoDelay"):
            self.transport.setTcpNoDelay(True)
        super().connectionMade()

    def _on_connection_failed(self, connection: Any, error_message: Any = None) -> None:
        # pika reports a failed handshake as AMQPConnectionError(attempts): keep the real reason
        # (e.g. ACCESS_REFUSED for a bad password) for the logs and Unavailable messages
        self.open_error = error_message
        super()._on_connection_failed(connection, error_message)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:  # noqa: N802 (Twisted API)
        try:
            super().connectionLost(reason)
        finally:
            self.owner._connection_lost(self, reason)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()


class _Factory(protocol.Factory):
    noisy = False

    def __init__(self, owner: "AMQPService") -> None:
        self.owner = owner

    def buildProtocol(self, addr: Any) -> _Protocol:  # noqa: N802 (Twisted API)
        p = _Protocol(self.owner.params, self.owner)
        p.factory = self
        return p


def _reason_text(reason: Any) -> str:
    if isinstance(reason, Failure):
        reason = reason.value
    if isinstance(reason, pika.exceptions.ConnectionClosed):
        return f"{reason.reply_code} {reason.reply_text}"
    text = str(reason) or type(reason).__name__
    return text


def split_urls(urls: str | Iterable[str]) -> list[str]:
    """``--amqp``'s value as a list of URLs: one string (comma-separated allowed) or several."""
    if isinstance(urls, str):
        urls = [urls]
    out: list[str] = []
    for u in urls:
        out.extend(part.strip() for part in u.split(",") if part.strip())
    return out


@dataclass
class _Node:
    """One RabbitMQ node of ``--amqp``: where it is and the connection parameters for it."""

    host: str
    port: int
    tls: bool
    params: pika.ConnectionParameters

    @classmethod
    def parse(cls, url: str, password: str | None, connection_name: str) -> "_Node":
        if not url.startswith(("amqp://", "amqps://")):
            raise ValueError(f"not an amqp:// or amqps:// URL: {url!r}")
        params = pika.URLParameters(url)
        if password is not None:
            params.credentials = pika.PlainCredentials(params.credentials.username, password)
        params.client_properties = {"connection_name": connection_name, "product": "imcluster"}
        return cls(params.host, params.port, url.startswith("amqps:"), params)

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@implementer(IStreamClientEndpoint)
class _FailoverEndpoint:
    """ClientService's endpoint: each attempt connects to the owner's current node.

    A failed TCP connect moves the owner on to the next node (as a failed
    AMQP handshake and a lost connection do, in :class:`AMQPService`), so
    with ``--amqp`` listing a cluster's nodes a daemon whose node went
    reconnects to another one after one backoff delay.
    """

    def __init__(self, owner: "AMQPService") -> None:
        self.owner = owner

    def connect(self, factory: Any) -> defer.Deferred:
        from twisted.internet import reactor

        owner = self.owner
        node = owner.node
        endpoint = HostnameEndpoint(reactor, node.host, node.port, timeout=owner.publish_timeout)
        if node.tls:
            from twisted.internet.ssl import optionsForClientTLS
            endpoint = wrapClientTLS(optionsForClientTLS(node.host), endpoint)

        def failed(f: Failure) -> Failure:
            owner._last_error = f"connecting to {node} failed: {f.getErrorMessage()}"
            if owner.node is node:
                owner._next_node(owner._last_error)
            return f

        return endpoint.connect(factory).addErrback(failed)


# --- publishing ----------------------------------------------------------------


class _Publish:
    """One publish until the broker confirms it (or its deadline passes)."""

    __slots__ = ("d", "routing_key", "body", "props", "mandatory", "msg_id", "deadline", "done", "sent",
                 "exchange", "closes")

    def __init__(self, routing_key: str, body: bytes, props: Any, mandatory: bool,
                 msg_id: str | None, deadline: float, exchange: str) -> None:
        self.d: defer.Deferred = defer.Deferred()
        self.exchange = exchange
        #: broker channel errors (a 406...) that closed the channel while this was in flight
        self.closes = 0
        self.routing_key = routing_key
        self.body = body
        self.props = props
        self.mandatory = mandatory
        self.msg_id = msg_id
        self.deadline = deadline
        self.done = False
        self.sent = False

    def finish(self, error: Exception | None = None) -> None:
        if self.done:
            return
        self.done = True
        if error is None:
            self.d.callback(None)
        else:
            self.d.errback(error)


# --- consumers -----------------------------------------------------------------


class Consumer:
    """A registered consumer of one queue; it survives reconnects until :meth:`cancel`."""

    log = Logger()

    def __init__(self, bus: "AMQPService", spec_: QueueSpec, callback: Callable[[BusMessage], Any],
                 prefetch: int, exclusive: bool) -> None:
        self.bus = bus
        self.queue = spec_
        self.callback = callback
        self.prefetch = prefetch
        self.exclusive = exclusive
        self.active = False
        self.cancelled = False
        self.ready: defer.Deferred = defer.Deferred()
        self._channel: _Channel | None = None
        self._tag: str | None = None
        self._failures = 0
        self._retry: Any = None
        self._starting: _Protocol | None = None
        #: called after every start of this consumer but the first (see add_restart_listener)
        self._restart_listeners: list[Callable[[float | None], Any]] = []
        self.starts = 0
        #: when the consumer stopped consuming (clock seconds), until it is active again
        self.inactive_since: float | None = None

    def __repr__(self) -> str:
        return f"<Consumer {self.queue.name} active={self.active}>"

    def add_restart_listener(self, fn: Callable[[float | None], Any]) -> None:
        """Call ``fn(down_since)`` each time the consumer is active again after a reconnect or a channel loss.

        The queue has been declared again by then: an exclusive, auto-delete
        queue (a gateway's) may have been gone meanwhile, with whatever was
        routed to it (ARCHITECTURE.md, "deliveries heal by themselves").
        ``down_since``: when this consumer noticed it had stopped consuming
        (clock seconds; None if unknown).
        """
        self._restart_listeners.append(fn)

    def _stopped(self) -> None:
        if self.inactive_since is None:
            self.inactive_since = self.bus._clock.seconds()

    def _started(self) -> None:
        self.starts += 1
        down_since, self.inactive_since = self.inactive_since, None
        if self.starts == 1:
            return
        for fn in list(self._restart_listeners):
            d = defer.maybeDeferred(fn, down_since)
            d.addErrback(lambda f: self.log.failure("restart listener of {queue} failed", f,
                                                    queue=self.queue.name))

    @defer.inlineCallbacks
    def start(self, conn: "_Protocol"):
        """Declare the queue and consume it on a new channel of ``conn``."""
        if self.cancelled or self._starting is conn or not self.bus._is_current(conn):
            return
        if self._channel is not None and self._channel.is_open:
            return  # already consuming on this connection
        self._starting = conn
        bus, q = self.bus, self.queue
        ch = None
        try:
            ch = yield _Channel.open(conn)
            if self.cancelled or not bus._is_current(conn):
                ch.close()
                return
            self._channel = ch
            ch.on_close(self._channel_closed)
            ch.raw.add_on_cancel_callback(self._cancelled_by_broker)
            yield ch.rpc("basic_qos", prefetch_count=self.prefetch)
            yield bus._declare_queue(ch, q)
            ok = yield ch.rpc("basic_consume", queue=q.name, on_message_callback=self._on_message,
                              auto_ack=False, exclusive=self.exclusive)
            self._tag = ok.method.consumer_tag
        except Exception as e:
            if ch is not None and ch is self._channel:
                self._channel = None
            if ch is not None:
                ch.close()
            self._start_failed(conn, e)
            return
        finally:
            if self._starting is conn:
                self._starting = None
        if self.cancelled or ch.closed_reason is not None:
            return
        self.active = True
        self._failures = 0
        self.log.info("AMQP consuming {queue} (prefetch {prefetch})", queue=q.name, prefetch=self.prefetch)
        if not self.ready.called:
            self.ready.callback(self)
        self._started()

    def _start_failed(self, conn: "_Protocol", e: Exception) -> None:
        bus = self.bus
        if self.cancelled or not bus.running or not bus._is_current(conn):
            return  # the next connection restarts us
        if isinstance(e, ChannelError) and e.by_broker and not self.ready.called:
            # the broker refused the queue (arguments differ, exclusive elsewhere, access):
            # retrying will not cure it; tell the caller
            self.log.error("AMQP cannot consume {queue}: {err}", queue=self.queue.name, err=str(e))
            bus._consumers.pop(self, None)
            self.cancelled = True
            self.ready.errback(e)
            return
        self._failures += 1
        delay = bus.retry_policy(self._failures)
        self.log.warn("AMQP consumer of {queue} failed to start ({err}); retrying in {delay:.1f}s",
                      queue=self.queue.name, err=str(e), delay=delay)
        self._schedule_restart(conn, delay)

    def _schedule_restart(self, conn: "_Protocol", delay: float) -> None:
        if self._retry is not None and self._retry.active():
            return
        self._retry = self.bus._clock.callLater(delay, self.start, conn)

    def _channel_closed(self, ch: _Channel, reason: Any) -> None:
        if ch is not self._channel:
            return
        self._channel = None
        self._tag = None
        was_active, self.active = self.active, False
        self._stopped()
        conn = self.bus._conn
        if self.cancelled or not self.bus.running or conn is None or not conn._impl.is_open:
            return  # stopping, or the connection is gone: the next connection restarts us
        # a channel error (e.g. the queue was deleted): re-declare on a new channel
        self._failures += 1
        delay = self.bus.retry_policy(self._failures)
        self.log.warn("AMQP channel of consumer {queue} closed ({reason}); restarting in {delay:.1f}s",
                      queue=self.queue.name, reason=_reason_text(reason), delay=delay)
        if was_active or self.ready.called:
            self._schedule_restart(conn, delay)

    def _cancelled_by_broker(self, frame: Any) -> None:
        # RabbitMQ cancels a consumer whose queue was deleted: start over on a new channel
        ch = self._channel
        self.log.warn("AMQP broker cancelled the consumer of {queue}", queue=self.queue.name)
        if ch is not None:
            ch.close()

    def connection_lost(self) -> None:
        self._channel = None
        self._tag = None
        self.active = False
        self._stopped()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()

    def _on_message(self, raw: Any, method: Any, properties: Any, body: bytes) -> None:
        ch = self._channel
        msg = BusMessage(body, bool(method.redelivered), properties.headers or {},
                         method.routing_key, method.delivery_tag, self, ch)
        try:
            result = self.callback(msg)
        except Exception:
            self.log.failure("AMQP consumer callback of {queue} failed; rejecting the message",
                             queue=self.queue.name)
            if not msg.settled:
                msg.nack(requeue=False)
            return
        if isinstance(result, defer.Deferred):
            result.addErrback(lambda f: self.log.failure(
                "AMQP consumer callback of {queue} failed", f, queue=self.queue.name))

    def settle(self, msg: BusMessage, ack: bool, requeue: bool) -> bool:
        """Send the ack/nack of ``msg`` if its channel is still the live one."""
        ch = msg._channel
        if ch is None or ch is not self._channel or not ch.is_open:
            return False  # that channel died: the broker redelivers the message
        try:
            if ack:
                ch.raw.basic_ack(msg.delivery_tag)
            else:
                ch.raw.basic_nack(msg.delivery_tag, requeue=requeue)
        except (pika.exceptions.ChannelWrongStateError, pika.exceptions.ConnectionWrongStateError):
            return False
        return True

    def cancel(self) -> defer.Deferred:
        """Stop consuming (not after reconnects either); unacknowledged messages go back to the queue."""
        self.cancelled = True
        self.bus._consumers.pop(self, None)
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        ch, tag = self._channel, self._tag
        self.active = False
        if not self.ready.called:
            self.ready.errback(defer.CancelledError(f"consumer of {self.queue.name} cancelled"))
            self.ready.addErrback(lambda f: None)
        if ch is None:
            return defer.succeed(None)

        @defer.inlineCallbacks
        def stop():
            try:
                if tag is not None and ch.is_open:
                    yield ch.rpc("basic_cancel", consumer_tag=tag)
            except ChannelError:
                pass
            # closing the channel hands unacknowledged messages back to the queue
            yield ch.close()

        d = stop()
        return self.bus._bounded(d, f"cancelling the consumer of {self.queue.name}")


# --- the service ---------------------------------------------------------------


@implementer(IMessageBus)
class AMQPService(service.Service):
    """IMessageBus on RabbitMQ: one reconnecting connection, publisher confirms, consumers that survive reconnects.

    ``url``: ``amqp://user:password@host:port/vhost`` (``amqps://`` for TLS;
    pika's query arguments such as ``heartbeat=30`` apply), or several (a
    list, or one string with commas): the nodes of one RabbitMQ cluster. The
    service connects to the first; when its node goes (connection lost, TCP
    connect or AMQP handshake failed) the next attempt goes to the next
    node, round the list. Everything a new connection does anyway (topology
    and consumers declared again, unconfirmed publishes sent again, restart
    listeners told) makes the failover a reconnect like any other.
    ``queue_type``: ``classic`` or ``quorum``, how the shared queues are
    declared (:func:`queue_arguments`).
    ``publish_timeout`` bounds every publish (waiting for a connection
    included), the AMQP handshake and the stop. ``publish_backlog`` bounds
    the publishes that wait while the broker is unreachable; more fail at once.
    ``connection_name`` is shown by ``rabbitmqctl list_connections client_properties``.
    """

    log = Logger()

    #: reconnection backoff (seconds): first retry, growth, ceiling. The ceiling is
    #: short: deliveries must heal within 10 s of the broker answering again
    #: (PROTOCOL.md), and a connection attempt to a broker that is down costs nothing
    reconnect_initial_delay = 0.5
    reconnect_factor = 2.0
    reconnect_max_delay = 2.0

    def __init__(self, url: str | Sequence[str], namespace: str, publish_timeout: float = 5.0,
                 password: str | None = None, clock: Any = None, name: str = "amqp",
                 retry_policy: Callable[[int], float] | None = None,
                 publish_backlog: int = 10000, connection_name: str | None = None,
                 max_publish_bytes: int = 8 * 1024 * 1024, queue_type: str = "classic") -> None:
        self.connection_name = connection_name or (
            f"imcluster {name} {namespace} {socket.gethostname()}:{os.getpid()}")
        #: the cluster's nodes, in the order given; ``_node`` is the one connected or being tried
        self.nodes = [_Node.parse(u, password, self.connection_name) for u in split_urls(url)]
        if not self.nodes:
            raise ValueError("AMQP needs at least one amqp:// or amqps:// URL")
        self._node = 0
        self.namespace = namespace
        self.names = BusNames(namespace, queue_type)
        self.exchange = self.names.exchange
        self.publish_timeout = publish_timeout
        self.publish_backlog = publish_backlog
        #: no body above this is ever sent (TooLarge): the broker would close the channel with 406
        self.max_publish_bytes = max_publish_bytes
        if clock is None:
            from twisted.internet import reactor as clock
        self._clock = clock
        if retry_policy is None:
            retry_policy = backoffPolicy(self.reconnect_initial_delay, self.reconnect_max_delay,
                                         self.reconnect_factor,
                                         lambda: random.random() * self.reconnect_initial_delay / 2)
        self.retry_policy = retry_policy
        self.setName(name)
        self.reconnects = 0
        self._ever_connected = False
        self._client: ClientService | None = None
        self._conn: _Protocol | None = None  # current connection (topology declared)
        self._pub: _Channel | None = None  # publishing channel of _conn
        self._pub_retry: Any = None
        self._pub_failures = 0
        self._last_error = "not connected yet"
        self._waiters: list[defer.Deferred] = []
        self._consumers: dict[Consumer, None] = {}  # insertion-ordered set
        #: every queue name this service declared (what delete_topology removes)
        self.declared_queues: set[str] = set()
        # publishing state
        self._ids = itertools.count(1)
        self._waiting: collections.deque[_Publish] = collections.deque()  # not sent yet
        self._unconfirmed: collections.OrderedDict[int, _Publish] = collections.OrderedDict()
        self._returned: set[str] = set()
        self._seq = 0
        self._order: collections.deque[_Publish] = collections.deque()  # by deadline
        self._sweep_call: Any = None
        self._props = {True: spec.BasicProperties(delivery_mode=2),
                       False: spec.BasicProperties(delivery_mode=1)}
        #: queues declared with the topology on every connection, besides the processor and dead ones
        #: (:meth:`declare_queue`: e.g. ``<ns>.webhooks`` and ``<ns>.push`` where processors publish)
        self.extra_queues: list[QueueSpec] = []

    @classmethod
    def from_config(cls, config: Any, **kw: Any) -> "AMQPService":
        """Build from a Config (``amqp``, ``amqp_password``, ``namespace``, ``publish_timeout``, ``publish_backlog``)."""
        kw.setdefault("publish_backlog", getattr(config, "publish_backlog", 10000))
        kw.setdefault("max_publish_bytes", getattr(config, "max_publish_bytes", 8 * 1024 * 1024))
        kw.setdefault("queue_type", getattr(config, "queue_type", "classic"))
        return cls(config.amqp, config.namespace, publish_timeout=config.publish_timeout,
                   password=getattr(config, "amqp_password", None), **kw)

    # --- the cluster's nodes

    @property
    def node(self) -> "_Node":
        """The node connected now (or tried next)."""
        return self.nodes[self._node]

    @property
    def host(self) -> str:
        return self.node.host

    @property
    def port(self) -> int:
        return self.node.port

    @property
    def params(self) -> pika.ConnectionParameters:
        return self.node.params

    def _next_node(self, why: str) -> None:
        """Try the next node of the cluster from now on (a no-op with one node)."""
        if len(self.nodes) < 2:
            return
        old = self.node
        self._node = (self._node + 1) % len(self.nodes)
        self.log.info("AMQP {old} gone ({why}); trying node {new} next", old=old, why=why, new=self.node)

    # --- IMessageBus names

    def server_key(self) -> str:
        return self.names.server_key()

    def gateway_key(self, uuid: str) -> str:
        return self.names.gateway_key(uuid)

    def processor_queue(self) -> QueueSpec:
        return self.names.processor_queue()

    def gateway_queue(self, uuid: str) -> QueueSpec:
        return self.names.gateway_queue(uuid)

    def dead_queue(self) -> QueueSpec:
        return self.names.dead_queue()

    # --- state

    @property
    def connected(self) -> bool:
        """True while a connection with its publishing channel is open."""
        return self._pub is not None

    def wait_connected(self) -> defer.Deferred:
        """Fires (with None) when connected: at once if it is now."""
        if self.connected:
            return defer.succeed(None)

        def cancel(d: defer.Deferred) -> None:
            if d in self._waiters:
                self._waiters.remove(d)

        d: defer.Deferred = defer.Deferred(cancel)
        self._waiters.append(d)
        return d

    def _is_current(self, conn: _Protocol | None) -> bool:
        return conn is not None and conn is self._conn and self.running and conn._impl.is_open

    # --- lifecycle

    def startService(self):  # noqa: N802 (Twisted API)
        """Start connecting; fires once connected, or after ``publish_timeout`` (logged) if RabbitMQ is down.

        It never fails: the connection keeps being retried, publishes fail
        within ``publish_timeout`` until it is up.
        """
        super().startService()
        self._client = ClientService(_FailoverEndpoint(self), _Factory(self), retryPolicy=self.retry_policy,
                                     prepareConnection=self._prepare)
        self._client.startService()
        self.log.info("AMQP {nodes} vhost {vhost} namespace {namespace} ({queue_type} queues): "
                      "connecting as {conn_name!r}",
                      nodes=", ".join(str(n) for n in self.nodes), vhost=self.params.virtual_host,
                      namespace=self.namespace, queue_type=self.names.queue_type,
                      conn_name=self.connection_name)
        d = self.wait_connected()
        timer = self._clock.callLater(self.publish_timeout, d.cancel)

        def done(result: Any) -> None:
            if timer.active():
                timer.cancel()
            if isinstance(result, Failure):
                self.log.warn("AMQP {host}:{port} not reachable yet ({err}); retrying in the background",
                              host=self.host, port=self.port, err=self._last_error)

        return d.addBoth(done)

    def _prepare(self, proxy: Any) -> defer.Deferred:
        """ClientService's prepareConnection: AMQP handshake, publishing channel, topology.

        A failure rejects the connection (ClientService retries with backoff).
        """
        # Twisted's ClientService has no transition for a connection lost
        # while it is being prepared (automat NoTransition logged as an
        # unhandled error on every failed handshake): until prepared, the
        # prepare Deferred's failure alone reports the loss.
        state = {"prepared": False}
        notify = getattr(proxy, "_lostNotification", None)
        if notify is not None:
            proxy._lostNotification = lambda reason: notify(reason) if state["prepared"] else None
        conn: _Protocol = getattr(proxy, "_protocol", proxy)

        def cancel(_: defer.Deferred) -> None:
            conn.abort()

        result: defer.Deferred = defer.Deferred(cancel)

        stage = {"now": "the AMQP handshake"}

        @defer.inlineCallbacks
        def run():
            yield conn.ready
            stage["now"] = "declaring the topology"
            ch = yield self._open_publisher(conn)
            return ch

        def timed_out() -> None:
            stage["timed_out"] = True
            conn.abort()

        timer = self._clock.callLater(self.publish_timeout, timed_out)

        def finished(r: Any) -> Any:
            if timer.active():
                timer.cancel()
            if result.called:
                return None
            if isinstance(r, Failure):
                if stage.get("timed_out"):
                    self._last_error = f"{stage['now']} took over {self.publish_timeout:g}s"
                elif stage["now"] == "the AMQP handshake" and (
                        r.check(error.ConnectionDone) or isinstance(conn.open_error, error.ConnectionDone)):
                    # pika loses the broker's Connection.Close reason here (ACCESS_REFUSED ...)
                    self._last_error = ("the broker closed the connection during the AMQP handshake "
                                        "(check the credentials, vhost and permissions)")
                else:
                    self._last_error = f"{stage['now']} failed: {_reason_text(conn.open_error or r)}"
                if not r.check(defer.CancelledError):
                    self.log.warn("AMQP {host}:{port} connection failed: {err}",
                                  host=self.host, port=self.port, err=self._last_error)
                    self._next_node(self._last_error)
                conn.abort()
                result.errback(r)
                return None
            state["prepared"] = True
            self._connection_ready(conn, r)
            result.callback(conn)
            return None

        run().addBoth(finished)
        return result

    @defer.inlineCallbacks
    def _open_publisher(self, conn: _Protocol):
        """A channel in confirm mode on ``conn``, with the topology declared through it."""
        ch = yield _Channel.open(conn)
        try:
            confirm = ch.rpc("confirm_delivery", ack_nack_callback=lambda frame: self._on_confirm(ch, frame))
            ch.raw.add_on_return_callback(self._on_return)
            yield confirm
            yield self._declare_topology(ch)
        except Exception:
            ch.close()
            raise
        return ch

    def _declare_topology(self, ch: _Channel) -> defer.Deferred:
        n = self.names
        # pika runs a channel's RPCs one at a time; issue them all, wait for the last
        ds = [ch.rpc("exchange_declare", exchange=n.exchange, exchange_type="topic", durable=True),
              ch.rpc("exchange_declare", exchange=n.dlx, exchange_type="fanout", durable=True),
              self._declare_queue(ch, n.dead_queue()),
              self._declare_queue(ch, n.processor_queue())]
        ds += [self._declare_queue(ch, q) for q in self.extra_queues]
        return defer.gatherResults(ds, consumeErrors=True).addErrback(lambda f: f.value.subFailure)

    @defer.inlineCallbacks
    def declare_queue(self, queue: QueueSpec):
        """Declare ``queue`` (and its binding) now if connected, and again on every new connection.

        For queues a daemon publishes to but may not consume (a publish to
        an undeclared queue would be dropped).
        """
        if all(q.name != queue.name for q in self.extra_queues):
            self.extra_queues.append(queue)
        conn = self._conn
        if conn is None:
            return
        ch = yield _Channel.open(conn)
        try:
            yield self._declare_queue(ch, queue)
        finally:
            ch.close()

    def _declare_queue(self, ch: _Channel, q: QueueSpec) -> defer.Deferred:
        self.declared_queues.add(q.name)
        d = ch.rpc("queue_declare", queue=q.name, durable=q.durable, exclusive=q.exclusive,
                   auto_delete=q.auto_delete, arguments=dict(q.arguments) or None)
        if q.routing_key is not None:
            d2 = ch.rpc("queue_bind", queue=q.name, exchange=q.exchange or self.exchange,
                        routing_key=q.routing_key)
            d = defer.gatherResults([d, d2], consumeErrors=True).addErrback(lambda f: f.value.subFailure)
        return d

    def _connection_ready(self, conn: _Protocol, pub: _Channel) -> None:
        if not self.running:
            conn.abort()
            return
        self._conn = conn
        # pika's Twisted adapter replaces the broker's Connection.Close reason
        # (e.g. 320 CONNECTION_FORCED on a broker restart) by "closed cleanly":
        # note it for the disconnect log
        conn._impl.callbacks.add(0, spec.Connection.Close, lambda frame: setattr(
            conn, "close_reason", f"{frame.method.reply_code} {frame.method.reply_text}"), one_shot=True)
        conn._impl.add_on_connection_blocked_callback(
            lambda _c, frame: self.log.warn("AMQP broker blocked our connection: {reason}",
                                            reason=getattr(frame.method, "reason", "")))
        conn._impl.add_on_connection_unblocked_callback(
            lambda _c, frame: self.log.info("AMQP broker unblocked our connection"))
        reconnect = self._ever_connected
        self._ever_connected = True
        self._last_error = "connected"
        if reconnect:
            self.reconnects += 1
            metrics.RECONNECTS.labels(service=self.name).inc()
            self.log.info("AMQP {host}:{port} reconnected ({n} reconnects); {waiting} publishes resent or waiting",
                          host=self.host, port=self.port, n=self.reconnects, waiting=len(self._waiting))
        else:
            self.log.info("AMQP {host}:{port} connected", host=self.host, port=self.port)
        starting = [c.start(conn) for c in list(self._consumers)]
        if not starting:
            self._resume_publishing(conn, pub)
            return
        # publishes wait until our queues are declared again: a gateway's exclusive queue
        # went with the old connection, and an answer (a sync page, a reply) published
        # into the gap would come back unroutable and be lost (ARCHITECTURE.md failure rules)
        self._bounded(defer.DeferredList(starting, consumeErrors=True),
                      "re-declaring the consumers' queues").addCallback(
            lambda _: self._resume_publishing(conn, pub))

    def _resume_publishing(self, conn: _Protocol, pub: _Channel) -> None:
        """Publish through ``pub`` (what waited goes first) and wake whoever waits for a connection."""
        if not self._is_current(conn) or self._pub is not None:
            return
        if not pub.is_open:
            self._reopen_publisher(conn)
            return
        self._install_publisher(pub)

    def _install_publisher(self, pub: _Channel) -> None:
        self._pub = pub
        self._pub_failures = 0
        self._seq = 0
        self._unconfirmed.clear()
        self._returned.clear()
        pub.on_close(self._publisher_closed)
        self._flush()
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            w.callback(None)

    def _publisher_closed(self, ch: _Channel, reason: Any) -> None:
        if ch is not self._pub:
            return
        self._pub = None
        if ChannelError(reason).by_broker:
            self._refuse_in_flight(reason)
        self._requeue_unconfirmed()
        conn = self._conn
        if not self._is_current(conn):
            return
        # a channel error (e.g. someone deleted the exchange): new channel, topology again
        self._pub_failures += 1
        delay = self.retry_policy(self._pub_failures)
        self._last_error = f"publishing channel closed: {_reason_text(reason)}"
        self.log.warn("AMQP publishing channel closed ({reason}); reopening in {delay:.1f}s",
                      reason=_reason_text(reason), delay=delay)
        self._pub_retry = self._clock.callLater(delay, self._reopen_publisher, conn)

    def _reopen_publisher(self, conn: _Protocol) -> None:
        if not self._is_current(conn) or self._pub is not None:
            return

        def opened(ch: _Channel) -> None:
            if not self._is_current(conn):
                ch.close()
                return
            self._install_publisher(ch)

        def failed(f: Failure) -> None:
            if not self._is_current(conn):
                return
            self._pub_failures += 1
            delay = self.retry_policy(self._pub_failures)
            self.log.warn("AMQP reopening the publishing channel failed ({err}); again in {delay:.1f}s",
                          err=f.getErrorMessage(), delay=delay)
            self._pub_retry = self._clock.callLater(delay, self._reopen_publisher, conn)

        self._open_publisher(conn).addCallbacks(opened, failed)

    def _connection_lost(self, conn: _Protocol, reason: Failure) -> None:
        if conn is not self._conn:
            return
        self._conn = None
        self._pub = None
        if self._pub_retry is not None and self._pub_retry.active():
            self._pub_retry.cancel()
        self._requeue_unconfirmed()
        for c in list(self._consumers):
            c.connection_lost()
        why = conn.close_reason or _reason_text(reason)
        self._last_error = f"connection lost: {why}"
        if self.running:
            self.log.warn("AMQP {host}:{port} connection lost ({reason}); reconnecting",
                          host=self.host, port=self.port, reason=why)
            # the node may be gone: the next attempt goes to the next node (a gateway's exclusive
            # queue is declared again there, and its restart listeners re-sync its connections)
            self._next_node(f"connection lost: {why}")

    def stopService(self):  # noqa: N802
        """Cancel consumers, wait for in-flight confirms, close the connection; bounded by ``publish_timeout``.

        Publishes still waiting for a connection fail with :class:`Unavailable`.
        """
        super().stopService()
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            w.errback(defer.CancelledError("AMQP service stopped"))
        for rec in self._waiting:
            rec.finish(Unavailable("RabbitMQ did not confirm: the AMQP service stopped"))
        self._waiting.clear()
        client, self._client = self._client, None
        conn = self._conn

        @defer.inlineCallbacks
        def stop():
            consumers = list(self._consumers)
            yield defer.DeferredList([c.cancel() for c in consumers], consumeErrors=True)
            inflight = [r.d for r in self._unconfirmed.values() if not r.done]
            if inflight:
                yield defer.DeferredList(inflight, consumeErrors=True)
            if conn is not None and conn._impl.is_open:
                closed = conn.close()
                if closed is not None:
                    yield closed
            if client is not None:
                yield client.stopService()

        done: defer.Deferred = defer.Deferred()

        def give_up() -> None:
            self.log.warn("AMQP connection did not close within {t}s; aborting it", t=self.publish_timeout)
            if conn is not None:
                conn.abort()
            finish(None)

        timer = self._clock.callLater(self.publish_timeout, give_up)

        def finish(result: Any) -> None:
            if timer.active():
                timer.cancel()
            if isinstance(result, Failure):
                self.log.failure("stopping the AMQP connection failed", result)
            for rec in list(self._order):
                rec.finish(Unavailable("RabbitMQ did not confirm: the AMQP service stopped"))
            self._order.clear()
            if self._sweep_call is not None and self._sweep_call.active():
                self._sweep_call.cancel()
            if not done.called:
                self.log.info("AMQP {host}:{port} closed", host=self.host, port=self.port)
                done.callback(None)

        stop().addBoth(finish)
        return done

    def _bounded(self, d: defer.Deferred, what: str) -> defer.Deferred:
        """``d``, given up (logged, fired with None) after ``publish_timeout``."""
        out: defer.Deferred = defer.Deferred()

        def give_up() -> None:
            self.log.warn("AMQP {what} took over {t}s; giving up", what=what, t=self.publish_timeout)
            out.called or out.callback(None)

        timer = self._clock.callLater(self.publish_timeout, give_up)

        def finished(r: Any) -> None:
            if timer.active():
                timer.cancel()
            if isinstance(r, Failure):
                self.log.warn("AMQP {what} failed: {err}", what=what, err=r.getErrorMessage())
            out.called or out.callback(None)

        d.addBoth(finished)
        return out

    # --- publishing

    def publish(self, routing_key: str, body: bytes, mandatory: bool = False,
                persistent: bool = True, headers: dict | None = None,
                exchange: str | None = None) -> defer.Deferred:
        """Publish ``body`` to ``<ns>.exchange`` (or ``exchange``); fires on the broker's confirm.

        Fails with :class:`Unavailable` (no confirm within ``publish_timeout``,
        backlog full, service stopped), :class:`Nacked` or :class:`Unroutable`
        (``mandatory`` and no queue bound to ``routing_key``), all transient;
        and with :class:`Refused` when the message can never be taken:
        :class:`TooLarge` above ``max_publish_bytes`` (never sent), or a
        message the broker refused with a channel error (406: above its
        ``max_message_size``, or in flight through
        :data:`REFUSED_AFTER_CLOSES` channel errors).
        """
        if not isinstance(body, (bytes, bytearray)):
            return defer.fail(TypeError(f"AMQP body must be bytes, not {type(body).__name__}"))
        if len(body) > self.max_publish_bytes:
            metrics.PUBLISH_REFUSED.inc()
            return defer.fail(TooLarge(f"a message of {len(body)} bytes to {routing_key!r} is above "
                                       f"max_publish_bytes ({self.max_publish_bytes})"))
        if not self.running:
            return defer.fail(Unavailable("RabbitMQ did not confirm: the AMQP service is not running"))
        msg_id = None
        if mandatory or headers:
            # returns are matched to publishes by message_id
            msg_id = str(next(self._ids)) if mandatory else None
            props = spec.BasicProperties(delivery_mode=2 if persistent else 1, message_id=msg_id,
                                         headers=headers or None)
        else:
            props = self._props[bool(persistent)]
        rec = _Publish(routing_key, bytes(body), props, mandatory, msg_id,
                       self._clock.seconds() + self.publish_timeout, exchange or self.exchange)
        if self._pub is None and len(self._waiting) >= self.publish_backlog:
            return defer.fail(Unavailable(
                f"RabbitMQ unreachable ({self._last_error}) and {len(self._waiting)} publishes already waiting"))
        self._waiting.append(rec)
        self._order.append(rec)
        if self._pub is not None:
            self._flush()
        if self._sweep_call is None or not self._sweep_call.active():
            self._sweep_call = self._clock.callLater(self.publish_timeout, self._sweep)
        return rec.d

    def dead_letter(self, body: bytes, reason: str) -> defer.Deferred:
        """Publish ``body`` to ``<ns>.dead`` (through the fanout ``<ns>.dlx``) with header ``x-imcluster-reason``.

        Persistent and confirmed, like any publish. A body above
        ``max_publish_bytes`` is cut to it (a dead letter is for operators).
        """
        body = bytes(body)[:self.max_publish_bytes]
        return self.publish("", body, headers={"x-imcluster-reason": reason[:1000]}, exchange=self.names.dlx)

    def _send(self, rec: _Publish) -> bool:
        pub = self._pub
        try:
            pub.raw.basic_publish(rec.exchange, rec.routing_key, rec.body, rec.props, rec.mandatory)
        except Exception as e:  # the channel is closing; its close callback requeues
            self.log.debug("AMQP publish on a closing channel: {err}", err=e)
            return False
        self._seq += 1
        rec.sent = True
        self._unconfirmed[self._seq] = rec
        return True

    def _flush(self) -> None:
        waiting = self._waiting
        while waiting and self._pub is not None:
            rec = waiting[0]
            if not rec.done and not self._send(rec):
                return
            waiting.popleft()

    def _refuse_in_flight(self, reason: Any) -> None:
        """The broker closed the publishing channel (406...): fail what it can never take.

        Sending it again would close the new channel the same way, for ever
        (issue 12). A 406 for a size names the broker's limit: everything in
        flight above it is refused. Otherwise a publish that was in flight
        through :data:`REFUSED_AFTER_CLOSES` such closes is refused; the rest
        is sent again as usual.
        """
        text = str(getattr(reason, "reply_text", "") or reason)
        m = _MAX_SIZE_RE.search(text)
        limit = int(m.group(1)) if m else None
        for rec in list(self._unconfirmed.values()):
            if rec.done:
                continue
            rec.closes += 1
            if (limit is not None and len(rec.body) > limit) or rec.closes >= REFUSED_AFTER_CLOSES:
                metrics.PUBLISH_REFUSED.inc()
                rec.finish(Refused(f"RabbitMQ refused a message of {len(rec.body)} bytes to "
                                   f"{rec.routing_key!r}: {_reason_text(reason)}"))

    def _requeue_unconfirmed(self) -> None:
        # sent but never confirmed: the broker may or may not have it; send again (at-least-once)
        pending = [r for r in self._unconfirmed.values() if not r.done]
        self._unconfirmed.clear()
        self._returned.clear()
        self._waiting.extendleft(reversed(pending))

    def _on_return(self, _raw: Any, method: Any, properties: Any, body: bytes) -> None:
        if properties.message_id is not None:
            self._returned.add(properties.message_id)

    def _on_confirm(self, ch: _Channel, frame: Any) -> None:
        if ch is not self._pub:
            return  # a late confirm of a closed channel: its publishes were requeued
        m = frame.method
        nack = isinstance(m, spec.Basic.Nack)
        tag = m.delivery_tag
        unconfirmed = self._unconfirmed
        if m.multiple:
            recs = []
            while unconfirmed:
                first = next(iter(unconfirmed))
                if first > tag:
                    break
                recs.append(unconfirmed.popitem(last=False)[1])
        else:
            rec = unconfirmed.pop(tag, None)
            recs = [rec] if rec is not None else []
        for rec in recs:
            if rec.msg_id is not None and rec.msg_id in self._returned:
                self._returned.discard(rec.msg_id)
                rec.finish(Unroutable(f"no queue is bound to {rec.routing_key!r} on {self.exchange}"))
            elif nack:
                rec.finish(Nacked(f"RabbitMQ refused the message to {rec.routing_key!r} (basic.nack)"))
            else:
                rec.finish()
        order = self._order
        while order and order[0].done:
            order.popleft()

    def _sweep(self) -> None:
        """Fail the publishes whose deadline has passed; re-arm for the next one."""
        self._sweep_call = None
        now = self._clock.seconds()
        order = self._order
        expired = 0
        while order and (order[0].done or order[0].deadline <= now):
            rec = order.popleft()
            if rec.done:
                continue
            expired += 1
            reason = "no confirm from the broker" if self.connected else self._last_error
            rec.finish(Unavailable(f"RabbitMQ did not confirm within {self.publish_timeout:g}s: {reason}"))
        if expired:
            self.log.warn("AMQP {n} publishes not confirmed within {t}s ({state})", n=expired,
                          t=self.publish_timeout, state="connected" if self.connected else self._last_error)
            if self._waiting:
                self._waiting = collections.deque(r for r in self._waiting if not r.done)
        if order:
            self._sweep_call = self._clock.callLater(max(0.0, order[0].deadline - now), self._sweep)

    # --- consuming

    def consume(self, queue: QueueSpec, callback: Callable[[BusMessage], Any], prefetch: int = 100,
                exclusive: bool = False) -> defer.Deferred:
        """Declare ``queue`` and consume it (manual acks, ``prefetch`` window), now and after every reconnect.

        Fires with the :class:`Consumer` once it is active (after the first
        connect); fails when the broker refuses the queue (e.g. declared
        elsewhere with other arguments, or exclusive to another connection).
        """
        if not self.running:
            return defer.fail(RuntimeError("AMQP service is not running"))
        if not 0 < prefetch <= 65535:
            return defer.fail(ValueError(f"prefetch must be 1..65535 (an AMQP short), got {prefetch}"))
        c = Consumer(self, queue, callback, prefetch, exclusive)
        self._consumers[c] = None
        if self._conn is not None:
            c.start(self._conn)
        return c.ready

    @property
    def consumers(self) -> list[Consumer]:
        return list(self._consumers)

    # --- operations

    @defer.inlineCallbacks
    def delete_topology(self, queues: Iterable[str] = ()):
        """Delete this namespace's exchanges and queues (test clean-up, decommissioning).

        Consumers of this service are cancelled first (they would declare
        their queues again). Deletes every queue this service declared, and
        ``queues``.
        Gateway queues of other connections vanish with their connections.
        """
        for c in list(self._consumers):
            yield c.cancel()
        if not self.connected:
            try:
                yield with_timeout(self.wait_connected(), self.publish_timeout, self._clock, "AMQP connection")
            except TimeoutError as e:
                raise Unavailable(f"cannot delete the topology: {e} ({self._last_error})") from None
        conn = self._conn
        n = self.names
        names = list(dict.fromkeys([n.processor_queue().name, n.dead, *sorted(self.declared_queues), *queues]))
        ops = [("queue_delete", {"queue": q}) for q in names]
        ops += [("exchange_delete", {"exchange": e}) for e in (n.exchange, n.dlx)]
        ch = None
        for method, kw in ops:
            if ch is None or not ch.is_open:
                ch = yield _Channel.open(conn)
            try:
                yield ch.rpc(method, **kw)
            except ChannelError as e:
                self.log.warn("AMQP {method} {kw} failed: {err}", method=method, kw=kw, err=str(e))
        if ch is not None:
            yield ch.close()

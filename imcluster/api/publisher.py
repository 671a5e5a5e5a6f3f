"""Server-side publish: the HTTP API hands messages to the processors like a gateway connection.

There is one message pipeline (the processors'). A message posted over HTTP
travels it exactly as a client's ``message`` frame does: imapi publishes a
``frame`` item (docs/internals.rst) to ``<ns>.server`` and waits for the
``message_reply`` that the processors route back to the item's ``connId``.
For that imapi has a gateway's own plumbing: a uuid, and an exclusive,
auto-delete queue ``<ns>.gateway.<uuid>`` bound to ``<ns>.wsserver.<uuid>``.
It never registers ``WSSERVER_<uuid>`` (it is no gateway clients could be
sent to) and no connection of it is ever in ``UCIR``, so the processors only
ever send it replies.

Each request gets its own ``connId`` ``<uuid>##api##<n>``
(:func:`imcluster.envelope.api_conn_id`). ``"trusted":
true`` on an item tells the processors to skip the sender's membership
check: imapi sets it only for the admin key (which may send as any user, as
``system`` by default) after checking authorization itself.
"""

from __future__ import annotations

import itertools
import uuid as uuid_module
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from imcluster import envelope


class PublishUnavailable(Exception):
    """The processors did not answer in time, or RabbitMQ did not take the message (safe to retry)."""


class MessagePublisher(service.Service):
    """Publishes ``message`` frames for the HTTP API and matches the processors' replies.

    ``bus`` provides IMessageBus (``AMQPService``). ``timeout`` bounds the
    wait for a reply, publish included (``publish_timeout`` +
    ``request_timeout``). ``batch`` items at most go in one AMQP publish
    (concurrent requests of one reactor turn share one).
    """

    log = Logger()

    def __init__(self, bus: Any, timeout: float, batch: int = 200, prefetch: int = 1000,
                 clock: Any = None, server_id: str | None = None, name: str = "publisher") -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self.bus = bus
        self.timeout = timeout
        self.prefetch = prefetch
        self.clock = clock
        self.server_id = server_id or str(uuid_module.uuid4())
        self.setName(name)
        self._publisher = envelope.Publisher(bus, bus.server_key(), clock, batch)
        self._ids = itertools.count(1)
        self._waiting: dict[str, defer.Deferred] = {}
        self._consumer: Any = None

    @classmethod
    def from_config(cls, config: Any, bus: Any, **kw: Any) -> "MessagePublisher":
        """Build from a Config (``publish_timeout``, ``request_timeout``, ``publish_batch``, ``prefetch``)."""
        return cls(bus, config.publish_timeout + config.request_timeout, batch=config.publish_batch,
                   prefetch=config.prefetch, **kw)

    @property
    def pending(self) -> int:
        """Requests waiting for their reply."""
        return len(self._waiting)

    @property
    def ready(self) -> bool:
        """True while the reply queue is being consumed (a publish can get its answer)."""
        c = self._consumer
        return c is not None and bool(getattr(c, "active", True)) and self.bus.connected

    # --- lifecycle

    def startService(self) -> defer.Deferred:  # noqa: N802 (Twisted API)
        """Consume ``<ns>.gateway.<uuid>``; waits at most ``publish_timeout`` for RabbitMQ.

        When RabbitMQ is down at start the consumer starts with the next
        connection (AMQPService restarts consumers); until then publishes
        answer 503.
        """
        super().startService()
        queue = self.bus.gateway_queue(self.server_id)
        d = self.bus.consume(queue, self._on_reply, prefetch=self.prefetch, exclusive=True)
        waited = defer.Deferred()

        def consuming(consumer: Any) -> None:
            self._consumer = consumer
            self.log.info("api {uuid}: consuming replies on {queue}", uuid=self.server_id, queue=queue.name)
            if not waited.called:
                waited.callback(None)

        def failed(f: Failure) -> None:
            if f.check(defer.CancelledError):
                return
            self.log.error("api {uuid}: cannot consume {queue}: {err}", uuid=self.server_id,
                           queue=queue.name, err=f.getErrorMessage())
            if not waited.called:
                waited.errback(f)

        d.addCallbacks(consuming, failed)
        publish_timeout = getattr(self.bus, "publish_timeout", 5.0)

        def not_yet() -> None:
            if not waited.called:
                self.log.warn("api {uuid}: RabbitMQ not reachable yet; messages answer 503 until it is",
                              uuid=self.server_id)
                waited.callback(None)

        timer = self.clock.callLater(publish_timeout, not_yet)
        waited.addBoth(lambda r: (timer.active() and timer.cancel(), r)[1])
        return waited

    @defer.inlineCallbacks
    def stopService(self):  # noqa: N802
        """Answer every waiting request (503), stop consuming, let queued publishes go."""
        super().stopService()
        waiting, self._waiting = self._waiting, {}
        for d in waiting.values():
            if not d.called:
                d.errback(PublishUnavailable("the API is stopping"))
        yield self._publisher.drain()
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            yield consumer.cancel()

    # --- publishing

    def publish(self, user_id: str, session_id: str, client_msg_id: str, body: Any,
                trusted: bool = False) -> defer.Deferred:
        """Send one message as ``user_id``; fires with ``(reply, duplicate)``.

        ``reply`` is the processors' ``message_reply`` frame (``ok`` true or
        false, as PROTOCOL.md says); ``duplicate`` is True when the message
        had been stored before (the reply repeats the original). Fails with
        :class:`PublishUnavailable` when RabbitMQ does not take the message
        or no reply comes within ``timeout``.
        """
        ts = int(self.clock.seconds() * 1000)
        d = self._request(user_id, {"type": "message", "clientMsgId": client_msg_id, "sessionId": session_id,
                                    "body": body}, trusted, ts)
        return d.addCallback(lambda reply: (reply, _is_duplicate(reply, ts)))

    def request(self, user_id: str, frame: dict, trusted: bool = False) -> defer.Deferred:
        """Send any frame the processors answer (``recall``, imapi's ``members``) as ``user_id``.

        Fires with the reply frame (``<type>_reply``, or an ``error``
        frame); :class:`PublishUnavailable` as for :meth:`publish`.
        """
        return self._request(user_id, frame, trusted, int(self.clock.seconds() * 1000))

    def _request(self, user_id: str, frame: dict, trusted: bool, ts: int) -> defer.Deferred:
        if not self.running:
            return defer.fail(PublishUnavailable("the API is not running"))
        conn_id = envelope.api_conn_id(self.server_id, next(self._ids))
        item = envelope.frame_item(user_id, self.server_id, conn_id, ts, frame, trusted=trusted)
        waiter: defer.Deferred = defer.Deferred()
        self._waiting[conn_id] = waiter

        def timed_out() -> None:
            if self._waiting.pop(conn_id, None) is waiter and not waiter.called:
                waiter.errback(PublishUnavailable(
                    f"no reply from the processors within {self.timeout:g}s"))

        timer = self.clock.callLater(self.timeout, timed_out)

        def published_failed(f: Failure) -> None:
            if self._waiting.pop(conn_id, None) is waiter and not waiter.called:
                waiter.errback(PublishUnavailable(f"RabbitMQ did not take the message: {f.getErrorMessage()}"))

        self._publisher.submit(item).addErrback(published_failed)

        def finished(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            self._waiting.pop(conn_id, None)
            return result

        return waiter.addBoth(finished)

    def _on_reply(self, message: Any) -> None:
        """A batch routed to this imapi: hand each reply to its request, then ack."""
        try:
            self._dispatch(message.body)
        except Exception:
            self.log.failure("api {uuid}: bad reply batch; dropped", uuid=self.server_id)
        finally:
            message.ack()

    def _dispatch(self, body: bytes) -> None:
        try:
            deliveries = envelope.parse_deliveries(body)
        except envelope.MalformedBatch as e:
            self.log.warn("api {uuid}: malformed reply batch ({err}); dropped: {body!r:.200}",
                          uuid=self.server_id, err=e, body=body)
            return
        for delivery in deliveries:
            frames = delivery.frames
            reply = next((f for f in frames if f.get("type") in _REPLY_TYPES), None)
            if reply is None:
                reply = next((f for f in frames if f.get("type") == "error"), None)
            if reply is None:
                continue  # nothing a request waits for (a delivery would be a processor bug)
            for conn_id in delivery.conn_ids:
                waiter = self._waiting.pop(conn_id, None)
                if waiter is not None and not waiter.called:
                    waiter.callback(reply)


#: the replies a request waits for (an ``error`` frame answers any of them)
_REPLY_TYPES = frozenset({"message_reply", "recall_reply", "members_reply"})


def _is_duplicate(reply: dict, item_ts: int) -> bool:
    """Whether ``reply`` answers a message stored before this request.

    Processors say so with ``"duplicate"`` on replies to API connections
    (docs/internals.rst); without it, a new message's ``ts`` is the item's
    ``ts`` (the store records it as ``created_at``) while a duplicate's is the
    original's.
    """
    flag = reply.get("duplicate")
    if isinstance(flag, bool):
        return flag
    return reply.get("ok") is True and reply.get("ts") != item_ts

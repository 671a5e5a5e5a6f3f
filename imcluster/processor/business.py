"""Calls to business servers (HTTP-API.md "Calls the cluster makes to business servers").

Three parts, each off until its URL is set:

:class:`ModerationService` (``moderation_url``)
    one more moderation filter (:mod:`imcluster.processor.filters`), the
    last in the chain: a signed JSON ``POST`` of
    ``{"sessionId","from","clientMsgId","body"}`` per message, answered
    ``{"verdict":"accept"}``, ``{"verdict":"reject","reason"?}`` or
    ``{"verdict":"replace","body":...}``. The calls of one window run at
    once (the message handler gathers them); each is bounded by
    ``moderation_timeout``; a timeout, an error or an answer that is not one
    of those gets ``moderation_failure`` (``reject`` by default). A
    duplicate never reaches it (the message handler asks the store first).
:class:`Outgoing` (``webhook_url``, ``push_url``)
    run by the pipeline for every window once its messages are stored, beside
    the routing and before the window's queue messages are acknowledged: ONE
    persistent, confirmed AMQP message to ``<ns>.webhooks`` with the window's
    events (``message.stored`` for each new message, ``session.members`` for
    each session created) and ONE to ``<ns>.push`` with a push request for
    every recipient that had no connection when the window committed
    (``twistd impush`` sends them). The store-and-route path never waits for a
    business server: only for the broker's confirms.
:class:`WebhookService`
    consumes ``<ns>.webhooks`` and POSTs each event, signed, to
    ``webhook_url`` (``{"event","eventId","data"}``, headers
    ``X-Imcluster-Event``, ``X-Imcluster-Event-Id``,
    ``X-Imcluster-Signature``). Events of one key (a session, or
    ``user:<id>``) go one at a time, in queue order; a failed call is
    retried with backoff (``retry_delay`` doubling up to
    ``retry_max_delay``) until ``webhook_retry`` has passed since its first
    attempt, then the event is dead-lettered to ``<ns>.dead``; a queue
    message is acknowledged once each of its events was delivered or
    dead-lettered (at least once). Order across processors: the processors
    consume ``<ns>.webhooks`` with an *exclusive consumer* (one consumer at
    a time, no queue argument); the others stand by and take over within
    ``standby_interval`` seconds when it goes. A receiver that is slow or
    down holds up only its own key's events, never a delivery.

Signatures: ``X-Imcluster-Signature: sha256=<hex HMAC-SHA256 of the raw body
with webhook_secret>`` (:func:`imcluster.envelope.sign`).
"""

from __future__ import annotations

import collections
import hashlib
import json
import time
import uuid
from typing import Any, Sequence

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.internet import protocol as tprotocol
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from imcluster import envelope, metrics, protocol
from imcluster.interfaces import IMessageFilter
from imcluster.processor.filters import Verdict

MODERATION = "moderation"
WEBHOOK = "webhook"


# --- HTTP ------------------------------------------------------------------------------


@implementer(IBodyProducer)
class _Bytes:
    """A request body known in full (Content-Length set; no cooperator)."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> defer.Deferred:  # noqa: N802 (Twisted API)
        consumer.write(self.body)
        return defer.succeed(None)

    def pauseProducing(self) -> None:  # noqa: N802
        pass

    def resumeProducing(self) -> None:  # noqa: N802
        pass

    def stopProducing(self) -> None:  # noqa: N802
        pass


class _Collect(tprotocol.Protocol):
    """Reads a response body up to ``limit`` bytes (more: the call fails)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0
        self.done: defer.Deferred = defer.Deferred(lambda _: self._abort())

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted API)
        self.size += len(data)
        if self.size > self.limit:
            self._abort()
            if not self.done.called:
                self.done.errback(CallFailed(f"answer above {self.limit} bytes"))
            return
        self.parts.append(data)

    def connectionLost(self, reason: Failure = None) -> None:  # noqa: N802 (Twisted API)
        if self.done.called:
            return
        if reason is None or reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(reason)


class CallFailed(Exception):
    """A call to a business server that did not succeed (error, timeout, status)."""


class HTTPCaller:
    """Signed JSON POSTs through one :class:`~twisted.web.client.Agent` with a persistent pool.

    ``post`` fires with ``(status, body bytes)`` or fails with
    :class:`CallFailed` (connection error, or no full answer within
    ``timeout`` seconds: the request is cancelled).
    """

    def __init__(self, secret: str, reactor: Any = None, persistent: int = 32, limit: int = 1048576) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.secret = secret or ""
        self.limit = limit
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = persistent
        self.pool.retryAutomatically = False  # a POST is not retried behind our back
        self.agent = Agent(reactor, pool=self.pool)

    def post(self, url: str, event: str, body: bytes, timeout: float,
             extra: dict[str, str] | None = None) -> defer.Deferred:
        headers = Headers({
            b"content-type": [b"application/json"],
            b"user-agent": [b"imcluster"],
            envelope.EVENT_HEADER.encode(): [event.encode()],
            envelope.SIGNATURE_HEADER.encode(): [envelope.sign(self.secret, body).encode()],
        })
        for k, v in (extra or {}).items():
            headers.addRawHeader(k.encode(), v.encode())

        async def call() -> tuple[int, bytes]:
            response = await self.agent.request(b"POST", url.encode(), headers, _Bytes(body))
            reader = _Collect(self.limit)
            response.deliverBody(reader)
            return response.code, await reader.done

        d = defer.Deferred.fromCoroutine(call())
        d.addTimeout(timeout, self.reactor)

        def failed(f: Failure) -> Failure:
            if f.check(defer.TimeoutError, defer.CancelledError):
                return Failure(CallFailed(f"no answer within {timeout:g}s"))
            return Failure(CallFailed(f.getErrorMessage() or f.type.__name__))

        return d.addErrback(failed)

    def close(self) -> defer.Deferred:
        return self.pool.closeCachedConnections()


# --- moderation -------------------------------------------------------------------------


@implementer(IMessageFilter)
class ModerationService:
    """The moderation service as a filter (module docstring); never fails, never waits past ``timeout``."""

    name = "moderation_url"
    log = Logger()

    def __init__(self, url: str, caller: HTTPCaller, timeout: float = 2.0, failure: str = "reject",
                 clock: Any = None, concurrency: int = 100) -> None:
        self.url = url
        self.caller = caller
        self.timeout = timeout
        self.failure = failure
        self._slots = defer.DeferredSemaphore(concurrency)
        self.clock = clock if clock is not None else caller.reactor
        #: calls made (tests: a duplicate never comes here)
        self.calls = 0

    @classmethod
    def from_config(cls, config: Any, caller: HTTPCaller | None = None) -> "ModerationService":
        v = config.values
        return cls(v["moderation_url"], caller or HTTPCaller(v.get("webhook_secret") or ""),
                   v.get("moderation_timeout", 2.0), v.get("moderation_failure", "reject"),
                   concurrency=v.get("moderation_concurrency", 100))

    def check(self, message: dict) -> defer.Deferred:
        self.calls += 1
        body = json.dumps({"sessionId": message.get("sessionId"), "from": message.get("from"),
                           "clientMsgId": message.get("clientMsgId"), "body": message.get("body")},
                          separators=(",", ":"), ensure_ascii=False).encode()
        started = time.monotonic()

        def answered(result: tuple[int, bytes]) -> Verdict:
            code, raw = result
            metrics.BUSINESS_LATENCY.labels(kind=MODERATION).observe(time.monotonic() - started)
            verdict = _verdict(code, raw)
            if verdict is None:
                metrics.BUSINESS_CALLS.labels(kind=MODERATION, outcome="failed").inc()
                self.log.warn("moderation service answered {code} {body}: {policy} (moderation_failure)",
                              code=code, body=raw[:200], policy=self.failure)
                return self._fallback()
            metrics.BUSINESS_CALLS.labels(kind=MODERATION, outcome="ok").inc()
            return verdict

        def failed(f: Failure) -> Verdict:
            metrics.BUSINESS_LATENCY.labels(kind=MODERATION).observe(time.monotonic() - started)
            metrics.BUSINESS_CALLS.labels(kind=MODERATION, outcome="failed").inc()
            self.log.warn("moderation service failed ({err}): {policy} (moderation_failure)",
                          err=f.getErrorMessage(), policy=self.failure)
            return self._fallback()

        # the timeout counts from the call, not from the wait for a slot
        return self._slots.run(self.caller.post, self.url, MODERATION, body, self.timeout).addCallbacks(
            answered, failed)

    def _fallback(self) -> Verdict:
        if self.failure == "accept":
            return Verdict.accept()
        return Verdict.reject("the moderation service is unavailable")


def _verdict(code: int, raw: bytes) -> Verdict | None:
    """The verdict of a moderation answer; None when it is not a valid one."""
    if not 200 <= code < 300:
        return None
    try:
        answer = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(answer, dict):
        return None
    verdict = answer.get("verdict")
    if verdict == "accept":
        return Verdict.accept()
    if verdict == "reject":
        reason = answer.get("reason")
        return Verdict.reject(reason if isinstance(reason, str) and reason else "rejected by moderation")
    if verdict == "replace" and "body" in answer:
        return Verdict.replace(answer["body"])
    return None


# --- outgoing: what a window publishes ------------------------------------------------------


def stable_event_id(*parts: str) -> str:
    """A uuid4-shaped hex id derived from ``parts``: the same event published again keeps its ``eventId``."""
    digest = hashlib.sha256("\x00".join(parts).encode()).digest()
    return uuid.UUID(bytes=digest[:16], version=4).hex


#: message kinds that are events about a message, not messages (no push for them)
_EVENT_KINDS = frozenset({"recall", "edit", "members"})


class Outgoing:
    """What a stored window publishes for business servers (module docstring)."""

    log = Logger()

    def __init__(self, bus: Any, config: Any) -> None:
        v = config.values
        self.bus = bus
        self.namespace = v.get("namespace", "im")
        self.webhooks = bool(v.get("webhook_url"))
        self.events = set(v.get("webhook_events") or ()) if self.webhooks else set()
        self.push = bool(v.get("push_url"))
        names = bus.names if hasattr(bus, "names") else None
        self.webhooks_queue = names.webhooks_queue() if names else None
        self.push_queue = names.push_queue() if names else None
        self.budget = getattr(bus, "max_publish_bytes", 8 * 1024 * 1024) - 1024

    @property
    def enabled(self) -> bool:
        return bool(self.events) or self.push

    def declare(self) -> defer.Deferred:
        """Declare ``<ns>.webhooks`` / ``<ns>.push`` (a publish to a queue not there would be dropped)."""
        ds = []
        declare = getattr(self.bus, "declare_queue", None)
        if declare is None:
            return defer.succeed(None)
        if self.events:
            ds.append(declare(self.webhooks_queue))
        if self.push:
            ds.append(declare(self.push_queue))
        return defer.gatherResults(ds, consumeErrors=True).addErrback(lambda f: f.value.subFailure)

    def collect(self, w: Any) -> tuple[list[dict], list[dict]]:
        """``(events, push requests)`` of a stored window.

        Every entry the window stored, in each session's seq order: a
        message, a ``recall`` or ``edit`` is ``message.stored`` (the latter
        two with ``kind``/``ref``, as in history); a ``members`` event
        (``session_create``, imapi's member changes) is ``session.members``.
        Push requests are for plain messages only.
        """
        events: list[dict] = []
        pushes: list[dict] = []
        seen: set[str] = set()
        online = w.online
        # a window split out of one that failed (poison isolation) may hold entries its
        # parent stored but never published: they come back as duplicates
        again = getattr(w, "first_failed", None) is not None
        for item, result in sorted(_entries(w), key=lambda e: (e[1].session_id, e[1].seq)):
            if result.msg_id in seen:
                continue
            if result.duplicate and not (again or _redelivered(item)):
                continue  # a client's retry: its events went out with the original
            seen.add(result.msg_id)
            kind = getattr(result, "kind", "message")
            if kind == "members":
                if envelope.SESSION_MEMBERS in self.events:
                    body = result.body if isinstance(result.body, dict) else {}
                    e = envelope.session_members_event(result.session_id, body.get("added") or [],
                                                       body.get("removed") or [])
                    e["eventId"] = stable_event_id(self.namespace, envelope.SESSION_MEMBERS, result.msg_id)
                    events.append(e)
                continue
            if envelope.MESSAGE_STORED in self.events:
                e = envelope.message_stored_event(result)
                e["eventId"] = stable_event_id(self.namespace, envelope.MESSAGE_STORED, result.msg_id)
                events.append(e)
            if self.push and not result.duplicate and kind not in _EVENT_KINDS:
                for user in result.recipients:
                    if user not in online:
                        req = envelope.push_request(result, user)
                        req["eventId"] = stable_event_id(self.namespace, "push", result.msg_id, user)
                        pushes.append(req)
        return events, pushes

    async def publish(self, w: Any) -> None:
        """Publish the window's events and push requests (one AMQP message each, confirmed)."""
        events, pushes = self.collect(w)
        ds = []
        if events:
            for body in envelope.events_bodies(events, self.budget):
                ds.append(self.bus.publish(self.webhooks_queue.routing_key, body))
        if pushes:
            for body in envelope.push_bodies(pushes, self.budget):
                ds.append(self.bus.publish(self.push_queue.routing_key, body))
        if not ds:
            return
        results = await defer.DeferredList(ds, consumeErrors=True)
        for ok, value in results:
            if not ok:
                value.raiseException()
        if events:
            metrics.BUSINESS_PUBLISHED.labels(queue="webhooks").inc(len(events))
        if pushes:
            metrics.BUSINESS_PUBLISHED.labels(queue="push").inc(len(pushes))


def _entries(w: Any) -> list[tuple[Any, Any]]:
    """``(item, Stored)`` of every session entry the window stored (messages and events)."""
    out = []
    for item in w.of_type(protocol.MESSAGE):
        result = w.stored.get(id(item))
        if result is not None and result.ok:
            out.append((item, result))
    # session_create answers (session_id, members, members event); recall, edit and
    # members answer (event, members); no event: None
    for types, at in (((protocol.SESSION_CREATE,), 2), (tuple(_EVENT_KINDS), 0)):
        for item in w.of_type(*types):
            status, value = w.answers.get(id(item), ("error", None))
            if status == "ok" and isinstance(value, tuple) and len(value) > at and value[at] is not None:
                out.append((item, value[at]))
    return out


def _redelivered(item: Any) -> bool:
    """True when the item's queue message came again from RabbitMQ (a processor died before acking it)."""
    env = getattr(item, "envelope", None)
    msg = getattr(env, "message", None)
    return bool(getattr(msg, "redelivered", False))


# --- webhooks: the consumer -------------------------------------------------------------------


class _Held:
    """One queue message of ``<ns>.webhooks``: acknowledged once each of its events is done."""

    __slots__ = ("message", "left")

    def __init__(self, message: Any, left: int) -> None:
        self.message = message
        self.left = left

    def done(self) -> None:
        self.left -= 1
        if self.left == 0:
            self.message.ack()


class WebhookService(service.Service):
    """Consumes ``<ns>.webhooks`` and calls ``webhook_url`` (module docstring)."""

    log = Logger()
    #: seconds between attempts of a standby processor to become the queue's consumer
    standby_interval = 5.0

    def __init__(self, config: Any, bus: Any, caller: HTTPCaller | None = None, clock: Any = None,
                 name: str = "webhooks") -> None:
        v = config.values
        self.setName(name)
        self.bus = bus
        self.url = v["webhook_url"]
        self.events = set(v.get("webhook_events") or ())
        self.retry = float(v.get("webhook_retry", 3600.0))
        self.timeout = float(v.get("webhook_timeout", 10.0))
        self.first_delay = float(v.get("retry_delay", 0.5))
        self.max_delay = float(v.get("retry_max_delay", 30.0))
        self.prefetch = int(v.get("webhook_prefetch", 200))
        self.caller = caller or HTTPCaller(v.get("webhook_secret") or "", limit=v.get("max_body_size", 1048576))
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = clock
        self.queue = bus.names.webhooks_queue()
        self._slots = defer.DeferredSemaphore(int(v.get("webhook_concurrency", 32)))
        self._keys: dict[str, collections.deque] = {}
        self._sleeps: set[defer.Deferred] = set()
        self._standby: Any = None
        self.consumer: Any = None
        self._stopping = False
        #: fires once this processor consumes the queue (tests)
        self.consuming: defer.Deferred = defer.Deferred()

    # --- lifecycle

    def startService(self) -> None:  # noqa: N802 (Twisted API)
        super().startService()
        self._stopping = False
        self._consume()

    def _consume(self) -> None:
        self._standby = None
        if self._stopping:
            return
        d = self.bus.consume(self.queue, self._on_message, prefetch=min(self.prefetch, 65535), exclusive=True)

        def consuming(consumer: Any) -> None:
            self.consumer = consumer
            self.log.info("webhooks: consuming {queue} for {url}", queue=self.queue.name, url=self.url)
            if not self.consuming.called:
                self.consuming.callback(self)

        def standby(f: Failure) -> None:
            if self._stopping:
                return
            self.log.info("webhooks: {queue} has its consumer elsewhere ({err}); standing by",
                          queue=self.queue.name, err=f.getErrorMessage())
            self._standby = self.clock.callLater(self.standby_interval, self._consume)

        d.addCallbacks(consuming, standby)

    def stopService(self) -> defer.Deferred:  # noqa: N802 (Twisted API)
        super().stopService()
        self._stopping = True
        if self._standby is not None and self._standby.active():
            self._standby.cancel()
        for d in list(self._sleeps):
            d.cancel()
        consumer, self.consumer = self.consumer, None
        ds = [self.caller.close()]
        if consumer is not None:
            ds.insert(0, consumer.cancel())  # unacknowledged messages go back to the queue
        return defer.DeferredList(ds, consumeErrors=True)

    # --- messages

    def _on_message(self, message: Any) -> None:
        try:
            events = envelope.parse_events(message.body)
        except envelope.MalformedBatch as e:
            self.log.warn("webhooks: dead-lettering a malformed message ({err})", err=str(e))
            self.bus.dead_letter(message.body, f"malformed webhook events: {e}").addCallbacks(
                lambda _: message.ack(), lambda _: message.nack(requeue=True))
            return
        wanted = [e for e in events if e["event"] in self.events]
        if not wanted:
            message.ack()
            return
        held = _Held(message, len(wanted))
        for e in wanted:
            queue = self._keys.get(e["key"])
            if queue is None:
                queue = self._keys[e["key"]] = collections.deque()
                queue.append((e, held))
                defer.Deferred.fromCoroutine(self._drain(e["key"], queue)).addErrback(
                    lambda f: self.log.failure("webhooks: a key's delivery failed", f))
            else:
                queue.append((e, held))

    async def _drain(self, key: str, queue: collections.deque) -> None:
        """Deliver ``key``'s events one at a time, in order (the key's queue goes once it is empty)."""
        try:
            while queue and not self._stopping:
                e, held = queue[0]
                if await self._deliver(e):
                    queue.popleft()
                    held.done()
        finally:
            if self._keys.get(key) is queue:
                del self._keys[key]

    async def _deliver(self, e: dict) -> bool:
        """Call until it succeeds or ``webhook_retry`` passes (then dead-letter); False when stopping."""
        body = json.dumps({"event": e["event"], "eventId": e["eventId"], "data": e["data"]},
                          separators=(",", ":"), ensure_ascii=False).encode()
        first = self.clock.seconds()
        attempt = 0
        while not self._stopping:
            if attempt:
                metrics.BUSINESS_RETRIES.labels(kind=WEBHOOK).inc()
            attempt += 1
            started = time.monotonic()
            error = await self._slots.run(self._call, e, body)
            metrics.BUSINESS_LATENCY.labels(kind=WEBHOOK).observe(time.monotonic() - started)
            if error is None:
                metrics.BUSINESS_CALLS.labels(kind=WEBHOOK, outcome="ok").inc()
                return True
            metrics.BUSINESS_CALLS.labels(kind=WEBHOOK, outcome="failed").inc()
            waited = self.clock.seconds() - first
            if waited >= self.retry:
                return await self._dead_letter(e, body, f"webhook {e['event']} failed for {waited:.0f}s "
                                                         f"({attempt} attempts): {error}")
            delay = min(self.max_delay, self.first_delay * 2 ** (attempt - 1), max(0.0, self.retry - waited))
            self.log.info("webhook {event} {id} failed ({err}); again in {delay:.1f}s", event=e["event"],
                          id=e["eventId"], err=error, delay=delay)
            if not await self._sleep(delay):
                return False
        return False

    def _call(self, e: dict, body: bytes) -> defer.Deferred:
        def answered(result: tuple[int, bytes]) -> str | None:
            code = result[0]
            return None if 200 <= code < 300 else f"HTTP {code}"

        return self.caller.post(self.url, e["event"], body, self.timeout,
                                {"X-Imcluster-Event-Id": e["eventId"]}).addCallbacks(
            answered, lambda f: f.getErrorMessage() or "failed")

    async def _dead_letter(self, e: dict, body: bytes, reason: str) -> bool:
        self.log.warn("webhooks: dead-lettering {event} {id}: {reason}", event=e["event"], id=e["eventId"],
                      reason=reason)
        attempt = 0
        while not self._stopping:
            try:
                await self.bus.dead_letter(json.dumps([e]).encode(), reason)
            except Exception as err:  # the broker is down: the event waits (its key's order holds)
                attempt += 1
                self.log.warn("webhooks: cannot dead-letter {id} ({err})", id=e["eventId"], err=str(err))
                if not await self._sleep(min(self.max_delay, self.first_delay * 2 ** attempt)):
                    return False
                continue
            metrics.BUSINESS_DEAD.labels(kind=WEBHOOK).inc()
            return True
        return False

    async def _sleep(self, seconds: float) -> bool:
        """Wait; False when the service stopped meanwhile."""
        d = task.deferLater(self.clock, seconds, lambda: None)
        self._sleeps.add(d)
        try:
            await d
        except defer.CancelledError:
            return False
        finally:
            self._sleeps.discard(d)
        return not self._stopping


def build(config: Any, bus: Any) -> tuple[list, Outgoing | None, WebhookService | None]:
    """``(extra filters, outgoing, webhook service)`` for a processor's ``config`` (None: off)."""
    v = config.values
    caller = None
    filters: list = []
    if v.get("moderation_url"):
        caller = HTTPCaller(v.get("webhook_secret") or "", limit=v.get("max_body_size", 1048576),
                            persistent=v.get("moderation_concurrency", 100))
        filters.append(ModerationService.from_config(config, caller))
    outgoing = Outgoing(bus, config)
    webhooks = WebhookService(config, bus) if v.get("webhook_url") else None
    return filters, (outgoing if outgoing.enabled else None), webhooks


__all__: Sequence[str] = ["HTTPCaller", "ModerationService", "Outgoing", "WebhookService", "build",
                          "stable_event_id"]

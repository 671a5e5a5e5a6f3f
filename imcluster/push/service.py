"""The impush consumer: ``<ns>.push`` in, signed POSTs to ``push_url`` out, at least once.

:class:`PushService` consumes the durable queue ``<ns>.push`` (bound to
``<ns>.exchange`` with the routing key ``<ns>.push``; any number of impush
daemons share it, RabbitMQ hands each message to one of them). A message is
a JSON array of push requests (:func:`imcluster.envelope.parse_push_body`),
one per recipient that had no live connection when the message was stored.

For one AMQP message:

1. the devices of all its users are read in one statement
   (:meth:`imcluster.store.devices.DeviceStore.devices_of`; PostgreSQL
   down: retried with backoff, nothing is acknowledged meanwhile); a user
   without a device is skipped;
2. each remaining request is POSTed as
   ``{"eventId","userId","devices":[...],"sessionId","msgId","from","seq","preview"}``
   (:mod:`imcluster.push.client`), at most ``push_concurrency`` calls at
   once per daemon, each bounded by ``push_timeout``;
3. an answer naming invalid devices (404/410, or ``{"invalid":[...]}``)
   removes them from PostgreSQL (only rows still holding the token pushed);
4. a failed call is retried with backoff (``push_retry_delay`` doubling up
   to ``push_retry_max_delay``) until ``push_retry`` seconds after its first
   attempt; then, or at once for an answer a retry cannot cure, the request
   is dead-lettered to ``<ns>.dead`` (header ``x-imcluster-reason``);
5. the AMQP message is acknowledged once every request of it is done
   (delivered, removed or dead-lettered): a daemon that dies meanwhile
   leaves it to another (a request may then be pushed twice: the receiver
   de-duplicates by ``eventId``).

RabbitMQ closes a channel whose delivery stays unacknowledged past its
``consumer_timeout`` (30 min by default), and a one-hour ``push_retry``
would cross it: a request still failing after ``push_hold`` seconds of its
message's life is published again to ``<ns>.push`` (confirmed) with its
first attempt and attempt count in headers, and the message is acknowledged;
whichever impush gets it waits its next backoff and goes on.

Stopping (SIGTERM): no new call starts, calls in flight finish, the consumer
is cancelled; unacknowledged messages go back to the queue.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from imcluster import envelope, metrics
from imcluster.bus import BusNames, QueueSpec
from imcluster.push.client import FAILED, INVALID, OK, REFUSED

#: headers of a request published again after push_hold (ms since the epoch; count)
FIRST_ATTEMPT = "x-imcluster-first-attempt"
ATTEMPTS = "x-imcluster-attempts"


def push_queue(namespace: str, queue_type: str = "classic") -> QueueSpec:
    """``<ns>.push``: durable, bound to ``<ns>.exchange`` with ``<ns>.push``, of ``--queue-type``.

    The same declaration as the processors' (:meth:`imcluster.bus.BusNames.push_queue`).
    """
    return BusNames(namespace, queue_type).push_queue()


class Stopping(Exception):
    """The daemon is stopping: leave the message unacknowledged (it is redelivered)."""


def backoff(attempts: int, first: float, most: float) -> float:
    """``first`` doubled per attempt after the first, at most ``most``."""
    return min(most, first * (2 ** max(0, attempts - 1)))


class PushService(service.Service):
    """Consumes ``<ns>.push`` and delivers push requests (module docstring).

    ``bus``: IMessageBus; ``devices``: :class:`~imcluster.store.devices.DeviceStore`;
    ``client``: :class:`~imcluster.push.client.PushClient`.
    """

    log = Logger()

    def __init__(self, config: Any, bus: Any, devices: Any, client: Any, clock: Any = None,
                 push_hold: float = 600.0, name: str = "push") -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self.config = config
        self.bus = bus
        self.devices = devices
        self.client = client
        self.clock = clock
        self.push_hold = push_hold
        self.setName(name)
        self.queue = push_queue(config.namespace, config.queue_type)
        self.consumer: Any = None
        self.ready: defer.Deferred = defer.Deferred()
        self._calls = defer.DeferredSemaphore(config.push_concurrency)
        self._stopping = False
        self._waits: dict[Any, defer.Deferred] = {}  # backoff timers -> their Deferred
        self._running: set[defer.Deferred] = set()  # one per AMQP message being handled

    @property
    def healthy(self) -> bool:
        return self.running and self.consumer is not None and getattr(self.consumer, "active", False)

    def startService(self) -> None:  # noqa: N802 (Twisted API)
        super().startService()
        self._stopping = False
        d = self.bus.consume(self.queue, self._on_message, prefetch=self.config.push_prefetch)

        def consuming(consumer: Any) -> None:
            self.consumer = consumer
            self.log.info("impush consuming {queue} (prefetch {prefetch}, {n} calls at once) for {url}",
                          queue=self.queue.name, prefetch=self.config.push_prefetch,
                          n=self.config.push_concurrency, url=self.config.push_url)
            self.ready.callback(self)

        def failed(f: Any) -> None:
            self.log.error("impush cannot consume {queue}: {err}", queue=self.queue.name, err=f.getErrorMessage())
            if not self.ready.called:
                self.ready.errback(f)
                self.ready.addErrback(lambda _: None)

        d.addCallbacks(consuming, failed)

    @defer.inlineCallbacks
    def stopService(self):  # noqa: N802
        super().stopService()
        self._stopping = True
        for call, d in list(self._waits.items()):
            if call.active():
                call.cancel()
            if not d.called:
                d.errback(Stopping())
        self._waits.clear()
        if self._running:
            self.log.info("impush stopping: finishing the calls in flight of {n} messages", n=len(self._running))
            yield defer.DeferredList(list(self._running), consumeErrors=True)
        if self.consumer is not None:
            yield self.consumer.cancel()
        yield self.client.close()

    # --- messages

    def _on_message(self, message: Any) -> None:
        if self._stopping:
            return  # redelivered once our channel closes
        d = defer.Deferred.fromCoroutine(self._handle(message))
        self._running.add(d)
        d.addErrback(self._failed, message)
        d.addBoth(lambda _: self._running.discard(d))

    def _failed(self, f: Any, message: Any) -> None:
        if f.check(Stopping) or self._stopping:
            return  # not acknowledged: another impush gets it
        self.log.failure("impush: a message failed unexpectedly; it goes back to the queue", f)
        message.nack(requeue=True)

    async def _handle(self, message: Any) -> None:
        received = self.clock.seconds()
        try:
            requests, bad = envelope.parse_push_body(message.body)
        except envelope.MalformedBatch as e:
            self.log.error("dead-lettering a <ns>.push message that is no array of push requests ({err}): "
                           "{body!r:.200}", err=str(e), body=message.body)
            await self._dead_letter(message.body, f"not a push message: {e}")
            message.ack()
            return
        if bad:
            metrics.PUSH_SKIPPED.labels(reason="malformed").inc(bad)
            self.log.warn("{n} malformed push requests skipped", n=bad)
        headers = message.headers or {}
        first = headers.get(FIRST_ATTEMPT)
        first = first / 1000.0 if isinstance(first, int) else None
        attempts = headers.get(ATTEMPTS)
        attempts = attempts if isinstance(attempts, int) and attempts > 0 else 0
        found = await self._lookup([r["userId"] for r in requests])
        work = []
        for request in requests:
            devices = found.get(request["userId"])
            if not devices:
                metrics.PUSH_SKIPPED.labels(reason="no_device").inc()
                continue
            payload = {"eventId": request["eventId"], "userId": request["userId"], "devices": devices}
            payload.update({k: v for k, v in request.items() if k not in payload})
            work.append(defer.Deferred.fromCoroutine(self._deliver(payload, received, first, attempts)))
        if work:
            results = await defer.DeferredList(work, consumeErrors=True)
            for ok, result in results:
                if not ok:
                    result.raiseException()  # Stopping: leave the message to another impush
        message.ack()

    async def _lookup(self, user_ids: list[str]) -> dict:
        attempts = 0
        while True:
            try:
                return await self.devices.devices_of(user_ids)
            except Exception as e:
                attempts += 1
                delay = backoff(attempts, self.config.push_retry_delay, min(30.0, self.config.push_retry_max_delay))
                self.log.warn("impush: reading devices failed ({err}); again in {delay:.1f}s", err=e, delay=delay)
                await self._sleep(delay)

    async def _deliver(self, payload: dict, received: float, first: float | None, attempts: int) -> None:
        """One push request until delivered, its devices removed, dead-lettered or handed on."""
        config = self.config
        if attempts:
            # handed on after push_hold: wait the backoff it was due
            await self._sleep(backoff(attempts, config.push_retry_delay, config.push_retry_max_delay))
        if first is None:
            first = time.time()
        while True:
            if self._stopping:
                raise Stopping()
            outcome, seconds = await self._calls.run(lambda: defer.Deferred.fromCoroutine(self.client.post(payload)))
            attempts += 1
            metrics.PUSH_CALLS.labels(result=outcome.result).inc()
            metrics.PUSH_LATENCY.observe(seconds)
            if outcome.result == OK:
                return
            if outcome.result == INVALID:
                await self._remove(payload, outcome.invalid)
                return
            if outcome.result == REFUSED:
                await self._dead_letter(envelope.push_body([payload]), f"push_url refused it: {outcome.why}")
                return
            assert outcome.result == FAILED
            elapsed = time.time() - first
            delay = backoff(attempts, config.push_retry_delay, config.push_retry_max_delay)
            if elapsed + delay > config.push_retry:
                await self._dead_letter(envelope.push_body([payload]),
                                        f"push_url failed for {elapsed:.0f}s ({attempts} calls; last: "
                                        f"{outcome.why}); push_retry is {config.push_retry:g}s")
                return
            metrics.PUSH_RETRIES.inc()
            if self.clock.seconds() - received + delay > self.push_hold:
                await self._hand_on(payload, first, attempts)
                return
            self.log.info("push {event} to {user} failed ({why}); retry {n} in {delay:.1f}s",
                          event=payload["eventId"], user=payload["userId"], why=outcome.why, n=attempts,
                          delay=delay)
            await self._sleep(delay)

    async def _hand_on(self, payload: dict, first: float, attempts: int) -> None:
        request = {k: v for k, v in payload.items() if k != "devices"}
        headers = {FIRST_ATTEMPT: int(first * 1000), ATTEMPTS: attempts}
        while True:
            try:
                await self.bus.publish(self.queue.routing_key, envelope.push_body([request]), headers=headers)
                self.log.info("push {event} to {user}: still failing after push_hold; handed on to {queue} "
                              "(attempt {n})", event=request["eventId"], user=request["userId"],
                              queue=self.queue.name, n=attempts)
                return
            except Exception as e:
                if self._stopping:
                    raise Stopping() from None
                self.log.warn("impush: handing a request on failed ({err}); again in 1s", err=e)
                await self._sleep(1.0)

    async def _remove(self, payload: dict, device_ids: list[str]) -> None:
        tokens = {d["deviceId"]: d["token"] for d in payload["devices"]}
        try:
            n = await self.devices.remove(payload["userId"], device_ids, tokens)
        except Exception as e:  # the next push to it removes it then
            self.log.warn("impush: removing invalid devices {ids} of {user} failed: {err}",
                          ids=device_ids, user=payload["userId"], err=e)
            return
        metrics.PUSH_DEVICES_REMOVED.inc(n)
        self.log.info("impush: the provider called devices {ids} of {user} invalid; {n} removed",
                      ids=device_ids, user=payload["userId"], n=n)

    async def _dead_letter(self, body: bytes, reason: str) -> None:
        while True:
            try:
                await self.bus.dead_letter(body, reason)
                metrics.PUSH_DEAD.inc()
                self.log.warn("impush: dead-lettered to {dead}: {reason}", dead=self.bus.names.dead, reason=reason)
                return
            except Exception as e:
                if self._stopping:
                    raise Stopping() from None
                self.log.warn("impush: dead-lettering failed ({err}); again in 1s", err=e)
                await self._sleep(1.0)

    def _sleep(self, seconds: float) -> defer.Deferred:
        if self._stopping:
            return defer.fail(Stopping())
        d: defer.Deferred = defer.Deferred()

        def wake() -> None:
            self._waits.pop(call, None)
            d.callback(None)

        call = self.clock.callLater(seconds, wake)
        self._waits[call] = d
        return d

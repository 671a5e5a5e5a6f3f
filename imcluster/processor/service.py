"""The processor's consumer: windows of queue messages, retries, poison, shutdown.

:class:`ProcessorService` consumes ``<ns>.processor`` with a ``prefetch``
window (manual acks). Queue messages (``{"v":1,"items":[...]}``) are gathered
into a :class:`~imcluster.processor.pipeline.Window` of up to ``batch_size``
frame items, or whatever arrived within ``batch_wait`` seconds, and the
window runs through the :class:`~imcluster.processor.pipeline.Pipeline` as
one unit. A window holds whole queue messages (at least one, so a gateway's
coalesced message of more than ``batch_size`` items is one window). Up to
``windows`` windows run at once (default 2), the second only when a full
batch waits (under load: while one waits for PostgreSQL, the next is
stored); the pipeline keeps their seq numbers and their publishes in the
order they started. Messages that arrive meanwhile wait (at most
``prefetch`` of them: memory stays bounded) and form the next one.

Settling
    a queue message is acknowledged only once all its items are applied:
    its window (stored, answered, routed, marked) and each of its ``sync``
    items (run beside the windows by the
    :class:`~imcluster.processor.handlers.sync.Syncer`, at most
    ``sync_concurrency`` at once, so a 100k backlog never holds up other
    work).
Transient failures
    (PostgreSQL, Redis or RabbitMQ down or slow) acknowledge nothing: the
    same window runs again after ``retry_delay`` doubling up to
    ``retry_max_delay`` (one timer, no hot loop), resuming at the stage that
    failed.
    One that lasts ``poison_after`` is set aside so that the windows behind
    it go on (if they fail too, a dependency is down for everyone).
Unexplained failures (poison)
    (a bug, a constraint PostgreSQL enforces, a refused publish): the
    window is split in halves, each run alone at the front, down to the one
    failing item, which waits aside (backoff) while the windows behind it
    go on. Once it has failed for ``poison_after`` and another window
    succeeded meanwhile, it is answered with an error, dead-lettered to
    ``<ns>.dead`` with its reason (:func:`dead_letter_body`, header
    ``x-imcluster-reason``) and counted; its queue message is acknowledged
    once its other items are done. Nothing is dead-lettered while nothing
    else succeeds. A message that is not a v1 batch at all is dead-lettered
    at once. One malformed item is answered with ``bad_frame`` and its
    batch-mates go on.
Several processors
    compete on the queue; the store's unique keys and per-session row
    locks make the result the same as with one.
Stopping
    no new window starts; the windows in flight finish (a retry waiting
    for its timer is abandoned), then the consumer is cancelled, which hands
    every unacknowledged message back to RabbitMQ for redelivery.
"""

from __future__ import annotations

import collections
from typing import Any, Sequence

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from imcluster import metrics, protocol
from imcluster.bus import Refused
from imcluster.envelope import FRAME, SYNC, MalformedBatch, delivery_body, items_body, parse_items
from imcluster.processor.pipeline import (
    Abandoned, Envelope, Pipeline, Syncer, Window, backoff, is_transient)
from imcluster.processor.router import Router


class ProcessorService(service.Service):
    """Consumes ``<ns>.processor`` and runs windows through the pipeline (module docstring).

    ``bus``: IMessageBus; ``registry``: IRegistry; ``store``: IMessageStore;
    ``filters``: moderation filters in order; ``reaper``: checked when a
    gateway is unroutable; ``transient``: more exception classes to treat as
    "a dependency is down" (test doubles).
    """

    log = Logger()

    def __init__(self, config: Any, bus: Any, registry: Any, store: Any, filters: Sequence[Any] = (),
                 reaper: Any = None, clock: Any = None, transient: Sequence[type] = (),
                 name: str = "processor") -> None:
        self.config = config
        self.bus = bus
        self.store = store
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = clock
        self.setName(name)
        self.transient = tuple(transient)
        self.router = Router(registry, bus, clock, config.unroutable_hold,
                             on_unroutable=reaper.check if reaper is not None else None,
                             max_bytes=config.values.get("max_publish_bytes"))
        self.pipeline = Pipeline(store, self.router, filters, config, clock)
        self.syncer = Syncer(store, self.router, config, clock, stopping=lambda: self._stopping,
                             transient=self.transient)
        self.consumer: Any = None
        #: fires once the consumer is active (tests and health checks wait on it)
        self.ready: defer.Deferred = defer.Deferred()
        self._stopping = False
        self._buffer: collections.deque[Envelope] = collections.deque()
        self._buffered = 0  # frame items in _buffer
        self._retry: collections.deque[Window] = collections.deque()  # windows to run before new ones
        self._parked: dict[Window, Any] = {}  # windows waiting to be tried again after an unexplained failure
        self._running: dict[Window, defer.Deferred] = {}  # windows in flight
        self._timer: Any = None
        self._timer_kind = ""
        self._failures = 0  # transient failures in a row
        self._last_success = float("-inf")  # when a window last succeeded (clock seconds)
        self._syncs = defer.DeferredSemaphore(config.sync_concurrency)
        self.syncing = 0

    # --- lifecycle

    @property
    def healthy(self) -> bool:
        """True while consuming (for /healthz)."""
        return self.running and self.consumer is not None and getattr(self.consumer, "active", False)

    def startService(self) -> None:  # noqa: N802 (Twisted API)
        """Start consuming; does not wait for RabbitMQ (the bus consumes once it connects)."""
        super().startService()
        self._stopping = False
        d = self.bus.consume(self.bus.processor_queue(), self._on_message, prefetch=self.config.prefetch)

        def consuming(consumer: Any) -> None:
            self.consumer = consumer
            self.log.info("processor consuming {queue}: batch {batch} / {wait}s, prefetch {prefetch}",
                          queue=self.bus.processor_queue().name, batch=self.config.batch_size,
                          wait=self.config.batch_wait, prefetch=self.config.prefetch)
            self.ready.callback(self)

        def failed(f: Failure) -> None:
            self.log.error("processor cannot consume {queue}: {err}", queue=self.bus.processor_queue().name,
                           err=f.getErrorMessage())
            if not self.ready.called:
                self.ready.errback(f)
                self.ready.addErrback(lambda _: None)

        d.addCallbacks(consuming, failed)

    @defer.inlineCallbacks
    def stopService(self):  # noqa: N802
        """Finish the windows in flight, then cancel the consumer (the rest is redelivered)."""
        super().stopService()
        self._stopping = True
        self._cancel_timer()
        for call in self._parked.values():
            if call.active():
                call.cancel()
        if self._running:
            self.log.info("processor stopping: finishing {n} windows in flight", n=len(self._running))
            waits = []
            for running in self._running.values():
                done: defer.Deferred = defer.Deferred()
                running.addBoth(lambda r, done=done: done.called or done.callback(None))
                waits.append(done)
            yield defer.DeferredList(waits)
        if self.consumer is not None:
            yield self.consumer.cancel()
        left = len(self._buffer) + sum(len(w.envelopes) for w in [*self._retry, *self._parked])
        if left or self.syncing:
            self.log.info("processor stopped; {n} queue messages and {s} syncs left for redelivery",
                          n=left, s=self.syncing)
        self._buffer.clear()
        self._buffered = 0
        self._retry.clear()
        self._parked.clear()

    # --- receiving

    def _on_message(self, message: Any) -> None:
        if self._stopping:
            return  # not settled: the broker redelivers it once our channel closes
        try:
            items = parse_items(message.body, self.config.max_json_depth)
        except MalformedBatch as e:
            self.log.error("dead-lettering a queue message that is not a v1 batch ({err}): {body!r:.200}",
                           err=str(e), body=message.body)
            metrics.DEAD_LETTERED.inc()
            metrics.POISON.labels(reason="malformed").inc()
            # with its reason when the bus can say it, else by the queue's dead-letter exchange
            d = defer.maybeDeferred(self.bus.dead_letter, message.body, f"not a v1 batch: {e}")
            d.addCallbacks(lambda _: message.ack(), lambda _: message.nack(requeue=False))
            return
        env = Envelope(message, items, self.clock.seconds())
        for item in items:
            item.envelope = env
        syncs = [i for i in items if i.kind == SYNC]
        frames = sum(1 for i in items if i.kind == FRAME)
        env.parts = len(syncs) + frames
        if env.parts == 0:
            env.settled = True
            message.ack()  # nothing usable in it (logged by parse_items)
            return
        for item in syncs:
            self._start_sync(env, item)
        if frames:
            self._buffer.append(env)
            self._buffered += frames
            self._kick()

    # --- scheduling windows

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _schedule(self, delay: float, kind: str) -> None:
        self._cancel_timer()
        self._timer_kind = kind
        self._timer = self.clock.callLater(delay, self._fire)

    def _kick(self) -> None:
        """Start the next window when one is due (at most ``windows`` at a time, see _room)."""
        if self._stopping or not self._room():
            return
        if self._timer is not None and self._timer.active():
            if self._timer_kind == "retry":
                return  # backing off: the timer runs the retry
            if self._buffered < self.config.batch_size:
                return  # the batch timer is already set
        if self._retry:
            self._schedule(0, "next")
        elif self._buffer:
            if self._buffered >= self.config.batch_size:
                delay = 0.0
            else:
                # the oldest message waits at most batch_wait
                delay = max(0.0, self._buffer[0].received + self.config.batch_wait - self.clock.seconds())
            self._schedule(delay, "batch")

    def _room(self) -> bool:
        """Whether another window may start now: at most ``windows`` at once,
        and a second one only when a full batch waits.

        Under light load windows run one at a time: measured here, starting
        the next beside one in flight splits the traffic into more, smaller
        transactions whose CPU costs more latency than the waiting it saves
        (p2p at 1,000 msgs/s: p50 12.0 ms one at a time, 13.4 pipelined).
        Under load they overlap (p2p-throughput: 8.9k -> 10.1k msgs/s).
        """
        if not self._running:
            return True
        return len(self._running) < self.config.windows and self._buffered >= self.config.batch_size

    def _take(self) -> Window | None:
        if self._retry:
            return self._retry.popleft()
        envelopes, n = [], 0
        while self._buffer and (not envelopes or n + len(self._buffer[0].frames) <= self.config.batch_size):
            env = self._buffer.popleft()
            k = len(env.frames)
            self._buffered -= k
            n += k
            envelopes.append(env)
        return Window(envelopes) if envelopes else None

    def _fire(self) -> None:
        self._timer = None
        if self._stopping or not self._room():
            return
        if self._retry and self._running:
            return  # a window run again goes alone: the ones in flight may fail the same way
        window = self._take()
        if window is None:
            return
        # items of envelopes settled meanwhile (dead-lettered as a whole) need nothing more
        if any(e.settled for e in window.envelopes):
            kept = Window([], [i for i in window.items if not i.envelope.settled])
            kept.first_failed, kept.failures, kept.attempts = window.first_failed, window.failures, window.attempts
            window = kept
            if not window.items:
                self._kick()
                return
        if window.attempts == 0:
            metrics.BATCH_SIZE.observe(len(window))
        d = self._running[window] = self.pipeline.run(window)
        d.addCallbacks(self._done, self._failed, (window,), None, (window,))
        self._kick()  # the next one may start now

    def _done(self, _: Any, window: Window) -> None:
        self._running.pop(window, None)
        self._failures = 0
        self._last_success = self.clock.seconds()
        window.settle()
        self._kick()

    def _failed(self, failure: Failure, window: Window) -> None:
        """A window failed: retry it, set it aside, split it, or dead-letter its one item (module docstring)."""
        self._running.pop(window, None)
        if self._stopping:
            return  # abandoned: redelivered after the consumer is cancelled
        config = self.config
        now = self.clock.seconds()
        if window.first_failed is None:
            window.first_failed = now
        window.failures += 1
        elapsed = now - window.first_failed
        transient = is_transient(failure, self.transient)
        # other work succeeded since this window began failing: PostgreSQL, Redis and
        # RabbitMQ answer, so what keeps failing here is this window's own
        others_ok = self._last_success > window.first_failed
        err = failure.getErrorMessage() or failure.type.__name__
        if transient and not (others_ok and elapsed >= config.poison_after):
            if elapsed < config.poison_after:
                # a dependency is down: the same window again, after a backoff, before anything else
                self._failures += 1
                metrics.RETRIES.inc()
                delay = backoff(self._failures, config.retry_delay, config.retry_max_delay)
                self.log.warn("window of {n} items failed ({err}); retry {k} in {delay:.2f}s",
                              n=len(window), err=err, k=self._failures, delay=delay)
                self._retry.appendleft(window)
                self._schedule(delay, "retry")
                return
            # failing for poison_after: it may be its own fault; set it aside, the windows
            # behind it go on (if they fail too, a dependency is down for everyone)
            self._park(window, f"window of {len(window)} items failing for {elapsed:.0f}s ({err})")
            return
        if window.poison is None and len(window) > 1:
            # isolate the failing item(s): each half runs alone, at the front
            if not transient:
                self.log.failure("window of {n} items failed unexpectedly; splitting it to isolate the "
                                 "failing item", failure, n=len(window))
            else:
                self.log.warn("window of {n} items failing for {elapsed:.0f}s while other work succeeds "
                              "({err}); splitting it", n=len(window), elapsed=elapsed, err=err)
            for half in reversed(window.halves()):
                self._retry.appendleft(half)
            self._schedule(0, "next")
            return
        if window.poison is not None or (elapsed >= config.poison_after and others_ok):
            self._poison(window, failure)
            return
        self.log.failure("item failed unexpectedly (failure {n}, for {elapsed:.1f}s); set aside, it is "
                         "poison once it failed for {after}s while other work succeeds", failure,
                         n=window.failures, elapsed=elapsed, after=config.poison_after)
        self._park(window, err)

    def _park(self, window: Window, why: str) -> None:
        """Retry ``window`` after a backoff, aside: the windows behind it go on meanwhile."""
        config = self.config
        # parked work is retried at least every few seconds: a dependency back, it goes at once
        delay = backoff(window.failures, config.retry_delay, min(config.retry_max_delay, 5.0))
        self.log.warn("{why}: set aside, again in {delay:.2f}s", why=why, delay=delay)
        self._parked[window] = self.clock.callLater(delay, self._unpark, window)
        self._kick()

    def _poison(self, window: Window, failure: Failure) -> None:
        """Answer the window's one item with an error, dead-letter it with the reason, settle it."""
        item = window.items[0]
        if window.poison is None:
            exc = failure.value
            window.poison = f"{type(exc).__module__}.{type(exc).__name__}: {failure.getErrorMessage()}"[:1000]
            kind = "refused" if failure.check(Refused) else (
                "store" if type(exc).__module__.startswith("psycopg2") else type(exc).__name__)
            metrics.POISON.labels(reason=kind[:40]).inc()
            self.log.error("poison: {item} failed for {elapsed:.1f}s while other work succeeded ({reason}); "
                           "answering it and dead-lettering it to {dead}", item=_describe(item),
                           elapsed=self.clock.seconds() - window.first_failed, reason=window.poison,
                           dead=self.bus.names.dead if hasattr(self.bus, "names") else "<ns>.dead")
            frame = item.frame or {}
            reply = protocol.reply_to(frame, protocol.REJECTED if frame.get("type") == protocol.MESSAGE
                                      else protocol.BAD_FRAME,
                                      "the server cannot process this frame (it fails every time); "
                                      "it was set aside for the operators")
            body = delivery_body([item.conn_id], [protocol.encode(reply)])
            d = self.router.publish_one(item.server_id, body, api=item.api)
            d.addErrback(lambda f: self.log.warn("the poison answer to {conn} was lost: {err}",
                                                 conn=item.conn_id, err=f.getErrorMessage()))
        letter = dead_letter_body(item, window.poison)

        def lettered(_: Any) -> None:
            metrics.DEAD_LETTERED.inc()
            window.settle()
            self._kick()

        def not_yet(f: Failure) -> None:
            if self._stopping:
                return
            self._park(window, f"dead-lettering a poison item failed ({f.getErrorMessage()})")

        self.bus.dead_letter(letter, window.poison).addCallbacks(lettered, not_yet)

    def _unpark(self, window: Window) -> None:
        self._parked.pop(window, None)
        self._retry.append(window)
        self._kick()

    # --- syncs

    def _start_sync(self, env: Envelope, item: Any) -> None:
        def run() -> defer.Deferred:
            if self._stopping:
                return defer.succeed(None)
            self.syncing += 1
            d = self.syncer.run(item)

            def finished(result: Any) -> None:
                self.syncing -= 1
                if isinstance(result, Failure):
                    if result.check(Abandoned) or self._stopping:
                        return
                    self.log.failure("sync of {conn} failed {n} times; dead-lettering its queue message",
                                     result, conn=item.conn_id, n=self.config.max_attempts)
                    env.dead_letter()
                    return
                env.part_done()

            return d.addBoth(finished)

        self._syncs.run(run)


def _describe(item: Any) -> str:
    frame = item.frame or {}
    ref = frame.get("clientMsgId") or frame.get("id") or ""
    return f"{frame.get('type', item.kind)} {ref!s:.64} of {item.user_id} ({item.conn_id})"


def dead_letter_body(item: Any, reason: str) -> bytes:
    """A poison item as it goes to ``<ns>.dead``: a v1 batch of that one item, with its ``reason``.

    An operator can publish it to ``<ns>.server`` again once the cause is
    fixed (processors ignore the extra field).
    """
    try:
        encoded = item.encode()
    except (TypeError, ValueError):
        encoded = protocol.encode({"kind": item.kind, "userId": item.user_id, "connId": item.conn_id,
                                   "unencodable": True}).encode()
    body = items_body([encoded])
    return body[:-1] + b',"reason":' + protocol.encode(reason).encode() + b"}"

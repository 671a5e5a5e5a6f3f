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
    :class:`~imcluster.processor.pipeline.Syncer`, at most
    ``sync_concurrency`` at once, so a 100k backlog never holds up other
    work).
Transient failures
    (PostgreSQL, Redis or RabbitMQ down or slow) acknowledge nothing: the
    same window runs again after ``retry_delay`` doubling up to
    ``retry_max_delay`` (one timer, no hot loop), resuming at the stage that
    failed.
Unexplained failures
    (a bug, or data PostgreSQL refuses): a window of several queue
    messages is split and each runs alone, so good messages are not held
    hostage; a message that fails alone waits (backoff) aside while the
    windows behind it go on, and after ``max_attempts`` failures it is
    rejected without requeue (``<ns>.dead``) with a log line. A message that is not a
    v1 batch at all is dead-lettered at once. One bad item is answered with
    ``bad_frame`` and its batch-mates go on.
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

from imcluster import metrics
from imcluster.envelope import FRAME, SYNC, MalformedBatch, parse_items
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
                             on_unroutable=reaper.check if reaper is not None else None)
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
            message.nack(requeue=False)
            return
        env = Envelope(message, items, self.clock.seconds())
        for item in items:
            item.envelope = env
        syncs = [i for i in items if i.kind == SYNC]
        frames = sum(1 for i in items if i.kind == FRAME)
        env.parts = len(syncs) + (1 if frames else 0)
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
        # envelopes dead-lettered meanwhile (a split) need nothing more
        window.envelopes = [e for e in window.envelopes if not e.settled]
        if not window.envelopes:
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
        for env in window.envelopes:
            env.part_done()
        self._kick()

    def _failed(self, failure: Failure, window: Window) -> None:
        self._running.pop(window, None)
        if self._stopping:
            return  # abandoned: redelivered after the consumer is cancelled
        config = self.config
        if is_transient(failure, self.transient):
            self._failures += 1
            metrics.RETRIES.inc()
            delay = backoff(self._failures, config.retry_delay, config.retry_max_delay)
            self.log.warn("window of {n} items failed ({err}); retry {k} in {delay:.2f}s",
                          n=len(window), err=failure.getErrorMessage() or failure.type.__name__,
                          k=self._failures, delay=delay)
            self._retry.appendleft(window)
            self._schedule(delay, "retry")
            return
        if len(window.envelopes) > 1:
            self.log.failure("window of {n} queue messages failed unexpectedly; running each alone",
                             failure, n=len(window.envelopes))
            for env in reversed(window.envelopes):
                self._retry.appendleft(Window([env]))
            self._schedule(0, "next")
            return
        env = window.envelopes[0]
        env.attempts += 1
        if env.attempts >= config.max_attempts:
            self.log.failure("dead-lettering a queue message that failed {n} times ({items} items)",
                             failure, n=env.attempts, items=len(env.items))
            env.dead_letter()
            self._kick()
            return
        delay = backoff(env.attempts, config.retry_delay, config.retry_max_delay)
        self.log.failure("queue message failed unexpectedly (attempt {n} of {max}); retrying in {delay:.2f}s",
                         failure, n=env.attempts, max=config.max_attempts, delay=delay)
        # parked, not blocking: the windows behind it go on meanwhile
        self._parked[window] = self.clock.callLater(delay, self._unpark, window)
        self._kick()

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

"""What a processor does with a window of client frames (ARCHITECTURE.md flows 5 and 6).

The service (``service.py``) gathers queue messages (``{"v":1,"items":[...]}``,
docs/internals.rst, :mod:`imcluster.envelope`) into a :class:`Window` and runs it through
:meth:`Pipeline.run` as one unit. The pipeline owns the stages, their
order and the window's two turns; what each frame type does in a stage is
its handler's (``imcluster/processor/handlers/``, one module per type, in
the table ``HANDLERS``):

1. every ``frame`` item was validated again when its queue message was
   parsed (:func:`imcluster.envelope.parse_items`); an invalid one is
   answered ``bad_frame``;
2. ``message`` items (``handlers/message.py``) pass the moderation filters in order (a rejection is
   answered ``rejected`` and nothing is stored; a replacement changes the
   body), then ALL of them are stored in ONE transaction
   (``store.begin_window``, then the registry is asked which recipients
   are online, then ``commit``); at the same time the window's
   ``message_send_reply`` acknowledgements are applied with ONE
   ``store.mark_delivered`` (stages 3 and 4 do not wait for it; the window
   does), and ``history``, ``read`` and
   ``session_create`` items are answered (at most ``postgres_pool_size`` at
   once);
3. the :class:`~imcluster.processor.router.Router` looks up every
   connection the window needs and which gateways are alive (ONE Redis
   round trip) and
   the window's replies, deliveries and read receipts go out with ONE
   publish per gateway;
4. the rows of recipients actually routed become ``sending`` (but those the
   store inserted ``sending`` already).

A window that fails part way is run again by the service; every stage
remembers what it completed (the stored results, the gateways already
published to), so a retry after a transient failure resumes where it stopped
and never stores, answers or routes twice.

``sync`` items do not go through windows: :class:`Syncer` pages a user's
undelivered messages (``sync_page_size`` at a time, never the whole backlog
in memory), publishes each page to the connection's gateway and ends with
``sync_done``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from twisted.internet import defer, error as ierror
from twisted.logger import Logger
from twisted.python.failure import Failure

from imcluster import metrics, protocol
from imcluster.envelope import FRAME, Item, delivery_body
from imcluster.interfaces import Unavailable
from imcluster.processor.filters import Verdict
from imcluster.processor.handlers import HANDLERS, Handler
from imcluster.processor.handlers.base import gather
from imcluster.processor.router import Outbox, Router
from imcluster.store import StoreError

log = Logger(namespace="imcluster.processor.pipeline")



class GatewayQueueMissing(Unavailable):
    """A live gateway's queue is not there (a broker restart): it declares it again soon."""


#: failures that say a dependency (PostgreSQL, Redis, RabbitMQ) is down or slow:
#: the work is retried with backoff, never dead-lettered. Each role says so with
#: its own subclass of ``interfaces.Unavailable`` (the store's StoreUnavailable,
#: the registry's RegistryUnavailable, the bus' PublishError and ChannelError);
#: the rest are timeouts and Twisted's own connection errors
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    Unavailable, TimeoutError, defer.TimeoutError, defer.CancelledError,
    ierror.ConnectError, ierror.ConnectionLost, ierror.ConnectionDone,
)


def is_transient(failure: Failure | BaseException, extra: Sequence[type] = ()) -> bool:
    """True when ``failure`` means a dependency is unavailable (retry), not a bad input (poison)."""
    exc = failure.value if isinstance(failure, Failure) else failure
    return isinstance(exc, TRANSIENT_ERRORS) or (bool(extra) and isinstance(exc, tuple(extra)))


def backoff(attempt: int, first: float, most: float) -> float:
    """Exponential delay for retry ``attempt`` (1, 2, ...): ``first`` doubling up to ``most``, jittered."""
    delay = min(most, first * 2 ** min(max(attempt - 1, 0), 30))
    return delay * (0.8 + random.random() * 0.4)


class Abandoned(Exception):
    """The service is stopping: the work is left for redelivery."""


# --- queue messages (their items: imcluster.envelope) ------------------------------


@dataclass(eq=False)
class Envelope:
    """One queue message: settled (acked) once every part of it is done.

    ``parts`` counts what is outstanding: its window (when it holds frame
    items) and each of its syncs. ``attempts`` counts unexplained failures
    (poison detection).
    """

    message: Any
    items: list[Item]
    received: float = 0.0
    parts: int = 0
    attempts: int = 0
    settled: bool = False

    @property
    def frames(self) -> list[Item]:
        return [i for i in self.items if i.kind == FRAME]

    def part_done(self) -> None:
        """One part is done; the last one acknowledges the message."""
        self.parts -= 1
        if self.parts <= 0 and not self.settled:
            self.settled = True
            self.message.ack()

    def dead_letter(self) -> None:
        """Reject without requeue: RabbitMQ moves it to ``<ns>.dead``."""
        if not self.settled:
            self.settled = True
            metrics.DEAD_LETTERED.inc()
            self.message.nack(requeue=False)


# --- windows -------------------------------------------------------------------------


class Window:
    """Frame items of one or more queue messages, handled as one unit.

    The attributes below the items are the memory of a run: a retry skips
    every stage already completed.
    """

    def __init__(self, envelopes: list[Envelope]) -> None:
        self.envelopes = envelopes
        self.items: list[Item] = [i for e in envelopes for i in e.items if i.kind == FRAME]
        #: ``(handler, items of its type)`` for the types present, in the table's order
        self.groups: list[tuple[Handler, list[Item]]] = by_type(self.items)
        self.attempts = 0
        self.verdicts: dict[int, Verdict] | None = None  # id(message item) -> verdict
        self.stored: dict[int, Any] = {}  # id(item) -> Stored | Rejected
        self.stored_done = False
        self.acked = False
        self.answers: dict[int, tuple[str, Any]] = {}  # id(item) -> ("ok", result) | ("error", StoreError)
        self.outbox: Outbox | None = None
        #: recipients found connected while the store held its locks: their rows were inserted ``sending``
        self.online: set[str] = set()
        self.published: set[str] = set()
        self.routed: set[str] = set()
        self.marked = False
        self.observed = False

    def __len__(self) -> int:
        return len(self.items)

    def of_type(self, *types: str) -> list[Item]:
        return [i for i in self.items if i.frame is not None and i.frame["type"] in types]


def by_type(items: list[Item]) -> list[tuple[Handler, list[Item]]]:
    """``(handler, items of its type)`` for each type present, in the order of ``HANDLERS``."""
    groups: dict[str, list[Item]] = {}
    for item in items:
        if item.frame is not None:
            groups.setdefault(item.frame["type"], []).append(item)
    return [(handler, groups[t]) for t, handler in HANDLERS.items() if t in groups]


class _Turn:
    """A window's place in a queue of windows: ``wait()`` for the one before, ``done()`` for the next."""

    def __init__(self, before: defer.Deferred) -> None:
        self._before: defer.Deferred | None = before
        self.mine: defer.Deferred = defer.Deferred()

    async def wait(self) -> None:
        before, self._before = self._before, None
        if before is not None:
            await before

    def done(self) -> None:
        if not self.mine.called:
            self.mine.callback(None)


class Pipeline:
    """Runs windows through their stages, asking each frame type's handler (module docstring)."""

    log = Logger()

    def __init__(self, store: Any, router: Router, filters: Sequence[Any], config: Any, clock: Any = None) -> None:
        self.store = store
        self.router = router
        self.filters = list(filters)
        self.config = config
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = clock
        self._queries = defer.DeferredSemaphore(max(1, int(config.values.get("postgres_pool_size", 4))))
        # the turns of the last window started (see run)
        self._locked: defer.Deferred = defer.succeed(None)
        self._published: defer.Deferred = defer.succeed(None)

    def run(self, window: Window) -> defer.Deferred:
        """Handle ``window``; fires when all its effects are committed and published.

        Several windows may run at once (the service's ``windows``). They
        keep the order in which they were started where it shows: a window
        begins its store transaction only once the window before it holds
        its session locks (so seq numbers follow window order), and
        publishes only once the window before it has published (so
        deliveries reach each gateway in seq order). A window that fails
        gives up its turns; run again, it queues behind the windows started
        since.
        """
        locked, published = _Turn(self._locked), _Turn(self._published)
        self._locked, self._published = locked.mine, published.mine

        def release(result: Any) -> Any:
            locked.done()
            published.done()
            return result

        return defer.Deferred.fromCoroutine(self._run(window, locked, published)).addBoth(release)

    async def _run(self, w: Window, locked: "_Turn", published: "_Turn") -> None:
        w.attempts += 1
        groups = w.groups
        for handler, items in groups:
            await handler.prepare(self, w, items)
        # work the window waits for but its replies and deliveries do not
        # (acknowledgements: a fan-out's are many rows) runs beside the rest
        applying = defer.Deferred.fromCoroutine(self._apply_stage(w))
        try:
            await gather([
                defer.Deferred.fromCoroutine(self._store_stage(w, locked)),
                defer.Deferred.fromCoroutine(self._queries_stage(w)),
            ])
            if w.outbox is None:
                w.outbox = await self._build_outbox(w)
            await published.wait()
            try:
                await self.router.publish(w.outbox, w.published, w.routed)
            finally:
                published.done()
            if not w.observed:
                w.observed = True
                self._observe(w)
            if not w.marked:
                pairs = w.outbox.pairs(w.routed)
                for handler, _items in groups:
                    pairs = handler.unmarked(w, pairs)
                if pairs:
                    await self.store.mark_sending(pairs)
                w.marked = True
        except BaseException:
            # settle the applied work before the retry runs it again
            await defer.DeferredList([applying], consumeErrors=True)
            raise
        await applying

    # --- stage 2: store (in the lock turn), applied work, queries

    async def _store_stage(self, w: Window, locked: "_Turn") -> None:
        await locked.wait()
        try:
            if not w.stored_done:
                for handler, items in w.groups:
                    if handler.ordered:
                        await handler.store(self, w, items, locked)
                w.stored_done = True
        finally:
            locked.done()  # a handler gives it up sooner, as soon as the store holds its locks

    async def _apply_stage(self, w: Window) -> None:
        await gather([defer.Deferred.fromCoroutine(handler.apply(self, w, items)) for handler, items in w.groups])

    async def _queries_stage(self, w: Window) -> None:
        todo = [(handler, i) for handler, items in w.groups if handler.queries
                for i in items if id(i) not in w.answers]
        if todo:
            await gather([self._queries.run(self._query, w, handler, i) for handler, i in todo])

    def _query(self, w: Window, handler: Handler, item: Item) -> defer.Deferred:
        def answered(result: Any) -> None:
            w.answers[id(item)] = ("ok", result)

        def refused(failure: Failure) -> None:
            failure.trap(StoreError)
            w.answers[id(item)] = ("error", failure.value)

        return defer.maybeDeferred(handler.query, self, item).addCallbacks(answered, refused)

    # --- stage 3: routing

    async def _build_outbox(self, w: Window) -> Outbox:
        users: list[str] = []
        for handler, items in w.groups:
            users.extend(handler.users(self, w, items))
        # an imapi never registers WSSERVER_: its replies go out regardless (docs/internals.rst)
        reply_gateways = {i.server_id for i in w.items if not i.api}
        lookup = await self.router.lookup(users, reply_gateways)
        outbox = Outbox()
        encode = protocol.encode
        # replies first, in window order
        for item in w.items:
            frame = item.error if item.error is not None else HANDLERS[item.frame["type"]].reply(self, w, item)
            if frame is not None and (item.api or item.server_id in lookup.usable):
                outbox.add(item.server_id, [item.conn_id], encode(frame), api=item.api)
        # then deliveries and receipts, in the table's order
        for handler, items in w.groups:
            handler.route(self, w, items, outbox, lookup)
        return outbox

    def _observe(self, w: Window) -> None:
        outbox = w.outbox
        delivered = sum(outbox.gateways[u].deliveries for u in w.routed if u in outbox.gateways)
        if delivered:
            metrics.DELIVERIES.inc(delivered)
        for handler, items in w.groups:
            handler.observe(self, w, items)


# --- sync ------------------------------------------------------------------------------


class Syncer:
    """Sends one connection its user's undelivered messages, page by page, then ``sync_done``.

    Each page (``sync_page_size`` messages, keyset-paged by the store) is one
    publish to the connection's gateway, confirmed before the next page is
    read: memory stays bounded by one page, and the gateway applies the pages
    and ``sync_done`` in order. The rows sent become ``sending``. A
    dependency that is down is waited out with backoff (a sync request is
    never dropped); an unexplained failure repeated ``max_attempts`` times
    raises. An unroutable gateway ends the sync (the connection is gone)
    once its ``WSSERVER_<uuid>`` key is gone too; while the key lives, the
    gateway re-declares its queue (a broker restart) and the page is retried.
    """

    log = Logger()

    def __init__(self, store: Any, router: Router, config: Any, clock: Any = None,
                 stopping: Callable[[], bool] = lambda: False, transient: Sequence[type] = ()) -> None:
        self.store = store
        self.router = router
        self.config = config
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = clock
        self.stopping = stopping
        self.transient = tuple(transient)

    def run(self, item: Item) -> defer.Deferred:
        """Sync ``item``'s connection; fires with the number of messages sent (None when the gateway is gone)."""
        return defer.Deferred.fromCoroutine(self._run(item))

    async def _retrying(self, what: str, item: Item, fn: Callable[[], defer.Deferred]) -> Any:
        failures = unexplained = 0
        while True:
            if self.stopping():
                raise Abandoned()
            try:
                return await fn()
            except Exception as e:
                failures += 1
                if is_transient(e, self.transient):
                    metrics.RETRIES.inc()
                else:
                    unexplained += 1
                    if unexplained >= self.config.max_attempts:
                        raise
                delay = backoff(failures, self.config.retry_delay, self.config.retry_max_delay)
                self.log.warn("sync of {conn}: {what} failed ({err}); retrying in {delay:.2f}s",
                              conn=item.conn_id, what=what, err=str(e) or type(e).__name__, delay=delay)
                d: defer.Deferred = defer.Deferred()
                self.clock.callLater(delay, d.callback, None)
                await d

    async def _publish_page(self, item: Item, body: bytes) -> bool:
        """True when the gateway has the page, False when that gateway is gone (its key too)."""
        if await self.router.publish_one(item.server_id, body):
            return True
        if item.server_id in await self.router.registry.alive([item.server_id]):
            raise GatewayQueueMissing(f"gateway {item.server_id} is alive but its queue is missing")
        return False

    async def _run(self, item: Item) -> int | None:
        size = self.config.sync_page_size

        def read(after: tuple[str, int] | None) -> defer.Deferred:
            return defer.Deferred.fromCoroutine(self._retrying(
                "reading undelivered messages", item,
                lambda: self.store.undelivered_page(item.user_id, after, size)))

        def mark(pairs: list[tuple[str, str]]) -> defer.Deferred:
            return defer.Deferred.fromCoroutine(self._retrying(
                "marking rows sending", item, lambda: self.store.mark_sending(pairs)))

        # the next page is read, and the last one marked, while a page is published:
        # pages still go out one after the other, in order; at most one of each in flight
        reading: defer.Deferred | None = read(None)
        marking: defer.Deferred | None = None
        count = 0
        try:
            while True:
                page = await reading
                reading = None
                last = len(page) < size
                if not last:
                    reading = read((page[-1]["sessionId"], page[-1]["seq"]))
                frames = [protocol.encode({"type": "message_send", **m}) for m in page]
                if last:
                    frames.append(protocol.encode({"type": "sync_done", "count": count + len(page)}))
                body = delivery_body([item.conn_id], frames)
                routed = await self._retrying("publishing a page", item,
                                              lambda: defer.Deferred.fromCoroutine(self._publish_page(item, body)))
                if not routed:
                    self.log.info("sync of {conn} ended: its gateway is gone", conn=item.conn_id)
                    return None
                count += len(page)
                if marking is not None:
                    await marking
                    marking = None
                if page:
                    marking = mark([(item.user_id, m["msgId"]) for m in page])
                if last:
                    if marking is not None:
                        await marking
                        marking = None
                    metrics.SYNC_SIZE.observe(count)
                    return count
        finally:
            # left behind by a failure or an ended sync: their own failures are not this sync's
            for d in (reading, marking):
                if d is not None:
                    d.addErrback(lambda _: None)

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

``sync`` items do not go through windows: their handler,
:class:`~imcluster.processor.handlers.sync.Syncer`, pages a user's
undelivered messages (``sync_page_size`` at a time, never the whole backlog
in memory), publishes each page to the connection's gateway and ends with
``sync_done``. What fails is isolated in ``service.py`` (poison).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from imcluster import metrics, protocol
from imcluster.envelope import FRAME, Item
from imcluster.processor.filters import Verdict
from imcluster.processor.handlers import HANDLERS, Handler
from imcluster.processor.handlers.base import gather
from imcluster.processor.router import Outbox, Router
from imcluster.store import StoreError

log = Logger(namespace="imcluster.processor.pipeline")


# the retry rules moved to imcluster.processor.retry (the sync handler uses them too)
from imcluster.processor.retry import (  # noqa: E402,F401 (re-exported)
    TRANSIENT_ERRORS, Abandoned, GatewayQueueMissing, backoff, is_transient)
from imcluster.processor.handlers.sync import Syncer  # noqa: E402,F401 (re-exported)


# --- queue messages (their items: imcluster.envelope) ------------------------------


@dataclass(eq=False)
class Envelope:
    """One queue message: settled (acked) once every part of it is done.

    ``parts`` counts what is outstanding: each of its frame items (done
    when the window holding it is, or when it was dead-lettered as poison)
    and each of its syncs.
    """

    message: Any
    items: list[Item]
    received: float = 0.0
    parts: int = 0
    settled: bool = False

    @property
    def frames(self) -> list[Item]:
        return [i for i in self.items if i.kind == FRAME]

    def part_done(self, n: int = 1) -> None:
        """``n`` parts are done; the last one acknowledges the message."""
        self.parts -= n
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

    def __init__(self, envelopes: list[Envelope], items: list[Item] | None = None) -> None:
        if items is None:
            items = [i for e in envelopes for i in e.items if i.kind == FRAME]
        else:
            envelopes = list(dict.fromkeys(i.envelope for i in items))
        self.envelopes = envelopes
        self.items: list[Item] = items
        #: when it first failed (clock seconds), and how often: poison isolation (service.py)
        self.first_failed: float | None = None
        self.failures = 0
        #: why it is poison, once decided (its dead-lettering is retried until confirmed)
        self.poison: str | None = None
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
        #: its events and push requests are published (imcluster.processor.business.Outgoing)
        self.outgoing_done = False

    def __len__(self) -> int:
        return len(self.items)

    def settle(self) -> None:
        """Every item is done: each envelope learns how many of its items were here."""
        counts: dict[Envelope, int] = {}
        for item in self.items:
            counts[item.envelope] = counts.get(item.envelope, 0) + 1
        for env, n in counts.items():
            env.part_done(n)

    def halves(self) -> list["Window"]:
        """The items split in two windows (isolating a poison item), remembering when this one first failed."""
        mid = len(self.items) // 2
        out = []
        for part in (self.items[:mid], self.items[mid:]):
            w = Window([], part)
            w.first_failed = self.first_failed
            out.append(w)
        return out

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
        #: publishes each stored window's webhook events and push requests (None: off; business.py)
        self.outgoing: Any = None
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
            # events and push requests go to the broker beside the routing, before the acks
            outgoing = (defer.Deferred.fromCoroutine(self._outgoing_stage(w))
                        if self.outgoing is not None and not w.outgoing_done else None)
            if outgoing is not None:
                applying = defer.Deferred.fromCoroutine(gather([applying, outgoing]))
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

    async def _outgoing_stage(self, w: Window) -> None:
        await self.outgoing.publish(w)
        w.outgoing_done = True

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

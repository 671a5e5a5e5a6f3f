"""What a processor does with a window of client frames (ARCHITECTURE.md flows 5 and 6).

The service (``service.py``) gathers queue messages (``{"v":1,"items":[...]}``,
:mod:`imcluster.envelope`) into a :class:`Window` and runs it through
:meth:`Pipeline.run` as one unit:

1. every ``frame`` item was validated again when its queue message was
   parsed (:func:`imcluster.envelope.parse_items`); an invalid one is
   answered ``bad_frame``;
2. ``message`` items pass the moderation filters in order (a rejection is
   answered ``rejected`` and nothing is stored; a replacement changes the
   body), then ALL of them are stored in ONE transaction
   (``store.store_messages``); at the same time the window's
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
4. the rows of recipients actually routed become ``sending``.

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

import psycopg2
from twisted.internet import defer, error as ierror
from twisted.logger import Logger
from twisted.python.failure import Failure

from imcluster import bus as _bus
from imcluster import metrics, protocol
from imcluster.db import ConnectionDead, DatabaseUnavailable
from imcluster.envelope import FRAME, Item, delivery_body
from imcluster.processor.filters import REJECT, REPLACE, Verdict, apply_filters
from imcluster.processor.router import Lookup, Outbox, Router
from imcluster.processor.store import Incoming, StoreError
from imcluster.registry import RedisConnectionError

class GatewayQueueMissing(Exception):
    """A live gateway's queue is not there (a broker restart): it declares it again soon."""


#: failures that say a dependency (PostgreSQL, Redis, RabbitMQ) is down or slow:
#: the work is retried with backoff, never dead-lettered
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    GatewayQueueMissing, DatabaseUnavailable, ConnectionDead, psycopg2.OperationalError, psycopg2.InterfaceError,
    TimeoutError, defer.TimeoutError, defer.CancelledError, RedisConnectionError,
    _bus.PublishError, _bus.ChannelError, ierror.ConnectError, ierror.ConnectionLost,
    ierror.ConnectionDone,
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
        self.attempts = 0
        self.verdicts: dict[int, Verdict] | None = None  # id(message item) -> verdict
        self.stored: dict[int, Any] = {}  # id(item) -> Stored | Rejected
        self.stored_done = False
        self.acked = False
        self.answers: dict[int, tuple[str, Any]] = {}  # id(item) -> ("ok", result) | ("error", StoreError)
        self.outbox: Outbox | None = None
        #: recipients the store found connected inside its transaction: their rows were inserted ``sending``
        self.online: set[str] = set()
        self.published: set[str] = set()
        self.routed: set[str] = set()
        self.marked = False
        self.observed = False

    def __len__(self) -> int:
        return len(self.items)

    def of_type(self, *types: str) -> list[Item]:
        return [i for i in self.items if i.frame is not None and i.frame["type"] in types]


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


def _message_send(stored: Any) -> dict:
    return {"type": "message_send", "msgId": stored.msg_id, "sessionId": stored.session_id,
            "seq": stored.seq, "from": stored.sender, "clientMsgId": stored.client_msg_id,
            "body": stored.body, "ts": stored.ts_ms}


def _message_reply_ok(stored: Any) -> dict:
    return {"type": "message_reply", "ok": True, "clientMsgId": stored.client_msg_id,
            "msgId": stored.msg_id, "sessionId": stored.session_id, "seq": stored.seq, "ts": stored.ts_ms}


#: store codes that PROTOCOL.md does not have
_CODE_MAP = {"bad_request": protocol.BAD_FRAME}


def _code(code: str) -> str:
    return _CODE_MAP.get(code, code)


async def _gather(ds: list[defer.Deferred]) -> list:
    """Wait for every Deferred; raise the first failure only once all have settled."""
    results = await defer.DeferredList(ds, consumeErrors=True)
    for ok, value in results:
        if not ok:
            value.raiseException()
    return [value for _, value in results]


class Pipeline:
    """Runs windows: moderation, store, acknowledgements, queries, routing (module docstring)."""

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
        messages = w.of_type(protocol.MESSAGE)
        if w.verdicts is None:
            w.verdicts = await self._moderate(messages)
        # acknowledgements are applied beside the store and the routing: replies and
        # deliveries do not wait for them (a fan-out's acks are many rows), the
        # window (and so its queue messages) is done only once they are
        acking = defer.Deferred.fromCoroutine(self._acks(w))
        try:
            await _gather([
                defer.Deferred.fromCoroutine(self._store(w, messages, locked)),
                defer.Deferred.fromCoroutine(self._queries_stage(w)),
            ])
            if w.outbox is None:
                w.outbox = await self._build_outbox(w, messages)
            await published.wait()
            try:
                await self.router.publish(w.outbox, w.published, w.routed)
            finally:
                published.done()
            if not w.observed:
                w.observed = True
                self._observe(w, messages)
            if not w.marked:
                pairs = w.outbox.pairs(w.routed)
                if w.online:
                    # rows the store inserted ``sending`` already (new messages to online users)
                    fresh = {r.msg_id for r in w.stored.values() if r.ok and not r.duplicate}
                    pairs = [p for p in pairs if not (p[1] in fresh and p[0] in w.online)]
                if pairs:
                    await self.store.mark_sending(pairs)
                w.marked = True
        except BaseException:
            # settle the acknowledgements before the retry runs them again
            await defer.DeferredList([acking], consumeErrors=True)
            raise
        await acking

    # --- stage 1: moderation

    async def _moderate(self, messages: list[Item]) -> dict[int, Verdict]:
        if not self.filters:
            return {id(item): Verdict.accept() for item in messages}
        verdicts: list[Any] = []
        for item in messages:
            f = item.frame
            verdicts.append(apply_filters(self.filters, {
                "from": item.user_id, "sessionId": f["sessionId"], "clientMsgId": f["clientMsgId"],
                "body": f["body"]}))
        waiting = [(n, v) for n, v in enumerate(verdicts) if isinstance(v, defer.Deferred)]
        if waiting:
            results = await _gather([v for _, v in waiting])
            for (n, _), v in zip(waiting, results):
                verdicts[n] = v
        return {id(item): v for item, v in zip(messages, verdicts)}

    # --- stage 2: store, acknowledgements, queries

    async def _store(self, w: Window, messages: list[Item], locked: "_Turn") -> None:
        await locked.wait()
        try:
            if not w.stored_done:
                await self._store_batch(w, messages, locked)
                w.stored_done = True
        finally:
            locked.done()  # the store calls it sooner, as soon as it holds its locks

    async def _store_batch(self, w: Window, messages: list[Item], locked: "_Turn") -> None:
        batch, owners = [], []
        for item in messages:
            verdict = w.verdicts[id(item)]
            if verdict.action == REJECT:
                continue
            f = item.frame
            body = verdict.body if verdict.action == REPLACE else f["body"]
            # the item's ts (the gateway's or imapi's receipt) is the message's time
            batch.append(Incoming(item.user_id, f["clientMsgId"], f["sessionId"], body, item.ts,
                                  trusted=item.trusted))
            owners.append(item)
        if not batch:
            return
        results = await self.store.store_messages(batch, self._locator(w), locked.done)
        now = self.clock.seconds()
        for item, result in zip(owners, results):
            w.stored[id(item)] = result
            if item.ts is not None and result.ok and not result.duplicate:
                metrics.QUEUE_TO_COMMIT.observe(max(0.0, now - item.ts / 1000.0))

    def _locator(self, w: Window) -> Callable[[list[str]], defer.Deferred]:
        """``locate`` for the store: which recipients have a connection (ONE ``connections_of``).

        Their rows are inserted ``sending``, which spares the window a
        ``mark_sending`` for them. Routing still looks connections up after
        the commit (a connection registered after this lookup must either be
        routed to or find the message in its sync), and a recipient who left
        meanwhile keeps a ``sending`` row: undelivered all the same.
        """
        def locate(recipients: list[str]) -> defer.Deferred:
            def found(conns: dict) -> list[str]:
                online = [u for u in recipients if conns.get(u)]
                w.online = set(online)
                return online

            return self.router.registry.connections_of(recipients).addCallback(found)
        return locate

    async def _acks(self, w: Window) -> None:
        if w.acked:
            return
        acks = [(i.user_id, i.frame["msgIds"]) for i in w.of_type(protocol.MESSAGE_SEND_REPLY)
                if i.frame["msgIds"]]
        if acks:
            n = await self.store.mark_delivered(acks)
            metrics.ACKS.inc(n or 0)
        w.acked = True

    async def _queries_stage(self, w: Window) -> None:
        todo = [i for i in w.of_type(protocol.HISTORY, protocol.READ, protocol.SESSION_CREATE)
                if id(i) not in w.answers]
        if todo:
            await _gather([self._queries.run(self._query, w, i) for i in todo])

    def _query(self, w: Window, item: Item) -> defer.Deferred:
        f, s = item.frame, self.store
        kind = f["type"]
        if kind == protocol.HISTORY:
            d = s.history(item.user_id, f["sessionId"], f.get("beforeSeq"), f["limit"])
        elif kind == protocol.READ:
            d = s.read(item.user_id, f["sessionId"], f["seq"])
        else:
            d = s.create_session(item.user_id, f["members"], f.get("sessionId"), "group")

        def answered(result: Any) -> None:
            w.answers[id(item)] = ("ok", result)

        def refused(failure: Failure) -> None:
            failure.trap(StoreError)
            w.answers[id(item)] = ("error", failure.value)

        return d.addCallbacks(answered, refused)

    # --- stage 3: routing

    def _reply_frame(self, w: Window, item: Item) -> dict | None:
        """The frame that answers ``item`` (None: no reply, e.g. an acknowledgement)."""
        if item.error is not None:
            return item.error
        f = item.frame
        kind = f["type"]
        if kind == protocol.MESSAGE:
            result = w.stored.get(id(item))
            if result is None:  # moderation refused it
                verdict = w.verdicts[id(item)]
                return protocol.message_reply_error(f["clientMsgId"], protocol.REJECTED,
                                                    verdict.reason or "rejected by moderation")
            if result.ok:
                reply = _message_reply_ok(result)
                if item.api:
                    reply["duplicate"] = result.duplicate  # imapi answers 200 or 201 (never to clients)
                return reply
            return protocol.message_reply_error(f["clientMsgId"], _code(result.code), result.message)
        if kind == protocol.MESSAGE_SEND_REPLY:
            return None
        status, value = w.answers[id(item)]
        if kind == protocol.SESSION_CREATE:
            reply = {"type": "session_reply"}
            if "id" in f:
                reply["id"] = f["id"]
            if status == "error":
                reply.update(ok=False, error={"code": _code(value.code), "message": value.message})
            else:
                reply.update(ok=True, sessionId=value[0], members=value[1])
            return reply
        if status == "error":
            return protocol.reply_to(f, _code(value.code), value.message)
        if kind == protocol.HISTORY:
            reply = {"type": "history_reply", "sessionId": f["sessionId"], "messages": value}
            if "id" in f:
                reply["id"] = f["id"]
            return reply
        return None  # read: receipts go to everyone, see _build_outbox

    async def _build_outbox(self, w: Window, messages: list[Item]) -> Outbox:
        # who needs looking up: recipients and senders (their other devices), readers' sessions
        users: list[str] = []
        for item in messages:
            result = w.stored.get(id(item))
            if result is not None and result.ok:
                users.extend(result.recipients)
                if not result.duplicate:
                    users.append(result.sender)
        reads = [i for i in w.of_type(protocol.READ) if w.answers.get(id(i), ("error",))[0] == "ok"]
        for item in reads:
            users.extend(w.answers[id(item)][1][1])
        # an imapi never registers WSSERVER_: its replies go out regardless (docs/internals.rst)
        reply_gateways = {i.server_id for i in w.items if not i.api}
        lookup = await self.router.lookup(users, reply_gateways)
        outbox = Outbox()
        encode = protocol.encode
        # replies first, in window order
        for item in w.items:
            frame = self._reply_frame(w, item)
            if frame is not None and (item.api or item.server_id in lookup.usable):
                outbox.add(item.server_id, [item.conn_id], encode(frame), api=item.api)
        # then deliveries, in store order (seq order within a session)
        routed_ids: set[str] = set()
        cache: dict[tuple, dict] = {}
        for item in messages:
            result = w.stored.get(id(item))
            if result is None or not result.ok or result.msg_id in routed_ids:
                continue
            routed_ids.add(result.msg_id)
            self._deliver(outbox, lookup, result, item.conn_id, cache)
        # then read receipts
        for item in reads:
            cursor, members = w.answers[id(item)][1]
            frame = encode({"type": "read_receipt", "sessionId": item.frame["sessionId"],
                            "userId": item.user_id, "seq": cursor})
            for uuid, (conn_ids, _users) in lookup.targets(members, item.conn_id).items():
                outbox.add(uuid, conn_ids, frame)
        return outbox

    def _deliver(self, outbox: Outbox, lookup: Lookup, stored: Any, sender_conn: str, cache: dict) -> None:
        """Queue ``stored``'s ``message_send`` for its recipients (and the sender's other connections)."""
        # a duplicate goes again only to recipients still undelivered (ARCHITECTURE.md failure rules)
        key = (tuple(stored.recipients), None if stored.duplicate else stored.sender, sender_conn)
        targets = cache.get(key)
        if targets is None:
            users = list(stored.recipients)
            if not stored.duplicate:
                users.append(stored.sender)
            targets = {}
            for uuid, (conn_ids, with_conns) in lookup.targets(users, sender_conn).items():
                rows = [u for u in with_conns if u != stored.sender]
                targets[uuid] = (conn_ids, rows)
            cache[key] = targets
        if not targets:
            return
        frame = protocol.encode(_message_send(stored))
        for uuid, (conn_ids, rows) in targets.items():
            outbox.add(uuid, conn_ids, frame, rows, stored.msg_id, delivery=True)

    def _observe(self, w: Window, messages: list[Item]) -> None:
        outbox = w.outbox
        delivered = sum(outbox.gateways[u].deliveries for u in w.routed if u in outbox.gateways)
        if delivered:
            metrics.DELIVERIES.inc(delivered)
        now = self.clock.seconds()
        for item in messages:
            result = w.stored.get(id(item))
            if item.ts is not None and result is not None and result.ok and not result.duplicate:
                metrics.END_TO_END.observe(max(0.0, now - item.ts / 1000.0))


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

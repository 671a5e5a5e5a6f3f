"""``sync``: one connection gets its user's undelivered messages, page by page, then ``sync_done``.

A ``sync`` item is not a frame of a window: a gateway asks for it after
``auth``, and again for every connection it holds once its queue was
declared again or it re-registered in Redis (``"resync": true``, with
``since`` when known; docs/internals.rst). The :class:`Syncer` answers it
beside the windows (the service runs at most ``sync_concurrency`` at once):

- each page (``sync_page_size`` messages, keyset-paged by the store) is read
  while the previous one is published, and its rows become ``sending``;
- the first pages of the syncs that start in one reactor turn (a gateway's
  queue message of ``sync`` items, up to ``sync_concurrency``) are read by ONE
  statement (``undelivered_first_pages``): a new connection's sync costs a
  share of a query, not a query; the pages are the same;
- a page is published as one AMQP message, or several when it is larger
  than ``max_publish_bytes`` (in order: the gateway applies them in order);
- a re-sync with ``since`` also sends the messages of the user's sessions
  stored since then, delivered or not, the user's own included (another
  device of the user may have acknowledged what this connection never got;
  at most ``sync_page_size`` per session, ``since`` at most
  :data:`SINCE_HORIZON_MS` back), merged into the pages in the same order;
- the last page ends with ``sync_done`` (its ``count``: every
  ``message_send`` of this sync).

A dependency that is down is waited out with backoff (a sync request is
never dropped); an unexplained failure repeated ``max_attempts`` times
raises. An unroutable gateway ends the sync (the connection is gone) once
its ``WSSERVER_<uuid>`` key is gone too; while the key lives, the gateway
re-declares its queue (a broker restart) and the page is retried.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from imcluster import metrics, protocol
from imcluster.envelope import BODY_OVERHEAD, Item, delivery_body, split_frames
from imcluster.processor.retry import Abandoned, GatewayQueueMissing, backoff, is_transient

#: how far back a re-sync's ``since`` may reach (a gateway's loss is seconds, not hours)
SINCE_HORIZON_MS = 15 * 60 * 1000
#: messages a re-sync's ``since`` part sends at most (beyond them: the undelivered rows only)
SINCE_MAX = 5000


def _key(m: dict) -> tuple[bytes, int]:
    return m["sessionId"].encode("utf-8"), m["seq"]


class Syncer:
    """Sends one connection its user's undelivered messages, page by page, then ``sync_done`` (module docstring)."""

    log = Logger()

    def __init__(self, store: Any, router: Any, config: Any, clock: Any = None,
                 stopping: Callable[[], bool] = lambda: False, transient: Sequence[type] = ()) -> None:
        self.store = store
        self.router = router
        self.config = config
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = clock
        self.stopping = stopping
        self.transient = tuple(transient)
        #: first pages asked for in this reactor turn: user id -> Deferreds (read by one statement)
        self._firsts: dict[str, list[defer.Deferred]] = {}
        self._firsts_size = 0

    def _first_page(self, user_id: str, size: int) -> defer.Deferred:
        """``undelivered_page(user_id, None, size)``, read with the other first pages asked for in this turn."""
        if self._firsts and size != self._firsts_size:
            self._read_firsts()  # a config change between two syncs: never mix page sizes
        if not self._firsts:
            self._firsts_size = size
            self.clock.callLater(0, self._read_firsts)
        d: defer.Deferred = defer.Deferred()
        self._firsts.setdefault(user_id, []).append(d)
        return d

    def _read_firsts(self) -> None:
        waiting, self._firsts = self._firsts, {}
        if not waiting:
            return

        def answer(pages: Any) -> None:
            for user, ds in waiting.items():
                for d in ds:
                    d.callback(list(pages.get(user, [])))

        def fail(failure: Any) -> None:
            for ds in waiting.values():
                for d in ds:
                    d.errback(failure)  # each sync retries on its own (and batches again)

        try:
            read = self.store.undelivered_first_pages(list(waiting), self._firsts_size)
        except Exception:
            fail(Failure())
            return
        read.addCallbacks(answer, fail)

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

    async def _recent(self, item: Item) -> list[dict]:
        """What a re-sync's ``since`` adds (module docstring), sorted like the pages."""
        if not item.resync or item.since is None:
            return []
        since = max(int(item.since), int(self.clock.seconds() * 1000) - SINCE_HORIZON_MS)
        recent = await self._retrying(
            "reading recent messages", item,
            lambda: self.store.recent_messages(item.user_id, since, self.config.sync_page_size, SINCE_MAX))
        return sorted(recent, key=_key)

    async def _run(self, item: Item) -> int | None:
        size = self.config.sync_page_size
        budget = self.router.max_bytes - BODY_OVERHEAD - len(item.conn_id) - 8

        def read(after: tuple[str, int] | None) -> defer.Deferred:
            return defer.Deferred.fromCoroutine(self._retrying(
                "reading undelivered messages", item,
                lambda: self._first_page(item.user_id, size) if after is None
                else self.store.undelivered_page(item.user_id, after, size)))

        def mark(pairs: list[tuple[str, str]]) -> defer.Deferred:
            return defer.Deferred.fromCoroutine(self._retrying(
                "marking rows sending", item, lambda: self.store.mark_sending(pairs)))

        recent = await self._recent(item)
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
                messages = page
                if recent:
                    # the recent messages up to this page's last key (all of them on the last page)
                    top = None if last else _key(page[-1])
                    n = len(recent) if top is None else sum(1 for m in recent if _key(m) <= top)
                    taken, recent = recent[:n], recent[n:]
                    ids = {m["msgId"] for m in page}
                    messages = sorted(page + [m for m in taken if m["msgId"] not in ids], key=_key)
                frames = [protocol.encode({"type": "message_send", **m}) for m in messages]
                if last:
                    frames.append(protocol.encode({"type": "sync_done", "count": count + len(messages)}))
                for run in split_frames(frames, budget):
                    body = delivery_body([item.conn_id], run)
                    routed = await self._retrying(
                        "publishing a page", item,
                        lambda body=body: defer.Deferred.fromCoroutine(self._publish_page(item, body)))
                    if not routed:
                        self.log.info("sync of {conn} ended: its gateway is gone", conn=item.conn_id)
                        return None
                count += len(messages)
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

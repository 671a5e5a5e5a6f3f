"""Retention: old messages and delivered delivery rows go, in small batches, without long locks.

``imcluster prune --older-than DAYS`` (by hand, or from cron) and the
processors' ``retention_days`` (:mod:`imcluster.processor.retention`, one
processor at a time) run :func:`prune`:

1. ``messagerecv`` rows created more than ``older_than`` days ago, walked in
   primary-key ranges of ``batch`` ids from the smallest id: each range is
   one short autocommit ``DELETE ... WHERE id >= lo AND id < hi AND
   created_at < cutoff`` (an index range scan; their ``messagesend`` rows go
   with them by ``ON DELETE CASCADE``, delivered or not: a recipient away
   for longer than the retention does not get them). Ids grow with time, so
   the walk stops at the first id whose row is younger than the cutoff.
2. ``messagesend`` rows ``delivered`` more than ``delivered_older_than``
   days ago (their message may be kept longer), walked in primary-key
   ``(user_id, msg_id)`` pages of ``batch`` rows: one keyset read of the
   page's last key, then one ``DELETE`` of that key range.

Every statement touches at most ``batch`` messages (or rows), so no lock is
held longer than one small statement and the processors' windows, which
lock ``session`` rows and insert, are never waited on for long. ``pause``
seconds between statements leave room to the live traffic.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from twisted.internet import defer, task


@dataclass
class PruneResult:
    messages: int = 0
    deliveries: int = 0
    statements: int = 0
    seconds: float = 0.0
    #: where the delivered-rows walk stopped (``keep_going`` said stop), None when it finished
    next_key: tuple | None = None


_FIRST = "SELECT id, created_at < %s FROM messagerecv WHERE id >= %s ORDER BY id LIMIT 1"
_DELETE_MESSAGES = "DELETE FROM messagerecv WHERE id >= %s AND id < %s AND created_at < %s"
_PAGE_END = ("SELECT user_id, msg_id FROM messagesend WHERE (user_id, msg_id) > (%s, %s) "
             "ORDER BY user_id, msg_id OFFSET %s LIMIT 1")
_DELETE_DELIVERED = ("DELETE FROM messagesend WHERE (user_id, msg_id) > (%s, %s) AND (user_id, msg_id) <= (%s, %s) "
                     "AND status = 'delivered' AND updated_at < %s")
_DELETE_DELIVERED_REST = ("DELETE FROM messagesend WHERE (user_id, msg_id) > (%s, %s) "
                          "AND status = 'delivered' AND updated_at < %s")


async def prune(db: Any, older_than: float | None, delivered_older_than: float | None, batch: int = 1000,
                pause: float = 0.0, sleep: Callable[[float], Any] | None = None,
                keep_going: Callable[[], bool] = lambda: True, now: float | None = None,
                start_key: tuple | None = None) -> PruneResult:
    """Delete what is older than the cutoffs (days; None: that part is skipped); see the module docstring.

    ``db``: :class:`imcluster.db.PostgresService` (or :class:`SyncDB`).
    ``keep_going()`` is asked before every statement (a stopping processor
    stops between two); the delivered-rows walk then reports where it
    stopped (``next_key``), and ``start_key`` resumes it.
    """
    if sleep is None:
        from twisted.internet import reactor

        def sleep(seconds: float) -> defer.Deferred:
            return task.deferLater(reactor, seconds, lambda: None)
    started = time.monotonic()
    result = PruneResult()
    now = time.time() if now is None else now

    async def breathe() -> None:
        if pause > 0:
            await sleep(pause)

    if older_than is not None:
        cutoff = _timestamp(now - older_than * 86400)
        lo = 0
        while keep_going():
            rows = await db.run_query(_FIRST, (cutoff, lo))
            result.statements += 1
            if not rows or not rows[0][1]:
                break
            lo = rows[0][0]
            result.messages += await db.run_operation(_DELETE_MESSAGES, (lo, lo + batch, cutoff))
            result.statements += 1
            lo += batch
            await breathe()
    if delivered_older_than is not None:
        cutoff = _timestamp(now - delivered_older_than * 86400)
        key = tuple(start_key) if start_key else ("", -1)
        while True:
            if not keep_going():
                result.next_key = key
                break
            rows = await db.run_query(_PAGE_END, (*key, batch - 1))
            result.statements += 1
            if not rows:
                result.deliveries += await db.run_operation(_DELETE_DELIVERED_REST, (*key, cutoff))
                result.statements += 1
                break
            end = (rows[0][0], rows[0][1])
            result.deliveries += await db.run_operation(_DELETE_DELIVERED, (*key, *end, cutoff))
            result.statements += 1
            key = end
            await breathe()
    result.seconds = time.monotonic() - started
    return result


def _timestamp(epoch: float) -> Any:
    import datetime

    return datetime.datetime.fromtimestamp(epoch, tz=datetime.timezone.utc)


def prune_deferred(*args: Any, **kw: Any) -> defer.Deferred:
    """:func:`prune` as a Deferred."""
    return defer.Deferred.fromCoroutine(prune(*args, **kw))


class SyncDB:
    """``run_query`` / ``run_operation`` on a blocking psycopg2 connection (autocommit), as fired
    Deferreds: :func:`prune` then runs straight through without a reactor (``imcluster prune``)."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def run_query(self, sql: str, params: Any = None) -> defer.Deferred:
        try:
            with self.conn.cursor() as c:
                c.execute(sql, params)
                return defer.succeed(c.fetchall())
        except Exception:
            return defer.fail()

    def run_operation(self, sql: str, params: Any = None) -> defer.Deferred:
        try:
            with self.conn.cursor() as c:
                c.execute(sql, params)
                return defer.succeed(c.rowcount)
        except Exception:
            return defer.fail()


def prune_sync(conn: Any, older_than: float | None, delivered_older_than: float | None, batch: int = 1000,
               pause: float = 0.0) -> PruneResult:
    """:func:`prune` on a blocking psycopg2 connection (autocommit, ``search_path`` set)."""
    def sleep(seconds: float) -> defer.Deferred:
        time.sleep(seconds)
        return defer.succeed(None)

    out: list[Any] = []
    prune_deferred(SyncDB(conn), older_than, delivered_older_than, batch, pause, sleep).addBoth(out.append)
    from twisted.python.failure import Failure

    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]

"""``retention_days``: the processors prune old messages themselves, one processor at a time.

Every ``retention_interval`` seconds, the processor that takes the Redis
lock ``<prefix>RETENTION_LOCK`` (``SET NX PX``, like the redelivery sweep's)
runs :func:`imcluster.store.prune.prune` with ``retention_batch`` rows a
statement for at most half an interval: ``messagerecv`` rows older than
``retention_days`` (and their ``messagesend`` rows, delivered or not) and,
with ``retention_delivered_days``, ``messagesend`` rows delivered longer ago
than that while their message is kept, from the key where the last pass
stopped (``<prefix>RETENTION_CURSOR``). Each statement is short, so the
windows of the processors never wait long on it. Off while
``retention_days`` is 0.
"""

from __future__ import annotations

import json
import uuid as _uuid
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from imcluster.processor.retry import is_transient
from imcluster.service import GuardedLoop
from imcluster.store.prune import prune


class Retention:
    """One retention pass at a time (module docstring)."""

    log = Logger()

    def __init__(self, db: Any, registry: Any, config: Any, clock: Any = None, owner: str | None = None) -> None:
        self.db = db
        self.registry = registry
        self.config = config
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = clock
        self.owner = owner or str(_uuid.uuid4())
        prefix = getattr(getattr(registry, "keys", None), "prefix", "")
        self.lock_key = f"{prefix}RETENTION_LOCK"
        self.cursor_key = f"{prefix}RETENTION_CURSOR"
        self.passes = 0
        self._stopping = False

    def service(self) -> GuardedLoop:
        loop = GuardedLoop(self.config.retention_interval, self.run_once, "retention", clock=self.clock, now=False)
        original_stop = loop.stopService

        def stop() -> Any:
            self._stopping = True
            return original_stop()

        loop.stopService = stop
        return loop

    def run_once(self) -> defer.Deferred:
        d = defer.Deferred.fromCoroutine(self._pass())

        def unavailable(f: Any) -> Any:
            if not is_transient(f):
                return f
            self.log.warn("retention pass skipped: {err}", err=f.getErrorMessage() or f.type.__name__)
            return None

        return d.addErrback(unavailable)

    async def _pass(self) -> Any:
        interval = self.config.retention_interval
        got = await self.registry.execute("SET", self.lock_key, self.owner, "NX", "PX",
                                          str(max(100, int(interval * 900))))
        if got is None:
            return None
        self.passes += 1
        raw = await self.registry.execute("GET", self.cursor_key)
        start = None
        try:
            value = json.loads(raw) if raw else None
            if isinstance(value, list) and len(value) == 2:
                start = (str(value[0]), int(value[1]))
        except (TypeError, ValueError):
            start = None
        deadline = self.clock.seconds() + interval / 2
        days = self.config.retention_days
        delivered = self.config.retention_delivered_days or None
        result = await prune(self.db, days, delivered, self.config.retention_batch, pause=0.0,
                             keep_going=lambda: not self._stopping and self.clock.seconds() < deadline,
                             start_key=start)
        if result.next_key is not None:
            await self.registry.execute("SET", self.cursor_key, json.dumps(list(result.next_key)),
                                        "PX", str(int(max(interval * 10, 600) * 1000)))
        else:
            await self.registry.execute("DEL", self.cursor_key)
        if result.messages or result.deliveries:
            self.log.info("retention: pruned {m} messages and {d} delivered rows older than {days} days "
                          "in {s:.2f}s ({n} statements)", m=result.messages, d=result.deliveries, days=days,
                          s=result.seconds, n=result.statements)
        return result

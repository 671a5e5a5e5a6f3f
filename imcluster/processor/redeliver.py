"""The redelivery sweep: rows left undelivered to users who are online are delivered again.

Deliveries heal by themselves (ARCHITECTURE.md "Failure rules"): a gateway
re-syncs its connections once its queue is declared again or it
re-registered in Redis, and this sweep covers whatever else leaves a
connected recipient waiting (a window routed while its gateway was held
back as unroutable, a lookup that raced a re-registration, a processor
that died between commit and routing, causes nobody listed).

Every ``redeliver_interval`` seconds one processor of the cluster (a Redis
lock, ``<prefix>REDELIVER_LOCK``, taken with ``SET NX PX``) reads up to
``redeliver_batch`` rows still ``pending``/``sending`` whose ``updated_at``
is at least ``redeliver_age`` seconds old, in ``updated_at`` order after a
cursor shared in Redis (``<prefix>REDELIVER_CURSOR``; this processor's own
when Redis lost it), on the partial index ``messagesend_stale`` (0003). It
looks up where their users are connected (ONE ``routes`` round trip),
publishes ``message_send`` to every connection of those who are online,
gateways held back after an unroutable publish included (a confirmed
publish ends the hold), and moves the cursor past the page.

Cost is bounded: a pass reads at most ``redeliver_batch`` rows, and the
cursor passes every row once (a row of an offline user is looked at once;
a row the sweep delivered is not marked, so it is not looked at again
either); rows older than :data:`HORIZON` seconds are never read (a sweep
that fell behind jumps). What the sweep cannot deliver (the user offline,
the gateway's queue missing) is what ``auth`` syncs and the gateway's
re-sync send. The sweep writes nothing to PostgreSQL.
"""

from __future__ import annotations

import json
import uuid as _uuid
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from imcluster import metrics, protocol
from imcluster.processor.retry import is_transient
from imcluster.processor.router import Outbox
from imcluster.service import GuardedLoop

#: seconds back the sweep ever looks (a processor started, or a cursor lost, starts there)
HORIZON = 120.0


#: the fields of a stale row that make its ``message_send`` (as a sync page's)
_FIELDS = ("msgId", "sessionId", "seq", "from", "clientMsgId", "body", "ts", "kind", "ref")


class Redeliverer:
    """One sweep pass at a time (module docstring); :meth:`service` runs it every ``redeliver_interval``."""

    log = Logger()

    def __init__(self, store: Any, router: Any, config: Any, clock: Any = None, owner: str | None = None) -> None:
        self.store = store
        self.router = router
        self.registry = router.registry
        self.config = config
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = clock
        self.owner = owner or str(_uuid.uuid4())
        keys = getattr(self.registry, "keys", None)
        if keys is None:  # a bare registry in unit tests
            from imcluster.registry import RedisKeys
            keys = RedisKeys()
        self.lock_key = keys.redeliver_lock()
        self.cursor_key = keys.redeliver_cursor()
        #: the last cursor this processor knew (used when Redis lost the shared one)
        self.cursor: list | None = None
        self.passes = 0
        self.redelivered = 0

    def service(self) -> GuardedLoop:
        return GuardedLoop(self.config.redeliver_interval, self.run_once, "redeliver", clock=self.clock,
                           now=False)

    def run_once(self) -> defer.Deferred:
        """One pass; fires with the deliveries sent (0 when another processor holds the lock)."""
        d = defer.Deferred.fromCoroutine(self._pass())

        def unavailable(f: Any) -> int:
            if not is_transient(f):
                return f
            self.log.warn("redelivery sweep skipped: {err}", err=f.getErrorMessage() or f.type.__name__)
            return 0

        return d.addErrback(unavailable)

    async def _locked(self) -> bool:
        ttl_ms = max(100, int(self.config.redeliver_interval * 900))
        got = await self.registry.execute("SET", self.lock_key, self.owner, "NX", "PX", str(ttl_ms))
        return got is not None

    async def _shared_cursor(self) -> list | None:
        raw = await self.registry.execute("GET", self.cursor_key)
        if raw:
            try:
                cursor = json.loads(raw)
                if isinstance(cursor, list) and len(cursor) == 3:
                    return cursor
            except ValueError:
                pass
        return self.cursor

    async def _pass(self) -> int:
        if not await self._locked():
            return 0
        self.passes += 1
        cursor = await self._shared_cursor()
        rows = await self.store.stale_undelivered(cursor, self.config.redeliver_age, HORIZON,
                                                  self.config.redeliver_batch)
        if not rows:
            return 0
        metrics.SWEEP_ROWS.inc(len(rows))
        users = list(dict.fromkeys(r["userId"] for r in rows))
        lookup = await self.router.lookup(users, held=True)
        sent = 0
        outbox = Outbox()
        if lookup.conns:
            by_msg: dict[str, tuple[dict, list[str]]] = {}
            for r in rows:
                if r["userId"] in lookup.conns:
                    entry = by_msg.get(r["msgId"])
                    if entry is None:
                        entry = by_msg[r["msgId"]] = (r, [])
                    entry[1].append(r["userId"])
            for first, recipients in sorted(by_msg.values(),
                                            key=lambda e: (e[0]["sessionId"].encode(), e[0]["seq"])):
                frame = protocol.encode({"type": "message_send", **{k: first[k] for k in _FIELDS if k in first}})
                for uuid, (conn_ids, _users) in lookup.targets(recipients).items():
                    outbox.add(uuid, conn_ids, frame, delivery=True)
        if outbox.gateways:
            routed: set[str] = set()
            await self.router.publish(outbox, set(), routed)
            sent = sum(outbox.gateways[u].deliveries for u in routed)
            if sent:
                metrics.REDELIVERED.inc(sent)
                self.redelivered += sent
                self.log.info("redelivery sweep: {n} deliveries of {rows} rows left undelivered",
                              n=sent, rows=len(rows))
        self.cursor = rows[-1]["cursor"]
        await self.registry.execute("SET", self.cursor_key, json.dumps(self.cursor), "PX",
                                    str(int(HORIZON * 1000)))
        return sent


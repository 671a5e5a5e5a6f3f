"""Routing: where recipients are connected, and one publish per gateway per window.

For a window of work the pipeline asks :meth:`Router.lookup` once: the
connections of every user that gets something and which gateways involved
are alive, in ONE Redis round trip (``IRegistry.routes``: a script on
``RedisService``).
Gateways whose ``WSSERVER_<uuid>`` is gone, or whose queue was unroutable a
moment ago, are skipped. Frames are collected in an :class:`Outbox` per
gateway and sent with ONE publish per gateway (:func:`imcluster.envelope.deliveries_body`)::

    {"v":1,"items":[{"connIds":[...],"frames":[...]}, ...]}

to ``<ns>.wsserver.<uuid>`` with ``mandatory=True``. A delivery frame is
JSON-encoded once per window, whatever the number of its connections and
gateways; consecutive frames for the same connections share one item.

An unroutable publish means the gateway's auto-delete queue is gone (it
died, or the broker restarted): the router stops routing to it for
``unroutable_hold`` seconds and asks the reaper to check it, which reaps it
only once its ``WSSERVER_<uuid>`` key is gone too (ARCHITECTURE.md).
What could not be routed stays undelivered and arrives with the next sync.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from imcluster import bus as _bus
from imcluster import metrics
from imcluster.envelope import BODY_OVERHEAD, deliveries_body, gateway_of, text_size


@dataclass
class Lookup:
    """Where users are connected: their connections on usable (alive, routable) gateways."""

    #: user -> [(gateway uuid, conn id), ...] on usable gateways only
    conns: dict[str, list[tuple[str, str]]]
    #: gateways that may be published to now
    usable: set[str]

    def targets(self, users: Iterable[str], exclude_conn: str | None = None
                ) -> dict[str, tuple[list[str], list[str]]]:
        """``{uuid: (conn_ids, users)}``: every connection of ``users`` except ``exclude_conn``.

        ``users`` per gateway are those with at least one connection there
        (whose ``messagesend`` rows become ``sending`` once that publish is
        confirmed).
        """
        out: dict[str, tuple[list[str], list[str]]] = {}
        conns = self.conns
        for user in users:
            entries = conns.get(user)
            if not entries:
                continue
            for uuid, conn_id in entries:
                if conn_id == exclude_conn:
                    continue
                slot = out.get(uuid)
                if slot is None:
                    slot = out[uuid] = ([], [])
                slot[0].append(conn_id)
                if not slot[1] or slot[1][-1] != user:
                    slot[1].append(user)
        return out


def split_entries(entries: list[list], budget: int) -> list[list[list]]:
    """``[[conn_ids, frames], ...]`` cut into runs whose body stays within ``budget`` bytes, in order.

    An entry whose frames do not fit is cut between frames (its connection
    ids repeated); a frame larger than ``budget`` alone is a run of its own.
    """
    parts: list[list[list]] = [[]]
    used = 0
    for conn_ids, frames in entries:
        head = len(json.dumps(conn_ids)) + 32
        cur: list | None = None
        for frame in frames:
            size = text_size(frame) + 1
            if cur is None:
                if parts[-1] and used + head + size > budget:
                    parts.append([])
                    used = 0
                cur = [conn_ids, []]
                parts[-1].append(cur)
                used += head
            elif used + size > budget:
                parts.append([])
                cur = [conn_ids, []]
                parts[-1].append(cur)
                used = head
            cur[1].append(frame)
            used += size
    return parts


@dataclass
class _Batch:
    entries: list[list] = field(default_factory=list)  # [conn_ids, encoded frames]
    #: estimated body bytes (frames and connection ids)
    size: int = 0
    #: the bodies once split (``max_publish_bytes``), and how many of them are confirmed
    bodies: list[bytes] | None = None
    sent: int = 0
    #: (users, msg_id): rows to mark ``sending`` once this gateway confirmed
    pairs: list[tuple[Sequence[str], str]] = field(default_factory=list)
    deliveries: int = 0  # message_send frames x connections
    api: bool = False  # an imapi's replies: unroutable means it is gone, not a dead gateway


class Outbox:
    """Everything one window sends, grouped per gateway (one publish each)."""

    def __init__(self) -> None:
        self.gateways: dict[str, _Batch] = {}

    def __len__(self) -> int:
        return len(self.gateways)

    def add(self, uuid: str, conn_ids: list[str], frame: str, users: Sequence[str] = (),
            msg_id: str | None = None, delivery: bool = False, api: bool = False) -> None:
        """Queue the encoded ``frame`` for ``conn_ids`` on gateway ``uuid``.

        ``users``/``msg_id``: the recipients whose rows this delivery moves to
        ``sending``; ``delivery``: count it as a ``message_send`` routed;
        ``api``: ``uuid`` is an imapi (replies only; never marked dead).
        """
        batch = self.gateways.get(uuid)
        if batch is None:
            batch = self.gateways[uuid] = _Batch(api=api)
        entries = batch.entries
        if entries and entries[-1][0] == conn_ids:
            entries[-1][1].append(frame)
        else:
            entries.append([conn_ids, [frame]])
            batch.size += 32 + sum(len(c) + 3 for c in conn_ids)
        batch.size += text_size(frame) + 1
        if msg_id is not None and users:
            batch.pairs.append((users, msg_id))
        if delivery:
            batch.deliveries += len(conn_ids)

    def body(self, uuid: str) -> bytes:
        """The AMQP body for gateway ``uuid`` (docs/internals.rst), frames already encoded."""
        return deliveries_body(self.gateways[uuid].entries)

    def bodies(self, uuid: str, max_bytes: int) -> list[bytes]:
        """The AMQP bodies for gateway ``uuid``, each within ``max_bytes`` (one unless the window is huge).

        Published in order, they deliver the frames in order (the gateway
        applies its messages in order).
        """
        batch = self.gateways[uuid]
        if batch.bodies is None:
            budget = max_bytes - BODY_OVERHEAD
            if batch.size <= budget:
                batch.bodies = [deliveries_body(batch.entries)]
            else:
                batch.bodies = [deliveries_body(part) for part in split_entries(batch.entries, budget)]
        return batch.bodies

    def pairs(self, uuids: Iterable[str]) -> list[tuple[str, str]]:
        """``(user_id, msg_id)`` rows routed through ``uuids``."""
        out = []
        for uuid in uuids:
            batch = self.gateways.get(uuid)
            if batch is None:
                continue
            for users, msg_id in batch.pairs:
                out.extend((u, msg_id) for u in users)
        return out


class Router:
    """Looks up connections and publishes per gateway; remembers unroutable gateways.

    ``on_unroutable(uuid)`` is called once per unroutable publish (the
    processor wires it to :meth:`imcluster.processor.reaper.Reaper.check`).
    """

    log = Logger()

    #: what the held-back buffer keeps at most (bytes, all gateways) and for how long (seconds)
    held_max_bytes = 32 * 1024 * 1024
    held_max_age = 30.0
    #: seconds between tries of a held-back gateway that has deliveries waiting
    probe_interval = 0.5

    def __init__(self, registry: Any, bus: Any, clock: Any = None, hold: float = 5.0,
                 on_unroutable: Callable[[str], Any] | None = None, max_bytes: int | None = None) -> None:
        self.registry = registry
        self.bus = bus
        if max_bytes is None:
            max_bytes = getattr(bus, "max_publish_bytes", None)
        #: no body published above this (ARCHITECTURE.md "max_publish_bytes")
        self.max_bytes = max_bytes if isinstance(max_bytes, int) else 8 << 20
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = clock
        self.hold = hold
        self.on_unroutable = on_unroutable
        self._dead: dict[str, float] = {}  # uuid -> until
        #: deliveries to gateways whose queue was missing: uuid -> [(queued at, body)], in order
        self._held: dict[str, list[tuple[float, bytes]]] = {}
        self._held_bytes = 0
        self._probe: Any = None

    # --- unroutable gateways

    def is_dead(self, uuid: str) -> bool:
        """True while ``uuid`` is held back after an unroutable publish."""
        until = self._dead.get(uuid)
        if until is None:
            return False
        if self.clock.seconds() >= until:
            del self._dead[uuid]
            return False
        return True

    def mark_alive(self, uuid: str) -> None:
        """A publish to ``uuid`` was confirmed: its queue is back, route to it again at once."""
        if self._dead.pop(uuid, None) is not None:
            self.log.info("gateway {uuid} is routable again", uuid=uuid)

    def mark_dead(self, uuid: str) -> None:
        """Stop routing to ``uuid`` for ``hold`` seconds and ask for a reap check."""
        first = not self.is_dead(uuid)
        self._dead[uuid] = self.clock.seconds() + self.hold
        if first:
            self.log.warn("gateway {uuid} is unroutable (its queue is gone); not routing to it for {hold}s",
                          uuid=uuid, hold=self.hold)
        if self.on_unroutable is not None:
            d = defer.maybeDeferred(self.on_unroutable, uuid)
            d.addErrback(lambda f: self.log.warn("reap check of {uuid} failed: {err}",
                                                 uuid=uuid, err=f.getErrorMessage()))

    # --- deliveries held back while a live gateway's queue is missing

    def hold_back(self, uuid: str, body: bytes) -> None:
        """Keep ``body`` for ``uuid`` until its queue answers again (bounded: oldest dropped first).

        A live gateway's queue is missing for a moment after a broker
        restart or its own AMQP loss; what was routed meanwhile is published
        again as soon as a try is confirmed (every :attr:`probe_interval`
        seconds), in order. Dropped (too old, too much, the gateway's key
        gone) it is still undelivered in PostgreSQL: the gateway's re-sync
        and the redelivery sweep send it.
        """
        now = self.clock.seconds()
        self._held.setdefault(uuid, []).append((now, body))
        self._held_bytes += len(body)
        while self._held_bytes > self.held_max_bytes:
            oldest = min(self._held, key=lambda u: self._held[u][0][0])
            self._drop_held(oldest, 1, "the buffer is full")
        if self._probe is None or not self._probe.active():
            self._probe = self.clock.callLater(self.probe_interval, self._try_held)

    def _drop_held(self, uuid: str, n: int, why: str) -> None:
        entries = self._held.get(uuid, [])
        dropped, self._held[uuid] = entries[:n], entries[n:]
        self._held_bytes -= sum(len(b) for _, b in dropped)
        if not self._held[uuid]:
            del self._held[uuid]
        if dropped:
            self.log.info("dropped {n} held-back deliveries to {uuid} ({why}); sync and the sweep send them",
                          n=len(dropped), uuid=uuid, why=why)

    def _try_held(self) -> None:
        self._probe = None

        def again(result: Any) -> None:
            if isinstance(result, Failure):
                self.log.warn("retrying held-back deliveries failed: {err}", err=result.getErrorMessage())
            if self._held and (self._probe is None or not self._probe.active()):
                self._probe = self.clock.callLater(self.probe_interval, self._try_held)

        defer.Deferred.fromCoroutine(self._flush_held()).addBoth(again)

    def _pop_held(self, uuid: str, body: bytes) -> None:
        entries = self._held.get(uuid)
        if entries and entries[0][1] is body:
            del entries[0]
            self._held_bytes -= len(body)
            if not entries:
                del self._held[uuid]

    async def _flush_held(self) -> None:
        now = self.clock.seconds()
        for uuid in list(self._held):
            stale = sum(1 for t, _ in self._held[uuid] if now - t > self.held_max_age)
            if stale:
                self._drop_held(uuid, stale, "too old")
        uuids = list(self._held)
        if not uuids:
            return
        alive = await self.registry.alive(uuids)
        for uuid in uuids:
            if uuid not in alive:
                self._drop_held(uuid, len(self._held.get(uuid, [])), "the gateway is gone")
        for uuid in list(self._held):
            while self._held.get(uuid):
                body = self._held[uuid][0][1]
                try:
                    await self.bus.publish(self.bus.gateway_key(uuid), body, mandatory=True)
                except _bus.Unroutable:
                    break  # still missing: try again later
                except _bus.Refused as e:
                    self.log.error("a held-back delivery to {uuid} was refused for good: {err}",
                                   uuid=uuid, err=str(e))
                else:
                    self.mark_alive(uuid)
                self._pop_held(uuid, body)

    def held(self) -> int:
        """Deliveries held back now (tests, metrics)."""
        return sum(len(v) for v in self._held.values())

    # --- lookups

    @defer.inlineCallbacks
    def lookup(self, users: Iterable[str], gateways: Iterable[str] = (), held: bool = False):
        """Where ``users`` are connected and which gateways (theirs and ``gateways``) are usable.

        ONE ``routes`` round trip (connections and live gateways); fires with a :class:`Lookup`.
        ``held``: gateways held back after an unroutable publish count as
        usable too (the redelivery sweep tries them: one publish tells).
        """
        users = list(dict.fromkeys(users))
        raw, alive = yield self.registry.routes(users, sorted(gateways))
        return self._lookup(raw, alive, True)

    def _lookup(self, raw: dict, alive: set, held: bool = False) -> Lookup:
        usable = set(alive) if held else {u for u in alive if not self.is_dead(u)}
        conns: dict[str, list[tuple[str, str]]] = {}
        for user, fields in raw.items():
            kept = []
            for conn_id in fields:
                uuid = gateway_of(conn_id)
                if uuid is not None and uuid in usable:
                    kept.append((uuid, conn_id))
            if kept:
                conns[user] = kept
        return Lookup(conns, usable)

    # --- publishing

    def publish_one(self, uuid: str, body: bytes, api: bool = False) -> defer.Deferred:
        """Publish ``body`` to gateway ``uuid``; fires True when confirmed, False when unroutable.

        Unroutable marks a gateway dead; for an imapi (``api``) it only
        drops the replies (that imapi has gone). Other failures (RabbitMQ
        unavailable, nacked) fail the Deferred.
        """
        d = self.bus.publish(self.bus.gateway_key(uuid), body, mandatory=True)

        def confirmed(_: Any) -> bool:
            if uuid in self._dead:
                self.mark_alive(uuid)
            return True

        def failed(f: Failure) -> bool:
            f.trap(_bus.Unroutable)
            if api:
                self.log.info("replies to imapi {uuid} dropped: its queue is gone", uuid=uuid)
            else:
                self.mark_dead(uuid)
            return False

        return d.addCallbacks(confirmed, failed)

    @defer.inlineCallbacks
    def publish(self, outbox: Outbox, done: set[str], routed: set[str]):
        """Publish every gateway of ``outbox`` not in ``done``, all at once.

        Confirmed gateways join ``done`` and ``routed``; unroutable ones join
        ``done`` only (marked dead). When any publish failed otherwise, the
        first such failure is raised once all have settled: the caller
        retries, and only the gateways not ``done`` are published again.
        """
        todo = [u for u in outbox.gateways if u not in done]
        if not todo:
            return
        results = yield defer.DeferredList(
            [defer.Deferred.fromCoroutine(self._publish_gateway(outbox, u)) for u in todo], consumeErrors=True)
        failure = None
        for uuid, (ok, value) in zip(todo, results):
            if ok:
                done.add(uuid)
                if value:
                    routed.add(uuid)
            elif failure is None:
                failure = value
        if failure is not None:
            failure.raiseException()

    async def _publish_gateway(self, outbox: Outbox, uuid: str) -> bool:
        """Every body of ``uuid`` in order, resuming after those confirmed; False when unroutable."""
        batch = outbox.gateways[uuid]
        bodies = outbox.bodies(uuid, self.max_bytes)
        if not batch.api and (self.is_dead(uuid) or uuid in self._held):
            # its queue is missing (a moment ago): behind what already waits for it
            for body in bodies[batch.sent:]:
                self.hold_back(uuid, body)
            batch.sent = len(bodies)
            return False
        while batch.sent < len(bodies):
            try:
                ok = await self.publish_one(uuid, bodies[batch.sent], batch.api)
            except _bus.Refused as e:
                # a single frame above max_publish_bytes (cannot be split): its producer
                # should have capped it; the rest of the window goes on
                self.log.error("a delivery to {uuid} was refused for good and dropped: {err}",
                               uuid=uuid, err=str(e))
                metrics.POISON.labels(reason="refused").inc()
                ok = True
            if not ok:
                if not batch.api:
                    for body in bodies[batch.sent:]:
                        self.hold_back(uuid, body)
                batch.sent = len(bodies)
                return False
            batch.sent += 1
        return True

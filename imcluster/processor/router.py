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

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from imcluster import bus as _bus
from imcluster.envelope import deliveries_body, gateway_of


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


@dataclass
class _Batch:
    entries: list[list] = field(default_factory=list)  # [conn_ids, encoded frames]
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
        if msg_id is not None and users:
            batch.pairs.append((users, msg_id))
        if delivery:
            batch.deliveries += len(conn_ids)

    def body(self, uuid: str) -> bytes:
        """The AMQP body for gateway ``uuid`` (docs/internals.rst), frames already encoded."""
        return deliveries_body(self.gateways[uuid].entries)

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

    def __init__(self, registry: Any, bus: Any, clock: Any = None, hold: float = 5.0,
                 on_unroutable: Callable[[str], Any] | None = None) -> None:
        self.registry = registry
        self.bus = bus
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = clock
        self.hold = hold
        self.on_unroutable = on_unroutable
        self._dead: dict[str, float] = {}  # uuid -> until

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

    # --- lookups

    @defer.inlineCallbacks
    def lookup(self, users: Iterable[str], gateways: Iterable[str] = ()):
        """Where ``users`` are connected and which gateways (theirs and ``gateways``) are usable.

        ONE ``routes`` round trip (connections and live gateways); fires with a :class:`Lookup`.
        """
        users = list(dict.fromkeys(users))
        raw, alive = yield self.registry.routes(users, sorted(gateways))
        return self._lookup(raw, alive)

    def _lookup(self, raw: dict, alive: set) -> Lookup:
        usable = {u for u in alive if not self.is_dead(u)}
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

        def failed(f: Failure) -> bool:
            f.trap(_bus.Unroutable)
            if api:
                self.log.info("replies to imapi {uuid} dropped: its queue is gone", uuid=uuid)
            else:
                self.mark_dead(uuid)
            return False

        return d.addCallbacks(lambda _: True, failed)

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
            [self.publish_one(u, outbox.body(u), outbox.gateways[u].api) for u in todo], consumeErrors=True)
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

"""The liveness watch: a gateway killed without exiting goes offline within seconds, not ``--server-ttl``.

A gateway subscribes the channel ``WSALIVE##{<uuid>}`` on its presence
connection to Redis (with several shards, on the shard of its hash tag,
where its ``WSSERVER_{<uuid>}`` key is) before it registers, and keeps it for its life
(``imcluster/presence.py``). When its process dies (SIGKILL, a crash, the
OOM killer), the kernel closes its sockets and Redis drops the
subscription at once, while ``WSSERVER_<uuid>`` lives on until its TTL
(``--server-ttl``, 300 s by default).

Every ``presence_check`` seconds each processor asks Redis, in one round
trip (with several shards, one per shard, at once: each gateway's shard),
for ``WSSERVERS``' gateways: ``PUBSUB NUMSUB`` of their liveness channels
and whether their ``WSSERVER_`` key exists. A gateway

* whose key is gone is reaped at once (:meth:`Reaper.check`; the ordinary
  reaper would get to it within ``--heartbeat``);
* that this processor has seen subscribed and then unsubscribed for at
  least ``presence_grace`` seconds in a row (a reconnecting gateway is back
  within about 2 s) is reaped as dead (:meth:`Reaper.reap_dead`): its
  entries and key go and its users without another connection go offline.

A gateway never seen subscribed (one of a version without this channel, or
dead before this processor started) is left to the TTL. One that was only
cut off from Redis longer than the grace and is alive finds its key gone
when its presence connection (or heartbeat) is back, and registers again
(the gateway's re-registration; ARCHITECTURE.md failure rules). Any number
of processors may watch: reaping is idempotent.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from imcluster.presence import liveness_channel
from imcluster.registry import RedisConnectionError
from imcluster.service import GuardedLoop


#: a gateway whose shard did not answer
_UNKNOWN = object()


class LivenessWatch:
    """Finds gateways whose presence connection is gone and reaps them (module docstring)."""

    log = Logger()

    def __init__(self, registry: Any, reaper: Any, grace: float, clock: Any = None) -> None:
        self.registry = registry
        self.reaper = reaper
        self.grace = grace
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = clock
        self.prefix = getattr(registry, "prefix", "") or ""
        #: gateways seen subscribed
        self._seen: set[str] = set()
        #: gateway -> when it was first seen unsubscribed (after being seen subscribed)
        self._gone_since: dict[str, float] = {}
        self.reaped: list[str] = []

    @defer.inlineCallbacks
    def run(self):
        """One check; fires with the gateways reaped as dead."""
        servers = sorted((yield self.registry.servers()))
        if not servers:
            self._seen.clear()
            self._gone_since.clear()
            return []
        keys = self.registry.keys
        nodes = getattr(self.registry, "nodes", None) or ()
        if len(nodes) > 1:
            counts, values = yield self._ask_shards(servers)
        else:
            channels = [liveness_channel(self.prefix, u) for u in servers]
            numsub, values = yield self.registry.pipeline([
                ("PUBSUB", "NUMSUB", *channels), ("MGET", *[keys.server(u) for u in servers])])
            counts = {numsub[i]: int(numsub[i + 1]) for i in range(0, len(numsub) - 1, 2)}
        now = self.clock.seconds()
        dead = []
        for uuid, value in zip(servers, values):
            if value is _UNKNOWN:
                continue  # its shard did not answer: nothing decided
            if value is None:
                # expired: the ordinary reap, now rather than at the next heartbeat
                self.reaper.check(uuid).addErrback(
                    lambda f, u=uuid: self.log.warn("reaping {uuid}: {err}", uuid=u, err=f.getErrorMessage()))
                continue
            if counts.get(liveness_channel(self.prefix, uuid), 0) > 0:
                self._seen.add(uuid)
                self._gone_since.pop(uuid, None)
                continue
            if uuid not in self._seen:
                continue
            since = self._gone_since.setdefault(uuid, now)
            if now - since >= self.grace:
                dead.append(uuid)
        for uuid in dead:
            self._seen.discard(uuid)
            self._gone_since.pop(uuid, None)
            yield self.reaper.reap_dead(uuid, f"its presence connection closed {self.grace:g}s ago")
            self.reaped.append(uuid)
        known = set(servers)
        self._seen &= known
        for uuid in [u for u in self._gone_since if u not in known]:
            del self._gone_since[uuid]
        return dead

    @defer.inlineCallbacks
    def _ask_shards(self, servers: list[str]):
        """Several shards: per gateway shard (its hash tag, where it subscribes ``WSALIVE##{<uuid>}``),
        ``PUBSUB NUMSUB`` and ``MGET`` of its gateways in one round trip, every shard at once.

        A shard that fails leaves its gateways undecided this time (logged).
        """
        reg, keys = self.registry, self.registry.keys
        plan: dict[Any, list[str]] = {}
        for u in servers:
            plan.setdefault(reg.node_for(keys.server(u)), []).append(u)
        nodes = list(plan)
        results = yield defer.DeferredList([
            n.pipeline([("PUBSUB", "NUMSUB", *[liveness_channel(self.prefix, u) for u in plan[n]]),
                        ("MGET", *[keys.server(u) for u in plan[n]])]) for n in nodes], consumeErrors=True)
        counts: dict[str, int] = {}
        found: dict[str, Any] = {}
        for n, (ok, r) in zip(nodes, results):
            if not ok:
                self.log.warn("liveness check of the gateways on Redis {where} skipped: {err}",
                              where=n.where, err=r.getErrorMessage())
                continue
            numsub, vals = r
            counts.update({numsub[i]: int(numsub[i + 1]) for i in range(0, len(numsub) - 1, 2)})
            found.update(zip(plan[n], vals))
        return counts, [found.get(u, _UNKNOWN) for u in servers]

    def run_once(self) -> defer.Deferred:
        d = self.run()

        def unavailable(f: Any) -> None:
            f.trap(TimeoutError, RedisConnectionError)
            self.log.warn("liveness check skipped: {err}", err=f.getErrorMessage())

        return d.addErrback(unavailable)

    def service(self, interval: float) -> GuardedLoop:
        """A :class:`GuardedLoop` running :meth:`run_once` every ``interval`` seconds."""
        return GuardedLoop(interval, self.run_once, "liveness", clock=self.clock, now=True)

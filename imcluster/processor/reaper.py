"""The reaper: removes the Redis entries of gateways that died without exiting (flow 9).

Every ``heartbeat`` seconds (a :class:`imcluster.service.GuardedLoop`) it
reads ``WSSERVERS`` (``registry.servers``), asks which of them still have
their ``WSSERVER_<uuid>`` key (ONE ``registry.alive``), and reaps the others
with ``registry.reap_server``, which is atomic in Redis and removes a
gateway only while its key is gone: any number of processors may reap at
once, and a gateway that comes back (re-creates its key) is left alone.
The router also asks for a check at once when a publish to a gateway comes
back unroutable (:meth:`Reaper.check`).

With a presence ``tracker`` (:class:`imcluster.presence.Tracker`), a reap
reads the gateway's users (``WSCONNS##<uuid>``) first and checks their
presence afterwards: those without a connection left elsewhere go offline
(``presence`` frames, ``user.offline`` events). The liveness watch
(``liveness.py``) reaps through :meth:`Reaper.reap_dead` too.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from imcluster import metrics
from imcluster.registry import RedisConnectionError
from imcluster.service import GuardedLoop


class Reaper:
    """Finds dead gateways in the registry and reaps them."""

    log = Logger()

    def __init__(self, registry: Any, tracker: Any = None) -> None:
        self.registry = registry
        self.tracker = tracker
        self._checking: dict[str, defer.Deferred] = {}

    @defer.inlineCallbacks
    def run(self):
        """One pass over ``WSSERVERS``; fires with the uuids this call reaped."""
        servers = yield self.registry.servers()
        if not servers:
            return []
        alive = yield self.registry.alive(sorted(servers))
        reaped = []
        for uuid in sorted(set(servers) - set(alive)):
            if (yield self._reap(uuid)):
                reaped.append(uuid)
        return reaped

    def check(self, uuid: str) -> defer.Deferred:
        """Reap ``uuid`` now if its ``WSSERVER_`` key is gone; fires True when this call reaped it.

        Checks of one gateway do not overlap (an unroutable burst asks once).
        """
        running = self._checking.get(uuid)
        if running is not None:
            return defer.succeed(False)

        @defer.inlineCallbacks
        def checking():
            alive = yield self.registry.alive([uuid])
            if uuid in alive:
                return False
            return (yield self._reap(uuid))

        d = checking()
        self._checking[uuid] = d

        def done(result: Any) -> Any:
            self._checking.pop(uuid, None)
            return result

        return d.addBoth(done)

    @defer.inlineCallbacks
    def _reap(self, uuid: str):
        users = yield self._users_of(uuid)
        reaped = yield self.registry.reap_server(uuid)
        if reaped:
            metrics.REAPED.inc()
            self.log.info("reaped dead gateway {uuid}: its WSSERVER_ key expired", uuid=uuid)
        yield self._offline(users)
        return bool(reaped)

    @defer.inlineCallbacks
    def reap_dead(self, uuid: str, why: str):
        """Remove gateway ``uuid``'s entries (and its key) now: it is known dead (``why``).

        A gateway that was alive after all finds its key gone on its next
        heartbeat and registers everything again (ARCHITECTURE.md failure rules).
        """
        users = yield self._users_of(uuid)
        removed = yield self.registry.unregister_server(uuid)
        metrics.REAPED.inc()
        self.log.info("reaped gateway {uuid} ({why}): {n} connections", uuid=uuid, why=why, n=removed)
        yield self._offline(users)
        return removed

    def _users_of(self, uuid: str) -> defer.Deferred:
        if self.tracker is None:
            return defer.succeed([])
        d = self.registry.execute("SMEMBERS", self.registry.keys.wsconns(uuid))
        return d.addCallback(lambda members: list(dict.fromkeys(m.partition("##")[0] for m in members)))

    def _offline(self, users: list[str]) -> defer.Deferred:
        if not users or self.tracker is None:
            return defer.succeed([])
        d = self.tracker.reconcile(users)

        def failed(f: Any) -> None:
            # the entries are gone: the next change of those users corrects their state
            self.log.warn("presence of {n} reaped users not checked: {err}", n=len(users),
                          err=f.getErrorMessage())

        return d.addErrback(failed)

    def run_once(self) -> defer.Deferred:
        """:meth:`run`, with Redis being down logged as one line (the next pass tries again)."""
        d = self.run()

        def unavailable(f: Any) -> None:
            f.trap(TimeoutError, RedisConnectionError)
            self.log.warn("reaper pass skipped: {err}", err=f.getErrorMessage())

        return d.addErrback(unavailable)

    def service(self, interval: float, clock: Any = None) -> GuardedLoop:
        """A :class:`GuardedLoop` running :meth:`run_once` every ``interval`` seconds (first run at start)."""
        return GuardedLoop(interval, self.run_once, "reaper", clock=clock, now=True)

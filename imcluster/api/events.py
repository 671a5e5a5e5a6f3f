"""imapi's events for business servers: ``session.members`` of sessions created over HTTP (HTTP-API.md).

A group created with ``POST /v1/sessions`` is one ``session.members``
event on ``<ns>.webhooks`` (the processors deliver it to ``webhook_url``),
published persistent and confirmed before the request is answered. Member
changes (``POST /v1/sessions/{id}/members``) are ``members`` events stored
by the processors, which publish their ``session.members`` with the window
that stores them.
"""

from __future__ import annotations

from typing import Any, Sequence

from twisted.internet import defer
from twisted.logger import Logger

from imcluster import envelope, metrics


class SessionEvents:
    """Publishes ``session.members`` events when ``webhook_url`` is set and the event is wanted."""

    log = Logger()

    def __init__(self, bus: Any, config: Any) -> None:
        v = config.values
        self.bus = bus
        self.enabled = bool(v.get("webhook_url")) and envelope.SESSION_MEMBERS in (v.get("webhook_events") or ())
        self.queue = bus.names.webhooks_queue()

    def declare(self) -> defer.Deferred:
        """Declare ``<ns>.webhooks`` on every connection (nothing when off)."""
        if not self.enabled:
            return defer.succeed(None)
        return self.bus.declare_queue(self.queue)

    async def members(self, session_id: str, added: Sequence[str], removed: Sequence[str]) -> None:
        """Publish one ``session.members``; a broker that is down is logged (the change is committed)."""
        if not self.enabled or not (added or removed):
            return
        body = envelope.events_bodies([envelope.session_members_event(session_id, added, removed)])[0]
        try:
            await self.bus.publish(self.queue.routing_key, body)
        except Exception as e:
            self.log.error("session.members of {session} not published: {err}", session=session_id, err=str(e))
            return
        metrics.BUSINESS_PUBLISHED.labels(queue="webhooks").inc()

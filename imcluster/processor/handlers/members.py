"""``members``: imapi's membership change (``POST /v1/sessions/{id}/members``), as an event.

Only an imapi sends this frame (``protocol.API_TYPES``; a gateway refuses
it), after checking that the caller owns the session or holds the admin
key. Stored as a ``members`` event ``{"added","removed"}`` (only the users
that change; nothing is stored when nobody does), delivered to the members
after the change and to the users it removes (their last entry of the
session); answered ``members_reply`` with the members after it. The frame's
``clientMsgId`` (imapi picks one per request) is the event's key. See
``events.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from imcluster import protocol
from imcluster.processor.handlers.events import EventHandler
from imcluster.store import MEMBERS, Event

if TYPE_CHECKING:
    from imcluster.processor.pipeline import Item, Pipeline, Window


class MembersHandler(EventHandler):
    type = protocol.MEMBERS
    reply_type = "members_reply"

    def event(self, p: "Pipeline", w: "Window", item: "Item") -> Event:
        f = item.frame
        return Event(MEMBERS, item.user_id, f["clientMsgId"], session_id=f["sessionId"],
                     add=tuple(f.get("add", ())), remove=tuple(f.get("remove", ())), ts_ms=item.ts,
                     trusted=True)

    def reply(self, p: "Pipeline", w: "Window", item: "Item") -> dict | None:
        reply = super().reply(p, w, item)
        status, value = w.answers[id(item)]
        if status == "ok":
            reply["members"] = value[1]
        return reply

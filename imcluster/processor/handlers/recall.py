"""``recall``: the original sender takes a message back within ``recall_window`` (PROTOCOL.md 1.1).

Stored as a ``recall`` event (``ref`` the msgId, ``body`` null) after which
the original shows ``recalled`` with a null body; answered ``recall_reply``.
Its key is ``recall:<msgId>``: recalling the same message again answers the
first recall. imapi's admin (``trusted``) recalls any message at any time
(HTTP-API.md). See ``events.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from imcluster import protocol
from imcluster.processor.handlers.events import EventHandler
from imcluster.store import RECALL, Event

if TYPE_CHECKING:
    from imcluster.processor.pipeline import Item, Pipeline, Window


class RecallHandler(EventHandler):
    type = protocol.RECALL
    reply_type = "recall_reply"

    def event(self, p: "Pipeline", w: "Window", item: "Item") -> Event:
        f = item.frame
        return Event(RECALL, item.user_id, f"recall:{f['msgId']}"[:64], session_id=f.get("sessionId"),
                     ref=f["msgId"], ts_ms=item.ts, trusted=item.trusted,
                     window=None if item.trusted else float(p.config.recall_window))

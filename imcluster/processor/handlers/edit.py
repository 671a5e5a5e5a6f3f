"""``edit``: the original sender replaces a message's body within ``edit_window`` (PROTOCOL.md 1.1).

Stored as an ``edit`` event (``ref`` the msgId, ``body`` the new body);
the original then shows the latest body and ``edited``; answered
``edit_reply``. A message may be edited many times: each ``edit`` frame's
key is a digest of the item that carried it (connection, time, frame), so
only the same item run again is a duplicate. See ``events.py``.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from imcluster import protocol
from imcluster.processor.handlers.events import EventHandler
from imcluster.store import EDIT, Event

if TYPE_CHECKING:
    from imcluster.processor.pipeline import Item, Pipeline


class EditHandler(EventHandler):
    type = protocol.EDIT
    reply_type = "edit_reply"

    def event(self, p: "Pipeline", item: "Item") -> Event:
        f = item.frame
        digest = hashlib.sha256(protocol.encode_bytes([item.conn_id, item.ts, f])).hexdigest()[:40]
        return Event(EDIT, item.user_id, f"edit:{digest}", session_id=f.get("sessionId"), ref=f["msgId"],
                     body=f["body"], ts_ms=item.ts, window=float(p.config.edit_window))

"""``edit``: the original sender replaces a message's body within ``edit_window`` (PROTOCOL.md 1.1).

Stored as an ``edit`` event (``ref`` the msgId, ``body`` the new body);
the original then shows the latest body and ``edited``; answered
``edit_reply``. A message may be edited many times: each ``edit`` frame's
key is a digest of the item that carried it (connection, time, frame), so
only the same item run again is a duplicate. The new body passes the
moderation filters as a message's does (``prepare``): a rejection is
answered ``rejected`` and nothing is stored, a replacement changes the
body. See ``events.py``.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from twisted.internet import defer

from imcluster import protocol
from imcluster.processor.filters import REJECT, REPLACE, Verdict, apply_filters
from imcluster.processor.handlers.events import EventHandler
from imcluster.store import EDIT, Event, StoreError

if TYPE_CHECKING:
    from imcluster.processor.pipeline import Item, Pipeline, Window, _Turn


#: the window's attribute holding the edits' moderation verdicts (id(item) -> Verdict), kept across a retry
VERDICTS = "edit_verdicts"


class EditHandler(EventHandler):
    type = protocol.EDIT
    reply_type = "edit_reply"

    async def prepare(self, p: "Pipeline", w: "Window", items: list["Item"]) -> None:
        verdicts = w.__dict__.setdefault(VERDICTS, {})
        for item in items:
            if id(item) in verdicts:
                continue
            if not p.filters:
                verdicts[id(item)] = Verdict.accept()
                continue
            f = item.frame
            verdict = apply_filters(p.filters, {"from": item.user_id, "sessionId": f.get("sessionId"),
                                                "clientMsgId": None, "body": f["body"]})
            if isinstance(verdict, defer.Deferred):
                verdict = await verdict
            verdicts[id(item)] = verdict

    async def store(self, p: "Pipeline", w: "Window", items: list["Item"], locked: "_Turn") -> None:
        verdicts = w.__dict__.get(VERDICTS, {})
        for item in items:
            verdict = verdicts.get(id(item))
            if verdict is not None and verdict.action == REJECT and id(item) not in w.answers:
                w.answers[id(item)] = ("error", StoreError(protocol.REJECTED,
                                                           verdict.reason or "rejected by moderation"))
        await super().store(p, w, items, locked)

    def event(self, p: "Pipeline", w: "Window", item: "Item") -> Event:
        f = item.frame
        digest = hashlib.sha256(protocol.encode_bytes([item.conn_id, item.ts, f])).hexdigest()[:40]
        verdict = w.__dict__.get(VERDICTS, {}).get(id(item))
        body = verdict.body if verdict is not None and verdict.action == REPLACE else f["body"]
        return Event(EDIT, item.user_id, f"edit:{digest}", session_id=f.get("sessionId"), ref=f["msgId"],
                     body=body, ts_ms=item.ts, window=float(p.config.edit_window))

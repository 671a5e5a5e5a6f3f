"""``history``: a page of a session's messages (PROTOCOL.md "History"), answered ``history_reply``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet import defer

from imcluster import protocol
from imcluster.processor.handlers.base import Handler, answer, client_code

if TYPE_CHECKING:
    from imcluster.processor.pipeline import Item, Pipeline, Window


class HistoryHandler(Handler):
    type = protocol.HISTORY
    queries = True

    def query(self, p: "Pipeline", item: "Item") -> defer.Deferred:
        f = item.frame
        return p.store.history(item.user_id, f["sessionId"], f.get("beforeSeq"), f["limit"])

    def reply(self, p: "Pipeline", w: "Window", item: "Item") -> dict | None:
        f = item.frame
        status, value = answer(w, item)
        if status == "error":
            return protocol.reply_to(f, client_code(value.code), value.message)
        reply = {"type": "history_reply", "sessionId": f["sessionId"], "messages": value}
        if "id" in f:
            reply["id"] = f["id"]
        return reply

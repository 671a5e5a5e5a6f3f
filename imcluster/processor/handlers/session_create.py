"""``session_create``: a new group (PROTOCOL.md "Sessions"), answered ``session_reply``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet import defer

from imcluster import protocol
from imcluster.processor.handlers.base import Handler, answer, client_code

if TYPE_CHECKING:
    from imcluster.processor.pipeline import Item, Pipeline, Window


class SessionCreateHandler(Handler):
    type = protocol.SESSION_CREATE
    queries = True

    def query(self, p: "Pipeline", item: "Item") -> defer.Deferred:
        f = item.frame
        return p.store.create_session(item.user_id, f["members"], f.get("sessionId"), "group")

    def reply(self, p: "Pipeline", w: "Window", item: "Item") -> dict | None:
        f = item.frame
        status, value = answer(w, item)
        reply = {"type": "session_reply"}
        if "id" in f:
            reply["id"] = f["id"]
        if status == "error":
            reply.update(ok=False, error={"code": client_code(value.code), "message": value.message})
        else:
            reply.update(ok=True, sessionId=value[0], members=value[1])
        return reply

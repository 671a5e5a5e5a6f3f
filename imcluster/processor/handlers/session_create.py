"""``session_create``: a new group (PROTOCOL.md "Sessions"), answered ``session_reply``.

The group is created with its ``members`` event as ``seq`` 1 (PROTOCOL.md
1.1: ``{"added": members}`` from the creator), in the same transaction;
the event goes to every member's connections but the creating one, like a
message.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

from twisted.internet import defer

from imcluster import protocol
from imcluster.processor.handlers.base import Handler, answer, client_code
from imcluster.processor.handlers.message import MessageHandler

if TYPE_CHECKING:
    from imcluster.processor.pipeline import Item, Pipeline, Window
    from imcluster.processor.router import Lookup, Outbox


class SessionCreateHandler(Handler):
    type = protocol.SESSION_CREATE
    queries = True

    def query(self, p: "Pipeline", item: "Item") -> defer.Deferred:
        f = item.frame
        return p.store.create_session_with_event(item.user_id, f["members"], f.get("sessionId"), ts_ms=item.ts)

    @staticmethod
    def _event(w: "Window", item: "Item") -> Any:
        status, value = w.answers.get(id(item), ("error", None))
        return value[2] if status == "ok" else None

    def users(self, p: "Pipeline", w: "Window", items: list["Item"]) -> Iterable[str]:
        users: list[str] = []
        for item in items:
            stored = self._event(w, item)
            if stored is not None:
                users.extend(stored.recipients)
                users.append(stored.sender)
        return users

    def route(self, p: "Pipeline", w: "Window", items: list["Item"], outbox: "Outbox", lookup: "Lookup") -> None:
        cache: dict = {}
        for item in items:
            stored = self._event(w, item)
            if stored is not None:
                MessageHandler._deliver(outbox, lookup, stored, item.conn_id, cache)

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

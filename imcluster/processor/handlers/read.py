"""``read``: move the reader's cursor; every member's connections get a ``read_receipt``.

No reply on success (the reader's other connections get the receipt too);
a refusal is answered with an ``error`` frame.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from twisted.internet import defer

from imcluster import protocol
from imcluster.processor.handlers.base import Handler, answer, client_code

if TYPE_CHECKING:
    from imcluster.processor.pipeline import Item, Pipeline, Window
    from imcluster.processor.router import Lookup, Outbox


def _done(w: "Window", items: list["Item"]) -> list["Item"]:
    return [i for i in items if w.answers.get(id(i), ("error",))[0] == "ok"]


class ReadHandler(Handler):
    type = protocol.READ
    queries = True

    def query(self, p: "Pipeline", item: "Item") -> defer.Deferred:
        f = item.frame
        return p.store.read(item.user_id, f["sessionId"], f["seq"])

    def users(self, p: "Pipeline", w: "Window", items: list["Item"]) -> Iterable[str]:
        return [u for i in _done(w, items) for u in w.answers[id(i)][1][1]]

    def reply(self, p: "Pipeline", w: "Window", item: "Item") -> dict | None:
        status, value = answer(w, item)
        if status == "error":
            return protocol.reply_to(item.frame, client_code(value.code), value.message)
        return None  # receipts go to everyone, see route

    def route(self, p: "Pipeline", w: "Window", items: list["Item"], outbox: "Outbox", lookup: "Lookup") -> None:
        encode = protocol.encode
        for item in _done(w, items):
            cursor, members = w.answers[id(item)][1]
            frame = encode({"type": "read_receipt", "sessionId": item.frame["sessionId"],
                            "userId": item.user_id, "seq": cursor})
            for uuid, (conn_ids, _users) in lookup.targets(members, item.conn_id).items():
                outbox.add(uuid, conn_ids, frame)

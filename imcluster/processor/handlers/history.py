"""``history``: a page of a session's messages (PROTOCOL.md "History"), answered ``history_reply``.

A reply never exceeds ``max_publish_bytes`` (less a margin for its
envelope): a page holds the newest messages of the page that fit, which
may be fewer than ``limit``; the client pages on with ``beforeSeq`` (the
lowest ``seq`` it got), as for any page (docs/protocol.rst). A single
message too large for a reply on its own is answered ``too_large``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet import defer

from imcluster import protocol
from imcluster.envelope import text_size
from imcluster.processor.handlers.base import Handler, answer, client_code

if TYPE_CHECKING:
    from imcluster.processor.pipeline import Item, Pipeline, Window


#: bytes of a reply's envelope (frame fields, connection id, the batch around it)
REPLY_MARGIN = 1024


def fit(messages: list[dict], budget: int) -> list[dict]:
    """The newest of ``messages`` (ascending seq) whose JSON fits in ``budget`` bytes, still ascending."""
    used = 0
    n = 0
    for m in reversed(messages):
        used += text_size(protocol.encode(m)) + 1
        if used > budget:
            break
        n += 1
    return messages[len(messages) - n:] if n < len(messages) else messages


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
        messages = fit(value, p.router.max_bytes - REPLY_MARGIN)
        if value and not messages:
            return protocol.reply_to(f, protocol.TOO_LARGE, "a message of this page is too large for a reply")
        reply = {"type": "history_reply", "sessionId": f["sessionId"], "messages": messages}
        if "id" in f:
            reply["id"] = f["id"]
        return reply

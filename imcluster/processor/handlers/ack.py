"""``message_send_reply``: acknowledgements become ``delivered`` rows (PROTOCOL.md "Acknowledging").

The window's acknowledgements are applied with ONE ``store.mark_delivered``,
beside the store, the queries and the routing: replies and deliveries do not
wait for them (a fan-out's acknowledgements are many rows); the window (and
so its queue messages) is done only once they are. No reply.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from imcluster import metrics, protocol
from imcluster.processor.handlers.base import Handler

if TYPE_CHECKING:
    from imcluster.processor.pipeline import Item, Pipeline, Window


class AckHandler(Handler):
    type = protocol.MESSAGE_SEND_REPLY

    async def apply(self, p: "Pipeline", w: "Window", items: list["Item"]) -> None:
        if w.acked:
            return
        acks = [(i.user_id, i.frame["msgIds"]) for i in items if i.frame["msgIds"]]
        if acks:
            n = await p.store.mark_delivered(acks)
            metrics.ACKS.inc(n or 0)
        w.acked = True

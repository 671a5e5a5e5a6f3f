"""``message_send_reply``: acknowledgements become ``delivered`` rows (PROTOCOL.md "Acknowledging").

The window's acknowledgements are applied with ONE store call
(``mark_delivered_receipts``), beside the store, the queries and the
routing: replies and deliveries do not wait for them (a fan-out's
acknowledgements are many rows); the window (and so its queue messages) is
done only once they are. No reply.

Rows of ``p2p:`` sessions that this window moved to ``delivered`` are told
to their senders (PROTOCOL.md 1.1 "Delivery state of one's own messages"):
one ``delivery_receipt`` per (session, acknowledging user) of the window,
``{"type":"delivery_receipt","sessionId","userId","msgIds"}``, to every
connection of the other user of the session, in one publish per gateway of
its own. Best effort: history is the record, so a failure to look up or
publish receipts is logged and never fails (or retries) the window.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.logger import Logger

from imcluster import metrics, protocol
from imcluster.processor.handlers.base import Handler
from imcluster.processor.router import Outbox
from imcluster.store import parse_p2p

if TYPE_CHECKING:
    from imcluster.processor.pipeline import Item, Pipeline, Window


class AckHandler(Handler):
    type = protocol.MESSAGE_SEND_REPLY
    log = Logger()

    async def apply(self, p: "Pipeline", w: "Window", items: list["Item"]) -> None:
        if w.acked:
            return
        acks = [(i.user_id, i.frame["msgIds"]) for i in items if i.frame["msgIds"]]
        receipts: list[dict] = []
        if acks:
            n, receipts = await p.store.mark_delivered_receipts(acks)
            metrics.ACKS.inc(n or 0)
        w.acked = True
        if receipts:
            try:
                await self._receipts(p, receipts)
            except Exception as e:  # best effort (module docstring)
                self.log.info("delivery receipts of a window not sent: {err}", err=str(e) or type(e).__name__)

    @staticmethod
    async def _receipts(p: "Pipeline", receipts: list[dict]) -> None:
        to: list[tuple[str, dict]] = []
        for r in receipts:
            pair = parse_p2p(r["sessionId"])
            if pair is None:
                continue
            sender = pair[1] if pair[0] == r["userId"] else pair[0]
            to.append((sender, {"type": "delivery_receipt", **r}))
        if not to:
            return
        lookup = await p.router.lookup([u for u, _ in to])
        outbox = Outbox()
        for user, frame in to:
            encoded = protocol.encode(frame)
            for uuid, (conn_ids, _users) in lookup.targets([user]).items():
                outbox.add(uuid, conn_ids, encoded)
        if outbox.gateways:
            await p.router.publish(outbox, set(), set())

"""What the event frames share: ``recall``, ``edit`` and imapi's ``members`` (PROTOCOL.md 1.1).

An event is an entry of its session, like a message: it takes the next
``seq``, has a ``messagesend`` row per recipient (sync, acknowledgement),
is delivered as ``message_send`` with ``kind`` (and ``ref``) and is listed
in history. Each handler here:

1. ``store``, in the window's lock turn, after the window's messages (the
   table's order): one :meth:`~imcluster.interfaces.IMessageStore.store_event`
   per item, in window order. Events are rare: each is a short transaction
   of its own that locks its session row first, as the messages' window
   transaction does, so the seq order and the recipients are those of the
   messages around it. Its key (``clientMsgId`` of the entry) makes a
   window run again answer the stored event as a duplicate;
2. ``reply``: ``<type>_reply`` with the event's ``msgId``, ``sessionId``,
   ``seq``, or ``ok:false`` with the store's code (``not_allowed``,
   ``no_message``...);
3. ``route``: the event's ``message_send`` to its recipients' connections
   and the sender's other connections, exactly as a message's (a removed
   member is a recipient of the event that removes it, and of nothing after
   it: it is no longer a member);
4. the rows routed become ``sending`` (they were inserted ``pending``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

from imcluster.processor.handlers.base import Handler, client_code
from imcluster.processor.handlers.message import MessageHandler
from imcluster.store import Event, StoreError

if TYPE_CHECKING:
    from imcluster.processor.pipeline import Item, Pipeline, Window, _Turn
    from imcluster.processor.router import Lookup, Outbox


class EventHandler(Handler):
    """One event frame type (module docstring); subclasses say how an item becomes an :class:`Event`."""

    ordered = True
    #: the reply's type
    reply_type = ""

    def event(self, p: "Pipeline", w: "Window", item: "Item") -> Event:
        raise NotImplementedError

    async def store(self, p: "Pipeline", w: "Window", items: list["Item"], locked: "_Turn") -> None:
        for item in items:
            if id(item) in w.answers:
                continue  # stored by a run before this one
            try:
                w.answers[id(item)] = ("ok", await p.store.store_event(self.event(p, w, item)))
            except StoreError as e:
                w.answers[id(item)] = ("error", e)

    def _stored(self, w: "Window", item: "Item") -> Any:
        status, value = w.answers.get(id(item), ("error", None))
        return value[0] if status == "ok" else None

    def users(self, p: "Pipeline", w: "Window", items: list["Item"]) -> Iterable[str]:
        users: list[str] = []
        for item in items:
            stored = self._stored(w, item)
            if stored is not None:
                users.extend(stored.recipients)
                if not stored.duplicate:
                    users.append(stored.sender)
        return users

    def reply(self, p: "Pipeline", w: "Window", item: "Item") -> dict | None:
        status, value = w.answers[id(item)]
        reply: dict = {"type": self.reply_type}
        if "id" in item.frame:
            reply["id"] = item.frame["id"]
        if status == "error":
            reply.update(ok=False, error={"code": client_code(value.code), "message": value.message})
            return reply
        reply["ok"] = True
        stored = value[0]
        if stored is not None:
            reply.update(msgId=stored.msg_id, sessionId=stored.session_id, seq=stored.seq)
        return reply

    def route(self, p: "Pipeline", w: "Window", items: list["Item"], outbox: "Outbox", lookup: "Lookup") -> None:
        cache: dict = {}
        for item in items:
            stored = self._stored(w, item)
            if stored is not None:
                MessageHandler._deliver(outbox, lookup, stored, item.conn_id, cache)

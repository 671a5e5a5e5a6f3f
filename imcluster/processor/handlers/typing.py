"""``typing``: "a member is typing", to every other connection of the session's members; never stored.

PROTOCOL.md 1.1 "Typing": every connection of the other members, and of the
sender's other devices, gets ``{"type":"typing","sessionId","userId"}``; no
reply, no storage, no sync, no acknowledgement. A sender that is not a
member gets ``error`` ``not_member`` (``no_session`` when the session does
not exist, as for ``read`` and ``history``). The gateway has already dropped
all but one a second per connection and session (``typing_interval``).

Cheap by construction: the window's typing frames cost ONE store call
(``session_members`` of all their sessions, started in ``prepare`` and
waited for beside the window's store stage), and ride on the window's one
registry lookup and one publish per gateway with everything else.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any, Iterable

from twisted.internet import defer

from imcluster import protocol
from imcluster.processor.handlers.base import Handler, answer
from imcluster.store import StoreError
from imcluster.store.base import parse_p2p

if TYPE_CHECKING:
    from imcluster.processor.pipeline import Item, Pipeline, Window
    from imcluster.processor.router import Lookup, Outbox


def _done(w: "Window", items: list["Item"]) -> list["Item"]:
    return [i for i in items if w.answers.get(id(i), ("error",))[0] == "ok"]


class TypingHandler(Handler):
    type = protocol.TYPING
    queries = True

    def __init__(self) -> None:
        #: item -> the shared lookup of its window (set in prepare, taken in query)
        self._lookups: "weakref.WeakKeyDictionary[Any, defer.Deferred]" = weakref.WeakKeyDictionary()

    async def prepare(self, p: "Pipeline", w: "Window", items: list["Item"]) -> None:
        todo = [i for i in items if id(i) not in w.answers]
        if not todo:
            return
        sessions = {i.frame["sessionId"] for i in todo}
        lookup = p.store.session_members(sessions)
        shared = _Shared(lookup)
        for i in todo:
            self._lookups[i] = shared

    def query(self, p: "Pipeline", item: "Item") -> defer.Deferred:
        shared = self._lookups.pop(item, None)
        if shared is None:  # pragma: no cover (prepare always runs first)
            shared = _Shared(p.store.session_members([item.frame["sessionId"]]))
        return shared.wait(p.clock).addCallback(self._members_of, item)

    @staticmethod
    def _members_of(members: dict, item: "Item") -> list[str]:
        session_id = item.frame["sessionId"]
        found = members.get(session_id)
        if found is None:
            pair = parse_p2p(session_id)
            if pair is None:
                raise StoreError("no_session", "no such session")
            found = list(pair)  # a 1:1 session exists implicitly (PROTOCOL.md "Sessions")
        if item.user_id not in found:
            raise StoreError("not_member", "not a member of this session")
        return found

    def users(self, p: "Pipeline", w: "Window", items: list["Item"]) -> Iterable[str]:
        return [u for i in _done(w, items) for u in w.answers[id(i)][1]]

    def reply(self, p: "Pipeline", w: "Window", item: "Item") -> dict | None:
        status, value = answer(w, item)
        if status == "error":
            return protocol.reply_to(item.frame, value.code, value.message)
        return None

    def route(self, p: "Pipeline", w: "Window", items: list["Item"], outbox: "Outbox", lookup: "Lookup") -> None:
        encode = protocol.encode
        for item in _done(w, items):
            frame = encode({"type": protocol.TYPING, "sessionId": item.frame["sessionId"],
                            "userId": item.user_id})
            for uuid, (conn_ids, _users) in lookup.targets(w.answers[id(item)][1], item.conn_id).items():
                outbox.add(uuid, conn_ids, frame)


class _Shared:
    """One store call that many items wait for, each with a Deferred of its own."""

    def __init__(self, d: defer.Deferred) -> None:
        self.result: Any = None
        self.done = False
        self.waiters: list[defer.Deferred] = []
        d.addBoth(self._fire)

    def _fire(self, result: Any) -> None:
        self.done, self.result = True, result
        waiters, self.waiters = self.waiters, []
        for w in waiters:
            self._give(w)

    def _give(self, w: defer.Deferred) -> None:
        from twisted.python.failure import Failure

        if isinstance(self.result, Failure):
            w.errback(self.result)
        else:
            w.callback(self.result)

    def wait(self, clock: Any) -> defer.Deferred:
        w = defer.Deferred()
        if self.done:
            # on the next turn: answered at once, the pipeline's query semaphore would run the
            # next item from this one's callback, and so on, one stack frame deeper each
            clock.callLater(0, self._give, w)
        else:
            self.waiters.append(w)
        return w

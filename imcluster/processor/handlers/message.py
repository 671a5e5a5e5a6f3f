"""``message``: moderated, stored with a seq, answered ``message_reply``, delivered ``message_send``.

1. ``prepare``: de-duplication, then the moderation filters, in order (a
   rejection is answered ``rejected`` and nothing is stored; a replacement
   changes the body). A message already stored (same sender and
   ``clientMsgId``: one ``stored_keys`` read) is never moderated again: the
   store answers it with its original (ARCHITECTURE.md flow 5). With only
   pure filters (``pure = True``: the keyword filter) the read is made for
   refused messages only, after the filters: the answer is the same;
2. ``store``, in the window's lock turn: ALL the window's messages in ONE
   store transaction (:meth:`~imcluster.interfaces.IMessageStore.begin_window`).
   Once the store holds its locks the turn is given up, the registry is
   asked which recipients are online (a 1:1 recipient, named by the session
   id, is asked beside the locks, not after), and the transaction commits
   with them: their rows are inserted ``sending``;
3. ``reply``: ``message_reply`` (with ``duplicate`` for imapi);
4. ``route``: one ``message_send`` per stored message, in store order (seq
   order within a session), to the recipients' connections and the
   sender's other connections; a duplicate only to recipients still
   undelivered (ARCHITECTURE.md failure rules);
5. ``unmarked``: rows inserted ``sending`` need no ``mark_sending``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

from twisted.internet import defer

from imcluster import metrics, protocol
from imcluster.processor.filters import REJECT, REPLACE, Verdict, apply_filters
from imcluster.processor.handlers.base import Handler, client_code, gather
from imcluster.store import Incoming, p2p_recipients

if TYPE_CHECKING:
    from imcluster.processor.pipeline import Item, Pipeline, Window, _Turn
    from imcluster.processor.router import Lookup, Outbox


def message_send(stored: Any) -> dict:
    """The ``message_send`` frame of a stored message (an event's has ``kind`` and ``ref``, PROTOCOL.md 1.1)."""
    frame = {"type": "message_send", "msgId": stored.msg_id, "sessionId": stored.session_id,
             "seq": stored.seq, "from": stored.sender, "clientMsgId": stored.client_msg_id,
             "body": stored.body, "ts": stored.ts_ms}
    kind = getattr(stored, "kind", "message")
    if kind != "message":
        frame["kind"] = kind
        if stored.ref is not None:
            frame["ref"] = stored.ref
    return frame


def _message_reply_ok(stored: Any) -> dict:
    return {"type": "message_reply", "ok": True, "clientMsgId": stored.client_msg_id,
            "msgId": stored.msg_id, "sessionId": stored.session_id, "seq": stored.seq, "ts": stored.ts_ms}


class MessageHandler(Handler):
    type = protocol.MESSAGE
    ordered = True

    # -- stage 1: moderation

    async def prepare(self, p: "Pipeline", w: "Window", items: list["Item"]) -> None:
        if w.verdicts is not None:
            return
        if not p.filters:
            w.verdicts = {id(item): Verdict.accept() for item in items}
            return
        # de-duplication before moderation (ARCHITECTURE.md flow 5): a retry of a stored
        # message is never moderated again; the store answers it with its original. When
        # every filter is pure (filters.py: the keyword filter), running it on a duplicate
        # changes nothing but its verdict, and only a refusal needs the read (below): the
        # window spares a round trip
        if all(getattr(f, "pure", False) for f in p.filters):
            stored: set = set()
        else:
            stored = await p.store.stored_keys({(i.user_id, i.frame["clientMsgId"]) for i in items})
        verdicts: list[Any] = []
        for item in items:
            f = item.frame
            if (item.user_id, f["clientMsgId"]) in stored:
                verdicts.append(Verdict.accept())
                continue
            verdicts.append(apply_filters(p.filters, {
                "from": item.user_id, "sessionId": f["sessionId"], "clientMsgId": f["clientMsgId"],
                "body": f["body"]}))
        # the calls of one window run at once (a moderation service answers them concurrently)
        waiting = [(n, v) for n, v in enumerate(verdicts) if isinstance(v, defer.Deferred)]
        if waiting:
            results = await gather([v for _, v in waiting])
            for (n, _), v in zip(waiting, results):
                verdicts[n] = v
        # a refused message that is stored (a duplicate a pure filter saw, or one whose
        # original another processor committed since we looked): its original answers it
        refused = {(i.user_id, i.frame["clientMsgId"]) for i, v in zip(items, verdicts) if v.action == REJECT}
        if refused:
            late = await p.store.stored_keys(refused)
            if late:
                verdicts = [Verdict.accept() if (i.user_id, i.frame["clientMsgId"]) in late else v
                            for i, v in zip(items, verdicts)]
        w.verdicts = {id(item): v for item, v in zip(items, verdicts)}

    # -- stage 2: the store, then the router, in turn

    async def store(self, p: "Pipeline", w: "Window", items: list["Item"], locked: "_Turn") -> None:
        batch, owners = [], []
        for item in items:
            verdict = w.verdicts[id(item)]
            if verdict.action == REJECT:
                continue
            f = item.frame
            body = verdict.body if verdict.action == REPLACE else f["body"]
            # the item's ts (the gateway's or imapi's receipt) is the message's time
            batch.append(Incoming(item.user_id, f["clientMsgId"], f["sessionId"], body, item.ts,
                                  trusted=item.trusted))
            owners.append(item)
        if not batch:
            return
        # the store's transaction locks the sessions and says whom the new messages
        # go to; the window gives up its lock turn, asks the registry which of them
        # are online, and commits (their rows are inserted ``sending``, sparing a
        # mark_sending). A 1:1 recipient is in the session id: asked beside the locks
        known = p2p_recipients(batch)
        early = self._online(p, known) if known else None
        try:
            txn = await p.store.begin_window(batch)
            locked.done()
            try:
                online: list[str] = []
                if txn.recipients:
                    if early is not None and set(txn.recipients) <= set(known):
                        online = await early
                    else:
                        online = await self._online(p, txn.recipients)
                results = await txn.commit(online)
            except BaseException:
                txn.abort()  # releases the locks at once (a no-op when the commit itself failed)
                raise
        finally:
            if early is not None:
                early.addErrback(lambda _: None)  # unused, or already raised above
        w.online = set(online)
        now = p.clock.seconds()
        for item, result in zip(owners, results):
            w.stored[id(item)] = result
            if item.ts is not None and result.ok and not result.duplicate:
                metrics.QUEUE_TO_COMMIT.observe(max(0.0, now - item.ts / 1000.0))

    @staticmethod
    def _online(p: "Pipeline", users: list[str]) -> defer.Deferred:
        """Which of ``users`` have a connection (ONE ``connections_of``).

        Routing still looks connections up after the commit (a connection
        registered after this lookup must either be routed to or find the
        message in its sync), and a recipient who left meanwhile keeps a
        ``sending`` row: undelivered all the same.
        """
        return p.router.registry.connections_of(users).addCallback(
            lambda conns: [u for u in users if conns.get(u)])

    # -- stage 3: routing

    def users(self, p: "Pipeline", w: "Window", items: list["Item"]) -> Iterable[str]:
        # recipients, and senders (their other devices)
        users: list[str] = []
        for item in items:
            result = w.stored.get(id(item))
            if result is not None and result.ok:
                users.extend(result.recipients)
                if not result.duplicate:
                    users.append(result.sender)
        return users

    def reply(self, p: "Pipeline", w: "Window", item: "Item") -> dict | None:
        f = item.frame
        result = w.stored.get(id(item))
        if result is None:  # moderation refused it
            verdict = w.verdicts[id(item)]
            return protocol.message_reply_error(f["clientMsgId"], protocol.REJECTED,
                                                verdict.reason or "rejected by moderation")
        if result.ok:
            reply = _message_reply_ok(result)
            if item.api:
                reply["duplicate"] = result.duplicate  # imapi answers 200 or 201 (never to clients)
            return reply
        return protocol.message_reply_error(f["clientMsgId"], client_code(result.code), result.message)

    def route(self, p: "Pipeline", w: "Window", items: list["Item"], outbox: "Outbox", lookup: "Lookup") -> None:
        # in store order (seq order within a session)
        routed_ids: set[str] = set()
        cache: dict[tuple, dict] = {}
        for item in items:
            result = w.stored.get(id(item))
            if result is None or not result.ok or result.msg_id in routed_ids:
                continue
            routed_ids.add(result.msg_id)
            self._deliver(outbox, lookup, result, item.conn_id, cache)

    @staticmethod
    def _deliver(outbox: "Outbox", lookup: "Lookup", stored: Any, sender_conn: str, cache: dict) -> None:
        """Queue ``stored``'s ``message_send`` for its recipients (and the sender's other connections)."""
        # a duplicate goes again only to recipients still undelivered (ARCHITECTURE.md failure rules)
        key = (tuple(stored.recipients), None if stored.duplicate else stored.sender, sender_conn)
        targets = cache.get(key)
        if targets is None:
            users = list(stored.recipients)
            if not stored.duplicate:
                users.append(stored.sender)
            targets = {}
            for uuid, (conn_ids, with_conns) in lookup.targets(users, sender_conn).items():
                rows = [u for u in with_conns if u != stored.sender]
                targets[uuid] = (conn_ids, rows)
            cache[key] = targets
        if not targets:
            return
        frame = protocol.encode(message_send(stored))
        for uuid, (conn_ids, rows) in targets.items():
            outbox.add(uuid, conn_ids, frame, rows, stored.msg_id, delivery=True)

    # -- stage 4: marking, metrics

    def unmarked(self, w: "Window", pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        if not w.online:
            return pairs
        # rows the store inserted ``sending`` already (new messages to online users)
        fresh = {r.msg_id for r in w.stored.values() if r.ok and not r.duplicate}
        return [pr for pr in pairs if not (pr[1] in fresh and pr[0] in w.online)]

    def observe(self, p: "Pipeline", w: "Window", items: list["Item"]) -> None:
        now = p.clock.seconds()
        for item in items:
            result = w.stored.get(id(item))
            if item.ts is not None and result is not None and result.ok and not result.duplicate:
                metrics.END_TO_END.observe(max(0.0, now - item.ts / 1000.0))

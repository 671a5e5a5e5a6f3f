"""FakeStore: an in-memory message store behind the IMessageStore contract."""

from __future__ import annotations

from twisted.internet import defer
from zope.interface import implementer

from imcluster.interfaces import IMessageStore as _IMessageStore
import json

from imcluster import store as _st


@implementer(_IMessageStore)
class FakeStore:
    """:class:`imcluster.store.postgres.MessageStore` in memory, same contract.

    ``tests/test_store.py`` runs one suite over both. ``available = False``
    makes every call fail with the real :class:`imcluster.store.StoreUnavailable`
    (what MessageStore raises while PostgreSQL is down); ``calls`` records
    ``(method, args)`` for assertions; ``now_ms`` is the time of messages
    stored without ``ts_ms``.

    A window transaction holds one lock (the real store locks the window's
    sessions) from ``begin_window`` until its commit or abort: a window begun
    meanwhile waits. Its messages are decided and applied when it begins
    (so its seq numbers are taken), and undone on abort.
    """

    def __init__(self, max_group_size=1000, now_ms=1764160000000):
        self.max_group_size = max_group_size
        self.now_ms = now_ms
        self.available = True
        self.calls = []
        self.sessions = {}  # id -> {"kind", "last_seq", "members": {user: {"role", "read_seq"}}}
        self.messages = {}  # msg_id (int) -> {"session_id","seq","sender","client_msg_id","body","ts"}
        self.by_key = {}  # (sender, client_msg_id) -> msg_id
        self.sends = {}  # (user_id, msg_id) -> status
        self._next_id = 1
        self._lock = defer.DeferredLock()

    def _call(self, name, fn, *args):
        self.calls.append((name, args))
        if not self.available:
            return defer.fail(_st.StoreUnavailable(f"{name}: PostgreSQL unavailable"))
        return defer.maybeDeferred(fn, *args)

    @staticmethod
    def _copy(body):
        # what jsonb would give back: a fresh JSON value of the same meaning
        return json.loads(json.dumps(body))

    # -- messages
    def begin_window(self, batch):
        return self._call("begin_window", self._begin_locked, list(batch))

    def _begin_locked(self, batch):
        return self._lock.acquire().addCallback(self._begin, batch)

    def _begin(self, _lock, batch):
        txn = _st.WindowTransaction(batch)
        undo = []
        try:
            results = self._store(batch, undo)
        except BaseException:
            self._undo(undo)
            self._lock.release()
            raise
        new = [r for r in results if r.ok and not r.duplicate]
        recipients = sorted({u for r in new for u in r.recipients})
        decided = [None if r.ok and not r.duplicate else r for r in results]

        async def run():
            if not new:
                self._lock.release()  # nothing to write: the real store commits at once too
                return results
            try:
                online = await txn.online(recipients)
            except BaseException:
                self._undo(undo)
                raise
            finally:
                self._lock.release()
            for r in new:
                for u in r.recipients:
                    if u in online:
                        self.sends[(u, int(r.msg_id))] = "sending"
            return results

        txn.ready(recipients, decided)
        defer.Deferred.fromCoroutine(run()).addBoth(txn.settle)
        return txn

    def store_messages(self, batch):
        return self.begin_window(batch).addCallback(lambda txn: txn.commit(()))

    def _undo(self, undo):
        for fn in reversed(undo):
            fn()

    def _store(self, batch, undo):
        results, first = [], {}  # first: key -> answer to its first valid copy in this batch
        for m in batch:
            results.append(self._store_one(m, first, undo))
        return results

    def _store_one(self, m, first, undo):
        if not _st.valid_client_msg_id(m.client_msg_id) or not _st.valid_user_id(m.sender):
            return _st.Rejected(str(m.client_msg_id), "bad_frame", "bad sender or clientMsgId")
        if _st.storable_json(m.body) is None:
            return _st.Rejected(m.client_msg_id, "bad_frame", "body is not storable JSON")
        key = (m.sender, m.client_msg_id)
        if key in first and key not in self.by_key:
            return _st.copy_answer(first[key])
        answer = self._decide(m, key, undo)
        first.setdefault(key, answer)
        return answer

    def _decide(self, m, key, undo):
        if key in self.by_key:
            msg_id = self.by_key[key]
            row = self.messages[msg_id]
            pending = sorted((u for (u, i), status in self.sends.items() if i == msg_id and status != "delivered"),
                             key=str.encode)
            return _st.Stored(str(msg_id), row["session_id"], row["seq"], row["ts"], m.sender, m.client_msg_id,
                              self._copy(row["body"]), pending, duplicate=True)
        if not _st.valid_session_id(m.session_id):
            return _st.Rejected(m.client_msg_id, "no_session", "no such session")
        pair = _st.parse_p2p(m.session_id)
        if pair is not None:
            if not m.trusted and m.sender not in pair:
                return _st.Rejected(m.client_msg_id, "not_member", "not a member of this session")
            if m.session_id not in self.sessions:
                self.sessions[m.session_id] = {"kind": "p2p", "last_seq": 0, "members": {
                    u: {"role": "member", "read_seq": 0} for u in pair}}
                undo.append(lambda sid=m.session_id: self.sessions.pop(sid, None))
        session = self.sessions.get(m.session_id)
        if session is None:
            return _st.Rejected(m.client_msg_id, "no_session", "no such session")
        members = sorted(session["members"], key=str.encode)
        if not m.trusted and m.sender not in session["members"]:
            return _st.Rejected(m.client_msg_id, "not_member", "not a member of this session")
        if len(members) > self.max_group_size:
            return _st.Rejected(m.client_msg_id, "too_large",
                                f"the session has more than {self.max_group_size} members")
        undo.append(lambda session=session, seq=session["last_seq"]: session.__setitem__("last_seq", seq))
        session["last_seq"] += 1
        msg_id, self._next_id = self._next_id, self._next_id + 1
        ts = m.ts_ms if m.ts_ms is not None else self.now_ms
        self.messages[msg_id] = {"session_id": m.session_id, "seq": session["last_seq"], "sender": m.sender,
                                 "client_msg_id": m.client_msg_id, "body": self._copy(m.body), "ts": ts}
        self.by_key[key] = msg_id
        recipients = [u for u in members if u != m.sender]
        for u in recipients:
            self.sends[(u, msg_id)] = "pending"
        undo.append(lambda msg_id=msg_id, key=key, recipients=recipients: (
            self.messages.pop(msg_id, None), self.by_key.pop(key, None),
            [self.sends.pop((u, msg_id), None) for u in recipients]))
        return _st.Stored(str(msg_id), m.session_id, session["last_seq"], ts, m.sender, m.client_msg_id,
                          m.body, recipients)

    def stored_keys(self, keys):
        return self._call("stored_keys", lambda ks: {k for k in ks if k in self.by_key}, list(keys))

    def mark_sending(self, pairs):
        return self._call("mark_sending", self._mark, list(pairs), "sending")

    def mark_delivered(self, acks):
        pairs = [(user, msg_id) for user, msg_ids in acks for msg_id in msg_ids]
        return self._call("mark_delivered", self._mark, pairs, "delivered")

    def _mark(self, pairs, status):
        users, ids = _st.sorted_pairs(pairs)
        changed = 0
        for key in zip(users, ids):
            current = self.sends.get(key)
            if current is None or current == "delivered" or (status == "sending" and current != "pending"):
                continue
            self.sends[key] = status
            changed += 1
        return changed

    def _frame(self, msg_id, with_session=True):
        row = self.messages[msg_id]
        frame = {"msgId": str(msg_id), "sessionId": row["session_id"], "seq": row["seq"], "from": row["sender"],
                 "clientMsgId": row["client_msg_id"], "body": self._copy(row["body"]), "ts": row["ts"]}
        if not with_session:
            del frame["sessionId"]
        return _st.entry_fields(frame, row.get("kind"), row.get("ref"), row.get("recalled", False),
                                row.get("edited", False))

    def undelivered_page(self, user_id, after, limit):
        def page():
            keys = sorted((self.messages[i]["session_id"].encode(), self.messages[i]["seq"], i)
                          for (u, i), status in self.sends.items() if u == user_id and status != "delivered")
            if after is not None:
                keys = [k for k in keys if (k[0], k[1]) > (after[0].encode(), after[1])]
            return [self._frame(i) for _, _, i in keys[:max(1, int(limit))]]
        return self._call("undelivered_page", page)

    def undelivered_first_pages(self, user_ids, limit):
        def pages():
            out = {}
            for user in sorted({str(u) for u in user_ids}):
                keys = sorted((self.messages[i]["session_id"].encode(), self.messages[i]["seq"], i)
                              for (u, i), status in self.sends.items() if u == user and status != "delivered")
                out[user] = [self._frame(i) for _, _, i in keys[:max(1, int(limit))]]
            return out
        return self._call("undelivered_first_pages", pages)

    def recent_messages(self, user_id, since_ms, per_session, limit):
        def recent():
            mine = {sid for sid, s in self.sessions.items() if user_id in s["members"]}
            keys = sorted((row["session_id"].encode(), row["seq"], i) for i, row in self.messages.items()
                          if row["session_id"] in mine and row["ts"] >= since_ms)
            kept, per = [], {}
            for k in reversed(keys):
                if per.get(k[0], 0) < per_session:
                    per[k[0]] = per.get(k[0], 0) + 1
                    kept.append(k)
            return [self._frame(i) for _, _, i in sorted(kept)[:max(1, int(limit))]]
        return self._call("recent_messages", recent)

    def stale_undelivered(self, after, age, horizon, limit):
        """MessageStore.stale_undelivered without time: every undelivered row is stale, in (msg_id, user) order."""
        def page():
            keys = sorted((i, u) for (u, i), status in self.sends.items() if status != "delivered")
            if after is not None:
                keys = [k for k in keys if (k[0], k[1]) > (int(after[2]), after[1])]
            return [{"userId": u, "cursor": ["", u, i], **self._frame(i)} for i, u in keys[:max(1, int(limit))]]
        return self._call("stale_undelivered", page)

    # -- sessions
    def _member_of(self, user_id, session_id):
        session = self.sessions.get(session_id)
        if session is None:
            raise _st.StoreError("no_session", "no such session")
        if user_id not in session["members"]:
            raise _st.StoreError("not_member", "not a member of this session")
        return session

    def history(self, user_id, session_id, before_seq=None, limit=None):
        def page():
            if session_id not in self.sessions:
                pair = _st.parse_p2p(session_id) if isinstance(session_id, str) else None
                if pair is not None:  # an implicit 1:1 session: empty for its two users only
                    if user_id is None or user_id in pair:
                        return []
                    raise _st.StoreError("not_member", "not a member of this session")
            self._member_of(user_id, session_id)
            n = _st.HISTORY_DEFAULT_LIMIT if limit is None else max(1, min(int(limit), _st.HISTORY_MAX_LIMIT))
            before = _st.BIGINT_MAX if before_seq is None else int(before_seq)
            rows = sorted((row["seq"], i) for i, row in self.messages.items()
                          if row["session_id"] == session_id and row["seq"] < before)
            out = []
            for _, i in rows[-n:]:
                entry = self._frame(i, with_session=False)
                row = self.messages[i]
                if (user_id is not None and session_id.startswith(_st.P2P_PREFIX) and row["sender"] == user_id
                        and row.get("kind", "message") == "message"):
                    entry["delivered"] = any(st == "delivered" for (u, m), st in self.sends.items() if m == i)
                out.append(entry)
            return out
        return self._call("history", page)

    def read(self, user_id, session_id, seq):
        def move():
            pair = _st.parse_p2p(session_id) if isinstance(session_id, str) else None
            if pair is not None and session_id not in self.sessions:
                if user_id not in pair:  # an implicit 1:1 session without messages
                    raise _st.StoreError("not_member", "not a member of this session")
                return 0, list(pair)
            session = self._member_of(user_id, session_id)
            member = session["members"][user_id]
            member["read_seq"] = max(member["read_seq"], min(int(seq), session["last_seq"]))
            return member["read_seq"], sorted(session["members"], key=str.encode)
        return self._call("read", move)

    def create_session(self, creator, members, session_id=None, kind="group"):
        def create():
            sid, k, everyone = _st.check_new_session(creator, members, session_id, kind, self.max_group_size)
            if sid in self.sessions:
                raise _st.StoreError("conflict", f"session {sid} exists")
            self.sessions[sid] = {"kind": k, "last_seq": 0, "members": {
                u: {"role": "owner" if u == creator else "member", "read_seq": 0} for u in everyone}}
            return sid, everyone
        return self._call("create_session", create)

    def add_remove_members(self, session_id, add=(), remove=()):
        def change():
            a, r = _st.check_member_change(add, remove)
            session = self.sessions.get(session_id)
            if session is None:
                raise _st.StoreError("no_session", "no such session")
            if session["kind"] == "p2p" and (a or r):
                raise _st.StoreError("bad_request", "the members of a p2p session do not change")
            members = dict(session["members"])
            for u in r:
                members.pop(u, None)
            for u in a:
                members.setdefault(u, {"role": "member", "read_seq": 0})
            if len(members) > self.max_group_size:
                raise _st.StoreError("too_large", f"a session has at most {self.max_group_size} members")
            session["members"] = members
            return sorted(members, key=str.encode)
        return self._call("add_remove_members", change)

    def session_members(self, session_ids):
        return self._call("session_members", lambda: {
            sid: sorted(self.sessions[sid]["members"], key=str.encode)
            for sid in set(session_ids) if sid in self.sessions})

    def get_session(self, session_id):
        def get():
            session = self.sessions.get(session_id)
            if session is None:
                raise _st.StoreError("no_session", "no such session")
            members = sorted(session["members"], key=str.encode)
            return {"sessionId": session_id, "kind": session["kind"], "members": members,
                    "owners": [u for u in members if session["members"][u]["role"] == "owner"],
                    "lastSeq": session["last_seq"]}
        return self._call("get_session", get)

    def user_sessions(self, user_id):
        def listing():
            out = []
            for sid in sorted(self.sessions, key=str.encode):
                session = self.sessions[sid]
                if user_id not in session["members"]:
                    continue
                read_seq = session["members"][user_id]["read_seq"]
                unread = sum(1 for row in self.messages.values()
                             if row["session_id"] == sid and row["seq"] > read_seq and row["sender"] != user_id
                             and row.get("kind", "message") == "message")
                out.append({"sessionId": sid, "kind": session["kind"], "lastSeq": session["last_seq"],
                            "unread": unread})
            return out
        return self._call("user_sessions", listing)

    # -- events in the session's order (PROTOCOL.md 1.1)
    def store_event(self, event):
        return self._call("store_event", self._event, event)

    def _event(self, ev):
        if not _st.valid_user_id(ev.sender) or not _st.valid_client_msg_id(ev.client_msg_id):
            raise _st.StoreError("bad_request", "bad sender or key")
        if _st.storable_json(ev.body) is None:
            raise _st.StoreError("bad_request", "body is not storable JSON")
        ts = ev.ts_ms if ev.ts_ms is not None else self.now_ms
        key = (ev.sender, ev.client_msg_id)
        if key in self.by_key:
            i = self.by_key[key]
            row = self.messages[i]
            if row.get("kind", "message") != ev.kind or (
                    ev.ref is not None and str(row.get("ref")) != str(_st.parse_msg_id(ev.ref))):
                raise _st.StoreError("not_allowed", "this key names another entry of this sender")
            pending = sorted((u for (u, m), st in self.sends.items() if m == i and st != "delivered"), key=str.encode)
            stored = _st.Stored(str(i), row["session_id"], row["seq"], row["ts"], ev.sender, ev.client_msg_id,
                                self._copy(row["body"]), pending, duplicate=True, kind=row["kind"],
                                ref=None if row.get("ref") is None else str(row["ref"]))
            return stored, sorted(self.sessions[row["session_id"]]["members"], key=str.encode)
        target = None
        if ev.kind in ("recall", "edit"):
            target = _st.parse_msg_id(ev.ref)
            row = self.messages.get(target)
            if row is None or (ev.session_id is not None and row["session_id"] != ev.session_id):
                raise _st.StoreError("no_message", "no such message")
            session_id = row["session_id"]
            session = self.sessions[session_id]
            if not ev.trusted and ev.sender not in session["members"]:
                raise _st.StoreError("no_message", "no such message")
            what = "recalled" if ev.kind == "recall" else "edited"
            if row.get("kind", "message") != "message":
                raise _st.StoreError("not_allowed", f"an event cannot be {what}")
            if not ev.trusted and row["sender"] != ev.sender:
                raise _st.StoreError("not_allowed", f"only its sender may have a message {what}")
            if row.get("recalled"):
                raise _st.StoreError("not_allowed", "the message is recalled")
            if ev.window is not None and ts - row["ts"] > ev.window * 1000:
                raise _st.StoreError("not_allowed", f"a message may be {what} within {ev.window:g} s of its ts")
            members = sorted(session["members"], key=str.encode)
            removed = []
            body = None if ev.kind == "recall" else ev.body
        else:
            session_id = ev.session_id
            session = self.sessions.get(session_id)
            if session is None:
                raise _st.StoreError("no_session", "no such session")
            add, remove = _st.check_member_change(ev.add, ev.remove)
            if session["kind"] == "p2p" and (add or remove):
                raise _st.StoreError("bad_request", "the members of a p2p session do not change")
            added = [u for u in add if u not in session["members"]]
            removed = [u for u in remove if u in session["members"]]
            after = (set(session["members"]) | set(added)) - set(removed)
            if len(after) > self.max_group_size:
                raise _st.StoreError("too_large", f"a session has at most {self.max_group_size} members")
            if not added and not removed:
                return None, sorted(session["members"], key=str.encode)
            for u in removed:
                session["members"].pop(u)
            for u in added:
                session["members"][u] = {"role": "member", "read_seq": 0}
            members = sorted(session["members"], key=str.encode)
            body = {"added": added, "removed": removed}
        recipients = sorted({u for u in members + removed if u != ev.sender}, key=str.encode)
        session["last_seq"] += 1
        msg_id, self._next_id = self._next_id, self._next_id + 1
        self.messages[msg_id] = {"session_id": session_id, "seq": session["last_seq"], "sender": ev.sender,
                                 "client_msg_id": ev.client_msg_id, "body": self._copy(body), "ts": ts,
                                 "kind": ev.kind, "ref": target}
        self.by_key[key] = msg_id
        for u in recipients:
            self.sends[(u, msg_id)] = "pending"
        if ev.kind == "recall":
            self.messages[target].update(body=None, recalled=True)
        elif ev.kind == "edit":
            self.messages[target].update(body=self._copy(ev.body), edited=True)
        return (_st.Stored(str(msg_id), session_id, session["last_seq"], ts, ev.sender, ev.client_msg_id, body,
                           recipients, kind=ev.kind, ref=None if target is None else str(target)), members)

    def create_session_with_event(self, creator, members, session_id=None, client_msg_id=None, ts_ms=None):
        def create():
            sid, k, everyone = _st.check_new_session(creator, members, session_id, "group", self.max_group_size)
            if sid in self.sessions:
                raise _st.StoreError("conflict", f"session {sid} exists")
            self.sessions[sid] = {"kind": k, "last_seq": 0, "members": {
                u: {"role": "owner" if u == creator else "member", "read_seq": 0} for u in everyone}}
            if k == "p2p":
                return sid, everyone, None
            import uuid
            cmid = client_msg_id or f"members:{uuid.uuid4().hex}"
            ts = ts_ms if ts_ms is not None else self.now_ms
            body = {"added": everyone, "removed": []}
            self.sessions[sid]["last_seq"] = 1
            msg_id, self._next_id = self._next_id, self._next_id + 1
            self.messages[msg_id] = {"session_id": sid, "seq": 1, "sender": creator, "client_msg_id": cmid,
                                     "body": self._copy(body), "ts": ts, "kind": "members", "ref": None}
            self.by_key[(creator, cmid)] = msg_id
            recipients = [u for u in everyone if u != creator]
            for u in recipients:
                self.sends[(u, msg_id)] = "pending"
            return sid, everyone, _st.Stored(str(msg_id), sid, 1, ts, creator, cmid, body, recipients,
                                             kind="members")
        return self._call("create_session_with_event", create)

    def mark_delivered_receipts(self, acks):
        def mark():
            users, ids = _st.sorted_pairs((user, m) for user, msg_ids in acks for m in msg_ids)
            changed, receipts = 0, {}
            for key in zip(users, ids):
                current = self.sends.get(key)
                if current is None or current == "delivered":
                    continue
                self.sends[key] = "delivered"
                changed += 1
                row = self.messages[key[1]]
                if row["session_id"].startswith(_st.P2P_PREFIX):
                    receipts.setdefault((row["session_id"], key[0]), []).append((row["seq"], str(key[1])))
            return changed, [{"sessionId": sid, "userId": u, "msgIds": [m for _, m in sorted(v)]}
                             for (sid, u), v in sorted(receipts.items())]
        return self._call("mark_delivered_receipts", mark)

    def read_cursors(self, session_id):
        def cursors():
            session = self.sessions.get(session_id)
            if session is None:
                pair = _st.parse_p2p(session_id) if isinstance(session_id, str) else None
                if pair is None:
                    raise _st.StoreError("no_session", "no such session")
                return [{"userId": u, "seq": 0} for u in pair]
            return [{"userId": u, "seq": session["members"][u]["read_seq"]}
                    for u in sorted(session["members"], key=str.encode)]
        return self._call("read_cursors", cursors)

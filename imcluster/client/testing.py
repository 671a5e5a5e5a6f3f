"""Test doubles for code built on :mod:`imcluster.client` (part of the package, like treq's).

:class:`FakeServer` is a whole imcluster in one process: the real gateway
adapters and protocol engine (:mod:`imcluster.gateway`) in front of an
in-memory processor that follows PROTOCOL.md (sessions, ``seq``, de-duplication
by ``clientMsgId``, delivery to every connection of every member, undelivered
messages synced after ``auth``, history, read receipts). Tokens are real JWTs
(:meth:`FakeServer.token`). For fast tests of clients over real sockets::

    server = FakeServer()
    port = await server.listen("ws")            # or "tcp"; TLS with an ssl: endpoint
    client = Client(f"ws://127.0.0.1:{port}/ws", server.token("alice"))
    ...
    await server.stop()

Knobs for failure tests: ``hold_replies`` (store messages but send no
``message_reply``, as a gateway that dies before answering), ``unavailable``
(answer every ``message`` and ``history`` with ``unavailable``, storing
nothing), and :meth:`FakeServer.drop_all` (abort every connection).
"""

from __future__ import annotations

import time
from typing import Any

from twisted.internet import defer

from imcluster import protocol as p
from imcluster.auth import JWTAuthenticator, mint_token
from imcluster.testing import FakeHub, LoopbackGateway, gateway_config

SECRET = "fake-server-secret-0123456789abcdef"


class _Session:
    def __init__(self, session_id: str, members: set[str]) -> None:
        self.session_id = session_id
        self.members = members
        self.messages: list[dict] = []
        self.cursors: dict[str, int] = {}


class MemoryProcessor(FakeHub):
    """A gateway hub that processes frames itself, in memory (see the module docstring)."""

    def __init__(self, clock: Any, secret: str = SECRET, **config: Any) -> None:
        config.setdefault("ws_ping_interval", 0)
        super().__init__(config=gateway_config(**config), clock=clock,
                         authenticator=JWTAuthenticator(secret=secret))
        self.sessions: dict[str, _Session] = {}
        self.by_client_id: dict[tuple[str, str], dict] = {}
        self.undelivered: dict[str, dict[str, dict]] = {}  # user -> msgId -> message_send
        self.conns: dict[str, list] = {}  # user -> live authenticated connections
        self.next_msg_id = 1
        self.hold_replies = False
        self.unavailable = False
        self.frames: list[tuple[str, dict]] = []  # (user, frame) every forwarded frame

    # --- hub interface

    def authenticated(self, conn: Any, identity: Any, refresh: bool) -> defer.Deferred:
        if not refresh:
            self.conns.setdefault(identity.user_id, []).append(conn)
        return super().authenticated(conn, identity, refresh)

    def request_sync(self, conn: Any) -> defer.Deferred:
        d = super().request_sync(conn)
        self.clock.callLater(0, self._sync, conn)
        return d

    def forward(self, conn: Any, frame: dict) -> defer.Deferred:
        d = super().forward(conn, frame)
        self.frames.append((conn.user_id, frame))
        # processors answer later, never within the gateway's call
        self.clock.callLater(0, self._process, conn, frame)
        return d

    def connection_lost(self, conn: Any) -> None:
        super().connection_lost(conn)
        if conn.user_id is not None and conn in self.conns.get(conn.user_id, []):
            self.conns[conn.user_id].remove(conn)

    # --- the processor

    def session(self, session_id: str) -> _Session | None:
        s = self.sessions.get(session_id)
        if s is None and session_id.startswith("p2p:"):
            parts = session_id.split(":")
            if len(parts) == 3 and parts[1] < parts[2] and all(p.is_user_id(u) for u in parts[1:]):
                s = self.sessions[session_id] = _Session(session_id, {parts[1], parts[2]})
        return s

    def _sync(self, conn: Any) -> None:
        if not conn.is_open:
            return
        pending = sorted(self.undelivered.get(conn.user_id, {}).values(),
                         key=lambda m: (m["sessionId"].encode("utf-8"), m["seq"]))
        for frame in pending:
            conn.send_frame(frame)
        conn.send_frame({"type": "sync_done", "count": len(pending)})

    def _process(self, conn: Any, frame: dict) -> None:
        user = conn.user_id
        kind = frame["type"]
        if kind == p.MESSAGE:
            self._message(conn, user, frame)
        elif kind == p.MESSAGE_SEND_REPLY:
            pending = self.undelivered.get(user, {})
            for msg_id in frame["msgIds"]:
                pending.pop(msg_id, None)
        elif kind == p.HISTORY:
            if self.unavailable:
                conn.send_frame(p.reply_to(frame, p.UNAVAILABLE, "try again"))
                return
            s = self.session(frame["sessionId"])
            if s is None or user not in s.members:
                conn.send_frame(p.reply_to(frame, p.NO_SESSION if s is None else p.NOT_MEMBER, "no"))
                return
            before = frame.get("beforeSeq")
            limit = min(frame.get("limit") or p.HISTORY_DEFAULT_LIMIT, p.HISTORY_MAX_LIMIT)
            msgs = [m for m in s.messages if before is None or m["seq"] < before][-limit:]
            reply = {"type": "history_reply", "sessionId": s.session_id,
                     "messages": [{k: m[k] for k in ("msgId", "seq", "from", "clientMsgId", "body", "ts")}
                                  for m in msgs]}
            if "id" in frame:
                reply["id"] = frame["id"]
            conn.send_frame(reply)
        elif kind == p.READ:
            s = self.session(frame["sessionId"])
            if s is None or user not in s.members:
                conn.send_frame(p.reply_to(frame, p.NO_SESSION if s is None else p.NOT_MEMBER, "no"))
                return
            cursor = max(s.cursors.get(user, 0), min(frame["seq"], len(s.messages)))
            s.cursors[user] = cursor
            receipt = {"type": "read_receipt", "sessionId": s.session_id, "userId": user, "seq": cursor}
            for member in s.members:
                for c in self.conns.get(member, []):
                    if c is not conn:
                        c.send_frame(receipt)
        elif kind == p.SESSION_CREATE:
            reply: dict[str, Any] = {"type": "session_reply"}
            if "id" in frame:
                reply["id"] = frame["id"]
            sid = frame.get("sessionId") or f"g{len(self.sessions) + 1}"
            if sid in self.sessions:
                reply.update(ok=False, error={"code": p.CONFLICT, "message": "exists"})
            else:
                s = self.sessions[sid] = _Session(sid, set(frame["members"]) | {user})
                reply.update(ok=True, sessionId=sid, members=sorted(s.members))
            conn.send_frame(reply)

    def _message(self, conn: Any, user: str, frame: dict) -> None:
        cmid = frame["clientMsgId"]
        if self.unavailable:
            conn.send_frame(p.message_reply_error(cmid, p.UNAVAILABLE, "try again"))
            return
        stored = self.by_client_id.get((user, cmid))
        if stored is None:
            s = self.session(frame["sessionId"])
            if s is None or user not in s.members:
                code = p.NO_SESSION if s is None else p.NOT_MEMBER
                conn.send_frame(p.message_reply_error(cmid, code, "refused"))
                return
            stored = {"type": "message_send", "msgId": str(self.next_msg_id), "sessionId": s.session_id,
                      "seq": len(s.messages) + 1, "from": user, "clientMsgId": cmid,
                      "body": frame["body"], "ts": int(time.time() * 1000)}
            self.next_msg_id += 1
            s.messages.append(stored)
            self.by_client_id[(user, cmid)] = stored
            recipients = s.members - {user}
            for member in recipients:
                self.undelivered.setdefault(member, {})[stored["msgId"]] = stored
            targets = s.members
        else:
            # a duplicate: routed again only to members that have not acknowledged it
            targets = {u for u in self.sessions[stored["sessionId"]].members
                       if stored["msgId"] in self.undelivered.get(u, {})}
        if not self.hold_replies:
            conn.send_frame({"type": "message_reply", "ok": True, "clientMsgId": cmid,
                             "msgId": stored["msgId"], "sessionId": stored["sessionId"],
                             "seq": stored["seq"], "ts": stored["ts"]})
        for member in targets:
            for c in self.conns.get(member, []):
                if c is not conn:
                    c.send_frame(stored)


class FakeServer(LoopbackGateway):
    """A :class:`MemoryProcessor` behind real listening WebSocket / raw TCP adapters."""

    def __init__(self, reactor: Any = None, secret: str = SECRET, **config: Any) -> None:
        super().__init__(reactor)
        self.secret = secret
        self.hub = MemoryProcessor(self.reactor, secret, **config)

    def token(self, user: str, ttl: float = 3600.0) -> str:
        """A JWT for ``user`` that this server accepts."""
        return mint_token(self.secret, user, ttl)

    def drop_all(self) -> None:
        """Abort every client connection (a crashed gateway, as the clients see it)."""
        for conn in self.open_connections():
            conn._adapter.transport.abortConnection()

    def going_away(self) -> None:
        """Tell every client that the gateway stops (WebSocket 1001 / TCP going_away)."""
        for conn in self.open_connections():
            conn.going_away()

"""A small, steady chat load on real gateways, every client acknowledging, fed to :class:`Ledger`\\ s.

Users ``u0..u<n-1>`` alternate between the gateways (every third one on raw
TCP, the others on WebSocket); ``u0`` has a second connection on the other
gateway (a user's other device receives its own messages), unless
``second_device=False``. Sessions: group
``g1`` (u0-u3), group ``g2`` (u2-u5) when there are six users or more, and
one 1:1 session per pair (u0:u1, u2:u3, ...). Every user sends, in turn, to
each of its sessions, ``rate`` messages a second; every ``message_send`` is
acknowledged (batched, 20 ms), duplicates too, and a message answered
``unavailable``, or not at all within 5 s, is sent again with the same
``clientMsgId`` until it has an answer, as the clients of this project do::

    load = Load(cluster.token, [gw0, gw1], users=6, rate=3.0)
    await load.connect()
    ledger = load.new_ledger()          # counts what is sent from now on
    load.start()
    ...                                  # a fault
    load.stop()
    await load.settle(ledger, healed_at)
    print(ledger.report(healed_at).line())
    await load.close()
"""

from __future__ import annotations

import time
from typing import Any, Callable

from twisted.internet import reactor, task

from tests.support.clients import connect_tcp, connect_ws
from tests.support.ledger import DEADLINE, Ledger

#: seconds an acknowledgement waits for others to share its frame
ACK_DELAY = 0.02
#: a message without a reply is sent again (same clientMsgId) after this many seconds,
#: and one answered ``unavailable`` after a short backoff, as the clients of this project do
RESEND_AFTER = 5.0
RETRY_CODES = ("unavailable", "rate_limited")


def now() -> float:
    return time.monotonic()


async def _sleep(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


class LoadConn:
    """One authenticated client connection of the load."""

    def __init__(self, load: "Load", user: str, label: str, client: Any) -> None:
        self.load = load
        self.user = user
        self.label = label
        self.client = client
        self.sync_dones = 0
        self.sent = 0
        #: clientMsgId -> [session, body, ledger, next resend time, tries] until answered for good
        self.pending: dict[str, list] = {}
        self._acks: list[str] = []
        self._ack_call: Any = None
        frame_in = client._frame

        def on_frame(frame: Any) -> None:
            frame_in(frame)
            self._on_frame(frame)

        client._frame = on_frame

    def _on_frame(self, frame: Any) -> None:
        if not isinstance(frame, dict):
            return
        kind = frame.get("type")
        t = now()
        if kind == "message_send":
            for ledger in self.load.ledgers:
                ledger.received(self.label, self.user, frame, t)
            self._acks.append(frame["msgId"])
            if self._ack_call is None:
                self._ack_call = reactor.callLater(ACK_DELAY, self._send_acks)
        elif kind == "message_reply":
            cmid = frame.get("clientMsgId")
            entry = self.pending.get(cmid)
            if entry is None:
                return  # answered before (a resend's repeated reply)
            code = (frame.get("error") or {}).get("code") if frame.get("ok") is not True else None
            if code in RETRY_CODES:
                entry[4] += 1
                entry[3] = t + min(2.0, 0.25 * 2 ** entry[4])
                if entry[2] is not None:
                    entry[2].retried(code)
                return
            del self.pending[cmid]
            if entry[2] is not None:
                entry[2].replied(self.label, self.user, frame, t)
        elif kind == "sync_done":
            self.sync_dones += 1

    def _send_acks(self) -> None:
        self._ack_call = None
        acks, self._acks = self._acks, []
        if not self.client.connected:
            return
        for i in range(0, len(acks), 1000):
            self.client.send({"type": "message_send_reply", "msgIds": acks[i:i + 1000]})

    def send(self, session: str, ledger: Ledger | None) -> None:
        self.sent += 1
        cmid = f"{self.label}-{self.sent}"
        body = {"n": self.sent, "by": self.label}
        t = now()
        if ledger is not None:
            ledger.asking(self.label, cmid, t)
        self.pending[cmid] = [session, body, ledger, t + RESEND_AFTER, 0]
        self.client.send({"type": "message", "clientMsgId": cmid, "sessionId": session, "body": body})

    def resend_due(self, t: float) -> None:
        """Send again (same clientMsgId) what has no final answer and is due."""
        if not self.client.connected:
            return
        for cmid, entry in self.pending.items():
            if entry[3] <= t:
                entry[3] = t + RESEND_AFTER
                self.client.send({"type": "message", "clientMsgId": cmid, "sessionId": entry[0],
                                  "body": entry[1]})

    def close(self) -> None:
        if self._ack_call is not None and self._ack_call.active():
            self._ack_call.cancel()
        if self.client.connected:
            self.client.close()


class Load:
    """The load of the module docstring on ``gateways`` (DaemonProcess-like: ``ws_url``, ``tcp_port``)."""

    def __init__(self, token: Callable[[str], str], gateways: list[Any], users: int = 6, rate: float = 3.0,
                 prefix: str = "u", second_device: bool = True) -> None:
        self.token = token
        self.gateways = gateways
        self.users = [f"{prefix}{i}" for i in range(users)]
        self.rate = rate
        self.second_device = second_device
        self.conns: list[LoadConn] = []
        self.primary: dict[str, LoadConn] = {}
        self.sessions: dict[str, list[str]] = {}  # session -> members
        self.of_user: dict[str, list[str]] = {}  # user -> its sessions
        self.ledgers: list[Ledger] = []
        self.current: Ledger | None = None
        self._loop: task.LoopingCall | None = None
        self._resender = task.LoopingCall(self._resend)
        self._turn = 0

    async def _connect_one(self, user: str, gw_index: int, tcp: bool) -> LoadConn:
        gw = self.gateways[gw_index % len(self.gateways)]
        client = await (connect_tcp(gw.tcp_port, getattr(gw, "host", "127.0.0.1")) if tcp else connect_ws(gw.ws_url))
        label = f"{user}@gw{gw_index % len(self.gateways)}/{'tcp' if tcp else 'ws'}"
        conn = LoadConn(self, user, label, client)
        reply = await client.auth(self.token(user))
        assert reply["ok"], reply
        await client.receive_type("sync_done", timeout=30.0)
        self.conns.append(conn)
        return conn

    async def connect(self) -> None:
        """Connect and authenticate everybody, then create the sessions."""
        for i, user in enumerate(self.users):
            self.primary[user] = await self._connect_one(user, i, tcp=i % 3 == 0)
        if len(self.gateways) > 1 and self.second_device:
            await self._connect_one(self.users[0], 1, tcp=False)
        groups = {"g1": self.users[0:4]}
        if len(self.users) >= 6:
            groups["g2"] = self.users[2:6]
        for name, members in groups.items():
            creator = self.primary[members[0]].client
            creator.send({"type": "session_create", "id": f"c-{name}", "sessionId": name,
                          "members": members[1:]})
            reply = await creator.receive_type("session_reply", timeout=30.0)
            assert reply["ok"], reply
            self.sessions[name] = sorted(reply["members"])
        for a, b in zip(self.users[0::2], self.users[1::2]):
            x, y = sorted([a, b])
            self.sessions[f"p2p:{x}:{y}"] = [x, y]
        for user in self.users:
            self.of_user[user] = sorted(s for s, m in self.sessions.items() if user in m)

    def new_ledger(self) -> Ledger:
        """A ledger for what is sent from now on (deliveries are fed to every ledger still open)."""
        ledger = Ledger()
        for session, members in self.sessions.items():
            ledger.member(session, members)
        for conn in self.conns:
            ledger.connection(conn.label, conn.user)
        self.ledgers.append(ledger)
        self.current = ledger
        return ledger

    def _tick(self) -> None:
        senders = [u for u in self.users if self.of_user.get(u)]
        if not senders:
            return
        user = senders[self._turn % len(senders)]
        sessions = self.of_user[user]
        session = sessions[(self._turn // len(senders)) % len(sessions)]
        self._turn += 1
        conn = self.primary[user]
        if conn.client.connected:
            conn.send(session, self.current)

    def _resend(self) -> None:
        t = now()
        for conn in self.conns:
            conn.resend_due(t)

    def start(self) -> None:
        """Send ``rate`` messages a second per user, in turn (and keep resending what is unanswered)."""
        if not self._resender.running:
            self._resender.start(0.25, now=False)
        if self._loop is None:
            self._loop = task.LoopingCall(self._tick)
            self._loop.start(1.0 / (self.rate * len(self.users)), now=False)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    async def settle(self, ledger: Ledger, healed_at: float | None = None, slack: float = 2.0) -> None:
        """Wait until every reply and every expected delivery is in, or the rule's deadline has passed.

        Deadline: ``DEADLINE`` s (plus ``slack``) after the later of the last
        reply and ``healed_at``; unanswered sends get the same.
        """
        while True:
            start = max(ledger.last_reply_at(), healed_at or 0.0, max(ledger.asked.values(), default=0.0))
            if now() > start + DEADLINE + slack:
                return
            if not ledger.missing() and len(ledger.answered) == len(ledger.asked):
                return
            await _sleep(0.2)

    def close(self) -> None:
        self.stop()
        if self._resender.running:
            self._resender.stop()
        for conn in self.conns:
            conn.close()
        self.ledgers.clear()

    def reconnected(self) -> int:
        """Connections that were closed (the rule is "without reconnecting": the load never reconnects)."""
        return sum(1 for c in self.conns if not c.client.connected)

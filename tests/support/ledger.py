"""Accounting of deliveries under faults: what was acknowledged to senders, what each connection got.

A :class:`Ledger` is fed by load clients (tests/support/load.py) and knows no
sockets, so tests and ``bench/faults.py`` read the same figures::

    ledger.member("room", ["alice", "bob"])        # who should receive a session's messages
    ledger.replied("alice@gw0", "alice", frame, t)  # an ok (or failed) message_reply
    ledger.received("bob@gw1", "bob", frame, t)     # every message_send a connection got
    report = ledger.report(healed_at=t_heal)

PROTOCOL.md's promise is the yardstick: every message that got an ok
``message_reply`` reaches every connection of every member (but the sending
connection) within 10 s of its reply, or of the dependency answering again
when it was down. The report counts, over (message, connection) pairs:

``lost``
    pairs never received;
``duplicated``
    extra copies received (allowed: clients de-duplicate by ``msgId``;
    after that each message is there once per connection by construction);
``mismatched``
    copies of one ``msgId`` whose session, seq, sender or body differ (never allowed);
``seq_gaps``
    per connection and session, seqs it should have below the highest it
    got but did not get; ``server_seq_gaps``: holes in a session's seqs
    (between the lowest and the highest seen) as every reply and delivery
    together show them;
``worst_delay_s``
    the largest ``arrival - max(reply, healed_at)``: within 10 s is the rule;
``last_stuck_after_heal_s``
    for pairs that arrived more than :data:`STUCK` seconds after their
    clock started, the last arrival minus ``healed_at`` (0 when none were stuck);
``healed``
    pairs acknowledged before ``healed_at`` that arrived after it: what
    healing delivered (0 would mean a fault test exercised nothing);
``after_heal``, ``first_ok_after_heal_s``
    messages acknowledged after ``healed_at``, and how long after it the
    first one was (the cluster taking messages again).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable

#: a delivery later than this after its clock started was stuck behind the fault
STUCK = 1.0
#: PROTOCOL.md: within 10 s
DEADLINE = 10.0


@dataclass
class Sent:
    msg_id: str
    session: str
    seq: int
    sender: str
    conn: str
    replied_at: float
    body: Any = None


@dataclass
class ConnRecord:
    """One client connection: what it got, first arrival per msgId, copies."""

    label: str
    user: str
    first: dict[str, float] = field(default_factory=dict)
    copies: Counter = field(default_factory=Counter)
    content: dict[str, tuple] = field(default_factory=dict)
    mismatched: int = 0


@dataclass
class Report:
    messages: int
    pairs: int
    delivered: int
    lost: int
    duplicated: int
    mismatched: int
    seq_gaps: int
    server_seq_gaps: int
    worst_delay_s: float | None
    late: int
    last_stuck_after_heal_s: float | None
    stuck: int
    unanswered: int
    failed: dict[str, int]
    retries: dict[str, int]
    lost_examples: list[tuple[str, str]]
    #: messages acknowledged after healed_at, and the first such reply's delay (s)
    after_heal: int = 0
    first_ok_after_heal_s: float | None = None
    #: pairs acknowledged before healed_at that arrived after it (what the healing delivered)
    healed: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    def line(self) -> str:
        def f(v: float | None) -> str:
            return "-" if v is None else f"{v:.2f}"
        return (f"messages {self.messages} pairs {self.pairs} lost {self.lost} dup {self.duplicated} "
                f"healed {self.healed} mismatched {self.mismatched} seq-gaps {self.seq_gaps}/{self.server_seq_gaps} "
                f"worst-delay {f(self.worst_delay_s)}s late {self.late} stuck {self.stuck} "
                f"last-stuck-after-heal {f(self.last_stuck_after_heal_s)}s "
                f"unanswered {self.unanswered} failed {dict(self.failed)} retried {dict(self.retries)} "
                f"acked-after-heal {self.after_heal} (first after {f(self.first_ok_after_heal_s)}s)")


class Ledger:
    """Acknowledged messages and per-connection receipts (see the module docstring)."""

    def __init__(self) -> None:
        self.members: dict[str, set[str]] = defaultdict(set)
        self.conns: dict[str, ConnRecord] = {}
        self.sent: dict[str, Sent] = {}
        self.failed: Counter = Counter()
        self.retries: Counter = Counter()
        self.asked: dict[tuple[str, str], float] = {}  # (conn, clientMsgId) -> sent at
        self.answered: set[tuple[str, str]] = set()

    # --- feeding

    def member(self, session: str, users: Iterable[str]) -> None:
        self.members[session].update(users)

    def connection(self, label: str, user: str) -> ConnRecord:
        rec = self.conns.get(label)
        if rec is None:
            rec = self.conns[label] = ConnRecord(label, user)
        return rec

    def asking(self, conn: str, client_msg_id: str, at: float) -> None:
        """A ``message`` frame went out (its reply is expected)."""
        self.asked[(conn, client_msg_id)] = at

    def retried(self, code: str) -> None:
        """An answer the client retries (``unavailable``): not final."""
        self.retries[code] += 1

    def replied(self, conn: str, user: str, frame: dict, at: float, body: Any = None) -> None:
        """A ``message_reply`` arrived on ``conn`` (sent by ``user``)."""
        key = (conn, frame.get("clientMsgId"))
        if key not in self.asked or key in self.answered:
            return  # not ours (another ledger's), or a repeat
        self.answered.add(key)
        if frame.get("ok") is not True:
            code = (frame.get("error") or {}).get("code", "?")
            self.failed[code] += 1
            return
        self.sent[frame["msgId"]] = Sent(frame["msgId"], frame["sessionId"], frame["seq"], user, conn, at, body)

    def received(self, conn: str, user: str, frame: dict, at: float) -> None:
        """A ``message_send`` arrived on ``conn``."""
        rec = self.connection(conn, user)
        msg_id = frame.get("msgId")
        rec.copies[msg_id] += 1
        content = (frame.get("sessionId"), frame.get("seq"), frame.get("from"), repr(frame.get("body")))
        if msg_id in rec.first:
            if rec.content[msg_id] != content:
                rec.mismatched += 1
            return
        rec.first[msg_id] = at
        rec.content[msg_id] = content

    # --- reading

    def expected(self, rec: ConnRecord) -> list[Sent]:
        """The acknowledged messages ``rec`` must get: its user's sessions, not sent by ``rec`` itself."""
        return [s for s in self.sent.values()
                if rec.user in self.members.get(s.session, ()) and s.conn != rec.label]

    def missing(self) -> int:
        """Pairs not received yet."""
        return sum(1 for rec in self.conns.values() for s in self.expected(rec) if s.msg_id not in rec.first)

    def last_reply_at(self) -> float:
        return max((s.replied_at for s in self.sent.values()), default=0.0)

    def report(self, healed_at: float | None = None) -> Report:
        """The figures of the module docstring; ``healed_at``: when the dependency answered again."""
        start = healed_at if healed_at is not None else float("-inf")
        pairs = delivered = lost = dup = mismatched = gaps = late = stuck = healed = 0
        worst: float | None = None
        last_stuck: float | None = None
        lost_examples: list[tuple[str, str]] = []
        session_seqs: dict[str, set[int]] = defaultdict(set)
        for s in self.sent.values():
            session_seqs[s.session].add(s.seq)
        for rec in self.conns.values():
            mismatched += rec.mismatched
            dup += sum(n - 1 for m, n in rec.copies.items() if n > 1)
            for m in rec.first:
                sess, seq = rec.content[m][0], rec.content[m][1]
                if isinstance(seq, int):
                    session_seqs[sess].add(seq)
            per_session: dict[str, set[int]] = defaultdict(set)
            for s in self.expected(rec):
                pairs += 1
                arrival = rec.first.get(s.msg_id)
                if arrival is None:
                    lost += 1
                    if len(lost_examples) < 5:
                        lost_examples.append((rec.label, s.msg_id))
                    continue
                delivered += 1
                per_session[s.session].add(s.seq)
                clock = max(s.replied_at, start)
                if healed_at is not None and s.replied_at < healed_at <= arrival:
                    healed += 1
                delay = arrival - clock
                worst = delay if worst is None else max(worst, delay)
                if delay > DEADLINE:
                    late += 1
                if delay > STUCK:
                    stuck += 1
                    if healed_at is not None:
                        after = arrival - healed_at
                        last_stuck = after if last_stuck is None else max(last_stuck, after)
            # seqs this connection should have below the highest it got, and did not get
            mine = {s.seq for s in self.sent.values() if s.conn == rec.label}
            for sess, seqs in per_session.items():
                top = max(seqs)
                expected_seqs = {s.seq for s in self.expected(rec) if s.session == sess and s.seq <= top}
                gaps += len(expected_seqs - seqs - mine)
        server_gaps = sum(max(seqs) - min(seqs) + 1 - len(seqs) for seqs in session_seqs.values() if seqs)
        unanswered = len(set(self.asked) - self.answered)
        after = sorted(s.replied_at - start for s in self.sent.values() if s.replied_at >= start)
        return Report(len(self.sent), pairs, delivered, lost, dup, mismatched, gaps, server_gaps,
                      worst, late, last_stuck if stuck else 0.0, stuck, unanswered, dict(self.failed),
                      dict(self.retries), lost_examples, len(after), after[0] if after and healed_at is not None else None,
                      healed)

"""The message store's contract: value types, errors and rules shared by every implementation.

The interface itself is :class:`imcluster.interfaces.IMessageStore` (and
:class:`~imcluster.interfaces.IWindowTransaction`); the PostgreSQL
implementation is :mod:`imcluster.store.postgres`, the in-memory one
:class:`imcluster.testing.FakeStore`. The processors and the HTTP API import
this module (``imcluster.store``), never an implementation: it has no I/O
and imports no driver.

What a caller sees:

- a message to store is an :class:`Incoming`; each is answered with a
  :class:`Stored` (new, or ``duplicate`` of the message with the same
  ``(sender, clientMsgId)``) or a :class:`Rejected` (a PROTOCOL.md
  ``message_reply`` code, its batch-mates are stored);
- a deterministic refusal is a :class:`StoreError` with a ``code`` of
  :data:`ERROR_CODES`; the caller answers it to the client;
- PostgreSQL down or slow is a :class:`StoreUnavailable` (an
  :class:`imcluster.interfaces.Unavailable`): the caller retries later. An
  implementation never lets its driver's errors out.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable

from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface import implementer

from imcluster.interfaces import IWindowTransaction, Unavailable
from imcluster.protocol import is_user_id as valid_user_id

#: a group's id: the user-id charset plus ':', 1-128 characters (PROTOCOL.md, HTTP-API.md);
#: a 1:1 session's id is ``p2p:<a>:<b>`` of two user ids instead (:func:`parse_p2p`)
SESSION_ID_RE = re.compile(r"[A-Za-z0-9_.@:-]{1,128}")
#: clientMsgId: 1-64 characters (PROTOCOL.md "Sending a message")
CLIENT_MSG_ID_MAX = 64
#: what PostgreSQL text cannot hold (NUL) or UTF-8 cannot encode (lone surrogates)
_BAD_CHARS = re.compile("[\x00\ud800-\udfff]")

P2P_PREFIX = "p2p:"
#: the longest 1:1 session id: ``p2p:`` and two 128-character user ids (261)
P2P_SESSION_ID_MAX = len(P2P_PREFIX) + 2 * 128 + 1

#: history page size when the client gives none, and the cap (PROTOCOL.md "Sync")
HISTORY_DEFAULT_LIMIT = 50
HISTORY_MAX_LIMIT = 200

BIGINT_MAX = 2**63 - 1
_DIGITS_RE = re.compile(r"[0-9]{1,19}")

# --- errors ------------------------------------------------------------------

#: :class:`StoreError` codes; all but ``bad_request`` are PROTOCOL.md codes too
NO_SESSION = "no_session"
NOT_MEMBER = "not_member"
CONFLICT = "conflict"
TOO_LARGE = "too_large"
BAD_REQUEST = "bad_request"
#: a recall or an edit refused: not the sender, past its window, an event (PROTOCOL.md 1.1)
NOT_ALLOWED = "not_allowed"
#: a recall or an edit of a msgId unknown, or of a session the user is not in
NO_MESSAGE = "no_message"
ERROR_CODES = frozenset({NO_SESSION, NOT_MEMBER, CONFLICT, TOO_LARGE, BAD_REQUEST, NOT_ALLOWED, NO_MESSAGE})

#: the kinds of entries of a session (PROTOCOL.md 1.1): a plain message, and the events
MESSAGE_KIND = "message"
RECALL = "recall"
EDIT = "edit"
MEMBERS = "members"
EVENT_KINDS = frozenset({RECALL, EDIT, MEMBERS})


class WindowAborted(Exception):
    """The caller gave a window transaction up (:meth:`WindowTransaction.abort`): rolled back."""


class StoreUnavailable(Unavailable):
    """The store could not do the work now (PostgreSQL down, slow, or lost mid-work): retry later.

    The driver's error is the ``__cause__``. Work that failed this way may
    or may not have committed; every write of the store is idempotent or
    says otherwise.
    """


class StoreError(Exception):
    """A deterministic failure the caller answers to the client (never retry it).

    ``code``: one of :data:`ERROR_CODES`.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Incoming:
    """One client message to store.

    ``ts_ms``: milliseconds since the epoch to record as the message's time
    (None: the store's clock). ``trusted``: skip the member check (the HTTP
    API's admin key sends as any user, ``system`` by default); the session
    must still exist (a ``p2p:`` one is created).
    """

    sender: str
    client_msg_id: str
    session_id: str
    body: Any
    ts_ms: int | None = None
    trusted: bool = False


@dataclass(frozen=True)
class Stored:
    """A message that is in ``messagerecv`` (just now, or before: ``duplicate``).

    ``recipients``: the users to deliver it to, i.e. whose ``messagesend``
    row is undelivered: every member but the sender for a new message, and
    those who have not acknowledged it yet for a duplicate. ``session_id``,
    ``seq``, ``ts_ms`` and ``body`` of a duplicate are the original's.
    """

    msg_id: str
    session_id: str
    seq: int
    ts_ms: int
    sender: str
    client_msg_id: str
    body: Any
    recipients: list[str] = field(default_factory=list)
    duplicate: bool = False
    #: ``message``, or an event's kind (``recall``, ``edit``, ``members``), and the msgId it is about
    kind: str = MESSAGE_KIND
    ref: str | None = None
    ok = True


@dataclass(frozen=True)
class Event:
    """An event to store as an entry of a session (PROTOCOL.md 1.1 "Events in the session's order").

    ``kind`` ``recall`` or ``edit``: ``ref`` is the msgId it is about
    (``session_id``, when given, must be that message's session),
    ``body`` an edit's new body, ``window`` the seconds after the
    message's ``ts`` within which it is allowed (None: any time).
    ``members``: ``session_id``, and ``add``/``remove`` (only the users
    that change are in the event). ``client_msg_id`` is the event's key:
    the same ``(sender, client_msg_id)`` stored again is answered as a
    duplicate, as for messages. ``trusted``: the HTTP API's admin (any
    message, any time, no member check).
    """

    kind: str
    sender: str
    client_msg_id: str
    session_id: str | None = None
    ref: str | None = None
    body: Any = None
    add: tuple = ()
    remove: tuple = ()
    ts_ms: int | None = None
    window: float | None = None
    trusted: bool = False


@dataclass(frozen=True)
class Rejected:
    """A message refused on its own: ``code`` is a PROTOCOL.md ``message_reply`` code."""

    client_msg_id: str
    code: str
    message: str
    ok = False


# --- ids ---------------------------------------------------------------------


def p2p_session_id(a: str, b: str) -> str:
    """The id of the 1:1 session of two users: ``p2p:<a>:<b>`` sorted by bytes."""
    a, b = sorted((a, b), key=lambda u: u.encode())
    return f"{P2P_PREFIX}{a}:{b}"


def parse_p2p(session_id: str) -> tuple[str, str] | None:
    """``(a, b)`` of a canonical ``p2p:<a>:<b>`` id, else None.

    Canonical: both valid user ids (they cannot contain ':'), ``a < b`` in
    byte order (so ``a != b``).
    """
    if not session_id.startswith(P2P_PREFIX) or len(session_id) > P2P_SESSION_ID_MAX:
        return None
    parts = session_id[len(P2P_PREFIX):].split(":")
    if len(parts) != 2:
        return None
    a, b = parts
    if not (valid_user_id(a) and valid_user_id(b)) or not a.encode() < b.encode():
        return None
    return a, b


def valid_session_id(session_id: Any) -> bool:
    """True for an id a session may have.

    A group's: 1-128 characters of ``A-Z a-z 0-9 _ . @ - :``. A ``p2p:`` id
    is the canonical ``p2p:<a>:<b>`` of two user ids, up to
    :data:`P2P_SESSION_ID_MAX` characters: every pair of users has one
    (PROTOCOL.md), even two of 128 characters.
    """
    if not isinstance(session_id, str):
        return False
    if session_id.startswith(P2P_PREFIX):
        return parse_p2p(session_id) is not None
    return SESSION_ID_RE.fullmatch(session_id) is not None


def parse_msg_id(msg_id: Any) -> int | None:
    """The ``messagerecv.id`` of a client-supplied ``msgId`` (str or int), else None."""
    if isinstance(msg_id, bool):
        return None
    if isinstance(msg_id, int):
        value = msg_id
    elif isinstance(msg_id, str) and _DIGITS_RE.fullmatch(msg_id):
        value = int(msg_id)
    else:
        return None
    return value if 0 < value <= BIGINT_MAX else None


def _has_nul(value: Any) -> bool:
    """True when a string anywhere in a JSON value holds U+0000 (jsonb refuses it)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            if "\x00" in v:
                return True
        elif isinstance(v, dict):
            for k, item in v.items():
                if isinstance(k, str) and "\x00" in k:
                    return True
                stack.append(item)
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
    return False


def storable_json(body: Any) -> str | None:
    """``body`` as JSON text for a jsonb column, or None when it cannot be stored."""
    if _has_nul(body):
        return None
    try:
        text = json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        text.encode("utf-8")  # a lone surrogate would fail the whole batch's statement
    except (TypeError, ValueError, RecursionError):
        return None
    return text


def valid_client_msg_id(client_msg_id: Any) -> bool:
    """True for a storable ``clientMsgId``: 1-64 characters, no NUL or lone surrogate."""
    return (isinstance(client_msg_id, str) and 0 < len(client_msg_id) <= CLIENT_MSG_ID_MAX
            and _BAD_CHARS.search(client_msg_id) is None)


def check_new_session(creator: str | None, members: Iterable[str], session_id: str | None, kind: str,
                      max_group_size: int) -> tuple[str, str, list[str]]:
    """Validate a new session: ``(session_id, kind, members sorted)`` or :class:`StoreError`."""
    if isinstance(members, (str, bytes)):
        raise StoreError("bad_request", "members must be a list of user ids")
    members = list(members)
    for u in members + ([creator] if creator is not None else []):
        if not valid_user_id(u):
            raise StoreError("bad_request", f"bad user id {u!r}")
    everyone = sorted(set(members) | ({creator} if creator is not None else set()), key=bytes_key)
    if kind not in ("group", "p2p"):
        raise StoreError("bad_request", f"kind must be group or p2p, not {kind!r}")
    if session_id is None and kind == "p2p":
        if len(everyone) != 2 or creator is None:
            raise StoreError("bad_request", "a p2p session is the creator and one other member")
        session_id = p2p_session_id(*everyone)
    if session_id is None:
        session_id = uuid.uuid4().hex
    if not isinstance(session_id, str) or not (
            session_id.startswith(P2P_PREFIX) or SESSION_ID_RE.fullmatch(session_id) is not None):
        raise StoreError("bad_request", "a session id is 1-128 characters of A-Z a-z 0-9 _ . @ - :")
    if session_id.startswith(P2P_PREFIX):
        pair = parse_p2p(session_id)
        if pair is None or everyone != list(pair) or (creator is not None and creator not in pair):
            raise StoreError("bad_request", "a p2p: id must be p2p:<a>:<b> of its two members, sorted")
        kind = "p2p"
    elif kind == "p2p":
        raise StoreError("bad_request", "a p2p session has the id p2p:<a>:<b>")
    if not everyone:
        raise StoreError("bad_request", "a session needs at least one member")
    if len(everyone) > max_group_size:
        raise StoreError("too_large", f"a session has at most {max_group_size} members")
    return session_id, kind, everyone


def check_member_change(add: Iterable[str], remove: Iterable[str]) -> tuple[list[str], list[str]]:
    """Validate a membership change: ``(add, remove)`` de-duplicated and sorted, or :class:`StoreError`."""
    if isinstance(add, (str, bytes)) or isinstance(remove, (str, bytes)):
        raise StoreError("bad_request", "add and remove are lists of user ids")
    add, remove = list(add), list(remove)
    for u in add + remove:
        if not valid_user_id(u):
            raise StoreError("bad_request", f"bad user id {u!r}")
    if set(add) & set(remove):
        raise StoreError("bad_request", "a user is both added and removed")
    return sorted(set(add), key=bytes_key), sorted(set(remove), key=bytes_key)


def copy_answer(first: Stored | Rejected) -> Stored | Rejected:
    """The answer to a later copy of a message sent twice in one batch: like the first copy's."""
    if isinstance(first, Stored):
        return Stored(first.msg_id, first.session_id, first.seq, first.ts_ms, first.sender,
                      first.client_msg_id, first.body, list(first.recipients), duplicate=True,
                      kind=first.kind, ref=first.ref)
    return first


def entry_fields(entry: dict, kind: str | None, ref: Any, recalled: bool = False, edited: bool = False) -> dict:
    """``entry`` (a message as history and sync list it) with the 1.1 fields it needs, in place.

    An event gets ``kind`` (and ``ref``, a msgId as a string); a plain
    message has none; an original shows ``recalled`` or ``edited`` when
    it was (its body is the latest already). A version 1 client ignores them.
    """
    if kind and kind != MESSAGE_KIND:
        entry["kind"] = kind
        if ref is not None:
            entry["ref"] = str(ref)
    if recalled:
        entry["recalled"] = True
    if edited:
        entry["edited"] = True
    return entry


def clamp_bigint(value: Any) -> int:
    """``value`` as an int within PostgreSQL's bigint (a client's seq may be any JSON number)."""
    return max(-BIGINT_MAX, min(int(value), BIGINT_MAX))


def bytes_key(s: str) -> bytes:
    """Sort key of PostgreSQL's ``COLLATE "C"``: the UTF-8 bytes."""
    return s.encode()



def sorted_pairs(pairs: Iterable[tuple[str, Any]]) -> tuple[list[str], list[int]]:
    """Distinct, valid ``(user_id, msg_id)`` as two parallel lists sorted by (user bytes, id).

    Invalid user ids and msgIds are left out (they name no row).
    """
    seen = set()
    for user, msg_id in pairs:
        n = parse_msg_id(msg_id)
        if n is not None and valid_user_id(user):
            seen.add((user, n))
    ordered = sorted(seen, key=lambda p: (p[0].encode(), p[1]))
    return [p[0] for p in ordered], [p[1] for p in ordered]


# --- the window transaction ----------------------------------------------------


def p2p_recipients(batch: Iterable[Incoming]) -> list[str] | None:
    """Whom the new messages of ``batch`` can go to, when the session ids alone say it.

    Every session a ``p2p:<a>:<b>``: the other party of each sender (sorted),
    a superset of :attr:`WindowTransaction.recipients`. Otherwise None
    (a group's members are known only inside the transaction). The pipeline
    asks the registry who of them is online while the store takes its
    locks, not after.
    """
    users: set[str] = set()
    for m in batch:
        pair = parse_p2p(m.session_id) if isinstance(m.session_id, str) else None
        if pair is None:
            return None
        if m.trusted or m.sender in pair:
            users.update(u for u in pair if u != m.sender)
    return sorted(users)


@implementer(IWindowTransaction)
class WindowTransaction:
    """The caller's side of a window's store transaction, and the handshake with the store's side.

    A store's :meth:`~imcluster.interfaces.IMessageStore.begin_window` makes
    one, runs its transaction, and calls :meth:`ready` once the window's
    sessions are locked (with the recipients of the new messages), then
    waits in :meth:`online` for the caller's :meth:`commit` (or
    :meth:`abort`) before writing, and reports its outcome with
    :meth:`settle`. A transaction that runs again (a lost race, a deadlock,
    a lost connection) calls :meth:`ready` and :meth:`online` again: the
    second time they return at once with what the caller gave the first
    time (the caller never sees a retry).
    """

    def __init__(self, batch: list[Incoming]) -> None:
        self.batch = batch
        #: users the new messages are written to (sorted): set by :meth:`ready`
        self.recipients: list[str] = []
        #: answers known when the locks were taken: a :class:`Rejected` or a duplicate's
        #: :class:`Stored` per message, None for a message that is new
        self.decided: list[Stored | Rejected | None] = []
        self.started: defer.Deferred = defer.Deferred()
        self._gave: defer.Deferred = defer.Deferred()
        self._online: list[str] | None = None
        self._outcome: Any = None  # the results, or a Failure, once settled
        self._settled = False
        self._waiting: list[defer.Deferred] = []

    # -- the caller's side (IWindowTransaction)

    def commit(self, online: Iterable[str] = ()) -> defer.Deferred:
        """Write the new messages (rows of ``online`` recipients ``sending``) and commit."""
        if not self._gave.called:
            self._gave.callback(sorted(set(online)))
        return self._result()

    def abort(self) -> defer.Deferred:
        """Roll back (a no-op once committed or failed); fires when the transaction is over."""
        if not self._gave.called:
            self._gave.errback(WindowAborted("the caller gave the window up"))
        return self._result().addErrback(lambda _: None)

    # -- the store's side

    def ready(self, recipients: list[str], decided: list[Stored | Rejected | None]) -> None:
        """The sessions are locked: tell the caller whom the new messages go to (the first time)."""
        if not self.started.called:
            self.recipients = list(recipients)
            self.decided = list(decided)
            self.started.callback(self)

    async def online(self, recipients: Iterable[str]) -> list[str]:
        """Wait for the caller's answer: which of ``recipients`` are online (``WindowAborted``: give up)."""
        if self._online is None:
            self._online = await self._gave
        given = set(self._online)
        return sorted(u for u in recipients if u in given)

    def settle(self, outcome: Any) -> None:
        """The transaction is over: its results, or a Failure (also the caller's, before :meth:`ready`)."""
        self._settled, self._outcome = True, outcome
        if not self.started.called:
            # failed before the locks: begin_window fails (a result here means nothing to write)
            if isinstance(outcome, Failure):
                self.started.errback(outcome)
                return
            self.ready([], list(outcome))
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            self._deliver(d)

    def _result(self) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        if self._settled:
            self._deliver(d)
        else:
            self._waiting.append(d)
        return d

    def _deliver(self, d: defer.Deferred) -> None:
        if isinstance(self._outcome, Failure):
            d.errback(self._outcome)
        else:
            d.callback(self._outcome)

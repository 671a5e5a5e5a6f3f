"""The PostgreSQL message store: every SQL statement of the processors and of the HTTP API.

:class:`MessageStore` sits on :class:`imcluster.db.PostgresService` and keeps
the tables of ``imcluster/migrations`` (ARCHITECTURE.md "PostgreSQL tables").
Every public method returns a Deferred.

Batching is the design. :meth:`MessageStore.begin_window` handles a whole
window of client messages in ONE transaction and TWO round trips, whatever
the batch size (BEGIN and COMMIT travel with them, ``imcluster.db``), with
the caller's turn between them (a :class:`~imcluster.store.WindowTransaction`):

1. one string of statements: BEGIN; the 1:1 sessions ``p2p:<a>:<b>`` that
   the batch writes to are created (``INSERT ... ON CONFLICT DO NOTHING``,
   in id order) with both members, except those this store has seen
   committed already (:data:`P2P_KNOWN_MAX`; one remembered but gone is
   noticed below and the batch runs again without memory); the batch's
   sessions are locked with ``SELECT ... ORDER BY id FOR UPDATE`` (one
   stable byte order for every processor: two processors never deadlock);
   then one ``SELECT`` reads the originals of duplicates on the unique key
   ``(sender_id, client_msg_id)`` (with their still undelivered
   recipients), ``last_seq`` and the members of every session, and
   reserves the ids of the new messages (``nextval``); ``begin_window``
   fires now, with the recipients of the new messages, and the caller asks
   the registry which are online (the store never calls another role);
2. on the caller's ``commit(online)``, one statement writes everything,
   then COMMIT: one ``UPDATE session``
   row per session (``last_seq`` advanced by the number of new messages),
   one multi-row ``INSERT`` into ``messagerecv`` and the ``messagesend``
   rows of every member except the sender, expanded by PostgreSQL from
   ``session_member`` (a 100-member group costs one row on the wire per
   message, not 99); the rows of the ``online`` recipients are inserted
   ``sending``, the others ``pending``.

Because the session row stays locked until commit, and membership changes
(:meth:`MessageStore.add_remove_members`) lock it too, ``seq`` is gap-free
and strictly increasing per session, and the recipients computed in Python are
exactly the ``messagesend`` rows written.

A message that fails on its own (``no_session``, ``not_member``,
``too_large`` for a session above the group size cap, ``bad_frame`` for a
body PostgreSQL cannot store) is answered with :class:`Rejected`; its
batch-mates are stored. Two processors racing on the same ``clientMsgId``:
the unique key lets one insert win; the other gets a unique violation, rolls
back and runs the whole batch again (bounded, :data:`RACE_RETRIES`), which now
finds the original and answers it as a duplicate.

``msgId`` is ``messagerecv.id`` as a decimal string. ``ts`` is
``messagerecv.created_at`` in milliseconds since the epoch; a new message's
``created_at`` is its :attr:`Incoming.ts_ms` (the processor's clock when
absent), so the reply, the live delivery, sync and history all show the same
``ts``.

Errors a caller must map to the client: :class:`StoreError` with ``code``
``no_session``, ``not_member``, ``conflict``, ``too_large`` or
``bad_request``. PostgreSQL down, a statement timeout, a deadlock that
kept coming back: :class:`StoreUnavailable` (transient: retry); the
driver's own errors never leave this module.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Sequence

import psycopg2
from twisted.internet import defer, error as ierror
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from imcluster import metrics
from imcluster.db import ConnectionDead, DatabaseUnavailable, RollbackFailed
from imcluster.interfaces import IMessageStore
from imcluster.store.base import (
    BIGINT_MAX, HISTORY_DEFAULT_LIMIT, HISTORY_MAX_LIMIT, P2P_PREFIX, Incoming, Rejected, Stored, StoreError,
    StoreUnavailable, WindowTransaction, bytes_key, check_member_change, check_new_session, clamp_bigint,
    copy_answer, parse_p2p, sorted_pairs, storable_json, valid_client_msg_id, valid_session_id, valid_user_id,
)
from imcluster.store.base import (
    EDIT, MEMBERS, MESSAGE_KIND, NO_MESSAGE, NOT_ALLOWED, RECALL, Event, entry_fields, parse_msg_id,
)

#: how often a batch is run again after losing a race on the clientMsgId key
#: (unique violation). Each retry sees what the winner committed, so a second
#: loss needs yet another racer; this is a safety bound, not a tuning knob.
#: (Deadlocks and serialization failures are re-run by PostgresService.)
RACE_RETRIES = 5
_RACE_PGCODES = frozenset({"23505"})

#: 1:1 session ids this store saw committed, so a window does not spend a
#: round trip creating them again (product code never deletes a session); a
#: memory bound, not a tuning knob: the set is emptied when it reaches it
P2P_KNOWN_MAX = 100_000


class _StaleP2P(Exception):
    """A 1:1 session remembered as existing is gone (deleted by hand): forget and run again."""


#: ``created_at`` in whole milliseconds; extract() is numeric (exact) since PostgreSQL 14
_TS_SQL = "floor(extract(epoch FROM {t}.created_at) * 1000)::bigint"


#: what the driver and the pool raise when PostgreSQL is down, slow or lost mid-work
#: (OperationalError covers statement timeouts and deadlocks run out of retries too)
_DRIVER_ERRORS: tuple[type[BaseException], ...] = (
    DatabaseUnavailable, ConnectionDead, RollbackFailed, psycopg2.OperationalError, psycopg2.InterfaceError,
    ierror.ConnectionDone, ierror.ConnectionLost,
)


def _unavailable(e: BaseException) -> BaseException:
    """``e`` as the store's :class:`StoreUnavailable` when it is the driver's outage error, else ``e``."""
    if not isinstance(e, _DRIVER_ERRORS):
        return e
    text = str(e).strip().splitlines()
    wrapped = StoreUnavailable(f"PostgreSQL unavailable: {text[0] if text else type(e).__name__}")
    wrapped.__cause__ = e
    return wrapped


def _translate(failure: Failure) -> Failure:
    wrapped = _unavailable(failure.value)
    return failure if wrapped is failure.value else Failure(wrapped)


def _store_errors(method: Callable[..., defer.Deferred]) -> Callable[..., defer.Deferred]:
    """A public method whose driver errors reach the caller as :class:`StoreUnavailable`."""
    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> defer.Deferred:
        return method(*args, **kwargs).addErrback(_translate)
    return wrapper


def _race(failure_or_exc: Any) -> bool:
    exc = getattr(failure_or_exc, "value", failure_or_exc)
    return getattr(exc, "pgcode", None) in _RACE_PGCODES


# --- the store -----------------------------------------------------------------

#: one page of a user's undelivered messages after (session_id, seq), byte order:
#: an index range scan on messagesend_undelivered (0002), no sort (tests EXPLAIN it)
UNDELIVERED_SQL = (
    "SELECT s.msg_id, s.session_id, s.seq, r.sender_id, r.client_msg_id, r.body, "
    + _TS_SQL.format(t="r") + ", r.kind, r.ref, r.recalled, r.edited FROM messagesend s JOIN messagerecv r ON r.id = s.msg_id "
    "WHERE s.user_id = %s AND s.status <> 'delivered' "
    'AND (s.session_id COLLATE "C", s.seq) > (%s COLLATE "C", %s::bigint) '
    'ORDER BY s.session_id COLLATE "C", s.seq LIMIT %s')


#: the first page of each of several users' undelivered rows (one statement for a batch of syncs):
#: UNDELIVERED_SQL per user, from the start, by a LATERAL join over the distinct user ids
FIRST_PAGES_SQL = (
    "SELECT u.user_id, p.* FROM (SELECT DISTINCT unnest(%s::text[]) AS user_id) u CROSS JOIN LATERAL ("
    "SELECT s.msg_id, s.session_id, s.seq, r.sender_id, r.client_msg_id, r.body, "
    + _TS_SQL.format(t="r") + " AS ts, r.kind, r.ref, r.recalled, r.edited FROM messagesend s "
    "JOIN messagerecv r ON r.id = s.msg_id "
    "WHERE s.user_id = u.user_id AND s.status <> 'delivered' "
    'AND (s.session_id COLLATE "C", s.seq) > (\'\' COLLATE "C", 0::bigint) '
    'ORDER BY s.session_id COLLATE "C", s.seq LIMIT %s) p '
    'ORDER BY u.user_id, p.session_id COLLATE "C", p.seq')

#: undelivered rows left alone for ``age`` seconds, after a cursor (updated_at, user_id, msg_id):
#: a range scan on messagesend_stale (0003)
STALE_SQL = (
    "SELECT s.updated_at::text, s.user_id, s.msg_id, s.session_id, s.seq, r.sender_id, r.client_msg_id, "
    "r.body, " + _TS_SQL.format(t="r") + ", r.kind, r.ref, r.recalled, r.edited FROM messagesend s JOIN messagerecv r ON r.id = s.msg_id "
    "WHERE s.status <> 'delivered' AND s.updated_at <= now() - make_interval(secs => %s) "
    "AND s.updated_at >= now() - make_interval(secs => %s) "
    "AND (s.updated_at, s.user_id, s.msg_id) > (%s::timestamptz, %s, %s::bigint) "
    "ORDER BY s.updated_at, s.user_id, s.msg_id LIMIT %s")

#: the messages of a user's sessions stored since a time, newest ``per_session`` of each session
#: at most (a re-sync honouring ``since``): backwards on messagerecv_session_seq per session
RECENT_SQL = (
    "SELECT r.id, r.session_id, r.seq, r.sender_id, r.client_msg_id, r.body, r.ts, r.kind, r.ref, r.recalled, "
    "r.edited FROM session_member m CROSS JOIN LATERAL ("
    "SELECT r.id, r.session_id, r.seq, r.sender_id, r.client_msg_id, r.body, r.created_at, r.kind, r.ref, "
    "r.recalled, r.edited, " + _TS_SQL.format(t="r") + " AS ts FROM messagerecv r WHERE r.session_id = m.session_id "
    "ORDER BY r.seq DESC LIMIT %s) r "
    "WHERE m.user_id = %s AND r.created_at >= to_timestamp(%s / 1000.0) "
    'ORDER BY r.session_id COLLATE "C", r.seq LIMIT %s')


@implementer(IMessageStore)
class MessageStore:
    """imcluster's tables in PostgreSQL, behind one batch-oriented API.

    ``db`` is an :class:`imcluster.db.PostgresService` (``run_query``,
    ``run_operation``, ``run_interaction(fn, idempotent=...)``);
    ``max_group_size`` caps the members of a session (config
    ``max_group_size``); ``clock`` gives ``seconds()`` for messages without
    ``ts_ms`` (default: the reactor). ``reader`` (``run_query`` only; default
    ``db``) serves :meth:`history`, :meth:`get_session`,
    :meth:`user_sessions` and :meth:`read_cursors`: a replica may answer
    those. Everything that
    writes, assigns seq, de-duplicates or syncs uses ``db``, the primary.
    """

    log = Logger()

    def __init__(self, db: Any, max_group_size: int, clock: Any = None, reader: Any = None) -> None:
        self.db = db
        #: where history and the HTTP API's reads go (``run_query``): an
        #: :class:`imcluster.db.ReadPool` over ``--postgres-replica``; default ``db``
        self.reader = reader if reader is not None else db
        self.max_group_size = max_group_size
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = clock
        #: batches run again after losing a race on the clientMsgId key (observability, tests)
        self.race_retries = 0
        #: 1:1 sessions seen committed (P2P_KNOWN_MAX): their creation is skipped
        self.p2p_known: set[str] = set()

    # -- messages ----------------------------------------------------------------

    def begin_window(self, batch: Sequence[Incoming]) -> defer.Deferred:
        """Begin a window's transaction: fires with a :class:`WindowTransaction` once its sessions are locked.

        Idempotent: a batch run again (after a crash, a retry, or by another
        processor) answers every message already stored as a duplicate.

        The transaction's first round trip takes the locks and reads what
        the batch needs (module docstring); the Deferred fires then, with
        :attr:`WindowTransaction.recipients`, the users the new messages go
        to. The pipeline begins the next window's transaction only then, so
        that windows in flight together take seq numbers in the order they
        started, and asks the registry which recipients are online. Its
        ``commit(online)`` sends the second round trip: the rows of
        ``online`` recipients are inserted ``sending`` at once (sparing a
        ``mark_sending``), then COMMIT. ``abort()`` rolls back.

        Should the transaction run again (a lost race on the clientMsgId
        key, a deadlock, a lost connection), it does so on its own, with the
        ``online`` users already given. PostgreSQL down or slow:
        :class:`StoreUnavailable`.
        """
        txn = WindowTransaction(list(batch))
        d = defer.Deferred.fromCoroutine(self._store_messages(txn))
        d.addBoth(txn.settle)
        return txn.started

    def store_messages(self, batch: Sequence[Incoming]) -> defer.Deferred:
        """Store a batch in one transaction; fires with ``[Stored | Rejected]`` in batch order.

        :meth:`begin_window`, then ``commit(())`` (every row ``pending``).
        """
        return self.begin_window(batch).addCallback(lambda txn: txn.commit(()))

    async def _store_messages(self, txn: WindowTransaction) -> list[Stored | Rejected]:
        batch = txn.batch
        if not batch:
            return []
        now_ms = int(self.clock.seconds() * 1000)
        attempt = 0
        while True:
            attempt += 1
            try:
                results = await self.db.run_interaction(self._store_in, batch, now_ms, txn, idempotent=True)
                break
            except _StaleP2P:
                self.p2p_known.clear()
                continue
            except Exception as e:
                if not _race(e) or attempt > RACE_RETRIES:
                    raise _unavailable(e)
                self.race_retries += 1
                self.log.info("store batch of {n} lost a race ({code}); attempt {attempt} of {retries}",
                              n=len(batch), code=getattr(e, "pgcode", None), attempt=attempt + 1,
                              retries=RACE_RETRIES + 1)
        # committed: their 1:1 sessions exist from now on
        known = self.p2p_known
        if len(known) >= P2P_KNOWN_MAX:
            known.clear()
        for r in results:
            if r.ok and r.session_id.startswith(P2P_PREFIX):
                known.add(r.session_id)
        stored = sum(1 for r in results if r.ok and not r.duplicate)
        if stored:
            metrics.MESSAGES_STORED.inc(stored)
        if any(r.ok and r.duplicate for r in results):
            metrics.DUPLICATES.inc(sum(1 for r in results if r.ok and r.duplicate))
        return results

    async def _store_in(self, cursor: Any, batch: list[Incoming], now_ms: int,
                        txn: WindowTransaction) -> list[Stored | Rejected]:
        """The transaction of :meth:`begin_window` (runs again from scratch on a retry)."""
        results: list[Stored | Rejected | None] = [None] * len(batch)
        bodies: dict[int, str] = {}
        candidates: list[int] = []  # indexes still to decide, in batch order

        # 0. what can be decided without the database
        for i, m in enumerate(batch):
            if not valid_client_msg_id(m.client_msg_id) or not valid_user_id(m.sender):
                results[i] = Rejected(str(m.client_msg_id), "bad_frame", "bad sender or clientMsgId")
                continue
            body = storable_json(m.body)
            if body is None:
                results[i] = Rejected(m.client_msg_id, "bad_frame",
                                      "body is not storable JSON (U+0000 in a string, NaN or Infinity)")
                continue
            bodies[i] = body
            candidates.append(i)

        # 1. what the session id alone decides, and the sessions to lock: those
        # of every candidate still undecided (a duplicate's session is locked
        # too, harmlessly: it exists, and the lock is held only until COMMIT)
        checks: dict[int, tuple[str, str] | None] = {}  # candidate -> refusal (code, message), or None
        session_ids: set[str] = set()
        p2p_new: set[str] = set()
        checked: dict[str, tuple[bool, tuple[str, str] | None]] = {}  # per distinct session id
        keys_seen: set[tuple[str, str]] = set()
        for i in candidates:
            m = batch[i]
            key = (m.sender, m.client_msg_id)
            if key in keys_seen:
                continue  # a later copy: answered like the first one (step 3)
            keys_seen.add(key)
            if not isinstance(m.session_id, str):
                valid, pair = False, None
            elif m.session_id in checked:
                valid, pair = checked[m.session_id]
            else:
                valid, pair = checked[m.session_id] = (valid_session_id(m.session_id), parse_p2p(m.session_id))
            if not valid:
                checks[i] = ("no_session", "no such session")
                continue
            if pair is not None and not m.trusted and m.sender not in pair:
                checks[i] = ("not_member", "not a member of this session")
                continue
            checks[i] = None
            if pair is not None and m.session_id not in self.p2p_known:
                p2p_new.add(m.session_id)
            session_ids.add(m.session_id)

        # 2. ONE round trip: BEGIN; create the new 1:1 sessions (they come into
        # being with their first message); lock the sessions in one stable
        # order; then, in a second statement, read the originals of
        # duplicates, last_seq and members, and reserve the ids of the new
        # messages. Under READ COMMITTED that last statement takes its
        # snapshot after the locks are held, so it sees what a membership
        # change, or a processor storing the same message, that held a lock
        # before us committed (a subquery of the locking SELECT would read
        # its older snapshot).
        keys = sorted(keys_seen)
        if not keys:
            return results  # type: ignore[return-value]
        ids = sorted(session_ids)
        sql = b""
        if p2p_new:
            sql += self._create_p2p_sql(cursor, sorted(p2p_new, key=bytes_key)) + b"; "
        if ids:
            sql += cursor.mogrify('SELECT 1 FROM session WHERE id = ANY(%s) ORDER BY id COLLATE "C" FOR UPDATE; ',
                                  (ids,))
        sql += cursor.mogrify(
            "SELECT (SELECT json_agg(json_build_array(r.sender_id, r.client_msg_id, r.id, r.session_id, r.seq, "
            + _TS_SQL.format(t="r") + ", r.body, "
            'ARRAY(SELECT s.user_id FROM messagesend s WHERE s.msg_id = r.id AND s.status <> \'delivered\' '
            'ORDER BY s.user_id COLLATE "C"))) '
            "FROM unnest(%s::text[], %s::text[]) AS k(sender_id, client_msg_id) "
            "JOIN messagerecv r USING (sender_id, client_msg_id)), "
            "(SELECT json_agg(json_build_array(s.id, s.last_seq, ARRAY(SELECT m.user_id FROM session_member m "
            'WHERE m.session_id = s.id ORDER BY m.user_id COLLATE "C"))) FROM session s WHERE s.id = ANY(%s)), '
            "ARRAY(SELECT nextval('messagerecv_id_seq') FROM generate_series(1, %s))",
            ([k[0] for k in keys], [k[1] for k in keys], ids, sum(1 for c in checks.values() if c is None)))
        await cursor.execute(sql)
        found, session_rows, reserved = cursor.fetchall()[0]
        originals: dict[tuple[str, str], Stored] = {}
        for sender, cmid, msg_id, session_id, seq, ts, body, pending in found or ():
            originals[(sender, cmid)] = Stored(
                str(msg_id), session_id, seq, ts, sender, cmid, body, pending, duplicate=True)
        sessions: dict[str, tuple[int, list[str]]] = {
            sid: (last_seq, members) for sid, last_seq, members in session_rows or ()}
        if any(sid not in sessions and sid.startswith(P2P_PREFIX) and sid not in p2p_new for sid in ids):
            raise _StaleP2P()  # rolls back; _store_messages forgets and runs the batch again

        # 3. duplicates are answered with their original; a message sent twice
        # in one batch: the later copies are answered like the first one (a
        # duplicate of it, or the same refusal), as if stored one by one
        fresh: list[int] = []
        first_of_key: dict[tuple[str, str], int] = {}
        copies: list[tuple[int, int]] = []  # (later copy, first copy)
        for i in candidates:
            m = batch[i]
            key = (m.sender, m.client_msg_id)
            original = originals.get(key)
            if original is not None:
                results[i] = original
            elif key in first_of_key:
                copies.append((i, first_of_key[key]))
            elif checks[i] is not None:
                first_of_key[key] = i
                results[i] = Rejected(m.client_msg_id, *checks[i])
            else:
                first_of_key[key] = i
                fresh.append(i)

        # 4. seq numbers, in batch order, and one write statement
        next_seq: dict[str, int] = {}
        new_rows: list[tuple[int, int]] = []  # (batch index, seq)
        for i in fresh:
            if results[i] is not None:
                continue
            m = batch[i]
            info = sessions.get(m.session_id)
            if info is None:
                results[i] = Rejected(m.client_msg_id, "no_session", "no such session")
                continue
            last_seq, members = info
            if not m.trusted and m.sender not in members:
                results[i] = Rejected(m.client_msg_id, "not_member", "not a member of this session")
                continue
            if len(members) > self.max_group_size:
                results[i] = Rejected(m.client_msg_id, "too_large",
                                      f"the session has more than {self.max_group_size} members")
                continue
            seq = next_seq.get(m.session_id, last_seq) + 1
            next_seq[m.session_id] = seq
            new_rows.append((i, seq))

        # 5. the caller's turn: the locks are held, the recipients known; it
        # asks who of them is online (the store never calls another role)
        # and answers with commit(online), or abort()
        recipients = sorted({u for i, _ in new_rows for u in sessions[batch[i].session_id][1]
                             if u != batch[i].sender})
        txn.ready(recipients, results)
        if new_rows:
            online = await txn.online(recipients)
            msg_ids = reserved[:len(new_rows)]
            await self._write(cursor, batch, bodies, new_rows, msg_ids, next_seq, now_ms, online)
            for (i, seq), msg_id in zip(new_rows, msg_ids):
                m = batch[i]
                members = sessions[m.session_id][1]
                results[i] = Stored(
                    str(msg_id), m.session_id, seq,
                    m.ts_ms if m.ts_ms is not None else now_ms, m.sender, m.client_msg_id, m.body,
                    [u for u in members if u != m.sender])

        for i, first_i in copies:
            results[i] = copy_answer(results[first_i])  # type: ignore[arg-type]
        return results  # type: ignore[return-value]

    @staticmethod
    def _create_p2p_sql(cursor: Any, session_ids: list[str]) -> bytes:
        """The statement that creates the 1:1 sessions not there yet (in id order: no deadlock between creators)."""
        rows, members = [], []
        for sid in session_ids:
            a, b = parse_p2p(sid)  # type: ignore[misc]
            rows.append(cursor.mogrify("(%s,'p2p')", (sid,)))
            members.append(cursor.mogrify("(%s,%s)", (sid, a)))
            members.append(cursor.mogrify("(%s,%s)", (sid, b)))
        # members only of the sessions this statement created (an existing one keeps its own)
        return (b"WITH s AS (INSERT INTO session (id, kind) VALUES " + b",".join(rows)
                + b" ON CONFLICT (id) DO NOTHING RETURNING id) "
                b"INSERT INTO session_member (session_id, user_id, role) "
                b"SELECT v.session_id, v.user_id, 'member' FROM (VALUES " + b",".join(members)
                + b") AS v(session_id, user_id) JOIN s ON s.id = v.session_id")

    async def _write(self, cursor: Any, batch: list[Incoming], bodies: dict[int, str],
                     new_rows: list[tuple[int, int]], msg_ids: Sequence[int], last_seqs: dict[str, int],
                     now_ms: int, online: Sequence[str] = ()) -> None:
        """Advance last_seq, insert messagerecv and messagesend, and COMMIT: one round trip.

        ``msg_ids`` are the ids reserved for ``new_rows`` (in their order).
        Rows of ``online`` recipients are inserted ``sending``, the others ``pending``.
        """
        upd = b",".join(cursor.mogrify("(%s,%s::bigint)", (sid, seq)) for sid, seq in sorted(last_seqs.items()))
        ins = b",".join(
            cursor.mogrify(
                "(%s::bigint,%s,%s::bigint,%s,%s,%s::jsonb,"
                "timestamptz 'epoch' + %s::bigint * interval '1 millisecond')",
                (msg_id, batch[i].session_id, seq, batch[i].sender, batch[i].client_msg_id, bodies[i],
                 batch[i].ts_ms if batch[i].ts_ms is not None else now_ms))
            for (i, seq), msg_id in zip(new_rows, msg_ids))
        await cursor.execute(
            b"WITH upd AS (UPDATE session s SET last_seq = v.last_seq FROM (VALUES " + upd
            + b") AS v(id, last_seq) WHERE s.id = v.id RETURNING s.id), "
            b"ins AS (INSERT INTO messagerecv (id, session_id, seq, sender_id, client_msg_id, body, created_at) "
            b"OVERRIDING SYSTEM VALUE VALUES " + ins + b" RETURNING id, session_id, seq, sender_id) "
            b"INSERT INTO messagesend (user_id, msg_id, session_id, seq, status) "
            b"SELECT m.user_id, ins.id, ins.session_id, ins.seq, "
            + (cursor.mogrify("CASE WHEN m.user_id = ANY(%s::text[]) THEN 'sending' ELSE 'pending' END ",
                              (list(online),)) if online else b"'pending' ")
            + b"FROM ins "
            b"JOIN session_member m ON m.session_id = ins.session_id AND m.user_id <> ins.sender_id",
            commit=True)

    @_store_errors
    def stored_keys(self, keys: Iterable[tuple[str, str]]) -> defer.Deferred:
        """Which ``(sender, clientMsgId)`` keys are stored already: fires with a set of them.

        One read on the unique key of ``messagerecv``. The pipeline asks it
        before moderation, so that a client's retry of a stored message is
        never moderated again (ARCHITECTURE.md flow 5): it goes on to
        :meth:`begin_window`, which answers it with its original.
        """
        pairs = sorted({(s, c) for s, c in keys if valid_user_id(s) and valid_client_msg_id(c)})
        if not pairs:
            return defer.succeed(set())
        d = self.db.run_query(
            "SELECT r.sender_id, r.client_msg_id FROM unnest(%s::text[], %s::text[]) AS k(sender_id, client_msg_id) "
            "JOIN messagerecv r USING (sender_id, client_msg_id)",
            ([p[0] for p in pairs], [p[1] for p in pairs]))
        return d.addCallback(lambda rows: {(s, c) for s, c in rows})

    @_store_errors
    def mark_sending(self, pairs: Iterable[tuple[str, Any]]) -> defer.Deferred:
        """``pending`` -> ``sending`` for ``(user_id, msg_id)`` pairs; fires with the count changed.

        Never touches a ``delivered`` row. Rows locked by a concurrent update
        (an acknowledgement being applied) are skipped: ``sending`` only tells
        operators a delivery was attempted, sync sends both states, and not
        waiting means this statement can never take part in a deadlock.
        """
        users, ids = sorted_pairs(pairs)
        if not users:
            return defer.succeed(0)
        return self.db.run_query(
            "WITH t AS (SELECT m.user_id, m.msg_id FROM messagesend m "
            "JOIN unnest(%s::text[], %s::bigint[]) AS a(user_id, msg_id) USING (user_id, msg_id) "
            "WHERE m.status = 'pending' FOR UPDATE OF m SKIP LOCKED), "
            "u AS (UPDATE messagesend m SET status = 'sending', updated_at = now() FROM t "
            "WHERE m.user_id = t.user_id AND m.msg_id = t.msg_id AND m.status = 'pending' RETURNING 1) "
            "SELECT count(*) FROM u", (users, ids)).addCallback(lambda rows: rows[0][0])

    @_store_errors
    def mark_delivered(self, acks: Iterable[tuple[str, Iterable[Any]]]) -> defer.Deferred:
        """Mark acknowledged messages ``delivered``: ``acks`` is ``[(user_id, [msgId, ...]), ...]``.

        One UPDATE for the whole batch. A msgId that is not a number, not a
        message, or not addressed to that user changes nothing. Fires with
        the number of rows that became delivered.

        The pairs are sent sorted by ``(user_id, msg_id)`` and the plan
        walks them in that order, so two statements acknowledging the same
        rows (one user's two devices, two processors) lock them in the same
        order. Should PostgreSQL ever report a deadlock anyway, the
        statement was rolled back whole and runs again (the pool retries
        it). Rows are not locked by a first ``SELECT ... FOR UPDATE``: that
        touched every row twice and made acknowledgements twice as costly as
        inserting the rows (fan-out trace: 11.8 ms a statement).
        """
        users, ids = sorted_pairs((user, msg_id) for user, msg_ids in acks for msg_id in msg_ids)
        if not users:
            return defer.succeed(0)
        return self.db.run_operation(
            "UPDATE messagesend m SET status = 'delivered', updated_at = now() "
            "FROM unnest(%s::text[], %s::bigint[]) AS a(user_id, msg_id) "
            "WHERE m.user_id = a.user_id AND m.msg_id = a.msg_id AND m.status <> 'delivered'",
            (users, ids), idempotent=True)

    @_store_errors
    def undelivered_page(self, user_id: str, after: tuple[str, int] | None, limit: int) -> defer.Deferred:
        """One page of a user's undelivered messages (``pending`` or ``sending``).

        Ordered by ``sessionId`` in byte order, then ``seq``; ``after`` is the
        ``(sessionId, seq)`` of the previous page's last message (None: from
        the start). Keyset paging on the partial index
        ``messagesend_undelivered`` (``0002``): each page costs ``limit``
        index entries, never a sort of the whole backlog. Fires with a list of
        ``{"msgId","sessionId","seq","from","clientMsgId","body","ts"}``.
        """
        if not valid_user_id(user_id):
            return defer.succeed([])
        # ('', 0) sorts before every (session id, seq): session ids are never empty
        after_sid, after_seq = ("", 0) if after is None else (str(after[0]), int(after[1]))
        d = self.db.run_query(UNDELIVERED_SQL, (user_id, after_sid, after_seq, max(1, int(limit))))
        return d.addCallback(lambda rows: [
            entry_fields({"msgId": str(msg_id), "sessionId": sid, "seq": seq, "from": sender,
                          "clientMsgId": cmid, "body": body, "ts": ts}, kind, ref, recalled, edited)
            for msg_id, sid, seq, sender, cmid, body, ts, kind, ref, recalled, edited in rows])

    @_store_errors
    def undelivered_first_pages(self, user_ids: Iterable[str], limit: int) -> defer.Deferred:
        """The first :meth:`undelivered_page` of each user of ``user_ids``, in ONE statement.

        What a batch of syncs starting together reads (the Syncer batches
        them): fires with ``{user_id: page}`` for every distinct user id
        (an invalid one, or one without undelivered rows: ``[]``), each page
        exactly what ``undelivered_page(user_id, None, limit)`` gives.
        """
        users = sorted({str(u) for u in user_ids})
        out: dict[str, list[dict]] = {u: [] for u in users}
        valid = [u for u in users if valid_user_id(u)]
        if not valid:
            return defer.succeed(out)

        def pages(rows: list) -> dict[str, list[dict]]:
            for user, msg_id, sid, seq, sender, cmid, body, ts, kind, ref, recalled, edited in rows:
                out[user].append(entry_fields({"msgId": str(msg_id), "sessionId": sid, "seq": seq, "from": sender,
                                               "clientMsgId": cmid, "body": body, "ts": ts},
                                              kind, ref, recalled, edited))
            return out
        return self.db.run_query(FIRST_PAGES_SQL, (valid, max(1, int(limit)))).addCallback(pages)

    @_store_errors
    def recent_messages(self, user_id: str, since_ms: int, per_session: int, limit: int) -> defer.Deferred:
        """Messages of ``user_id``'s sessions stored since ``since_ms``, delivered or not, own ones too.

        What a re-sync honouring ``since`` sends besides the undelivered
        rows (docs/internals.rst): another device of the user may have
        acknowledged what this connection never got. At most ``per_session``
        (the newest) of each session and ``limit`` in all, ordered like
        :meth:`undelivered_page`; the same dicts.
        """
        if not valid_user_id(user_id):
            return defer.succeed([])
        d = self.db.run_query(RECENT_SQL, (max(1, int(per_session)), user_id, int(since_ms), max(1, int(limit))))
        return d.addCallback(lambda rows: [
            entry_fields({"msgId": str(msg_id), "sessionId": sid, "seq": seq, "from": sender,
                          "clientMsgId": cmid, "body": body, "ts": ts}, kind, ref, recalled, edited)
            for msg_id, sid, seq, sender, cmid, body, ts, kind, ref, recalled, edited in rows])

    @_store_errors
    def stale_undelivered(self, after: Sequence[Any] | None, age: float, horizon: float,
                          limit: int) -> defer.Deferred:
        """Rows left undelivered for ``age`` seconds or more, in ``updated_at`` order after the cursor ``after``.

        ``after`` is the ``cursor`` of the last row of the previous page
        (None: from the start); rows older than ``horizon`` seconds are
        never read (the cursor of a sweep that fell behind jumps). Fires with dicts of
        :meth:`undelivered_page` plus ``userId`` and ``cursor`` (a JSON-able
        list). Read only: the redelivery sweep looks at each row once as
        its cursor passes (imcluster.processor.redeliver).
        """
        cursor = ("-infinity", "", 0) if after is None else (str(after[0]), str(after[1]), int(after[2]))
        d = self.db.run_query(STALE_SQL, (float(age), float(horizon), *cursor, max(1, int(limit))))
        return d.addCallback(lambda rows: [
            entry_fields({"userId": user, "cursor": [ts_text, user, msg_id], "msgId": str(msg_id), "sessionId": sid,
                          "seq": seq, "from": sender, "clientMsgId": cmid, "body": body, "ts": ts},
                         kind, ref, recalled, edited)
            for ts_text, user, msg_id, sid, seq, sender, cmid, body, ts, kind, ref, recalled, edited in rows])

    # -- sessions ------------------------------------------------------------------

    @_store_errors
    def history(self, user_id: str, session_id: str, before_seq: int | None = None,
                limit: int | None = None) -> defer.Deferred:
        """A page of a session's messages, ascending ``seq`` (PROTOCOL.md "History").

        ``before_seq`` is exclusive (None: the newest). ``limit`` None means
        50; it is capped at 200 here (and at least 1). Fails with
        :class:`StoreError` ``no_session`` / ``not_member``; a ``p2p:`` session
        that has no message yet is an empty page for either of its two users
        and ``not_member`` for anyone else (it exists implicitly).
        ``user_id`` None: the HTTP API's admin key (no member check).
        Fires with ``[{"msgId","seq","from","clientMsgId","body","ts"}]``.
        """
        limit = HISTORY_DEFAULT_LIMIT if limit is None else max(1, min(int(limit), HISTORY_MAX_LIMIT))
        before = BIGINT_MAX if before_seq is None else clamp_bigint(before_seq)

        async def run() -> list[dict]:
            if not valid_session_id(session_id):
                raise StoreError("no_session", "no such session")
            if user_id is not None and not valid_user_id(user_id):
                raise StoreError("not_member", "not a member of this session")
            rows = await self.reader.run_query(
                "SELECT s.id, EXISTS (SELECT 1 FROM session_member m "
                "WHERE m.session_id = s.id AND m.user_id = %s) FROM session s WHERE s.id = %s",
                (user_id, session_id))
            if not rows:
                pair = parse_p2p(session_id) if isinstance(session_id, str) else None
                if pair is None:
                    raise StoreError("no_session", "no such session")
                # a 1:1 session exists implicitly (PROTOCOL.md "Sessions"): empty for its
                # two users, closed to anyone else
                if user_id is None or user_id in pair:
                    return []
                raise StoreError("not_member", "not a member of this session")
            if user_id is not None and not rows[0][1]:
                raise StoreError("not_member", "not a member of this session")
            # in a 1:1 session the requester's own messages say whether the other user
            # acknowledged them (PROTOCOL.md 1.1 "Delivery state of one's own messages")
            p2p = user_id is not None and session_id.startswith(P2P_PREFIX)
            rows = await self.reader.run_query(
                "SELECT id, seq, sender_id, client_msg_id, body, ts, kind, ref, recalled, edited, "
                + ("CASE WHEN sender_id = %s AND kind = 'message' THEN EXISTS (SELECT 1 FROM messagesend s "
                   "WHERE s.msg_id = page.id AND s.status = 'delivered') END " if p2p else "NULL ")
                + "FROM (SELECT r.id, r.seq, r.sender_id, r.client_msg_id, r.body, r.kind, r.ref, r.recalled, "
                "r.edited, " + _TS_SQL.format(t="r")
                + " AS ts FROM messagerecv r WHERE r.session_id = %s AND r.seq < %s "
                "ORDER BY r.seq DESC LIMIT %s) page ORDER BY seq",
                ((user_id,) if p2p else ()) + (session_id, before, limit))
            out = []
            for msg_id, seq, sender, cmid, body, ts, kind, ref, recalled, edited, delivered in rows:
                entry = entry_fields({"msgId": str(msg_id), "seq": seq, "from": sender, "clientMsgId": cmid,
                                      "body": body, "ts": ts}, kind, ref, recalled, edited)
                if delivered is not None:
                    entry["delivered"] = delivered
                out.append(entry)
            return out

        return defer.Deferred.fromCoroutine(run())

    @_store_errors
    def read(self, user_id: str, session_id: str, seq: int) -> defer.Deferred:
        """Move ``user_id``'s read cursor to ``seq``: fires with ``(cursor, members)``.

        The cursor never moves back and is clamped to the session's
        ``last_seq``; ``members`` (sorted) are whom the ``read_receipt`` goes
        to. Fails with :class:`StoreError` ``no_session`` / ``not_member``. A
        ``p2p:`` session that has no message yet exists implicitly: its two
        users get ``(0, [a, b])``, anyone else ``not_member``.
        """
        async def run() -> tuple[int, list[str]]:
            if not valid_session_id(session_id):
                raise StoreError("no_session", "no such session")
            if not valid_user_id(user_id):
                raise StoreError("not_member", "not a member of this session")
            rows = await self.db.run_query(
                "WITH u AS (UPDATE session_member m "
                "SET read_seq = GREATEST(m.read_seq, LEAST(%s::bigint, s.last_seq)) FROM session s "
                "WHERE s.id = m.session_id AND m.session_id = %s AND m.user_id = %s RETURNING m.read_seq) "
                "SELECT (SELECT read_seq FROM u), s.id IS NOT NULL, "
                'ARRAY(SELECT user_id FROM session_member WHERE session_id = %s ORDER BY user_id COLLATE "C") '
                "FROM (SELECT 1) one LEFT JOIN session s ON s.id = %s",
                (clamp_bigint(seq), session_id, user_id, session_id, session_id), idempotent=True)
            cursor, exists, members = rows[0]
            if not exists:
                pair = parse_p2p(session_id)
                if pair is None:
                    raise StoreError("no_session", "no such session")
                # an implicit 1:1 session without messages: last_seq 0, the cursor clamps to it
                if user_id not in pair:
                    raise StoreError("not_member", "not a member of this session")
                return 0, list(pair)
            if cursor is None:
                raise StoreError("not_member", "not a member of this session")
            return cursor, members

        return defer.Deferred.fromCoroutine(run())

    @_store_errors
    def create_session(self, creator: str | None, members: Iterable[str], session_id: str | None = None,
                       kind: str = "group") -> defer.Deferred:
        """Create a session: fires with ``(session_id, members sorted)``.

        ``creator`` (None for the HTTP API's admin key) is always a member and
        the owner. ``session_id`` None: a new random id (or, with ``kind``
        ``p2p``, the creator's 1:1 id with the one other member). A ``p2p:``
        id is accepted only as the canonical id of its two users, who must be
        exactly the members. :class:`StoreError`: ``bad_request`` (bad id,
        user id or kind), ``too_large`` (more than ``max_group_size``
        members), ``conflict`` (the id exists).
        """
        try:
            session_id, kind, everyone = check_new_session(creator, members, session_id, kind,
                                                             self.max_group_size)
        except StoreError as e:
            return defer.fail(e)
        rows = [(session_id, u, "owner" if u == creator else "member") for u in everyone]

        def created(result: list) -> tuple[str, list[str]]:
            if not result:
                raise StoreError("conflict", f"session {session_id} exists")
            return session_id, everyone

        # not idempotent: run again after a lost commit it would report a conflict with itself
        return self.db.run_interaction(self._insert_session, session_id, kind, rows,
                                       idempotent=False).addCallback(created)

    async def _insert_session(self, cursor: Any, session_id: str, kind: str, rows: list[tuple]) -> list:
        values = b",".join(cursor.mogrify("(%s,%s,%s)", r) for r in rows)
        await cursor.execute(
            b"WITH s AS (" + cursor.mogrify(
                "INSERT INTO session (id, kind) VALUES (%s,%s) ON CONFLICT (id) DO NOTHING RETURNING id",
                (session_id, kind))
            + b") INSERT INTO session_member (session_id, user_id, role) "
            b"SELECT v.session_id, v.user_id, v.role FROM (VALUES " + values
            + b") AS v(session_id, user_id, role) JOIN s ON s.id = v.session_id RETURNING user_id")
        return cursor.fetchall()

    @_store_errors
    def add_remove_members(self, session_id: str, add: Iterable[str] = (),
                           remove: Iterable[str] = ()) -> defer.Deferred:
        """Change a group's members; fires with the members, sorted.

        Whether the caller may (owner or admin) is the caller's check. The
        session row is locked first, which serializes this with
        :meth:`store_messages` (recipients never differ from ``messagesend``).
        :class:`StoreError`: ``no_session``, ``bad_request`` (a ``p2p:``
        session, a bad user id, a user both added and removed), ``too_large``.
        """
        try:
            add, remove = check_member_change(add, remove)
        except StoreError as e:
            return defer.fail(e)
        if not valid_session_id(session_id):
            return defer.fail(StoreError("no_session", "no such session"))

        async def change_members(cursor: Any) -> list[str]:
            await cursor.execute("SELECT kind FROM session WHERE id = %s FOR UPDATE", (session_id,))
            row = cursor.fetchone()
            if row is None:
                raise StoreError("no_session", "no such session")
            if row[0] == "p2p" and (add or remove):
                raise StoreError("bad_request", "the members of a p2p session do not change")
            if remove:
                await cursor.execute("DELETE FROM session_member WHERE session_id = %s AND user_id = ANY(%s)",
                                     (session_id, remove))
            if add:
                await cursor.execute(
                    "INSERT INTO session_member (session_id, user_id) SELECT %s, u FROM unnest(%s::text[]) u "
                    "ON CONFLICT DO NOTHING", (session_id, add))
            await cursor.execute(
                'SELECT user_id FROM session_member WHERE session_id = %s ORDER BY user_id COLLATE "C"',
                (session_id,))
            everyone = [r[0] for r in cursor.fetchall()]
            if len(everyone) > self.max_group_size:
                raise StoreError("too_large", f"a session has at most {self.max_group_size} members")
            return everyone

        return self.db.run_interaction(change_members, idempotent=True)

    @_store_errors
    def session_members(self, session_ids: Iterable[str]) -> defer.Deferred:
        """``{session_id: [user_id, ...] sorted}`` for the sessions that exist."""
        ids = sorted({sid for sid in session_ids if valid_session_id(sid)})
        if not ids:
            return defer.succeed({})
        d = self.db.run_query(
            'SELECT s.id, ARRAY(SELECT m.user_id FROM session_member m WHERE m.session_id = s.id '
            'ORDER BY m.user_id COLLATE "C") FROM session s WHERE s.id = ANY(%s)', (ids,))
        return d.addCallback(lambda rows: {sid: members for sid, members in rows})

    @_store_errors
    def get_session(self, session_id: str) -> defer.Deferred:
        """``{"sessionId","kind","members","owners","lastSeq"}`` (GET /v1/sessions/{id}).

        Fails with :class:`StoreError` ``no_session``.
        """
        if not valid_session_id(session_id):
            return defer.fail(StoreError("no_session", "no such session"))

        def shape(rows: list) -> dict:
            if not rows:
                raise StoreError("no_session", "no such session")
            sid, kind, last_seq, members, owners = rows[0]
            return {"sessionId": sid, "kind": kind, "members": members, "owners": owners, "lastSeq": last_seq}

        return self.reader.run_query(
            "SELECT s.id, s.kind, s.last_seq, "
            'ARRAY(SELECT user_id FROM session_member WHERE session_id = s.id ORDER BY user_id COLLATE "C"), '
            "ARRAY(SELECT user_id FROM session_member WHERE session_id = s.id AND role = 'owner' "
            'ORDER BY user_id COLLATE "C") FROM session s WHERE s.id = %s', (session_id,)).addCallback(shape)

    @_store_errors
    def user_sessions(self, user_id: str) -> defer.Deferred:
        """A user's sessions: ``[{"sessionId","kind","lastSeq","unread"}]`` by sessionId (bytes).

        ``unread``: messages above the user's read cursor that the user did
        not send (``seq`` is gap-free, so ``last_seq - read_seq`` minus the
        user's own, counted on ``messagerecv_session_sender_seq``, and minus
        the events, counted on ``messagerecv_session_events``: events never
        count as unread).
        """
        if not valid_user_id(user_id):
            return defer.succeed([])
        d = self.reader.run_query(
            "SELECT s.id, s.kind, s.last_seq, (s.last_seq - m.read_seq) - ("
            "SELECT count(*) FROM messagerecv r WHERE r.session_id = s.id AND r.sender_id = m.user_id "
            "AND r.seq > m.read_seq AND r.kind = 'message') - ("
            "SELECT count(*) FROM messagerecv r WHERE r.session_id = s.id AND r.kind <> 'message' "
            "AND r.seq > m.read_seq) FROM session_member m JOIN session s ON s.id = m.session_id "
            'WHERE m.user_id = %s ORDER BY s.id COLLATE "C"', (user_id,))
        return d.addCallback(lambda rows: [
            {"sessionId": sid, "kind": kind, "lastSeq": last_seq, "unread": unread}
            for sid, kind, last_seq, unread in rows])

    # -- events in the session's order (PROTOCOL.md 1.1) ----------------------------

    @_store_errors
    def store_event(self, event: Event) -> defer.Deferred:
        """Store a ``recall``, ``edit`` or ``members`` event as the session's next entry.

        Fires with ``(stored, members)``: the event's :class:`Stored` (its
        ``recipients`` the members but the sender, and for ``members`` the
        users it removes too: their last entry of the session) and the
        session's members after it. ``stored`` is None for a membership
        change that changes nothing. The same ``(sender, client_msg_id)``
        again is answered as a duplicate (``recipients``: those who have
        not acknowledged it), so a window run again stores nothing twice.

        One transaction of its own, a few round trips (events are rare; the
        messages' window transaction stays as it is): the session row is
        locked ``FOR UPDATE`` first, as :meth:`begin_window` does, so the
        event takes the next ``seq`` in order with the messages, and the
        members it reads are those of that ``seq``. A recall erases the
        original's body (null) and sets ``recalled``; an edit writes the
        new body in the original and sets ``edited``. :class:`StoreError`:
        ``no_message``, ``not_allowed``, ``no_session``, ``not_member``,
        ``bad_request``, ``too_large``.
        """
        if not valid_user_id(event.sender) or not valid_client_msg_id(event.client_msg_id):
            return defer.fail(StoreError("bad_request", "bad sender or key"))
        body = storable_json(event.body)
        if body is None:
            return defer.fail(StoreError("bad_request", "body is not storable JSON"))
        now_ms = int(self.clock.seconds() * 1000)
        return self.db.run_interaction(self._event_in, event, body, now_ms, idempotent=True)

    async def _event_in(self, cursor: Any, ev: Event, body: str, now_ms: int) -> tuple:
        ts = ev.ts_ms if ev.ts_ms is not None else now_ms
        await cursor.execute(
            "SELECT r.id, r.session_id, r.seq, " + _TS_SQL.format(t="r") + ", r.body, r.kind, r.ref, "
            "ARRAY(SELECT s.user_id FROM messagesend s WHERE s.msg_id = r.id AND s.status <> 'delivered' "
            'ORDER BY s.user_id COLLATE "C") FROM messagerecv r WHERE r.sender_id = %s AND r.client_msg_id = %s',
            (ev.sender, ev.client_msg_id))
        row = cursor.fetchone()
        if row is not None:
            msg_id, sid, seq, rts, rbody, kind, ref, pending = row
            if kind != ev.kind or (ev.ref is not None and str(ref) != str(parse_msg_id(ev.ref))):
                raise StoreError(NOT_ALLOWED, "this key names another entry of this sender")
            await cursor.execute('SELECT ARRAY(SELECT user_id FROM session_member WHERE session_id = %s '
                                 'ORDER BY user_id COLLATE "C")', (sid,))
            members = cursor.fetchone()[0]
            return (Stored(str(msg_id), sid, seq, rts, ev.sender, ev.client_msg_id, rbody, list(pending),
                           duplicate=True, kind=kind, ref=None if ref is None else str(ref)), members)

        target = None
        if ev.kind in (RECALL, EDIT):
            target = parse_msg_id(ev.ref)
            if target is None:
                raise StoreError(NO_MESSAGE, "no such message")
            await cursor.execute("SELECT session_id FROM messagerecv WHERE id = %s", (target,))
            row = cursor.fetchone()
            if row is None or (ev.session_id is not None and row[0] != ev.session_id):
                raise StoreError(NO_MESSAGE, "no such message")
            session_id = row[0]
        else:
            session_id = ev.session_id
            if not valid_session_id(session_id):
                raise StoreError("no_session", "no such session")
        # the session's lock: this event's seq, in order with the messages' windows
        await cursor.execute(
            "SELECT kind, last_seq, ARRAY(SELECT user_id FROM session_member WHERE session_id = s.id "
            'ORDER BY user_id COLLATE "C") FROM session s WHERE id = %s FOR UPDATE', (session_id,))
        row = cursor.fetchone()
        if row is None:
            if target is not None:
                raise StoreError(NO_MESSAGE, "no such message")
            raise StoreError("no_session", "no such session")
        session_kind, last_seq, members = row
        members = list(members)
        after = members
        removed: list[str] = []
        event_body = body
        if target is not None:
            if not ev.trusted and ev.sender not in members:
                raise StoreError(NO_MESSAGE, "no such message")
            await cursor.execute(
                "SELECT sender_id, kind, recalled, " + _TS_SQL.format(t="r") + " FROM messagerecv r WHERE id = %s",
                (target,))
            sender, kind, recalled, target_ts = cursor.fetchone()
            what = "recalled" if ev.kind == RECALL else "edited"
            if kind != MESSAGE_KIND:
                raise StoreError(NOT_ALLOWED, f"an event cannot be {what}")
            if not ev.trusted and sender != ev.sender:
                raise StoreError(NOT_ALLOWED, f"only its sender may have a message {what}")
            if recalled:
                raise StoreError(NOT_ALLOWED, "the message is recalled")
            if ev.window is not None and ts - target_ts > ev.window * 1000:
                raise StoreError(NOT_ALLOWED, f"a message may be {what} within {ev.window:g} s of its ts")
            if ev.kind == RECALL:
                event_body = "null"
        else:
            add, remove = check_member_change(ev.add, ev.remove)
            if session_kind == "p2p" and (add or remove):
                raise StoreError("bad_request", "the members of a p2p session do not change")
            added = [u for u in add if u not in members]
            removed = [u for u in remove if u in members]
            after = sorted((set(members) | set(added)) - set(removed), key=bytes_key)
            if len(after) > self.max_group_size:
                raise StoreError("too_large", f"a session has at most {self.max_group_size} members")
            if not added and not removed:
                return None, members
            if removed:
                await cursor.execute("DELETE FROM session_member WHERE session_id = %s AND user_id = ANY(%s)",
                                     (session_id, removed))
            if added:
                await cursor.execute(
                    "INSERT INTO session_member (session_id, user_id) SELECT %s, u FROM unnest(%s::text[]) u "
                    "ON CONFLICT DO NOTHING", (session_id, added))
            event_body = storable_json({"added": added, "removed": removed})
        # a removed member gets the event that removes it, and nothing after it
        recipients = sorted({u for u in list(after) + removed if u != ev.sender}, key=bytes_key)
        seq = last_seq + 1
        await cursor.execute(
            "WITH upd AS (UPDATE session SET last_seq = %s WHERE id = %s RETURNING id), "
            "ins AS (INSERT INTO messagerecv (session_id, seq, sender_id, client_msg_id, body, created_at, kind, ref) "
            "VALUES (%s, %s, %s, %s, %s::jsonb, timestamptz 'epoch' + %s::bigint * interval '1 millisecond', %s, %s) "
            "RETURNING id), "
            "snd AS (INSERT INTO messagesend (user_id, msg_id, session_id, seq) "
            "SELECT u, ins.id, %s, %s FROM ins, unnest(%s::text[]) u RETURNING 1) "
            "SELECT id FROM ins",
            (seq, session_id, session_id, seq, ev.sender, ev.client_msg_id, event_body, ts, ev.kind, target,
             session_id, seq, recipients))
        msg_id = cursor.fetchone()[0]
        if ev.kind == RECALL:
            await cursor.execute("UPDATE messagerecv SET body = 'null'::jsonb, recalled = true WHERE id = %s",
                                 (target,))
        elif ev.kind == EDIT:
            await cursor.execute("UPDATE messagerecv SET body = %s::jsonb, edited = true WHERE id = %s",
                                 (body, target))
        stored_body = None if ev.kind == RECALL else (ev.body if ev.kind == EDIT else
                                                       {"added": added, "removed": removed})
        return (Stored(str(msg_id), session_id, seq, ts, ev.sender, ev.client_msg_id, stored_body, recipients,
                       kind=ev.kind, ref=None if target is None else str(target)), after)

    @_store_errors
    def create_session_with_event(self, creator: str, members: Iterable[str], session_id: str | None = None,
                                  client_msg_id: str | None = None, ts_ms: int | None = None) -> defer.Deferred:
        """:meth:`create_session` (a group, by a user) with its ``members`` event as ``seq`` 1.

        Fires with ``(session_id, members, stored)``: the event's
        :class:`Stored` (``{"added": members}`` from the creator, to every
        other member), None for a ``p2p:`` session (its members never
        change, and it exists implicitly). One transaction.
        """
        try:
            session_id, kind, everyone = check_new_session(creator, members, session_id, "group",
                                                             self.max_group_size)
        except StoreError as e:
            return defer.fail(e)
        rows = [(session_id, u, "owner" if u == creator else "member") for u in everyone]
        ts = ts_ms if ts_ms is not None else int(self.clock.seconds() * 1000)
        cmid = client_msg_id or f"members:{uuid_hex()}"

        async def create(cursor: Any) -> tuple:
            created = await self._insert_session(cursor, session_id, kind, rows)
            if not created:
                raise StoreError("conflict", f"session {session_id} exists")
            if kind == "p2p":
                return session_id, everyone, None
            recipients = [u for u in everyone if u != creator]
            body = {"added": everyone, "removed": []}
            await cursor.execute(
                "WITH upd AS (UPDATE session SET last_seq = 1 WHERE id = %s RETURNING id), "
                "ins AS (INSERT INTO messagerecv (session_id, seq, sender_id, client_msg_id, body, created_at, kind) "
                "VALUES (%s, 1, %s, %s, %s::jsonb, timestamptz 'epoch' + %s::bigint * interval '1 millisecond', "
                "'members') RETURNING id), "
                "snd AS (INSERT INTO messagesend (user_id, msg_id, session_id, seq) "
                "SELECT u, ins.id, %s, 1 FROM ins, unnest(%s::text[]) u RETURNING 1) SELECT id FROM ins",
                (session_id, session_id, creator, cmid, storable_json(body), ts, session_id, recipients))
            msg_id = cursor.fetchone()[0]
            return session_id, everyone, Stored(str(msg_id), session_id, 1, ts, creator, cmid, body, recipients,
                                                kind=MEMBERS)

        # not idempotent: run again after a lost commit it would report a conflict with itself
        return self.db.run_interaction(create, idempotent=False)

    @_store_errors
    def mark_delivered_receipts(self, acks: Iterable[tuple[str, Iterable[Any]]]) -> defer.Deferred:
        """:meth:`mark_delivered`, also saying which rows of ``p2p:`` sessions became delivered.

        Fires with ``(count, receipts)``: ``receipts`` is
        ``[{"sessionId", "userId" (who acknowledged), "msgIds"}]`` for the
        1:1 sessions' rows that this statement moved to ``delivered`` (the
        senders' ``delivery_receipt``, PROTOCOL.md 1.1). Same single UPDATE
        (same lock order) as :meth:`mark_delivered`, with its rows counted
        and the 1:1 ones returned in one answer.
        """
        users, ids = sorted_pairs((user, msg_id) for user, msg_ids in acks for msg_id in msg_ids)
        if not users:
            return defer.succeed((0, []))
        d = self.db.run_query(
            "WITH u AS (UPDATE messagesend m SET status = 'delivered', updated_at = now() "
            "FROM unnest(%s::text[], %s::bigint[]) AS a(user_id, msg_id) "
            "WHERE m.user_id = a.user_id AND m.msg_id = a.msg_id AND m.status <> 'delivered' "
            "RETURNING m.user_id, m.msg_id, m.session_id, m.seq) "
            "SELECT (SELECT count(*) FROM u), (SELECT json_agg(json_build_array(session_id, user_id, msg_id::text) "
            "ORDER BY session_id, seq) FROM u WHERE session_id LIKE 'p2p:%%')", (users, ids), idempotent=True)

        def shape(rows: list) -> tuple[int, list[dict]]:
            count, found = rows[0]
            receipts: dict[tuple[str, str], list[str]] = {}
            for sid, user, msg_id in found or ():
                receipts.setdefault((sid, user), []).append(msg_id)
            return count, [{"sessionId": sid, "userId": user, "msgIds": ids}
                           for (sid, user), ids in receipts.items()]

        return d.addCallback(shape)

    @_store_errors
    def read_cursors(self, session_id: str) -> defer.Deferred:
        """Every member's read cursor: ``[{"userId", "seq"}]`` by user id (GET /v1/sessions/{id}/read).

        A ``p2p:`` session not created yet: both users at 0. :class:`StoreError` ``no_session``.
        """
        if not valid_session_id(session_id):
            return defer.fail(StoreError("no_session", "no such session"))

        def shape(rows: list) -> list[dict]:
            if not rows:
                pair = parse_p2p(session_id)
                if pair is None:
                    raise StoreError("no_session", "no such session")
                return [{"userId": u, "seq": 0} for u in pair]
            return [{"userId": u, "seq": seq} for u, seq in rows if u is not None]

        return self.reader.run_query(
            "SELECT m.user_id, m.read_seq FROM session s LEFT JOIN session_member m ON m.session_id = s.id "
            'WHERE s.id = %s ORDER BY m.user_id COLLATE "C"', (session_id,)).addCallback(shape)


def uuid_hex() -> str:
    import uuid
    return uuid.uuid4().hex

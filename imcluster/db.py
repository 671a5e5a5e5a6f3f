"""PostgreSQL access for imcluster: a reconnecting txpostgres pool and the migrations.

:class:`PostgresService` keeps ``pool_size`` asynchronous connections
(txpostgres, no threads). txpostgres' own ``ConnectionPool`` never
reconnects and hands out dead connections as readily as live ones, so the
pool here is our own, built on txpostgres' ``Connection`` and its
``DeadConnectionDetector``:

- each connection has a detector; when a query fails because the server
  went away (or the socket closes while idle), the connection leaves the pool
  and is re-established in the background with capped exponential backoff;
- work only ever goes to a live connection; while none is live it waits, up
  to ``connect_timeout`` seconds, then fails with :class:`DatabaseUnavailable`;
- work that never reached the server (``ConnectionDead``) is always re-run;
  work in flight when the connection died is re-run only when the caller says
  it is idempotent (its outcome is unknown); a transaction that PostgreSQL
  rolled back for a serialization failure or a deadlock is re-run too;
- every connection sets ``search_path`` to the configured schema, so that
  all SQL names its tables unqualified and tests can use a private schema.

Migrations (``imcluster/migrations/NNNN_name.sql``) are applied by
:func:`apply_migrations` (on a running service, for ``improcessor
--migrate``) or :func:`apply_migrations_sync` (plain psycopg2, for
``imcluster migrate``); both run the one step function
:func:`_migrate_step`, so there is a single implementation.
"""

from __future__ import annotations

import collections
import inspect
import random
import re
import zlib
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Callable, Iterable, Sequence

import psycopg2
import psycopg2.extensions
from twisted.application import service
from twisted.internet import defer, error as ierror
from twisted.logger import Logger
from twisted.python.failure import Failure
from txpostgres import reconnection, txpostgres

from imcluster import metrics

#: Work was sent to a connection already known to be dead (never reached the server).
ConnectionDead = reconnection.ConnectionDead
#: Rolling back after an error failed: the connection is unusable.
RollbackFailed = txpostgres.RollbackFailed

_SCHEMA_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

# libpq settings applied unless the DSN gives its own: detect a peer that
# vanished (no FIN/RST) in under a minute instead of the kernel's 2 hours
_DEFAULT_CONN_PARAMS = {
    "keepalives": "1",
    "keepalives_idle": "30",
    "keepalives_interval": "10",
    "keepalives_count": "3",
}


class DatabaseUnavailable(Exception):
    """PostgreSQL could not run the work: no live connection within the timeout,
    the service is stopped, or the connection died mid-work (when the work is
    not idempotent its outcome is unknown). Safe to retry later."""


class MigrationError(Exception):
    """A migration file could not be read or applied; the message names it."""


def check_schema(schema: str) -> str:
    """``schema`` if it is a plain lower-case SQL identifier (safe to quote with ``"``), else ValueError."""
    if not isinstance(schema, str) or not _SCHEMA_RE.match(schema):
        raise ValueError(f"PostgreSQL schema must be a lower-case SQL identifier, got {schema!r}")
    return schema


def parse_dsn(dsn: str) -> dict[str, str]:
    """libpq's view of ``dsn`` (URL or ``key=value``); ValueError when libpq rejects it."""
    try:
        return psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.ProgrammingError as e:
        # libpq's message names the offending part, never the password
        raise ValueError(f"invalid PostgreSQL DSN: {str(e).strip()}") from None


def describe_dsn(dsn: str) -> str:
    """``user@host:port/dbname`` of ``dsn``, for logs and errors (never the password)."""
    try:
        p = parse_dsn(dsn)
    except ValueError:
        return "<invalid DSN>"
    host = p.get("host") or p.get("hostaddr") or "local socket"
    port = p.get("port") or "5432"
    user = p.get("user")
    return f"{user + '@' if user else ''}{host}:{port}/{p.get('dbname') or user or ''}"


def mogrify_rows(cursor: Any, template: str, rows: Iterable[Sequence[Any]]) -> str:
    """``(..),(..)`` for a multi-row ``INSERT ... VALUES`` (executemany does not work in async mode).

    ``template`` is one row's placeholders, e.g. ``"(%s, %s, %s::jsonb)"``;
    ``cursor`` is the txpostgres cursor of an interaction (or any psycopg2
    cursor): quoting follows its connection's encoding and settings.
    """
    return ",".join(cursor.mogrify(template, tuple(row)).decode("utf-8") for row in rows)


def _is_death(failure: Failure, raw: Any) -> bool:
    """True when ``failure`` means the connection ``raw`` (psycopg2) is gone."""
    if failure.check(psycopg2.InterfaceError, RollbackFailed, ierror.ConnectionDone, ierror.ConnectionLost):
        return True
    if failure.check(psycopg2.OperationalError):
        # OperationalError also covers statement timeouts, lock timeouts,
        # serialization failures and deadlocks, which leave the connection
        # fine: only a closed one (psycopg2 marks it when libpq reports the
        # link broken), a connection exception (class 08) or a shutdown
        # (57P0x) means it is dead
        if raw is None or raw.closed:
            return True
        code = getattr(failure.value, "pgcode", None) or ""
        return code.startswith("08") or code.startswith("57P")
    return False


class _Detector(reconnection.DeadConnectionDetector):
    """txpostgres' detector, with reconnection handed to the owning service.

    The stock one reconnects on its own timer that nothing can stop, and
    treats every OperationalError as death.
    """

    def __init__(self, slot: "_Slot") -> None:
        super().__init__(deathChecker=lambda f: _is_death(f, slot.raw()), reactor=slot.owner._reactor)
        self.slot = slot

    def startReconnecting(self, f: Failure) -> None:  # noqa: N802 (txpostgres API)
        self.slot.owner._connection_died(self.slot, f)


class _Cursor(txpostgres.Cursor):
    """txpostgres' Cursor, minus its translation of QueryCanceledError into
    CancelledError: we never cancel a query ourselves, so a cancelled one
    was cancelled by the server (``statement_timeout``) and callers get
    psycopg2's ``QueryCanceled``, like every other SQL error."""

    def _handleCancellation(self, f: Failure) -> Failure:  # noqa: N802 (txpostgres API)
        return f


class _Connection(txpostgres.Connection):
    """txpostgres' Connection, quieter about a server that went away.

    A connection sits in the reactor as a reader (for NOTIFY); when the
    server closes it while idle, ``poll()`` raises in ``doRead`` and the
    reactor logs an "Unhandled Error" traceback before calling
    ``connectionLost``. Returning the error instead gives the same
    ``connectionLost`` (so the detector sees the death) without the
    traceback; the service logs one line.
    """

    cursorFactory = _Cursor

    def doRead(self):  # noqa: N802 (Twisted API)
        try:
            return super().doRead()
        except psycopg2.Error as e:
            return e

    def _runInteraction(self, interaction, *args, **kwargs):  # noqa: N802 (txpostgres API)
        # as txpostgres', but BEGIN (and, when the interaction asks, COMMIT)
        # travel with its statements (_TxCursor), and minus the traceback it
        # logs when ROLLBACK fails (which only happens on a dead connection,
        # reported by the service)
        c = _TxCursor(self.cursor())
        d = defer.maybeDeferred(interaction, c, *args, **kwargs)

        def commit(ret: Any) -> Any:
            if not c.begun or c.committed:
                return ret
            return c.raw.execute("commit").addCallback(lambda _: ret)

        def rollback(f: Failure) -> Any:
            if not c.begun:
                return f
            e = defer.maybeDeferred(c.raw.execute, "rollback")
            e.addErrback(lambda _: defer.fail(RollbackFailed(self, f)))
            return e.addCallback(lambda _: f)

        return d.addCallback(commit).addErrback(rollback)


class _TxCursor:
    """The cursor an interaction gets: one round trip fewer at each end.

    BEGIN is sent in front of the interaction's first statement, and
    ``execute(sql, params, commit=True)`` sends COMMIT right after its
    statement; an interaction that ran no statement sends neither. On this
    machine a round trip to PostgreSQL costs ~1 ms under load, a large part
    of a short transaction. PostgreSQL runs a string of statements in
    order and stops at the first error, which leaves the transaction
    aborted: the ROLLBACK that follows an error is unchanged. A statement
    sent with COMMIT yields no rows (psycopg2 keeps the last statement's).
    Everything else is the txpostgres cursor's (``fetchall``, ``mogrify``).
    """

    def __init__(self, cursor: Any) -> None:
        self.raw = cursor
        self.begun = False
        self.committed = False

    def execute(self, sql: str | bytes, params: Any = None, commit: bool = False) -> defer.Deferred:
        if self.committed:
            return defer.fail(RuntimeError("statement after COMMIT in one interaction"))
        text = isinstance(sql, str)
        if not self.begun:
            self.begun = True
            sql = ("BEGIN; " if text else b"BEGIN; ") + sql
        if commit:
            # on a line of its own: the statement may end in a -- comment
            sql = sql + ("\n; COMMIT" if text else b"\n; COMMIT")

        def done(_: Any) -> "_TxCursor":
            if commit:
                self.committed = True
            return self

        return self.raw.execute(sql, params).addCallback(done)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)


class _Slot:
    """One pooled connection and its state."""

    def __init__(self, owner: "PostgresService", index: int) -> None:
        self.owner = owner
        self.index = index
        self.detector = _Detector(self)
        self.detector.connectionIsDead = True  # until the first connect succeeds
        self.conn = _Connection(reactor=owner._reactor, detector=self.detector)
        self.busy = False
        self.reconnect_pending = False  # died while busy: reconnect on release
        self.ever_connected = False
        self.failures = 0  # failed connection attempts in a row
        self.timer: Any = None  # the next connection attempt
        self.attempt: defer.Deferred | None = None

    def raw(self) -> Any:
        return self.conn._connection

    @property
    def live(self) -> bool:
        raw = self.raw()
        return not self.detector.connectionIsDead and raw is not None and not raw.closed

    def close(self) -> None:
        if self.raw() is None:
            return
        try:
            self.conn.close()
        except Exception:
            pass  # closing a connection the server already dropped


class PostgresService(service.Service):
    """A reconnecting pool of asynchronous PostgreSQL connections (see the module docstring).

    ``dsn`` is a libpq URL or ``key=value`` string (password included);
    ``schema`` becomes every connection's ``search_path``;
    ``connect_timeout`` bounds a connection attempt and how long work waits
    for a live connection; ``max_attempts`` bounds how often one piece of
    work runs after a rolled-back transaction, and (plus ``pool_size``, as
    every pooled connection may have died at once) after lost connections.
    ``application_name`` is shown in ``pg_stat_activity``.
    ``statement_timeout`` (seconds) is every connection's ``statement_timeout``:
    the server cancels a statement that runs longer (None: the server's setting).
    """

    log = Logger()

    #: reconnection backoff (seconds): first retry, growth, ceiling
    reconnect_initial_delay = 0.2
    reconnect_factor = 2.0
    reconnect_max_delay = 5.0
    #: a failed connection attempt is logged the first time and then every n-th time
    log_every = 10

    def __init__(self, dsn: str, schema: str = "public", pool_size: int = 4,
                 connect_timeout: float = 10.0, clock: Any = None, name: str = "postgres",
                 application_name: str = "imcluster", max_attempts: int = 3,
                 statement_timeout: float | None = None) -> None:
        parse_dsn(dsn)  # a malformed DSN is a configuration error: fail now, not in a retry loop
        self.dsn = dsn
        self.schema = check_schema(schema)
        if pool_size < 1:
            raise ValueError(f"pool_size must be at least 1, got {pool_size}")
        self.pool_size = pool_size
        self.timeout = connect_timeout
        self.max_attempts = max(1, max_attempts)
        self.application_name = application_name
        self.statement_timeout = statement_timeout
        from twisted.internet import reactor
        self._reactor = reactor  # txpostgres watches sockets on the real reactor
        self._clock = clock if clock is not None else reactor
        self.setName(name)
        self.where = describe_dsn(dsn)
        self.reconnects = 0
        self._slots: list[_Slot] = []
        self._idle: collections.deque[_Slot] = collections.deque()
        self._waiters: collections.deque[defer.Deferred] = collections.deque()
        self._first: defer.Deferred | None = None
        self._drained: defer.Deferred | None = None

    @classmethod
    def from_config(cls, config: Any, **kw: Any) -> "PostgresService":
        """Build from a Config (``postgres`` + ``postgres_password``, ``postgres_schema``,
        ``postgres_pool_size``, ``postgres_timeout``)."""
        from imcluster.config import postgres_dsn

        kw.setdefault("pool_size", config.values.get("postgres_pool_size", 4))
        kw.setdefault("application_name", f"imcluster-{config.daemon}")
        kw.setdefault("statement_timeout", config.values.get("postgres_statement_timeout"))
        dsn = kw.pop("dsn", None) or postgres_dsn(config)
        return cls(dsn, schema=config.postgres_schema, connect_timeout=config.postgres_timeout, **kw)

    # --- state

    @property
    def connected(self) -> bool:
        """True while at least one connection is live."""
        return any(s.live for s in self._slots)

    def live_connections(self) -> int:
        """How many pooled connections are live now."""
        return sum(1 for s in self._slots if s.live)

    # --- lifecycle

    def startService(self):  # noqa: N802 (Twisted API)
        """Start connecting; fires once one connection is up, or after ``connect_timeout`` (logged).

        It never fails when PostgreSQL is down: connections keep being
        retried with backoff, and work fails with DatabaseUnavailable within
        ``connect_timeout`` until one is up.
        """
        super().startService()
        self.log.info("PostgreSQL {where} schema {schema}: opening {n} connections",
                      where=self.where, schema=self.schema, n=self.pool_size)
        self._first = defer.Deferred()
        self._slots = [_Slot(self, i) for i in range(self.pool_size)]
        for slot in self._slots:
            self._schedule_attempt(slot, 0)
        first = self._first
        timer = self._clock.callLater(self.timeout, lambda: first.called or first.callback(False))

        def started(ok: bool) -> None:
            if timer.active():
                timer.cancel()
            if not ok and self.running:
                self.log.warn("PostgreSQL {where} not reachable within {t}s; still retrying in the background",
                              where=self.where, t=self.timeout)

        return first.addCallback(started)

    def stopService(self):  # noqa: N802
        """Stop: fail waiting work, let busy connections finish (at most ``connect_timeout``), close all."""
        super().stopService()
        if self._first is not None and not self._first.called:
            self._first.callback(True)
        waiters, self._waiters = self._waiters, collections.deque()
        for w in waiters:
            if not w.called:
                w.errback(DatabaseUnavailable("PostgreSQL service stopped"))
        for slot in self._slots:
            if slot.timer is not None and slot.timer.active():
                slot.timer.cancel()
            slot.timer = None
            if slot.attempt is not None:
                slot.close()  # aborts the attempt in progress
        busy = [s for s in self._slots if s.busy]
        if not busy:
            self._close_all()
            return defer.succeed(None)
        drained = self._drained = defer.Deferred()
        timer = self._clock.callLater(self.timeout, lambda: drained.called or drained.callback(None))

        def close(_: Any) -> None:
            if timer.active():
                timer.cancel()
            self._close_all()

        return drained.addCallback(close)

    def _close_all(self) -> None:
        self._idle.clear()
        for slot in self._slots:
            slot.close()
        self.log.info("PostgreSQL {where}: connections closed", where=self.where)

    # --- connecting

    def _schedule_attempt(self, slot: _Slot, delay: float) -> None:
        if not self.running or slot.timer is not None or slot.attempt is not None:
            return
        slot.timer = self._clock.callLater(delay, self._attempt, slot)

    def _next_delay(self, slot: _Slot) -> float:
        base = self.reconnect_initial_delay * self.reconnect_factor ** max(0, slot.failures - 1)
        delay = min(self.reconnect_max_delay, base)
        return delay * (0.75 + random.random() / 2)  # jitter: slots and daemons do not retry in lockstep

    def _attempt(self, slot: _Slot) -> None:
        slot.timer = None
        if not self.running:
            return
        slot.close()
        d = slot.attempt = self._connect(slot)

        def done(result: Any) -> None:
            slot.attempt = None
            if not self.running:
                slot.close()
                return
            if isinstance(result, Failure):
                slot.failures += 1
                slot.close()
                delay = self._next_delay(slot)
                if slot.failures == 1 or slot.failures % self.log_every == 0:
                    self.log.warn(
                        "PostgreSQL {where} connection {index}: attempt {n} failed ({err}); retrying in {delay:.1f}s",
                        where=self.where, index=slot.index, n=slot.failures, delay=delay,
                        err=_one_line(result.value))
                self._schedule_attempt(slot, delay)
                return
            self._connected(slot)

        d.addBoth(done)

    def _connect(self, slot: _Slot) -> defer.Deferred:
        """Open ``slot``'s connection and set its ``search_path``, within ``connect_timeout``."""
        params = {k: v for k, v in _DEFAULT_CONN_PARAMS.items() if k not in parse_dsn(self.dsn)}
        params["application_name"] = self.application_name
        d = slot.conn.connect(self.dsn, **params)
        timed_out = []

        def on_timeout() -> None:
            timed_out.append(True)
            slot.close()  # errbacks the pending poll

        timer = self._clock.callLater(self.timeout, on_timeout)

        def set_path(_: Any) -> defer.Deferred:
            # straight on the cursor: the detector still says "dead" until we are done
            # no JIT: it compiles a query whose ESTIMATED cost is high, and an
            # estimate from stale statistics (a table that grew since the last
            # ANALYZE) made a 1 ms statement of the store take 140 ms of
            # compiling, on every window; OLTP statements never win it back
            sql = f'SET search_path TO "{self.schema}"; SET jit = off'
            if self.statement_timeout:
                # a statement stuck on a lock or a slow server is cancelled (QueryCanceled), not waited on for ever
                sql += f"; SET statement_timeout = {max(1, int(self.statement_timeout * 1000))}"
            return slot.conn.cursor().execute(sql)

        def finish(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            if timed_out and isinstance(result, Failure):
                raise TimeoutError(f"no connection within {self.timeout:g}s")
            return result

        return d.addCallback(set_path).addBoth(finish)

    def _connected(self, slot: _Slot) -> None:
        attempts, slot.failures = slot.failures, 0
        slot.detector.connectionIsDead = False
        if slot.ever_connected:
            self.reconnects += 1
            metrics.RECONNECTS.labels(service=self.name).inc()
            self.log.info("PostgreSQL {where} connection {index} re-established ({n} reconnects)",
                          where=self.where, index=slot.index, n=self.reconnects)
        elif attempts:
            self.log.info("PostgreSQL {where} connection {index} up after {attempts} failed attempts",
                          where=self.where, index=slot.index, attempts=attempts)
        slot.ever_connected = True
        self._hand_over(slot)
        if self._first is not None and not self._first.called:
            self._first.callback(True)

    def _connection_died(self, slot: _Slot, f: Failure | None) -> None:
        """The detector saw ``slot`` die (it has set ``connectionIsDead``)."""
        slot.detector.connectionIsDead = True
        if slot in self._idle:
            self._idle.remove(slot)
        if not self.running:
            return
        self.log.warn("PostgreSQL {where} connection {index} lost ({err}); reconnecting",
                      where=self.where, index=slot.index, err=_one_line(f.value) if f else "closed")
        if slot.busy:
            slot.reconnect_pending = True  # let the work in progress unwind first
        else:
            self._schedule_attempt(slot, 0)

    # --- handing out connections

    def _hand_over(self, slot: _Slot) -> None:
        """``slot`` is free and live: give it to the oldest waiter, else make it idle."""
        while self._waiters:
            w = self._waiters.popleft()
            if not w.called:
                slot.busy = True
                w.callback(slot)
                return
        self._idle.append(slot)

    def _acquire(self, deadline: float, what: str) -> defer.Deferred:
        if not self.running:
            return defer.fail(DatabaseUnavailable(f"PostgreSQL {what}: service not running"))
        while self._idle:
            slot = self._idle.popleft()
            if slot.live:
                slot.busy = True
                return defer.succeed(slot)
            # closed behind the detector's back: treat as dead
            slot.detector.checkForDeadConnection(Failure(ierror.ConnectionDone("connection closed")))
            self._schedule_attempt(slot, 0)
        remaining = deadline - self._clock.seconds()
        if remaining <= 0:
            return defer.fail(self._unavailable(what))

        def cancel(d: defer.Deferred) -> None:
            if d in self._waiters:
                self._waiters.remove(d)

        waiter = defer.Deferred(cancel)
        self._waiters.append(waiter)
        timer = self._clock.callLater(remaining, lambda: waiter.called or (
            cancel(waiter), waiter.errback(self._unavailable(what))))

        def got(slot: _Slot) -> _Slot:
            if timer.active():
                timer.cancel()
            return slot

        def failed(f: Failure) -> Failure:
            if timer.active():
                timer.cancel()
            return f

        return waiter.addCallbacks(got, failed)

    def _unavailable(self, what: str) -> DatabaseUnavailable:
        return DatabaseUnavailable(
            f"PostgreSQL {what}: no live connection to {self.where} within {self.timeout:g}s")

    def _release(self, slot: _Slot) -> None:
        slot.busy = False
        if not self.running:
            if self._drained is not None and not self._drained.called and not any(s.busy for s in self._slots):
                self._drained.callback(None)
            return
        if slot.reconnect_pending or not slot.live:
            slot.reconnect_pending = False
            if not slot.detector.connectionIsDead:
                slot.detector.checkForDeadConnection(Failure(ierror.ConnectionDone("connection closed")))
            self._schedule_attempt(slot, 0)
            return
        self._hand_over(slot)

    # --- running work

    async def _run(self, what: str, call: Callable[[_Slot], defer.Deferred], idempotent: bool) -> Any:
        deadline = self._clock.seconds() + self.timeout
        attempt = 0
        while True:
            attempt += 1
            slot = await self._acquire(deadline, what)
            try:
                return await call(slot)
            except ConnectionDead:
                # never reached the server: always safe to run elsewhere
                continue
            except Exception as e:
                f = Failure()
                if isinstance(e, RollbackFailed):
                    e = e.originalFailure.value
                if _is_death(f, slot.raw()):
                    if not idempotent:
                        raise DatabaseUnavailable(
                            f"PostgreSQL {what}: connection lost mid-work, outcome unknown "
                            f"({_one_line(e)})") from e
                    # a server restart kills every pooled connection, and the
                    # idle ones may not have noticed yet: each may cost one try
                    if attempt >= self.max_attempts + self.pool_size:
                        raise DatabaseUnavailable(
                            f"PostgreSQL {what}: connection lost {attempt} times ({_one_line(e)})") from e
                    self.log.info("PostgreSQL {what}: connection lost mid-work; running it again",
                                  what=what)
                    continue
                if isinstance(e, psycopg2.extensions.TransactionRollbackError) and attempt < self.max_attempts:
                    # serialization failure or deadlock: PostgreSQL rolled it all back
                    # (a whole interaction, or the one statement of a query)
                    self.log.info("PostgreSQL {what}: {err}; running it again", what=what, err=_one_line(e))
                    await _sleep(self._clock, random.random() * 0.05 * attempt)
                    continue
                raise e
            finally:
                self._release(slot)

    def run_query(self, sql: str, params: Any = None, idempotent: bool = True) -> defer.Deferred:
        """Run one statement (autocommit); fires with its rows (list of tuples).

        ``idempotent=False``: not re-run when the connection dies in flight
        (fails with DatabaseUnavailable instead).
        """
        return defer.Deferred.fromCoroutine(self._run(
            _what(sql), lambda slot: slot.detector.callChecking(_fetch_all, slot.conn, sql, params),
            idempotent))

    def run_operation(self, sql: str, params: Any = None, idempotent: bool = True) -> defer.Deferred:
        """Run one statement (autocommit); fires with its row count."""
        return defer.Deferred.fromCoroutine(self._run(
            _what(sql), lambda slot: slot.detector.callChecking(_row_count, slot.conn, sql, params),
            idempotent))

    def run_interaction(self, fn: Callable[..., Any], *args: Any, idempotent: bool = True) -> defer.Deferred:
        """Run ``fn(cursor, *args)`` in one transaction; fires with what ``fn`` returns.

        ``fn`` may return a Deferred or be a coroutine function; the
        cursor's ``execute`` returns a Deferred. BEGIN before, COMMIT after,
        ROLLBACK (and the error) when ``fn`` fails. When the connection dies,
        the whole interaction runs again on another connection only if
        ``idempotent`` (it may have committed); a serialization failure or a
        deadlock always runs it again (PostgreSQL rolled it back), so ``fn``
        must not have effects outside the database.
        """
        what = getattr(fn, "__name__", "interaction")
        return defer.Deferred.fromCoroutine(self._run(
            what, lambda slot: slot.conn.runInteraction(_call_interaction, fn, args),
            idempotent))

    def mogrify(self, template: str, rows: Iterable[Sequence[Any]]) -> str:
        """:func:`mogrify_rows` on a live connection (prefer the interaction's cursor)."""
        for slot in self._slots:
            if slot.live:
                return mogrify_rows(slot.raw().cursor(), template, rows)
        raise DatabaseUnavailable(f"PostgreSQL mogrify: no live connection to {self.where}")

    def apply_migrations(self, migrations: Sequence["Migration"] | None = None) -> defer.Deferred:
        """:func:`apply_migrations` on this service."""
        return apply_migrations(self, migrations)


class ReadPool:
    """Reads a streaming replica may serve (``--postgres-replica``): history and the HTTP API's reads.

    ``run_query`` goes to the next replica, round robin, that has a live
    connection; when none has (no replica given, or all down), or the one
    chosen fails with :class:`DatabaseUnavailable`, it runs on the primary.
    A replica lags its primary by its replay delay (milliseconds on a local
    network), which reads of history and sessions tolerate; nothing that
    assigns seq, de-duplicates, syncs or writes comes here (ARCHITECTURE.md
    "Scale-out"): those keep using the primary's :class:`PostgresService`.
    """

    log = Logger()

    def __init__(self, primary: "PostgresService", replicas: Sequence["PostgresService"] = ()) -> None:
        self.primary = primary
        self.replicas = list(replicas)
        self._next = 0
        #: reads served by a replica, and by the primary instead of one (observability, tests)
        self.replica_reads = 0
        self.primary_reads = 0

    @classmethod
    def from_config(cls, config: Any, primary: "PostgresService") -> "ReadPool":
        """The pool of ``config.postgres_replica`` (services named ``postgres-replica-<n>``, not started)."""
        from imcluster.config import postgres_dsn

        replicas = [PostgresService.from_config(config, dsn=postgres_dsn(config, dsn),
                                                name=f"postgres-replica-{i}",
                                                application_name=f"imcluster-{config.daemon}-replica")
                    for i, dsn in enumerate(config.values.get("postgres_replica") or (), 1)]
        return cls(primary, replicas)

    def _pick(self) -> "PostgresService | None":
        n = len(self.replicas)
        for i in range(n):
            replica = self.replicas[(self._next + i) % n]
            if replica.connected:
                self._next = (self._next + i + 1) % n
                return replica
        return None

    def run_query(self, sql: str, params: Any = None, idempotent: bool = True) -> defer.Deferred:
        """:meth:`PostgresService.run_query` on a replica, else on the primary."""
        replica = self._pick()
        if replica is None:
            self.primary_reads += 1
            return self.primary.run_query(sql, params, idempotent)

        def fallback(f: Failure) -> Any:
            f.trap(DatabaseUnavailable)
            self.log.warn("PostgreSQL replica {where} failed a read ({err}); reading from the primary",
                          where=replica.where, err=f.getErrorMessage())
            self.replica_reads -= 1
            self.primary_reads += 1
            return self.primary.run_query(sql, params, idempotent)

        self.replica_reads += 1
        return replica.run_query(sql, params, idempotent).addErrback(fallback)


def _fetch_all(conn: txpostgres.Connection, sql: str, params: Any) -> defer.Deferred:
    return conn.cursor().execute(sql, params).addCallback(lambda c: c.fetchall())


def _row_count(conn: txpostgres.Connection, sql: str, params: Any) -> defer.Deferred:
    return conn.cursor().execute(sql, params).addCallback(lambda c: c.rowcount)


def _call_interaction(cursor: Any, fn: Callable[..., Any], args: tuple) -> Any:
    result = fn(cursor, *args)
    if inspect.iscoroutine(result):
        return defer.Deferred.fromCoroutine(result)
    return result


def _sleep(clock: Any, seconds: float) -> defer.Deferred:
    d = defer.Deferred()
    clock.callLater(seconds, d.callback, None)
    return d


def _what(sql: str) -> str:
    words = sql.split(None, 3)
    return " ".join(words[:2]) if words else "query"


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


# --- migrations --------------------------------------------------------------

_MIGRATION_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
#: advisory lock class (key 1) of migrations; key 2 is the schema's crc32
_LOCK_CLASS = 0x494D  # "IM"


@dataclass(frozen=True)
class Migration:
    """One migration file: ``<version>_<name>.sql``."""

    version: str
    name: str
    sql: str = field(repr=False)

    def __str__(self) -> str:
        return f"{self.version}_{self.name}"


def load_migrations() -> list[Migration]:
    """The migration files shipped in ``imcluster/migrations``, in version order."""
    folder = resources.files("imcluster").joinpath("migrations")
    found: dict[str, Migration] = {}
    for entry in folder.iterdir():
        m = _MIGRATION_RE.match(entry.name)
        if not m:
            continue
        version, name = m.groups()
        if version in found:
            raise MigrationError(f"two migrations with version {version}: {found[version]} and {entry.name}")
        found[version] = Migration(version, name, entry.read_text(encoding="utf-8"))
    return [found[v] for v in sorted(found)]


def _schema_key(schema: str) -> int:
    key = zlib.crc32(schema.encode("utf-8"))
    return key - (1 << 32) if key >= (1 << 31) else key  # pg_advisory_xact_lock takes int4


@defer.inlineCallbacks
def _migrate_step(cursor: Any, schema: str, migrations: Sequence[Migration]):
    """Inside one transaction: apply the first pending migration; fires with it, or None.

    The transaction-scoped advisory lock makes concurrent migrators of the
    same schema take turns; each re-reads ``schema_migrations`` under the
    lock, so none applies a migration twice. ``cursor.execute`` returns a
    Deferred (txpostgres, or the synchronous adapter of
    :func:`apply_migrations_sync`).
    """
    yield cursor.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_LOCK_CLASS, _schema_key(schema)))
    yield cursor.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,))
    if not cursor.fetchall():
        # only when missing: CREATE SCHEMA IF NOT EXISTS needs CREATE on the database even then
        yield cursor.execute(f'CREATE SCHEMA "{schema}"')
    yield cursor.execute(f'SET LOCAL search_path TO "{schema}"')
    yield cursor.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version text PRIMARY KEY,"
        " name text NOT NULL,"
        " applied_at timestamptz NOT NULL DEFAULT now())")
    yield cursor.execute("SELECT version FROM schema_migrations")
    applied = {row[0] for row in cursor.fetchall()}
    pending = [m for m in migrations if m.version not in applied]
    if not pending:
        return None
    migration = pending[0]
    try:
        yield cursor.execute(migration.sql)
    except psycopg2.Error as e:
        raise MigrationError(f"migration {migration} failed: {_one_line(e)}") from e
    yield cursor.execute("INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                         (migration.version, migration.name))
    return migration


_log = Logger(namespace="imcluster.db.migrations")


async def _apply(db: PostgresService, migrations: Sequence[Migration]) -> list[Migration]:
    applied: list[Migration] = []
    while True:
        # idempotent: a step that committed before its connection died finds
        # its migration recorded when run again
        m = await db.run_interaction(_migrate_step, db.schema, migrations, idempotent=True)
        if m is None:
            if not applied:
                _log.info("schema {schema}: no migration to apply", schema=db.schema)
            return applied
        _log.info("schema {schema}: applied migration {migration}", schema=db.schema, migration=str(m))
        applied.append(m)


def apply_migrations(db: PostgresService, migrations: Sequence[Migration] | None = None) -> defer.Deferred:
    """Apply pending migrations through a running :class:`PostgresService`; fires with those applied.

    Creates the schema and ``schema_migrations`` if missing; each migration
    runs in its own transaction and is recorded there. Idempotent, and safe
    against concurrent migrators (advisory lock per schema).
    """
    if migrations is None:
        migrations = load_migrations()
    return defer.Deferred.fromCoroutine(_apply(db, list(migrations)))


class _SyncCursor:
    """A psycopg2 cursor whose ``execute`` returns a fired Deferred, to run
    :func:`_migrate_step` synchronously (inlineCallbacks runs straight
    through already-fired Deferreds)."""

    def __init__(self, cursor: Any) -> None:
        self.raw = cursor

    def execute(self, sql: str, params: Any = None) -> defer.Deferred:
        try:
            self.raw.execute(sql, params)
        except Exception:
            return defer.fail()
        return defer.succeed(self)

    def fetchall(self) -> list:
        return self.raw.fetchall()


def _result_now(d: defer.Deferred) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    if not out:
        raise RuntimeError("migration step did not finish synchronously")
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def apply_migrations_sync(dsn: str, schema: str = "public", connect_timeout: float = 10.0,
                          migrations: Sequence[Migration] | None = None,
                          on_applied: Callable[[Migration], Any] | None = None) -> list[Migration]:
    """:func:`apply_migrations` with a plain blocking psycopg2 connection (``imcluster migrate``).

    Raises ValueError for a malformed DSN or schema, ``psycopg2.OperationalError``
    when PostgreSQL cannot be reached, :class:`MigrationError` when a
    migration fails. ``on_applied(migration)`` is called after each commit.
    """
    parse_dsn(dsn)
    check_schema(schema)
    if migrations is None:
        migrations = load_migrations()
    migrations = list(migrations)
    # libpq takes whole seconds; at least 1 (0 would mean "wait forever")
    conn = psycopg2.connect(dsn, connect_timeout=max(1, int(round(connect_timeout))),
                            application_name="imcluster-migrate")
    applied: list[Migration] = []
    try:
        conn.autocommit = True  # BEGIN/COMMIT are ours, one transaction per migration
        cursor = _SyncCursor(conn.cursor())
        while True:
            cursor.raw.execute("BEGIN")
            try:
                m = _result_now(_migrate_step(cursor, schema, migrations))
            except BaseException:
                if not conn.closed:
                    cursor.raw.execute("ROLLBACK")
                raise
            cursor.raw.execute("COMMIT")
            if m is None:
                return applied
            applied.append(m)
            if on_applied is not None:
                on_applied(m)
    finally:
        conn.close()

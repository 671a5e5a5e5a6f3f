"""The presence registry: gateways and their users' connections in Redis.

Key layout (ARCHITECTURE.md, after ``redis_prefix``):

``WSSERVER_<uuid>``
    string with a TTL: JSON ``{"ip","port","tcpPort","startedAt"}``; the
    gateway is alive while it exists.
``WSSERVERS``
    set of gateway uuids: the reaper's work list.
``UCIR##<userId>``
    hash: field ``<uuid>##<ip>##<port>`` (the connection's ``connId``) ->
    JSON ``{"device","authedAt","exp"}``.
``WSCONNS##<uuid>``
    set of ``<userId>##<ip>##<port>``: what a gateway (or the reaper) removes.

:class:`RedisService` talks to Redis with txredisapi over one connection that
is re-established after every loss. txredisapi lets a command sent while
disconnected wait forever, so every command here goes through
:meth:`RedisService.execute` / :meth:`RedisService.pipeline`, which fail with
:class:`TimeoutError` (naming the command) after ``redis_timeout`` seconds.
Several commands written in one go travel in one round trip (Redis
pipelining); operations that must be atomic are Lua scripts.

The scripts build ``UCIR##`` key names from ``WSCONNS##`` members, so they
need one Redis (or Sentinel), not Redis Cluster.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
from typing import Any, Callable, Iterable, Sequence
from urllib.parse import unquote, urlsplit

import txredisapi
from twisted.application import service
from twisted.application.internet import ClientService
from twisted.internet import defer, protocol
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from imcluster import metrics
from imcluster.envelope import SEP, conn_id, parse_conn_id
from imcluster.interfaces import IRegistry, Unavailable

#: txredisapi's ConnectionError (not the builtin one): what its protocol
#: fails a command with when the link drops
RedisConnectionError = txredisapi.ConnectionError


class RegistryUnavailable(RedisConnectionError, Unavailable):
    """The registry's "unavailable" error: Redis not connected, the link lost under a command,
    or the service stopped. A command that got no reply in time fails with
    ``TimeoutError`` instead. Still a :data:`RedisConnectionError`, so code
    that traps txredisapi's error keeps working.
    """

#: Redis answered with an error reply.
ResponseError = txredisapi.ResponseError


# --- key layout ------------------------------------------------------------


class RedisKeys:
    """Key names and members of ARCHITECTURE.md's layout, after ``prefix``.

    User ids never contain ``#`` (PROTOCOL.md charset) and neither do uuids
    or IP addresses (IPv6 uses ``:``), so ``##`` splits unambiguously.
    """

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix

    def server(self, uuid: str) -> str:
        """``<prefix>WSSERVER_<uuid>``."""
        return f"{self.prefix}WSSERVER_{uuid}"

    def servers(self) -> str:
        """``<prefix>WSSERVERS``."""
        return f"{self.prefix}WSSERVERS"

    def ucir(self, user_id: str) -> str:
        """``<prefix>UCIR##<userId>``."""
        return f"{self.prefix}UCIR{SEP}{user_id}"

    def ucir_prefix(self) -> str:
        """``<prefix>UCIR##`` (the scripts append the user id)."""
        return f"{self.prefix}UCIR{SEP}"

    def wsconns(self, uuid: str) -> str:
        """``<prefix>WSCONNS##<uuid>``."""
        return f"{self.prefix}WSCONNS{SEP}{uuid}"

    def revoked(self, user_id: str) -> str:
        """``<prefix>REVOKED##<userId>``: the user's latest revocation (``notBefore``, ms), docs/internals.rst."""
        return f"{self.prefix}REVOKED{SEP}{user_id}"

    @staticmethod
    def conn_field(uuid: str, ip: str, port: int | str) -> str:
        """``<uuid>##<ip>##<port>``: the ``UCIR`` hash field, also the client's ``connId``.

        The format is the daemons' (:func:`imcluster.envelope.conn_id`).
        """
        return conn_id(uuid, ip, port)

    @staticmethod
    def wsconns_member(user_id: str, ip: str, port: int | str) -> str:
        """``<userId>##<ip>##<port>``: the ``WSCONNS`` set member."""
        _check_part(user_id, "user id")
        _check_part(ip, "ip")
        return f"{user_id}{SEP}{ip}{SEP}{int(port)}"

    @staticmethod
    def parse_conn_field(field: str) -> tuple[str, str, int]:
        """``<uuid>##<ip>##<port>`` -> ``(uuid, ip, port)``; ValueError when malformed."""
        return parse_conn_id(field, "connection field")

    @staticmethod
    def parse_wsconns_member(member: str) -> tuple[str, str, int]:
        """``<userId>##<ip>##<port>`` -> ``(user_id, ip, port)``; ValueError when malformed."""
        # the same shape as a connId, with the user id in the uuid's place
        return parse_conn_id(member, "WSCONNS member")


def _check_part(value: str, what: str) -> None:
    if not value or "#" in value:
        raise ValueError(f"{what} must be non-empty and free of '#': {value!r}")


def server_info(ip: str, port: int, tcp_port: int, started_at: float) -> dict:
    """The JSON value of ``WSSERVER_<uuid>``."""
    return {"ip": ip, "port": port, "tcpPort": tcp_port, "startedAt": started_at}


def conn_meta(device: str | None, authed_at: float, exp: float) -> dict:
    """The JSON value of a ``UCIR`` field (times in seconds since the epoch; never the token)."""
    return {"device": device, "authedAt": authed_at, "exp": exp}


def dumps(value: Any) -> str:
    """Compact JSON as stored in Redis."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


# --- Lua scripts -------------------------------------------------------------


class Script:
    """A Lua script run with EVALSHA, falling back to EVAL when Redis lacks it."""

    def __init__(self, name: str, source: str) -> None:
        self.name = name
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


#: Refresh WSSERVER_<uuid>; re-create it (and the WSSERVERS member) if gone.
#: KEYS: server, servers; ARGV: json, ttl ms, uuid. Returns 1 if it existed.
REFRESH_SCRIPT = Script("refresh_server", """
local existed = redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2], 'XX')
if not existed then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
redis.call('SADD', KEYS[2], ARGV[3])
if existed then return 1 end
return 0
""")

#: HGETALL of every key: one command instead of a pipeline of HGETALLs
#: (same round trip, a quarter of the client's CPU for 1000 users, and a
#: consistent snapshot). KEYS: the UCIR keys. Returns one flat array per key.
HGETALL_MANY_SCRIPT = Script("hgetall_many", """
local out = {}
for i, key in ipairs(KEYS) do out[i] = redis.call('HGETALL', key) end
return out
""")

#: Connections and live gateways in one round trip (a processor window's lookup).
#: KEYS: UCIR hashes; ARGV: '<prefix>WSSERVER_', then gateway uuids to check
#: besides those of the connections found. Returns the HGETALL of every key,
#: then the uuids (of the connections' and of ARGV's gateways) whose
#: WSSERVER_ key exists.
ROUTES_SCRIPT = Script("routes", """
local out, seen, uuids = {}, {}, {}
for i, key in ipairs(KEYS) do
  local h = redis.call('HGETALL', key)
  out[i] = h
  for j = 1, #h, 2 do
    local sep = string.find(h[j], '##', 1, true)
    if sep and sep > 1 then
      local u = string.sub(h[j], 1, sep - 1)
      if not seen[u] then seen[u] = true; uuids[#uuids + 1] = u end
    end
  end
end
for i = 2, #ARGV do
  local u = ARGV[i]
  if not seen[u] then seen[u] = true; uuids[#uuids + 1] = u end
end
local alive = {}
for _, u in ipairs(uuids) do
  if redis.call('EXISTS', ARGV[1] .. u) == 1 then alive[#alive + 1] = u end
end
out[#KEYS + 1] = alive
return out
""")

#: Remove up to ARGV[3] connections of a gateway, only when its WSSERVER_ key
#: is gone (or unconditionally when ARGV[4] == '1'). Chunked so that a gateway
#: with 100k connections does not block Redis in one script.
#: KEYS: server, wsconns, servers; ARGV: uuid, '<prefix>UCIR##', batch, force.
#: Returns {state, removed, dropped}: state -1 alive (nothing done), 1 more
#: to do, 0 done; dropped is 1 when this call removed the WSSERVERS member.
REAP_SCRIPT = Script("reap_server", """
local force = ARGV[4] == '1'
if not force and redis.call('EXISTS', KEYS[1]) == 1 then return {-1, 0, 0} end
local members = redis.call('SPOP', KEYS[2], tonumber(ARGV[3]))
for _, m in ipairs(members) do
  local sep = string.find(m, '##', 1, true)
  if sep then
    redis.call('HDEL', ARGV[2] .. string.sub(m, 1, sep - 1), ARGV[1] .. string.sub(m, sep))
  end
end
if redis.call('EXISTS', KEYS[2]) == 1 then return {1, #members, 0} end
if force then redis.call('DEL', KEYS[1]) end
local dropped = redis.call('SREM', KEYS[3], ARGV[1])
return {0, #members, dropped}
""")


# --- the connection ------------------------------------------------------------


def _deferred(fn: Callable[..., defer.Deferred]) -> Callable[..., defer.Deferred]:
    """A bad argument fails the returned Deferred instead of raising (nothing is sent)."""

    def wrapper(*args: Any, **kw: Any) -> defer.Deferred:
        try:
            return fn(*args, **kw)
        except (ValueError, TypeError) as e:
            return defer.fail(e)

    return functools.wraps(fn)(wrapper)


class _ProtocolFactory(protocol.Factory):
    """Builds txredisapi protocols for our ClientService (no txredisapi pool)."""

    noisy = False
    isLazy = True  # txredisapi reads it when AUTH or SELECT fails

    def __init__(self, owner: "RedisService") -> None:
        self.owner = owner

    def buildProtocol(self, addr):  # noqa: N802 (Twisted API)
        o = self.owner
        p = txredisapi.RedisProtocol(
            charset="utf-8", password=o.password, dbid=o.dbid,
            convertNumbers=False, username=o.username)
        p.factory = self
        ready = p.whenConnected()
        ready.addCallback(o._connection_ready)

        def handshake_stuck() -> None:
            # AUTH / SELECT unanswered: txredisapi would wait forever
            if not ready.called and p.connected and p.transport is not None:
                o.log.warn("Redis {host}:{port} did not answer AUTH/SELECT within {t}s; reconnecting",
                           host=o.host, port=o.port, t=o.timeout)
                p.transport.abortConnection()

        timer = o._clock.callLater(o.timeout, handshake_stuck)
        ready.addCallback(lambda _: timer.active() and timer.cancel())
        p.whenDisconnected().addCallback(lambda _: timer.active() and timer.cancel())
        return p

    # txredisapi calls these when AUTH or SELECT fails: a configuration error,
    # which a retry will not cure but which the operator must see
    def stopTrying(self):  # noqa: N802
        pass

    def connectionError(self, why):  # noqa: N802
        self.owner.log.error("Redis refused the connection: {why}", why=why)


@implementer(IRegistry)
class RedisService(service.Service):
    """IRegistry on Redis, plus bounded-time access to Redis for other subsystems.

    ``url``: ``redis://[[user]:password@]host[:port][/db]`` (``rediss://`` for
    TLS). ``timeout`` bounds every command, including the wait for a
    connection. ``batch`` bounds the entries one reap script removes at once.
    """

    log = Logger()

    #: reconnection backoff (seconds): first retry, growth, ceiling
    reconnect_initial_delay = 0.5
    reconnect_factor = 2.0
    #: short: deliveries must heal within 10 s of Redis answering again (PROTOCOL.md)
    reconnect_max_delay = 2.0

    def __init__(self, url: str, prefix: str = "", timeout: float = 5.0,
                 password: str | None = None, clock: Any = None, name: str = "redis",
                 batch: int = 1000) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError(f"not a redis:// or rediss:// URL: {url!r}")
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 6379
        self.tls = parts.scheme == "rediss"
        self.username = unquote(parts.username) if parts.username else None
        self.password = password if password is not None else (
            unquote(parts.password) if parts.password else None)
        db = parts.path.strip("/")
        # db 0 is Redis' default: skip a SELECT round trip per connection
        self.dbid = int(db) if db and int(db) != 0 else None
        self.keys = RedisKeys(prefix)
        self.prefix = prefix
        self.timeout = timeout
        self.batch = batch
        if clock is None:
            from twisted.internet import reactor as clock
        self._clock = clock
        self.setName(name)
        self.reconnects = 0
        self._conn: txredisapi.RedisProtocol | None = None
        self._ever_connected = False
        self._waiters: list[defer.Deferred] = []
        self._listeners: list[Callable[[], Any]] = []
        self._client: ClientService | None = None

    @classmethod
    def from_config(cls, config: Any, **kw: Any) -> "RedisService":
        """Build from a Config (``redis``, ``redis_prefix``, ``redis_timeout``, ``redis_password``, ``redis_batch``)."""
        return cls(config.redis, prefix=config.redis_prefix, timeout=config.redis_timeout,
                   password=config.redis_password, batch=config.redis_batch, **kw)

    # --- lifecycle

    @property
    def connected(self) -> bool:
        """True while a ready connection to Redis is open."""
        return self._conn is not None

    def add_reconnect_listener(self, fn: Callable[[], Any]) -> None:
        """Call ``fn()`` after each re-established connection (not the first).

        Redis may have restarted and lost its data meanwhile: a gateway checks
        (``refresh_server``) and re-registers. ``fn`` may return a Deferred;
        its failures are logged.
        """
        self._listeners.append(fn)

    def startService(self):  # noqa: N802
        """Start connecting; fires once connected, or after ``timeout`` (logged) if Redis is down.

        It never fails: the connection keeps being retried, and commands fail
        within ``timeout`` until it is up.
        """
        super().startService()
        from twisted.internet import reactor
        endpoint = HostnameEndpoint(reactor, self.host, self.port, timeout=self.timeout)
        if self.tls:
            from twisted.internet.ssl import optionsForClientTLS
            endpoint = wrapClientTLS(optionsForClientTLS(self.host), endpoint)

        self._client = ClientService(endpoint, _ProtocolFactory(self), retryPolicy=self._retry_delay)
        self._client.startService()
        self.log.info("Redis {host}:{port} prefix {prefix!r}: connecting",
                      host=self.host, port=self.port, prefix=self.prefix)
        d = self._wait(self._connection(), "connect")

        def not_yet(f: Failure) -> None:
            self.log.warn("Redis {host}:{port} not reachable yet ({err}); retrying in the background",
                          host=self.host, port=self.port, err=f.getErrorMessage())

        return d.addCallbacks(lambda _: None, not_yet)

    def stopService(self):  # noqa: N802
        """Disconnect; fires within ``timeout`` even if the link hangs."""
        super().stopService()
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            w.errback(RegistryUnavailable("Redis service stopped"))
        client, self._client = self._client, None
        if client is None:
            return defer.succeed(None)
        conn = self._conn
        d = client.stopService()
        done = defer.Deferred()

        def give_up() -> None:
            self.log.warn("Redis connection did not close within {t}s; aborting it", t=self.timeout)
            if conn is not None and conn.transport is not None:
                conn.transport.abortConnection()
            if not done.called:
                done.callback(None)

        timer = self._clock.callLater(self.timeout, give_up)

        def stopped(result: Any) -> None:
            if timer.active():
                timer.cancel()
            if isinstance(result, Failure):
                self.log.failure("stopping the Redis connection failed", result)
            if not done.called:
                done.callback(None)

        d.addBoth(stopped)
        return done

    def _retry_delay(self, attempt: int) -> float:
        # Twisted's backoffPolicy starts at initial * factor: start at initial
        delay = min(self.reconnect_initial_delay * self.reconnect_factor ** min(attempt - 1, 30),
                    self.reconnect_max_delay)
        return delay * (1 + random.random() / 4)  # jitter: daemons do not reconnect in lockstep

    def _connection_ready(self, conn: txredisapi.RedisProtocol) -> None:
        # ready inside connectionMade: let ClientService finish its own
        # bookkeeping before user code runs on the connection
        from twisted.internet import reactor
        reactor.callLater(0, self._connection_usable, conn)

    def _connection_usable(self, conn: txredisapi.RedisProtocol) -> None:
        if not conn.connected or not self.running:
            if conn.connected:
                conn.transport.loseConnection()
            return
        self._conn = conn
        conn.whenDisconnected().addCallback(self._connection_lost)
        reconnect = self._ever_connected
        self._ever_connected = True
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            w.callback(conn)
        if not reconnect:
            self.log.info("Redis {host}:{port} connected", host=self.host, port=self.port)
            return
        self.reconnects += 1
        metrics.RECONNECTS.labels(service=self.name).inc()
        self.log.info("Redis {host}:{port} reconnected ({n} reconnects)",
                      host=self.host, port=self.port, n=self.reconnects)
        for fn in list(self._listeners):
            d = defer.maybeDeferred(fn)
            d.addErrback(lambda f, fn=fn: self.log.failure(
                "Redis reconnect listener {fn!r} failed", f, fn=fn))

    def _connection_lost(self, conn: txredisapi.RedisProtocol) -> None:
        if self._conn is conn:
            self._conn = None
            if self.running:
                self.log.warn("Redis {host}:{port} connection lost; reconnecting",
                              host=self.host, port=self.port)

    def _connection(self) -> defer.Deferred:
        """A Deferred firing with the ready connection (at once when there is one)."""
        if self._conn is not None and self._conn.connected:
            return defer.succeed(self._conn)
        if not self.running or self._client is None:
            return defer.fail(RegistryUnavailable("Redis service not running"))

        def cancel(d: defer.Deferred) -> None:
            # a timed-out caller stops waiting, so waiters stay bounded in an outage
            if d in self._waiters:
                self._waiters.remove(d)

        d = defer.Deferred(cancel)
        self._waiters.append(d)
        return d

    # --- bounded commands

    def _wait(self, d: defer.Deferred, what: str) -> defer.Deferred:
        return _bounded(d, self.timeout, self._clock, f"Redis {what}")

    def _run(self, what: str, send: Callable[[txredisapi.RedisProtocol], defer.Deferred]) -> defer.Deferred:
        """Get the connection, ``send(conn)`` the commands, all within ``timeout``.

        A caller that timed out while waiting for the connection never sends
        (no stale write lands later). Commands sent but unanswered within the
        timeout mean a broken link or a stuck server: the connection is
        aborted so that it is re-established.
        """
        state: dict[str, Any] = {"timed_out": False}
        result = defer.Deferred()
        waiting = self._connection()

        def on_conn(conn: txredisapi.RedisProtocol) -> Any:
            if state["timed_out"]:
                return None
            state["conn"] = conn
            sent = send(conn)
            state["sent"] = sent
            return sent

        def finish(r: Any) -> None:
            if state["timed_out"]:
                return None  # swallow the late outcome
            if timer.active():
                timer.cancel()
            if not isinstance(r, Failure):
                result.callback(r)
            elif r.check(RedisConnectionError):
                # txredisapi says "Lost connection": say which command
                result.errback(RegistryUnavailable(f"Redis {what}: {r.getErrorMessage()}"))
            else:
                result.errback(r)
            return None

        def timed_out() -> None:
            # clean up first, fail the caller last: it resumes in a consistent state
            state["timed_out"] = True
            sent, conn = state.get("sent"), state.get("conn")
            if sent is None:
                waiting.cancel()
            else:
                self.log.warn("Redis {what} unanswered for {t}s; dropping the connection",
                              what=what, t=self.timeout)
                sent.cancel()
                if conn.transport is not None:
                    conn.transport.abortConnection()
            result.errback(TimeoutError(f"Redis {what} got no reply within {self.timeout:g}s"
                                        + ("" if sent is not None else " (not connected)")))

        timer = self._clock.callLater(self.timeout, timed_out)
        waiting.addCallback(on_conn).addBoth(finish)
        return result

    def execute(self, command: str, *args: Any) -> defer.Deferred:
        """Run one Redis command; fails with TimeoutError naming it after ``timeout``.

        Replies as txredisapi gives them with ``convertNumbers=False``: bulk
        strings as str (bytes if not UTF-8), integers as int, arrays as lists.
        """
        return self._run(command.upper(), lambda c: c.execute_command(command, *args))

    def pipeline(self, commands: Sequence[Sequence[Any]]) -> defer.Deferred:
        """Run ``commands`` (each ``(COMMAND, *args)``) in one round trip.

        Fires with the list of replies in order; fails with the first
        command's error if any failed (the others still ran: this is a
        pipeline, not a transaction). An empty list fires ``[]`` at once.
        """
        commands = [tuple(c) for c in commands]
        if not commands:
            return defer.succeed([])
        names = sorted({str(c[0]).upper() for c in commands})
        what = f"pipeline of {len(commands)} ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})"
        return self._run(what, lambda conn: _send_all(conn, commands))

    def run_script(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> defer.Deferred:
        """EVALSHA ``script`` (EVAL when Redis does not know it yet), within ``timeout``."""

        def send(conn: txredisapi.RedisProtocol) -> defer.Deferred:
            d = conn.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)

            def noscript(f: Failure) -> Any:
                if f.check(ResponseError) and str(f.value).startswith("NOSCRIPT"):
                    return conn.execute_command("EVAL", script.source, len(keys), *keys, *args)
                return f

            return d.addErrback(noscript)

        return self._run(f"script {script.name}", send)

    # --- IRegistry

    @_deferred
    def register_server(self, uuid: str, info: dict, ttl: float) -> defer.Deferred:
        """SET ``WSSERVER_<uuid>`` (TTL ``ttl`` seconds) and SADD ``WSSERVERS``, one round trip."""
        k = self.keys
        d = self.pipeline([("SET", k.server(uuid), dumps(info), "PX", _ms(ttl)),
                           ("SADD", k.servers(), uuid)])
        return d.addCallback(lambda _: None)

    @_deferred
    def refresh_server(self, uuid: str, info: dict, ttl: float) -> defer.Deferred:
        """Refresh ``WSSERVER_<uuid>``; fires False when it was gone (Redis lost it) and was re-created."""
        k = self.keys
        d = self.run_script(REFRESH_SCRIPT, [k.server(uuid), k.servers()], [dumps(info), _ms(ttl), uuid])
        return d.addCallback(lambda r: bool(int(r)))

    @defer.inlineCallbacks
    def _remove_server(self, uuid: str, force: bool):
        k = self.keys
        keys = [k.server(uuid), k.wsconns(uuid), k.servers()]
        args = [uuid, k.ucir_prefix(), self.batch, "1" if force else "0"]
        removed = 0
        while True:
            state, n, dropped = yield self.run_script(REAP_SCRIPT, keys, args)
            removed += int(n)
            if int(state) != 1:
                return int(state), removed, bool(int(dropped))

    @_deferred
    def unregister_server(self, uuid: str) -> defer.Deferred:
        """Remove this gateway's UCIR fields, WSCONNS, WSSERVER_ key and WSSERVERS member.

        Fires with the number of connections removed.
        """
        return self._remove_server(uuid, True).addCallback(lambda r: r[1])

    @_deferred
    def reap_server(self, uuid: str) -> defer.Deferred:
        """Remove a dead gateway's entries, only if ``WSSERVER_<uuid>`` is gone.

        Each chunk of ``batch`` connections is one atomic script that first
        checks the key. Fires True only for the call that completed the reap
        (removed the uuid from WSSERVERS): of concurrent reapers, one.
        """
        d = self._remove_server(uuid, False)

        def done(r: tuple[int, int, bool]) -> bool:
            state, removed, dropped = r
            if dropped or removed:
                self.log.info("reaped gateway {uuid}: {n} connections", uuid=uuid, n=removed)
            return state == 0 and dropped

        return d.addCallback(done)

    @_deferred
    def add_connections(self, uuid: str, entries: Iterable[tuple]) -> defer.Deferred:
        """HSET each ``UCIR##<user>`` field and SADD ``WSCONNS##<uuid>``, one round trip.

        ``entries``: ``(user_id, ip, port, meta_dict)``.
        """
        k = self.keys
        per_user: dict[str, list[str]] = {}
        members: list[str] = []
        for user_id, ip, port, meta in entries:
            members.append(k.wsconns_member(user_id, ip, port))
            per_user.setdefault(user_id, []).extend((k.conn_field(uuid, ip, port), dumps(meta)))
        if not members:
            return defer.succeed(None)
        commands: list[tuple] = [("HSET", k.ucir(u), *fv) for u, fv in per_user.items()]
        commands.append(("SADD", k.wsconns(uuid), *members))
        return self.pipeline(commands).addCallback(lambda _: None)

    @_deferred
    def add_connections_checked(self, uuid: str, entries: Iterable[tuple]) -> defer.Deferred:
        """:meth:`add_connections`, reading each user's ``REVOKED##<user>`` in the same round trip.

        The auth of a connection needs no round trip of its own for the
        revocation check (HTTP-API.md revoke): the GETs go first in the
        registration pipeline. Fires with ``{user_id: notBefore ms or None}``.
        """
        k = self.keys
        per_user: dict[str, list[str]] = {}
        members: list[str] = []
        for user_id, ip, port, meta in entries:
            members.append(k.wsconns_member(user_id, ip, port))
            per_user.setdefault(user_id, []).extend((k.conn_field(uuid, ip, port), dumps(meta)))
        if not members:
            return defer.succeed({})
        users = list(per_user)
        commands: list[tuple] = [("GET", k.revoked(u)) for u in users]
        commands += [("HSET", k.ucir(u), *fv) for u, fv in per_user.items()]
        commands.append(("SADD", k.wsconns(uuid), *members))

        def revocations(replies: list) -> dict:
            return {u: _int_or_none(v) for u, v in zip(users, replies)}

        return self.pipeline(commands).addCallback(revocations)

    @_deferred
    def revoke(self, user_id: str, not_before_ms: int, ttl: float) -> defer.Deferred:
        """SET ``REVOKED##<user>`` to ``not_before_ms`` (kept ``ttl`` seconds) and read ``UCIR##<user>``, one round trip.

        Fires with the user's connections (``{conn_field: meta}``): a gateway
        registering a connection after this SET reads the revocation in its
        own pipeline; one that registered before is in this HGETALL.
        """
        k = self.keys
        d = self.pipeline([("SET", k.revoked(user_id), str(int(not_before_ms)), "PX", _ms(ttl)),
                           ("HGETALL", k.ucir(user_id))])
        return d.addCallback(lambda r: self._decode_hash(user_id, r[1]))

    def revocation(self, user_id: str) -> defer.Deferred:
        """The user's ``notBefore`` (ms) from ``REVOKED##<user>``, or None."""
        return self.execute("GET", self.keys.revoked(user_id)).addCallback(_int_or_none)

    @_deferred
    def remove_connections(self, uuid: str, entries: Iterable[tuple]) -> defer.Deferred:
        """HDEL each ``UCIR##<user>`` field and SREM ``WSCONNS##<uuid>``, one round trip.

        ``entries``: ``(user_id, ip, port)`` (extra items are ignored).
        """
        k = self.keys
        per_user: dict[str, list[str]] = {}
        members: list[str] = []
        for user_id, ip, port, *_ in entries:
            members.append(k.wsconns_member(user_id, ip, port))
            per_user.setdefault(user_id, []).append(k.conn_field(uuid, ip, port))
        if not members:
            return defer.succeed(None)
        commands: list[tuple] = [("HDEL", k.ucir(u), *f) for u, f in per_user.items()]
        commands.append(("SREM", k.wsconns(uuid), *members))
        return self.pipeline(commands).addCallback(lambda _: None)

    @_deferred
    def connections_of(self, user_ids: Iterable[str]) -> defer.Deferred:
        """``{user_id: {conn_field: meta}}`` for every user (``{}`` when offline), one round trip.

        One script runs HGETALL on every ``UCIR##<user>`` key.
        """
        users = list(dict.fromkeys(user_ids))
        if not users:
            return defer.succeed({})
        d = self.run_script(HGETALL_MANY_SCRIPT, [self.keys.ucir(u) for u in users], [])

        def decode(replies: list) -> dict:
            return {u: self._decode_hash(u, r) for u, r in zip(users, replies)}

        return d.addCallback(decode)

    def _decode_hash(self, user_id: str, flat: list) -> dict:
        out = {}
        for i in range(0, len(flat) - 1, 2):
            try:
                out[flat[i]] = json.loads(flat[i + 1])
            except (TypeError, ValueError):
                # an entry we did not write: still a connection, without meta
                self.log.warn("bad UCIR value for {user} {field}: {value!r}",
                              user=user_id, field=flat[i], value=flat[i + 1])
                out[flat[i]] = {}
        return out

    def servers(self) -> defer.Deferred:
        """The set of uuids in ``WSSERVERS``."""
        return self.execute("SMEMBERS", self.keys.servers()).addCallback(set)

    @_deferred
    def routes(self, user_ids: Iterable[str], uuids: Iterable[str] = ()) -> defer.Deferred:
        """``connections_of(user_ids)`` and ``alive`` of their gateways and ``uuids``, one round trip.

        Fires with ``({user_id: {conn_field: meta}}, {alive uuid, ...})``.
        """
        users = list(dict.fromkeys(user_ids))
        extra = list(dict.fromkeys(uuids))
        if not users and not extra:
            return defer.succeed(({}, set()))
        d = self.run_script(ROUTES_SCRIPT, [self.keys.ucir(u) for u in users],
                            [self.keys.server(""), *extra])

        def decode(replies: list) -> tuple[dict, set]:
            conns = {u: self._decode_hash(u, r) for u, r in zip(users, replies)}
            return conns, set(replies[len(users)])

        return d.addCallback(decode)

    def alive(self, uuids: Iterable[str]) -> defer.Deferred:
        """The set of ``uuids`` whose ``WSSERVER_<uuid>`` exists (one MGET)."""
        uuids = list(dict.fromkeys(uuids))
        if not uuids:
            return defer.succeed(set())
        d = self.execute("MGET", *[self.keys.server(u) for u in uuids])
        return d.addCallback(lambda values: {u for u, v in zip(uuids, values) if v is not None})


def _int_or_none(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def _ms(seconds: float) -> int:
    return max(1, int(round(seconds * 1000)))


def _send_all(conn: txredisapi.RedisProtocol, commands: list[tuple]) -> defer.Deferred:
    # written back to back in one reactor turn: Redis gets them in one packet
    # train and answers in order, i.e. one round trip
    ds: list[defer.Deferred] = []
    try:
        for c in commands:
            ds.append(conn.execute_command(*c))
    except Exception:
        # only possible before the first write (not connected, bad argument):
        # the replies already queued fail with the connection
        for d in ds:
            d.addErrback(lambda _: None)
        raise

    def collect(results: list) -> list:
        for ok, value in results:
            if not ok:
                return value  # the first failure
        return [value for _, value in results]

    return defer.DeferredList(ds, consumeErrors=True).addCallback(collect)


def _bounded(d: defer.Deferred, seconds: float, clock: Any, what: str) -> defer.Deferred:
    """``d``, failing with TimeoutError naming ``what`` after ``seconds`` (``d`` is cancelled)."""
    result = defer.Deferred()

    def timed_out() -> None:
        error = TimeoutError(f"{what} timed out after {seconds:g}s")
        d.cancel()  # its outcome reaches done() first, which ignores it
        if not result.called:
            result.errback(error)

    timer = clock.callLater(seconds, timed_out)

    def done(r: Any) -> None:
        if result.called or not timer.active():
            return None
        timer.cancel()
        if isinstance(r, Failure):
            result.errback(r)
        else:
            result.callback(r)
        return None

    d.addBoth(done)
    return result

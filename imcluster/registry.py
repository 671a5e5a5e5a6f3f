"""The presence registry: gateways and their users' connections in Redis.

Key layout (ARCHITECTURE.md, after ``redis_prefix``; ``{...}`` is a hash tag):

``WSSERVER_{<uuid>}``
    string with a TTL: JSON ``{"ip","port","tcpPort","startedAt"}``; the
    gateway is alive while it exists.
``WSSERVERS``
    set of gateway uuids: the reaper's work list.
``UCIR##{<userId>}``
    hash: field ``<uuid>##<ip>##<port>`` (the connection's ``connId``) ->
    JSON ``{"device","authedAt","exp"}``.
``WSCONNS##{<uuid>}``
    set of ``<userId>##<ip>##<port>``: what a gateway (or the reaper) removes.
``REDELIVER_LOCK``, ``REDELIVER_CURSOR``
    the processors' redelivery sweep (:mod:`imcluster.processor.redeliver`).

Every key name is built by :class:`RedisKeys`, nowhere else. The hash tag
decides the shard when ``--redis`` names several primaries (client-side
sharding, txredisapi's consistent-hash ring over the tag): a gateway's keys
share the tag ``{<uuid>}``, a user's keys the tag ``{<userId>}``. A new
per-user or per-gateway key is built with :meth:`RedisKeys.user_key` /
:meth:`RedisKeys.gateway_key` and so lands beside its siblings; a Lua script
only ever gets keys of one shard (:meth:`RedisService.run_script` refuses
others), and work that spans a user's and a gateway's keys is done in
per-shard steps, pipelined.

:class:`RedisNode` is one connection to one Redis primary, found directly
(``redis://``) or through Sentinel (``redis+sentinel://``, txredisapi's
``Sentinel``: the master's address is asked for before every connection
attempt, so a daemon follows a failover). txredisapi lets a command sent
while disconnected wait forever, so every command goes through
:meth:`RedisNode.execute` / :meth:`RedisNode.pipeline`, which fail with
:class:`TimeoutError` (naming the command) after ``redis_timeout`` seconds.
:class:`RedisService` is the IRegistry over one or several nodes (shards).
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import types
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence
from urllib.parse import parse_qs, unquote, urlsplit

import txredisapi
from twisted.application import service
from twisted.application.internet import ClientService
from twisted.internet import defer, protocol, task
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
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
    a primary that turned replica (a failover), or the service stopped. A command that got
    no reply in time fails with ``TimeoutError`` instead. Still a :data:`RedisConnectionError`,
    so code that traps txredisapi's error keeps working.
    """

#: Redis answered with an error reply.
ResponseError = txredisapi.ResponseError


# --- key layout ------------------------------------------------------------


def hash_tag(key: str) -> str:
    """What decides a key's shard: the text in its ``{...}``, else the whole key.

    txredisapi's ``ShardedConnection`` rule (its ``_findhash``), so a key lands
    where txredisapi's own sharded client would put it.
    """
    m = txredisapi._findhash.match(key)
    return m.group(1) if m is not None else key


class RedisKeys:
    """Key names and members of ARCHITECTURE.md's layout, after ``prefix``: the one place they are built.

    User ids never contain ``#``, ``{`` or ``}`` (PROTOCOL.md charset) and
    neither do uuids or IP addresses (IPv6 uses ``:``), so ``##`` splits
    unambiguously and the ``{...}`` hash tag is the id itself.
    """

    def __init__(self, prefix: str = "") -> None:
        if "{" in prefix or "}" in prefix:
            # a brace in the prefix would become every key's hash tag: one shard for all
            raise ValueError(f"redis_prefix must not contain '{{' or '}}': {prefix!r}")
        self.prefix = prefix

    # --- building blocks for keys of other modules (presence, revocation, ...)

    def user_key(self, name: str, user_id: str) -> str:
        """``<prefix><name>{<userId>}``: a per-user key on the shard of the user's ``UCIR`` hash."""
        return f"{self.prefix}{name}{{{user_id}}}"

    def gateway_key(self, name: str, uuid: str) -> str:
        """``<prefix><name>{<uuid>}``: a per-gateway key on the shard of its ``WSSERVER_`` key."""
        return f"{self.prefix}{name}{{{uuid}}}"

    def global_key(self, name: str) -> str:
        """``<prefix><name>``: a cluster-wide key (its shard follows its whole name)."""
        return f"{self.prefix}{name}"

    # --- the seed's keys

    def server(self, uuid: str) -> str:
        """``<prefix>WSSERVER_{<uuid>}``."""
        return self.gateway_key("WSSERVER_", uuid)

    def server_parts(self) -> tuple[str, str]:
        """``(head, tail)`` with ``server(uuid) == head + uuid + tail`` (the one-shard routes script)."""
        return f"{self.prefix}WSSERVER_{{", "}"

    def servers(self) -> str:
        """``<prefix>WSSERVERS``."""
        return self.global_key("WSSERVERS")

    def ucir(self, user_id: str) -> str:
        """``<prefix>UCIR##{<userId>}`` (``user_key("UCIR##", user_id)``, inlined: a window builds hundreds)."""
        return f"{self.prefix}UCIR##{{{user_id}}}"

    def wsconns(self, uuid: str) -> str:
        """``<prefix>WSCONNS##{<uuid>}``."""
        return self.gateway_key(f"WSCONNS{SEP}", uuid)

    def redeliver_lock(self) -> str:
        """``<prefix>REDELIVER_LOCK``: the redelivery sweep's lock (``SET NX PX``)."""
        return self.global_key("REDELIVER_LOCK")

    def redeliver_cursor(self) -> str:
        """``<prefix>REDELIVER_CURSOR``: where the redelivery sweep resumes."""
        return self.global_key("REDELIVER_CURSOR")

    def revoked(self, user_id: str) -> str:
        """``<prefix>REVOKED##{<userId>}``: the user's latest revocation (``notBefore``, ms), docs/internals.rst.

        On the shard of the user's ``UCIR`` hash: the registration pipeline reads it beside its HSET.
        """
        return self.user_key(f"REVOKED{SEP}", user_id)

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
    if not value or "#" in value or "{" in value or "}" in value:
        raise ValueError(f"{what} must be non-empty and free of '#', '{{', '}}': {value!r}")


def server_info(ip: str, port: int, tcp_port: int, started_at: float) -> dict:
    """The JSON value of ``WSSERVER_<uuid>``."""
    return {"ip": ip, "port": port, "tcpPort": tcp_port, "startedAt": started_at}


def conn_meta(device: str | None, authed_at: float, exp: float) -> dict:
    """The JSON value of a ``UCIR`` field (times in seconds since the epoch; never the token)."""
    return {"device": device, "authedAt": authed_at, "exp": exp}


def dumps(value: Any) -> str:
    """Compact JSON as stored in Redis."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


# --- --redis URLs ------------------------------------------------------------

#: schemes of one shard: a primary, or a Sentinel-managed master (``rediss``: TLS)
SCHEMES = ("redis", "rediss", "redis+sentinel", "rediss+sentinel")
SENTINEL_PORT = 26379


@dataclass(frozen=True)
class ShardSpec:
    """One shard of ``--redis``: a primary (``host``/``port``) or a Sentinel master (``sentinels``/``master``)."""

    url: str
    host: str | None = None
    port: int | None = None
    tls: bool = False
    username: str | None = None
    password: str | None = None
    dbid: int | None = None
    sentinels: tuple[tuple[str, int], ...] = ()
    master: str | None = None
    sentinel_password: str | None = None

    @property
    def name(self) -> str:
        """The shard's place on the hash ring: ``host:port`` as txredisapi's ShardedConnection
        names a node, or the Sentinel master's name (which a failover does not change)."""
        return self.master if self.master else f"{self.host}:{self.port}"

    @property
    def where(self) -> str:
        """For logs: ``host:port`` or ``sentinel <master> (h:p,h:p)``."""
        if self.master:
            return f"sentinel {self.master} ({','.join(f'{h}:{p}' for h, p in self.sentinels)})"
        return f"{self.host}:{self.port}"


def split_redis_urls(value: str | Sequence[str]) -> list[str]:
    """The shard URLs of ``--redis``: comma separated and/or repeated.

    A piece without ``://`` continues the previous URL's host list
    (``redis+sentinel://h1:26379,h2:26379/mymaster``).
    """
    pieces: list[str] = []
    for item in ([value] if isinstance(value, str) else list(value)):
        pieces.extend(p.strip() for p in str(item).split(",") if p.strip())
    urls: list[str] = []
    for p in pieces:
        if "://" in p or not urls:
            urls.append(p)
        elif urls[-1].split("://", 1)[0].endswith("+sentinel") and "/" not in urls[-1].split("://", 1)[1]:
            urls[-1] += "," + p
        else:
            raise ValueError(f"{p!r} is not a redis URL (only a redis+sentinel:// URL lists several hosts)")
    if not urls:
        raise ValueError("needs at least one redis:// URL")
    return urls


def parse_redis_url(url: str, password: str | None = None) -> ShardSpec:
    """One shard URL -> :class:`ShardSpec`; ``password`` (``--redis-password``) overrides the URL's.

    ``redis[s]://[[user]:password@]host[:port][/db]`` or
    ``redis[s]+sentinel://[[user]:password@]host[:port][,host[:port]...]/<master>[/db][?sentinel_password=...]``
    (the user and password are the master's; the sentinels' own password, if
    they have one, is ``sentinel_password``).
    """
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in SCHEMES:
        raise ValueError(f"not a {', '.join(s + '://' for s in SCHEMES)} URL: {url!r}")
    tls = scheme.startswith("rediss")
    if not scheme.endswith("+sentinel"):
        parts = urlsplit(url)
        if "," in parts.netloc:
            raise ValueError(f"several hosts need redis+sentinel:// (or one URL per shard): {url!r}")
        db = parts.path.strip("/")
        return ShardSpec(
            url=_without_password(url), host=parts.hostname or "127.0.0.1", port=parts.port or 6379, tls=tls,
            username=unquote(parts.username) if parts.username else None,
            password=password if password is not None else (unquote(parts.password) if parts.password else None),
            # db 0 is Redis' default: skip a SELECT round trip per connection
            dbid=_dbid(db, url))
    netloc, _, tail = rest.partition("/")
    path, _, query = tail.partition("?")
    userinfo, at, hosts = netloc.rpartition("@")
    if not at:
        userinfo, hosts = "", netloc
    username, _, url_password = userinfo.partition(":")
    sentinels = []
    for h in hosts.split(","):
        host, port = _host_port(h, SENTINEL_PORT, url)
        sentinels.append((host, port))
    segments = [s for s in path.split("/") if s]
    if not segments or len(segments) > 2:
        raise ValueError(f"a Sentinel URL names its master: redis+sentinel://host:port,.../<master>[/db], got {url!r}")
    qs = parse_qs(query)
    return ShardSpec(
        url=_without_password(url), tls=tls, sentinels=tuple(sentinels), master=unquote(segments[0]),
        username=unquote(username) or None,
        password=password if password is not None else (unquote(url_password) or None),
        dbid=_dbid(segments[1] if len(segments) > 1 else "", url),
        sentinel_password=qs.get("sentinel_password", [None])[0])


def parse_redis_urls(value: str | Sequence[str], password: str | None = None) -> list[ShardSpec]:
    """Every shard of ``--redis`` (see :func:`split_redis_urls`); two shards of one name are refused."""
    specs = [parse_redis_url(u, password) for u in split_redis_urls(value)]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"a Redis shard is named twice: {', '.join(names)}")
    return specs


def _dbid(db: str, url: str) -> int | None:
    if not db:
        return None
    try:
        n = int(db)
    except ValueError:
        raise ValueError(f"the database must be a number: {url!r}") from None
    return n if n != 0 else None


def _host_port(text: str, default_port: int, url: str) -> tuple[str, int]:
    text = text.strip()
    if text.startswith("["):  # [ipv6]:port
        host, _, port = text[1:].partition("]")
        port = port.lstrip(":")
    else:
        host, _, port = text.rpartition(":") if text.count(":") == 1 else (text, "", "")
    try:
        return host or "127.0.0.1", int(port) if port else default_port
    except ValueError:
        raise ValueError(f"bad host:port {text!r} in {url!r}") from None


def _without_password(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    netloc, slash, tail = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return f"{scheme}{sep}{userinfo.split(':', 1)[0]}:***@{hosts}{slash}{tail}"


# --- Lua scripts: each runs on one shard, with every key it touches in KEYS --------


class Script:
    """A Lua script run with EVALSHA, falling back to EVAL when Redis lacks it."""

    def __init__(self, name: str, source: str) -> None:
        self.name = name
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


#: Refresh WSSERVER_<uuid>; re-create it if gone; SADD the uuid to WSSERVERS
#: when that key is on the same shard (KEYS[2]; else a separate SADD).
#: KEYS: server[, servers]; ARGV: json, ttl ms, uuid. Returns 1 if it existed.
REFRESH_SCRIPT = Script("refresh_server", """
local existed = redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2], 'XX')
if not existed then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
if KEYS[2] then redis.call('SADD', KEYS[2], ARGV[3]) end
if existed then return 1 end
return 0
""")

#: HGETALL of every key: one command instead of a pipeline of HGETALLs
#: (same round trip, a quarter of the client's CPU for 1000 users, and a
#: consistent snapshot). KEYS: the UCIR keys of one shard. Returns one flat
#: array per key.
HGETALL_MANY_SCRIPT = Script("hgetall_many", """
local out = {}
for i, key in ipairs(KEYS) do out[i] = redis.call('HGETALL', key) end
return out
""")

#: Connections and live gateways in one round trip, when Redis is ONE shard
#: (every WSSERVER_ key is on the same Redis as the UCIR hashes, so the
#: script may read those of the gateways it finds).
#: KEYS: UCIR hashes; ARGV: server key head, server key tail (RedisKeys.server_parts),
#: then gateway uuids to check besides those of the connections found.
#: Returns the HGETALL of every key, then the uuids (of the connections' and
#: of ARGV's gateways) whose WSSERVER_ key exists.
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
for i = 3, #ARGV do
  local u = ARGV[i]
  if not seen[u] then seen[u] = true; uuids[#uuids + 1] = u end
end
local alive = {}
for _, u in ipairs(uuids) do
  if redis.call('EXISTS', ARGV[1] .. u .. ARGV[2]) == 1 then alive[#alive + 1] = u end
end
out[#KEYS + 1] = alive
return out
""")

#: The sharded routes step of one shard: HGETALL of its UCIR keys and EXISTS
#: of the WSSERVER_ keys (of gateways expected) that live on it.
#: KEYS: ARGV[1] UCIR keys, then WSSERVER_ keys. Returns one HGETALL per UCIR
#: key, then an array of 0/1 for the WSSERVER_ keys.
ROUTES_SHARD_SCRIPT = Script("routes_shard", """
local n = tonumber(ARGV[1])
local out, alive = {}, {}
for i = 1, n do out[i] = redis.call('HGETALL', KEYS[i]) end
for i = n + 1, #KEYS do alive[#alive + 1] = redis.call('EXISTS', KEYS[i]) end
out[n + 1] = alive
return out
""")

#: Reap step 1 (the gateway's shard): up to ARGV[1] members of WSCONNS, only
#: when WSSERVER_ is gone (or unconditionally when ARGV[2] == '1').
#: KEYS: server, wsconns. Returns {-1, {}} (alive: nothing to do) or {1, members}.
REAP_READ_SCRIPT = Script("reap_read", """
if ARGV[2] ~= '1' and redis.call('EXISTS', KEYS[1]) == 1 then return {-1, {}} end
return {1, redis.call('SRANDMEMBER', KEYS[2], tonumber(ARGV[1]))}
""")

#: Reap step 3 (the gateway's shard, after the UCIR fields were removed on the
#: users' shards): SREM the members. When not forced and WSSERVER_ came back
#: meanwhile, the gateway re-registered during the reap and some of its fresh
#: fields may be gone: its key is deleted, so that its next heartbeat writes
#: everything again (-2). KEYS: server, wsconns; ARGV: force, members...
#: Returns 1 (more to do), 0 (WSCONNS empty; WSSERVER_ deleted when forced), -2.
REAP_DROP_SCRIPT = Script("reap_drop", """
local force = ARGV[1] == '1'
if not force and redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('DEL', KEYS[1])
  return -2
end
for i = 2, #ARGV do redis.call('SREM', KEYS[2], ARGV[i]) end
if redis.call('EXISTS', KEYS[2]) == 1 then return 1 end
if force then redis.call('DEL', KEYS[1]) end
return 0
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

    def __init__(self, owner: "RedisNode") -> None:
        self.owner = owner
        #: txredisapi's SentinelRedisProtocol reads it: connect to a master only
        self.is_master = True

    def buildProtocol(self, addr):  # noqa: N802 (Twisted API)
        o = self.owner
        # behind Sentinel: txredisapi's protocol asks ROLE first and drops a
        # link to an instance that is not (or no longer) the master
        kind = txredisapi.SentinelRedisProtocol if o.spec.master else txredisapi.RedisProtocol
        p = kind(charset="utf-8", password=o.password, dbid=o.dbid,
                 convertNumbers=False, username=o.username)
        p.factory = self
        ready = p.whenConnected()
        ready.addCallback(o._connection_ready)

        def handshake_stuck() -> None:
            # AUTH / SELECT unanswered: txredisapi would wait forever
            if not ready.called and p.connected and p.transport is not None:
                o.log.warn("Redis {where} did not answer AUTH/SELECT within {t}s; reconnecting",
                           where=o.where, t=o.timeout)
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


class _SentinelMasterEndpoint:
    """Connects to the address Sentinel gives for the master, asked again before every attempt.

    Every sentinel connected (txredisapi's ``Sentinel`` keeps a connection to
    each) is asked ``SENTINEL MASTERS``; the first answer that knows the
    master and does not see it down (txredisapi's ``check_master_state``)
    wins. Once every sentinel said no (the master is down and not replaced
    yet), or after ``timeout``, the attempt fails with ``MasterNotFoundError``
    and is retried with the node's backoff (txredisapi's own
    ``discover_master`` waits the whole timeout even when all sentinels have
    answered, which delayed the reconnect after a failover by up to 5 s; and
    it queues a command on a sentinel that is down, which never answers).
    So a daemon follows a failover at its next reconnect: the old master's
    death, or Sentinel's ``CLIENT KILL`` of the demoted one's clients, drops
    the link.
    """

    def __init__(self, node: "RedisNode", sentinel: txredisapi.Sentinel) -> None:
        self.node = node
        self.sentinel = sentinel

    def __repr__(self) -> str:
        return f"<Redis master {self.node.where}>"

    async def _connected_sentinels(self) -> list:
        """The sentinels connected now; at start (none yet), waits for one, up to ``timeout``."""
        node = self.node
        deadline = node._clock.seconds() + node.timeout
        while True:
            asked = [s for s in self.sentinel.sentinels if s._factory.size]
            if asked or node._clock.seconds() >= deadline or not node.running:
                return asked
            await task.deferLater(node._clock, 0.05, lambda: None)

    def discover(self) -> defer.Deferred:
        """``(host, port)`` of the master, as the sentinels see it now (see the class docstring)."""
        return defer.Deferred.fromCoroutine(self._connected_sentinels()).addCallback(self._ask)

    def _ask(self, asked: list) -> defer.Deferred:
        node, sentinel = self.node, self.sentinel
        name = node.spec.master
        result: defer.Deferred = defer.Deferred()
        left = [len(asked)]

        def no_master(why: str) -> None:
            if not result.called:
                result.errback(txredisapi.MasterNotFoundError(f"no master {name!r} from Sentinel: {why}"))

        def answered(response: Any) -> None:
            if result.called:
                return
            state = response.get(name) if isinstance(response, dict) else None
            if state and sentinel.check_master_state(state):
                if timer.active():
                    timer.cancel()
                result.callback((state["ip"], int(state["port"])))
                return
            left[0] -= 1
            if left[0] <= 0:
                if timer.active():
                    timer.cancel()
                no_master("every sentinel sees it down, or does not know it")

        timer = node._clock.callLater(node.timeout, no_master, f"no answer within {node.timeout:g}s")
        if not asked:
            timer.cancel()
            no_master("no sentinel connected")
        for s in asked:
            s.sentinel_masters().addCallbacks(answered, lambda _: answered(None))
        return result

    def connect(self, factory: protocol.Factory) -> defer.Deferred:
        node = self.node
        d = self.discover()

        def found(addr: tuple[str, int]) -> defer.Deferred:
            host, port = addr
            if (host, port) != (node.host, node.port):
                if node.host is not None:
                    node.log.info("Redis {where}: the master is now {host}:{port} (was {old})",
                                  where=node.where, host=host, port=port, old=f"{node.host}:{node.port}")
                node.host, node.port = host, port
            from twisted.internet import reactor
            endpoint = HostnameEndpoint(reactor, host, port, timeout=node.timeout)
            if node.tls:
                from twisted.internet.ssl import optionsForClientTLS
                endpoint = wrapClientTLS(optionsForClientTLS(host), endpoint)
            return endpoint.connect(factory)

        return d.addCallback(found)


implementer(IStreamClientEndpoint)(_SentinelMasterEndpoint)


@implementer(IStreamClientEndpoint)
class _NodeMasterEndpoint:
    """:class:`_SentinelMasterEndpoint` over the node's Sentinel connections of the moment
    (made when the node starts, dropped when it stops)."""

    def __init__(self, node: "RedisNode") -> None:
        self.node = node

    def __repr__(self) -> str:
        return f"<Redis master {self.node.where}>"

    def connect(self, factory: protocol.Factory) -> defer.Deferred:
        sentinel = self.node._sentinel
        if sentinel is None:
            return defer.fail(RegistryUnavailable(f"Redis {self.node.where}: not started"))
        return _SentinelMasterEndpoint(self.node, sentinel).connect(factory)


class RedisNode(service.Service):
    """One Redis primary (a shard): a connection that is re-established after every loss.

    Reached directly (``spec.host``/``spec.port``) or through Sentinel
    (``spec.master``: the address is asked for before every attempt).
    ``timeout`` bounds every command, including the wait for a connection.
    Not a child service: :class:`RedisService` starts and stops its nodes.
    """

    log = Logger()

    #: reconnection backoff (seconds): first retry, growth, ceiling
    reconnect_initial_delay = 0.5
    reconnect_factor = 2.0
    #: short: deliveries must heal within 10 s of Redis answering again (PROTOCOL.md)
    reconnect_max_delay = 2.0

    def __init__(self, spec: ShardSpec, timeout: float = 5.0, clock: Any = None,
                 name: str = "redis") -> None:
        self.spec = spec
        self.host, self.port = spec.host, spec.port
        self.tls = spec.tls
        self.username, self.password, self.dbid = spec.username, spec.password, spec.dbid
        self.timeout = timeout
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
        self._sentinel: txredisapi.Sentinel | None = None
        if spec.master:
            # an attempt only asks the sentinels (the dead master is not dialled): retry
            # sooner, so that a daemon is on the promoted replica within a second of it
            self.reconnect_initial_delay, self.reconnect_max_delay = 0.2, 1.0

    @property
    def where(self) -> str:
        return self.spec.where

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
        if self.spec.master:
            self._sentinel = txredisapi.Sentinel(
                list(self.spec.sentinels), password=self.spec.sentinel_password, convertNumbers=False)
        self._client = ClientService(self.endpoint(), _ProtocolFactory(self), retryPolicy=self._retry_delay)
        self._client.startService()
        self.log.info("Redis {where}: connecting", where=self.where)
        d = self._wait(self._connection(), "connect")

        def not_yet(f: Failure) -> None:
            self.log.warn("Redis {where} not reachable yet ({err}); retrying in the background",
                          where=self.where, err=f.getErrorMessage())

        return d.addCallbacks(lambda _: None, not_yet)

    def endpoint(self) -> IStreamClientEndpoint:
        """Where a new connection to this shard goes: its primary, or (Sentinel) the master the
        Sentinels name at each attempt, through this node's Sentinel connections (so the node
        must be started). The presence pub/sub connection uses it too (``imcluster.presence``).
        """
        if self.spec.master:
            return _NodeMasterEndpoint(self)
        from twisted.internet import reactor
        endpoint = HostnameEndpoint(reactor, self.host, self.port, timeout=self.timeout)
        if self.tls:
            from twisted.internet.ssl import optionsForClientTLS
            endpoint = wrapClientTLS(optionsForClientTLS(self.host), endpoint)
        return endpoint

    def stopService(self):  # noqa: N802
        """Disconnect; fires within ``timeout`` even if the link hangs."""
        super().stopService()
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            w.errback(RegistryUnavailable("Redis service stopped"))
        sentinel, self._sentinel = self._sentinel, None
        if sentinel is not None:
            sentinel.disconnect().addErrback(lambda _: None)
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
            self.log.info("Redis {where} connected", where=self.where)
            return
        self.reconnects += 1
        metrics.RECONNECTS.labels(service=self.name).inc()
        self.log.info("Redis {where} reconnected ({n} reconnects)", where=self.where, n=self.reconnects)
        for fn in list(self._listeners):
            d = defer.maybeDeferred(fn)
            d.addErrback(lambda f, fn=fn: self.log.failure(
                "Redis reconnect listener {fn!r} failed", f, fn=fn))

    def _connection_lost(self, conn: txredisapi.RedisProtocol) -> None:
        if self._conn is conn:
            self._conn = None
            if self.running:
                self.log.warn("Redis {where} connection lost; reconnecting", where=self.where)

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
            elif r.check(ResponseError) and str(r.value).startswith("READONLY"):
                # a primary that was turned replica (a failover we have not seen yet):
                # reconnect, which asks Sentinel for the new master
                conn = state.get("conn")
                if conn is not None and conn.transport is not None:
                    self.log.warn("Redis {where} is read-only now (failed over?); reconnecting",
                                  where=self.where)
                    conn.transport.abortConnection()
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

#: commands whose arguments are all keys: split per shard, replies combined
_ALL_KEYS = {"DEL": sum, "UNLINK": sum, "EXISTS": sum, "TOUCH": sum, "MGET": None}
#: commands without a key: PING asks every shard; the others need a node (``svc.nodes[i]``)
_KEYLESS = frozenset({"PING", "ECHO", "TIME", "INFO", "CLIENT", "SCAN", "DBSIZE", "SCRIPT", "CONFIG",
                      "ROLE", "COMMAND", "SLOWLOG", "MEMORY", "FLUSHDB", "FLUSHALL", "WAIT", "LASTSAVE"})
#: gateways remembered from earlier sharded lookups (checked alive in the same step)
_GATEWAY_HINTS = 256


@implementer(IRegistry)
class RedisService(service.Service):
    """IRegistry on Redis: one primary, a Sentinel-managed master, or several shards of either.

    ``url``: one shard URL or several (comma separated, or a list), see
    :func:`parse_redis_url`. With several, every key goes to the shard that
    txredisapi's consistent-hash ring gives its hash tag (:func:`hash_tag`):
    every daemon must be given the same shards. ``timeout`` bounds every
    command, including the wait for a connection. ``batch`` bounds the
    entries one reap step removes at once.
    """

    log = Logger()

    def __init__(self, url: str | Sequence[str], prefix: str = "", timeout: float = 5.0,
                 password: str | None = None, clock: Any = None, name: str = "redis",
                 batch: int = 1000) -> None:
        self.specs = parse_redis_urls(url, password)
        self.keys = RedisKeys(prefix)
        self.prefix = prefix
        self.timeout = timeout
        self.batch = batch
        self.setName(name)
        self.nodes = [RedisNode(s, timeout=timeout, clock=clock, name=name) for s in self.specs]
        self._single = self.nodes[0] if len(self.nodes) == 1 else None
        # txredisapi's ring (ShardedConnection's placement) over our nodes; its
        # ShardedConnection itself cannot serve: no pipelines or scripts, and on
        # Python 3 its ring fails on str keys (zlib.crc32 of a str): we hash bytes
        self._ring = txredisapi.HashRing([
            types.SimpleNamespace(_factory=types.SimpleNamespace(uuid=n.spec.name), node=n)
            for n in self.nodes])
        self._gateway_hints: dict[str, None] = {}

    @classmethod
    def from_config(cls, config: Any, **kw: Any) -> "RedisService":
        """Build from a Config (``redis``, ``redis_prefix``, ``redis_timeout``, ``redis_password``, ``redis_batch``)."""
        return cls(config.redis, prefix=config.redis_prefix, timeout=config.redis_timeout,
                   password=config.redis_password, batch=config.redis_batch, **kw)

    # --- the first shard's settings (tests, logs; one-shard deployments)

    def __getattr__(self, name: str) -> Any:
        if name != "nodes" and name in ("host", "port", "tls", "username", "password", "dbid", "_waiters"):
            return getattr(self.nodes[0], name)
        raise AttributeError(name)

    # --- placement

    def node_for(self, key: str) -> RedisNode:
        """The shard that holds ``key`` (by its hash tag)."""
        if self._single is not None:
            return self._single
        return self._ring.get_node(hash_tag(key).encode()).node

    def _by_node(self, keys: Iterable[str]) -> dict[RedisNode, list[str]]:
        groups: dict[RedisNode, list[str]] = {}
        for k in keys:
            groups.setdefault(self.node_for(k), []).append(k)
        return groups

    # --- lifecycle

    @property
    def connected(self) -> bool:
        """True while every shard has a ready connection."""
        return all(n.connected for n in self.nodes)

    @property
    def reconnects(self) -> int:
        return sum(n.reconnects for n in self.nodes)

    def add_reconnect_listener(self, fn: Callable[[], Any]) -> None:
        """Call ``fn()`` after each re-established connection to any shard (not the first).

        That shard may have restarted empty, or failed over to a replica that
        missed the last writes: a gateway re-registers everything (writes are
        idempotent). ``fn`` may return a Deferred; its failures are logged.
        """
        for n in self.nodes:
            n._listeners.append(fn)

    def startService(self):  # noqa: N802
        """Start connecting every shard; fires once all are connected, or after ``timeout`` (logged).

        It never fails: connections keep being retried, and commands fail
        within ``timeout`` until they are up.
        """
        super().startService()
        self.log.info("Redis prefix {prefix!r}: {n} shard(s): {shards}", prefix=self.prefix,
                      n=len(self.nodes), shards=", ".join(n.where for n in self.nodes))
        ds = [n.startService() for n in self.nodes]
        return ds[0] if len(ds) == 1 else defer.gatherResults(ds).addCallback(lambda _: None)

    def stopService(self):  # noqa: N802
        """Disconnect every shard; fires within ``timeout`` even if a link hangs."""
        super().stopService()
        ds = [n.stopService() for n in self.nodes if n.running]
        return defer.gatherResults(ds).addCallback(lambda _: None)

    # --- bounded commands, routed by key

    def execute(self, command: str, *args: Any) -> defer.Deferred:
        """Run one Redis command on the shard of its key (``args[0]``); TimeoutError naming it after ``timeout``.

        Replies as txredisapi gives them with ``convertNumbers=False``: bulk
        strings as str (bytes if not UTF-8), integers as int, arrays as lists.
        With several shards, ``DEL``/``UNLINK``/``EXISTS``/``TOUCH``/``MGET``
        are split per shard and their replies combined; ``PING`` asks every
        shard; other keyless commands need a node (``svc.nodes[i].execute``).
        """
        if self._single is not None:
            return self._single.execute(command, *args)
        name = str(command).upper()
        if name == "PING":
            return defer.gatherResults([n.execute(command, *args) for n in self.nodes],
                                       consumeErrors=True).addCallback(lambda r: r[0]).addErrback(_first)
        if name in _KEYLESS or not args:
            return defer.fail(ValueError(f"{name} has no key to place it on a shard: use svc.nodes[i]"))
        if name in _ALL_KEYS:
            keys = [str(a) for a in args]
            groups = self._by_node(keys)
            if len(groups) > 1:
                return self._split(command, keys, groups, _ALL_KEYS[name])
        return self.node_for(str(args[0])).execute(command, *args)

    def _split(self, command: str, keys: list[str], groups: dict, combine: Any) -> defer.Deferred:
        nodes = list(groups)
        d = defer.gatherResults([n.execute(command, *groups[n]) for n in nodes], consumeErrors=True)

        def joined(replies: list) -> Any:
            if combine is not None:
                return combine(int(r) for r in replies)
            by_key = {}
            for n, r in zip(nodes, replies):
                by_key.update(zip(groups[n], r))
            return [by_key[k] for k in keys]

        return d.addCallbacks(joined, _first)

    def pipeline(self, commands: Sequence[Sequence[Any]]) -> defer.Deferred:
        """Run ``commands`` (each ``(COMMAND, key, *args)``): one round trip per shard, all at once.

        Fires with the list of replies in order; fails with the first
        command's error if any failed (the others still ran: this is a
        pipeline, not a transaction). An empty list fires ``[]`` at once.
        """
        if self._single is not None:
            return self._single.pipeline(commands)
        commands = [tuple(c) for c in commands]
        groups: dict[RedisNode, list[int]] = {}
        for i, c in enumerate(commands):
            if len(c) < 2:
                return defer.fail(ValueError(f"{c[0]} has no key to place it on a shard"))
            groups.setdefault(self.node_for(str(c[1])), []).append(i)
        if len(groups) <= 1:
            return (next(iter(groups)) if groups else self.nodes[0]).pipeline(commands)
        nodes = list(groups)
        d = defer.gatherResults([n.pipeline([commands[i] for i in groups[n]]) for n in nodes],
                                consumeErrors=True)

        def joined(replies: list) -> list:
            out: list[Any] = [None] * len(commands)
            for n, rs in zip(nodes, replies):
                for i, r in zip(groups[n], rs):
                    out[i] = r
            return out

        return d.addCallbacks(joined, _first)

    def run_script(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> defer.Deferred:
        """EVALSHA ``script`` on the shard of its keys (EVAL when Redis does not know it yet), within ``timeout``.

        Every key must be on one shard (give keys used together one hash
        tag): a script never spans shards.
        """
        if self._single is not None:
            return self._single.run_script(script, keys, args)
        nodes = {self.node_for(k) for k in keys}
        if len(nodes) > 1:
            return defer.fail(ValueError(f"script {script.name} would span {len(nodes)} Redis shards: "
                                         f"its keys need one hash tag ({', '.join(keys[:4])})"))
        return (nodes.pop() if nodes else self.nodes[0]).run_script(script, keys, args)

    # --- IRegistry

    @_deferred
    def register_server(self, uuid: str, info: dict, ttl: float) -> defer.Deferred:
        """SET ``WSSERVER_<uuid>`` (TTL ``ttl`` seconds) and SADD ``WSSERVERS``, one round trip per shard."""
        k = self.keys
        d = self.pipeline([("SET", k.server(uuid), dumps(info), "PX", _ms(ttl)),
                           ("SADD", k.servers(), uuid)])
        return d.addCallback(lambda _: None)

    @_deferred
    def refresh_server(self, uuid: str, info: dict, ttl: float) -> defer.Deferred:
        """Refresh ``WSSERVER_<uuid>``; fires False when it was gone (Redis lost it) and was re-created.

        One script when ``WSSERVERS`` is on the gateway's shard; else the
        script and an ``SADD`` to the other shard, at once.
        """
        k = self.keys
        server, servers = k.server(uuid), k.servers()
        args = [dumps(info), _ms(ttl), uuid]
        node = self.node_for(server)
        if node is self.node_for(servers):
            d = node.run_script(REFRESH_SCRIPT, [server, servers], args)
        else:
            d = defer.gatherResults([node.run_script(REFRESH_SCRIPT, [server], args),
                                     self.node_for(servers).execute("SADD", servers, uuid)],
                                    consumeErrors=True).addCallbacks(lambda r: r[0], _first)
        return d.addCallback(lambda r: bool(int(r)))

    @defer.inlineCallbacks
    def _remove_server(self, uuid: str, force: bool):
        """Chunks of ``batch``: read WSCONNS (the gateway's shard, only when its key is gone
        unless ``force``), HDEL the UCIR fields (their users' shards, at once), SREM the
        members (the gateway's shard); finally SREM from WSSERVERS.

        Returns ``(state, removed, dropped)``: state -1 alive (nothing done),
        -2 it came back during the reap (its key deleted: it re-registers), 0 done.
        """
        k = self.keys
        gw_keys = [k.server(uuid), k.wsconns(uuid)]
        node = self.node_for(gw_keys[0])
        flag = "1" if force else "0"
        removed = 0
        while True:
            state, members = yield node.run_script(REAP_READ_SCRIPT, gw_keys, [self.batch, flag])
            if int(state) == -1:
                return -1, removed, False
            per_user: dict[str, list[str]] = {}
            for m in members:
                try:
                    user_id, ip, port = k.parse_wsconns_member(m)
                except ValueError:
                    continue  # not ours: just dropped from the set below
                per_user.setdefault(k.ucir(user_id), []).append(k.conn_field(uuid, ip, port))
            if per_user:
                yield self.pipeline([("HDEL", key, *fields) for key, fields in per_user.items()])
            state = int((yield node.run_script(REAP_DROP_SCRIPT, gw_keys, [flag, *members])))
            removed += len(members)
            if state == -2:
                self.log.warn("gateway {uuid} came back while it was reaped: its key is deleted, "
                              "so that it writes all its entries again", uuid=uuid)
                return -2, removed, False
            if state == 0:
                break
        dropped = yield self.execute("SREM", k.servers(), uuid)
        return 0, removed, bool(int(dropped))

    @_deferred
    def unregister_server(self, uuid: str) -> defer.Deferred:
        """Remove this gateway's UCIR fields, WSCONNS, WSSERVER_ key and WSSERVERS member.

        Fires with the number of connections removed.
        """
        return self._remove_server(uuid, True).addCallback(lambda r: r[1])

    @_deferred
    def reap_server(self, uuid: str) -> defer.Deferred:
        """Remove a dead gateway's entries, only if ``WSSERVER_<uuid>`` is gone.

        Each chunk of ``batch`` connections is read only while the key is
        gone, and dropped from WSCONNS only if it is still gone. Fires True
        only for the call that completed the reap (removed the uuid from
        WSSERVERS): of concurrent reapers, one.
        """
        d = self._remove_server(uuid, False)

        def done(r: tuple[int, int, bool]) -> bool:
            state, removed, dropped = r
            if dropped or removed:
                self.log.info("reaped gateway {uuid}: {n} connections", uuid=uuid, n=removed)
            return state == 0 and dropped

        return d.addCallback(done)

    def _registration(self, uuid: str, entries: Iterable[tuple]) -> tuple[list[str], list[tuple]]:
        """The users of ``entries`` and the HSET/SADD commands that register them on ``uuid``."""
        k = self.keys
        per_user: dict[str, list[str]] = {}
        members: list[str] = []
        for user_id, ip, port, meta in entries:
            members.append(k.wsconns_member(user_id, ip, port))
            per_user.setdefault(user_id, []).extend((k.conn_field(uuid, ip, port), dumps(meta)))
        if not members:
            return [], []
        commands: list[tuple] = [("HSET", k.ucir(u), *fv) for u, fv in per_user.items()]
        commands.append(("SADD", k.wsconns(uuid), *members))
        return list(per_user), commands

    @_deferred
    def add_connections(self, uuid: str, entries: Iterable[tuple]) -> defer.Deferred:
        """HSET each ``UCIR##<user>`` field and SADD ``WSCONNS##<uuid>``, one round trip per shard.

        ``entries``: ``(user_id, ip, port, meta_dict)``.
        """
        _users, commands = self._registration(uuid, entries)
        if not commands:
            return defer.succeed(None)
        return self.pipeline(commands).addCallback(lambda _: None)

    @_deferred
    def add_connections_checked(self, uuid: str, entries: Iterable[tuple]) -> defer.Deferred:
        """:meth:`add_connections`, reading each user's ``REVOKED##<user>`` in the same round trip.

        The auth of a connection needs no round trip of its own for the
        revocation check (HTTP-API.md revoke): the GETs go first in the
        registration pipeline. Fires with ``{user_id: notBefore ms or None}``.
        """
        users, commands = self._registration(uuid, entries)
        if not commands:
            return defer.succeed({})
        commands = [("GET", self.keys.revoked(u)) for u in users] + commands

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
        """HDEL each ``UCIR##<user>`` field and SREM ``WSCONNS##<uuid>``, one round trip per shard.

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
        """``{user_id: {conn_field: meta}}`` for every user (``{}`` when offline).

        One script per shard (HGETALL of each of its ``UCIR##<user>`` keys), all at once.
        """
        users = list(dict.fromkeys(user_ids))
        if not users:
            return defer.succeed({})
        keys = [self.keys.ucir(u) for u in users]
        if self._single is not None:
            d = self._single.run_script(HGETALL_MANY_SCRIPT, keys, [])
        else:
            d = self._per_shard_hgetall(keys)

        def decode(replies: list) -> dict:
            return {u: self._decode_hash(u, r) for u, r in zip(users, replies)}

        return d.addCallback(decode)

    def _per_shard_hgetall(self, keys: list[str]) -> defer.Deferred:
        groups = self._by_node(keys)
        nodes = list(groups)
        d = defer.gatherResults([n.run_script(HGETALL_MANY_SCRIPT, groups[n], []) for n in nodes],
                                consumeErrors=True)

        def joined(replies: list) -> list:
            by_key = {}
            for n, r in zip(nodes, replies):
                by_key.update(zip(groups[n], r))
            return [by_key[k] for k in keys]

        return d.addCallbacks(joined, _first)

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
        """``connections_of(user_ids)`` and ``alive`` of their gateways and ``uuids``.

        Fires with ``({user_id: {conn_field: meta}}, {alive uuid, ...})``.
        One shard: one script, one round trip. Several: one script per shard
        at once (its users' hashes and the WSSERVER_ keys on it of the
        gateways expected: ``uuids`` and those seen lately), then, only for
        gateways found that were not expected, one MGET per shard.
        """
        users = list(dict.fromkeys(user_ids))
        extra = list(dict.fromkeys(uuids))
        if not users and not extra:
            return defer.succeed(({}, set()))
        ucir = [self.keys.ucir(u) for u in users]
        if self._single is not None:
            head, tail = self.keys.server_parts()
            d = self._single.run_script(ROUTES_SCRIPT, ucir, [head, tail, *extra])

            def decode(replies: list) -> tuple[dict, set]:
                conns = {u: self._decode_hash(u, r) for u, r in zip(users, replies)}
                return conns, set(replies[len(users)])

            return d.addCallback(decode)
        return defer.Deferred.fromCoroutine(self._sharded_routes(users, ucir, extra))

    async def _sharded_routes(self, users: list[str], ucir: list[str], extra: list[str]) -> tuple[dict, set]:
        expected = list(dict.fromkeys([*extra, *self._gateway_hints]))
        plan: dict[RedisNode, tuple[list[str], list[str]]] = {}
        for key in ucir:
            plan.setdefault(self.node_for(key), ([], []))[0].append(key)
        for u in expected:
            plan.setdefault(self.node_for(self.keys.server(u)), ([], []))[1].append(u)
        nodes = list(plan)
        try:
            replies = await defer.gatherResults(
                [n.run_script(ROUTES_SHARD_SCRIPT,
                              plan[n][0] + [self.keys.server(u) for u in plan[n][1]], [len(plan[n][0])])
                 for n in nodes], consumeErrors=True)
        except defer.FirstError as e:
            e.subFailure.raiseException()
        hashes: dict[str, list] = {}
        alive: set[str] = set()
        for n, r in zip(nodes, replies):
            keys, gws = plan[n]
            hashes.update(zip(keys, r[:len(keys)]))
            alive.update(u for u, flag in zip(gws, r[len(keys)]) if int(flag))
        conns = {u: self._decode_hash(u, hashes[k]) for u, k in zip(users, ucir)}
        found = {f.split(SEP, 1)[0] for fields in conns.values() for f in fields if f.find(SEP) > 0}
        checked = set(expected)
        unexpected = found - checked
        if unexpected:
            alive |= await self.alive(sorted(unexpected))
        self._remember_gateways(found)
        return conns, alive & (found | set(extra))

    def _remember_gateways(self, uuids: Iterable[str]) -> None:
        hints = self._gateway_hints
        for u in uuids:
            hints.pop(u, None)
            hints[u] = None
        while len(hints) > _GATEWAY_HINTS:
            del hints[next(iter(hints))]

    def alive(self, uuids: Iterable[str]) -> defer.Deferred:
        """The set of ``uuids`` whose ``WSSERVER_<uuid>`` exists (one MGET per shard)."""
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


def _first(f: Failure) -> Failure:
    """The first failure of a gatherResults, unwrapped (callers trap RegistryUnavailable etc.)."""
    if f.check(defer.FirstError):
        return f.value.subFailure
    return f


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

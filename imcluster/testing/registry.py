"""FakeRegistry: an in-memory Redis behind the IRegistry contract (tests/test_contract_registry.py)."""

from __future__ import annotations

from twisted.application import service as _reg_service
from twisted.internet import defer
from twisted.internet.task import Clock
from zope.interface import implementer

from imcluster.interfaces import IRegistry as _IRegistry
from imcluster.registry import SEP, RedisKeys
from imcluster.registry import ResponseError as _RedisResponseError
from imcluster.registry import dumps


class FakeRedisStore:
    """A dict that behaves like the part of Redis imcluster uses.

    Strings, sets and hashes with TTLs on ``clock`` (expired keys vanish as
    in Redis). :meth:`execute` takes raw commands (``PING GET SET(PX/EX/NX/XX)
    DEL EXISTS PTTL TTL EXPIRE PEXPIRE MGET INCR INCRBY SADD SREM SMEMBERS
    SISMEMBER SCARD SPOP HSET HGET HDEL HGETALL HLEN HEXISTS``) and gives
    txredisapi's reply shapes. Several :class:`FakeRegistry` may share one
    store, like processes sharing one Redis.
    """

    def __init__(self, clock=None):
        self.clock = clock if clock is not None else Clock()
        self.data: dict = {}
        self.expires: dict = {}
        #: FakeSubscriber instances connected to this store
        self.subscribers: list = []

    # -- helpers
    def _alive(self, key):
        deadline = self.expires.get(key)
        if deadline is not None and self.clock.seconds() >= deadline:
            self.data.pop(key, None)
            self.expires.pop(key, None)
        return key in self.data

    def _get(self, key, kind):
        if not self._alive(key):
            return None
        value = self.data[key]
        if not isinstance(value, kind):
            raise _RedisResponseError("WRONGTYPE Operation against a key holding the wrong kind of value")
        return value

    def _delete(self, key):
        self.expires.pop(key, None)
        return self.data.pop(key, None) is not None

    def _drop_if_empty(self, key):
        # Redis removes empty sets and hashes
        if key in self.data and not self.data[key]:
            self._delete(key)

    def keys(self, prefix=""):
        """Live keys starting with ``prefix`` (a test helper, not a command)."""
        return sorted(k for k in list(self.data) if k.startswith(prefix) and self._alive(k))

    def flush(self, prefix=""):
        """Delete every key starting with ``prefix``: Redis losing (our part of) its data."""
        for k in self.keys(prefix):
            self._delete(k)

    def execute(self, command, *args):
        """Run one raw command synchronously; returns the reply or raises ResponseError."""
        args = [_redis_str(a) for a in args]
        fn = getattr(self, "_cmd_" + str(command).lower(), None)
        if fn is None:
            raise _RedisResponseError(f"unknown command '{command}' (FakeRedisStore)")
        try:
            return fn(*args)
        except TypeError as e:
            raise _RedisResponseError(f"wrong number of arguments for '{command}': {e}") from None

    # -- commands
    def _cmd_ping(self, *a):
        return a[0] if a else "PONG"

    def _cmd_get(self, key):
        return self._get(key, str)

    def _cmd_set(self, key, value, *opts):
        opts = [o.upper() for o in opts]
        ttl = None
        i = 0
        nx = xx = False
        while i < len(opts):
            o = opts[i]
            if o in ("PX", "EX"):
                n = int(opts[i + 1])
                ttl = n / 1000.0 if o == "PX" else float(n)
                i += 2
                continue
            nx, xx = nx or o == "NX", xx or o == "XX"
            i += 1
        exists = self._alive(key)
        if (nx and exists) or (xx and not exists):
            return None
        self.data[key] = value
        self.expires.pop(key, None)
        if ttl is not None:
            self.expires[key] = self.clock.seconds() + ttl
        return "OK"

    def _cmd_del(self, *keys):
        return sum(1 for k in keys if self._alive(k) and self._delete(k))

    def _cmd_exists(self, *keys):
        return sum(1 for k in keys if self._alive(k))

    def _cmd_pttl(self, key):
        if not self._alive(key):
            return -2
        if key not in self.expires:
            return -1
        return int(round((self.expires[key] - self.clock.seconds()) * 1000))

    def _cmd_ttl(self, key):
        ms = self._cmd_pttl(key)
        return ms if ms < 0 else int(round(ms / 1000.0))

    def _cmd_pexpire(self, key, ms):
        if not self._alive(key):
            return 0
        self.expires[key] = self.clock.seconds() + int(ms) / 1000.0
        return 1

    def _cmd_expire(self, key, seconds):
        return self._cmd_pexpire(key, int(seconds) * 1000)

    def _cmd_mget(self, *keys):
        return [self.data[k] if self._alive(k) and isinstance(self.data[k], str) else None for k in keys]

    def _cmd_incrby(self, key, n):
        value = int(self._get(key, str) or 0) + int(n)
        self.data[key] = str(value)
        return value

    def _cmd_incr(self, key):
        return self._cmd_incrby(key, 1)

    def _cmd_sadd(self, key, *members):
        s = self._get(key, set)
        if s is None:
            s = self.data[key] = set()
        before = len(s)
        s.update(members)
        return len(s) - before

    def _cmd_srem(self, key, *members):
        s = self._get(key, set)
        if s is None:
            return 0
        n = sum(1 for m in members if m in s)
        s.difference_update(members)
        self._drop_if_empty(key)
        return n

    def _cmd_smembers(self, key):
        return sorted(self._get(key, set) or ())

    def _cmd_sismember(self, key, member):
        return int(member in (self._get(key, set) or ()))

    def _cmd_scard(self, key):
        return len(self._get(key, set) or ())

    def _cmd_spop(self, key, count=None):
        s = self._get(key, set)
        if count is None:
            if not s:
                return None
            m = s.pop()
            self._drop_if_empty(key)
            return m
        out = []
        while s and len(out) < int(count):
            out.append(s.pop())
        self._drop_if_empty(key)
        return out

    def _cmd_hset(self, key, *fv):
        if not fv or len(fv) % 2:
            raise TypeError("field/value pairs")
        h = self._get(key, dict)
        if h is None:
            h = self.data[key] = {}
        n = 0
        for f, v in zip(fv[::2], fv[1::2]):
            n += f not in h
            h[f] = v
        return n

    def _cmd_hget(self, key, field):
        return (self._get(key, dict) or {}).get(field)

    def _cmd_hdel(self, key, *fields):
        h = self._get(key, dict)
        if h is None:
            return 0
        n = sum(1 for f in fields if h.pop(f, None) is not None)
        self._drop_if_empty(key)
        return n

    def _cmd_hgetall(self, key):
        out = []
        for f, v in (self._get(key, dict) or {}).items():
            out += [f, v]
        return out

    def _cmd_hlen(self, key):
        return len(self._get(key, dict) or {})

    def _cmd_hexists(self, key, field):
        return int(field in (self._get(key, dict) or {}))

    # -- pub/sub, TIME and the Lua scripts that have a Python twin here (FAKE_SCRIPTS)
    def _cmd_time(self):
        now = self.clock.seconds()
        return [str(int(now)), str(int(round((now - int(now)) * 1e6)))]

    def _cmd_publish(self, channel, message):
        subs = [s for s in list(self.subscribers) if channel in s.channels]
        for s in subs:
            s.deliver(channel, message)
        return len(subs)

    def _cmd_pubsub(self, sub, *channels):
        if sub.upper() != "NUMSUB":
            raise _RedisResponseError(f"PUBSUB {sub} is not supported (FakeRedisStore)")
        out = []
        for c in channels:
            out += [c, sum(1 for s in self.subscribers if c in s.channels)]
        return out

    def _cmd_script(self, sub, *args):
        if sub.upper() == "LOAD":
            import hashlib
            return hashlib.sha1(args[0].encode()).hexdigest()
        raise _RedisResponseError(f"SCRIPT {sub} is not supported (FakeRedisStore)")

    def _cmd_evalsha(self, sha, numkeys, *rest):
        twin = _fake_scripts().get(sha)
        if twin is None:
            raise _RedisResponseError("NOSCRIPT No matching script (FakeRedisStore)")
        n = int(numkeys)
        return twin(self, list(rest[:n]), list(rest[n:]))


def _presence_sync(store, keys, args):
    """Python twin of imcluster.presence.SYNC_SCRIPT (same semantics, same reply)."""
    from imcluster.presence import parse_state

    online = store.execute("EXISTS", keys[0])
    cur = parse_state(store.execute("GET", keys[1]))
    if cur is None and not online:
        return None
    if cur is not None and cur[1] == bool(online):
        return None
    now = int(store.clock.seconds() * 1000)
    if cur is not None and now <= cur[0]:
        now = cur[0] + 1
    value = f"{now}:{1 if online else 0}"
    if online:
        store.execute("SET", keys[1], value)
    else:
        store.execute("SET", keys[1], value, "EX", args[0])
    store.execute("PUBLISH", keys[1], value)
    return value


def _fake_scripts():
    from imcluster.presence import SYNC_SCRIPT

    return {SYNC_SCRIPT.sha: _presence_sync}


class FakeSubscriber:
    """imcluster.presence.RedisSubscriber on a FakeRedisStore: messages are delivered at once."""

    def __init__(self, store, on_message):
        self.store = store
        self.on_message = on_message
        self.channels: set = set()
        self.connected = False
        self._listeners = []
        self.reconnects = 0
        self.messages = 0

    def add_reconnect_listener(self, fn):
        self._listeners.append(fn)

    def start(self):
        self.connected = True
        if self not in self.store.subscribers:
            self.store.subscribers.append(self)
        return defer.succeed(None)

    def stop(self):
        self.connected = False
        if self in self.store.subscribers:
            self.store.subscribers.remove(self)
        return defer.succeed(None)

    def kill(self):
        """The connection drops (the gateway died): PUBSUB NUMSUB stops counting it."""
        return self.stop()

    def subscribe(self, channels):
        self.channels.update(channels)
        return defer.succeed(None)

    def unsubscribe(self, channels):
        self.channels.difference_update(channels)

    def deliver(self, channel, message):
        if self.connected:
            self.messages += 1
            self.on_message(channel, message)

    def simulate_reconnect(self):
        self.reconnects += 1
        return defer.gatherResults([defer.maybeDeferred(fn) for fn in list(self._listeners)], consumeErrors=True)


def _redis_str(value):
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, float):
        return format(value, "f")
    return str(value)


@implementer(_IRegistry)
class FakeRegistry(_reg_service.Service):
    """IRegistry on a :class:`FakeRedisStore`, with the same semantics as RedisService.

    ``clock`` drives TTLs (``clock.advance(ttl)`` expires a gateway).
    ``flush()`` simulates Redis losing our data; ``simulate_reconnect()``
    fires the reconnect listeners; ``set_available(False)`` makes every call
    fail with TimeoutError, as the real service does while Redis is down.
    ``round_trips`` counts what the real service would send to Redis (one per
    call, one per reap chunk), so callers can test their batching.
    Lua scripts (``run_script``) are not supported.
    """

    def __init__(self, prefix="", clock=None, store=None, batch=1000, name="redis"):
        self.store = store if store is not None else FakeRedisStore(clock)
        self.clock = self.store.clock
        self.keys = RedisKeys(prefix)
        self.prefix = prefix
        self.batch = batch
        self.timeout = 5.0
        self.setName(name)
        self.available = True
        self.reconnects = 0
        self.round_trips = 0
        self._listeners = []

    @property
    def connected(self):
        return self.available

    def add_reconnect_listener(self, fn):
        self._listeners.append(fn)

    def set_available(self, available):
        """False: every call fails (TimeoutError) until set back to True."""
        self.available = available

    def simulate_reconnect(self, lose_data=False):
        """Fire the reconnect listeners (after ``flush()`` when ``lose_data``); fires when they are done."""
        if lose_data:
            self.flush()
        self.reconnects += 1
        return defer.gatherResults(
            [defer.maybeDeferred(fn) for fn in list(self._listeners)], consumeErrors=True)

    def subscriber(self, on_message):
        """A :class:`FakeSubscriber` on this registry's store (imcluster.presence.subscriber_for)."""
        return FakeSubscriber(self.store, on_message)

    def flush(self):
        """Delete every key under this registry's prefix (Redis lost our data)."""
        self.store.flush(self.prefix)

    def _call(self, what, fn, *args):
        if not self.available:
            return defer.fail(TimeoutError(f"Redis {what} got no reply within {self.timeout:g}s (not connected)"))
        self.round_trips += 1
        return defer.maybeDeferred(fn, *args)

    # -- raw access
    def execute(self, command, *args):
        return self._call(str(command).upper(), self.store.execute, command, *args)

    def pipeline(self, commands):
        commands = [tuple(c) for c in commands]
        if not commands:
            return defer.succeed([])

        def run():
            replies, error = [], None
            for c in commands:
                try:
                    replies.append(self.store.execute(*c))
                except _RedisResponseError as e:
                    error = error or e
                    replies.append(e)
            if error is not None:
                raise error
            return replies

        return self._call(f"pipeline of {len(commands)}", run)

    def run_script(self, script, keys, args):
        return defer.fail(NotImplementedError("FakeRegistry does not run Lua scripts"))

    # -- IRegistry
    def register_server(self, uuid, info, ttl):
        k, x = self.keys, self.store.execute

        def run():
            x("SET", k.server(uuid), dumps(info), "PX", max(1, int(round(ttl * 1000))))
            x("SADD", k.servers(), uuid)

        return self._call("register_server", run)

    def refresh_server(self, uuid, info, ttl):
        k, x = self.keys, self.store.execute

        def run():
            ms = max(1, int(round(ttl * 1000)))
            existed = x("SET", k.server(uuid), dumps(info), "PX", ms, "XX") is not None
            if not existed:
                x("SET", k.server(uuid), dumps(info), "PX", ms)
            x("SADD", k.servers(), uuid)
            return existed

        return self._call("script refresh_server", run)

    def _remove_server(self, uuid, force):
        k, x = self.keys, self.store.execute
        if not force and x("EXISTS", k.server(uuid)):
            self.round_trips += 1
            return -1, 0, False
        removed = 0
        while True:
            self.round_trips += 1
            members = x("SPOP", k.wsconns(uuid), self.batch)
            for m in members:
                user_id, ip, port = RedisKeys.parse_wsconns_member(m)
                x("HDEL", k.ucir(user_id), k.conn_field(uuid, ip, port))
            removed += len(members)
            if not x("EXISTS", k.wsconns(uuid)):
                break
        if force:
            x("DEL", k.server(uuid))
        return 0, removed, bool(x("SREM", k.servers(), uuid))

    def unregister_server(self, uuid):
        if not self.available:
            return self._call("script reap_server", None)
        return defer.maybeDeferred(self._remove_server, uuid, True).addCallback(lambda r: r[1])

    def reap_server(self, uuid):
        if not self.available:
            return self._call("script reap_server", None)
        d = defer.maybeDeferred(self._remove_server, uuid, False)
        return d.addCallback(lambda r: r[0] == 0 and r[2])

    def add_connections(self, uuid, entries):
        k, x = self.keys, self.store.execute
        entries = [(u, ip, port, meta) for u, ip, port, meta in entries]
        if not entries:
            return defer.succeed(None)

        try:
            rows = [(k.ucir(u), k.conn_field(uuid, ip, port), dumps(meta), k.wsconns_member(u, ip, port))
                    for u, ip, port, meta in entries]
        except (ValueError, TypeError) as e:
            return defer.fail(e)  # nothing written, like RedisService

        def run():
            for key, field, value, member in rows:
                x("HSET", key, field, value)
                x("SADD", k.wsconns(uuid), member)

        return self._call("add_connections", run)

    def remove_connections(self, uuid, entries):
        k, x = self.keys, self.store.execute
        entries = [(u, ip, port) for u, ip, port, *_ in entries]
        if not entries:
            return defer.succeed(None)

        try:
            rows = [(k.ucir(u), k.conn_field(uuid, ip, port), k.wsconns_member(u, ip, port))
                    for u, ip, port in entries]
        except (ValueError, TypeError) as e:
            return defer.fail(e)

        def run():
            for key, field, member in rows:
                x("HDEL", key, field)
                x("SREM", k.wsconns(uuid), member)

        return self._call("remove_connections", run)

    def _hash(self, user_id):
        """``{conn_field: meta}`` of ``UCIR##<user_id>``, decoded as RedisService does."""
        import json

        flat = self.store.execute("HGETALL", self.keys.ucir(user_id))
        out = {}
        for i in range(0, len(flat), 2):
            try:
                out[flat[i]] = json.loads(flat[i + 1])
            except ValueError:
                out[flat[i]] = {}  # as RedisService: a connection without meta
        return out

    # -- revocations (HTTP-API.md revoke), as RedisService does them

    def _revocation(self, user_id):
        value = self.store.execute("GET", self.keys.revoked(user_id))
        try:
            return None if value is None else int(value)
        except (TypeError, ValueError):
            return None

    def add_connections_checked(self, uuid, entries):
        entries = list(entries)
        users = list(dict.fromkeys(e[0] for e in entries))
        if not entries:
            return defer.succeed({})
        # RedisService reads the revocations in the registration pipeline: one round trip
        revoked = {u: self._revocation(u) for u in users} if self.available else {}
        d = self.add_connections(uuid, entries)
        return d.addCallback(lambda _: revoked)

    def revoke(self, user_id, not_before_ms, ttl):
        def run():
            self.store.execute("SET", self.keys.revoked(user_id), str(int(not_before_ms)), "PX",
                               str(max(1, int(round(ttl * 1000)))))
            return self._hash(user_id)

        return self._call("revoke", run)

    def revocation(self, user_id):
        return self._call("GET", self._revocation, user_id)

    def connections_of(self, user_ids):
        users = list(dict.fromkeys(user_ids))
        if not users:
            return defer.succeed({})
        return self._call("connections_of", lambda: {u: self._hash(u) for u in users})

    def routes(self, user_ids, uuids=()):
        users = list(dict.fromkeys(user_ids))
        extra = list(dict.fromkeys(uuids))
        if not users and not extra:
            return defer.succeed(({}, set()))

        def run():
            conns = {u: self._hash(u) for u in users}
            involved = set(extra)
            for fields in conns.values():
                for field in fields:
                    uuid, sep, _ = field.partition(SEP)
                    if sep and uuid:
                        involved.add(uuid)
            return conns, {u for u in involved if self.store.execute("EXISTS", self.keys.server(u))}

        return self._call("script routes", run)

    def servers(self):
        return self._call("SMEMBERS", lambda: set(self.store.execute("SMEMBERS", self.keys.servers())))

    def alive(self, uuids):
        uuids = list(dict.fromkeys(uuids))
        if not uuids:
            return defer.succeed(set())
        return self._call("MGET", lambda: {u for u in uuids if self.store.execute("EXISTS", self.keys.server(u))})

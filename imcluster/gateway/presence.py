"""The gateway's side of typing and live presence (PROTOCOL.md 1.1 "Typing", "Presence").

:class:`TypingGate` lets at most one ``typing`` frame per ``typing_interval``
through for each connection and session; the rest are dropped silently
here, before any bus traffic. What passes is forwarded to the processors
like any frame (they check membership and route it: ``handlers/typing.py``).

:class:`PresenceHub` answers ``presence_subscribe`` / ``presence_unsubscribe``
itself (the processors never see them) and sends ``presence`` frames:

* per connection, the users it follows and the state it was last told of
  each (None while its ``presence_reply`` is on the way); at most
  ``presence_max`` users (``too_large`` beyond, and the frame changes
  nothing);
* per gateway, the users any of its connections follow: their channel
  ``PRESENCE##<user>`` is subscribed once (:class:`~imcluster.presence.RedisSubscriber`,
  or one per shard: :class:`~imcluster.presence.ShardedSubscriber`; SUBSCRIBEs of one
  reactor turn batched), and their latest known state
  ``(ts, online)`` is kept, so a second follower costs no Redis round trip;
* a user followed for the first time is subscribed *then* read
  (``Tracker.states``), so no change can fall between the two; a published
  transition and a read are ordered by their version (``ts``): the newer wins;
* a change is sent to every follower whose last state differs: a connection
  never gets two frames in a row with the same state;
* after the pub/sub connection was lost and made again, every followed user
  is read again (changes published meanwhile were missed; with several
  shards, one connection each, the users of the shard that came back), and
  the gateway checks that it is still registered (a processor may have taken
  it for dead).

Connection entries and transitions: the gateway's connection writer runs
``Tracker.reconcile`` for the users of each flush (``service.py``).
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from imcluster import metrics
from imcluster import protocol as p
from imcluster.presence import STATE_PREFIX, liveness_channel, state_key, user_of_channel

PRESENCE_REPLY = "presence_reply"


class TypingGate:
    """At most one ``typing`` per ``interval`` seconds per connection and session."""

    #: sessions remembered per connection before old entries are pruned
    PRUNE_AT = 64

    def __init__(self, interval: float, clock: Any) -> None:
        self.interval = interval
        self.clock = clock
        self._last: dict[Any, dict[str, float]] = {}
        self.dropped = 0

    def allow(self, conn: Any, session_id: str) -> bool:
        """True: forward this one (and remember when); False: drop it."""
        if self.interval <= 0:
            return True
        now = self.clock.seconds()
        sessions = self._last.get(conn)
        if sessions is None:
            sessions = self._last[conn] = {}
        last = sessions.get(session_id)
        if last is not None and now - last < self.interval:
            self.dropped += 1
            metrics.TYPING_DROPPED.inc()
            return False
        if len(sessions) >= self.PRUNE_AT:
            # bounded: the rate limit caps how many sessions are younger than the interval
            for sid in [s for s, t in sessions.items() if now - t >= self.interval]:
                del sessions[sid]
        sessions[session_id] = now
        return True

    def forget(self, conn: Any) -> None:
        self._last.pop(conn, None)


class _Load:
    """Users subscribed then read together; the frames waiting for them."""

    __slots__ = ("users", "waiters", "result", "done")

    def __init__(self) -> None:
        self.users: set[str] = set()
        self.waiters: list[defer.Deferred] = []
        self.done = False
        self.result: Any = None

    def wait(self) -> defer.Deferred:
        d = defer.Deferred()
        if self.done:
            self._give(d)
        else:
            self.waiters.append(d)
        return d

    def fire(self, result: Any) -> None:
        self.done, self.result = True, result
        waiters, self.waiters = self.waiters, []
        for d in waiters:
            self._give(d)

    def _give(self, d: defer.Deferred) -> None:
        if isinstance(self.result, Failure):
            d.errback(self.result)
        else:
            d.callback(None)


class PresenceHub:
    """Presence subscriptions of one gateway's connections (module docstring)."""

    log = Logger()

    def __init__(self, config: Any, tracker: Any, clock: Any,
                 make_subscriber: Callable[[Callable[[str, str], Any]], Any]) -> None:
        self.config = config
        self.tracker = tracker
        self.clock = clock
        self.prefix = tracker.prefix
        self.max_users = config.presence_max
        self.subscriber = make_subscriber(self._on_message)
        self._channel_prefix = self.prefix + STATE_PREFIX
        #: conn -> {user: last state sent (None: its reply is on the way)}
        self._follows: dict[Any, dict[str, bool | None]] = {}
        #: user -> connections following it
        self._followers: dict[str, set[Any]] = {}
        #: user -> (ts, online): the latest state known, for the users followed here
        self._known: dict[str, tuple[int, bool]] = {}
        #: user -> the subscribe-then-read in flight for it
        self._loading: dict[str, _Load] = {}
        #: the users to subscribe and read at the end of this turn
        self._next_load: _Load | None = None
        self._to_drop: set[str] = set()
        self._call: Any = None
        self._liveness: str | None = None
        self.on_reconnect: Callable[[], Any] | None = None
        self.subscriber.add_reconnect_listener(self._resubscribed)
        self.frames_sent = 0

    # --- lifecycle

    def start(self, server_id: str) -> defer.Deferred:
        """Connect the pub/sub connection and subscribe this gateway's liveness channel.

        Done before the gateway registers: a processor never sees it
        registered without that subscription.
        """
        if self._liveness is not None:
            self.subscriber.unsubscribe([self._liveness])  # a restart: a new uuid
        self._liveness = liveness_channel(self.prefix, server_id)
        d = defer.maybeDeferred(self.subscriber.start)
        d.addCallback(lambda _: self.subscriber.subscribe([self._liveness]))
        return d

    def stop(self) -> defer.Deferred:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        return defer.maybeDeferred(self.subscriber.stop)

    @property
    def followed(self) -> int:
        """Users followed by this gateway's connections."""
        return len(self._followers)

    # --- frames

    def subscribe(self, conn: Any, frame: dict) -> defer.Deferred:
        """``presence_subscribe``: follow ``users``; answered ``presence_reply`` once their states are known."""
        users = frame["users"]
        follows = self._follows.get(conn)
        if follows is None:
            follows = self._follows[conn] = {}
        new = [u for u in users if u not in follows]
        if len(follows) + len(new) > self.max_users:
            self._reply_error(conn, frame, p.TOO_LARGE,
                              f"a connection follows at most {self.max_users} users "
                              f"({len(follows)} now, {len(new)} more asked)")
            if not follows:
                del self._follows[conn]
            return defer.succeed(None)
        for u in new:
            follows[u] = None
            self._followers.setdefault(u, set()).add(conn)
            self._to_drop.discard(u)
        # one wait per batch of loads the frame's users are in (usually one), not one per user
        waits = {}
        for u in users:
            batch = self._loading.get(u)
            if batch is None:
                if u in self._known:
                    continue
                batch = self._batch_to_load()
                batch.users.add(u)
            waits[id(batch)] = batch
        if not waits:
            self._answer(conn, frame, users)
            return defer.succeed(None)
        waits = [b.wait() for b in waits.values()]
        d = defer.gatherResults(waits, consumeErrors=True)

        def loaded(_: Any) -> None:
            self._answer(conn, frame, users)

        def failed(f: Failure) -> None:
            err = f.value.subFailure if isinstance(f.value, defer.FirstError) else f
            self.log.warn("presence_subscribe from {conn}: {err}", conn=getattr(conn, "conn_id", conn),
                          err=err.getErrorMessage())
            mine = self._follows.get(conn)
            if mine is not None:
                for u in new:
                    if mine.get(u, False) is None:
                        self._unfollow(conn, mine, u)
            self._reply_error(conn, frame, p.UNAVAILABLE, "presence is not available now; retry")

        return d.addCallbacks(loaded, failed)

    def unsubscribe(self, conn: Any, frame: dict) -> None:
        """``presence_unsubscribe``: stop following ``users``; answered ``presence_reply`` with no users."""
        follows = self._follows.get(conn)
        if follows is not None:
            for u in frame["users"]:
                if u in follows:
                    self._unfollow(conn, follows, u)
            if not follows:
                del self._follows[conn]
        reply = {"type": PRESENCE_REPLY, "ok": True, "users": []}
        if "id" in frame:
            reply["id"] = frame["id"]
        conn.send_frame(reply)

    def connection_lost(self, conn: Any) -> None:
        """Subscriptions end with the connection."""
        follows = self._follows.pop(conn, None)
        if follows:
            for u in list(follows):
                self._unfollow(conn, follows, u)

    # --- following

    def _unfollow(self, conn: Any, follows: dict, user: str) -> None:
        follows.pop(user, None)
        followers = self._followers.get(user)
        if followers is not None:
            followers.discard(conn)
            if not followers:
                del self._followers[user]
                self._to_drop.add(user)
                self._schedule()

    def _batch_to_load(self) -> "_Load":
        """The batch of users to subscribe and read at the end of this reactor turn."""
        if self._next_load is None:
            self._next_load = _Load()
            self._schedule()
        return self._next_load

    def _schedule(self) -> None:
        if self._call is None:
            self._call = self.clock.callLater(0, self._flush)

    def _flush(self) -> None:
        self._call = None
        drop = [u for u in self._to_drop if u not in self._followers]
        self._to_drop.clear()
        if drop:
            for u in drop:
                self._known.pop(u, None)
            self.subscriber.unsubscribe([state_key(self.prefix, u) for u in drop])
        batch, self._next_load = self._next_load, None
        if batch is None:
            return
        users = list(batch.users)
        for u in users:
            self._loading[u] = batch
        d = self.subscriber.subscribe([state_key(self.prefix, u) for u in users])
        d.addCallback(lambda _: self.tracker.states(users))
        d.addCallback(lambda result: self._apply_read(*result))

        def finish(r: Any) -> None:
            for u in users:
                if self._loading.get(u) is batch:
                    del self._loading[u]
            batch.fire(r)

        d.addBoth(finish)

    def _apply_read(self, t_ms: int, states: dict) -> None:
        for user, state in states.items():
            if state is None:
                # no state as of t_ms: offline (a transition in that same ms is newer)
                state = (t_ms - 1, False)
            self._apply(user, state[0], state[1])

    def _apply(self, user: str, ts: int, online: bool) -> None:
        followers = self._followers.get(user)
        if followers is None:
            return
        known = self._known.get(user)
        if known is not None and ts <= known[0]:
            return
        self._known[user] = (ts, online)
        if known is not None and known[1] == online:
            return
        encoded = None
        for conn in followers:
            follows = self._follows.get(conn)
            if follows is None:
                continue
            last = follows.get(user)
            if last is None or last == online:
                continue  # its reply is on the way (and says the latest), or it knows
            follows[user] = online
            if encoded is None:
                encoded = p.encode_bytes({"type": "presence", "userId": user, "online": online, "ts": ts})
            conn.send_encoded(encoded)
            self.frames_sent += 1
            metrics.PRESENCE_FRAMES.inc()

    def _answer(self, conn: Any, frame: dict, users: list[str]) -> None:
        follows = self._follows.get(conn)
        if follows is None:
            return  # gone meanwhile
        entries = []
        for u in users:
            if u not in follows:
                continue  # unsubscribed meanwhile
            ts, online = self._known.get(u, (0, False))
            follows[u] = online
            entry: dict = {"userId": u, "online": online}
            if online:
                entry["since"] = ts
            entries.append(entry)
        reply = {"type": PRESENCE_REPLY, "ok": True, "users": entries}
        if "id" in frame:
            reply["id"] = frame["id"]
        conn.send_frame(reply)

    def _reply_error(self, conn: Any, frame: dict, code: str, message: str) -> None:
        metrics.ERRORS.labels(code=code).inc()
        reply = {"type": PRESENCE_REPLY, "ok": False, "error": {"code": code, "message": message}}
        if "id" in frame:
            reply["id"] = frame["id"]
        conn.send_frame(reply)

    # --- Redis

    def _on_message(self, channel: str, data: str) -> None:
        if not channel.startswith(self._channel_prefix):
            return
        user = user_of_channel(channel[len(self._channel_prefix):])
        ts, sep, flag = data.partition(":")
        if not sep or not ts.isdigit():
            return
        self._apply(user, int(ts), flag == "1")

    def _resubscribed(self, channels: Any = None) -> Any:
        """The pub/sub connection is back: read every followed user again, and check our registration.

        ``channels``: with one connection per shard, those of the shard that
        came back (only its users are read again); None: every user.
        """
        users = list(self._followers)
        if channels is not None:
            users = [u for u in users if state_key(self.prefix, u) in channels]
        ds = []
        size = getattr(self.tracker, "batch", 1000)
        for i in range(0, len(users), size):
            chunk = users[i:i + size]
            d = self.tracker.states(chunk)
            d.addCallbacks(lambda r: self._apply_read(*r),
                           lambda f: self.log.warn("reading presence again failed: {err}", err=f.getErrorMessage()))
            ds.append(d)
        if self.on_reconnect is not None:
            ds.append(defer.maybeDeferred(self.on_reconnect))
        return defer.DeferredList(ds, consumeErrors=True)

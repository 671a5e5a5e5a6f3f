"""The protocol engine of one client connection, whatever the transport.

:class:`ClientConnection` runs PROTOCOL.md for one client: authentication
and its timers, token expiry and refresh, bad-frame accounting, rate
limiting, ping/pong, forwarding frames to the hub, and the slow-consumer
rule. It knows nothing of sockets and never asks which transport it runs
on: a thin adapter providing
:class:`~imcluster.interfaces.ITransportAdapter`
(:mod:`imcluster.gateway.websocket`, :mod:`imcluster.gateway.rawsocket`,
:mod:`imcluster.gateway.stream`)
feeds it complete frames and carries out what it asks for: write an encoded
frame (``write_message``), tell the output it holds (``buffered_bytes``),
and close for one of PROTOCOL.md's reasons (``close_for``, with a
:class:`~imcluster.gateway.transport.CloseReason` that each adapter renders:
a WebSocket close code, or an ``error`` frame then a close).

The engine also is the ``IPushProducer`` an adapter registers on its
transport: ``pauseProducing`` means the transport holds more than its buffer
size, and from then on (until ``resumeProducing``: the buffer drained) every
write measures the pending output (``buffered_bytes``, or the bytes written
since the pause when the transport cannot tell). Pending output above
``output_buffer_limit`` after ``slow_consumer_grace`` seconds, when the
client took less than ``output_buffer_limit`` bytes of it during those
seconds, closes the connection as a slow consumer (4003; TCP ``error``
``slow_consumer``): PROTOCOL.md closes a client that *stops reading*. The
grace is for bursts: a sync page or a history page of large messages is
written in one reactor turn, can be many times the limit, and has not met
the kernel yet; a client draining it at ``output_buffer_limit`` bytes per
grace period or faster is reading, is not slow, and gets another period.
Whatever the client does, pending output above ``output_buffer_max`` closes
it at once: that bounds the gateway's memory per connection. Nothing of this
runs while the client keeps up. What an adapter writes on its own (Autobahn's
pongs) it reports with :meth:`ClientConnection.output_written`, so a client
flooding pings and not reading is measured and closed the same way.

The hub (``imcluster.gateway.service.GatewayService``) is described in
``/work/notes/GATEWAY.md``: ``server_id``, ``authenticator``, ``clock``,
``config``, ``connection_made``, ``authenticated``, ``request_sync``,
``forward``, ``connection_lost``. ``hub.connection_lost(conn)`` is called
exactly once for every connection that ``hub.connection_made`` accepted,
whatever ends it; a refused connection is never passed to it.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from imcluster import metrics
from imcluster import protocol as p
from imcluster.auth import AuthError, TokenRevoked, usable_timestamp
from imcluster.gateway import transport as closes
from imcluster.gateway.timers import wheel
from imcluster.gateway.transport import CloseReason, transport_counters
from imcluster.interfaces import IClientConnection

# engine states
NEW, OPEN, CLOSING, CLOSED = range(4)


# prometheus children looked up once: labels() is too slow for every frame
_FRAMES_IN: dict[tuple[str, str], Any] = {}


def _frames_in(transport: str, frame_type: str) -> Any:
    key = (transport, frame_type)
    child = _FRAMES_IN.get(key)
    if child is None:
        child = _FRAMES_IN[key] = metrics.FRAMES_IN.labels(transport=transport, type=frame_type)
    return child


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; one token per frame."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = now

    def take(self, now: float) -> bool:
        """Take one token; False when the bucket is empty."""
        elapsed = now - self.stamp
        if elapsed > 0:
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


@implementer(IClientConnection, IPushProducer)
class ClientConnection:
    """One client connection on a gateway: PROTOCOL.md's rules, transport-agnostic.

    ``adapter`` provides :class:`~imcluster.interfaces.ITransportAdapter`;
    its ``transport_name`` and ``client_address`` name the connection.

    Attributes for the hub: ``transport_name`` (``'ws'``/``'tcp'``), ``ip``,
    ``port``, ``peer_key`` (``<ip>##<port>``), ``conn_id``
    (``<serverId>##<ip>##<port>``), ``user_id``, ``device``, ``identity``
    (None until authenticated), ``connected_at`` (``hub.clock`` seconds).

    Authentication, as a careful client author expects it:

    * Until ``auth`` succeeds, any other frame gets ``error``
      ``not_authenticated`` and the connection stays open; no ``auth``
      within ``auth_timeout`` closes it (4001; TCP ``error``
      ``auth_timeout``).
    * A failed ``auth`` (``invalid_token``, ``token_expired``) is answered
      with ``auth_reply`` ``ok:false`` and closes the connection (4001), also
      when it was meant as a refresh: the client learns that its credentials
      are bad and reconnects with good ones.
    * ``auth`` again on an authenticated connection with a fresh token for the
      same ``sub`` is a refresh: ``auth_reply`` ``ok:true`` as for the first
      one, and the expiry close moves to the new token's ``exp``. A token for
      a different ``sub`` is ``invalid_token`` (then close 4001): a connection
      belongs to one user for its life; switching users means reconnecting.
    * When the current token's ``exp`` passes without a refresh the
      connection closes (4002; TCP ``error`` ``token_expired``). The JWT
      leeway, which forgives clock skew when a token is checked, does not
      extend a connection's life.
    * ``auth_reply`` ``ok:false`` ``unavailable`` (the hub could not record
      the connection) leaves the connection open and unauthenticated.
    * Frames that arrive while an ``auth`` is being decided wait and are then
      processed in order, so a client may send ``auth`` and its first frames
      back to back.
    """

    log = Logger()

    # tens of thousands of these live in one gateway: no __dict__ (about 1.3 KB each)
    __slots__ = ("hub", "transport_name", "ip", "port", "peer_key", "conn_id", "user_id", "device", "identity",
                 "connected_at", "_adapter", "_clock", "_timers", "_max_frame_size", "_max_bad", "_max_depth",
                 "_auth_timeout", "_idle_timeout", "_output_limit", "_output_max", "_slow_grace", "_queue_limit",
                 "_bucket", "_bytes_in", "_frames_out", "_bytes_out", "_state", "_authed", "_auth_pending",
                 "_held", "_bad_in_a_row", "_last_activity", "_paused", "_paused_bytes", "_written",
                 "_grace_pending", "_grace_written", "_auth_call", "_idle_call", "_expiry_call", "_slow_call",
                 "_accepted")

    def __init__(self, hub: Any, adapter: Any) -> None:
        self.hub = hub
        transport_name = adapter.transport_name
        ip, port = adapter.client_address
        self.transport_name = transport_name
        self.ip = ip
        self.port = port
        self.peer_key = f"{ip}##{port}"
        self.conn_id = f"{hub.server_id}##{self.peer_key}"
        self.user_id: str | None = None
        self.device: str | None = None
        self.identity: Any = None
        self._adapter = adapter
        self._clock = hub.clock
        # the auth, idle and expiry deadlines: coarse timers shared by every connection
        self._timers = wheel(hub.clock)
        self.connected_at = self._clock.seconds()
        config = hub.config
        self._max_frame_size = config.max_frame_size
        self._max_bad = config.max_bad_frames
        self._max_depth = getattr(config, "max_json_depth", p.DEFAULT_MAX_DEPTH)
        self._auth_timeout = config.auth_timeout
        self._idle_timeout = config.idle_timeout
        self._output_limit = config.output_buffer_limit
        self._output_max = max(getattr(config, "output_buffer_max", 64 << 20), self._output_limit)
        self._slow_grace = config.slow_consumer_grace
        self._queue_limit = config.rate_burst
        self._bucket = TokenBucket(config.rate_limit, config.rate_burst, self.connected_at)
        self._bytes_in, self._frames_out, self._bytes_out = transport_counters(transport_name)

        self._state = NEW
        self._authed = False
        self._auth_pending = False
        self._held: deque[dict] | None = None  # frames waiting for an auth's outcome
        self._bad_in_a_row = 0
        self._last_activity = self.connected_at
        self._paused = False
        self._paused_bytes = 0
        # bytes handed to the transport since the connection opened, and the pending
        # output and that count when the slow-consumer grace began (to measure draining)
        self._written = 0
        self._grace_pending = 0
        self._grace_written = 0
        self._auth_call: Any = None
        self._idle_call: Any = None
        self._expiry_call: Any = None
        self._slow_call: Any = None
        self._accepted = False

    def __repr__(self) -> str:
        return f"<ClientConnection {self.transport_name} {self.conn_id} user={self.user_id}>"

    # --- adapter side

    def open(self) -> bool:
        """Offer the connection to the hub; start its timers when accepted.

        False: the hub refused it (the adapter closes it right away and the
        hub never hears of it again).
        """
        if not self.hub.connection_made(self):
            self._state = CLOSED
            metrics.CLOSES.labels(reason="refused").inc()
            return False
        self._accepted = True
        self._state = OPEN
        self._auth_call = self._timers.call_later(self._auth_timeout, self._auth_timed_out)
        self._idle_call = self._timers.call_later(self._idle_timeout, self._idle_check)
        return True

    def frame_received(self, data: bytes) -> None:
        """One complete client frame (JSON text as bytes) arrived."""
        if self._state != OPEN:
            return
        now = self._clock.seconds()
        self._last_activity = now
        self._bytes_in.inc(len(data))
        if len(data) > self._max_frame_size:
            self.frame_too_large()
            return
        try:
            frame = p.parse_client_frame(data, self._max_depth)
        except p.FrameError as e:
            self._bucket.take(now)
            _frames_in(self.transport_name, "invalid").inc()
            self._bad_frame(e.reply())
            return
        frame_type = frame["type"]
        _frames_in(self.transport_name, frame_type).inc()
        self._bad_in_a_row = 0
        # PROTOCOL.md: acknowledgements, pings and auth never draw from the bucket
        if p.RATE_COST.get(frame_type, 1) and not self._bucket.take(now):
            self._reply_error(frame, p.RATE_LIMITED, "too many frames; slow down")
            return
        if self._auth_pending:
            if self._held is None:
                self._held = deque()
            elif len(self._held) >= self._queue_limit:
                self._reply_error(frame, p.RATE_LIMITED, "too many frames before auth_reply")
                return
            self._held.append(frame)
            return
        self._dispatch(frame)

    def binary_received(self, size: int) -> None:
        """A WebSocket binary message arrived: a bad frame (PROTOCOL.md)."""
        if self._state != OPEN:
            return
        self._last_activity = self._clock.seconds()
        self._bytes_in.inc(size)
        _frames_in(self.transport_name, "binary").inc()
        self._bad_frame(p.error_frame(p.BAD_FRAME, "binary messages are not accepted; send text"))

    def frame_too_large(self) -> None:
        """The client sent (or announced) a frame over ``max_frame_size``."""
        self._close(closes.TOO_LARGE)

    def activity(self) -> None:
        """The client sent something that is not a frame (a WebSocket ping or pong)."""
        self._last_activity = self._clock.seconds()

    def connection_lost(self) -> None:
        """The transport is gone (any reason). Idempotent."""
        if self._state == CLOSED:
            return
        self._state = CLOSED
        self._cancel_timers()
        self._held = None
        if self._accepted:
            self._accepted = False
            try:
                self.hub.connection_lost(self)
            except Exception:
                self.log.failure("hub.connection_lost failed for {conn}", conn=self.conn_id)

    # IPushProducer: the transport tells us when the client stops reading

    def pauseProducing(self) -> None:  # noqa: N802 (Twisted API)
        if not self._paused:
            self._paused = True
            self._paused_bytes = 0

    def resumeProducing(self) -> None:  # noqa: N802
        # the transport's buffer is empty again: whatever was pending was read
        self._paused = False
        if self._slow_call is not None:
            call, self._slow_call = self._slow_call, None
            if call.active():
                call.cancel()

    def stopProducing(self) -> None:  # noqa: N802
        self._paused = False

    # --- hub side (IClientConnection)

    @property
    def is_open(self) -> bool:
        """True until the connection starts closing."""
        return self._state == OPEN

    @property
    def authenticated(self) -> bool:
        """True once ``auth`` succeeded (and the hub recorded it)."""
        return self._authed

    def send_frame(self, frame: dict) -> None:
        """Send one frame (a dict) to the client; dropped once the connection is closing."""
        if self._state == OPEN:
            self._deliver(p.encode_bytes(frame))

    def send_encoded(self, data: str | bytes) -> None:
        """Send one frame already serialized (JSON text or its UTF-8 bytes).

        The hub serializes a delivery once and hands it to many connections:
        pass bytes to save the per-connection encode.
        """
        if self._state == OPEN:
            self._deliver(data.encode("utf-8") if isinstance(data, str) else data)

    def close(self, code: int, reason: str) -> None:
        """Close with WebSocket ``code``; a TCP client first gets the ``error`` frame for it."""
        self._close(CloseReason.for_code(code, reason))

    def kick(self, reason: CloseReason) -> None:
        """An operator's kick or revoke (``closes.KICKED``, ``closes.TOKEN_REVOKED``).

        PROTOCOL.md 1.1: ``{"type":"error","code":"kicked"}`` (or
        ``token_revoked``) on every transport, then the close (WebSocket 4004).
        """
        if self._state != OPEN:
            return
        self._send_error(p.error_frame(reason.name, reason.text))
        self._close(reason)

    @property
    def issued_at(self) -> Any:
        """The ``iat`` claim of the token the connection authenticated with (None if none)."""
        claims = getattr(self.identity, "claims", None)
        return claims.get("iat") if isinstance(claims, dict) else None

    def going_away(self) -> None:
        """The gateway stops: WebSocket 1001, TCP ``error`` ``going_away``; the client reconnects elsewhere."""
        self._close(closes.GOING_AWAY)

    # --- output

    def output_written(self, size: int) -> None:
        """The adapter wrote ``size`` bytes of its own (a WebSocket pong): pending output too.

        Autobahn answers a ping by writing the pong straight to the transport;
        counted here, a client flooding pings and not reading is closed as a
        slow consumer like any other (PROTOCOL.md "Framing").
        """
        if self._state == OPEN:
            self._account(size)

    def _deliver(self, data: bytes) -> None:
        self._adapter.write_message(data)
        self._frames_out.inc()
        self._bytes_out.inc(len(data))
        self._account(len(data))

    def _account(self, size: int) -> None:
        self._written += size
        if self._paused:
            # only while the transport says the client is not keeping up
            self._paused_bytes += size
            pending = self._pending_output()
            if pending > self._output_max:
                # reading or not, one connection may not hold more than this
                self._slow_consumer(pending)
            elif self._slow_call is None:
                if pending > self._output_limit:
                    # a burst (a sync page, a history page) has not met the kernel
                    # yet: give a reading client the grace period to take it
                    self._arm_slow_check(pending)

    def _arm_slow_check(self, pending: int) -> None:
        self._grace_pending = pending
        self._grace_written = self._written
        self._slow_call = self._clock.callLater(self._slow_grace, self._slow_check)

    def _pending_output(self) -> int:
        pending = self._adapter.buffered_bytes()
        return self._paused_bytes if pending is None else pending

    def _slow_check(self) -> None:
        self._slow_call = None
        if self._state == OPEN and self._paused:
            pending = self._pending_output()
            if pending > self._output_limit:
                # PROTOCOL.md closes a client that *stops reading*: one that took at
                # least output_buffer_limit bytes during the grace is reading, however
                # big the burst (a sync of large messages), and gets another period
                drained = self._grace_pending + (self._written - self._grace_written) - pending
                if drained < self._output_limit:
                    self._slow_consumer(pending)
                else:
                    self._arm_slow_check(pending)

    def _slow_consumer(self, pending: int) -> None:
        self.log.info("closing slow consumer {conn}: {pending} bytes pending",
                      conn=self.conn_id, pending=pending)
        self._close(closes.SLOW_CONSUMER)

    def _send(self, frame: dict) -> None:
        if self._state == OPEN:
            self._deliver(p.encode_bytes(frame))

    def _send_error(self, reply: dict) -> None:
        error = reply.get("error")
        code = error["code"] if error else reply["code"]
        metrics.ERRORS.labels(code=code).inc()
        self._send(reply)

    def _reply_error(self, frame: dict, code: str, message: str) -> None:
        self._send_error(p.reply_to(frame, code, message))

    def _close(self, reason: CloseReason) -> None:
        if self._state != OPEN:
            return
        self._state = CLOSING
        self._cancel_timers()
        self._held = None
        metrics.CLOSES.labels(reason=reason.name).inc()
        self.log.debug("closing {conn}: {why} ({code} {reason})", conn=self.conn_id, why=reason.name,
                       code=reason.code, reason=reason.text)
        # the adapter renders it: a close code, or an error frame and a close
        self._adapter.close_for(reason)

    # --- timers

    def _cancel_timers(self) -> None:
        for name in ("_auth_call", "_idle_call", "_expiry_call", "_slow_call"):
            call = getattr(self, name)
            if call is not None:
                setattr(self, name, None)
                if call.active():
                    call.cancel()

    def _auth_timed_out(self) -> None:
        self._auth_call = None
        self._close(closes.AUTH_TIMEOUT)

    def _idle_check(self) -> None:
        # rescheduled lazily instead of on every frame: one timer per idle period
        self._idle_call = None
        if self._state != OPEN:
            return
        remaining = self._last_activity + self._idle_timeout - self._clock.seconds()
        if remaining > 0:
            self._idle_call = self._timers.call_later(remaining, self._idle_check)
            return
        self._close(closes.IDLE_TIMEOUT)

    def _schedule_expiry(self, exp: Any) -> None:
        if self._expiry_call is not None and self._expiry_call.active():
            self._expiry_call.cancel()
        self._expiry_call = None
        if exp is None:
            return
        # _auth refused an exp that is not usable_timestamp(): float() cannot overflow here
        delay = max(0.0, float(exp) - self._clock.seconds())
        self._expiry_call = self._timers.call_later(delay, self._token_expired)

    def _token_expired(self) -> None:
        self._expiry_call = None
        self._close(closes.TOKEN_EXPIRED)

    # --- input

    def _bad_frame(self, reply: dict) -> None:
        self._bad_in_a_row += 1
        self._send_error(reply)
        if self._bad_in_a_row > self._max_bad:
            # the bad_frame error just sent tells a client without close codes why
            self._close(closes.BAD_FRAMES)

    def _dispatch(self, frame: dict) -> None:
        frame_type = frame["type"]
        if frame_type == p.AUTH:
            self._auth(frame)
        elif not self._authed:
            # PROTOCOL.md: an `error` frame, even for a `message`
            self._send_error(p.error_frame(p.NOT_AUTHENTICATED, "send auth first", p.frame_ref(frame)))
        elif frame_type == p.PING:
            self._send(p.PONG)
        else:
            self._forward(frame)

    def _forward(self, frame: dict) -> None:
        try:
            d = defer.maybeDeferred(self.hub.forward, self, frame)
        except Exception:  # maybeDeferred catches; belt and braces
            d = defer.fail()
        d.addErrback(self._forward_failed, frame)

    def _forward_failed(self, failure: Failure, frame: dict) -> None:
        if self._state != OPEN:
            return
        self.log.warn("could not forward {type} from {conn}: {error}", type=frame["type"],
                      conn=self.conn_id, error=failure.getErrorMessage())
        self._reply_error(frame, p.UNAVAILABLE, "the server could not take it; retry")

    def _drain_held(self) -> None:
        while self._held and not self._auth_pending and self._state == OPEN:
            self._dispatch(self._held.popleft())

    # --- authentication

    def _auth(self, frame: dict) -> None:
        try:
            identity = self.hub.authenticator.authenticate(frame["token"])
        except AuthError as e:
            code = e.code if e.code in (p.INVALID_TOKEN, p.TOKEN_EXPIRED) else p.INVALID_TOKEN
            self._auth_refused(code, str(e) or code)
            return
        except Exception:
            # a bug, not the client's fault: it may retry
            self.log.failure("authenticator failed on a token from {conn}", conn=self.conn_id)
            self._send_error(p.auth_reply_error(p.UNAVAILABLE, "cannot check tokens now; retry"))
            return
        if self._authed and identity.user_id != self.user_id:
            self._auth_refused(p.INVALID_TOKEN, "token is for another user than this connection's")
            return
        exp = getattr(identity, "exp", None)
        if exp is not None and not usable_timestamp(exp):
            # an authenticator should have refused it; decided before the hub records
            # anything, so the connection is never left half-authenticated
            self._auth_refused(p.INVALID_TOKEN, "token 'exp' is not a usable time")
            return
        refresh = self._authed
        if not refresh:
            self.user_id = identity.user_id
            self.device = frame.get("device")
            self.identity = identity
        self._auth_pending = True
        d = defer.maybeDeferred(self.hub.authenticated, self, identity, refresh)
        d.addCallbacks(self._auth_recorded, self._auth_not_recorded,
                       callbackArgs=(identity, refresh), errbackArgs=(refresh,))
        d.addErrback(self._bug, "auth")

    def _auth_refused(self, code: str, message: str) -> None:
        metrics.AUTH_FAILURES.labels(code=code).inc()
        self.log.info("auth refused on {conn}: {code}", conn=self.conn_id, code=code)
        self._send_error(p.auth_reply_error(code, message))
        self._close(closes.AUTH_FAILED.because(code))

    def _auth_recorded(self, _: Any, identity: Any, refresh: bool) -> None:
        self._auth_pending = False
        if self._state != OPEN:
            return
        self.identity = identity
        if not refresh:
            self._authed = True
            if self._auth_call is not None:
                if self._auth_call.active():
                    self._auth_call.cancel()
                self._auth_call = None
        self._schedule_expiry(getattr(identity, "exp", None))
        self._send(p.auth_reply_ok(self.user_id, self.conn_id, self.hub.server_id))
        if not refresh:
            d = defer.maybeDeferred(self.hub.request_sync, self)
            d.addErrback(self._sync_failed)
        self._drain_held()

    def _auth_not_recorded(self, failure: Failure, refresh: bool) -> None:
        self._auth_pending = False
        if self._state != OPEN:
            return
        if failure.check(TokenRevoked):
            # the revocation was read in the registration pipeline (HTTP-API.md revoke)
            self._auth_refused(p.TOKEN_REVOKED, failure.getErrorMessage())
            return
        self.log.warn("could not record auth of {conn}: {error}", conn=self.conn_id,
                      error=failure.getErrorMessage())
        if not refresh:
            self.user_id = self.device = self.identity = None
        self._send_error(p.auth_reply_error(p.UNAVAILABLE, "the server could not record the connection; retry"))
        self._drain_held()

    def _sync_failed(self, failure: Failure) -> None:
        if self._state != OPEN:
            return
        self.log.warn("sync request for {conn} failed: {error}", conn=self.conn_id,
                      error=failure.getErrorMessage())
        self._send_error(p.error_frame(
            p.UNAVAILABLE, "could not fetch undelivered messages; they come with the next auth"))

    def _bug(self, failure: Failure, where: str) -> None:
        self.log.failure("bug in {where} handling of {conn}", failure, where=where, conn=self.conn_id)

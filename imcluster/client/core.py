"""The imcluster client: PROTOCOL.md as calls, callbacks and Deferreds, across reconnects.

An application gives :class:`Client` gateway URLs and a token (or a
function that returns a fresh one) and then only calls
:meth:`~Client.send`, :meth:`~Client.history`, :meth:`~Client.read` and
:meth:`~Client.create_session`, and handles ``on_message``. Connections come
and go underneath; what the application sees does not:

* **Reconnects.** A lost connection is replaced with exponential backoff
  (with jitter), trying the next URL of the list each time, so a client
  moves to another gateway when its own goes away (a gateway that stops
  says "going away": the next one is tried at once). Each new connection
  authenticates again, with a fresh token from ``get_token`` when given.
* **No lost or doubled message.** A :meth:`~Client.send` is kept until its
  ``message_reply`` arrives; whatever was unanswered when a connection
  dropped is sent again, in order, with the same ``clientMsgId`` (the
  server then answers with the original ``msgId``/``seq`` and stores
  nothing twice). ``unavailable`` and ``rate_limited`` replies are retried
  the same way after a delay; other errors fail the Deferred with
  :class:`SendError`.
* **Exactly-once handling of received messages.** ``on_message(frame)``
  is called once per ``msgId`` (the server may deliver twice), one at a
  time (a handler that returns a Deferred holds the next message until it
  fires), in arrival order, except right after authenticating: the sync of
  undelivered messages races with new live deliveries, so what arrives
  before ``sync_done`` is held and handed over sorted by session and
  ``seq`` (for at most ``sync_hold`` seconds). The message is acknowledged
  (``message_send_reply``, coalesced) only after the handler has returned
  or its Deferred has fired; a handler that fails leaves the message
  unacknowledged, so it comes again with the next connection's sync.
  Duplicates are acknowledged again without calling the handler.
* **Keepalive.** A ``ping`` frame every ``ping_interval`` seconds (both
  transports); a connection silent for ``ping_timeout`` after a ping is
  dropped and replaced.
* **Token refresh.** With ``get_token``, a fresh token is sent on the open
  connection ``refresh_margin`` seconds before the current one's ``exp``.
* **Frame size.** Every frame is measured before it is sent: one over
  ``max_frame_size`` (65536 bytes, the gateway's default; an ``auth_reply``
  that names ``maxFrameSize`` lowers it) fails at once with ``too_large``
  instead of making the gateway close the connection (WebSocket 1009). When
  a gateway with a smaller limit closes anyway, the largest unanswered frame
  sent on that connection fails with ``too_large`` and is never sent again.
* **Version 1.1.** Events (``kind`` ``recall``, ``edit``, ``members``) come
  to ``on_message`` like messages (handled once, acknowledged after);
  :meth:`~Client.recall`, :meth:`~Client.edit`, :meth:`~Client.typing`
  (at most one per second and session), :meth:`~Client.subscribe_presence`
  (kept across reconnects; ``on_presence`` gets every change) and
  ``on_delivery_receipt``/``on_typing`` for the other frames.

Failures that retrying cannot mend end the client: an ``invalid_token``,
``token_expired`` or ``token_revoked`` answer when there is no ``get_token``
to ask for another, ``max_auth_failures`` refusals in a row of tokens that
``get_token`` gave, or an operator's kick (``kicked``, PROTOCOL.md 1.1: the
client does not come back on its own). Then :meth:`start`'s Deferred (and
every pending call) fails with :class:`AuthFailed` and ``on_state("failed")``
is called.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from imcluster.client.links import connect_link, parse_url

# states (on_state is called with these names)
STOPPED = "stopped"
CONNECTING = "connecting"
AUTHENTICATING = "authenticating"
READY = "ready"
WAITING = "waiting"  # between two attempts
FAILED = "failed"

#: message_reply / error codes that mean "try again later with the same clientMsgId"
RETRY_CODES = frozenset({"unavailable", "rate_limited"})
#: auth_reply error codes about the credentials (PROTOCOL.md "Authentication")
AUTH_CODES = frozenset({"invalid_token", "token_expired", "token_revoked"})
#: an operator threw the user out (POST /v1/users/{id}/kick): never reconnect on one's own
KICKED = "kicked"

#: WebSocket close codes
CLOSE_GOING_AWAY = 1001
CLOSE_TOO_LARGE = 1009
CLOSE_AUTH = 4001
CLOSE_TOKEN_EXPIRED = 4002

#: message_send_reply ids per frame (keeps the frame far below the 64 KiB limit)
ACK_CHUNK = 500
#: the gateway's default max_frame_size (PROTOCOL.md "Framing")
DEFAULT_MAX_FRAME_SIZE = 65536
#: event kinds of version 1.1 (PROTOCOL.md "Events in the session's order")
EVENT_KINDS = frozenset({"recall", "edit", "members"})


def is_event(frame: dict) -> bool:
    """A ``message_send`` (or history entry) that is an event, not a message: ``kind`` set and not
    ``"message"`` (an unknown kind counts as an event too: never shown as text)."""
    kind = frame.get("kind")
    return kind is not None and kind != "message"


def frame_size(frame: dict) -> int:
    """The bytes of ``frame`` on the wire (UTF-8 JSON, as the links encode it)."""
    return len(json.dumps(frame, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))


class ClientError(Exception):
    """The server answered a request with an error: ``code`` and ``message`` (PROTOCOL.md)."""

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message


class SendError(ClientError):
    """A ``message_reply`` with ``ok: false`` (not_member, no_session, rejected, ...)."""

    def __init__(self, code: str, message: str = "", client_msg_id: str | None = None) -> None:
        super().__init__(code, message)
        self.client_msg_id = client_msg_id


class AuthFailed(ClientError):
    """The token was refused and there is no way to get another one; the client has stopped."""


class ClientStopped(Exception):
    """The client was stopped before this call was answered."""


class Disconnected(Exception):
    """The connection dropped before a request that cannot be safely repeated was answered."""


def new_client_msg_id() -> str:
    """A fresh ``clientMsgId`` (32 hex characters; unique without coordination)."""
    return uuid.uuid4().hex


def p2p_session_id(a: str, b: str) -> str:
    """The 1:1 session of users ``a`` and ``b``: ``p2p:<a>:<b>`` with the ids sorted (PROTOCOL.md)."""
    first, second = sorted((a, b))
    return f"p2p:{first}:{second}"


def token_expiry(token: str) -> float | None:
    """The ``exp`` of a JWT (seconds since the epoch), read without verifying it; None if absent."""
    import jwt

    try:
        exp = jwt.decode(token, options={"verify_signature": False}).get("exp")
    except jwt.PyJWTError:
        return None
    return float(exp) if isinstance(exp, (int, float)) and not isinstance(exp, bool) else None


@dataclass
class _Outgoing:
    """A message waiting for its message_reply."""

    client_msg_id: str
    frame: dict
    deferreds: list = field(default_factory=list)
    sent_on: Any = None  # the link it was last sent on
    attempts: int = 0
    retry_call: Any = None
    timeout_call: Any = None
    size: int = 0


@dataclass
class _Request:
    """A history or session_create request waiting for its reply."""

    request_id: str
    kind: str
    frame: dict
    deferred: defer.Deferred
    repeatable: bool
    sent_on: Any = None
    attempts: int = 0
    retry_call: Any = None
    timeout_call: Any = None
    size: int = 0


class Client:
    """A reconnecting imcluster client (see the module docstring).

    ``urls``: gateway URLs (``ws://``, ``wss://``, ``tcp://``, ``tcps://``;
    ``http://``, ``https://``: a ``--stream`` endpoint, long polling), tried in turn. ``token``: a JWT; or ``get_token()``, returning a token or
    a Deferred of one, called for every connection and refresh. Callbacks:
    ``on_message(frame)`` (may return a Deferred), ``on_read_receipt(frame)``,
    ``on_sync_done(count)``, ``on_state(state)``; version 1.1:
    ``on_typing(frame)``, ``on_presence(frame)`` (``userId``, ``online``,
    ``ts`` or ``since``), ``on_delivery_receipt(frame)``.
    """

    log = Logger()

    def __init__(
        self,
        urls: str | Sequence[str],
        token: str | None = None,
        *,
        get_token: Callable[[], Any] | None = None,
        device: str | None = None,
        on_message: Callable[[dict], Any] | None = None,
        on_read_receipt: Callable[[dict], Any] | None = None,
        on_sync_done: Callable[[int], Any] | None = None,
        on_state: Callable[[str], Any] | None = None,
        on_typing: Callable[[dict], Any] | None = None,
        on_presence: Callable[[dict], Any] | None = None,
        on_delivery_receipt: Callable[[dict], Any] | None = None,
        reactor: Any = None,
        connector: Callable[..., defer.Deferred] | None = None,
        tls_trust: Any = None,
        connect_timeout: float = 10.0,
        auth_timeout: float = 15.0,
        retry_initial: float = 0.5,
        retry_max: float = 30.0,
        ping_interval: float = 30.0,
        ping_timeout: float = 10.0,
        refresh_margin: float = 60.0,
        max_in_flight: int = 64,
        dedup_size: int = 10000,
        send_timeout: float | None = None,
        request_timeout: float = 30.0,
        sync_hold: float = 10.0,
        max_auth_failures: int | None = 3,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        going_away_spread: float = 3.0,
        typing_interval: float = 1.0,
    ) -> None:
        if isinstance(urls, str):
            urls = [urls]
        self.urls = list(urls)
        if not self.urls:
            raise ValueError("at least one gateway URL is needed")
        for url in self.urls:
            parse_url(url)
        if token is None and get_token is None:
            raise ValueError("give token or get_token")
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self._token = token
        self._get_token = get_token
        self.device = device
        self.on_message = on_message
        self.on_read_receipt = on_read_receipt
        self.on_sync_done = on_sync_done
        self.on_state = on_state
        self.on_typing = on_typing
        self.on_presence = on_presence
        self.on_delivery_receipt = on_delivery_receipt
        self._connector = connector or self._connect_link
        self._tls_trust = tls_trust
        self.connect_timeout = connect_timeout
        self.auth_timeout = auth_timeout
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.refresh_margin = refresh_margin
        self.max_in_flight = max_in_flight
        self.dedup_size = dedup_size
        self.send_timeout = send_timeout
        self.request_timeout = request_timeout
        self.sync_hold = sync_hold
        self.max_auth_failures = max_auth_failures
        #: the largest frame sent (bytes of JSON); lowered by what the gateway says or does
        self.max_frame_size = max_frame_size
        #: a gateway that goes away: its clients reconnect spread over this many seconds
        self.going_away_spread = going_away_spread
        self.typing_interval = typing_interval
        self._auth_failures = 0
        #: presence of the subscribed users: userId -> {"online": bool, "since"/"ts": ms}
        self.presence: dict[str, dict] = {}
        self._presence_users: set[str] = set()
        self._typing_sent: dict[str, float] = {}

        #: what the last auth_reply said
        self.user_id: str | None = None
        self.conn_id: str | None = None
        self.server_id: str | None = None
        self.state = STOPPED
        self.url: str | None = None  # the gateway of the current (or last) connection
        #: connections made and authenticated, for operators and tests
        self.connections = 0

        self._running = False
        self._link: Any = None
        self._attempt_no = 0
        self._url_index = 0
        self._failures = 0
        self._going_away = False
        self._last_error: str | None = None
        self._current_token: str | None = None
        self._attempt_call: Any = None
        self._auth_call: Any = None
        self._ping_call: Any = None
        self._ping_check: Any = None
        self._refresh_call: Any = None
        self._last_rx = 0.0
        self._ready_waiters: list[defer.Deferred] = []
        self._stop_waiters: list[defer.Deferred] = []

        # outgoing messages, in send order; unanswered until message_reply
        self._outbox: OrderedDict[str, _Outgoing] = OrderedDict()
        self._in_flight = 0
        # history / session_create
        self._requests: OrderedDict[str, _Request] = OrderedDict()
        self._request_ids = (f"q{os.getpid():x}.{n}" for n in itertools.count(1))
        # reads sent on the current link (sent again after a reconnect: a read never moves back)
        self._reads: dict[str, int] = {}
        self._reads_unsent: dict[str, int] = {}
        # incoming messages
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._inbox: deque[dict] = deque()
        # deliveries held between auth_reply and sync_done (None: not holding)
        self._held: dict[str, dict] | None = None
        self._hold_call: Any = None
        self._queued: set[str] = set()
        self._handling = False
        self._draining = False
        self._acks: list[str] = []
        self._ack_call: Any = None

    # --- life cycle --------------------------------------------------------------

    def start(self) -> defer.Deferred:
        """Start connecting; fires with the first ``auth_reply`` once authenticated.

        Fails with :class:`AuthFailed` when the token is refused and no
        ``get_token`` can give another one. Connection failures do not fail
        it: the client keeps trying (add a timeout if you need one).
        """
        if not self._running:
            self._running = True
            self._schedule_attempt(0)
        return self.when_ready()

    def when_ready(self) -> defer.Deferred:
        """Fires with the ``auth_reply`` of the current connection, or of the next one."""
        if self.state == READY:
            return defer.succeed(self._auth_reply_seen)
        if not self._running:
            return defer.fail(self._fatal or ClientStopped("the client is not started"))
        d: defer.Deferred = defer.Deferred()
        self._ready_waiters.append(d)
        return d

    def stop(self) -> defer.Deferred:
        """Close the connection and stop reconnecting; unanswered calls fail with
        :class:`ClientStopped`. Fires once the connection has closed."""
        if not self._running:
            return defer.succeed(None)
        self._running = False
        self._cancel_timers()
        self._fail_pending(ClientStopped("the client was stopped"))
        self._inbox.clear()
        self._queued.clear()
        self._held = None
        link = self._link
        if link is None:
            self._set_state(STOPPED)
            return defer.succeed(None)
        self._flush_acks()
        d: defer.Deferred = defer.Deferred()
        self._stop_waiters.append(d)
        link.close()
        # a gateway that does not answer the close handshake is dropped
        call = self.reactor.callLater(self.connect_timeout, link.abort)
        d.addBoth(lambda r: (call.active() and call.cancel(), r)[1])
        return d

    @property
    def running(self) -> bool:
        return self._running

    @property
    def current_token(self) -> str | None:
        """The token of the current (or last) connection: for calls to the HTTP API as this user."""
        return self._current_token or self._token

    @property
    def ready(self) -> bool:
        """Authenticated on an open connection right now."""
        return self.state == READY

    # --- the application's calls ---------------------------------------------------

    def send(self, session_id: str, body: Any, client_msg_id: str | None = None) -> defer.Deferred:
        """Send ``body`` to ``session_id``; fires with the ``message_reply`` (``ok: true``:
        ``msgId``, ``seq``, ``ts``...) once the server has stored it.

        Fails with :class:`SendError` on a definitive refusal. Kept and sent
        again across reconnects until answered (``send_timeout``, when set,
        gives up with ``defer.TimeoutError``: the message may or may not
        have been stored). Sending the same ``client_msg_id`` again while the
        first is unanswered waits for the same reply.
        """
        if not self._running:
            return defer.fail(ClientStopped("start() the client first"))
        if not isinstance(session_id, str) or not session_id:
            return defer.fail(ValueError("session_id must be a non-empty string"))
        cmid = client_msg_id or new_client_msg_id()
        d: defer.Deferred = defer.Deferred()
        entry = self._outbox.get(cmid)
        if entry is not None:
            entry.deferreds.append(d)
            return d
        frame = {"type": "message", "clientMsgId": cmid, "sessionId": session_id, "body": body}
        size = frame_size(frame)
        if size > self.max_frame_size:
            # the gateway would close the connection (1009) and the message would come back
            # after every reconnect: refuse it here, with the reason
            return defer.fail(SendError("too_large",
                                        f"the message is {size} bytes; the limit is {self.max_frame_size}",
                                        cmid))
        entry = _Outgoing(cmid, frame, [d], size=size)
        self._outbox[cmid] = entry
        if self.send_timeout is not None:
            entry.timeout_call = self.reactor.callLater(self.send_timeout, self._send_timed_out, cmid)
        self._pump()
        return d

    def history(self, session_id: str, before_seq: int | None = None,
                limit: int | None = None) -> defer.Deferred:
        """Fires with a page of messages of ``session_id`` (ascending ``seq``): the ``limit``
        newest with ``seq < before_seq`` (the newest when None). Fails with
        :class:`ClientError` (``not_member``, ``no_session``). Repeated after a reconnect."""
        frame: dict[str, Any] = {"type": "history", "sessionId": session_id}
        if before_seq is not None:
            frame["beforeSeq"] = before_seq
        if limit is not None:
            frame["limit"] = limit
        return self._request("history", frame, repeatable=True).addCallback(lambda r: r["messages"])

    def create_session(self, members: Iterable[str], session_id: str | None = None) -> defer.Deferred:
        """Create a session with ``members`` (the caller is always one); fires with the
        ``session_reply`` (``sessionId``, ``members``). Fails with :class:`ClientError`
        (``conflict``, ``too_large``, ...), or :class:`Disconnected` when the connection
        dropped before the answer (it is not repeated: it may have been created)."""
        frame: dict[str, Any] = {"type": "session_create", "members": list(members)}
        if session_id is not None:
            frame["sessionId"] = session_id
        return self._request("session_create", frame, repeatable=False)

    def recall(self, msg_id: str) -> defer.Deferred:
        """Recall one of this user's messages (within the server's ``recall_window``); fires with
        the ``recall_reply`` (``msgId`` and ``seq`` of the ``recall`` event). Fails with
        :class:`ClientError` (``not_allowed``, ``no_message``), or :class:`Disconnected` when
        the connection dropped before the answer (not repeated blindly)."""
        return self._request("recall", {"type": "recall", "msgId": msg_id}, repeatable=False)

    def edit(self, msg_id: str, body: Any) -> defer.Deferred:
        """Replace the body of one of this user's messages (within ``edit_window``); fires with
        the ``edit_reply``. Fails as :meth:`recall` does (and with ``too_large``)."""
        return self._request("edit", {"type": "edit", "msgId": msg_id, "body": body}, repeatable=False)

    def typing(self, session_id: str) -> bool:
        """Tell the session's other members that this user is typing. Sent at most once per
        ``typing_interval`` (1 s) and session, and only while connected (it is ephemeral):
        True when a frame went out."""
        if self.state != READY or self._link is None:
            return False
        now = self.reactor.seconds()
        last = self._typing_sent.get(session_id)
        if last is not None and now - last < self.typing_interval:
            return False
        self._typing_sent[session_id] = now
        if len(self._typing_sent) > 1000:
            self._typing_sent = {k: v for k, v in self._typing_sent.items() if now - v < self.typing_interval}
        self._link.send({"type": "typing", "sessionId": session_id})
        return True

    def subscribe_presence(self, users: Iterable[str]) -> defer.Deferred:
        """Follow the presence of ``users``: fires with the ``presence_reply``; from then on
        ``on_presence`` gets every change (also the ones a reconnect reveals: subscriptions are
        made again on every new connection) and :attr:`presence` holds the last known states."""
        users = [u for u in dict.fromkeys(users) if isinstance(u, str) and u]
        self._presence_users.update(users)
        if not users:
            return defer.succeed({"type": "presence_reply", "ok": True, "users": []})
        return self._request("presence", {"type": "presence_subscribe", "users": users}, repeatable=True)

    def unsubscribe_presence(self, users: Iterable[str]) -> None:
        """Stop following ``users`` (no answer is waited for)."""
        users = [u for u in dict.fromkeys(users) if u in self._presence_users]
        for user in users:
            self._presence_users.discard(user)
            self.presence.pop(user, None)
        if users and self.state == READY and self._link is not None:
            self._link.send({"type": "presence_unsubscribe", "id": next(self._request_ids), "users": users})

    def read(self, session_id: str, seq: int) -> None:
        """Move this user's read cursor in ``session_id`` to ``seq`` (it never moves back).

        Sent now when connected, else on the next connection; sent again
        after a reconnect, which is harmless. Members' other connections get
        a ``read_receipt``.
        """
        if not self._running:
            raise ClientStopped("start() the client first")
        if seq <= max(self._reads.get(session_id, -1), self._reads_unsent.get(session_id, -1)):
            return
        if self.state == READY:
            self._reads[session_id] = seq
            self._link.send({"type": "read", "sessionId": session_id, "seq": seq})
        else:
            self._reads_unsent[session_id] = seq

    # --- connecting ------------------------------------------------------------------

    def _connect_link(self, url: str, handler: Any) -> defer.Deferred:
        return connect_link(self.reactor, url, handler, self.connect_timeout, self._tls_trust)

    def _set_state(self, state: str) -> None:
        if state == self.state:
            return
        self.state = state
        if self.on_state is not None:
            try:
                self.on_state(state)
            except Exception:
                self.log.failure("on_state({state}) failed", state=state)

    def _schedule_attempt(self, delay: float) -> None:
        self._set_state(WAITING if delay > 0 else CONNECTING)
        self._attempt_call = self.reactor.callLater(delay, self._attempt)

    def _backoff(self) -> float:
        """The next delay: exponential from ``retry_initial``, capped, with jitter."""
        self._failures += 1
        delay = min(self.retry_max, self.retry_initial * (2 ** min(self._failures - 1, 30)))
        return delay * random.uniform(0.5, 1.0)

    def _attempt(self) -> None:
        self._attempt_call = None
        if not self._running:
            return
        self._attempt_no += 1
        attempt = self._attempt_no
        url = self.urls[self._url_index % len(self.urls)]
        self.url = url
        self._set_state(CONNECTING)
        self._going_away = False
        self._last_error = None

        async def connecting() -> Any:
            token = self._token
            if self._get_token is not None:
                token = await defer.maybeDeferred(self._get_token)
            if not isinstance(token, str) or not token:
                raise ValueError("get_token() gave no token")
            link = await self._connector(url, self)
            return token, link

        def connected(result: tuple[str, Any]) -> None:
            token, link = result
            if attempt != self._attempt_no or not self._running:
                link.abort()
                return
            self._link = link
            self._current_token = token
            self._last_rx = self.reactor.seconds()
            self._set_state(AUTHENTICATING)
            link.send(self._auth_frame(token))
            self._auth_call = self.reactor.callLater(self.auth_timeout, self._auth_timed_out, link)

        def failed(f: Failure) -> None:
            if attempt != self._attempt_no or not self._running:
                return
            delay = self._backoff()
            self.log.info("cannot connect to {url}: {why}; next try in {delay:.1f}s", url=url,
                          why=f.getErrorMessage(), delay=delay)
            self._url_index += 1
            self._schedule_attempt(delay)

        defer.Deferred.fromCoroutine(connecting()).addCallbacks(connected, failed)

    def _auth_frame(self, token: str) -> dict:
        frame = {"type": "auth", "token": token}
        if self.device is not None:
            frame["device"] = self.device
        return frame

    def _auth_timed_out(self, link: Any) -> None:
        self._auth_call = None
        if link is self._link and self.state == AUTHENTICATING:
            self.log.warn("no auth_reply from {url} within {t}s", url=self.url, t=self.auth_timeout)
            link.abort()

    # --- the link's reports ------------------------------------------------------------

    def frame_received(self, link: Any, frame: dict) -> None:
        if link is not self._link:
            return
        self._last_rx = self.reactor.seconds()
        kind = frame.get("type")
        handler = self._HANDLERS.get(kind)
        if handler is None:
            self.log.debug("ignored a frame of type {kind!r}", kind=kind)
            return
        try:
            handler(self, frame)
        except Exception:
            self.log.failure("handling a {kind} frame failed", kind=kind)

    def link_lost(self, link: Any, code: int | None, reason: str) -> None:
        if link is not self._link:
            return
        was_ready = self.state == READY
        self._link = None
        self._cancel_link_timers()
        self._release_held()
        if code == CLOSE_TOO_LARGE or self._last_error == "too_large":
            self._refused_for_size(link)
        self._requeue(link)
        if not self._running:
            self._set_state(FAILED if self._fatal_set else STOPPED)
            waiters, self._stop_waiters = self._stop_waiters, []
            for d in waiters:
                d.callback(None)
            return
        auth_failed = code in (CLOSE_AUTH, CLOSE_TOKEN_EXPIRED) or self._last_error in AUTH_CODES
        self.log.info("connection to {url} lost ({code} {reason}); error {error}", url=self.url,
                      code=code, reason=reason, error=self._last_error)
        self._url_index += 1
        if self._last_error == KICKED:
            self._fail_fatal(AuthFailed(KICKED, f"an operator closed this user's connections ({reason or code})"))
            return
        if auth_failed:
            self._auth_failures += 1
        if auth_failed and (self._get_token is None or (
                self.max_auth_failures is not None and self._auth_failures >= self.max_auth_failures)):
            self._fail_fatal(AuthFailed(self._last_error or "invalid_token",
                                        f"the gateway refused the token ({reason or code})"))
            return
        if auth_failed:
            delay = self._backoff()
        elif self._going_away or code == CLOSE_GOING_AWAY:
            # a gateway that stops sends its clients elsewhere: spread over a few seconds, so
            # that they do not all connect and sync on the next gateway in the same instant
            delay = random.uniform(0, self.going_away_spread)
        elif was_ready:
            # spread a whole gateway's clients over a short moment
            delay = random.uniform(0, self.retry_initial)
        else:
            delay = self._backoff()
        self._schedule_attempt(delay)

    def _refused_for_size(self, link: Any) -> None:
        """The gateway closed ``link`` for a frame over its limit (smaller than ours): the largest
        unanswered frame sent on it fails with ``too_large`` and is never sent again."""
        entries = [e for e in self._outbox.values() if e.sent_on is link]
        requests = [r for r in self._requests.values() if r.sent_on is link]
        largest = max(entries + requests, key=lambda x: x.size, default=None)
        if largest is None:
            return
        self.max_frame_size = min(self.max_frame_size, max(1, largest.size - 1))
        self.log.warn("{url} closed the connection for a frame of {size} bytes; the limit is now {limit}",
                      url=self.url, size=largest.size, limit=self.max_frame_size)
        message = f"the gateway refused a frame of {largest.size} bytes"
        if isinstance(largest, _Outgoing):
            largest.sent_on = None
            self._in_flight -= 1
            err = SendError("too_large", message, largest.client_msg_id)
            self._finish_message(largest.client_msg_id, lambda d: d.errback(err))
        else:
            err2 = ClientError("too_large", message)
            self._finish_request(largest, lambda d: d.errback(err2))

    # --- frames ---------------------------------------------------------------------------

    _auth_reply_seen: dict | None = None
    _fatal: Exception | None = None
    _fatal_set = False

    def _on_auth_reply(self, frame: dict) -> None:
        if frame.get("ok") is True:
            if self._auth_call is not None and self._auth_call.active():
                self._auth_call.cancel()
            self._auth_call = None
            first = self.state == AUTHENTICATING
            self.user_id = frame.get("userId")
            self.conn_id = frame.get("connId")
            self.server_id = frame.get("serverId")
            self._auth_reply_seen = frame
            limit = frame.get("maxFrameSize")
            if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
                self.max_frame_size = min(self.max_frame_size, limit)
            self._schedule_refresh()
            if not first:
                return  # a refresh
            self._failures = 0
            self._auth_failures = 0
            self.connections += 1
            self.log.info("authenticated as {user} on {url}", user=self.user_id, url=self.url)
            self._set_state(READY)
            if self.sync_hold > 0:
                self._held = {}
                self._hold_call = self.reactor.callLater(self.sync_hold, self._release_held)
            self._start_pings()
            self._flush_on_ready()
            waiters, self._ready_waiters = self._ready_waiters, []
            for d in waiters:
                d.callback(frame)
            return
        error = frame.get("error") if isinstance(frame.get("error"), dict) else {}
        code = str(error.get("code") or "invalid_token")
        self._last_error = code
        self.log.warn("auth refused by {url}: {code} {message}", url=self.url, code=code,
                      message=error.get("message"))
        if code not in AUTH_CODES and self._link is not None:
            # "unavailable": the gateway could not record us; reconnect after a while
            self._link.abort()

    def _on_message_reply(self, frame: dict) -> None:
        cmid = frame.get("clientMsgId")
        entry = self._outbox.get(cmid) if isinstance(cmid, str) else None
        if entry is None or entry.sent_on is None:
            return  # a late answer to something already answered (or never ours)
        self._answer_message(entry, frame)

    def _answer_message(self, entry: _Outgoing, frame: dict) -> None:
        cmid = entry.client_msg_id
        entry.sent_on = None
        self._in_flight -= 1
        if frame.get("ok") is True:
            self._finish_message(cmid, lambda d: d.callback(frame))
        else:
            error = frame.get("error") if isinstance(frame.get("error"), dict) else frame
            code = str(error.get("code") or "unavailable")
            if code in RETRY_CODES:
                entry.attempts += 1
                delay = min(self.retry_max, self.retry_initial * (2 ** min(entry.attempts - 1, 30)))
                entry.retry_call = self.reactor.callLater(delay, self._retry_message, cmid)
            else:
                err = SendError(code, str(error.get("message") or ""), cmid)
                self._finish_message(cmid, lambda d: d.errback(err))
        self._pump()

    def _finish_message(self, cmid: str, fire: Callable[[defer.Deferred], None]) -> None:
        entry = self._outbox.pop(cmid)
        for call in (entry.retry_call, entry.timeout_call):
            if call is not None and call.active():
                call.cancel()
        for d in entry.deferreds:
            fire(d)

    def _retry_message(self, cmid: str) -> None:
        entry = self._outbox.get(cmid)
        if entry is not None:
            entry.retry_call = None
            self._pump()

    def _send_timed_out(self, cmid: str) -> None:
        entry = self._outbox.get(cmid)
        if entry is None:
            return
        entry.timeout_call = None
        if entry.sent_on is not None:
            entry.sent_on = None
            self._in_flight -= 1
        self._finish_message(cmid, lambda d: d.errback(defer.TimeoutError(
            f"no message_reply for {cmid} within {self.send_timeout}s")))
        self._pump()

    def _on_message_send(self, frame: dict) -> None:
        msg_id = frame.get("msgId")
        if not isinstance(msg_id, str) or not msg_id:
            return
        if msg_id in self._seen:
            self._ack(msg_id)  # handled before: the server did not get (or lost) our ack
            return
        if msg_id in self._queued:
            return  # already waiting for (or in) the handler; acknowledged after it
        if self._held is not None:
            self._held.setdefault(msg_id, frame)
            return
        self._queued.add(msg_id)
        self._inbox.append(frame)
        self._drain()

    def _release_held(self) -> None:
        """The sync is over (or took too long): hand held deliveries over in session/seq order."""
        if self._hold_call is not None and self._hold_call.active():
            self._hold_call.cancel()
        self._hold_call = None
        held, self._held = self._held, None
        if not held:
            return

        def order(f: dict) -> tuple:
            seq = f.get("seq")
            return (str(f.get("sessionId")).encode("utf-8"), seq if isinstance(seq, int) else 0)

        for frame in sorted(held.values(), key=order):
            if frame["msgId"] not in self._queued and frame["msgId"] not in self._seen:
                self._queued.add(frame["msgId"])
                self._inbox.append(frame)
        self._drain()

    def _on_sync_done(self, frame: dict) -> None:
        self._release_held()
        if self.on_sync_done is not None:
            count = frame.get("count")
            try:
                self.on_sync_done(count if isinstance(count, int) else 0)
            except Exception:
                self.log.failure("on_sync_done failed")

    def _on_read_receipt(self, frame: dict) -> None:
        if self.on_read_receipt is not None:
            try:
                self.on_read_receipt(frame)
            except Exception:
                self.log.failure("on_read_receipt failed")

    def _on_history_reply(self, frame: dict) -> None:
        request = self._find_request(frame.get("id"), "history", frame.get("sessionId"))
        if request is not None:
            self._finish_request(request, lambda d: d.callback(frame))

    def _settle(self, request: Any, frame: dict) -> None:
        """Answer ``request`` with a ``*_reply`` frame: its caller gets the frame, or a ClientError."""
        if frame.get("ok") is True:
            self._finish_request(request, lambda d: d.callback(frame))
        else:
            error = frame.get("error") if isinstance(frame.get("error"), dict) else {}
            err = ClientError(str(error.get("code") or "bad_frame"), str(error.get("message") or ""))
            self._finish_request(request, lambda d: d.errback(err))

    def _on_session_reply(self, frame: dict) -> None:
        request = self._find_request(frame.get("id"), "session_create", None)
        if request is None:
            return
        self._settle(request, frame)

    def _on_error(self, frame: dict) -> None:
        code = str(frame.get("code") or "")
        ref = frame.get("ref")
        if isinstance(ref, str) and ref in self._outbox and self._outbox[ref].sent_on is not None:
            self._answer_message(self._outbox[ref], {"ok": False, "error": frame})
            return
        request = self._requests.get(ref) if isinstance(ref, str) else None
        if request is not None and request.sent_on is not None:
            if code in RETRY_CODES and request.repeatable:
                request.sent_on = None
                request.attempts += 1
                delay = min(self.retry_max, self.retry_initial * (2 ** min(request.attempts - 1, 30)))
                request.retry_call = self.reactor.callLater(delay, self._retry_request, request.request_id)
            else:
                err = ClientError(code or "bad_frame", str(frame.get("message") or ""))
                self._finish_request(request, lambda d: d.errback(err))
            return
        # about the connection itself: going_away, token_expired, slow_consumer, ... (TCP says
        # why it closes with an error frame just before closing)
        self._last_error = code
        if code == "going_away":
            self._going_away = True
        self.log.info("error from {url}: {code} {message}", url=self.url, code=code, message=frame.get("message"))

    def _on_pong(self, frame: dict) -> None:
        pass  # _last_rx is all a pong is for

    def _on_change_reply(self, frame: dict) -> None:
        """``recall_reply`` / ``edit_reply``."""
        kind = "recall" if frame.get("type") == "recall_reply" else "edit"
        request = self._find_request(frame.get("id"), kind, None)
        if request is None:
            return
        self._settle(request, frame)

    def _on_presence_reply(self, frame: dict) -> None:
        if frame.get("ok") is True:
            for entry in frame.get("users") or []:
                if isinstance(entry, dict):
                    self._presence_changed({"type": "presence", **entry})
        rid = frame.get("id")
        request = self._requests.get(rid) if isinstance(rid, str) else None
        if request is None or request.kind != "presence":
            return
        self._settle(request, frame)

    def _on_presence(self, frame: dict) -> None:
        self._presence_changed(frame)

    def _presence_changed(self, frame: dict) -> None:
        user = frame.get("userId")
        if not isinstance(user, str) or user not in self._presence_users:
            return
        online = frame.get("online") is True
        known = self.presence.get(user)
        self.presence[user] = {k: v for k, v in frame.items() if k != "type"}
        if known is not None and known.get("online") is online:
            return  # no change (a reply after a reconnect that repeats what was known)
        self._call(self.on_presence, frame, "on_presence")

    def _on_typing(self, frame: dict) -> None:
        # also from this user's other devices (PROTOCOL.md): frame["userId"] tells
        self._call(self.on_typing, frame, "on_typing")

    def _on_delivery_receipt(self, frame: dict) -> None:
        self._call(self.on_delivery_receipt, frame, "on_delivery_receipt")

    def _call(self, callback: Any, frame: dict, name: str) -> None:
        if callback is not None:
            try:
                callback(frame)
            except Exception:
                self.log.failure("{name} failed", name=name)

    _HANDLERS = {
        "auth_reply": _on_auth_reply,
        "message_reply": _on_message_reply,
        "message_send": _on_message_send,
        "sync_done": _on_sync_done,
        "read_receipt": _on_read_receipt,
        "history_reply": _on_history_reply,
        "session_reply": _on_session_reply,
        "error": _on_error,
        "pong": _on_pong,
        "recall_reply": _on_change_reply,
        "edit_reply": _on_change_reply,
        "presence_reply": _on_presence_reply,
        "presence": _on_presence,
        "typing": _on_typing,
        "delivery_receipt": _on_delivery_receipt,
    }

    # --- sending ------------------------------------------------------------------------

    def _pump(self) -> None:
        """Send unsent messages, in order, while the in-flight window has room."""
        link = self._link
        if self.state != READY or link is None:
            return
        if self._in_flight >= self.max_in_flight:
            return
        for entry in self._outbox.values():
            if self._in_flight >= self.max_in_flight:
                break
            if entry.sent_on is not None or entry.retry_call is not None:
                continue
            entry.sent_on = link
            self._in_flight += 1
            link.send(entry.frame)

    def _request(self, kind: str, frame: dict, repeatable: bool) -> defer.Deferred:
        if not self._running:
            return defer.fail(ClientStopped("start() the client first"))
        rid = next(self._request_ids)
        frame["id"] = rid
        size = frame_size(frame)
        if size > self.max_frame_size:
            return defer.fail(ClientError("too_large", f"the {frame['type']} frame is {size} bytes; "
                                                       f"the limit is {self.max_frame_size}"))
        d: defer.Deferred = defer.Deferred()
        request = _Request(rid, kind, frame, d, repeatable, size=size)
        self._requests[rid] = request
        if self.request_timeout:
            request.timeout_call = self.reactor.callLater(self.request_timeout, self._request_timed_out, rid)
        self._send_request(request)
        return d

    def _send_request(self, request: _Request) -> None:
        if self.state == READY and self._link is not None and request.sent_on is None:
            request.sent_on = self._link
            self._link.send(request.frame)

    def _retry_request(self, rid: str) -> None:
        request = self._requests.get(rid)
        if request is not None:
            request.retry_call = None
            self._send_request(request)

    def _request_timed_out(self, rid: str) -> None:
        request = self._requests.get(rid)
        if request is not None:
            request.timeout_call = None
            err = defer.TimeoutError(f"no answer to {request.kind} within {self.request_timeout}s")
            self._finish_request(request, lambda d: d.errback(err))

    def _find_request(self, rid: Any, kind: str, session_id: Any) -> _Request | None:
        if isinstance(rid, str) and rid in self._requests:
            request = self._requests[rid]
            return request if request.kind == kind else None
        # a server that does not echo "id": the oldest request of that kind (and session)
        for request in self._requests.values():
            if (request.kind == kind and request.sent_on is not None
                    and (session_id is None or request.frame.get("sessionId") == session_id)):
                return request
        return None

    def _finish_request(self, request: _Request, fire: Callable[[defer.Deferred], None]) -> None:
        self._requests.pop(request.request_id, None)
        for call in (request.retry_call, request.timeout_call):
            if call is not None and call.active():
                call.cancel()
        fire(request.deferred)

    def _flush_on_ready(self) -> None:
        """After authenticating: acks, reads, requests and messages kept while disconnected."""
        self._flush_acks()
        reads, self._reads_unsent = self._reads_unsent, {}
        for session_id, seq in self._reads.items():
            reads[session_id] = max(seq, reads.get(session_id, -1))
        self._reads = {}
        for session_id, seq in reads.items():
            self._reads[session_id] = seq
            self._link.send({"type": "read", "sessionId": session_id, "seq": seq})
        for request in list(self._requests.values()):
            if request.retry_call is None:
                self._send_request(request)
        if self.connections > 1 and self._presence_users:
            # subscriptions end with the connection: made again, and the reply tells what changed
            users = sorted(self._presence_users)
            self._request("presence", {"type": "presence_subscribe", "users": users}, repeatable=True
                          ).addErrback(lambda f: self.log.warn("presence_subscribe failed: {why}",
                                                               why=f.getErrorMessage()))
        self._pump()

    def _requeue(self, link: Any) -> None:
        """A link is gone: what was sent on it and not answered is sent again on the next one."""
        for entry in self._outbox.values():
            if entry.sent_on is link:
                entry.sent_on = None
        self._in_flight = sum(1 for e in self._outbox.values() if e.sent_on is not None)
        for request in list(self._requests.values()):
            if request.sent_on is link:
                request.sent_on = None
                if not request.repeatable:
                    err = Disconnected(f"the connection dropped before the {request.kind} reply")
                    self._finish_request(request, lambda d: d.errback(err))

    # --- receiving --------------------------------------------------------------------------

    def _drain(self) -> None:
        """Hand queued messages to on_message, one at a time, in arrival order."""
        if self._draining:
            return
        self._draining = True
        try:
            while self._inbox and not self._handling and self._running:
                frame = self._inbox.popleft()
                self._handling = True
                if self.on_message is None:
                    d = defer.succeed(None)
                else:
                    d = defer.maybeDeferred(self.on_message, frame)
                d.addCallbacks(self._handled, self._handler_failed, callbackArgs=(frame,),
                               errbackArgs=(frame,))
        finally:
            self._draining = False

    def _handled(self, _: Any, frame: dict) -> None:
        msg_id = frame["msgId"]
        self._handling = False
        self._queued.discard(msg_id)
        self._seen[msg_id] = None
        while len(self._seen) > self.dedup_size:
            self._seen.popitem(last=False)
        self._ack(msg_id)
        self._drain()

    def _handler_failed(self, f: Failure, frame: dict) -> None:
        self._handling = False
        self._queued.discard(frame["msgId"])
        self.log.failure("on_message failed for {msg_id}; it stays unacknowledged and comes again "
                         "with the next sync", f, msg_id=frame["msgId"])
        self._drain()

    def _ack(self, msg_id: str) -> None:
        self._acks.append(msg_id)
        if self._ack_call is None and self._running:
            # coalesce: one message_send_reply for everything handled in this reactor turn
            self._ack_call = self.reactor.callLater(0, self._flush_acks)

    def _flush_acks(self) -> None:
        if self._ack_call is not None and self._ack_call.active():
            self._ack_call.cancel()
        self._ack_call = None
        if self.state != READY or self._link is None or not self._acks:
            return  # kept until the next connection (which also re-syncs what is unacknowledged)
        acks, self._acks = self._acks, []
        for i in range(0, len(acks), ACK_CHUNK):
            self._link.send({"type": "message_send_reply", "msgIds": acks[i:i + ACK_CHUNK]})

    # --- keepalive and refresh ------------------------------------------------------------

    def _start_pings(self) -> None:
        if self.ping_interval > 0:
            self._ping_call = self.reactor.callLater(self.ping_interval, self._ping)

    def _ping(self) -> None:
        self._ping_call = None
        link = self._link
        if link is None or self.state != READY:
            return
        sent_at = self.reactor.seconds()
        link.send({"type": "ping"})

        def check() -> None:
            self._ping_check = None
            if link is self._link and self._last_rx < sent_at:
                self.log.warn("{url} did not answer a ping within {t}s: reconnecting", url=self.url,
                              t=self.ping_timeout)
                link.abort()

        self._ping_check = self.reactor.callLater(self.ping_timeout, check)
        self._ping_call = self.reactor.callLater(self.ping_interval, self._ping)

    def _schedule_refresh(self) -> None:
        if self._refresh_call is not None and self._refresh_call.active():
            self._refresh_call.cancel()
        self._refresh_call = None
        if self._get_token is None or self._current_token is None:
            return
        exp = token_expiry(self._current_token)
        if exp is None:
            return
        delay = max(1.0, exp - time.time() - self.refresh_margin)
        self._refresh_call = self.reactor.callLater(delay, self._refresh)

    def _refresh(self) -> None:
        self._refresh_call = None
        link = self._link
        if link is None or self.state != READY:
            return

        def got(token: Any) -> None:
            if link is self._link and self.state == READY and isinstance(token, str) and token:
                self._current_token = token
                link.send(self._auth_frame(token))

        def failed(f: Failure) -> None:
            self.log.warn("get_token() failed ({why}); retrying the refresh", why=f.getErrorMessage())
            if link is self._link:
                self._refresh_call = self.reactor.callLater(self._backoff(), self._refresh)

        defer.maybeDeferred(self._get_token).addCallbacks(got, failed)

    # --- stopping --------------------------------------------------------------------------

    def _cancel_link_timers(self) -> None:
        for name in ("_auth_call", "_ping_call", "_ping_check", "_refresh_call", "_hold_call"):
            call = getattr(self, name)
            if call is not None and call.active():
                call.cancel()
            setattr(self, name, None)

    def _cancel_timers(self) -> None:
        self._cancel_link_timers()
        for name in ("_attempt_call", "_ack_call"):
            call = getattr(self, name)
            if call is not None and call.active():
                call.cancel()
            setattr(self, name, None)

    def _fail_pending(self, err: Exception) -> None:
        for cmid in list(self._outbox):
            self._finish_message(cmid, lambda d: d.errback(err))
        self._in_flight = 0
        for request in list(self._requests.values()):
            self._finish_request(request, lambda d: d.errback(err))
        self._reads.clear()
        self._reads_unsent.clear()
        waiters, self._ready_waiters = self._ready_waiters, []
        for d in waiters:
            d.errback(err)

    def _fail_fatal(self, err: Exception) -> None:
        self.log.error("giving up: {err}", err=str(err))
        self._fatal = err
        self._fatal_set = True
        self._running = False
        self._cancel_timers()
        self._fail_pending(err)
        self._inbox.clear()
        self._queued.clear()
        self._held = None
        self._set_state(FAILED)
        if self._link is not None:
            self._link.abort()

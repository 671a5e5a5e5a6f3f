"""One connection to one gateway, as a *link* that carries PROTOCOL.md frames.

A link hides the transport: WebSocket (``ws://``, ``wss://``: one JSON object
per text message), raw TCP (``tcp://``, and ``tcps://`` for TLS: a 4-byte
big-endian length, then the UTF-8 JSON), or the HTTP streaming transport
(``http://``, ``https://``: the gateway's ``--stream`` endpoint, spoken with
long polling; PROTOCOL.md "HTTP streaming transport"). :func:`connect_link` opens one and
fires once frames can be sent; from then on the link calls its handler:

``handler.frame_received(link, frame: dict)``
    every JSON object the gateway sends, in order;
``handler.link_lost(link, code: int | None, reason: str)``
    exactly once, when the connection has ended for any reason (WebSocket
    close code, or None when the transport closed without one, as raw TCP
    always does: the gateway's last ``error`` frame then tells why).

The link never reconnects: :class:`imcluster.client.Client` does that.
"""

from __future__ import annotations

import json
import struct
from typing import Any, Protocol
from urllib.parse import urlsplit

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, protocol, ssl
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.logger import Logger
from twisted.protocols.basic import Int32StringReceiver

WS_SCHEMES = ("ws", "wss")
TCP_SCHEMES = ("tcp", "tcps", "tls")
STREAM_SCHEMES = ("http", "https")
TLS_SCHEMES = ("wss", "tcps", "tls", "https")
DEFAULT_PORTS = {"ws": 80, "wss": 443, "tcp": 8081, "tcps": 8081, "tls": 8081, "http": 80, "https": 443}

#: frames from the gateway may be large (a history page of 200 messages of 64 KiB each)
MAX_INCOMING_FRAME = 64 * 1024 * 1024


class LinkHandler(Protocol):
    """What a link reports to (the client core)."""

    def frame_received(self, link: "Link", frame: dict) -> None: ...

    def link_lost(self, link: "Link", code: int | None, reason: str) -> None: ...


class Link(Protocol):
    """An open connection to a gateway (see the module docstring)."""

    url: str
    transport_name: str  # "ws", "tcp" or "poll"

    def send(self, frame: dict) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...


class BadURL(ValueError):
    """A gateway URL this client cannot use."""


def parse_url(url: str) -> tuple[str, str, int]:
    """``(scheme, host, port)`` of a gateway URL; :class:`BadURL` when it is not one."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise BadURL(f"not a URL: {url!r} ({e})") from None
    scheme = parts.scheme.lower()
    if scheme not in WS_SCHEMES + TCP_SCHEMES + STREAM_SCHEMES:
        raise BadURL(f"{url!r}: the scheme must be ws, wss, tcp, tcps, http or https")
    if not parts.hostname:
        raise BadURL(f"{url!r} has no host")
    return scheme, parts.hostname, port or DEFAULT_PORTS[scheme]


def _encode(frame: dict) -> bytes:
    return json.dumps(frame, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _decode(data: bytes) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None


class _Reporter:
    """The handler calls shared by both transports (lost is reported exactly once)."""

    log = Logger()
    handler: Any = None
    _lost = False

    def _deliver(self, data: bytes) -> None:
        frame = _decode(data)
        if not isinstance(frame, dict):
            self.log.warn("ignored a frame that is not a JSON object from {url}", url=self.url)
            return
        if self.handler is not None and not self._lost:
            self.handler.frame_received(self, frame)

    def _report_lost(self, code: int | None, reason: str) -> None:
        if self._lost:
            return
        self._lost = True
        if self.handler is not None:
            self.handler.link_lost(self, code, reason)


class WebSocketLink(WebSocketClientProtocol, _Reporter):
    """A WebSocket link (Autobahn): one JSON object per text message."""

    transport_name = "ws"

    def __init__(self) -> None:
        super().__init__()
        self.opened: defer.Deferred = defer.Deferred()

    @property
    def url(self) -> str:
        return self.factory.link_url

    def onOpen(self) -> None:  # noqa: N802 (Autobahn API)
        self.handler = self.factory.link_handler
        self.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:  # noqa: N802,N803
        if isBinary:
            self.log.warn("ignored a binary message from {url}", url=self.url)
            return
        self._deliver(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:  # noqa: N802,N803
        if not self.opened.called:
            self.opened.errback(ConnectionError(
                f"WebSocket handshake with {self.url} failed: {reason or code or 'connection closed'}"))
            return
        self._report_lost(code, reason or "")

    def send(self, frame: dict) -> None:
        if self.state == self.STATE_OPEN:
            self.sendMessage(_encode(frame), isBinary=False)

    def close(self) -> None:
        if self.state == self.STATE_OPEN:
            self.sendClose(1000)
        elif self.state != self.STATE_CLOSED:
            self.abort()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()


class TCPLink(Int32StringReceiver, _Reporter):
    """A raw TCP link: a 4-byte big-endian length, then that many bytes of UTF-8 JSON."""

    transport_name = "tcp"
    MAX_LENGTH = MAX_INCOMING_FRAME

    def __init__(self, url: str, handler: Any) -> None:
        self.url = url
        self.handler = handler
        self.closing = False

    def stringReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted API)
        self._deliver(data)

    def lengthLimitExceeded(self, length: int) -> None:  # noqa: N802 (Twisted API)
        self.log.warn("a frame of {length} bytes from {url} is over the limit", length=length, url=self.url)
        self.abort()

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802 (Twisted API)
        why = reason.getErrorMessage() if reason is not None else "connection closed"
        self._report_lost(None, why)

    def send(self, frame: dict) -> None:
        if self.transport is not None and not self.closing:
            payload = _encode(frame)
            self.transport.writeSequence([struct.pack("!I", len(payload)), payload])

    def close(self) -> None:
        if self.transport is not None and not self.closing:
            self.closing = True
            self.transport.loseConnection()

    def abort(self) -> None:
        if self.transport is not None:
            self.closing = True
            self.transport.abortConnection()


class _TCPFactory(protocol.Factory):
    def __init__(self, url: str, handler: Any) -> None:
        self.url = url
        self.handler = handler

    def buildProtocol(self, addr: Any) -> TCPLink:  # noqa: N802 (Twisted API)
        return TCPLink(self.url, self.handler)


def tls_options(host: str, trust: Any = None) -> Any:
    """Client TLS options for ``host``: the platform's trust store, or ``trust``
    (a PEM file path, PEM bytes, or a ``twisted.internet.ssl.Certificate``)."""
    root = None
    if trust is not None:
        if isinstance(trust, ssl.Certificate):
            root = trust
        else:
            if isinstance(trust, str):
                with open(trust, "rb") as f:
                    trust = f.read()
            root = ssl.Certificate.loadPEM(trust)
    return ssl.optionsForClientTLS(host, trustRoot=root)


def connect_link(reactor: Any, url: str, handler: LinkHandler, timeout: float = 10.0,
                 tls_trust: Any = None) -> defer.Deferred:
    """Open a link to the gateway at ``url``; fires with the :class:`Link` once it can send.

    ``timeout`` bounds the TCP connect and, for WebSocket, the opening
    handshake. ``tls_trust``: see :func:`tls_options`.
    """
    scheme, host, port = parse_url(url)
    if scheme in STREAM_SCHEMES:
        return defer.succeed(StreamLink(reactor, url, handler, timeout, tls_trust))
    endpoint: Any = HostnameEndpoint(reactor, host, port, timeout=timeout)
    if scheme in TLS_SCHEMES:
        endpoint = wrapClientTLS(tls_options(host, tls_trust), endpoint)
    if scheme in TCP_SCHEMES:
        return endpoint.connect(_TCPFactory(url, handler))

    # the HTTP URL autobahn sees: it only takes ws/wss
    factory = WebSocketClientFactory(url, reactor=reactor)
    factory.protocol = WebSocketLink
    factory.link_url = url
    factory.link_handler = handler
    factory.setProtocolOptions(
        openHandshakeTimeout=timeout,
        closeHandshakeTimeout=timeout,
        # the client sends JSON pings itself (the same on both transports); the server's
        # WebSocket pings are answered by Autobahn
        autoPingInterval=0,
        maxFramePayloadSize=0,
        maxMessagePayloadSize=MAX_INCOMING_FRAME,
    )

    def opened(link: WebSocketLink) -> defer.Deferred:
        return link.opened

    return endpoint.connect(factory).addCallback(opened)


class _TrustPolicy:
    """An ``IPolicyForHTTPS`` that trusts ``tls_trust`` (see :func:`tls_options`)."""

    def __init__(self, trust: Any) -> None:
        self.trust = trust

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:  # noqa: N802 (Twisted API)
        return tls_options(hostname.decode("ascii"), self.trust)


class _BodyCollector(protocol.Protocol):
    """Collects a response body (``readBody`` warns about pooled transports); ``done`` fires with it."""

    def __init__(self) -> None:
        self.done: defer.Deferred = defer.Deferred()
        self._parts: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted API)
        self._parts.append(data)

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802 (Twisted API)
        from twisted.web.client import ResponseDone
        from twisted.web.http import PotentialDataLoss

        if reason is None or reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self._parts))
        else:
            self.done.errback(reason)


class StreamLink(_Reporter):
    """A link over the HTTP streaming transport, long polling (``http://``, ``https://``).

    The first frame sent (the ``auth``) is the body of ``POST /stream``; its
    answer (the ``auth_reply``, whose ``stream`` id is kept here and not
    passed on) is the first frame received. Later frames go up one
    ``POST /stream/<id>`` at a time, those queued meanwhile as one JSON array;
    frames come down from ``GET /stream/<id>?after=<last event id>``, one
    poll after the other. The link is lost when the gateway answers 404 (it
    closed the connection: its last ``error`` frame said why), when a failed
    auth gives no id, or when the endpoint cannot be reached for
    ``timeout`` seconds. Like raw TCP, it reports no close code.
    """

    transport_name = "poll"
    #: seconds a poll may take (the gateway answers within its stream_poll_timeout, 25 s)
    POLL_TIMEOUT = 60.0
    #: bytes of one POST body (the gateway's max_frame_size, by default)
    MAX_BODY = 65536

    def __init__(self, reactor: Any, url: str, handler: Any, timeout: float = 10.0, tls_trust: Any = None) -> None:
        from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool

        self.url = url
        self.handler = handler
        self.reactor = reactor
        self.timeout = timeout
        self.base = url.rstrip("/")
        policy = _TrustPolicy(tls_trust) if tls_trust is not None else BrowserLikePolicyForHTTPS()
        self.agent = Agent(reactor, contextFactory=policy, connectTimeout=timeout,
                           pool=HTTPConnectionPool(reactor, persistent=True))
        self.stream_id: str | None = None
        self.last_id = 0
        self.closing = False
        self._queue: list[bytes] = []
        self._batch: list[bytes] = []  # the frames of the POST in flight
        self._single = 0  # frames to post one by one (after a batch was refused as too large)
        self._posting = False
        self._poll: defer.Deferred | None = None
        self._failing_since: float | None = None

    # --- HTTP

    def _request(self, method: bytes, path: str, body: bytes | None = None, timeout: float | None = None
                 ) -> defer.Deferred:
        import io

        from twisted.web.client import FileBodyProducer
        from twisted.web.http_headers import Headers

        headers = Headers({b"content-type": [b"application/json"]}) if body is not None else Headers()
        producer = FileBodyProducer(io.BytesIO(body)) if body is not None else None
        d = self.agent.request(method, (self.base + path).encode("utf-8"), headers, producer)

        def read(response: Any) -> defer.Deferred:
            collector = _BodyCollector()
            response.deliverBody(collector)
            return collector.done.addCallback(lambda data: (response.code, data))

        d.addCallback(read)
        d.addTimeout(timeout or self.timeout, self.reactor)
        return d

    # --- Link

    def send(self, frame: dict) -> None:
        if self.closing:
            return
        self._queue.append(_encode(frame))
        self._pump()

    def close(self) -> None:
        """Stop (the gateway ends the connection after its stream_resume)."""
        self._stop("closed by the client")

    def abort(self) -> None:
        self._stop("aborted")

    def _stop(self, reason: str) -> None:
        if self.closing:
            return
        self.closing = True
        self._queue.clear()
        if self._poll is not None:
            poll, self._poll = self._poll, None
            poll.cancel()
        self.reactor.callLater(0, self._report_lost, None, reason)

    # --- up

    def _pump(self) -> None:
        if self._posting or not self._queue or self.closing:
            return
        self._posting = True
        if self.stream_id is None:
            d = self._request(b"POST", "/stream", self._queue.pop(0))
            d.addCallbacks(self._opened, self._unreachable)
        else:
            batch = [self._queue.pop(0)]
            size = len(batch[0])
            if self._single:
                self._single -= 1
            while not self._single and self._queue and size + len(self._queue[0]) + len(batch) + 2 <= self.MAX_BODY:
                size += len(self._queue[0])
                batch.append(self._queue.pop(0))
            body = batch[0] if len(batch) == 1 else b"[" + b",".join(batch) + b"]"
            self._batch = batch
            d = self._request(b"POST", f"/stream/{self.stream_id}", body)
            d.addCallbacks(self._posted, self._unreachable)

    def _opened(self, answer: tuple[int, bytes]) -> None:
        self._posting = False
        status, data = answer
        frame = _decode(data)
        if not isinstance(frame, dict):
            self._stop(f"POST /stream answered {status}")
            return
        stream_id = frame.pop("stream", None)
        self._deliver(_encode(frame))
        if status != 200 or not isinstance(stream_id, str):
            self._stop(f"POST /stream answered {status}")
            return
        self.stream_id = stream_id
        self._next_poll()
        self._pump()

    def _posted(self, answer: tuple[int, bytes]) -> None:
        self._posting = False
        batch, self._batch = self._batch, []
        if answer[0] == 404:
            self._stop("the gateway closed the connection")
            return
        if answer[0] == 413:
            if len(batch) > 1:
                # together too large: each one alone
                self._queue[:0] = batch
                self._single = len(batch)
            else:
                # this one frame is over the gateway's limit: say so, as a WebSocket gateway
                # would with its close (the client fails that message; it is not posted again)
                frame = _decode(batch[0]) if batch else None
                ref = frame.get("clientMsgId") or frame.get("id") if isinstance(frame, dict) else None
                error = {"type": "error", "code": "too_large",
                         "message": "the gateway refused the frame for its size (413)"}
                if isinstance(ref, str):
                    error["ref"] = ref
                self._deliver(_encode(error))
        self._pump()

    def _unreachable(self, failure: Any) -> None:
        self._posting = False
        self._stop(f"the stream endpoint cannot be reached: {failure.getErrorMessage()}")

    # --- down

    def _next_poll(self) -> None:
        if self.closing:
            return
        d = self._request(b"GET", f"/stream/{self.stream_id}?after={self.last_id}", timeout=self.POLL_TIMEOUT)
        self._poll = d
        d.addCallbacks(self._polled, self._poll_failed)

    def _polled(self, answer: tuple[int, bytes]) -> None:
        self._poll = None
        self._failing_since = None
        status, data = answer
        if status == 404:
            self._stop("the gateway closed the connection")
            return
        items = _decode(data) if status == 200 else []
        for item in items if isinstance(items, list) else []:
            if self.closing:
                return
            if isinstance(item, dict) and isinstance(item.get("id"), int) and item["id"] > self.last_id:
                self.last_id = item["id"]
                frame = item.get("frame")
                if isinstance(frame, dict) and self.handler is not None and not self._lost:
                    self.handler.frame_received(self, frame)
        self._next_poll()

    def _poll_failed(self, failure: Any) -> None:
        self._poll = None
        if self.closing:
            return
        # a dropped poll is retried (the gateway keeps the frames for stream_resume)
        now = self.reactor.seconds()
        if self._failing_since is None:
            self._failing_since = now
        if now - self._failing_since > self.timeout:
            self._stop(f"the stream endpoint cannot be reached: {failure.getErrorMessage()}")
            return
        self.reactor.callLater(0.5, self._next_poll)

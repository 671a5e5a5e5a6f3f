"""One connection to one gateway, as a *link* that carries PROTOCOL.md frames.

A link hides the transport: WebSocket (``ws://``, ``wss://``: one JSON object
per text message) or raw TCP (``tcp://``, and ``tcps://`` for TLS: a 4-byte
big-endian length, then the UTF-8 JSON). :func:`connect_link` opens one and
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
TLS_SCHEMES = ("wss", "tcps", "tls")
DEFAULT_PORTS = {"ws": 80, "wss": 443, "tcp": 8081, "tcps": 8081, "tls": 8081}

#: frames from the gateway may be large (a history page of 200 messages of 64 KiB each)
MAX_INCOMING_FRAME = 64 * 1024 * 1024


class LinkHandler(Protocol):
    """What a link reports to (the client core)."""

    def frame_received(self, link: "Link", frame: dict) -> None: ...

    def link_lost(self, link: "Link", code: int | None, reason: str) -> None: ...


class Link(Protocol):
    """An open connection to a gateway (see the module docstring)."""

    url: str
    transport_name: str  # "ws" or "tcp"

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
    if scheme not in WS_SCHEMES + TCP_SCHEMES:
        raise BadURL(f"{url!r}: the scheme must be ws, wss, tcp or tcps")
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

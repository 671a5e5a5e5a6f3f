"""Tiny real clients of the gateway, for integration and end-to-end tests.

All speak PROTOCOL.md over a real socket on the test's reactor and collect
the frames they receive into a ``DeferredQueue``::

    client = await connect_ws(gateway.ws_url)        # or connect_tcp(gateway.tcp_port),
                                                     # connect_stream(gateway.stream_port, "sse"|"poll")
    reply = await client.auth(cluster.token("alice"))
    assert reply["ok"]
    client.send({"type": "message", ...})
    frame = await client.receive_type("message_reply")
    client.close()
    await client.closed                               # WebSocket: (code, reason); TCP: None

Every wait has a timeout (a missing frame fails the test, it never hangs).
"""

from __future__ import annotations

import json
import struct
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.protocols.basic import Int32StringReceiver

#: seconds a client waits for a frame before the test fails
RECEIVE_TIMEOUT = 10.0


class FrameTimeout(AssertionError):
    """An expected frame did not arrive in time."""


class _Frames:
    """The receiving side shared by both clients."""

    def _init_frames(self) -> None:
        self.frames: defer.DeferredQueue = defer.DeferredQueue()
        self.received: list[dict[str, Any]] = []  # every frame, in order, for assertions
        self.closed: defer.Deferred = defer.Deferred()
        self.connected = True

    def _frame(self, frame: Any) -> None:
        self.received.append(frame)
        self.frames.put(frame)

    def receive(self, timeout: float = RECEIVE_TIMEOUT) -> defer.Deferred:
        """The next frame (a dict); fails with :class:`FrameTimeout` after ``timeout``."""
        d = self.frames.get()

        def timed_out(failure, _timeout):
            if failure.check(defer.CancelledError):
                raise FrameTimeout(f"no frame within {timeout:g}s (received so far: {self.received!r})")
            return failure

        return d.addTimeout(timeout, reactor, onTimeoutCancel=timed_out)

    async def receive_type(self, frame_type: str, timeout: float = RECEIVE_TIMEOUT,
                           skip: tuple[str, ...] | None = None) -> dict[str, Any]:
        """The next frame of type ``frame_type``. Frames before it are skipped when their
        type is in ``skip`` (None: skip anything); any other frame fails the test."""
        while True:
            frame = await self.receive(timeout)
            if frame.get("type") == frame_type:
                return frame
            if skip is not None and frame.get("type") not in skip:
                raise AssertionError(f"expected a {frame_type!r} frame, got {frame!r}")

    async def receive_until(self, frame_type: str, timeout: float = RECEIVE_TIMEOUT) -> list[dict[str, Any]]:
        """Every frame up to and including the next one of type ``frame_type``."""
        frames = []
        while True:
            frame = await self.receive(timeout)
            frames.append(frame)
            if frame.get("type") == frame_type:
                return frames

    async def auth(self, token: str, device: str | None = None,
                   timeout: float = RECEIVE_TIMEOUT) -> dict[str, Any]:
        """Send ``auth`` and return the ``auth_reply`` (the sync that follows stays queued)."""
        frame = {"type": "auth", "token": token}
        if device is not None:
            frame["device"] = device
        self.send(frame)
        return await self.receive_type("auth_reply", timeout, skip=())

    def pending(self) -> int:
        """Frames received and not yet taken."""
        return len(self.frames.pending)


class TCPClient(Int32StringReceiver, _Frames):
    """Raw TCP client: 4-byte big-endian length, then UTF-8 JSON."""

    MAX_LENGTH = 64 * 1024 * 1024

    def __init__(self) -> None:
        self._init_frames()

    def stringReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted API)
        self._frame(json.loads(data.decode("utf-8")))

    def send(self, frame: dict[str, Any]) -> None:
        self.sendString(json.dumps(frame, separators=(",", ":")).encode("utf-8"))

    def send_raw(self, data: bytes) -> None:
        """Write bytes as they are (a broken frame, a partial length prefix...)."""
        self.transport.write(data)

    def send_frame_bytes(self, payload: bytes) -> None:
        """One length-prefixed frame whose payload is ``payload`` (need not be JSON)."""
        self.transport.write(struct.pack("!I", len(payload)) + payload)

    def close(self) -> None:
        self.transport.loseConnection()

    def abort(self) -> None:
        """Drop the connection without a FIN handshake (a crashed client)."""
        self.transport.abortConnection()

    def pause_reading(self) -> None:
        """Stop reading, as a slow consumer would."""
        self.transport.pauseProducing()

    def resume_reading(self) -> None:
        self.transport.resumeProducing()

    def connectionLost(self, reason) -> None:  # noqa: N802
        self.connected = False
        self.closed.callback(None)


class WSClient(WebSocketClientProtocol, _Frames):
    """WebSocket client: one JSON object per text message."""

    def __init__(self) -> None:
        super().__init__()
        self._init_frames()
        self.opened: defer.Deferred = defer.Deferred()
        self.close_code: int | None = None
        self.close_reason: str | None = None

    def onOpen(self) -> None:  # noqa: N802 (autobahn API)
        self.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:  # noqa: N802, N803
        if isBinary:
            self._frame({"type": "<binary>", "payload": payload})
        else:
            self._frame(json.loads(payload.decode("utf-8")))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:  # noqa: N802, N803
        self.connected = False
        self.close_code = code
        self.close_reason = reason
        if not self.opened.called:
            self.opened.errback(ConnectionError(f"WebSocket closed before opening: {code} {reason}"))
        if not self.closed.called:
            self.closed.callback((code, reason))

    def send(self, frame: dict[str, Any]) -> None:
        self.sendMessage(json.dumps(frame, separators=(",", ":")).encode("utf-8"), isBinary=False)

    def send_text(self, text: str) -> None:
        """A text message as it is (need not be JSON)."""
        self.sendMessage(text.encode("utf-8"), isBinary=False)

    def send_binary(self, data: bytes) -> None:
        self.sendMessage(data, isBinary=True)

    def close(self, code: int = 1000, reason: str | None = None) -> None:
        self.sendClose(code, reason)

    def abort(self) -> None:
        self.transport.abortConnection()

    def pause_reading(self) -> None:
        self.transport.pauseProducing()

    def resume_reading(self) -> None:
        self.transport.resumeProducing()


class _TCPFactory(protocol.Factory):
    protocol = TCPClient


async def connect_tcp(port: int, host: str = "127.0.0.1", timeout: float = RECEIVE_TIMEOUT) -> TCPClient:
    """A connected :class:`TCPClient`."""
    ep = TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    return await ep.connect(_TCPFactory())


async def connect_ws(url: str, timeout: float = RECEIVE_TIMEOUT, **factory_options: Any) -> WSClient:
    """A :class:`WSClient` whose opening handshake is done (``url``: ``ws://host:port/path``)."""
    factory = WebSocketClientFactory(url)
    factory.protocol = WSClient
    if factory_options:
        factory.setProtocolOptions(**factory_options)
    ep = TCP4ClientEndpoint(reactor, factory.host, factory.port, timeout=timeout)
    client = await ep.connect(factory)
    return await client.opened.addTimeout(timeout, reactor)


# --- the HTTP streaming transport (PROTOCOL.md "HTTP streaming transport") ---------------------


class _HTTPExchange(protocol.Protocol):
    """One HTTP/1.1 request on a connection of its own; the answer's body parsed as it arrives.

    Content-Length, chunked and read-until-close bodies; ``on_body(bytes)``
    gets the body piece by piece (an event stream), else it is collected in
    ``body``. ``done`` fires with the exchange when the answer is complete or
    the connection ends.
    """

    def __init__(self, request: bytes, on_body=None) -> None:
        self.request = request
        self.on_body = on_body
        self.done: defer.Deferred = defer.Deferred()
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.body = bytearray()
        self.local = None
        self._buffer = b""
        self._mode = "head"
        self._remaining = 0

    def connectionMade(self) -> None:  # noqa: N802 (Twisted API)
        self.local = self.transport.getHost()
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self._buffer += data
        while self._buffer and not self.done.called:
            if self._mode == "head":
                end = self._buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                head, self._buffer = self._buffer[:end].decode("latin-1"), self._buffer[end + 4:]
                lines = head.split("\r\n")
                self.status = int(lines[0].split(" ", 2)[1])
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    self.headers[name.strip().lower()] = value.strip()
                if self.headers.get("transfer-encoding", "").lower() == "chunked":
                    self._mode = "chunk-size"
                elif "content-length" in self.headers:
                    self._mode, self._remaining = "length", int(self.headers["content-length"])
                    if self._remaining == 0:
                        self._finish()
                else:
                    self._mode = "close"
            elif self._mode == "length":
                piece, self._buffer = self._buffer[:self._remaining], self._buffer[self._remaining:]
                self._remaining -= len(piece)
                self._body(piece)
                if self._remaining == 0:
                    self._finish()
            elif self._mode == "chunk-size":
                end = self._buffer.find(b"\r\n")
                if end < 0:
                    return
                size = int(self._buffer[:end].split(b";")[0], 16)
                self._buffer = self._buffer[end + 2:]
                if size == 0:
                    self._finish()
                    return
                self._mode, self._remaining = "chunk", size
            elif self._mode == "chunk":
                if len(self._buffer) < self._remaining + 2:
                    return
                piece = self._buffer[:self._remaining]
                self._buffer = self._buffer[self._remaining + 2:]
                self._mode = "chunk-size"
                self._body(piece)
            else:
                piece, self._buffer = self._buffer, b""
                self._body(piece)

    def _body(self, piece: bytes) -> None:
        if self.on_body is not None:
            self.on_body(piece)
        else:
            self.body += piece

    def _finish(self) -> None:
        if not self.done.called:
            self.done.callback(self)
        self.transport.loseConnection()

    def connectionLost(self, reason) -> None:  # noqa: N802
        if not self.done.called:
            self.done.callback(self)


class _ExchangeFactory(protocol.ClientFactory):
    def __init__(self, exchange: _HTTPExchange) -> None:
        self.exchange = exchange

    def buildProtocol(self, addr):  # noqa: N802
        return self.exchange


class _LocalAddress:
    """What ``client.transport.getHost()`` gives on the other clients: the socket that named the connection."""

    def __init__(self, address) -> None:
        self._address = address

    def getHost(self):  # noqa: N802
        return self._address


class StreamClient(_Frames):
    """A client of the HTTP streaming transport: ``mode`` ``"sse"`` (an event stream) or ``"poll"``.

    The first frame sent is the body of ``POST /stream`` (an ``auth``; the
    id of the ``auth_reply`` is kept as ``stream_id`` and dropped from the
    frame, as it is transport plumbing); later frames are posted in order,
    one request at a time, those queued meanwhile as one JSON array. Frames
    come from ``GET /stream/<id>`` (Server-Sent Events, reopened with
    ``Last-Event-ID`` when it ends, as EventSource does) or from polls
    (``?after=n``). ``closed`` fires once the server answers 404 for the id
    (the connection is over), or a failed ``POST /stream``.
    """

    def __init__(self, port: int, mode: str = "sse", host: str = "127.0.0.1", max_body: int = 65536) -> None:
        self._init_frames()
        self.port = port
        self.host = host
        self.mode = mode
        self.max_body = max_body
        self.stream_id: str | None = None
        self.last_id = 0
        self.transport: _LocalAddress | None = None
        self.statuses: list[int] = []  # HTTP status of every POST, in order
        self._queue: list[bytes] = []
        self._posting = False
        self._opened = False
        self._listening: _HTTPExchange | None = None
        self._paused = False
        self._sse_buffer = b""
        self._event: dict[str, Any] = {}

    # --- plumbing

    def _request(self, method: str, path: str, body: bytes | None = None,
                 headers: dict[str, str] | None = None, on_body=None) -> _HTTPExchange:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}", "Connection: close"]
        for name, value in (headers or {}).items():
            lines.append(f"{name}: {value}")
        if body is not None:
            lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")
        exchange = _HTTPExchange(data, on_body)
        TCP4ClientEndpoint(reactor, self.host, self.port, timeout=RECEIVE_TIMEOUT).connect(
            _ExchangeFactory(exchange)).addErrback(lambda f: exchange.done.called or exchange.done.errback(f))
        return exchange

    def _gone(self) -> None:
        """The connection is over (404, or no id)."""
        self.connected = False
        self._queue.clear()
        if self._listening is not None and self._listening.transport is not None:
            self._listening.transport.abortConnection()
        self._listening = None
        if not self.closed.called:
            self.closed.callback(None)

    # --- sending

    def send(self, frame: dict[str, Any]) -> None:
        self.send_frame_bytes(json.dumps(frame, separators=(",", ":")).encode("utf-8"))

    def send_frame_bytes(self, payload: bytes) -> None:
        """One frame whose JSON is ``payload`` (need not be JSON)."""
        if not self.connected:
            return
        self._queue.append(payload)
        self._pump()

    def _pump(self) -> None:
        if self._posting or not self._queue or not self.connected:
            return
        self._posting = True
        if not self._opened:
            self._opened = True
            exchange = self._request("POST", "/stream", self._queue.pop(0))
            exchange.done.addCallback(self._open_answered)
            return
        batch = [self._queue.pop(0)]
        size = len(batch[0])
        while self._queue and size + len(self._queue[0]) + 2 + len(batch) <= self.max_body:
            size += len(self._queue[0])
            batch.append(self._queue.pop(0))
        body = batch[0] if len(batch) == 1 else b"[" + b",".join(batch) + b"]"
        exchange = self._request("POST", f"/stream/{self.stream_id}", body)
        exchange.done.addCallback(self._post_answered)

    def _open_answered(self, exchange: _HTTPExchange) -> None:
        self._posting = False
        self.statuses.append(exchange.status)
        if exchange.local is not None:
            self.transport = _LocalAddress(exchange.local)
        try:
            frame = json.loads(bytes(exchange.body))
        except ValueError:
            frame = {"type": "<http>", "status": exchange.status, "body": bytes(exchange.body)}
        stream_id = frame.pop("stream", None) if isinstance(frame, dict) else None
        self._frame(frame)
        if exchange.status != 200 or not stream_id:
            self._gone()
            return
        self.stream_id = stream_id
        self._listen()
        self._pump()

    def _post_answered(self, exchange: _HTTPExchange) -> None:
        self._posting = False
        self.statuses.append(exchange.status)
        if exchange.status == 404:
            self._queue.clear()
            return  # the stream says why (or already said it)
        self._pump()

    # --- receiving

    def _listen(self) -> None:
        if not self.connected or self._paused or self._listening is not None:
            return
        if self.mode == "poll":
            exchange = self._request("GET", f"/stream/{self.stream_id}?after={self.last_id}")
            self._listening = exchange
            exchange.done.addCallback(self._polled)
        else:
            self._sse_buffer = b""
            self._event = {}
            exchange = self._request("GET", f"/stream/{self.stream_id}",
                                     headers={"Accept": "text/event-stream", "Last-Event-ID": str(self.last_id)},
                                     on_body=self._sse_data)
            self._listening = exchange
            exchange.done.addCallback(self._events_ended)

    def _polled(self, exchange: _HTTPExchange) -> None:
        if self._listening is exchange:
            self._listening = None
        if exchange.status == 404:
            self._gone()
            return
        if exchange.status == 200:
            for item in json.loads(bytes(exchange.body)):
                self.last_id = item["id"]
                self._frame(item["frame"])
        self._listen()

    def _sse_data(self, data: bytes) -> None:
        self._sse_buffer += data
        while True:
            end = self._sse_buffer.find(b"\n")
            if end < 0:
                return
            line, self._sse_buffer = self._sse_buffer[:end].rstrip(b"\r"), self._sse_buffer[end + 1:]
            if not line:
                event, self._event = self._event, {}
                if "data" in event:
                    if "id" in event:
                        self.last_id = int(event["id"])
                    self._frame(json.loads(event["data"]))
                continue
            if line.startswith(b":"):
                continue
            name, _, value = line.decode("utf-8").partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "data":
                self._event["data"] = self._event["data"] + "\n" + value if "data" in self._event else value
            elif name in ("id", "retry", "event"):
                self._event[name] = value

    def _events_ended(self, exchange: _HTTPExchange) -> None:
        if self._listening is exchange:
            self._listening = None
        if exchange.status == 404:
            self._gone()
            return
        # as EventSource: reconnect with Last-Event-ID (a closed connection answers 404)
        reactor.callLater(0.05, self._listen)

    # --- the client's side of a connection

    def close(self) -> None:
        """Stop fetching and sending (the gateway ends the connection after stream_resume)."""
        self._gone()

    abort = close

    def pause_reading(self) -> None:
        """Stop reading the event stream (SSE), or stop polling: a slow consumer."""
        self._paused = True
        if self._listening is not None and self.mode == "sse" and self._listening.transport is not None:
            self._listening.transport.pauseProducing()

    def resume_reading(self) -> None:
        self._paused = False
        if self._listening is not None and self._listening.transport is not None:
            self._listening.transport.resumeProducing()
        else:
            self._listen()


def connect_stream(port: int, mode: str = "sse", host: str = "127.0.0.1") -> StreamClient:
    """A :class:`StreamClient` (no request is made before its first frame, the ``auth``)."""
    return StreamClient(port, mode, host)

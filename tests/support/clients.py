"""Tiny real clients of the gateway, for integration and end-to-end tests.

Both speak PROTOCOL.md over a real socket on the test's reactor and collect
the frames they receive into a ``DeferredQueue``::

    client = await connect_ws(gateway.ws_url)        # or connect_tcp(gateway.tcp_port)
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

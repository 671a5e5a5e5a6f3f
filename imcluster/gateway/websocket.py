"""WebSocket clients (browsers, H5): Autobahn in front of the protocol engine.

Thin on purpose: Autobahn does RFC 6455 (handshake, masking, UTF-8
validation, ping/pong, permessage-deflate, the 1009 close for a message over
``max_frame_size``); every text message goes to the connection's
:class:`~imcluster.gateway.engine.ClientConnection`, which writes back
through :meth:`GatewayWebSocketProtocol.write_message` and closes through
:meth:`~GatewayWebSocketProtocol.close_for` (the
:class:`~imcluster.interfaces.ITransportAdapter` contract). Any path is
accepted (``/ws`` is the documented one).

The factory takes no URL (the port comes from the endpoint string, see
DEPENDENCIES.md) and runs Autobahn's own timers (handshake timeout,
auto-ping, close handshake) on ``hub.clock``.
"""

from __future__ import annotations

import functools
import types
from collections import deque
from typing import Any

import autobahn.util
import autobahn.websocket.protocol
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.util import encode_truncate
from autobahn.websocket.compress import PerMessageDeflateOffer, PerMessageDeflateOfferAccept
from autobahn.websocket.types import ConnectionDeny
from zope.interface import implementer

from imcluster import metrics
from imcluster.gateway.engine import ClientConnection
from imcluster.gateway.timers import wheel
from imcluster.gateway.transport import (SLOW_CONSUMER, CloseReason, buffered_bytes, forwarded_ip,
                                         peer_address)
from imcluster.interfaces import ITransportAdapter

# Autobahn builds the arguments of its debug log lines on every frame it
# sends, logged or not, and colours them with click when click can be
# imported (many installs have it: Flask, schemathesis, ...): 10-20 % of a
# gateway's CPU in the fan-out benchmark. A daemon's log wants no colours.
autobahn.util._HAS_CLICK = False


class _Pretty:
    """``pformat(obj)`` formatted only if a log line is ever rendered."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __str__(self) -> str:
        from pprint import pformat

        return pformat(self.obj)

    __repr__ = __str__

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


# Autobahn pretty-prints its 29 configuration attributes into a debug log
# line for every connection it accepts, logged or not: 14 % of a gateway's
# CPU while clients connect (bench/run.py --scenarios conn --profile). Its
# pformat is only ever called for that and for timing reports.
autobahn.websocket.protocol.pformat = _Pretty

# what a connection's send queue is while nothing waits in it (see sendData)
_NO_QUEUE: tuple = ()

# the handshake's leftovers that a connection no longer needs once open
_HANDSHAKE_LEFTOVERS = ("http_request_data", "http_response_data", "http_headers", "http_status_line")


class _ClockTimer:
    """What Autobahn's protocols expect of ``factory._batched_timer``, on ``hub.clock``.

    Autobahn otherwise schedules its timers on txaio's global reactor, out
    of reach of ``hub.clock`` (and of tests driving a ``task.Clock``). Its
    timers (opening and closing handshake, auto-ping and its timeout) are
    coarse, one or two per connection: they go on the clock's
    :class:`~imcluster.gateway.timers.TimerWheel`, whose calls cost a
    fraction of a ``DelayedCall`` and may be cancelled after they ran.
    """

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.wheel = wheel(clock)

    def call_later(self, delay: float, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if kwargs:
            return self.wheel.call_later(delay, functools.partial(fn, *args, **kwargs))
        return self.wheel.call_later(delay, fn, *args)


_END_OF_HEADER = b"\r\n\r\n"


@implementer(ITransportAdapter)
class GatewayWebSocketProtocol(WebSocketServerProtocol):
    """One WebSocket client: Autobahn below, a :class:`ClientConnection` above.

    Autobahn buffers the opening handshake without a limit and searches the
    whole buffer again on every chunk (DEPENDENCIES.md "Autobahn, beyond the
    handshake"), so the handshake is collected here first, up to
    ``max_handshake_size`` bytes (then ``HTTP 431`` and close), and handed
    to Autobahn once its header is complete; ``handshake_timeout`` is
    Autobahn's own ``openHandshakeTimeout``. Pongs, which Autobahn writes
    straight to the transport, are counted as the connection's pending
    output (:meth:`ClientConnection.output_written`).
    """

    transport_name = "ws"
    # (Autobahn's txaio ``log`` is left alone: its calls rely on it)
    conn: ClientConnection | None = None
    # (Autobahn's own ``peer`` is a string: ours has another name)
    client_address: tuple[str, int] | None = None
    #: this socket holds one of the hub's max_connections slots
    _slot = False
    #: the opening handshake received so far; None once handed to Autobahn
    _handshake: bytearray | None = None
    #: the handshake was too large: answered 431, nothing more is read
    _refused = False

    def connectionMade(self) -> None:  # noqa: N802 (Twisted API)
        if not self.factory.hub.socket_opened():
            # over max_connections: gone before Autobahn allocates anything for it
            self.transport.abortConnection()
            return
        self._slot = True
        self._handshake = bytearray()
        super().connectionMade()
        # Autobahn gives every connection a deque (760 bytes) for chopped and
        # synchronous writes, which the gateway never makes: sendData creates
        # one the first time it would be used
        if not self.send_queue:
            self.send_queue = _NO_QUEUE

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        buf = self._handshake
        if buf is None:
            if self._slot and not self._refused:
                super().dataReceived(data)
            return
        # only the new bytes (and the 3 before them) can complete the header: linear
        start = max(0, len(buf) - 3)
        buf += data
        end = buf.find(_END_OF_HEADER, start)
        size = len(buf) if end < 0 else end + len(_END_OF_HEADER)
        if size > self.factory.max_handshake_size:
            self._refuse_handshake()
            return
        if end >= 0:
            self._handshake = None
            super().dataReceived(bytes(buf))

    def _refuse_handshake(self) -> None:
        """HTTP 431 and close, quietly: Autobahn's failHandshake would log two lines per
        refusal, and a flood of refusals must not become a flood of log lines."""
        self._handshake = None
        self._refused = True
        metrics.CLOSES.labels(reason="handshake_too_large").inc()
        self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
                             b"Connection: close\r\nContent-Length: 0\r\n\r\n")
        self.transport.loseConnection()

    def onOpenHandshakeTimeout(self) -> None:  # noqa: N802 (Autobahn API)
        if self.state == self.STATE_CONNECTING:
            metrics.CLOSES.labels(reason="handshake_timeout").inc()
        super().onOpenHandshakeTimeout()

    def onConnect(self, request: Any) -> None:  # noqa: N802 (Autobahn API)
        hub = self.factory.hub
        ip, port = peer_address(self.transport)
        if hub.config.trust_proxy:
            ip = forwarded_ip(request.headers) or ip
        self.client_address = (ip, port)
        conn = ClientConnection(hub, self)
        if not conn.open():
            raise ConnectionDeny(503, "try again later")
        self.conn = conn
        self.transport.registerProducer(conn, True)
        return None

    def onOpen(self) -> None:  # noqa: N802 (Autobahn API)
        # the raw request and response and the parsed headers (about 1 KB)
        # served the handshake; Autobahn keeps them for its test suite
        for name in _HANDSHAKE_LEFTOVERS:
            setattr(self, name, None)

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:  # noqa: N802
        """Autobahn's, without its per-write debug line's arguments on the usual path."""
        if not sync and not chopsize and not self.send_queue:
            self.transport.write(data)
            return
        if self.send_queue is _NO_QUEUE:
            self.send_queue = deque()
        super().sendData(data, sync, chopsize)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:  # noqa: N802,N803
        conn = self.conn
        if conn is None:
            return
        if isBinary:
            conn.binary_received(len(payload))
        else:
            conn.frame_received(payload)

    def onPing(self, payload: bytes) -> None:  # noqa: N802
        conn = self.conn
        if conn is None or not conn.is_open:
            # closing (a slow consumer, say): no more output for this client
            return
        conn.activity()
        super().onPing(payload)  # Autobahn's sendPong: straight to the transport
        conn.output_written(2 + len(payload))

    def onPong(self, payload: bytes) -> None:  # noqa: N802
        if self.conn is not None:
            self.conn.activity()

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        if not self._slot:
            return  # refused in connectionMade: Autobahn never started
        self._slot = False
        self._handshake = None
        self.factory.hub.socket_closed()
        try:
            super().connectionLost(reason)
        finally:
            # Autobahn leaves its close-handshake timer behind when the peer goes first
            call = getattr(self, "closeHandshakeTimeoutCall", None)
            if call is not None:
                self.closeHandshakeTimeoutCall = None
                call.cancel()
            if self.conn is not None:
                self.conn.connection_lost()

    # --- what the engine asks of its adapter

    def write_message(self, data: bytes) -> None:
        """Send one JSON frame as a text message.

        ``max_frame_size`` bounds what clients send. Autobahn applies its
        ``maxMessagePayloadSize`` to sendMessage() too (PayloadExceededError),
        which would make undeliverable every message whose ``message_send``
        is larger than a client frame may be: one near the limit (the
        delivery adds msgId, seq, from, ts) or one posted over HTTP. So the
        limit is lifted while sending (single-threaded: no receive interleaves).
        """
        if self.state == self.STATE_OPEN:
            limit = self.maxMessagePayloadSize
            self.maxMessagePayloadSize = 0
            try:
                self.sendMessage(data, False)
            finally:
                self.maxMessagePayloadSize = limit

    def close_for(self, reason: CloseReason) -> None:
        """Start the closing handshake with the reason's close code (any code, 1009 and 1013 included).

        Autobahn's close-handshake timeout drops a client that does not answer.
        """
        if self.state == self.STATE_OPEN:
            # sendClose() only allows 1000 and 3000-4999; the protocol needs 1001/1008/1009 too
            self.sendCloseFrame(code=reason.code, reasonUtf8=encode_truncate(reason.text, 123), isReply=False)
            if reason.name == SLOW_CONSUMER.name:
                # it does not read, so it will not answer the close before close_timeout:
                # stop reading it too (as TCP's loseConnection does), or whatever it keeps
                # sending (a ping flood) costs the reactor until then
                self.transport.pauseProducing()
        elif self.state != self.STATE_CLOSED:
            self.dropConnection(abort=True)

    def buffered_bytes(self) -> int | None:
        """Output the transport holds and the kernel did not take yet."""
        return buffered_bytes(self.transport)


class GatewayWebSocketFactory(WebSocketServerFactory):
    """Autobahn server factory holding the hub; see :func:`make_websocket_factory`."""

    protocol = GatewayWebSocketProtocol

    def __init__(self, hub: Any) -> None:
        config = hub.config
        super().__init__(externalPort=config.external_port or None)
        self.hub = hub
        self._batched_timer = _ClockTimer(hub.clock)
        self.max_handshake_size = config.max_handshake_size
        max_size = config.max_frame_size

        def accept_compression(offers: list[Any]) -> Any:
            for offer in offers:
                if isinstance(offer, PerMessageDeflateOffer):
                    # bounds the inflated size as well as Autobahn's own check does
                    return PerMessageDeflateOfferAccept(offer, max_message_size=max_size)
            return None

        options: dict[str, Any] = dict(
            maxFramePayloadSize=max_size,
            maxMessagePayloadSize=max_size,
            # send the close frame (1009, 1002, ...) instead of dropping the TCP connection
            failByDrop=False,
            openHandshakeTimeout=config.handshake_timeout,
            closeHandshakeTimeout=config.close_timeout,
            autoPingInterval=config.ws_ping_interval,
            autoPingTimeout=config.ws_ping_interval,
            webStatus=False,
        )
        if config.compression:
            options["perMessageCompressionAccept"] = accept_compression
        self.setProtocolOptions(**options)
        # Autobahn copies its ~30 options from the factory into every protocol
        # instance that does not have them: as class attributes of a protocol
        # class of this factory's own they are shared, and each connection's
        # __dict__ is about 2 KB smaller (it stays below 86 keys)
        # (functions, such as perMessageCompressionAccept, must not become methods)
        shared = {name: getattr(self, name) for name in self.protocol.CONFIG_ATTRS}
        self.protocol = type(self.protocol.__name__, (self.protocol,),
                             {name: staticmethod(v) if isinstance(v, types.FunctionType) else v
                              for name, v in shared.items()})


def make_websocket_factory(hub: Any) -> GatewayWebSocketFactory:
    """The factory for ``--ws`` listeners (limits from ``hub.config``)."""
    return GatewayWebSocketFactory(hub)

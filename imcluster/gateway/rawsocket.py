"""Raw TCP clients (APPs): 4-byte big-endian length prefix, then UTF-8 JSON.

Like ``Int32StringReceiver``, but the announced length is checked against
``max_frame_size`` as soon as the 4 prefix bytes arrive: a client announcing
a huge frame gets ``error`` ``too_large`` and is closed without the server
buffering a byte of it. Complete frames go to the connection's
:class:`~imcluster.gateway.engine.ClientConnection`. TLS comes from an
``ssl:`` endpoint string; nothing here depends on it.

Raw TCP has no close codes: a close is rendered as the ``error`` frame of
its reason, then a close (:meth:`RawSocketProtocol.close_for`).
"""

from __future__ import annotations

import struct
from typing import Any

from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from imcluster import protocol as p
from imcluster.gateway.engine import ClientConnection
from imcluster.gateway.transport import CloseReason, buffered_bytes, peer_address, write_farewell
from imcluster.interfaces import ITransportAdapter

_HEADER = struct.Struct(">I")


@implementer(ITransportAdapter)
class RawSocketProtocol(Protocol):
    """One raw TCP client."""

    log = Logger()
    transport_name = "tcp"

    def __init__(self) -> None:
        self.conn: ClientConnection | None = None
        self.client_address: tuple[str, int] | None = None
        self._buffer = bytearray()
        self._need = _HEADER.size
        self._closing = False
        self._abort_call: Any = None
        self._slot = False  # holds one of the hub's max_connections slots

    def connectionMade(self) -> None:  # noqa: N802 (Twisted API)
        hub = self.factory.hub
        if not hub.socket_opened():
            # over max_connections: closed before reading or writing a byte
            self._closing = True
            self.transport.abortConnection()
            return
        self._slot = True
        self.client_address = peer_address(self.transport)
        conn = ClientConnection(hub, self)
        if not conn.open():
            self.write_message(p.encode_bytes(p.error_frame(
                p.UNAVAILABLE, "the server takes no new connections; try again later")))
            self._lose_connection()
            return
        self.conn = conn
        self.transport.registerProducer(conn, True)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self._closing or self.conn is None:
            return
        buf = self._buffer
        if buf:
            # a frame arrives in pieces: collect them without copying the
            # whole buffer per piece (that would be quadratic)
            buf += data
            if len(buf) < self._need:
                return
            data = bytes(buf)
            buf.clear()
        conn = self.conn
        limit = self.factory.max_frame_size
        size = _HEADER.size
        offset = 0
        end = len(data)
        while True:
            if end - offset < size:
                self._need = size
                break
            (length,) = _HEADER.unpack_from(data, offset)
            if length > limit:
                conn.frame_too_large()
                return
            start = offset + size
            if end - start < length:
                self._need = size + length
                break
            offset = start + length
            conn.frame_received(data[start:offset])
            if self._closing:
                return
        if offset < end:
            buf += memoryview(data)[offset:]

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        self._closing = True
        if self._slot:
            self._slot = False
            self.factory.hub.socket_closed()
        if self._abort_call is not None:
            call, self._abort_call = self._abort_call, None
            if call.active():
                call.cancel()
        self._buffer.clear()
        if self.conn is not None:
            self.conn.connection_lost()

    # --- what the engine asks of its adapter

    def write_message(self, data: bytes) -> None:
        """Send one frame: length prefix, then the JSON bytes."""
        if not self._closing:
            self.transport.writeSequence((_HEADER.pack(len(data)), data))

    def close_for(self, reason: CloseReason) -> None:
        """The reason's ``error`` frame (when it has one), then close."""
        if self._closing:
            return
        write_farewell(self, reason)
        self._lose_connection()

    def _lose_connection(self) -> None:
        """Flush and close; a client that does not read its last frames is dropped after ``close_timeout``."""
        if self._closing:
            return
        self._closing = True
        # a registered streaming producer would hold loseConnection back
        self.transport.unregisterProducer()
        self.transport.loseConnection()
        self._abort_call = self.factory.hub.clock.callLater(
            self.factory.hub.config.close_timeout, self._abort)

    def _abort(self) -> None:
        self._abort_call = None
        abort = getattr(self.transport, "abortConnection", None)
        if abort is not None:
            abort()

    def buffered_bytes(self) -> int | None:
        """Output the transport holds and the kernel did not take yet."""
        return buffered_bytes(self.transport)


class RawSocketFactory(Factory):
    """Factory of :class:`RawSocketProtocol`; see :func:`make_rawsocket_factory`."""

    protocol = RawSocketProtocol

    def __init__(self, hub: Any) -> None:
        self.hub = hub
        self.max_frame_size = hub.config.max_frame_size


def make_rawsocket_factory(hub: Any) -> RawSocketFactory:
    """The factory for ``--tcp`` listeners (limits from ``hub.config``)."""
    return RawSocketFactory(hub)

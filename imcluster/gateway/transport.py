"""What every transport adapter of the gateway shares, whatever it speaks.

The connection engine (:mod:`imcluster.gateway.engine`) asks an adapter
(:class:`~imcluster.interfaces.ITransportAdapter`) to close for one of the
:class:`CloseReason` values below; each adapter renders the reason its own
way (a WebSocket close code; on raw TCP, and on any transport without close
codes, the reason's ``error`` frame then a close: :func:`write_farewell`).
PROTOCOL.md fixes both renderings, so they are written here once.

Not every close is the engine's: a socket over ``max_connections``
(refused by the hub's ``socket_opened`` before a byte is read) and a
WebSocket opening handshake over ``max_handshake_size`` (HTTP 431) or not
complete within ``handshake_timeout`` end before there is an engine to ask,
so they are no :class:`CloseReason`: the hub or the adapter counts them in
``imcluster_closes_total`` as ``max_connections``, ``handshake_too_large``
and ``handshake_timeout``, as ``ClientConnection.open`` counts a connection
the hub refused as ``refused``.

The helpers below (:func:`peer_address`, :func:`forwarded_ip`,
:func:`buffered_bytes`) serve every adapter built on a Twisted transport;
an adapter imports them from here, never from another adapter.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import itertools
from typing import Any

from imcluster import metrics
from imcluster import protocol as p


@dataclasses.dataclass(frozen=True)
class CloseReason:
    """Why the engine closes a connection, in the forms a transport can render.

    ``name`` labels ``imcluster_closes_total``; ``code`` is the WebSocket
    close code; ``error`` the code of the ``error`` frame that a transport
    without close codes sends before it closes (None: the client was already
    told why by a frame, e.g. the ``auth_reply`` of a failed auth); ``text``
    the human-readable reason (close reason, ``error`` message).
    """

    name: str
    code: int
    error: str | None
    text: str

    def because(self, text: str) -> "CloseReason":
        """The same reason with another ``text``."""
        return dataclasses.replace(self, text=text)

    @classmethod
    def for_code(cls, code: int, text: str) -> "CloseReason":
        """A close the hub asks for by WebSocket ``code`` (``IClientConnection.close``)."""
        return cls("server", code, p.TCP_CLOSE_ERRORS.get(code), text)

    def farewell(self) -> dict | None:
        """The ``error`` frame that explains this close without a close code, or None."""
        if self.error is None:
            return None
        return p.error_frame(self.error, self.text)


# PROTOCOL.md's closes: the engine picks one, the adapter renders it
TOO_LARGE = CloseReason("too_large", p.CLOSE_TOO_LARGE, p.TOO_LARGE, "frame too large")
SLOW_CONSUMER = CloseReason("slow_consumer", p.CLOSE_SLOW_CONSUMER, p.SLOW_CONSUMER, "slow consumer")
GOING_AWAY = CloseReason("going_away", p.CLOSE_GOING_AWAY, p.GOING_AWAY, "server going away")
AUTH_TIMEOUT = CloseReason("auth_timeout", p.CLOSE_AUTH, p.AUTH_TIMEOUT, "authentication timeout")
IDLE_TIMEOUT = CloseReason("idle_timeout", p.CLOSE_NORMAL, p.IDLE_TIMEOUT, "idle timeout")
TOKEN_EXPIRED = CloseReason("token_expired", p.CLOSE_TOKEN_EXPIRED, p.TOKEN_EXPIRED, "token expired")
# the client already got the frame that says why (the last bad_frame error,
# the auth_reply ok:false): no second error frame
BAD_FRAMES = CloseReason("bad_frames", p.CLOSE_POLICY, None, "too many bad frames")
AUTH_FAILED = CloseReason("auth_failed", p.CLOSE_AUTH, None, "authentication failed")

# an operator's kick or revoke (HTTP-API.md): the engine sends the `error` frame
# (`kicked` / `token_revoked`) on every transport, WebSocket included, then closes
# with 4004; so no second frame here
KICKED = CloseReason("kicked", p.CLOSE_KICKED, None, "kicked by an operator")
TOKEN_REVOKED = CloseReason("token_revoked", p.CLOSE_KICKED, None, "token revoked by an operator")

CLOSE_REASONS = (TOO_LARGE, SLOW_CONSUMER, GOING_AWAY, AUTH_TIMEOUT, IDLE_TIMEOUT, TOKEN_EXPIRED,
                 BAD_FRAMES, AUTH_FAILED, KICKED, TOKEN_REVOKED)


# prometheus children looked up once: labels() is too slow for every frame
_COUNTERS: dict[str, tuple[Any, Any, Any]] = {}


def transport_counters(transport_name: str) -> tuple[Any, Any, Any]:
    """``(bytes in, frames out, bytes out)`` counters of one transport's metrics label."""
    c = _COUNTERS.get(transport_name)
    if c is None:
        c = _COUNTERS[transport_name] = (metrics.BYTES_IN.labels(transport=transport_name),
                                         metrics.FRAMES_OUT.labels(transport=transport_name),
                                         metrics.BYTES_OUT.labels(transport=transport_name))
    return c


def write_farewell(adapter: Any, reason: CloseReason) -> None:
    """Write ``reason``'s ``error`` frame through ``adapter`` (if it has one), counted like any frame.

    For transports without close codes, just before they close. The frame
    goes out even to a slow consumer: it is small and the last one.
    """
    frame = reason.farewell()
    if frame is None:
        return
    data = p.encode_bytes(frame)
    metrics.ERRORS.labels(code=reason.error).inc()
    _, frames_out, bytes_out = transport_counters(adapter.transport_name)
    adapter.write_message(data)
    frames_out.inc()
    bytes_out.inc(len(data))


_unix_ports = itertools.count(1)


def peer_address(transport: Any) -> tuple[str, int]:
    """``(ip, port)`` of the transport's peer (TLS included); UNIX sockets get a made-up port."""
    peer = transport.getPeer()
    host = getattr(peer, "host", None)
    port = getattr(peer, "port", None)
    if host is None or port is None:
        return "unix", next(_unix_ports)
    return str(host), int(port)


def _valid_ip(value: str) -> str | None:
    try:
        return str(ipaddress.ip_address(value.strip().strip("[]")))
    except ValueError:
        return None


def forwarded_ip(headers: dict[str, str]) -> str | None:
    """The client address a trusted proxy reports: X-Real-IP, else the last X-Forwarded-For hop.

    The last hop is the one our proxy added (earlier entries come from the
    client and may be forged). None when neither header holds an address.
    ``headers`` maps lower-case header names to values.
    """
    real = headers.get("x-real-ip")
    if real:
        ip = _valid_ip(real)
        if ip:
            return ip
    forwarded = headers.get("x-forwarded-for")
    if forwarded:
        return _valid_ip(forwarded.split(",")[-1])
    return None


def buffered_bytes(transport: Any) -> int | None:
    """Output a Twisted transport holds (under TLS wrappers too), or None when unknown."""
    t = transport
    for _ in range(4):
        if t is None:
            return None
        if hasattr(t, "_tempDataLen") and hasattr(t, "dataBuffer"):
            return len(t.dataBuffer) - getattr(t, "offset", 0) + t._tempDataLen
        t = getattr(t, "transport", None)
    return None

"""Hostile clients of a gateway, on blocking sockets in threads (issue 13).

Standard library only, so that ``bench/attacks.py`` can drive them against
any gateway (this branch's or an older one's) and the tests against the one
they started. Each attacker is a thread that writes as fast as the gateway
takes its bytes and never reads what the gateway sends back, until it is
stopped or the gateway closes it::

    flood = PingFlood(port, token=token)
    flood.start()
    ...
    flood.stop()
    flood.close_code()          # the WebSocket close code the gateway sent, or None

:func:`rss_kb` reads a process's resident memory; :class:`Bystander` is an
ordinary authenticated client measuring its ``ping`` round trips meanwhile.
"""

from __future__ import annotations

import base64
import json
import os
import select
import socket
import statistics
import struct
import threading
import time

PING_PAYLOAD = b"p" * 125  # the largest control frame payload RFC 6455 allows
HEADER_START = b"GET /ws HTTP/1.1\r\nHost: x\r\nX-Pad: "


def rss_kb(pid: int) -> int:
    """VmRSS of ``pid`` in KiB (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def ws_frame(payload: bytes, opcode: int = 1) -> bytes:
    """One masked client frame (RFC 6455)."""
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 1 << 16:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return header + mask + masked


def ws_text(frame: dict) -> bytes:
    return ws_frame(json.dumps(frame, separators=(",", ":")).encode(), 1)


def ws_connect(port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> tuple[socket.socket, bytes]:
    """A socket past the opening handshake, and whatever followed the 101 response."""
    sock = socket.create_connection((host, port), timeout=timeout)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed during the handshake")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(f"handshake refused: {head[:60]!r}")
    return sock, rest


class FrameReader:
    """Unmasked server frames out of a byte stream: ``feed(data)`` -> [(opcode, payload)]."""

    def __init__(self, data: bytes = b"") -> None:
        self.buffer = bytearray(data)

    def feed(self, data: bytes = b"") -> list[tuple[int, bytes]]:
        buf = self.buffer
        buf += data
        out, pos = [], 0
        while len(buf) - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            n, start = b1 & 0x7F, pos + 2
            if n == 126:
                if len(buf) - pos < 4:
                    break
                n, start = struct.unpack_from("!H", buf, pos + 2)[0], pos + 4
            elif n == 127:
                if len(buf) - pos < 10:
                    break
                n, start = struct.unpack_from("!Q", buf, pos + 2)[0], pos + 10
            if len(buf) < start + n:
                break
            out.append((b0 & 0x0F, bytes(buf[start:start + n])))
            pos = start + n
        del buf[:pos]
        return out


class _Attacker(threading.Thread):
    """Writes ``chunk`` again and again, never reading, until stopped or refused."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self._stopping = threading.Event()
        self.sent = 0
        self.error: str | None = None

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self.join(timeout)

    def _flood(self, sock: socket.socket, chunk: bytes) -> bool:
        """Send ``chunk`` whole (never a partial frame) unless stopped; False once the peer is gone."""
        view, offset = memoryview(chunk), 0
        while offset < len(chunk):
            if self._stopping.is_set() and offset == 0:
                return True
            try:
                _, writable, _ = select.select([], [sock], [], 0.2)
                if writable:
                    offset += sock.send(view[offset:])
            except OSError as e:
                self.error = type(e).__name__
                return False
        self.sent += len(chunk)
        return True


class PingFlood(_Attacker):
    """A WebSocket client sending 125-byte pings as fast as it can and never reading.

    ``token``: authenticate first (the ``auth`` frame is sent, its reply never
    read). After :meth:`stop`, :meth:`close_code` reads what the gateway
    sent and returns the code of its close frame (None: it never closed).
    """

    def __init__(self, port: int, token: str | None = None, batch: int = 512) -> None:
        super().__init__()
        self.port = port
        self.token = token
        self.chunk = ws_frame(PING_PAYLOAD, 9) * batch
        self.sock: socket.socket | None = None
        self._rest = b""
        self.ended_at: float | None = None

    def run(self) -> None:
        try:
            self.sock, self._rest = ws_connect(self.port)
            self.sock.setblocking(False)
            if self.token:
                self._flood(self.sock, ws_text({"type": "auth", "token": self.token}))
            while not self._stopping.is_set() and self._flood(self.sock, self.chunk):
                pass
        except OSError as e:
            self.error = type(e).__name__
        self.ended_at = time.monotonic()

    def close_code(self, timeout: float = 10.0) -> int | None:
        """Read everything the gateway sent; the code of its close frame, or None."""
        if self.sock is None:
            return None
        reader = FrameReader(self._rest)
        deadline = time.monotonic() + timeout
        self.sock.setblocking(True)
        try:
            while time.monotonic() < deadline:
                for opcode, payload in reader.feed():
                    if opcode == 8:
                        return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                self.sock.settimeout(max(0.01, deadline - time.monotonic()))
                data = self.sock.recv(1 << 20)
                if not data:
                    return None
                reader.buffer += data
        except OSError:
            return None
        finally:
            self.sock.close()
        return None


class HeaderFlood(_Attacker):
    """Opens a WebSocket handshake whose last header never ends, again and again.

    Each connection sends ``GET /ws HTTP/1.1``, ``Host``, then ``X-Pad: ``
    and endless bytes until the gateway answers or closes; then the next
    connection starts. ``connections`` records, for each one, the seconds it
    lasted, the bytes sent and what ended it (``'431'``, ``'closed'``, or
    ``'stopped'`` when still open at the end).
    """

    def __init__(self, port: int, chunk: int = 8192, rate: float | None = None) -> None:
        super().__init__()
        self.port = port
        self.chunk = b"a" * chunk
        self.rate = rate  # bytes a second per connection (None: as fast as the gateway takes them)
        self.connections: list[tuple[float, int, str]] = []

    def run(self) -> None:
        while not self._stopping.is_set():
            try:
                sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            except OSError as e:
                self.error = type(e).__name__
                time.sleep(0.05)
                continue
            started, sent, outcome = time.monotonic(), 0, "stopped"
            sock.setblocking(False)
            before = self.sent
            alive = self._flood(sock, HEADER_START)
            while alive and not self._stopping.is_set():
                readable, _, _ = select.select([sock], [], [], 0)
                if readable:
                    alive = False
                    break
                alive = self._flood(sock, self.chunk)
                if self.rate:
                    ahead = (self.sent - before) / self.rate - (time.monotonic() - started)
                    if ahead > 0:
                        self._stopping.wait(ahead)
            if not alive:
                outcome = "closed"
                try:
                    if sock.recv(64).startswith(b"HTTP/1.1 431"):
                        outcome = "431"
                except OSError:
                    pass
            sent = self.sent - before
            self.connections.append((time.monotonic() - started, sent, outcome))
            sock.close()


class Bystander(threading.Thread):
    """An ordinary authenticated WebSocket client measuring ``ping`` -> ``pong`` round trips (seconds)."""

    def __init__(self, port: int, token: str, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.token = token
        self.interval = interval
        self.samples: list[tuple[float, float]] = []  # (monotonic time sent, round trip)
        self.error: str | None = None
        self.ready = threading.Event()
        self._stopping = threading.Event()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self.join(timeout)

    def run(self) -> None:
        try:
            sock, rest = ws_connect(self.port)
            sock.settimeout(30)
            reader = FrameReader(rest)
            sock.sendall(ws_text({"type": "auth", "token": self.token}))
            self._wait(sock, reader, "auth_reply")
            self.ready.set()
            while not self._stopping.is_set():
                sent = time.monotonic()
                sock.sendall(ws_text({"type": "ping"}))
                self._wait(sock, reader, "pong")
                self.samples.append((sent, time.monotonic() - sent))
                self._stopping.wait(self.interval)
            sock.close()
        except OSError as e:
            self.error = type(e).__name__
        finally:
            self.ready.set()

    def _wait(self, sock: socket.socket, reader: FrameReader, frame_type: str) -> dict:
        while True:
            for opcode, payload in reader.feed():
                if opcode == 1:
                    frame = json.loads(payload)
                    if frame.get("type") == frame_type:
                        return frame
            data = sock.recv(65536)
            if not data:
                raise ConnectionResetError("the gateway closed the bystander")
            reader.buffer += data

    def round_trips(self, since: float = 0.0, until: float = float("inf")) -> list[float]:
        return [rtt for t, rtt in self.samples if since <= t < until]


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50 and p99 of ``values`` in milliseconds (None when empty)."""
    if not values:
        return {"p50": None, "p99": None, "n": 0}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return {"p50": round(statistics.median(ordered) * 1000, 2), "p99": round(p99 * 1000, 2),
            "n": len(ordered)}

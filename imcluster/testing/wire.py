"""Client-side wire helpers for driving a real gateway protocol: frames, readers, harnesses."""

from __future__ import annotations

from twisted.internet import address
from twisted.internet import error
from twisted.internet.testing import StringTransport as _CcStringTransport
from twisted.python.failure import Failure

from imcluster.testing.gateway import FakeHub, gateway_config



def _payload(frame):
    import json
    if isinstance(frame, bytes):
        return frame
    if isinstance(frame, str):
        return frame.encode("utf-8")
    return json.dumps(frame, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def tcp_encode(frame):
    """One raw-TCP frame: 4-byte big-endian length, then the JSON (dict, str or bytes)."""
    data = _payload(frame)
    return len(data).to_bytes(4, "big") + data


class TcpFrameReader:
    """Splits what a raw-TCP server wrote into decoded JSON frames."""

    def __init__(self):
        self.buffer = b""

    def feed(self, data):
        import json
        self.buffer += data
        frames = []
        while len(self.buffer) >= 4:
            length = int.from_bytes(self.buffer[:4], "big")
            if len(self.buffer) < 4 + length:
                break
            frames.append(json.loads(self.buffer[4:4 + length].decode("utf-8")))
            self.buffer = self.buffer[4 + length:]
        return frames


WS_KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def ws_handshake(path="/ws", host="localhost:8080", headers=None):
    """The opening handshake request of a WebSocket client (bytes)."""
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Key: {WS_KEY}", "Sec-WebSocket-Version: 13"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def ws_frame(payload, opcode=1, fin=True, mask=b"\x01\x02\x03\x04"):
    """One masked client frame (opcode 1 text, 2 binary, 8 close, 9 ping, 10 pong)."""
    if opcode == 1 and not isinstance(payload, bytes):
        payload = _payload(payload)
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + n.to_bytes(8, "big")
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


def ws_close_frame(code=1000, reason=b""):
    """A client close frame."""
    return ws_frame(code.to_bytes(2, "big") + reason, opcode=8)


class WsFrameReader:
    """Parses what a WebSocket server wrote: the HTTP response, then unmasked frames.

    ``feed`` returns ``(opcode, payload)`` pairs; ``status`` is the HTTP
    status of the handshake response once it arrived.
    """

    def __init__(self):
        self.buffer = b""
        self.status = None
        self.response = None

    def feed(self, data):
        self.buffer += data
        out = []
        if self.status is None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return out
            self.response = self.buffer[:end].decode("latin-1")
            self.status = int(self.response.split(" ", 2)[1])
            self.buffer = self.buffer[end + 4:]
            if self.status != 101:
                return out
        while len(self.buffer) >= 2:
            b0, b1 = self.buffer[0], self.buffer[1]
            n, pos = b1 & 0x7F, 2
            if n == 126:
                if len(self.buffer) < 4:
                    break
                n, pos = int.from_bytes(self.buffer[2:4], "big"), 4
            elif n == 127:
                if len(self.buffer) < 10:
                    break
                n, pos = int.from_bytes(self.buffer[2:10], "big"), 10
            if len(self.buffer) < pos + n:
                break
            out.append((b0 & 0x0F, self.buffer[pos:pos + n]))
            self.buffer = self.buffer[pos + n:]
        return out


class LenientStringTransport(_CcStringTransport):
    """A StringTransport whose unregisterProducer, like a real transport's, tolerates no producer."""

    def unregisterProducer(self):
        self.producer = None
        self.streaming = None


class ClientHarness:
    """Drives a gateway adapter (``'ws'`` or ``'tcp'``) over a StringTransport, as a client.

    ``send(frame)`` writes one frame (dict, str or bytes payload);
    ``frames()`` returns the JSON frames the server wrote since the last call;
    ``closed`` tells whether the server closed, ``close_code`` the WebSocket
    close code it sent. ``finish()`` completes a server-initiated close
    (answering the close handshake, then delivering connectionLost);
    ``drop()`` simulates the client vanishing.
    """

    def __init__(self, hub, kind, factory=None, ip="10.1.2.3", port=40001, path="/ws", headers=None,
                 host="localhost:8080", handshake=True):
        self.kind = kind
        if factory is None:
            if kind == "ws":
                from imcluster.gateway.websocket import make_websocket_factory
                factory = make_websocket_factory(hub)
            else:
                from imcluster.gateway.rawsocket import make_rawsocket_factory
                factory = make_rawsocket_factory(hub)
        self.factory = factory
        self.hub = hub
        addr = address.IPv4Address("TCP", ip, port)
        self.proto = factory.buildProtocol(addr)
        self.transport = LenientStringTransport(peerAddress=addr)
        self.reader = WsFrameReader() if kind == "ws" else TcpFrameReader()
        self.close_code = None
        self.close_reason = None
        self.controls = []
        self.lost = False
        self._pending = []
        self.proto.makeConnection(self.transport)
        if kind == "ws" and handshake:
            self.proto.dataReceived(ws_handshake(path=path, host=host, headers=headers))
        self._read()

    @property
    def status(self):
        """HTTP status of the WebSocket handshake response (None for TCP)."""
        return self.reader.status if self.kind == "ws" else None

    @property
    def conn(self):
        return self.proto.conn

    def _read(self):
        import json
        data = self.transport.value()
        self.transport.clear()
        if self.kind == "tcp":
            self._pending.extend(self.reader.feed(data))
            return
        for opcode, payload in self.reader.feed(data):
            if opcode == 1:
                self._pending.append(json.loads(payload.decode("utf-8")))
            elif opcode == 8:
                self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self.close_reason = payload[2:].decode("utf-8", "replace")
            else:
                self.controls.append((opcode, payload))

    def send_raw(self, data):
        """Bytes as they are (a partial frame, garbage...)."""
        if not self.lost:
            self.proto.dataReceived(data)
        self._read()

    def send(self, frame):
        """One frame: a dict (JSON), str or bytes payload."""
        if self.kind == "ws":
            self.send_raw(ws_frame(_payload(frame)))
        else:
            self.send_raw(tcp_encode(frame))

    def send_binary(self, payload=b"\x00\x01"):
        self.send_raw(ws_frame(payload, opcode=2))

    def frames(self):
        self._read()
        out, self._pending = self._pending, []
        return out

    @property
    def closed(self):
        """True once the server closed (close frame sent, or the TCP connection closing)."""
        self._read()
        return self.close_code is not None or self.transport.disconnecting or self.lost

    def finish(self):
        """Complete a close: answer the close handshake, then connectionLost."""
        self._read()
        if self.lost:
            return
        if self.kind == "ws" and self.close_code is not None and not self.transport.disconnecting:
            self.proto.dataReceived(ws_close_frame(self.close_code))
            self._read()
        self.lost = True
        self.proto.connectionLost(Failure(error.ConnectionDone()))

    def drop(self):
        """The client vanishes (connection lost without a close)."""
        if not self.lost:
            self.lost = True
            self.proto.connectionLost(Failure(error.ConnectionLost()))


def self_signed_cert(directory, hostname="localhost"):
    """Write a self-signed certificate for ``hostname`` (and 127.0.0.1) into ``directory``.

    Returns ``(cert_path, key_path, cert_pem)``; for ``ssl:`` server endpoint
    strings (``ssl:0:privateKey=<key>:certKey=<cert>``) and for clients that
    trust exactly this certificate.
    """
    import datetime
    import ipaddress
    import os

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName(hostname), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    cert_path = os.path.join(str(directory), "cert.pem")
    key_path = os.path.join(str(directory), "key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert_pem)
    with open(key_path, "wb") as f:
        f.write(key_pem)
    return cert_path, key_path, cert_pem


class LoopbackGateway:
    """A :class:`FakeHub` behind real listening adapters on the running reactor.

    For loopback tests of the WebSocket and raw TCP adapters with real
    clients: ``await listen('ws'|'tcp', endpoint)`` returns the port;
    ``await stop()`` closes the listeners, aborts server-side connections
    still open and waits until the hub heard of every one's end.
    """

    def __init__(self, reactor=None, **config):
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        config.setdefault("ws_ping_interval", 0)
        self.hub = FakeHub(config=gateway_config(**config), clock=reactor)
        self.ports = []
        self.factories = []

    async def listen(self, kind, endpoint="tcp:0:interface=127.0.0.1"):
        from twisted.internet.endpoints import serverFromString
        if kind == "ws":
            from imcluster.gateway.websocket import make_websocket_factory
            factory = make_websocket_factory(self.hub)
        elif kind == "stream":
            from imcluster.gateway.stream import make_stream_factory
            factory = make_stream_factory(self.hub)
        else:
            from imcluster.gateway.rawsocket import make_rawsocket_factory
            factory = make_rawsocket_factory(self.hub)
        self.factories.append(factory)
        port = await serverFromString(self.reactor, endpoint).listen(factory)
        self.ports.append(port)
        return port.getHost().port

    def open_connections(self):
        return [c for c in self.hub.made if c not in self.hub.lost]

    async def stop(self, timeout=5.0):
        from twisted.internet import task
        for port in self.ports:
            await port.stopListening()
        self.ports = []
        for conn in self.open_connections():
            adapter = conn._adapter
            if adapter.transport_name == "stream":
                adapter._end()  # a streaming connection has no socket of its own
            else:
                adapter.transport.abortConnection()
        deadline = self.reactor.seconds() + timeout
        while self.open_connections():
            if self.reactor.seconds() > deadline:
                raise AssertionError(f"connections never ended: {self.open_connections()}")
            await task.deferLater(self.reactor, 0.01, lambda: None)

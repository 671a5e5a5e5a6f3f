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

    ``ClientHarness(hub, "stream")`` is a :class:`StreamHarness` (the HTTP
    streaming transport) with the same surface.

    ``send(frame)`` writes one frame (dict, str or bytes payload);
    ``frames()`` returns the JSON frames the server wrote since the last call;
    ``closed`` tells whether the server closed, ``close_code`` the WebSocket
    close code it sent. ``finish()`` completes a server-initiated close
    (answering the close handshake, then delivering connectionLost);
    ``drop()`` simulates the client vanishing.
    """

    def __new__(cls, hub, kind, *args, **kwargs):
        if kind == "stream":
            return StreamHarness(hub, kind, *args, **kwargs)
        return super().__new__(cls)

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


def _http_response(data):
    """``(status, headers, body, rest)`` of the first complete HTTP/1.1 response in ``data``, or None.

    Content-Length and chunked bodies; a chunked body not yet terminated is
    returned as ``body`` so far with ``rest`` None (an open event stream).
    """
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = data[:end].decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    pos = end + 4
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            eol = data.find(b"\r\n", pos)
            if eol < 0:
                return status, headers, body, None
            size = int(data[pos:eol].split(b";")[0], 16)
            if size == 0:
                return status, headers, body, data[eol + 4:]
            if len(data) < eol + 2 + size + 2:
                return status, headers, body, None
            body += data[eol + 2:eol + 2 + size]
            pos = eol + 2 + size + 2
    length = int(headers.get("content-length", "0"))
    if len(data) < pos + length:
        return None
    return status, headers, data[pos:pos + length], data[pos + length:]


def sse_events(text):
    """The complete events of an event stream: ``[(id or None, data)]`` and the unparsed rest."""
    events = []
    while True:
        end = text.find(b"\n\n")
        if end < 0:
            return events, text
        block, text = text[:end], text[end + 2:]
        event_id, data = None, []
        for line in block.split(b"\n"):
            if line.startswith(b":"):
                continue
            name, _, value = line.partition(b":")
            value = value[1:] if value.startswith(b" ") else value
            if name == b"id":
                event_id = int(value)
            elif name == b"data":
                data.append(value)
        if data:
            events.append((event_id, b"\n".join(data)))


class StreamHarness:
    """Drives the HTTP streaming adapter (``'stream'``) over StringTransports, as an SSE client.

    The same surface as :class:`ClientHarness`: the first frame sent is the
    body of ``POST /stream`` (from ``ip``:``port``); once it is answered
    with a stream id, an event stream is opened and later frames are posted
    to ``/stream/<id>`` in order (those sent before the id is known wait).
    ``frames()`` returns the frames received (the ``auth_reply`` without its
    ``stream`` field, then the events); ``closed`` is True once the POST was
    refused or the connection is closing; ``drop()`` is the client vanishing
    for good (its event stream lost, then ``stream_resume`` seconds).
    """

    kind = "stream"
    close_code = None
    close_reason = None

    def __init__(self, hub, kind="stream", factory=None, ip="10.1.2.3", port=40001, **_ignored):
        if factory is None:
            from imcluster.gateway.stream import make_stream_factory
            factory = make_stream_factory(hub)
        self.factory = factory
        self.hub = hub
        self.ip = ip
        self.port = port
        self._ports = iter(range(port + 1, port + 100000))
        self.stream_id = None
        self.adapter = None
        self.status = None  # the HTTP status of POST /stream
        self.statuses = []  # of every later POST
        self.refused = False
        self.lost = False
        self.controls = []
        self._pending = []
        self._queue = []
        self._opening = None  # (channel, transport) of POST /stream until answered
        self._events = None  # (channel, transport) of the open event stream
        self._seen = 0  # bytes of the event stream's body parsed
        self._sse_text = b""
        self.last_id = 0
        self._conn = None
        self.opening_transport = None

    # --- HTTP over StringTransports

    def _connect(self, port):
        addr = address.IPv4Address("TCP", self.ip, port)
        channel = self.factory.buildProtocol(addr)
        transport = LenientStringTransport(peerAddress=addr)
        channel.makeConnection(transport)
        return channel, transport

    def _send_request(self, channel, method, path, body=None, headers=None):
        lines = [f"{method} {path} HTTP/1.1", "Host: gateway"]
        for name, value in (headers or {}).items():
            lines.append(f"{name}: {value}")
        if body is not None:
            lines.append(f"Content-Length: {len(body)}")
        channel.dataReceived(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b""))

    def _close_channel(self, channel):
        channel.connectionLost(Failure(error.ConnectionDone()))

    def request(self, method, path, body=None, headers=None):
        """One request on a socket of its own; ``(status, headers, body)`` or None while unanswered."""
        channel, transport = self._connect(next(self._ports))
        self._send_request(channel, method, path, body, headers)
        answer = _http_response(transport.value())
        if answer is None or answer[3] is None:
            self._close_channel(channel)
            return None
        self._close_channel(channel)
        return answer[:3]

    # --- the client

    @property
    def conn(self):
        """The engine of the connection (kept after it ended, as the other harnesses keep theirs)."""
        return self._conn

    @property
    def proto(self):
        return self.adapter

    @property
    def transport(self):
        """The socket of the open event stream (before it: of the POST /stream)."""
        if self._events is not None:
            return self._events[1]
        return self.opening_transport

    def send(self, frame):
        """One frame: a dict (JSON), str or bytes payload."""
        data = _payload(frame)
        if self.lost or self.refused:
            return
        if self.stream_id is None:
            if self._opening is None and not self._queue:
                self._opening = self._connect(self.port)
                self.opening_transport = self._opening[1]
                self._send_request(self._opening[0], "POST", "/stream", data)
                self._read()
            else:
                self._queue.append(data)
            return
        self._post(data)

    def send_raw(self, data):
        self.send(data)

    def _post(self, data):
        answer = self.request("POST", f"/stream/{self.stream_id}", data)
        self.statuses.append(answer[0] if answer else None)
        self._read()

    def _read(self):
        import json
        if self._opening is not None:
            channel, transport = self._opening
            answer = _http_response(transport.value())
            if answer is not None and answer[3] is not None:
                self._opening = None
                self._close_channel(channel)
                self.status, _, body, _ = answer
                frame = json.loads(body)
                stream_id = frame.pop("stream", None)
                self._pending.append(frame)
                if self.status != 200 or stream_id is None:
                    self.refused = True
                    return
                self.stream_id = stream_id
                self.adapter = self.factory.stream.connections[stream_id]
                self._conn = self.adapter.conn
                self._open_events()
                queued, self._queue = self._queue, []
                for data in queued:
                    self._post(data)
        if self._events is not None:
            channel, transport = self._events
            answer = _http_response(transport.value())
            if answer is None:
                return
            status, _, body, rest = answer
            if status != 200:
                self._events = None
                self._close_channel(channel)
                return
            self._sse_text += body[self._seen:]
            self._seen = len(body)
            events, self._sse_text = sse_events(self._sse_text)
            for event_id, data in events:
                if event_id is not None:
                    self.last_id = event_id
                self._pending.append(json.loads(data))
            if rest is not None:  # the server ended the stream
                self._events = None
                self._close_channel(channel)

    def _open_events(self):
        """Open an event stream from ``last_id`` (the previous one's socket, if any, is closed)."""
        if self._events is not None:
            self._read()
            if self._events is not None:
                channel, _ = self._events
                self._events = None
                channel.connectionLost(Failure(error.ConnectionLost()))
        self._seen = 0
        self._sse_text = b""
        self._events = self._connect(next(self._ports))
        self._send_request(self._events[0], "GET", f"/stream/{self.stream_id}",
                           headers={"Accept": "text/event-stream", "Last-Event-ID": str(self.last_id)})

    def frames(self):
        self._read()
        out, self._pending = self._pending, []
        return out

    @property
    def closed(self):
        """True once the POST /stream was refused, or the server is closing the connection."""
        from imcluster.gateway.stream import OPEN
        self._read()
        return self.refused or self.lost or (self.adapter is not None and self.adapter.state != OPEN)

    def finish(self):
        """The client's side of a close: it has read the last event; its sockets are closed."""
        self._read()
        self.lost = True
        if self._events is not None:
            channel, _ = self._events
            self._events = None
            self._close_channel(channel)

    def drop(self):
        """The client vanishes: its event stream is lost and it never comes back."""
        if self.lost:
            return
        self.lost = True
        if self._opening is not None:
            channel, _ = self._opening
            self._opening = None
            self._close_channel(channel)
        if self._events is not None:
            channel, _ = self._events
            self._events = None
            channel.connectionLost(Failure(error.ConnectionLost()))
        from imcluster.gateway.stream import CLOSED
        config = self.hub.config
        for _ in range(5):
            if self.adapter is None or self.adapter.state == CLOSED:
                break
            # stream_resume; or close_timeout, when another timer closed it meanwhile
            self.hub.clock.advance(max(config.stream_resume, config.close_timeout))

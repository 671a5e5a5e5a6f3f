"""HTTP streaming clients (web/H5 without WebSocket): Server-Sent Events and long polling.

PROTOCOL.md "HTTP streaming transport" fixes the wire, on the gateway's
``--stream`` endpoints (default ``tcp:8082``)::

    POST /stream              body: the auth frame   -> 200 auth_reply + "stream": <id>
    GET  /stream/<id>         Accept: text/event-stream, Last-Event-ID: n -> SSE, frames after n
    GET  /stream/<id>?after=n                        -> JSON [{"id","frame"}...] (long polling)
    POST /stream/<id>         body: a frame or a JSON array of frames     -> 204 (404, 413)

A streaming connection is a connection like any other: one
:class:`StreamConnection` (the :class:`~imcluster.interfaces.ITransportAdapter`)
per stream id feeds one :class:`~imcluster.gateway.engine.ClientConnection`,
and outlives the HTTP requests that carry it. It is born by a successful
``POST /stream`` (a failed auth leaves nothing behind, and gives no id) and
ends like a closed socket: when the engine closes it (the reason's ``error``
frame is the last event, then the id answers 404), or when no event stream
or poll was open for ``stream_resume`` seconds.

Every frame the engine writes gets the next event id and waits in the
connection's resume buffer: frames not yet written to any stream count as the
connection's pending output (``buffered_bytes``: the engine's slow-consumer
rule and ``output_buffer_max`` apply to a client that stops fetching exactly
as to one that stops reading its socket), and frames already written to an
event stream are kept, up to ``stream_resume_bytes``, until the client shows
it has them (a later ``Last-Event-ID``, or ``?after=n``). A resume from
before what is kept cannot be honoured without a gap: the connection is
closed (``error`` ``resume_lost``; ``imcluster_closes_total{reason=
"resume_lost"}``) and the client reconnects and gets the rest by sync.

While no stream is open, the engine is paused (what it writes is pending
output); while an event stream is open, the engine is the push producer of
that stream's HTTP channel, so a client that stops reading its event stream
is measured by what its socket holds, as on WebSocket.

The stream id is 192 random bits (``secrets.token_urlsafe``), never the
token; nothing here logs it, nor any URL, nor any body.

A streaming connection is named (``connId``, its ``UCIR`` field) by the
client's address and a number of its own above 65535 (:data:`FIRST_PORT`),
never by the port of an HTTP socket: the sockets that carry it come and go,
and the client (or, behind a NAT, anyone sharing its address) reuses their
ports at once for other sockets, which the hub would then have to refuse as
duplicates of a connection that may live for hours. The HTTP listener is
a :class:`~imcluster.web.GuardedSite` (header and body deadlines, bodies
bounded by ``max_frame_size``: 413 above it, ``max_connections`` sockets).
Answers carry CORS headers for the origins in ``allowed_origins``; a request
from another origin is answered 403.
"""

from __future__ import annotations

import itertools
import json
import secrets
from collections import deque
from typing import Any

from twisted.internet import task
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource, server
from zope.interface import implementer

from imcluster import metrics
from imcluster import protocol as p
from imcluster.gateway.engine import ClientConnection
from imcluster.gateway.transport import CloseReason, buffered_bytes, forwarded_ip, peer_address, write_farewell
from imcluster.interfaces import ITransportAdapter
from imcluster.web import GuardedRequest, GuardedSite, error_json, json_bytes

#: the close of a connection whose client resumed from before what the gateway still holds
RESUME_LOST = CloseReason("resume_lost", p.CLOSE_POLICY, "resume_lost",
                          "the frames after that event id are gone; reconnect")

# connection states
OPENING, OPEN, CLOSING, CLOSED = range(4)

#: the first "port" of a streaming connection's (ip, port) name: above every TCP port
FIRST_PORT = 65536
# one sequence for the process: unique whatever the number of sites and hubs
_numbers = itertools.count(FIRST_PORT)

_SSE_HEADERS = {
    b"content-type": b"text/event-stream; charset=utf-8",
    b"cache-control": b"no-store",
    # nginx and others buffer responses unless told not to
    b"x-accel-buffering": b"no",
}
#: the first bytes of an event stream: EventSource's reconnect delay, in ms
_SSE_PREAMBLE = b"retry: 1000\n\n"
_KEEPALIVE = b":\n\n"


class _StreamProducer:
    """The push producer registered on an open event stream's channel: relays to the engine.

    Remembers whether the channel paused it, so that opening a stream on a
    client that does not read resumes nothing.
    """

    __slots__ = ("adapter", "paused")

    def __init__(self, adapter: "StreamConnection") -> None:
        self.adapter = adapter
        self.paused = False

    def pauseProducing(self) -> None:  # noqa: N802 (Twisted API)
        self.paused = True
        conn = self.adapter.conn
        if conn is not None:
            conn.pauseProducing()

    def resumeProducing(self) -> None:  # noqa: N802
        self.paused = False
        conn = self.adapter.conn
        if conn is not None:
            conn.resumeProducing()

    def stopProducing(self) -> None:  # noqa: N802
        pass


@implementer(ITransportAdapter)
class StreamConnection:
    """One streaming connection: the adapter behind one stream id (see the module docstring).

    ``pending`` holds ``(event id, frame bytes)`` not yet written to a
    stream, ``sent`` those written to a stream and not yet acknowledged.
    At most one stream (an event stream or a poll) is open at a time: a new
    one ends the previous one.
    """

    transport_name = "stream"
    log = Logger()

    def __init__(self, site: "StreamResource", stream_id: str, client_address: tuple[str, int]) -> None:
        self.site = site
        self.stream_id = stream_id
        self.client_address = client_address
        self.conn: ClientConnection | None = None
        self.state = OPENING
        self.pending: deque[tuple[int, bytes]] = deque()
        self.pending_bytes = 0
        self.sent: deque[tuple[int, bytes]] = deque()
        self.sent_bytes = 0
        self.last_id = 0  # the id of the latest frame written by the engine
        self._opening: Any = None  # the POST /stream request, until it is answered
        self._sse: Any = None  # the open event stream's request
        self._producer: _StreamProducer | None = None
        self._poll: Any = None  # the open poll's request
        self._poll_call: Any = None  # the poll's timeout, or its answer scheduled this turn
        self._poll_due = False  # the answer is scheduled
        self._idle_call: Any = None  # stream_resume (or close_timeout while closing) without a stream
        self._slot = False  # holds one of the hub's max_connections slots
        self._farewell_allowed = False  # close_for is writing the last frame
        self._in_open = False  # the engine is handling the POST /stream body

    def __repr__(self) -> str:
        # never the stream id: it is a capability
        return f"<StreamConnection {self.client_address[0]}##{self.client_address[1]}>"

    # --- what the engine asks of its adapter (ITransportAdapter)

    def write_message(self, data: bytes) -> None:
        """Queue one frame with the next event id; write it to the open stream, if any."""
        state = self.state
        if state == OPENING:
            self._answer_opening(data)
            return
        if state != OPEN and not self._farewell_allowed:
            return
        self.last_id += 1
        item = (self.last_id, data)
        if self._sse is not None:
            self._write_event(item)
        else:
            self.pending.append(item)
            self.pending_bytes += len(data)
            if self._poll is not None and not self._poll_due:
                # answered at the end of this reactor turn: a burst goes in one answer
                self._poll_due = True
                self._cancel_poll_call()
                self._poll_call = self.site.clock.callLater(0, self._answer_poll)

    def buffered_bytes(self) -> int | None:
        """Frames not yet taken by the client: held for the next stream, and in the event stream's socket.

        None while an event stream is open on a transport that cannot tell
        (the engine counts what it wrote since the pause instead).
        """
        if self._sse is not None:
            in_socket = buffered_bytes(self._sse.channel.transport)
            return None if in_socket is None else self.pending_bytes + in_socket
        return self.pending_bytes

    def close_for(self, reason: CloseReason) -> None:
        """The reason's ``error`` frame as the last event; then the stream ends and the id answers 404."""
        if self.state == OPENING:
            frame = reason.farewell()
            self._refuse_opening(503, p.encode_bytes(frame) if frame else json_bytes(
                error_json(p.UNAVAILABLE, reason.text)))
            return
        if self.state != OPEN:
            return
        self.state = CLOSING
        self._farewell_allowed = True
        try:
            write_farewell(self, reason)
        finally:
            self._farewell_allowed = False
        if self._sse is not None or not self.pending:
            self._end()
        elif self._poll is not None:
            self._answer_poll()
        else:
            # the client has close_timeout to fetch its last frames
            self._arm_idle(self.site.close_timeout)

    # --- opening (POST /stream)

    def open(self, request: Any, body: bytes) -> None:
        """Create the engine and feed it the ``auth`` frame; the first frame it writes answers ``request``."""
        self._opening = request
        conn = ClientConnection(self.site.hub, self)
        if not conn.open():
            self._opening = None
            self.state = CLOSED
            self.site.release(self)
            _answer(request, 503, p.encode_bytes(p.error_frame(
                p.UNAVAILABLE, "the server takes no new connections; try again later")))
            return
        self.conn = conn
        conn.pauseProducing()  # no stream yet
        self._arm_idle(self.site.resume)
        request.notifyFinish().addErrback(lambda _: None)
        self._in_open = True
        try:
            conn.frame_received(body)
        finally:
            self._in_open = False
        if self.state == CLOSED:
            # refused while the engine handled the body: it has finished its turn now
            self._lost()

    def _answer_opening(self, data: bytes) -> None:
        request, self._opening = self._opening, None
        try:
            frame = json.loads(data)
        except ValueError:
            frame = {}
        if frame.get("type") == "auth_reply" and frame.get("ok") is True:
            self.state = OPEN
            frame["stream"] = self.stream_id
            self.site.opened(self)
            if request is not None:
                _answer(request, 200, p.encode_bytes(frame))
            return
        if frame.get("type") == "auth_reply":
            code = (frame.get("error") or {}).get("code")
            status = 503 if code == p.UNAVAILABLE else 401
        else:
            status = 400  # not an auth frame: bad_frame, not_authenticated
        self._opening = request
        self._refuse_opening(status, data)

    def _refuse_opening(self, status: int, data: bytes) -> None:
        """Answer the ``POST /stream`` with ``data`` and end the connection: a failed auth leaves no id."""
        request, self._opening = self._opening, None
        self.state = CLOSED
        self._disarm_idle()
        if request is not None:
            _answer(request, status, data)
        if not self._in_open:
            # (inside open(), the engine is still handling the auth frame: open() ends it after)
            self._lost()

    # --- streams (GET /stream/<id>)

    def acknowledge(self, after: int) -> bool:
        """The client has every frame up to ``after``: forget them. False: it missed some that are gone."""
        if after > self.last_id:
            after = self.last_id
        sent = self.sent
        while sent and sent[0][0] <= after:
            self.sent_bytes -= len(sent.popleft()[1])
        pending = self.pending
        while pending and pending[0][0] <= after:
            self.pending_bytes -= len(pending.popleft()[1])
        first = sent[0][0] if sent else (pending[0][0] if pending else self.last_id + 1)
        if first > after + 1:
            return False
        # what was sent after that id is sent again
        if sent:
            self.pending.extendleft(reversed(sent))
            self.pending_bytes += self.sent_bytes
            sent.clear()
            self.sent_bytes = 0
        return True

    def open_events(self, request: Any, after: int) -> Any:
        """``GET /stream/<id>``: an event stream of every frame after ``after``."""
        if not self._start_stream(after):
            return _gone(request)
        self._sse = request
        for name, value in _SSE_HEADERS.items():
            request.setHeader(name, value)
        request.setResponseCode(200)
        request.write(_SSE_PREAMBLE)
        self._producer = producer = _StreamProducer(self)
        request.registerProducer(producer, True)
        request.notifyFinish().addBoth(self._events_ended, request)
        self.site.stream_opened(self)
        pending = self.pending
        while pending and self._sse is request:
            item = pending.popleft()
            self.pending_bytes -= len(item[1])
            # (what is left, should this stream fail while writing, waits for the next one)
            self._write_event(item)
        if self.state == CLOSING:
            self._end()
        elif self._sse is request and not producer.paused and self.conn is not None:
            self.conn.resumeProducing()
        return server.NOT_DONE_YET

    def open_poll(self, request: Any, after: int) -> Any:
        """``GET /stream/<id>?after=n``: the frames after ``n`` now, or as soon as there is one."""
        if not self._start_stream(after):
            return _gone(request)
        self._poll = request
        request.notifyFinish().addErrback(self._poll_dropped, request)
        if self.pending:
            self._answer_poll()
        else:
            self._poll_call = self.site.clock.callLater(self.site.poll_timeout, self._answer_poll)
        return server.NOT_DONE_YET

    def _start_stream(self, after: int) -> bool:
        self._end_stream()
        if self.conn is not None:
            self.conn.activity()
        if not self.acknowledge(after):
            if self.state != OPEN:
                return False
            self.log.info("closing {conn}: it resumed after event {after}, and later frames are gone",
                          conn=self.conn.conn_id if self.conn else "?", after=after)
            # nothing of the rest can be trusted: the client gets the farewell alone and syncs anew
            self.pending.clear()
            self.sent.clear()
            self.pending_bytes = self.sent_bytes = 0
            metrics.CLOSES.labels(reason=RESUME_LOST.name).inc()
            self.close_for(RESUME_LOST)  # the stream being opened takes the farewell, then ends
        self._disarm_idle()
        return True

    def _write_event(self, item: tuple[int, bytes]) -> None:
        event_id, data = item
        self._sse.write(b"id: %d\ndata: %s\n\n" % (event_id, data))
        self.sent.append(item)
        self.sent_bytes += len(data)
        limit = self.site.resume_bytes
        sent = self.sent
        while self.sent_bytes > limit and len(sent) > 1:
            self.sent_bytes -= len(sent.popleft()[1])

    def keepalive(self) -> None:
        """A comment line on the open event stream (PROTOCOL.md: at least every 15 s)."""
        if self._sse is not None:
            self._sse.write(_KEEPALIVE)

    def _cancel_poll_call(self) -> None:
        if self._poll_call is not None:
            call, self._poll_call = self._poll_call, None
            if call.active():
                call.cancel()

    def _answer_poll(self) -> None:
        self._cancel_poll_call()
        self._poll_due = False
        request, self._poll = self._poll, None
        if request is None:
            return
        pending, self.pending = self.pending, deque()
        self.pending_bytes = 0
        body = b"[" + b",".join(b'{"id":%d,"frame":%s}' % item for item in pending) + b"]"
        for item in pending:
            self.sent.append(item)
            self.sent_bytes += len(item[1])
        _answer(request, 200, body)
        if self.conn is not None and self.state == OPEN:
            # the client took what was pending; until its next poll, nothing is open again
            self.conn.resumeProducing()
            self.conn.pauseProducing()
        self._stream_closed()

    def _poll_dropped(self, _: Failure, request: Any) -> None:
        if self._poll is request:
            self._poll = None
            self._poll_due = False
            self._cancel_poll_call()
            self._stream_closed()

    def _events_ended(self, _: Any, request: Any) -> None:
        if self._sse is request:
            self._sse = None
            self._producer = None
            self.site.stream_closed(self)
            if self.conn is not None and self.state == OPEN:
                self.conn.pauseProducing()
            self._stream_closed()

    def _end_stream(self) -> None:
        """End whatever stream is open (a new one replaces it)."""
        if self._sse is not None:
            request = self._sse
            self._sse = None
            self._producer = None
            self.site.stream_closed(self)
            request.unregisterProducer()
            if not request.finished and not getattr(request, "_disconnected", False):
                request.finish()
        if self._poll is not None:
            self._poll_due = False
            self._cancel_poll_call()
            request, self._poll = self._poll, None
            _answer(request, 200, b"[]")

    def _stream_closed(self) -> None:
        if self.state == OPEN:
            self._arm_idle(self.site.resume)
        elif self.state == CLOSING:
            self._end()

    # --- frames up (POST /stream/<id>)

    def frames_received(self, body: bytes) -> None:
        """Each frame of a ``POST /stream/<id>`` body, in order, to the engine."""
        conn = self.conn
        if conn is None:
            return
        conn.activity()
        if not body.lstrip().startswith(b"["):
            conn.frame_received(body)
            return
        try:
            frames = split_array(body.decode("utf-8"))
        except (ValueError, RecursionError):
            conn.frame_received(body)  # not a JSON array: the engine says bad_frame
            return
        for frame in frames:
            if self.state != OPEN:
                return
            conn.frame_received(frame.encode("utf-8"))

    # --- the end

    def _arm_idle(self, seconds: float) -> None:
        self._disarm_idle()
        self._idle_call = self.site.clock.callLater(seconds, self._idle_expired)

    def _disarm_idle(self) -> None:
        if self._idle_call is not None:
            call, self._idle_call = self._idle_call, None
            if call.active():
                call.cancel()

    def _idle_expired(self) -> None:
        self._idle_call = None
        if self.state == OPEN:
            # stream_resume without a stream: the client is gone, as after a closed socket
            metrics.CLOSES.labels(reason="stream_resume").inc()
        self._end()

    def _end(self) -> None:
        """The connection is over: streams ended, the id forgotten (404 from now on), the engine told."""
        if self.state == CLOSED and self.conn is None:
            return
        self.state = CLOSED
        self._disarm_idle()
        self._end_stream()
        self.pending.clear()
        self.sent.clear()
        self.pending_bytes = self.sent_bytes = 0
        self._lost()

    def _lost(self) -> None:
        self.site.release(self)
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.connection_lost()


_DECODER = json.JSONDecoder()
_SPACE = " \t\n\r"


def split_array(text: str) -> list[str]:
    """The texts of the elements of the JSON array ``text``, as the client wrote them.

    Each element is scanned by the C decoder only to find where it ends; the
    engine parses (and judges) each one as it does any frame. ValueError
    when ``text`` is not a JSON array.
    """
    n = len(text)
    i = 0
    while i < n and text[i] in _SPACE:
        i += 1
    if i == n or text[i] != "[":
        raise ValueError("not an array")
    i += 1
    out: list[str] = []
    while True:
        while i < n and text[i] in _SPACE:
            i += 1
        if i < n and text[i] == "]" and not out:
            i += 1
            break
        _, end = _DECODER.raw_decode(text, i)
        out.append(text[i:end])
        i = end
        while i < n and text[i] in _SPACE:
            i += 1
        if i < n and text[i] == ",":
            i += 1
            continue
        if i < n and text[i] == "]":
            i += 1
            break
        raise ValueError("expected , or ] in the array")
    if text[i:].strip(_SPACE):
        raise ValueError("data after the array")
    return out


def _answer(request: Any, status: int, body: bytes) -> None:
    """A JSON answer (``body`` already encoded), unless the client has gone."""
    if getattr(request, "_disconnected", False) or request.finished:
        return
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(b"content-length", b"%d" % len(body))
    request.write(body)
    request.finish()


def _gone(request: Any) -> Any:
    _answer(request, 404, json_bytes(error_json("not_found", "no such stream (closed or never opened)")))
    return server.NOT_DONE_YET


def _int(value: bytes | None) -> int | None:
    if value is None:
        return 0
    try:
        n = int(value.strip())
    except ValueError:
        return None
    return n if n >= 0 else None


class StreamRequest(GuardedRequest):
    """A GuardedRequest whose failure log line names no stream id (a capability)."""

    def processingFailed(self, reason: Failure) -> None:  # noqa: N802 (Twisted API)
        self.uri = self.uri.split(b"/stream/")[0] + b"/stream/<id>" if b"/stream/" in (self.uri or b"") else self.uri
        return super().processingFailed(reason)


class StreamResource(resource.Resource):
    """The ``--stream`` site's root: ``/stream`` and ``/stream/<id>`` (anything else: 404)."""

    isLeaf = True
    log = Logger()

    def __init__(self, hub: Any) -> None:
        super().__init__()
        config = hub.config
        self.hub = hub
        self.clock = hub.clock
        self.resume = config.stream_resume
        self.resume_bytes = config.stream_resume_bytes
        self.poll_timeout = config.stream_poll_timeout
        self.keepalive_interval = config.stream_keepalive
        self.close_timeout = config.close_timeout
        self.trust_proxy = config.trust_proxy
        origins = list(config.allowed_origins)
        self.any_origin = "*" in origins
        self.origins = {o.encode("ascii", "replace").rstrip(b"/") for o in origins if o != "*"}
        self.connections: dict[str, StreamConnection] = {}
        self._streams: set[StreamConnection] = set()
        self._keepalive: task.LoopingCall | None = None

    # --- bookkeeping of the connections

    def opened(self, adapter: StreamConnection) -> None:
        self.connections[adapter.stream_id] = adapter

    def release(self, adapter: StreamConnection) -> None:
        if self.connections.get(adapter.stream_id) is adapter:
            del self.connections[adapter.stream_id]
        if adapter._slot:
            adapter._slot = False
            self.hub.socket_closed()

    def stream_opened(self, adapter: StreamConnection) -> None:
        self._streams.add(adapter)
        if self._keepalive is None:
            self._keepalive = task.LoopingCall(self._tick)
            self._keepalive.clock = self.clock
            self._keepalive.start(self.keepalive_interval, now=False)

    def stream_closed(self, adapter: StreamConnection) -> None:
        self._streams.discard(adapter)
        if not self._streams and self._keepalive is not None:
            loop, self._keepalive = self._keepalive, None
            loop.stop()

    def _tick(self) -> None:
        for adapter in list(self._streams):
            try:
                adapter.keepalive()
            except Exception:
                self.log.failure("keepalive on {conn} failed", conn=adapter)

    # --- requests

    def render(self, request: Any) -> Any:
        origin = request.getHeader(b"origin")
        if origin is not None:
            if not (self.any_origin or origin.rstrip(b"/") in self.origins):
                return self._error(request, 403, "forbidden_origin", "this origin may not use the stream endpoint")
            request.setHeader(b"access-control-allow-origin", b"*" if self.any_origin else origin)
            request.setHeader(b"vary", b"Origin")
        if request.method == b"OPTIONS":
            request.setHeader(b"access-control-allow-methods", b"GET, POST, OPTIONS")
            request.setHeader(b"access-control-allow-headers", b"Content-Type, Last-Event-ID")
            request.setHeader(b"access-control-max-age", b"600")
            request.setResponseCode(204)
            return b""
        path = request.postpath
        if not path or path[0] != b"stream" or len(path) > 2:
            return self._error(request, 404, "not_found", "no such resource")
        if len(path) == 1 or path[1] == b"":
            if request.method != b"POST":
                return self._method(request, b"POST")
            return self.render_open(request)
        adapter = self.connections.get(path[1].decode("ascii", "replace"))
        if request.method == b"GET":
            if adapter is None or adapter.state not in (OPEN, CLOSING):
                return _gone(request)
            return self.render_stream(request, adapter)
        if request.method == b"POST":
            if request.body_too_large:
                if adapter is not None and adapter.state == OPEN:
                    adapter.conn.frame_too_large()
                return self._too_large(request)
            if adapter is None or adapter.state != OPEN:
                return _gone(request)
            adapter.frames_received(request.content.getvalue())
            request.setResponseCode(204)
            return b""
        return self._method(request, b"GET, POST")

    def render_open(self, request: Any) -> Any:
        """``POST /stream``: a new connection, authenticated by the body's ``auth`` frame.

        Named by the client's address and the next number of :data:`FIRST_PORT`'s
        range (see the module docstring).
        """
        if request.body_too_large:
            return self._too_large(request)
        hub = self.hub
        if not hub.socket_opened():
            _answer(request, 503, p.encode_bytes(p.error_frame(
                p.UNAVAILABLE, "the server takes no new connections; try again later")))
            return server.NOT_DONE_YET
        ip, _ = peer_address(request.channel.transport)
        if self.trust_proxy:
            ip = forwarded_ip(_proxy_headers(request)) or ip
        adapter = StreamConnection(self, secrets.token_urlsafe(24), (ip, next(_numbers)))
        adapter._slot = True
        adapter.open(request, request.content.getvalue())
        return server.NOT_DONE_YET

    def render_stream(self, request: Any, adapter: StreamConnection) -> Any:
        after_arg = request.args.get(b"after")
        if after_arg is not None:
            after = _int(after_arg[0])
            if after is None:
                return self._error(request, 400, "bad_request", "after must be an event id (an integer >= 0)")
            return adapter.open_poll(request, after)
        after = _int(request.getHeader(b"last-event-id"))
        if after is None:
            return self._error(request, 400, "bad_request", "Last-Event-ID must be an event id")
        return adapter.open_events(request, after)

    def _too_large(self, request: Any) -> Any:
        metrics.ERRORS.labels(code=p.TOO_LARGE).inc()
        _answer(request, 413, p.encode_bytes(p.error_frame(
            p.TOO_LARGE, f"a body may hold at most {self.hub.config.max_frame_size} bytes")))
        return server.NOT_DONE_YET

    def _error(self, request: Any, status: int, code: str, message: str) -> Any:
        _answer(request, status, json_bytes(error_json(code, message)))
        return server.NOT_DONE_YET

    def _method(self, request: Any, allowed: bytes) -> Any:
        request.setHeader(b"allow", allowed)
        return self._error(request, 405, "method_not_allowed", f"use {allowed.decode()}")


def _proxy_headers(request: Any) -> dict[str, str]:
    headers = {}
    for name in ("x-real-ip", "x-forwarded-for"):
        value = request.getHeader(name)
        if value is not None:
            headers[name] = value.decode("latin-1")
    return headers


class StreamSite(GuardedSite):
    """The ``--stream`` listener: a GuardedSite around a :class:`StreamResource`."""

    requestFactory = StreamRequest

    def __init__(self, hub: Any) -> None:
        config = hub.config
        self.stream = StreamResource(hub)
        super().__init__(self.stream, "stream", max_body_size=config.max_frame_size,
                         idle_timeout=config.http_idle_timeout, header_timeout=config.http_header_timeout,
                         body_timeout=config.http_body_timeout, max_connections=config.max_connections,
                         reactor=hub.clock)
        # a body is frames, never a form: Twisted would parse the Content-Type of every POST with
        # the email package to look for one (a third of the cost of a small POST)
        self._parsePOSTFormSubmission = False


def make_stream_factory(hub: Any) -> StreamSite:
    """The site for ``--stream`` listeners (limits from ``hub.config``)."""
    return StreamSite(hub)

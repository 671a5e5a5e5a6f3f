"""imcluster.web.GuardedSite, the HTTP listener every daemon builds: deadlines, caps, JSON errors.

Driven over StringTransport with an injected Clock (the real-process attacks
are in tests/test_http_hostile.py).
"""

from __future__ import annotations

import json

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.web import resource, server

from imcluster import metrics
from imcluster.web import GuardedSite, metrics_site, _Root

ADDR = IPv4Address("TCP", "127.0.0.1", 40000)


class Hello(resource.Resource):
    isLeaf = True

    def render_GET(self, request):  # noqa: N802
        return b"hello"

    def render_POST(self, request):  # noqa: N802
        return b"too large" if request.body_too_large else b"got " + request.content.getvalue()


class Broken(resource.Resource):
    isLeaf = True

    def render_GET(self, request):  # noqa: N802
        raise RuntimeError("a bug")


def site(clock: Clock, **kw) -> GuardedSite:
    root = _Root()
    root.putChild(b"hello", Hello())
    root.putChild(b"broken", Broken())
    kw.setdefault("header_timeout", 10.0)
    kw.setdefault("body_timeout", 20.0)
    kw.setdefault("idle_timeout", 60.0)
    return GuardedSite(root, "test", reactor=clock, **kw)


def connect(s: GuardedSite):
    channel = s.buildProtocol(ADDR)
    if channel is None:
        return None, None
    transport = StringTransport(peerAddress=ADDR)
    channel.makeConnection(transport)
    return channel, transport


def answer(transport: StringTransport) -> tuple[int, dict, bytes]:
    head, _, body = transport.value().partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split(" ")[1]), headers, body


def timeouts(phase: str) -> float:
    return metrics.HTTP_TIMEOUTS.labels(listener="test", phase=phase)._value.get()


def test_headers_must_arrive_within_the_deadline_however_they_trickle():
    """A client sending a header line every few seconds (slowloris) kept its connection for ever."""
    clock = Clock()
    s = site(clock)
    before = timeouts("header")
    channel, transport = connect(s)
    channel.dataReceived(b"GET /hello HTTP/1.1\r\n")
    for i in range(4):
        clock.advance(2.4)
        channel.dataReceived(b"X-Pad-%d: y\r\n" % i)
    assert not transport.disconnecting
    clock.advance(0.5)  # 10.1 s after the connection
    assert transport.disconnecting
    status, headers, body = answer(transport)
    assert status == 408 and headers["content-type"] == "application/json"
    assert json.loads(body)["error"]["code"] == "request_timeout"
    assert timeouts("header") == before + 1
    assert s.open_connections == 1
    channel.connectionLost(None)
    assert s.open_connections == 0 and not clock.getDelayedCalls()


def test_silent_connection_closed_without_an_answer():
    """A connection that never sends a byte is closed at the header deadline, with nothing written."""
    clock = Clock()
    channel, transport = connect(site(clock))
    clock.advance(10.0)
    assert transport.disconnecting and transport.value() == b""


def test_kept_alive_connection_idles_under_the_idle_timeout_only():
    """Between requests only http_idle_timeout runs; a new request's headers get the full deadline from its first byte."""
    clock = Clock()
    channel, transport = connect(site(clock))
    channel.dataReceived(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer(transport)[0] == 200
    transport.clear()
    clock.advance(30.0)  # idle, past the header deadline
    assert not transport.disconnecting
    channel.dataReceived(b"GET /hello HTTP/1.1\r\n")
    clock.advance(9.0)
    channel.dataReceived(b"Host: x\r\n\r\n")
    assert answer(transport)[0] == 200 and not transport.disconnecting
    transport.clear()
    clock.advance(60.0)  # the idle timeout
    assert transport.disconnecting and transport.value() == b""


def test_pipelined_request_is_under_the_deadline():
    """A second request sent behind the first one gets its headers' deadline once the first is answered."""
    clock = Clock()
    channel, transport = connect(site(clock))
    channel.dataReceived(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\nGET /hello HTTP/1.1\r\n")
    assert transport.value().count(b"HTTP/1.1 200") == 1
    for _ in range(4):
        clock.advance(2.4)
        channel.dataReceived(b"X-Pad: y\r\n")
    clock.advance(0.5)
    assert transport.disconnecting
    assert transport.value().count(b"HTTP/1.1 408") == 1


def test_request_answered_later_then_pipelined_request():
    """Behind a request answered asynchronously, the next request's deadline runs from its answer."""
    clock = Clock()
    root = _Root()
    waiting = []

    class Later(resource.Resource):
        isLeaf = True

        def render_GET(self, request):  # noqa: N802
            waiting.append(request)
            return server.NOT_DONE_YET

    root.putChild(b"later", Later())
    channel, transport = connect(GuardedSite(root, "test", reactor=clock, header_timeout=10.0))
    channel.dataReceived(b"GET /later HTTP/1.1\r\nHost: x\r\n\r\nGET /later HTTP/1.1\r\n")
    clock.advance(30.0)  # handling: no deadline
    assert not transport.disconnecting
    waiting[0].write(b"done")
    waiting[0].finish()
    clock.advance(9.9)
    assert not transport.disconnecting
    clock.advance(0.2)
    assert transport.disconnecting and transport.value().count(b"HTTP/1.1 408") == 1


def test_body_deadline_and_bound():
    """A body that stalls is cut at http_body_timeout; one over max_body_size is dropped, not held."""
    clock = Clock()
    s = site(clock, max_body_size=10)
    before = timeouts("body")
    channel, transport = connect(s)
    channel.dataReceived(b"POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nab")
    clock.advance(19.0)
    assert not transport.disconnecting
    clock.advance(1.0)
    assert transport.disconnecting and answer(transport)[0] == 408
    assert timeouts("body") == before + 1

    channel, transport = connect(s)
    channel.dataReceived(b"POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 20\r\n\r\n" + b"x" * 20)
    assert answer(transport)[2] == b"too large"
    channel, transport = connect(s)
    channel.dataReceived(b"POST /hello HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"8\r\n12345678\r\n8\r\n12345678\r\n0\r\n\r\n")
    assert answer(transport)[2] == b"too large"


def test_connections_over_the_cap_are_refused_and_counted():
    """Beyond max_connections a new connection is closed at once (buildProtocol refuses it) and counted."""
    clock = Clock()
    s = site(clock, max_connections=2)
    refused = metrics.HTTP_REFUSED.labels(listener="test")
    before = refused._value.get()
    first, _ = connect(s)
    connect(s)
    assert connect(s) == (None, None)
    assert refused._value.get() == before + 1
    first.connectionLost(None)
    assert connect(s)[0] is not None


def test_errors_are_json_never_html():
    """Twisted's own answers (405, a failing resource, a malformed request) were HTML pages or empty 400s."""
    clock = Clock()
    s = site(clock)
    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        for raw, status in [(b"DELETE /hello HTTP/1.1\r\nHost: x\r\n\r\n", 405),
                            (b"GET /broken HTTP/1.1\r\nHost: x\r\n\r\n", 500),
                            (b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n", 404),
                            (b"NONSENSE\r\n\r\n", 400),
                            (b"GET /hello HTTP/1.1\r\nX: " + b"y" * 17000 + b"\r\n\r\n", 400)]:
            channel, transport = connect(s)
            channel.dataReceived(raw)
            got, headers, body = answer(transport)
            assert got == status, (raw[:40], transport.value()[:300])
            assert headers["content-type"] == "application/json" and json.loads(body)["error"]["code"]
            if status == 405:
                assert set(headers["allow"].split(", ")) == {"GET", "HEAD", "POST"}
    finally:
        globalLogPublisher.removeObserver(seen.append)
    levels = [e["log_level"] for e in seen if e.get("log_failure") is not None]
    assert levels == [LogLevel.error]  # the bug, once, with its traceback; nothing critical


def test_head_of_a_get_resource_still_works():
    """HEAD on a resource with only render_GET is Twisted's GET without a body, not a 405."""
    clock = Clock()
    channel, transport = connect(site(clock))
    channel.dataReceived(b"HEAD /hello HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, body = answer(transport)
    assert status == 200 and headers["content-length"] == "5" and body == b""


def test_metrics_site_is_guarded():
    """The --metrics listeners of every daemon have the same deadlines and JSON errors."""
    clock = Clock()
    config = type("C", (), {"max_body_size": 100, "http_idle_timeout": 60.0, "http_header_timeout": 3.0,
                            "http_body_timeout": 5.0})()
    s = metrics_site({}, 1.0, clock, config)
    s.reactor = clock
    assert isinstance(s, GuardedSite) and s.header_timeout == 3.0 and s.max_body_size == 100
    channel, transport = connect(s)
    channel.dataReceived(b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    status, headers, body = answer(transport)
    assert status == 405 and json.loads(body)["error"]["code"] == "method_not_allowed"


def test_an_attack_does_not_flood_the_log():
    """Thousands of late connections are counted one by one but logged once per log_interval."""
    clock = Clock()
    s = site(clock, max_connections=5)
    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        late = [connect(s)[0] for _ in range(5)]
        for channel in late:
            channel.dataReceived(b"GET /hello HTTP/1.1\r\n")
        clock.advance(10.0)  # five at once: one line
        for channel in late:
            channel.connectionLost(None)
        channel = connect(s)[0]
        channel.dataReceived(b"GET /hello HTTP/1.1\r\n")
        clock.advance(10.0)  # the interval has passed: a line with the four before it and this one
        channel.connectionLost(None)
        for _ in range(7):
            connect(s)  # five held, two refused at once: one line
        clock.advance(10.0)  # the five held ones time out (silent: no answer): a line
        connect(s)  # the interval has passed
    finally:
        globalLogPublisher.removeObserver(seen.append)
    lines = [(e["log_format"].split(":")[1].split()[0], e.get("n")) for e in seen
             if e.get("log_namespace", "").startswith("imcluster.web")]
    assert lines == [("closed", 1), ("closed", 5), ("refused", 1), ("closed", 1), ("refused", 2)]

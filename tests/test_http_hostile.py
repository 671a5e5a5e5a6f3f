"""Hostile HTTP clients against a real ``twistd imapi`` (issue 13, items 3 and 6).

What a client sends must cost imapi bounded time and memory, whoever it is:

- slowloris: connections that trickle a header line every few seconds are
  closed by ``http_header_timeout`` (default 10 s; every byte used to reset
  the 60 s idle timeout, so they stayed open for ever), while a normal
  client keeps its latency;
- a body that stalls is closed by ``http_body_timeout``;
- beyond ``max_connections`` a new connection is closed at once;
- odd paths (NUL, ``%2e%2e``, non-UTF-8 escapes, overlong) and odd requests
  are answered in the JSON error shape of HTTP-API.md, never with an HTML
  page, and nothing is logged as critical.

Raw sockets (blocking, in threads) play the attackers: the point is what
arrives on the wire.
"""

from __future__ import annotations

import json
import socket
import time

import pytest
import pytest_twisted
from twisted.internet import threads

from tests.support.http import http_call, metric_value
from tests.support.waiting import eventually, sleep

# starts processes: not part of the fast suite (-m "not slow")
pytestmark = pytest.mark.slow

SLOW_CLIENTS = 50
#: the default http_header_timeout (the slowloris test runs with the defaults)
HEADER_TIMEOUT = 10.0


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _read_all(s: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """Everything the server sends until it closes (True) or ``timeout`` passes (False)."""
    s.settimeout(timeout)
    data = b""
    end = time.monotonic() + timeout
    try:
        while time.monotonic() < end:
            chunk = s.recv(65536)
            if not chunk:
                return data, True
            data += chunk
    except socket.timeout:
        return data, False
    except ConnectionResetError:
        return data, True
    return data, False


def _parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


def _read_response(s: socket.socket, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """One response with a Content-Length from a kept-alive connection."""
    s.settimeout(timeout)
    raw = b""
    while b"\r\n\r\n" not in raw:
        raw += s.recv(65536)
    status, headers, body = _parse(raw)
    while len(body) < int(headers["content-length"]):
        body += s.recv(65536)
    return status, headers, body


def _exchange(port: int, request: bytes, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """Send ``request`` (which asks to close) and parse the answer."""
    with _connect(port) as s:
        s.sendall(request)
        raw, _ = _read_all(s, timeout)
    return _parse(raw) if raw else (0, {}, b"")  # 0: closed without an answer


def _slowloris(port: int, clients: int, interval: float, give_up: float) -> list[dict]:
    """``clients`` connections each sending a request line, then one header line every ``interval`` s.

    Returns, per connection, when (seconds after its start) the server closed it
    (None: still open after ``give_up`` s) and what it answered.
    """
    socks = []
    for _ in range(clients):
        s = _connect(port)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        s.setblocking(False)
        socks.append({"sock": s, "start": time.monotonic(), "closed": None, "data": b""})
    n = 0
    end = time.monotonic() + give_up
    next_line = time.monotonic() + interval
    while time.monotonic() < end and any(c["closed"] is None for c in socks):
        time.sleep(0.05)
        now = time.monotonic()
        for c in socks:
            if c["closed"] is not None:
                continue
            try:
                chunk = c["sock"].recv(65536)
                if chunk:
                    c["data"] += chunk
                else:
                    c["closed"] = now - c["start"]
            except BlockingIOError:
                pass
            except OSError:
                c["closed"] = now - c["start"]
        if now >= next_line:
            n += 1
            for c in socks:
                if c["closed"] is None:
                    try:
                        c["sock"].send(b"X-Pad-%d: %s\r\n" % (n, b"y" * 10))
                    except OSError:
                        c["closed"] = now - c["start"]
            next_line = now + interval
    for c in socks:
        c["sock"].close()
    return [{"closed": c["closed"], "data": c["data"]} for c in socks]


@pytest_twisted.ensureDeferred
async def test_slowloris_is_closed_by_the_header_deadline(cluster):
    """50 connections trickling a header line every 2 s would hold imapi's connections for ever (issue 13, item 3)."""
    api = await cluster.start_api()  # the defaults: http_header_timeout 10 s, http_idle_timeout 60 s
    port = api.http_port
    attack = threads.deferToThread(_slowloris, port, SLOW_CLIENTS, 2.0, HEADER_TIMEOUT + 12)
    await sleep(3.0)
    # a normal client is answered at once meanwhile
    started = time.monotonic()
    r = await http_call(port, "GET", "/openapi.json")
    assert r.status == 200 and (time.monotonic() - started) < 1.0
    results = await attack
    closed = [c["closed"] for c in results]
    assert all(t is not None for t in closed), f"{closed.count(None)} slowloris connections still open"
    assert all(HEADER_TIMEOUT - 0.5 <= t <= HEADER_TIMEOUT + 3 for t in closed), closed
    for c in results:
        status, headers, body = _parse(c["data"])
        assert status == 408 and headers["content-type"] == "application/json"
        assert json.loads(body)["error"]["code"] == "request_timeout"
    r = await http_call(port, "GET", "/metrics")
    assert metric_value(r.text, "imcluster_http_timeouts_total",
                        {"listener": "api", "phase": "header"}) == SLOW_CLIENTS
    assert "#critical" not in api.log_text()


@pytest_twisted.ensureDeferred
async def test_silent_and_stalled_connections_are_closed(cluster):
    """A connection that says nothing, or stops in the middle of its body, holds imapi's memory no longer than its deadline."""
    api = await cluster.start_api(http_header_timeout=1.5, http_body_timeout=1.5)
    port = api.http_port

    def silent() -> tuple[bytes, bool, float]:
        with _connect(port) as s:
            started = time.monotonic()
            data, closed = _read_all(s, 6.0)
            return data, closed, time.monotonic() - started

    def stalled_body() -> tuple[bytes, bool, float]:
        with _connect(port) as s:
            s.sendall(b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{\"members\"")
            started = time.monotonic()
            data, closed = _read_all(s, 6.0)
            return data, closed, time.monotonic() - started

    def kept_alive() -> tuple[int, bool, float]:
        """One request, then idle on the kept-alive connection: only the idle timeout applies there."""
        with _connect(port) as s:
            s.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _read_response(s)[0] == 200
            time.sleep(3.0)  # twice the header deadline, idle: still open
            s.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            raw, closed = _read_all(s, 5.0)
            return _parse(raw)[0], closed, 0.0

    (data, closed, took), (body_data, body_closed, body_took), (again, _, _) = await threads.deferToThread(
        lambda: (silent(), stalled_body(), kept_alive()))
    assert closed and data == b"" and 1.0 <= took <= 4.0, (data, closed, took)
    assert body_closed and 1.0 <= body_took <= 4.0, (body_data, body_took)
    status, headers, body = _parse(body_data)
    assert status == 408 and json.loads(body)["error"]["code"] == "request_timeout"
    assert again == 200
    r = await http_call(port, "GET", "/metrics")
    assert metric_value(r.text, "imcluster_http_timeouts_total", {"listener": "api", "phase": "body"}) == 1
    assert metric_value(r.text, "imcluster_http_timeouts_total", {"listener": "api", "phase": "header"}) == 1


@pytest_twisted.ensureDeferred
async def test_connections_over_max_connections_are_refused(cluster):
    """A flood of connections would hold imapi's memory without a cap; over it, new ones are closed at once."""
    api = await cluster.start_api(max_connections=5)
    port = api.http_port

    def flood() -> tuple[float, list[tuple[bool, bytes, float]], int]:
        # the harness' readiness probes are gone first: only the asking connection is open
        end = time.monotonic() + 10
        while time.monotonic() < end:
            status, _, body = _exchange(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            if status == 200 and metric_value(body.decode(), "imcluster_http_connections", {"listener": "api"}) == 1:
                break
            time.sleep(0.1)
        held = [_connect(port) for _ in range(4)]
        # the fifth asks, on a kept-alive connection, how many are open: then all five are accepted
        fifth = _connect(port)
        fifth.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        open_now = metric_value(_read_response(fifth)[2].decode(), "imcluster_http_connections", {"listener": "api"})
        refused = []
        for _ in range(3):
            with _connect(port) as extra:
                started = time.monotonic()
                data, closed = _read_all(extra, 5.0)
                refused.append((closed, data, round(time.monotonic() - started, 2)))
        held[0].close()
        time.sleep(0.5)
        status = _exchange(port, b"GET /openapi.json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")[0]
        for s in held[1:] + [fifth]:
            s.close()
        return open_now, refused, status

    open_now, refused, status = await threads.deferToThread(flood)
    assert open_now == 5
    assert all(closed and data == b"" and took < 2.0 for closed, data, took in refused), refused
    assert status == 200  # a slot freed is usable again

    async def counted() -> bool:
        r = await http_call(port, "GET", "/metrics")
        return metric_value(r.text, "imcluster_http_connections_refused_total", {"listener": "api"}) == 3

    await eventually(counted, 5.0, "three refusals counted")


ODD_REQUESTS = [
    # (request line, expected status)
    (b"GET /app/index.html%00.js HTTP/1.1", 404),  # issue 13 item 6: was an HTML 500 and a critical traceback
    (b"GET /app/%00 HTTP/1.1", 404),
    (b"GET /app/app.js%00 HTTP/1.1", 404),
    (b"GET /%00 HTTP/1.1", 404),
    (b"GET /v1/sessions/%00 HTTP/1.1", 401),
    (b"GET /app/%2e%2e/%2e%2e/setup.cfg HTTP/1.1", 404),
    (b"GET /app/..%2f..%2fsetup.cfg HTTP/1.1", 404),
    (b"GET /app/%2E%2E%5C%2E%2E%5Csetup.cfg HTTP/1.1", 404),
    (b"GET /app/%ff%fe HTTP/1.1", 404),
    (b"GET /app/%c0%ae%c0%ae/setup.cfg HTTP/1.1", 404),
    (b"GET /%ff HTTP/1.1", 404),
    (b"GET /app/" + b"a" * 5000 + b" HTTP/1.1", 404),
    (b"GET /app/" + b"a/" * 2000 + b" HTTP/1.1", 404),
    (b"GET /app/index.html?x=%00%ff HTTP/1.1", 200),
    (b"GET /app/" + b"x" * 20000 + b" HTTP/1.1", 400),  # over the request line and headers' 16 KB
    (b"POST /metrics HTTP/1.1", 405),
    (b"DELETE /healthz HTTP/1.1", 405),
    (b"BREW /app/ HTTP/1.1", 405),
    (b"GET /app/config.json/x HTTP/1.1", 404),
    (b"GARBAGE", 400),
    (b"GET / HTTP/1.1\r\nContent-Length: x", 400),
    (b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz", 400),
]


@pytest_twisted.ensureDeferred
async def test_odd_paths_answer_json_and_log_nothing_critical(cluster):
    """GET /app/index.html%00.js was an HTML 500 with a critical traceback each time; every error must be JSON."""
    api = await cluster.start_api()
    port = api.http_port

    def ask_all() -> list[tuple[bytes, int, dict, bytes]]:
        out = []
        for line, _ in ODD_REQUESTS:
            request = line + b"\r\nHost: x\r\nConnection: close\r\n\r\n" if b"\r\n" not in line else line + b"\r\n\r\n"
            out.append((line, *_exchange(port, request)))
        return out

    for (line, status, headers, body), (_, expected) in zip(await threads.deferToThread(ask_all), ODD_REQUESTS):
        assert status == expected, (line[:80], status, body[:200])
        if status >= 400:
            assert headers.get("content-type") == "application/json", (line[:80], headers, body[:200])
            assert json.loads(body)["error"]["code"], line[:80]
            assert b"<html" not in body.lower()
    log = api.log_text()
    assert "#critical" not in log and "Traceback" not in log, log[-3000:]

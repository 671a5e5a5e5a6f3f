"""twisted.web pieces every daemon shares: ``/metrics``, ``/healthz`` and JSON answers.

``/metrics`` is the Prometheus text exposition of :mod:`imcluster.metrics`
(prometheus-client). ``/healthz`` runs one probe per dependency, all at
once, each bounded by ``health_timeout`` seconds, and answers 200 when
every probe passed, else 503, with a body that names each one's state::

    {"ok": false, "status": "unavailable",
     "dependencies": {"redis": {"state": "up", "ms": 0.4},
                      "rabbitmq": {"state": "down", "error": "not connected"},
                      "postgresql": {"state": "up", "ms": 1.1}}}

A probe is a callable returning a bool or a Deferred: a true value (or a
Deferred firing with anything but False) is "up"; False, an exception, a
failed Deferred or no answer within the bound is "down". The probes of the
shared clients (:func:`dependency_probes`) make a real round trip (Redis
``PING``, a confirmed AMQP publish to an unbound routing key, PostgreSQL
``SELECT 1``) so a half-open connection shows as down.

imapi serves these beside its API; gateways and processors serve them on
their ``--metrics`` endpoints through :func:`make_metrics_service`::

    probes = dependency_probes(redis=redis, amqp=amqp, postgres=db)
    probes["gateway"] = lambda: gateway.accepting      # any extra check
    make_metrics_service(config, probes).setServiceParent(root)

Every HTTP listener the project builds is a :class:`GuardedSite` (imapi's
``--http``, every ``--metrics``, and any HTTP transport to come), so that
whatever one client sends, what it costs is bounded (ARCHITECTURE.md
"Failure rules")::

    site = GuardedSite.from_config(root_resource, config, "api",
                                   max_connections=config.max_connections)

- the request line and headers must arrive within ``http_header_timeout``
  seconds of the connection's start, or (on a kept-alive connection) of the
  request's first byte; the body within ``http_body_timeout`` of the
  headers' end: else a JSON 408 and the connection closes (a connection that
  sent nothing is just closed). ``http_idle_timeout`` bounds the wait for a
  request; unlike it, these deadlines are not moved by each byte, so a
  client trickling a header line every few seconds (slowloris) is closed;
- a body is held in memory up to ``max_body_size`` bytes; beyond it the rest
  is read and dropped and ``request.body_too_large`` is set (the resource
  answers 413);
- at most ``max_connections`` connections are open at once (None: no cap);
  a connection over the cap is closed as soon as it is accepted;
- every error Twisted itself would answer (malformed request, method not
  allowed, a resource that fails) is JSON ``{"error":{"code","message"}}``
  as in HTTP-API.md, never an HTML page; a failing resource is logged once
  as an error with its traceback.

Each trip is counted: ``imcluster_http_timeouts_total{listener,phase}``,
``imcluster_http_connections_refused_total{listener}``; open connections
are ``imcluster_http_connections{listener}``.
"""

from __future__ import annotations

import io
import json
import time
from typing import Any, Callable, Mapping

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.web import http, resource, server

from imcluster import metrics

#: what /healthz calls the shared services (HTTP-API.md: "Redis, RabbitMQ and PostgreSQL")
REDIS, RABBITMQ, POSTGRESQL = "redis", "rabbitmq", "postgresql"

JSON_TYPE = b"application/json"

Probe = Callable[[], Any]


class DependencyDown(Exception):
    """A probe found its dependency unusable (the message says how)."""


def json_bytes(value: Any) -> bytes:
    """Compact UTF-8 JSON, as every imcluster HTTP answer is written."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


def error_json(code: str, message: str) -> dict:
    """The error shape of HTTP-API.md "Errors"."""
    return {"error": {"code": code, "message": message}}


def write_json(request: Any, status: int, value: Any, headers: Mapping[bytes, bytes] | None = None) -> None:
    """Answer ``request`` with ``status`` and ``value`` as JSON (nothing if the client has gone)."""
    if getattr(request, "_disconnected", False) or getattr(request, "finished", False):
        return
    body = json_bytes(value)
    request.setResponseCode(status)
    request.setHeader(b"content-type", JSON_TYPE)
    request.setHeader(b"cache-control", b"no-store")
    for name, header in (headers or {}).items():
        request.setHeader(name, header)
    request.setHeader(b"content-length", str(len(body)).encode())
    if request.method != b"HEAD":
        request.write(body)
    request.finish()


# --- probes --------------------------------------------------------------------


def redis_probe(redis: Any) -> Probe:
    """``PING`` on a connected :class:`~imcluster.registry.RedisService`."""

    def probe() -> Any:
        if not redis.connected:
            raise DependencyDown("not connected")
        return redis.execute("PING")

    return probe


def amqp_probe(amqp: Any) -> Probe:
    """A confirmed, non-persistent empty publish to ``<ns>.healthz`` (no queue is bound: the broker drops it)."""

    def probe() -> Any:
        if not amqp.connected:
            raise DependencyDown("not connected")
        return amqp.publish(f"{amqp.namespace}.healthz", b"", mandatory=False, persistent=False)

    return probe


def postgres_probe(db: Any) -> Probe:
    """``SELECT 1`` on a :class:`~imcluster.db.PostgresService` with a live connection."""

    def probe() -> Any:
        if not db.connected:
            raise DependencyDown("no live connection")
        return db.run_query("SELECT 1")

    return probe


def dependency_probes(redis: Any = None, amqp: Any = None, postgres: Any = None) -> dict[str, Probe]:
    """The /healthz probes of the shared clients a daemon uses (omit those it does not)."""
    probes: dict[str, Probe] = {}
    if redis is not None:
        probes[REDIS] = redis_probe(redis)
    if amqp is not None:
        probes[RABBITMQ] = amqp_probe(amqp)
    if postgres is not None:
        probes[POSTGRESQL] = postgres_probe(postgres)
    return probes


def _one_line(f: Failure) -> str:
    text = f.getErrorMessage() or f.type.__name__
    return text.splitlines()[0][:200] if text else f.type.__name__


def run_probes(probes: Mapping[str, Probe], timeout: float, clock: Any = None) -> defer.Deferred:
    """Run every probe at once; fires with ``(ok, {name: {"state", "ms"|"error"}})``.

    Never fails: a probe that raises, fails or has not answered within
    ``timeout`` seconds is ``down``.
    """
    if clock is None:
        from twisted.internet import reactor as clock
    started = time.monotonic()
    states: dict[str, dict] = {}

    def one(name: str, probe: Probe) -> defer.Deferred:
        d = defer.maybeDeferred(probe)
        d.addTimeout(timeout, clock)

        def up(result: Any) -> None:
            if result is False:
                states[name] = {"state": "down", "error": "check failed"}
            else:
                states[name] = {"state": "up", "ms": round((time.monotonic() - started) * 1000, 1)}

        def down(f: Failure) -> None:
            if f.check(defer.TimeoutError, defer.CancelledError):
                states[name] = {"state": "down", "error": f"no answer within {timeout:g}s"}
            else:
                states[name] = {"state": "down", "error": _one_line(f)}

        return d.addCallbacks(up, down)

    d = defer.DeferredList([one(n, p) for n, p in probes.items()], consumeErrors=True)

    def done(_: Any) -> tuple[bool, dict]:
        ordered = {name: states[name] for name in probes}
        return all(s["state"] == "up" for s in ordered.values()), ordered

    return d.addCallback(done)


# --- resources -------------------------------------------------------------------


class HealthResource(resource.Resource):
    """``/healthz``: 200 when every probe passes within ``timeout`` seconds, else 503 (see the module docstring)."""

    isLeaf = True
    log = Logger()

    def __init__(self, probes: Mapping[str, Probe], timeout: float, clock: Any = None) -> None:
        super().__init__()
        self.probes = dict(probes)
        self.timeout = timeout
        self.clock = clock

    def render_GET(self, request: Any) -> Any:  # noqa: N802 (Twisted API)
        d = run_probes(self.probes, self.timeout, self.clock)

        def answer(result: tuple[bool, dict]) -> None:
            ok, states = result
            if not ok:
                self.log.info("healthz: unavailable {states}", states=states)
            write_json(request, 200 if ok else 503,
                       {"ok": ok, "status": "ok" if ok else "unavailable", "dependencies": states})

        d.addCallback(answer)
        d.addErrback(lambda f: self.log.failure("healthz failed", f))
        return server.NOT_DONE_YET

    render_HEAD = render_GET


class MetricsResource(resource.Resource):
    """``/metrics``: the Prometheus text format of ``registry`` (default: this process' metrics).

    Rendered on the reactor thread (prometheus-client's own resource is a
    WSGI app on the thread pool; a scrape takes well under a millisecond).
    """

    isLeaf = True

    def __init__(self, registry: Any = None) -> None:
        super().__init__()
        if registry is None:
            from prometheus_client import REGISTRY as registry
        self.registry = registry

    def render_GET(self, request: Any) -> bytes:  # noqa: N802 (Twisted API)
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        body = generate_latest(self.registry)
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"content-length", str(len(body)).encode())
        return body

    render_HEAD = render_GET


def metrics_resource() -> resource.Resource:
    """``/metrics``: the Prometheus text format of this process' registry."""
    return MetricsResource()


class NotFound(resource.Resource):
    """404 in the JSON error shape of HTTP-API.md."""

    isLeaf = True

    def render(self, request: Any) -> Any:
        write_json(request, 404, error_json("not_found", "no such resource"))
        return server.NOT_DONE_YET


class _Root(resource.Resource):
    def getChild(self, path: bytes, request: Any) -> resource.Resource:  # noqa: N802 (Twisted API)
        return NotFound()

    def render(self, request: Any) -> Any:
        return NotFound().render(request)


# --- guarded HTTP listeners (see the module docstring) ------------------------------------


def _raw_json_response(status: int, reason: bytes, code: str, message: str) -> bytes:
    """A whole HTTP/1.1 response that closes the connection, for answers given outside a Request."""
    body = json_bytes(error_json(code, message))
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncache-control: no-store\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n" % (status, reason, len(body))) + body


class _JSONMethodErrors:
    """Wraps the resource a request renders: a method it does not support is a JSON 405, not HTML."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def render(self, request: Any) -> Any:
        try:
            body = self.inner.render(request)
        except resource.UnsupportedMethod as e:
            if request.method == b"HEAD" and b"GET" in e.allowedMethods:
                raise  # Twisted renders the GET without its body
            allowed = b", ".join(e.allowedMethods)
            write_json(request, 405, error_json(
                "method_not_allowed", f"use {allowed.decode('ascii', 'replace') or 'another method'}"),
                {b"allow": allowed})
            return server.NOT_DONE_YET
        if body is not server.NOT_DONE_YET and not isinstance(body, bytes):
            raise TypeError(f"{self.inner!r} rendered {type(body).__name__}, not bytes")
        return body


class GuardedRequest(server.Request):
    """A Request with a bounded body and JSON errors (see the module docstring)."""

    body_too_large = False
    _received = 0
    logger = Logger()

    def _limit(self) -> int:
        return getattr(self.channel.site, "max_body_size", 1048576)

    def gotLength(self, length: int | None) -> None:  # noqa: N802 (Twisted API)
        # never a temporary file: what is kept is bounded by the limit
        self.content = io.BytesIO()
        if length is not None and length > self._limit():
            self.body_too_large = True

    def handleContentChunk(self, data: bytes) -> None:  # noqa: N802 (Twisted API)
        if self.body_too_large:
            return
        self._received += len(data)
        if self._received > self._limit():
            self.body_too_large = True
            self.content = io.BytesIO()
            return
        self.content.write(data)

    def render(self, resrc: Any) -> None:
        super().render(_JSONMethodErrors(resrc))

    def processingFailed(self, reason: Failure) -> None:  # noqa: N802 (Twisted API)
        """A bug in a resource: logged as an error (with its traceback), answered with a JSON 500."""
        self.logger.failure("answering {method} {path!r} failed", reason, level=LogLevel.error,
                         method=self.method.decode("ascii", "replace") if self.method else "?",
                         path=(self.uri or b"")[:200])
        if self.finished or getattr(self, "_disconnected", False):
            return None
        if self.startedWriting:
            # the status line is gone: all that is left is to cut the answer short
            self.channel.loseConnection()
            return None
        self.responseHeaders = http.Headers()
        write_json(self, 500, error_json("internal", "internal error"))
        return None


class GuardedChannel(http.HTTPChannel):
    """An HTTP/1.1 channel with header and body deadlines (see the module docstring).

    Phases: ``header`` (waiting for a request line and headers, under
    ``header_timeout``), ``body`` (under ``body_timeout``), ``handling``
    (the site answers; no deadline here), ``idle`` (a kept-alive connection
    between requests: only the idle timeout runs).
    """

    _deadline: Any = None
    _phase = "header"
    _started = False  # a byte of the current request arrived

    def connectionMade(self) -> None:  # noqa: N802 (Twisted API)
        super().connectionMade()
        self.site.connection_opened()
        self._arm("header")

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted API)
        if data:
            if self._phase == "idle":
                self._arm("header")
            if self._phase == "header":
                self._started = True
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:  # noqa: N802 (Twisted API)
        # a request that came in one read behind the previous one is parsed from the buffer,
        # without a dataReceived: its first line starts its deadline too
        if self._phase == "idle":
            self._arm("header")
            self._started = True
        super().lineReceived(line)

    def allHeadersReceived(self) -> None:  # noqa: N802 (Twisted API)
        self._arm("body")
        super().allHeadersReceived()

    def allContentReceived(self) -> None:  # noqa: N802 (Twisted API)
        self._disarm()
        self._phase = "handling"
        super().allContentReceived()

    def requestDone(self, request: Any) -> None:  # noqa: N802 (Twisted API)
        if self.persistent:
            if any(self._dataBuffer):
                # a pipelined request has begun: its headers are under the deadline from now on
                self._arm("header")
                self._started = True
            else:
                self._phase = "idle"
        super().requestDone(request)

    def connectionLost(self, reason: Failure) -> None:  # noqa: N802 (Twisted API)
        self._disarm()
        self._phase = "closed"
        site = getattr(self, "site", None)
        if site is not None:
            site.connection_closed()
        super().connectionLost(reason)

    def _respondToBadRequestAndDisconnect(self) -> None:  # noqa: N802 (Twisted's own)
        """Malformed request line, headers over ``totalHeadersSize``, bad chunking: a JSON 400, then close."""
        self._disarm()
        self._phase = "closed"
        self.transport.write(_raw_json_response(
            400, b"Bad Request", "bad_request",
            f"not a valid HTTP/1.1 request (the request line and headers may take {self.totalHeadersSize} bytes)"))
        self.loseConnection()

    def lineLengthExceeded(self, line: bytes) -> None:  # noqa: N802 (Twisted API)
        """A request line or header line over ``MAX_LENGTH``: the same JSON 400 (Twisted just closes)."""
        self._respondToBadRequestAndDisconnect()

    # --- deadlines

    def _arm(self, phase: str) -> None:
        self._disarm()
        self._phase = phase
        self._started = False
        seconds = self.site.header_timeout if phase == "header" else self.site.body_timeout
        self._deadline = self.callLater(seconds, self._expired, phase, seconds)

    def _disarm(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def _expired(self, phase: str, seconds: float) -> None:
        self._deadline = None
        if self._phase != phase:
            return
        self._phase = "closed"
        self.site.timed_out(phase, str(self.transport.getPeer()))
        if phase == "body" or self._started:
            what = "request line and headers" if phase == "header" else "request body"
            self.transport.write(_raw_json_response(
                408, b"Request Timeout", "request_timeout", f"the {what} must arrive within {seconds:g} s"))
        # else nothing of a request arrived: no answer is owed, as for an idle connection
        if self.abortTimeout is not None:
            # a peer that does not read cannot hold the connection open: it is cut after abortTimeout
            self._abortingCall = self.callLater(self.abortTimeout, self.forceAbortClient)
        self.loseConnection()


class GuardedSite(server.Site):
    """A twisted.web Site for every HTTP listener of the project (see the module docstring).

    ``name`` labels its metrics (``api``, ``metrics``...). No access log: a
    resource counts its requests itself (``imcluster_http_requests_total``).
    HTTP/2 is not offered (the guards are HTTP/1.1's).
    """

    protocol = GuardedChannel
    requestFactory = GuardedRequest
    logger = Logger()
    #: seconds between two log lines about refused or timed-out connections (each one is counted
    #: in the metrics; an attack must not flood the log)
    log_interval = 10.0

    def __init__(self, root: resource.Resource, name: str, *, max_body_size: int = 1048576,
                 idle_timeout: float = 60.0, header_timeout: float = 10.0, body_timeout: float = 60.0,
                 max_connections: int | None = None, reactor: Any = None) -> None:
        super().__init__(root, timeout=idle_timeout, reactor=reactor)
        self.name = name
        self.max_body_size = max_body_size
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.max_connections = max_connections
        self.open_connections = 0
        self.noisy = False
        self.displayTracebacks = False
        self._tallies: dict[str, list] = {}  # what -> [count since the last line, time of the last line]
        self._gauge = metrics.HTTP_CONNECTIONS.labels(listener=name)

    @classmethod
    def from_config(cls, root: resource.Resource, config: Any, name: str, max_connections: int | None = None,
                    reactor: Any = None) -> "GuardedSite":
        """A site with the limits of ``config`` (``max_body_size``, ``http_*_timeout``)."""
        def value(key: str, default: Any) -> Any:
            return getattr(config, key, default)

        return cls(root, name, max_body_size=value("max_body_size", 1048576),
                   idle_timeout=value("http_idle_timeout", 60.0), header_timeout=value("http_header_timeout", 10.0),
                   body_timeout=value("http_body_timeout", 60.0), max_connections=max_connections, reactor=reactor)

    def buildProtocol(self, addr: Any) -> Any:  # noqa: N802 (Twisted API)
        if self.max_connections is not None and self.open_connections >= self.max_connections:
            metrics.HTTP_REFUSED.labels(listener=self.name).inc()
            n = self._tally("refused")
            if n:
                self.logger.warn("{listener}: refused {n} connection(s): {open} open is the limit "
                                 "(max_connections)", listener=self.name, n=n, open=self.open_connections)
            return None  # the listening port closes the connection at once
        return super().buildProtocol(addr)

    def timed_out(self, phase: str, peer: str) -> None:
        """A connection is being closed: its request's ``phase`` (header or body) was late."""
        metrics.HTTP_TIMEOUTS.labels(listener=self.name, phase=phase).inc()
        n = self._tally("timeout-" + phase)
        if n:
            self.logger.info("{listener}: closed {n} connection(s) whose request {phase} did not arrive within "
                             "{seconds}s (the latest from {peer})", listener=self.name, n=n, phase=phase,
                             seconds=self.header_timeout if phase == "header" else self.body_timeout, peer=peer)

    def _tally(self, what: str) -> int:
        """Count one ``what``; the count since the last log line when one is due now, else 0."""
        tally = self._tallies.setdefault(what, [0, None])
        tally[0] += 1
        now = self.reactor.seconds()
        if tally[1] is not None and now - tally[1] < self.log_interval:
            return 0
        n, tally[0], tally[1] = tally[0], 0, now
        return n

    def connection_opened(self) -> None:
        self.open_connections += 1
        self._gauge.inc()

    def connection_closed(self) -> None:
        self.open_connections -= 1
        self._gauge.dec()

    def log(self, request: Any) -> None:
        """Twisted's access log hook: off."""


def metrics_site(probes: Mapping[str, Probe], timeout: float, clock: Any = None,
                 config: Any = None) -> GuardedSite:
    """A site serving ``/metrics`` and ``/healthz`` (anything else: 404), with ``config``'s HTTP limits."""
    root = _Root()
    root.putChild(b"metrics", metrics_resource())
    root.putChild(b"healthz", HealthResource(probes, timeout, clock))
    if config is None:
        return GuardedSite(root, "metrics")
    return GuardedSite.from_config(root, config, "metrics")


class ListenerService(service.Service):
    """Listens on an endpoint string in ``startService`` (fires once bound; fails if it cannot bind).

    twistd calls ``privilegedStartService`` on the whole tree before
    ``startService``, and ``strports.service`` binds there: its port would
    accept requests before the shared clients (earlier children) have
    started. This one binds in order, as the last children of a tree should.
    """

    log = Logger()

    def __init__(self, description: str, factory: Any, reactor: Any = None) -> None:
        self.description = description
        self.factory = factory
        self._reactor = reactor
        self.port: Any = None
        self.setName(description)

    def startService(self) -> defer.Deferred:  # noqa: N802 (Twisted API)
        from twisted.internet import endpoints

        super().startService()
        reactor = self._reactor
        if reactor is None:
            from twisted.internet import reactor
        d = endpoints.serverFromString(reactor, self.description).listen(self.factory)

        def bound(port: Any) -> None:
            self.port = port
            self.log.info("listening on {where} ({description})", where=str(port.getHost()),
                          description=self.description)

        return d.addCallback(bound)

    def stopService(self) -> Any:  # noqa: N802
        super().stopService()
        port, self.port = self.port, None
        if port is not None:
            return defer.maybeDeferred(port.stopListening)
        return None


def make_metrics_service(config: Any, probes: Mapping[str, Probe], clock: Any = None) -> service.MultiService:
    """The ``--metrics`` listeners of a daemon: one per endpoint in ``config.metrics`` (none: no child).

    Add it to the daemon's tree after the shared clients and before the
    client-facing listeners, so that health answers while clients drain.
    """
    from imcluster.service import AsyncMultiService

    listeners = AsyncMultiService("metrics")
    endpoints = list(getattr(config, "metrics", None) or [])
    if endpoints:
        site = metrics_site(probes, getattr(config, "health_timeout", 2.0), clock, config)
        for description in endpoints:
            ListenerService(description, site).setServiceParent(listeners)
    return listeners

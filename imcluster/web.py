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
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable, Mapping

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource, server

#: what /healthz calls the shared services (HTTP-API.md: "Redis, RabbitMQ and PostgreSQL")
REDIS, RABBITMQ, POSTGRESQL = "redis", "rabbitmq", "postgresql"

JSON_TYPE = b"application/json"

Probe = Callable[[], Any]


class DependencyDown(Exception):
    """A probe found its dependency unusable (the message says how)."""


def json_bytes(value: Any) -> bytes:
    """Compact UTF-8 JSON, as every imcluster HTTP answer is written."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


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


class QuietSite(server.Site):
    """A Site without an access log line per request (a scrape every few seconds would drown the log)."""

    def log(self, request: Any) -> None:
        pass


class NotFound(resource.Resource):
    """404 in the JSON error shape of HTTP-API.md."""

    isLeaf = True

    def render(self, request: Any) -> Any:
        write_json(request, 404, {"error": {"code": "not_found", "message": "no such resource"}})
        return server.NOT_DONE_YET


class _Root(resource.Resource):
    def getChild(self, path: bytes, request: Any) -> resource.Resource:  # noqa: N802 (Twisted API)
        return NotFound()

    def render(self, request: Any) -> Any:
        return NotFound().render(request)


def metrics_site(probes: Mapping[str, Probe], timeout: float, clock: Any = None) -> server.Site:
    """A site serving ``/metrics`` and ``/healthz`` (anything else: 404)."""
    root = _Root()
    root.putChild(b"metrics", metrics_resource())
    root.putChild(b"healthz", HealthResource(probes, timeout, clock))
    site = QuietSite(root)
    site.noisy = False
    site.displayTracebacks = False
    return site


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
        site = metrics_site(probes, getattr(config, "health_timeout", 2.0), clock)
        for description in endpoints:
            ListenerService(description, site).setServiceParent(listeners)
    return listeners

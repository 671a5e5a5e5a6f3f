"""imcluster.web: /healthz probes and the --metrics endpoint every daemon can serve."""

from __future__ import annotations

from types import SimpleNamespace

import pytest_twisted
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import Clock

from imcluster import metrics
from imcluster.bus import AMQPService
from imcluster.web import DependencyDown, dependency_probes, make_metrics_service, run_probes
from tests.support.cluster import endpoint, free_port
from tests.support.http import http_call, metric_value
from tests.support.ids import AMQP_URL


def outcome(d: defer.Deferred):
    out = []
    d.addBoth(out.append)
    return out


def test_probe_states():
    """Each probe's answer maps to up or down, and one slow dependency cannot hold /healthz past the bound."""
    clock = Clock()
    hanging = defer.Deferred()

    def raises():
        raise DependencyDown("not connected")

    probes = {
        "a": lambda: True,
        "b": lambda: defer.succeed("PONG"),
        "c": lambda: False,
        "d": raises,
        "e": lambda: defer.fail(ConnectionError("refused")),
        "f": lambda: hanging,
    }
    out = outcome(run_probes(probes, 2.0, clock))
    assert out == []
    clock.advance(2.0)
    ok, states = out[0]
    assert ok is False
    assert list(states) == list(probes)  # in the order given
    assert [states[k]["state"] for k in probes] == ["up", "up", "down", "down", "down", "down"]
    assert states["d"]["error"] == "not connected"
    assert states["e"]["error"] == "refused"
    assert states["f"]["error"] == "no answer within 2s"
    assert not clock.getDelayedCalls()
    out = outcome(run_probes({"a": lambda: True, "b": lambda: defer.succeed(None)}, 2.0, clock))
    assert out[0][0] is True and not clock.getDelayedCalls()


def test_no_metrics_endpoint_configured():
    """A daemon without --metrics opens no port."""
    svc = make_metrics_service(SimpleNamespace(metrics=[], health_timeout=1.0), {})
    assert list(svc) == []


class _Silent(protocol.Protocol):
    """Accepts a connection and never answers (a hung Redis)."""


@pytest_twisted.async_yield_fixture
async def silent_port():
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        protocol.Factory.forProtocol(_Silent))
    yield port.getHost().port
    await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_metrics_endpoint_on_real_services(redis_factory, bus_factory, pg, silent_port):
    """--metrics serves Prometheus text and a /healthz that says 200 only while Redis, RabbitMQ and PostgreSQL answer."""
    redis = await redis_factory()
    amqp = await bus_factory()
    port = free_port()
    probes = dependency_probes(redis=redis, amqp=amqp, postgres=pg)
    probes["gateway"] = lambda: True
    svc = make_metrics_service(SimpleNamespace(metrics=[endpoint(port)], health_timeout=1.0), probes)
    svc.startService()
    try:
        r = await http_call(port, "GET", "/healthz")
        assert r.status == 200, r.body
        assert r.json["ok"] is True and r.json["status"] == "ok"
        assert {k: v["state"] for k, v in r.json["dependencies"].items()} == {
            "redis": "up", "rabbitmq": "up", "postgresql": "up", "gateway": "up"}
        metrics.RECONNECTS.labels(service="web-test").inc(2)
        r = await http_call(port, "GET", "/metrics")
        assert r.status == 200 and r.header("content-type").startswith("text/plain")
        assert metric_value(r.text, "imcluster_reconnects_total", {"service": "web-test"}) >= 2
        assert "imcluster_messages_stored_total" in r.text
        for path in ("/nothing", "/", "/v1/sessions"):
            r = await http_call(port, "GET", path)
            assert r.status == 404 and r.error_code == "not_found", path

        # RabbitMQ gone (this daemon's connection stopped): 503 naming it, the others still up
        await amqp.stopService()
        r = await http_call(port, "GET", "/healthz")
        assert r.status == 503 and r.json["ok"] is False and r.json["status"] == "unavailable"
        deps = r.json["dependencies"]
        assert deps["rabbitmq"]["state"] == "down" and deps["rabbitmq"]["error"]
        assert deps["redis"]["state"] == "up" and deps["postgresql"]["state"] == "up"

        # a Redis that accepts but never answers: down within health_timeout, not a hung probe
        hung = await redis_factory(url=f"redis://127.0.0.1:{silent_port}/0", timeout=5.0)
        svc2_port = free_port()
        svc2 = make_metrics_service(SimpleNamespace(metrics=[endpoint(svc2_port)], health_timeout=0.5),
                                    dependency_probes(redis=hung, postgres=pg))
        svc2.startService()
        try:
            r = await http_call(svc2_port, "GET", "/healthz")
            assert r.status == 503
            assert r.json["dependencies"]["redis"] == {"state": "down", "error": "no answer within 0.5s"}
            assert r.json["dependencies"]["postgresql"]["state"] == "up"
        finally:
            await svc2.stopService()

        # PostgreSQL stopped: down at once
        await pg.stopService()
        r = await http_call(port, "GET", "/healthz")
        assert r.status == 503 and r.json["dependencies"]["postgresql"]["state"] == "down"
    finally:
        await svc.stopService()


@pytest_twisted.ensureDeferred
async def test_dependency_down_is_named(redis_factory):
    """A Redis that is not reachable shows as down by name (the operator sees which dependency)."""
    redis = await redis_factory(url=f"redis://127.0.0.1:{free_port()}/0", timeout=0.5)
    ok, states = await run_probes(dependency_probes(redis=redis), 1.0)
    assert ok is False and states == {"redis": {"state": "down", "error": "not connected"}}
    amqp = AMQPService(AMQP_URL, "imt-unused", publish_timeout=0.5)  # never started: not connected
    ok, states = await run_probes(dependency_probes(amqp=amqp), 1.0)
    assert ok is False and states["rabbitmq"]["state"] == "down"

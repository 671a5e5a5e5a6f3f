"""The router's held-back buffer, on the fakes and a Clock (issue 12 follow-up).

While a live gateway's queue is missing (a broker restart, the gateway's own
AMQP loss), deliveries routed to it are held back and published again, in
order, once a try is confirmed. The buffer is bounded by bytes and age and
forgets a gateway whose key is gone: PostgreSQL still has every undelivered
row, so dropping only delays (the gateway's re-sync and the sweep send them).
"""

from __future__ import annotations

import pytest_twisted
from twisted.internet import task

from imcluster.processor.router import Router
from imcluster.testing.bus import FakeBus
from imcluster.testing.registry import FakeRegistry

UUID = "gw-1"


def _setup(alive=True):
    clock = task.Clock()
    bus = FakeBus("imh", publish_timeout=5.0, clock=clock)
    bus.startService()
    registry = FakeRegistry("h:", clock=clock)
    registry.startService()
    if alive:
        registry.register_server(UUID, {"ip": "127.0.0.1", "port": 1}, 300)
    unroutable = []
    router = Router(registry, bus, clock=clock, on_unroutable=unroutable.append)
    return clock, bus, registry, router


def _queue_back(bus, uuid=UUID):
    """The gateway declares its queue again (what a reconnect does)."""
    bus.broker.declare_queue(bus.gateway_queue(uuid), None, bus.exchange)


def _published_to(bus, uuid=UUID):
    return [body for key, body, _m, _h in bus.published if key == bus.gateway_key(uuid)]


def _advance(clock, seconds, step=0.1):
    for _ in range(int(seconds / step)):
        clock.advance(step)


@pytest_twisted.ensureDeferred
async def test_held_deliveries_are_published_in_order_once_the_queue_is_back():
    clock, bus, _registry, router = _setup()
    for i in range(5):
        router.hold_back(UUID, b"delivery-%d" % i)
    assert router.held() == 5

    _advance(clock, 2)  # tries fail: the queue is still missing
    assert router.held() == 5
    assert _published_to(bus) == []

    _queue_back(bus)
    _advance(clock, 1)
    assert router.held() == 0
    assert _published_to(bus) == [b"delivery-%d" % i for i in range(5)]


@pytest_twisted.ensureDeferred
async def test_a_confirmed_retry_makes_an_unroutable_gateway_routable_again():
    clock, bus, _registry, router = _setup()
    router.mark_dead(UUID)
    assert router.is_dead(UUID)
    router.hold_back(UUID, b"x")
    _queue_back(bus)
    _advance(clock, 1)
    assert not router.is_dead(UUID), "the first confirmed publish ends the unroutable hold"


@pytest_twisted.ensureDeferred
async def test_deliveries_older_than_the_age_limit_are_dropped_not_sent():
    clock, bus, _registry, router = _setup()
    router.held_max_age = 3.0
    router.hold_back(UUID, b"old")
    _advance(clock, 2)
    router.hold_back(UUID, b"new")
    _advance(clock, 1.6)  # "old" is now 3.6 s old, "new" 1.6 s
    assert router.held() == 1
    _queue_back(bus)
    _advance(clock, 1)
    assert _published_to(bus) == [b"new"]


@pytest_twisted.ensureDeferred
async def test_a_gateway_whose_key_is_gone_is_forgotten():
    clock, bus, _registry, router = _setup(alive=False)
    router.hold_back(UUID, b"for a dead gateway")
    _queue_back(bus)  # even if a queue of that name answered, the gateway is dead
    _advance(clock, 1)
    assert router.held() == 0
    assert _published_to(bus) == []


@pytest_twisted.ensureDeferred
async def test_the_buffer_is_bounded_by_bytes_and_drops_the_oldest_first():
    clock, bus, registry, router = _setup()
    registry.register_server("gw-2", {"ip": "127.0.0.1", "port": 2}, 300)
    router.held_max_bytes = 100
    router.hold_back(UUID, b"a" * 40)
    clock.advance(0.01)
    router.hold_back("gw-2", b"b" * 40)
    clock.advance(0.01)
    router.hold_back(UUID, b"c" * 40)  # 120 bytes: the oldest (a) goes
    assert router.held() == 2
    assert router._held_bytes <= 100
    _queue_back(bus)
    _queue_back(bus, "gw-2")
    _advance(clock, 1)
    assert _published_to(bus) == [b"c" * 40]
    assert _published_to(bus, "gw-2") == [b"b" * 40]


@pytest_twisted.ensureDeferred
async def test_no_probe_runs_once_the_buffer_is_empty():
    clock, bus, _registry, router = _setup()
    router.hold_back(UUID, b"x")
    _queue_back(bus)
    _advance(clock, 1)
    assert router.held() == 0
    assert clock.getDelayedCalls() == [] or all(not c.active() for c in clock.getDelayedCalls())

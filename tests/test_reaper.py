"""The reaper: dead gateways' Redis entries go away, live ones stay (fake and real Redis)."""

from __future__ import annotations

import pytest_twisted
from twisted.internet import defer
from twisted.internet.task import Clock

from imcluster import metrics
from imcluster.processor.reaper import Reaper
from imcluster.testing import FakeRegistry

INFO = {"ip": "127.0.0.1", "port": 1, "tcpPort": 2, "startedAt": 0}


def test_dead_gateways_are_reaped_every_heartbeat_and_live_ones_kept():
    """A crashed gateway's users would look online for ever (or a live one's vanish)."""
    clock = Clock()
    reg = FakeRegistry("r:", clock=clock)
    reg.register_server("live", INFO, 100)
    reg.register_server("dead", INFO, 10)
    reg.add_connections("live", [("alice", "1.1.1.1", 1, {})])
    reg.add_connections("dead", [("alice", "1.1.1.1", 2, {}), ("bob", "1.1.1.1", 3, {})])
    reaper = Reaper(reg)
    loop = reaper.service(5.0, clock=clock)
    before = metrics.REAPED._value.get()
    loop.startService()
    assert reg.store.execute("HLEN", "r:UCIR##{alice}") == 2  # the dead one's key still exists
    clock.advance(5)
    assert reg.store.execute("HLEN", "r:UCIR##{alice}") == 2
    clock.advance(5)  # its key expired at 10 s
    assert reg.store.execute("HGETALL", "r:UCIR##{alice}") == ["live##1.1.1.1##1", "{}"]
    assert reg.store.keys("r:UCIR##{bob}") == [] and reg.store.keys("r:WSCONNS##{dead}") == []
    assert reg.store.execute("SMEMBERS", "r:WSSERVERS") == ["live"]
    assert metrics.REAPED._value.get() - before == 1
    reg.set_available(False)
    clock.advance(5)  # Redis down: the pass is skipped, the loop goes on
    reg.set_available(True)
    reg.register_server("dead2", INFO, 1)
    clock.advance(5)
    assert reg.store.execute("SMEMBERS", "r:WSSERVERS") == ["live"]
    loop.stopService()


def test_check_reaps_only_when_the_key_is_gone():
    """An unroutable publish during a broker restart would reap a live gateway."""
    clock = Clock()
    reg = FakeRegistry("r:", clock=clock)
    reg.register_server("gw", INFO, 10)
    reg.add_connections("gw", [("alice", "1.1.1.1", 1, {})])
    reaper = Reaper(reg)
    got = []
    reaper.check("gw").addCallback(got.append)
    clock.advance(11)
    reaper.check("gw").addCallback(got.append)
    reaper.check("gw").addCallback(got.append)
    assert got == [False, True, False]
    assert reg.store.keys("r:UCIR") == []


@pytest_twisted.ensureDeferred
async def test_several_reapers_on_real_redis_reap_each_gateway_once(redis_service, redis_peer):
    """Two processors reaping at once would double count, or leave entries behind."""
    await redis_service.register_server("dead", INFO, 0.2)
    await redis_service.register_server("live", INFO, 60)
    await redis_service.add_connections("dead", [(f"u{n}", "1.1.1.1", n, {}) for n in range(300)])
    await redis_service.add_connections("live", [("u1", "1.1.1.1", 9, {})])
    from twisted.internet import reactor, task
    await task.deferLater(reactor, 0.3, lambda: None)
    a, b = Reaper(redis_service), Reaper(redis_peer)
    results = await defer.gatherResults([a.run(), b.run(), a.check("dead")])
    assert sum(len(r) if isinstance(r, list) else int(r) for r in results) == 1
    conns = await redis_service.connections_of([f"u{n}" for n in range(300)])
    assert conns["u1"] == {"live##1.1.1.1##9": {}}
    assert all(not v for u, v in conns.items() if u != "u1")
    assert await redis_service.servers() == {"live"}

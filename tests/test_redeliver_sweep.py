"""The redelivery sweep on the fakes and a Clock (issue 12 follow-up).

The sweep sends ``message_send`` again for rows left undelivered to users
who are online, one processor at a time (a Redis lock), each row looked at
once (a cursor shared in Redis). Its PostgreSQL query has its own tests
(``stale_undelivered`` in the store contract); these pin the sweep's rules.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest_twisted
from twisted.internet import task

from imcluster.envelope import parse_deliveries
from imcluster.processor.redeliver import Redeliverer
from imcluster.processor.router import Router
from imcluster.store.base import Incoming
from imcluster.testing.bus import FakeBus
from imcluster.testing.registry import FakeRegistry
from imcluster.testing.store import FakeStore

CONFIG = SimpleNamespace(redeliver_interval=2.0, redeliver_age=3.0, redeliver_batch=100)
GW = "gw-sweep"


async def _world():
    clock = task.Clock()
    bus = FakeBus("imr", publish_timeout=5.0, clock=clock)
    bus.startService()
    bus.broker.declare_queue(bus.gateway_queue(GW), None, bus.exchange)
    registry = FakeRegistry("rs:", clock=clock)
    registry.startService()
    registry.register_server(GW, {"ip": "127.0.0.1", "port": 1}, 300)
    store = FakeStore()
    await store.create_session("alice", ["alice", "bob", "carol"], "s-1")
    stored = await store.store_messages([Incoming("alice", f"c-{i}", "s-1", {"text": f"m{i}"}) for i in range(3)])
    router = Router(registry, bus, clock=clock)
    return clock, bus, registry, store, router, stored


def _sent(bus):
    """(connection ids, frame) of every delivery published to the gateway."""
    out = []
    for key, body, _m, _h in bus.published:
        if key == bus.gateway_key(GW):
            for d in parse_deliveries(body):
                for frame in d.frames:
                    out.append((tuple(d.conn_ids), frame if isinstance(frame, dict) else json.loads(frame)))
    return out


@pytest_twisted.ensureDeferred
async def test_online_recipients_get_their_undelivered_rows_again_in_seq_order():
    _clock, bus, registry, _store, router, _stored = await _world()
    await registry.add_connections(GW, [("bob", "10.0.0.1", 5000, {"device": "web"})])
    sweep = Redeliverer(_store, router, CONFIG, clock=_clock)

    sent = await sweep.run_once()

    frames = [f for _c, f in _sent(bus)]
    assert sent == 3
    assert [f["seq"] for f in frames] == [1, 2, 3]
    assert all(f["type"] == "message_send" and f["sessionId"] == "s-1" for f in frames)
    # carol is offline: nothing for her (auth's sync sends hers)
    assert all(len(c) == 1 for c, _f in _sent(bus))


@pytest_twisted.ensureDeferred
async def test_each_row_is_looked_at_once():
    clock, bus, registry, store, router, _stored = await _world()
    await registry.add_connections(GW, [("bob", "10.0.0.1", 5000, {"device": "web"})])
    sweep = Redeliverer(store, router, CONFIG, clock=clock)
    assert await sweep.run_once() == 3
    clock.advance(5)  # the lock expired
    assert await sweep.run_once() == 0, "the shared cursor passed those rows"
    assert len(_sent(bus)) == 3


@pytest_twisted.ensureDeferred
async def test_one_processor_at_a_time():
    clock, bus, registry, store, router, _stored = await _world()
    await registry.add_connections(GW, [("bob", "10.0.0.1", 5000, {"device": "web"})])
    first = Redeliverer(store, router, CONFIG, clock=clock, owner="p1")
    second = Redeliverer(store, router, CONFIG, clock=clock, owner="p2")
    assert await first.run_once() == 3
    assert await second.run_once() == 0, "the other processor holds the lock"
    assert second.passes == 0


@pytest_twisted.ensureDeferred
async def test_the_cursor_is_shared_so_another_processor_goes_on_from_it():
    clock, bus, registry, store, router, _stored = await _world()
    await registry.add_connections(GW, [("bob", "10.0.0.1", 5000, {"device": "web"})])
    # a page of 2 rows: each message has 2 (bob online, carol offline)
    small = SimpleNamespace(redeliver_interval=2.0, redeliver_age=3.0, redeliver_batch=2)
    for owner in ("p1", "p2", "p1"):
        assert await Redeliverer(store, router, small, clock=clock, owner=owner).run_once() == 1
        clock.advance(5)
    assert [f["seq"] for _c, f in _sent(bus)] == [1, 2, 3], "each went on where the other stopped"


@pytest_twisted.ensureDeferred
async def test_an_unavailable_store_skips_the_pass_and_the_next_one_sends():
    clock, bus, registry, store, router, _stored = await _world()
    await registry.add_connections(GW, [("bob", "10.0.0.1", 5000, {"device": "web"})])
    sweep = Redeliverer(store, router, CONFIG, clock=clock)
    store.available = False
    assert await sweep.run_once() == 0
    store.available = True
    clock.advance(5)
    assert await sweep.run_once() == 3

"""RedisService.routes: a window's connections and live gateways in one round trip (real Redis)."""

from __future__ import annotations

import pytest_twisted

from imcluster.processor.router import Router
from imcluster.registry import conn_meta, server_info

UUID1 = "3f0c2a4e-0000-4000-8000-000000000001"
UUID2 = "3f0c2a4e-0000-4000-8000-000000000002"
UUID3 = "3f0c2a4e-0000-4000-8000-000000000003"
INFO = server_info("10.0.0.9", 8080, 8081, 1764160000)
META = conn_meta("d", 1764160000, 1764163600)


class TwoTrips:
    """The same registry without ``routes``: the Router falls back to connections_of + alive."""

    def __init__(self, registry):
        self.connections_of = registry.connections_of
        self.alive = registry.alive


async def _cluster(registry) -> None:
    for uuid in (UUID1, UUID2, UUID3):
        await registry.register_server(uuid, INFO, 300)
    await registry.add_connections(UUID1, [("alice", "10.0.0.1", 1, META), ("bob", "10.0.0.1", 2, META)])
    await registry.add_connections(UUID2, [("alice", "10.0.0.2", 3, META)])
    # UUID2 died: its key expired, its connections are still listed
    await registry.execute("DEL", registry.keys.server(UUID2))
    # a field that names no gateway (not written by a gateway): never routed to
    await registry.execute("HSET", registry.keys.ucir("carol"), "junk", "{}")


@pytest_twisted.ensureDeferred
async def test_routes_equal_connections_of_then_alive(redis_service):
    """A processor using the one-trip lookup would route differently than with two trips."""
    await _cluster(redis_service)
    users = ["alice", "bob", "carol", "nobody", "alice"]
    conns, alive = await redis_service.routes(users, [UUID3, "never-seen"])
    assert conns == await redis_service.connections_of(users)
    assert alive == {UUID1, UUID3}
    assert await redis_service.routes([], []) == ({}, set())
    assert await redis_service.routes([], [UUID1, UUID2]) == ({}, {UUID1})
    assert await redis_service.routes(["nobody"]) == ({"nobody": {}}, set())


@pytest_twisted.ensureDeferred
async def test_router_lookup_same_with_one_or_two_trips(redis_service):
    """Deliveries would go to a dead gateway, or miss a live one, with the one-trip lookup."""
    await _cluster(redis_service)
    one = await Router(redis_service, None).lookup(["alice", "bob", "carol", "nobody"], [UUID3])
    two = await Router(TwoTrips(redis_service), None).lookup(["alice", "bob", "carol", "nobody"], [UUID3])
    assert one == two
    assert one.usable == {UUID1, UUID3}
    assert one.conns == {"alice": [(UUID1, f"{UUID1}##10.0.0.1##1")], "bob": [(UUID1, f"{UUID1}##10.0.0.1##2")]}

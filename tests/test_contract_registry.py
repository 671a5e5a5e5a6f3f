"""The registry contract: one suite over FakeRegistry and the real RedisService.

Key names and value shapes are checked with raw commands (``execute``), the
way an operator or another implementation would read Redis.
"""

from __future__ import annotations

import json
import time

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor, task
from zope.interface.verify import verifyObject

from imcluster.interfaces import IRegistry
from imcluster.processor.router import Router
from imcluster.registry import (
    RedisKeys,
    RedisService,
    RegistryUnavailable,
    ResponseError,
    conn_meta,
    server_info,
)
from imcluster.testing import FakeRegistry
from tests.support.redis import delete_prefix

UUID1 = "3f0c2a4e-0000-4000-8000-000000000001"
UUID2 = "3f0c2a4e-0000-4000-8000-000000000002"
INFO = server_info("10.0.0.9", 8080, 8081, 1764160000)


@pytest.fixture(params=["fake", "real", pytest.param("sharded", marks=pytest.mark.slow)])
def registry(request, redis_prefix):
    """The registry under test: the fake, a started RedisService on this test's prefix, or one
    over two private Redis primaries (client-side sharding by hash tag; slow: it starts them)."""
    if request.param == "fake":
        return FakeRegistry(redis_prefix)
    if request.param == "sharded":
        return request.getfixturevalue("sharded_redis_service")
    return request.getfixturevalue("redis_service")


@pytest.fixture
def peer(request, registry):
    """A second registry on the same data: another processor racing the first."""
    if isinstance(registry, FakeRegistry):
        return FakeRegistry(registry.prefix, store=registry.store)
    if len(registry.nodes) > 1:
        return request.getfixturevalue("sharded_redis_peer")
    return request.getfixturevalue("redis_peer")


async def lose_data(registry) -> None:
    """Redis lost our data: delete every key under our prefix (never FLUSHALL)."""
    if isinstance(registry, FakeRegistry):
        registry.flush()
    else:
        await delete_prefix(registry, registry.prefix)


async def hgetall(registry, key) -> dict:
    flat = await registry.execute("HGETALL", key)
    return dict(zip(flat[::2], flat[1::2]))


def meta(device, n=0):
    return conn_meta(device, 1764160000 + n, 1764163600 + n)


# --- key layout (no I/O)


def test_key_names_follow_the_architecture():
    """Gateways and processors built elsewhere would not find each other's keys."""
    k = RedisKeys("p:")
    # the seed's names, with the hash tag that puts a gateway's keys (and a user's) on one shard
    assert k.server("u1") == "p:WSSERVER_{u1}"
    assert k.servers() == "p:WSSERVERS"
    assert k.ucir("alice") == "p:UCIR##{alice}"
    assert k.wsconns("u1") == "p:WSCONNS##{u1}"
    assert (k.redeliver_lock(), k.redeliver_cursor()) == ("p:REDELIVER_LOCK", "p:REDELIVER_CURSOR")
    assert k.user_key("PRESENCE##", "alice") == "p:PRESENCE##{alice}"
    head, tail = k.server_parts()
    assert head + "u1" + tail == k.server("u1")
    assert k.conn_field("u1", "10.0.0.1", 5000) == "u1##10.0.0.1##5000"
    assert k.conn_field("u1", "2001:db8::1", "5000") == "u1##2001:db8::1##5000"
    assert k.wsconns_member("a.b@c-d_e", "::1", 7) == "a.b@c-d_e##::1##7"
    assert RedisKeys().server("u1") == "WSSERVER_{u1}"
    with pytest.raises(ValueError):
        RedisKeys("a{b}:")  # the prefix would be every key's hash tag


def test_key_parsers_round_trip_and_reject_garbage():
    """A connId or WSCONNS member would be mis-split, and deliveries go to the wrong socket."""
    k = RedisKeys("p:")
    assert k.parse_conn_field(k.conn_field("u1", "2001:db8::1", 443)) == ("u1", "2001:db8::1", 443)
    assert k.parse_wsconns_member(k.wsconns_member("alice", "10.0.0.1", 9)) == ("alice", "10.0.0.1", 9)
    for bad in ("u1##10.0.0.1", "u1##10.0.0.1##x", "##1.2.3.4##5", "a##b##c##5", ""):
        with pytest.raises(ValueError):
            k.parse_conn_field(bad)
    with pytest.raises(ValueError):
        k.wsconns_member("al#ice", "10.0.0.1", 1)
    with pytest.raises(ValueError):
        k.conn_field("u#1", "10.0.0.1", 1)


# --- the contract, on both implementations


def test_provides_iregistry(registry):
    """A registry missing a method would break a gateway or processor only at run time."""
    assert verifyObject(IRegistry, registry)


@pytest_twisted.ensureDeferred
async def test_register_server_writes_json_key_with_ttl_and_set_member(registry):
    """The reaper would treat a live gateway as dead, or never find a dead one."""
    k = registry.keys
    await registry.register_server(UUID1, INFO, 300)
    assert json.loads(await registry.execute("GET", k.server(UUID1))) == {
        "ip": "10.0.0.9", "port": 8080, "tcpPort": 8081, "startedAt": 1764160000}
    assert 299_000 < await registry.execute("PTTL", k.server(UUID1)) <= 300_000
    assert await registry.execute("SMEMBERS", k.servers()) == [UUID1]
    assert await registry.servers() == {UUID1}
    assert await registry.alive([UUID1, UUID2]) == {UUID1}


@pytest_twisted.ensureDeferred
async def test_add_connections_writes_ucir_fields_and_wsconns_members(registry):
    """Processors would not find where a user is connected, or route to the wrong socket."""
    k = registry.keys
    await registry.add_connections(UUID1, [
        ("alice", "10.0.0.1", 5000, meta("web")),
        ("alice", "2001:db8::1", 5001, meta("ios", 1)),
        ("bob", "10.0.0.2", 6000, meta(None, 2)),
    ])
    alice = await hgetall(registry, k.ucir("alice"))
    assert {f: json.loads(v) for f, v in alice.items()} == {
        f"{UUID1}##10.0.0.1##5000": {"device": "web", "authedAt": 1764160000, "exp": 1764163600},
        f"{UUID1}##2001:db8::1##5001": {"device": "ios", "authedAt": 1764160001, "exp": 1764163601},
    }
    bob = await hgetall(registry, k.ucir("bob"))
    assert {f: json.loads(v) for f, v in bob.items()} == {
        f"{UUID1}##10.0.0.2##6000": {"device": None, "authedAt": 1764160002, "exp": 1764163602}}
    assert set(await registry.execute("SMEMBERS", k.wsconns(UUID1))) == {
        "alice##10.0.0.1##5000", "alice##2001:db8::1##5001", "bob##10.0.0.2##6000"}
    assert await registry.connections_of(["alice"]) == {"alice": {
        f"{UUID1}##10.0.0.1##5000": meta("web"), f"{UUID1}##2001:db8::1##5001": meta("ios", 1)}}


@pytest_twisted.ensureDeferred
async def test_bad_user_id_writes_nothing(registry):
    """A '#' in a user id would corrupt WSCONNS members and the reaper would delete the wrong fields."""
    with pytest.raises(ValueError):
        await registry.add_connections(UUID1, [("ok", "10.0.0.1", 1, meta("a")), ("b#d", "10.0.0.1", 2, {})])
    assert await registry.execute("EXISTS", registry.keys.ucir("ok"), registry.keys.wsconns(UUID1)) == 0


@pytest_twisted.ensureDeferred
async def test_remove_connections_removes_only_the_named_ones(registry):
    """A disconnect would drop a user's other devices from routing, or leave ghosts behind."""
    k = registry.keys
    await registry.add_connections(UUID1, [("alice", "10.0.0.1", 1, meta("a")), ("bob", "10.0.0.2", 2, meta("b")),
                                           ("carol", "10.0.0.3", 3, meta("c"))])
    await registry.add_connections(UUID2, [("alice", "10.0.0.4", 4, meta("d"))])
    await registry.remove_connections(UUID1, [("alice", "10.0.0.1", 1), ("bob", "10.0.0.2", 2, "extra ignored")])
    assert list(await hgetall(registry, k.ucir("alice"))) == [f"{UUID2}##10.0.0.4##4"]
    assert await registry.execute("EXISTS", k.ucir("bob")) == 0  # an empty hash is gone
    assert await registry.execute("SMEMBERS", k.wsconns(UUID1)) == ["carol##10.0.0.3##3"]
    assert await registry.execute("SMEMBERS", k.wsconns(UUID2)) == ["alice##10.0.0.4##4"]
    await registry.remove_connections(UUID1, [])  # nothing to do, no error


@pytest_twisted.ensureDeferred
async def test_connections_of_many_users_including_unknown(registry):
    """Group deliveries would miss online members or fail on offline ones."""
    online = [f"user{i}" for i in range(0, 60, 2)]
    await registry.add_connections(UUID1, [(u, "10.0.0.1", 1000 + i, meta(u)) for i, u in enumerate(online)])
    await registry.add_connections(UUID2, [("user0", "10.0.0.2", 7, meta("second"))])
    asked = [f"user{i}" for i in range(60)] + ["user0", "nobody"]
    found = await registry.connections_of(asked)
    assert set(found) == set(asked)
    for i in range(60):
        u = f"user{i}"
        if i % 2:
            assert found[u] == {}
        else:
            assert found[u][f"{UUID1}##10.0.0.1##{1000 + i // 2}"] == meta(u)
    assert found["user0"][f"{UUID2}##10.0.0.2##7"] == meta("second")
    assert found["nobody"] == {}
    assert await registry.connections_of([]) == {}


@pytest_twisted.ensureDeferred
async def test_alive_is_the_subset_whose_key_exists(registry):
    """Deliveries would keep going to a dead gateway, or stop going to a live one."""
    await registry.register_server(UUID1, INFO, 300)
    await registry.register_server(UUID2, INFO, 300)
    await registry.execute("DEL", registry.keys.server(UUID2))
    assert await registry.alive([UUID1, UUID2, "never-seen"]) == {UUID1}
    assert await registry.alive([]) == set()


async def _routed_cluster(registry) -> None:
    """Three gateways, one of them dead with its connections still listed, and a junk field."""
    uuid3 = "3f0c2a4e-0000-4000-8000-000000000003"
    for uuid in (UUID1, UUID2, uuid3):
        await registry.register_server(uuid, INFO, 300)
    await registry.add_connections(UUID1, [("alice", "10.0.0.1", 1, meta("a")), ("bob", "10.0.0.1", 2, meta("b"))])
    await registry.add_connections(UUID2, [("alice", "10.0.0.2", 3, meta("c"))])
    await registry.execute("DEL", registry.keys.server(UUID2))  # UUID2 died: its key expired
    # a field that names no gateway (not written by a gateway): never routed to
    await registry.execute("HSET", registry.keys.ucir("carol"), "junk", "{}")


@pytest_twisted.ensureDeferred
async def test_routes_are_connections_of_and_alive_in_one_call(registry):
    """A processor would route differently with the one-trip lookup than with connections_of and alive."""
    await _routed_cluster(registry)
    uuid3 = "3f0c2a4e-0000-4000-8000-000000000003"
    users = ["alice", "bob", "carol", "nobody", "alice"]
    conns, alive = await registry.routes(users, [uuid3, "never-seen"])
    assert conns == await registry.connections_of(users)
    assert alive == await registry.alive([UUID1, UUID2, uuid3, "never-seen"]) == {UUID1, uuid3}
    assert await registry.routes([], []) == ({}, set())
    assert await registry.routes([], [UUID1, UUID2]) == ({}, {UUID1})
    assert await registry.routes(["nobody"]) == ({"nobody": {}}, set())


@pytest_twisted.ensureDeferred
async def test_router_lookup_skips_dead_gateways(registry):
    """Deliveries would go to a dead gateway's ghosts, or miss a live gateway."""
    await _routed_cluster(registry)
    uuid3 = "3f0c2a4e-0000-4000-8000-000000000003"
    found = await Router(registry, None, clock=task.Clock()).lookup(["alice", "bob", "carol", "nobody"], [uuid3])
    assert found.usable == {UUID1, uuid3}
    assert found.conns == {"alice": [(UUID1, f"{UUID1}##10.0.0.1##1")], "bob": [(UUID1, f"{UUID1}##10.0.0.1##2")]}


@pytest_twisted.ensureDeferred
async def test_reap_never_touches_a_live_gateway(registry):
    """Users of a healthy gateway would stop receiving messages."""
    k = registry.keys
    await registry.register_server(UUID1, INFO, 300)
    await registry.add_connections(UUID1, [("alice", "10.0.0.1", 1, meta("a"))])
    assert await registry.reap_server(UUID1) is False
    assert list(await hgetall(registry, k.ucir("alice"))) == [f"{UUID1}##10.0.0.1##1"]
    assert await registry.execute("SMEMBERS", k.wsconns(UUID1)) == ["alice##10.0.0.1##1"]
    assert await registry.servers() == {UUID1}


@pytest_twisted.ensureDeferred
async def test_reap_removes_exactly_a_dead_gateways_entries(registry):
    """A dead gateway's ghosts would be routed to forever, or a live one's entries removed."""
    k = registry.keys
    await registry.register_server(UUID1, INFO, 300)
    await registry.register_server(UUID2, INFO, 300)
    await registry.add_connections(UUID1, [("alice", "10.0.0.1", 1, meta("a")), ("bob", "::1", 2, meta("b"))])
    await registry.add_connections(UUID2, [("alice", "10.0.0.2", 3, meta("c"))])
    await registry.execute("DEL", k.server(UUID1))  # what expiry does
    assert await registry.reap_server(UUID1) is True
    assert list(await hgetall(registry, k.ucir("alice"))) == [f"{UUID2}##10.0.0.2##3"]
    assert await registry.execute("EXISTS", k.ucir("bob"), k.wsconns(UUID1)) == 0
    assert await registry.servers() == {UUID2}
    assert await registry.execute("SMEMBERS", k.wsconns(UUID2)) == ["alice##10.0.0.2##3"]
    assert await registry.reap_server(UUID1) is False  # nothing left to reap


@pytest_twisted.ensureDeferred
async def test_reap_in_chunks_removes_everything(registry):
    """A big gateway's reap would stop half way and leave ghosts."""
    registry.batch = 3
    entries = [(f"u{i}", "10.0.0.1", i, meta("x")) for i in range(10)]
    await registry.register_server(UUID1, INFO, 300)
    await registry.add_connections(UUID1, entries)
    await registry.execute("DEL", registry.keys.server(UUID1))
    assert await registry.reap_server(UUID1) is True
    assert await registry.connections_of([e[0] for e in entries]) == {e[0]: {} for e in entries}
    assert await registry.execute("EXISTS", registry.keys.wsconns(UUID1)) == 0
    assert await registry.servers() == set()


@pytest_twisted.ensureDeferred
async def test_concurrent_reaps_of_one_gateway_one_wins(registry, peer):
    """Two processors would both count the reap, or leave a half-reaped gateway."""
    registry.batch = peer.batch = 40
    users = [f"u{i}" for i in range(200)]
    await registry.register_server(UUID1, INFO, 300)
    await registry.register_server(UUID2, INFO, 300)
    await registry.add_connections(UUID1, [(u, "10.0.0.1", i, meta("x")) for i, u in enumerate(users)])
    await registry.add_connections(UUID2, [("u0", "10.0.0.2", 1, meta("y"))])
    await registry.execute("DEL", registry.keys.server(UUID1))
    results = await defer.gatherResults([registry.reap_server(UUID1), peer.reap_server(UUID1)])
    assert sorted(results) == [False, True]
    found = await peer.connections_of(users)
    assert found.pop("u0") == {f"{UUID2}##10.0.0.2##1": meta("y")}
    assert all(v == {} for v in found.values())
    assert await registry.servers() == {UUID2}
    assert await registry.execute("EXISTS", registry.keys.wsconns(UUID1)) == 0


@pytest_twisted.ensureDeferred
async def test_unregister_removes_everything_of_one_gateway(registry):
    """A stopped gateway's users would look online, or another gateway's users offline."""
    k = registry.keys
    await registry.register_server(UUID1, INFO, 300)
    await registry.register_server(UUID2, INFO, 300)
    await registry.add_connections(UUID1, [("alice", "10.0.0.1", 1, meta("a")), ("bob", "10.0.0.1", 2, meta("b"))])
    await registry.add_connections(UUID2, [("alice", "10.0.0.2", 3, meta("c"))])
    assert await registry.unregister_server(UUID1) == 2
    assert await registry.execute("EXISTS", k.server(UUID1), k.wsconns(UUID1), k.ucir("bob")) == 0
    assert await registry.servers() == {UUID2}
    assert await registry.connections_of(["alice"]) == {"alice": {f"{UUID2}##10.0.0.2##3": meta("c")}}
    assert await registry.alive([UUID1, UUID2]) == {UUID2}


@pytest_twisted.ensureDeferred
async def test_refresh_keeps_the_key_and_detects_data_loss(registry):
    """After Redis loses its data a gateway would stay invisible and its users unreachable."""
    k = registry.keys
    await registry.register_server(UUID1, INFO, 300)
    await registry.execute("PEXPIRE", k.server(UUID1), 5000)
    assert await registry.refresh_server(UUID1, INFO, 300) is True
    assert await registry.execute("PTTL", k.server(UUID1)) > 299_000
    await lose_data(registry)
    assert await registry.servers() == set()
    assert await registry.refresh_server(UUID1, INFO, 300) is False
    assert json.loads(await registry.execute("GET", k.server(UUID1))) == INFO
    assert 299_000 < await registry.execute("PTTL", k.server(UUID1)) <= 300_000
    assert await registry.servers() == {UUID1}
    assert await registry.refresh_server(UUID1, INFO, 300) is True


@pytest_twisted.ensureDeferred
async def test_execute_and_pipeline_report_redis_errors(registry):
    """A failing command would be silently taken for a success."""
    k = registry.keys
    await registry.execute("SET", k.server("x"), "v")
    with pytest.raises(ResponseError):
        await registry.execute("HGETALL", k.server("x"))  # WRONGTYPE
    with pytest.raises(ResponseError):
        await registry.pipeline([("SADD", k.servers(), "a"), ("HGETALL", k.server("x"))])
    assert await registry.servers() == {"a"}  # a pipeline is not a transaction
    assert await registry.pipeline([("GET", k.server("x")), ("SCARD", k.servers())]) == ["v", 1]
    assert await registry.pipeline([]) == []


# --- fake only


@pytest_twisted.ensureDeferred
async def test_fake_ttl_expires_on_its_clock():
    """Gateway/processor unit tests could not exercise expiry and reaping."""
    clock = task.Clock()
    reg = FakeRegistry("p:", clock=clock)
    await reg.register_server(UUID1, INFO, 300)
    await reg.add_connections(UUID1, [("alice", "10.0.0.1", 1, meta("a"))])
    clock.advance(299)
    assert await reg.alive([UUID1]) == {UUID1}
    assert await reg.reap_server(UUID1) is False
    clock.advance(2)
    assert await reg.alive([UUID1]) == set()
    assert await reg.reap_server(UUID1) is True
    assert await reg.connections_of(["alice"]) == {"alice": {}}


@pytest_twisted.ensureDeferred
async def test_fake_outage_and_reconnect_listeners():
    """Gateway unit tests could not exercise a Redis outage and the re-registration after it."""
    reg = FakeRegistry("p:")
    fired = []
    reg.add_reconnect_listener(lambda: fired.append(reg.connected))
    reg.set_available(False)
    with pytest.raises(TimeoutError, match="register_server"):
        await reg.register_server(UUID1, INFO, 300)
    reg.set_available(True)
    await reg.register_server(UUID1, INFO, 300)
    await reg.simulate_reconnect(lose_data=True)
    assert fired == [True] and reg.reconnects == 1
    assert await reg.refresh_server(UUID1, INFO, 300) is False


# --- real Redis only


@pytest_twisted.ensureDeferred
async def test_real_ttl_expires(redis_service):
    """A crashed gateway would never be reaped: its key would not expire."""
    await redis_service.register_server(UUID1, INFO, 0.15)
    await redis_service.add_connections(UUID1, [("alice", "10.0.0.1", 1, meta("a"))])
    assert await redis_service.alive([UUID1]) == {UUID1}
    await task.deferLater(reactor, 0.3, lambda: None)
    assert await redis_service.alive([UUID1]) == set()
    assert await redis_service.reap_server(UUID1) is True
    assert await redis_service.connections_of(["alice"]) == {"alice": {}}


@pytest_twisted.ensureDeferred
async def test_recovers_after_its_connection_is_killed(redis_service):
    """After a Redis restart or failover the daemon would stay cut off, or never re-register."""
    svc = redis_service
    reconnected = defer.Deferred()
    svc.add_reconnect_listener(lambda: reconnected.called or reconnected.callback(None))
    client_id = await svc.execute("CLIENT", "ID")
    assert await svc.execute("CLIENT", "KILL", "ID", client_id, "SKIPME", "no") == 1  # closed after the reply
    # wait until it noticed, then a command sent while disconnected waits for the reconnect
    for _ in range(200):
        if not svc.connected:
            break
        await task.deferLater(reactor, 0.01, lambda: None)
    assert not svc.connected
    assert await svc.execute("PING") == "PONG"
    await reconnected
    assert svc.connected and svc.reconnects == 1
    assert await svc.execute("CLIENT", "ID") != client_id
    await svc.register_server(UUID1, INFO, 300)
    assert await svc.alive([UUID1]) == {UUID1}


@pytest_twisted.ensureDeferred
async def test_unreachable_redis_fails_within_the_timeout(redis_factory):
    """With Redis down, a gateway would hang on every Redis call instead of failing."""
    t0 = time.monotonic()
    svc = await redis_factory("redis://127.0.0.1:1/0", timeout=0.3)  # starting does not hang either
    assert not svc.connected
    with pytest.raises(TimeoutError, match="PING"):
        await svc.execute("PING")
    with pytest.raises(TimeoutError, match="script refresh_server"):
        await svc.refresh_server(UUID1, INFO, 300)
    with pytest.raises(TimeoutError, match="script hgetall_many"):
        await svc.connections_of(["alice"])
    assert not svc._waiters  # timed-out callers do not pile up during an outage
    await svc.stopService()
    assert time.monotonic() - t0 < 2.5
    with pytest.raises(RegistryUnavailable):  # the registry's own outage error, for every caller
        await svc.execute("PING")


class _Silent(protocol.Protocol):
    """A 'Redis' that accepts connections and never answers."""

    def connectionMade(self):  # noqa: N802
        self.factory.conns.append(self)


@pytest.mark.parametrize("password", [None, "pw"])
@pytest_twisted.ensureDeferred
async def test_unanswered_command_times_out_and_drops_the_link(redis_factory, password):
    """A half-open link (Redis host gone silent) would stall every later command forever."""
    factory = protocol.Factory.forProtocol(_Silent)
    factory.conns = []
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        svc = await redis_factory(f"redis://127.0.0.1:{port.getHost().port}", timeout=0.3, password=password)
        # without a password the link is usable at once; with one, AUTH never returns
        assert svc.connected is (password is None)
        with pytest.raises(TimeoutError, match="PING got no reply" if password is None else "not connected"):
            await svc.execute("PING")
        for _ in range(300):  # dropped, then a fresh connection after the backoff
            if len(factory.conns) >= 2:
                break
            await task.deferLater(reactor, 0.01, lambda: None)
        assert len(factory.conns) >= 2
        assert not factory.conns[0].transport.connected
        await svc.stopService()
    finally:
        for c in factory.conns:
            c.transport.abortConnection()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_command_in_flight_fails_at_once_when_the_link_drops(redis_factory):
    """A caller would wait the whole timeout, or forever, for a reply that can no longer come."""
    factory = protocol.Factory.forProtocol(_Silent)
    factory.conns = []
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        svc = await redis_factory(f"redis://127.0.0.1:{port.getHost().port}", timeout=2.0)
        d = svc.execute("PING")
        t0 = time.monotonic()
        factory.conns[0].transport.abortConnection()
        with pytest.raises(RegistryUnavailable, match="PING"):
            await d
        assert time.monotonic() - t0 < 0.5
        await svc.stopService()
    finally:
        for c in factory.conns:
            c.transport.abortConnection()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_stop_is_bounded_and_final(redis_factory):
    """A daemon's shutdown would hang on its Redis client, or the client would keep reconnecting."""
    svc = await redis_factory(timeout=0.5)
    t0 = time.monotonic()
    await svc.stopService()
    assert time.monotonic() - t0 < 0.6
    assert not svc.connected
    with pytest.raises(RegistryUnavailable):  # the registry's own outage error, for every caller
        await svc.execute("PING")


def test_from_config_and_url():
    """The --redis, --redis-prefix, --redis-timeout, --redis-password options would be ignored."""
    from imcluster.config import OPTIONS_BY_NAME

    class Conf:
        redis = "redis://user:pw%40x@redis.example:6380/3"
        redis_prefix = "c1:"
        redis_timeout = 1.5
        redis_password = None
        redis_batch = OPTIONS_BY_NAME["redis_batch"].default

    svc = RedisService.from_config(Conf())
    assert (svc.host, svc.port, svc.dbid, svc.username, svc.password) == ("redis.example", 6380, 3, "user", "pw@x")
    assert (svc.prefix, svc.timeout, svc.batch) == ("c1:", 1.5, 1000)
    assert svc.keys.server("u") == "c1:WSSERVER_{u}"
    Conf.redis_password = "secret"
    assert RedisService.from_config(Conf()).password == "secret"
    plain = RedisService("redis://127.0.0.1:6379/0")
    assert (plain.dbid, plain.password, plain.username, plain.tls) == (None, None, None, False)
    assert RedisService("rediss://h").tls
    with pytest.raises(ValueError):
        RedisService("http://h")


@pytest_twisted.ensureDeferred
async def test_connections_of_1000_users_in_one_call(redis_service):
    """Routing a message to a 1000-member group would take many round trips."""
    users = [f"member{i}" for i in range(1000)]
    entries = [(u, "10.0.0.1", i, meta("web")) for i, u in enumerate(users)]
    entries += [(u, "10.0.0.2", i, meta("ios")) for i, u in enumerate(users[::3])]
    await redis_service.add_connections(UUID1, entries)
    await redis_service.connections_of(users[:10])  # warm up
    t0 = time.perf_counter()
    found = await redis_service.connections_of(users + ["ghost"])
    elapsed = time.perf_counter() - t0
    assert found["ghost"] == {}
    assert sum(len(v) for v in found.values()) == len(entries)
    assert len(found["member0"]) == 2 and len(found["member1"]) == 1
    print(f"\nconnections_of(1001 users, {len(entries)} connections): {elapsed * 1000:.1f} ms")
    assert elapsed < 1.0


# --- revocations (HTTP-API.md revoke; docs/internals.rst REVOKED##<user>)


@pytest_twisted.ensureDeferred
async def test_registration_reads_the_revocation_in_the_same_round_trip(registry):
    """A gateway registering a connection learns the user's revocation without a round trip of its own."""
    meta = conn_meta("web", 1764160000, 1764163600)
    assert await registry.add_connections_checked(UUID1, [("alice", "10.0.0.1", 1, meta)]) == {"alice": None}
    fields = await registry.revoke("alice", 1764160000123, 60)
    assert fields == {f"{UUID1}##10.0.0.1##1": meta}  # the revoke sees who is connected
    assert await registry.revocation("alice") == 1764160000123
    got = await registry.add_connections_checked(UUID2, [("alice", "10.0.0.2", 2, meta), ("bob", "10.0.0.3", 3, meta)])
    assert got == {"alice": 1764160000123, "bob": None}
    assert await registry.execute("GET", registry.keys.revoked("alice")) == "1764160000123"
    ttl = await registry.execute("PTTL", registry.keys.revoked("alice"))
    assert 0 < ttl <= 60000
    # and the connection was registered all the same (the gateway takes it back when refusing)
    assert set((await registry.connections_of(["alice"]))["alice"]) == {f"{UUID1}##10.0.0.1##1", f"{UUID2}##10.0.0.2##2"}

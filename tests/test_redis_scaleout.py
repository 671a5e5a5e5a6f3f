"""Issue 18, Redis part: Sentinel failover and client-side sharding (ARCHITECTURE.md "Scale-out").

Private Redis instances only (tests/support/private.py): two primaries for
sharding, or a primary, its replica and three Sentinels (the tests that start
them are marked slow; each takes a second or a few). The ones with real
gateways and processors under load are in tests/test_redis_scaleout_cluster.py.
"""

from __future__ import annotations

import time

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

from imcluster.config import GATEWAY, ConfigError, load_config
from imcluster.registry import (
    REFRESH_SCRIPT,
    RedisService,
    RegistryUnavailable,
    hash_tag,
    parse_redis_urls,
    server_info,
    split_redis_urls,
)
from tests.support.private import redis_cli

UUID1 = "3f0c2a4e-0000-4000-8000-000000000001"
INFO = server_info("10.0.0.9", 8080, 8081, 1764160000)


def meta(n=0):
    return {"device": "d", "authedAt": 1764160000 + n, "exp": 1764163600 + n}


async def _sleep(s: float) -> None:
    await task.deferLater(reactor, s, lambda: None)


# --- --redis values (no I/O)


def test_redis_urls_shards_and_sentinel():
    """A sharded or Sentinel --redis would be refused, or split into the wrong shards."""
    assert split_redis_urls("redis://a:6379/0,redis://b:6380/0") == ["redis://a:6379/0", "redis://b:6380/0"]
    assert split_redis_urls(["redis://a:6379/0", "redis://b:6380/0"]) == ["redis://a:6379/0", "redis://b:6380/0"]
    both = "redis+sentinel://s1:26379,s2,s3:26381/m1,redis+sentinel://:pw@s1:26379,s2:26380/m2/3?sentinel_password=sp"
    a, b = parse_redis_urls(both)
    assert (a.master, a.sentinels, a.dbid, a.password) == ("m1", (("s1", 26379), ("s2", 26379), ("s3", 26381)), None, None)
    assert (b.master, b.sentinels, b.dbid, b.password, b.sentinel_password) == (
        "m2", (("s1", 26379), ("s2", 26380)), 3, "pw", "sp")
    assert (a.name, b.name) == ("m1", "m2")  # the ring follows the master's name, not its address
    assert "pw" not in b.url
    direct = parse_redis_urls("redis://u:p@h:7000/2")[0]
    assert (direct.name, direct.dbid, direct.username, direct.password) == ("h:7000", 2, "u", "p")
    for bad in ("redis://a,b", "http://a", "redis+sentinel://a:1", "redis://a:1/0,redis://a:1/0", "s1:26379"):
        with pytest.raises(ValueError):
            parse_redis_urls(bad)


def test_config_takes_several_redis_urls(tmp_path):
    """--redis given twice, or as a TOML list, would be refused or keep only one shard."""
    c = load_config(GATEWAY, {"redis": ["redis://a:6379/0", "redis://b:6380/0"], "jwt_secret": "s"}, environ={})
    assert c.redis == "redis://a:6379/0,redis://b:6380/0"
    f = tmp_path / "c.toml"
    f.write_text('redis = ["redis://a:6379/0", "redis+sentinel://s1:26379,s2:26379/m"]\njwt_secret = "s"\n')
    assert load_config(GATEWAY, {}, str(f), environ={}).redis == "redis://a:6379/0,redis+sentinel://s1:26379,s2:26379/m"
    c = load_config(GATEWAY, {"jwt_secret": "s"}, environ={"IMCLUSTER_REDIS": "redis://a,redis://b:1"})
    assert len(RedisService(c.redis).nodes) == 2
    with pytest.raises(ConfigError, match="redis"):
        load_config(GATEWAY, {"redis": "amqp://x", "jwt_secret": "s"}, environ={})


def test_keys_used_together_share_a_shard():
    """A script would span two shards: a gateway's keys, or a user's, would not share a hash tag."""
    svc = RedisService("redis://127.0.0.1:1/0,redis://127.0.0.1:2/0,redis://127.0.0.1:3/0", prefix="p:")
    k = svc.keys
    placed = {svc.node_for(k.ucir(f"user{i}")) for i in range(200)}
    assert len(placed) == 3  # users spread over every shard
    for i in range(200):
        uuid = f"gw-{i}"
        assert svc.node_for(k.server(uuid)) is svc.node_for(k.wsconns(uuid)) is svc.node_for(k.gateway_key("X", uuid))
        assert svc.node_for(k.ucir(f"u{i}")) is svc.node_for(k.user_key("PRESENCE##", f"u{i}"))
        assert hash_tag(k.ucir(f"u{i}")) == f"u{i}"
    # the prefix does not move keys: every daemon of every prefix agrees
    other = RedisService("redis://127.0.0.1:3/0,redis://127.0.0.1:1/0,redis://127.0.0.1:2/0", prefix="q:")
    assert all(svc.node_for(k.ucir(f"u{i}")).spec.name == other.node_for(other.keys.ucir(f"u{i}")).spec.name
               for i in range(100))


# --- two private primaries


async def _keys_of(port: int, prefix: str) -> set[str]:
    from twisted.internet import threads

    out = await threads.deferToThread(redis_cli, port, "--scan", "--pattern", prefix + "*")
    return set(out.split()) if out else set()


@pytest.mark.slow  # starts private redis-server processes
@pytest_twisted.ensureDeferred
async def test_every_key_lands_on_the_shard_of_its_hash_tag(sharded_redis, sharded_redis_service, redis_prefix):
    """Keys would land where no other daemon looks (or all on one shard)."""
    svc = sharded_redis_service
    _, shards = sharded_redis
    users = [f"user{i}" for i in range(40)]
    await svc.register_server(UUID1, INFO, 300)
    await svc.add_connections(UUID1, [(u, "10.0.0.1", 1000 + i, meta(i)) for i, u in enumerate(users)])
    await svc.execute("SET", svc.keys.redeliver_lock(), "me", "PX", 60000)
    found = {s.port: await _keys_of(s.port, redis_prefix) for s in shards}
    assert all(found.values()), found  # both shards hold keys
    assert set.union(*found.values()) == {svc.keys.ucir(u) for u in users} | {
        svc.keys.server(UUID1), svc.keys.wsconns(UUID1), svc.keys.servers(), svc.keys.redeliver_lock()}
    for port, keys in found.items():
        for key in keys:
            assert svc.node_for(key).spec.port == port, key
    # what the registry reads back agrees with what each shard holds
    conns = await svc.connections_of(users)
    assert all(len(conns[u]) == 1 for u in users)
    assert await svc.routes(users[:3]) == (
        {u: {f"{UUID1}##10.0.0.1##{1000 + i}": meta(i)} for i, u in enumerate(users[:3])}, {UUID1})
    assert await svc.unregister_server(UUID1) == 40
    assert [await _keys_of(s.port, redis_prefix) for s in shards] != []
    left = set.union(*[await _keys_of(s.port, redis_prefix) for s in shards])
    assert left == {svc.keys.redeliver_lock()}


@pytest.mark.slow  # starts private redis-server processes
@pytest_twisted.ensureDeferred
async def test_a_script_never_spans_shards(sharded_redis_service):
    """A script given keys of two shards would read or write the wrong Redis silently."""
    svc = sharded_redis_service
    k = svc.keys
    a = next(u for u in (f"u{i}" for i in range(100)) if svc.node_for(k.ucir(u)) is not svc.node_for(k.servers()))
    with pytest.raises(ValueError, match="span 2 Redis shards"):
        await svc.run_script(REFRESH_SCRIPT, [k.ucir(a), k.servers()], ["{}", 1000, "x"])


async def _commandstats(port: int) -> dict[str, int]:
    from twisted.internet import threads

    out = await threads.deferToThread(redis_cli, port, "INFO", "commandstats")
    stats = {}
    for line in out.splitlines():
        if line.startswith("cmdstat_"):
            name, _, rest = line.partition(":")
            stats[name[len("cmdstat_"):]] = int(rest.split(",")[0].split("=")[1])
    return stats


async def _routing_commands(svc, ports: list[int], users: list[str], gateways: list[str]) -> list[dict]:
    """Commands each shard got for one ``routes`` call (warm: scripts loaded, gateways seen)."""
    await svc.routes(users, gateways)  # scripts loaded (EVALSHA answers NOSCRIPT once), gateways seen
    for p in ports:
        await task.deferLater(reactor, 0, lambda: None)
        from twisted.internet import threads
        await threads.deferToThread(redis_cli, p, "CONFIG", "RESETSTAT")
    await svc.routes(users, gateways)
    stats = []
    for p in ports:
        s = await _commandstats(p)
        for admin in ("config|resetstat", "info"):
            s.pop(admin, None)
        stats.append(s)
    return stats


@pytest.mark.slow  # starts private redis-server processes
@pytest.mark.parametrize("shards", [1, 2])
@pytest_twisted.ensureDeferred
async def test_routing_a_100_member_group_is_one_command_per_shard(tmp_path, redis_factory, shards):
    """Routing a group would cost a round trip per member (or per gateway) once Redis is sharded."""
    from tests.support.private import PrivateRedis

    servers = [PrivateRedis(tmp_path / f"s{i}") for i in range(shards)]
    for s in servers:
        await s.start()
    try:
        svc = await redis_factory(",".join(s.url for s in servers))
        gateways = [f"gw{i}" for i in range(4)]
        members = [f"m{i}" for i in range(100)]
        for g in gateways:
            await svc.register_server(g, INFO, 300)
        await svc.add_connections(gateways[0], [(u, "10.0.0.1", i, meta()) for i, u in enumerate(members)])
        await svc.add_connections(gateways[1], [(u, "10.0.0.2", i, meta()) for i, u in enumerate(members[:50])])
        stats = await _routing_commands(svc, [s.port for s in servers], members, gateways[2:3])
        print(f"\n{shards} shard(s): commands per shard for one 100-member lookup: {stats}")
        # commandstats counts the commands the script ran too (HGETALL, EXISTS): the client sent
        # one EVALSHA per shard, all at once (one round trip), nothing else
        for s in stats:
            assert {c: n for c, n in s.items() if c not in ("hgetall", "exists")} == {"evalsha": 1}, stats
        assert sum(s.get("hgetall", 0) for s in stats) == 100
        conns, alive = await svc.routes(members, gateways[2:3])
        assert alive == set(gateways[:3]) and sum(len(v) for v in conns.values()) == 150
    finally:
        for s in servers:
            await s.close()


@pytest.mark.slow  # starts private redis-server processes
@pytest_twisted.ensureDeferred
async def test_sharded_reap_removes_a_dead_gateways_entries_on_every_shard(sharded_redis_service, sharded_redis_peer):
    """A dead gateway's connections on the other shard would stay forever; two reapers would both report it."""
    svc, peer = sharded_redis_service, sharded_redis_peer
    users = [f"r{i}" for i in range(30)]
    await svc.register_server(UUID1, INFO, 300)
    await svc.register_server("live", INFO, 300)
    await svc.add_connections(UUID1, [(u, "10.0.0.1", i, meta()) for i, u in enumerate(users)])
    await svc.add_connections("live", [(users[0], "10.0.0.2", 1, meta())])
    assert await svc.reap_server(UUID1) is False  # alive
    await svc.execute("DEL", svc.keys.server(UUID1))
    svc.batch = peer.batch = 7  # several chunks
    results = await defer.gatherResults([svc.reap_server(UUID1), peer.reap_server(UUID1)])
    assert sorted(results) == [False, True]
    conns = await svc.connections_of(users)
    assert conns[users[0]] == {"live##10.0.0.2##1": meta()}
    assert all(conns[u] == {} for u in users[1:])
    assert await svc.servers() == {"live"}
    assert await svc.execute("EXISTS", svc.keys.wsconns(UUID1)) == 0


@pytest.mark.slow  # starts private redis-server processes
@pytest_twisted.ensureDeferred
async def test_shard_restarted_empty_triggers_reregistration(sharded_redis, sharded_redis_service):
    """A shard that came back empty would leave its users looking offline: nobody would re-register."""
    svc = sharded_redis_service
    _, shards = sharded_redis
    fired = []
    svc.add_reconnect_listener(lambda: fired.append(time.monotonic()))
    await shards[1].restart()
    for _ in range(100):
        if fired:
            break
        await _sleep(0.05)
    assert fired  # the gateway's listener re-registers everything (GatewayService._redis_reconnected)
    assert await svc.execute("PING") == "PONG"


# --- Sentinel


@pytest.mark.slow  # starts private redis-server processes
@pytest_twisted.ensureDeferred
async def test_sentinel_failover_is_followed(private_sentinels, redis_factory):
    """After the primary died, the daemons would stay cut off instead of following the promoted replica."""
    s = private_sentinels
    svc = await redis_factory(s.url, timeout=1.0)
    assert svc.connected and svc.port == s.primary.port
    reconnected = []
    svc.add_reconnect_listener(lambda: reconnected.append(time.monotonic()))
    await svc.register_server(UUID1, INFO, 300)
    await svc.add_connections(UUID1, [("alice", "10.0.0.1", 1, meta())])
    from twisted.internet import threads
    await threads.deferToThread(s.primary.command, "WAIT", "1", "2000")  # on the replica too
    killed = time.monotonic()
    await s.kill_primary()
    failures = 0
    while True:  # what the daemons see: calls fail fast (unavailable) until the promotion
        try:
            found = await svc.connections_of(["alice"])
            break
        except (RegistryUnavailable, TimeoutError):
            failures += 1
            await _sleep(0.1)
        assert time.monotonic() - killed < 30, "no failover"
    resumed = time.monotonic() - killed
    print(f"\nSentinel failover (SIGKILL, down-after 1 s): registry answered again after {resumed:.2f}s, "
          f"{failures} calls failed meanwhile")
    assert found == {"alice": {f"{UUID1}##10.0.0.1##1": meta()}}  # replicated before the kill
    assert svc.port == s.replica.port and reconnected  # the gateways' listener re-registers
    await svc.register_server(UUID1, INFO, 300)
    assert await svc.alive([UUID1]) == {UUID1}


@pytest.mark.slow  # starts private redis-server processes
@pytest_twisted.ensureDeferred
async def test_sentinel_graceful_failover_drops_the_demoted_primary(private_sentinels, redis_factory):
    """After SENTINEL FAILOVER, writes would go on hitting the demoted (read-only) primary."""
    from twisted.internet import threads

    s = private_sentinels
    svc = await redis_factory(s.url, timeout=1.0)
    await svc.register_server(UUID1, INFO, 300)
    assert "OK" in await threads.deferToThread(s.failover)
    await s.wait_promoted()
    began = time.monotonic()
    while True:
        try:
            await svc.register_server(UUID1, INFO, 300)
            if svc.port == s.replica.port:
                break
        except (RegistryUnavailable, TimeoutError):
            pass
        assert time.monotonic() - began < 20
        await _sleep(0.1)
    assert await threads.deferToThread(s.replica.command, "ROLE") != ""
    assert await svc.alive([UUID1]) == {UUID1}


@pytest_twisted.ensureDeferred
async def test_a_gateway_back_during_its_reap_is_made_to_write_everything_again(redis_service):
    """The reap is per-shard steps now: a gateway that re-registered between them would keep a
    WSCONNS set whose UCIR fields the reaper had just removed, its users looking offline for good."""
    svc = redis_service
    await svc.register_server(UUID1, INFO, 300)
    await svc.add_connections(UUID1, [("alice", "10.0.0.1", 1, meta())])
    await svc.execute("DEL", svc.keys.server(UUID1))  # its key expired: the reaper starts
    real_pipeline = svc.pipeline

    async def back_then_hdel(commands):
        # between the reap's read and its HDELs, the gateway's heartbeat re-creates everything
        del svc.pipeline
        assert await svc.refresh_server(UUID1, INFO, 300) is False
        await svc.add_connections(UUID1, [("alice", "10.0.0.1", 1, meta())])
        return await real_pipeline(commands)

    svc.pipeline = lambda commands: defer.ensureDeferred(back_then_hdel(commands))
    assert await svc.reap_server(UUID1) is False
    # its key is gone again, so its next heartbeat finds out and writes every entry again
    assert await svc.refresh_server(UUID1, INFO, 300) is False
    assert UUID1 in await svc.servers()

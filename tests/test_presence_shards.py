"""Live presence on sharded Redis and behind Sentinel, with real gateways and processors.

Private Redis instances only (tests/support/private.py: two primaries for
the shards, or a primary, its replica and three Sentinels); RabbitMQ and
PostgreSQL are the shared ones, under the test's own namespace and schema.
The clients and helpers are tests/test_presence_typing.py's.

* With two shards, a gateway keeps one pub/sub connection per shard: the
  presence of users on either shard reaches followers on another gateway,
  and ``WSALIVE##{<uuid>}`` is subscribed on the gateway's own shard, where
  the processors' liveness watch asks (the SIGKILL fast path).
* Behind Sentinel, the pub/sub connection follows a failover: frames keep
  flowing, and the gateway's liveness channel is on the promoted primary
  (so the processors do not take it for dead).
"""

from __future__ import annotations

import time

import pytest
import pytest_twisted
from twisted.internet import defer, threads

from imcluster import presence as pr
from imcluster.registry import RedisService
from tests.support.ids import unique
from tests.support.private import redis_cli
from tests.support.waiting import eventually, sleep
from tests.test_presence_typing import PRESENCE_BOUND, Env, _close_connections, login, next_presence, quiet, subscribe

pytestmark = pytest.mark.slow

__all__ = ["_close_connections"]  # autouse: the streaming clients are closed after each test


def _users_on_each_shard(reg: RedisService, n: int = 2) -> list[list[str]]:
    """``n`` new user ids per shard (by the hash tag of their ``UCIR`` key, as every daemon places them)."""
    per: dict = {node: [] for node in reg.nodes}
    while any(len(v) < n for v in per.values()):
        u = unique("u")
        users = per[reg.node_for(reg.keys.ucir(u))]
        if len(users) < n:
            users.append(u)
    return [per[node] for node in reg.nodes]


async def _numsub(port: int, channel: str) -> int:
    out = (await threads.deferToThread(redis_cli, port, "PUBSUB", "NUMSUB", channel)).split()
    return int(out[1]) if len(out) == 2 else 0


@pytest_twisted.async_yield_fixture
async def sharded_reg(sharded_redis, redis_prefix):
    url, _ = sharded_redis
    reg = RedisService(url, prefix=redis_prefix, timeout=3.0)
    await reg.startService()
    try:
        yield reg
    finally:
        await reg.stopService()


@pytest_twisted.ensureDeferred
async def test_presence_across_two_gateways_on_two_sharded_primaries(sharded_redis, sharded_reg, cluster, pg_schema):
    """On sharded Redis, a contact list would follow only the users whose keys are on the first
    shard: the others' logins and logouts would never show."""
    url, shards = sharded_redis
    reg = sharded_reg
    cluster.redis_url = url
    gw1 = await cluster.start_gateway()
    gw2 = await cluster.start_gateway()
    await cluster.start_processor()
    env = Env(cluster, gw1, gw2)
    (a_users, b_users) = _users_on_each_shard(reg)
    watched = [a_users[0], b_users[0]]
    already = [a_users[1], b_users[1]]
    conns = {u: await login(env, u, "tcp", gw=gw2) for u in already}
    # the follower's own key is on one shard; it follows users on both
    alice = await login(env, unique("alice"), "ws")
    reply = await subscribe(alice, watched + already)
    assert reply["ok"] is True
    states = {e["userId"]: e["online"] for e in reply["users"]}
    assert states == {watched[0]: False, watched[1]: False, already[0]: True, already[1]: True}
    for u in watched:
        conns[u] = await login(env, u, "ws", gw=gw2)
        _, took = await next_presence(alice, u, True)
        assert took < PRESENCE_BOUND
    for u in already + watched:
        conns[u].close()
        _, took = await next_presence(alice, u, False)
        assert took < PRESENCE_BOUND
    # each state went where its hash tag says, and each gateway's liveness channel is on its own shard
    for u in watched:
        node = reg.node_for(pr.state_key(reg.prefix, u))
        assert node is reg.node_for(reg.keys.ucir(u))
        assert (await node.execute("GET", pr.state_key(reg.prefix, u))).endswith(":0")
    for gw_conn in (alice,):
        uuid = gw_conn.reply["serverId"]
        channel = pr.liveness_channel(reg.prefix, uuid)
        mine = reg.node_for(reg.keys.server(uuid))
        for shard in shards:
            expected = 1 if shard.port == mine.spec.port else 0
            assert await _numsub(shard.port, channel) == expected, (shard.port, mine.where)
    assert alice.of_type("error") == []


@pytest_twisted.ensureDeferred
async def test_sharded_presence_of_a_killed_gateways_users_turns_offline_fast(sharded_redis, sharded_reg, cluster,
                                                                             pg_schema):
    """On sharded Redis, users of a gateway that crashed must still show offline within seconds
    (the processors must ask each gateway's shard for its liveness channel), not after --server-ttl."""
    url, _ = sharded_redis
    reg = sharded_reg
    cluster.redis_url = url
    ttl, grace = 60.0, 2.0
    opts = dict(server_ttl=ttl, heartbeat=20.0)
    # enough gateways that both shards hold the liveness channel of one (the victim is either)
    gws = [await cluster.start_gateway(**opts) for _ in range(3)]
    await cluster.start_processor(presence_grace=grace, presence_check=0.5, **opts)
    env = Env(cluster, gws[0], gws[1])
    (a_users, b_users) = _users_on_each_shard(reg, 2)
    follower = await login(env, unique("alice"), "ws", gw=gws[0])
    uuids = {}
    for i, gw in enumerate(gws[1:]):
        for u in (a_users[i], b_users[i]):  # each gateway has a user on each shard
            c = await login(env, u, "tcp", gw=gw)
            uuids[gw] = c.reply["serverId"]
    gw_nodes = {gw: reg.node_for(reg.keys.server(uuids[gw])) for gw in gws[1:]}
    # prefer a victim gateway whose shard is not the first (where gateways subscribed before)
    victim_gw = next((gw for gw in gws[1:] if gw_nodes[gw] is not reg.nodes[0]), gws[1])
    i = gws[1:].index(victim_gw)
    watched = [a_users[i], b_users[i]]
    assert {reg.node_for(reg.keys.ucir(u)) for u in watched} == set(reg.nodes)
    await sleep(1.0)  # the processor sees the gateway's liveness channel at least once
    reply = await subscribe(follower, watched)
    assert all(e["online"] for e in reply["users"]), reply
    start = time.monotonic()
    assert await victim_gw.kill() == -9
    await eventually(lambda: {f["userId"] for f in follower.of_type("presence") if f["online"] is False}
                     >= set(watched), ttl, what="both users offline", step=0.05)
    took = time.monotonic() - start
    assert [f["online"] for f in follower.of_type("presence")] == [False, False]
    print(f"\nsharded: offline {took:.2f}s after SIGKILL of a gateway on {gw_nodes[victim_gw].where} "
          f"(presence_grace {grace}s, --server-ttl {ttl}s)")
    assert took < grace + 4.0 < ttl, f"offline after {took:.1f}s (grace {grace}s, --server-ttl {ttl}s)"
    # the surviving gateways are not taken for dead
    assert await quiet(follower, "presence", 1.0) == []
    assert set(uuids[g] for g in gws[1:] if g is not victim_gw) <= await reg.servers()


@pytest_twisted.ensureDeferred
async def test_presence_frames_keep_flowing_after_a_sentinel_failover(private_sentinels, cluster, pg_schema,
                                                                      redis_prefix):
    """Behind Sentinel, after a failover the gateways' pub/sub connections would stay on the demoted
    primary (or nowhere): no more presence frames, and the processors would reap live gateways."""
    s = private_sentinels
    cluster.redis_url = s.url
    # --server-ttl longer than the ~10 s the daemons stay on the demoted primary (below): only
    # the liveness watch could reap a gateway here
    opts = dict(server_ttl=30.0)
    gw1 = await cluster.start_gateway(**opts)
    gw2 = await cluster.start_gateway(**opts)
    await cluster.start_processor(presence_grace=2.0, presence_check=0.5, **opts)
    env = Env(cluster, gw1, gw2)
    bob, carol = unique("bob"), unique("carol")
    alice = await login(env, unique("alice"), "ws")
    b = await login(env, bob, "tcp", gw=gw2)
    reply = await subscribe(alice, [bob, carol])
    assert {e["userId"]: e["online"] for e in reply["users"]} == {bob: True, carol: False}
    uuids = {alice.reply["serverId"], b.reply["serverId"]}
    channels = [pr.liveness_channel(redis_prefix, u) for u in uuids]
    for ch in channels:
        assert await _numsub(s.primary.port, ch) == 1
    assert "OK" in await threads.deferToThread(s.failover)
    promoted = await s.wait_promoted()
    # right after the promotion: the daemons are still on the old primary until Sentinel
    # demotes it (at its next INFO of it, within 10 s) and closes its clients, pub/sub ones
    # too; the frames keep coming meanwhile
    c = await login(env, carol, "ws", gw=gw2)
    _, took_on = await next_presence(alice, carol, True)
    began = time.monotonic()
    for ch in channels:
        await eventually(lambda ch=ch: defer.Deferred.fromCoroutine(_numsub(s.replica.port, ch)), 30.0,
                         what=f"{ch} on the new primary", step=0.1)
    moved = time.monotonic() - began
    # after the move, on the promoted primary
    b.close()
    _, took_off = await next_presence(alice, bob, False)
    c.close()
    _, took_off2 = await next_presence(alice, carol, False)
    print(f"\nSentinel failover: promoted after {promoted:.2f}s; liveness channels on the new primary "
          f"{moved:.2f}s after that; presence frames {took_on:.2f}s (before the move), {took_off:.2f}s and "
          f"{took_off2:.2f}s (after) after the change")
    assert max(took_on, took_off, took_off2) < PRESENCE_BOUND
    # the processors' liveness watch took no gateway for dead
    await sleep(3.0)
    for proc in cluster.processes:
        assert "reaped gateway" not in proc.log_text(), proc.name
    assert alice.client.connected and alice.of_type("error") == []
    assert await quiet(alice, "presence", 0.5) == []

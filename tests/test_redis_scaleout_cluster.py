"""Issue 18, Redis part, with real gateways and processors: a Sentinel failover under steady load,
and a whole cluster on two sharded Redis primaries.

Private Redis instances only (tests/support/private.py); RabbitMQ and
PostgreSQL are the shared ones, under the test's own namespace and schema.
The load and its ledger are issue 12's (tests/support/load.py, ledger.py):
every acknowledged message must reach every connected member (lost 0,
duplicates only of the same msgId), within 10 s of Redis answering again.
The figures are printed (``-s``).
"""

from __future__ import annotations

import time

import pytest
import pytest_twisted
from twisted.internet import reactor, task, threads

from imcluster.registry import RedisService
from tests.support.clients import connect_ws
from tests.support.ledger import DEADLINE
from tests.support.load import Load
from tests.support.private import redis_cli

pytestmark = pytest.mark.slow


async def _sleep(s: float) -> None:
    await task.deferLater(reactor, s, lambda: None)


def _first_delivery_after(ledger, t: float) -> float | None:
    """Seconds from ``t`` to the first delivery of a message acknowledged after ``t``."""
    firsts = [at for rec in ledger.conns.values() for msg, at in rec.first.items()
              if msg in ledger.sent and ledger.sent[msg].replied_at >= t]
    return min(firsts) - t if firsts else None


async def _start(cluster, redis_url: str, gateways: int = 2, processors: int = 2):
    cluster.redis_url = redis_url
    gws = [await cluster.start_gateway() for _ in range(gateways)]
    prs = [await cluster.start_processor() for _ in range(processors)]
    return gws, prs


def _check(report) -> None:
    assert report.lost == 0, report
    assert report.mismatched == 0, report
    assert report.seq_gaps == 0 and report.server_seq_gaps == 0, report
    assert report.late == 0 and (report.worst_delay_s or 0) <= DEADLINE, report


@pytest.mark.parametrize("how", ["sigkill", "sentinel-failover"])
@pytest_twisted.ensureDeferred
async def test_sentinel_failover_under_load_loses_nothing(private_sentinels, cluster, pg_schema, how):
    """When the Redis primary dies (or is failed over), the cluster would stay cut off from Redis or
    lose what was routed meanwhile, instead of following the promoted replica."""
    s = private_sentinels
    gws, _ = await _start(cluster, s.url)
    load = Load(cluster.token, gws, users=6, rate=3.0)
    await load.connect()
    try:
        ledger = load.new_ledger()
        load.start()
        await _sleep(2.0)
        began = time.monotonic()
        if how == "sigkill":
            await s.kill_primary()
        else:
            assert "OK" in await threads.deferToThread(s.failover)
        promoted = await s.wait_promoted()
        healed_at = time.monotonic()  # every Sentinel names the new primary: Redis answers again
        deadline = healed_at + 20
        while time.monotonic() < deadline and not any(x.replied_at >= healed_at for x in ledger.sent.values()):
            await _sleep(0.1)
        await _sleep(3.0)
        load.stop()
        await load.settle(ledger, healed_at)
        report = ledger.report(healed_at)
        resumed = _first_delivery_after(ledger, began)
        print(f"\nSentinel {how}: promoted after {promoted:.2f}s; first delivery of a message sent after "
              f"the fault {resumed if resumed is None else round(resumed, 2)}s after it; {report.line()}")
        assert load.reconnected() == 0, "a client was disconnected"
        assert report.messages > 20 and report.after_heal >= 5, report
        _check(report)
    finally:
        load.close()


@pytest_twisted.ensureDeferred
async def test_a_cluster_on_two_sharded_primaries(sharded_redis, cluster, pg_schema, redis_prefix):
    """On sharded Redis, messages (1:1 and group) would not be routed, and the reaper and the
    redelivery sweep would miss the keys on the other shard."""
    url, shards = sharded_redis
    gws, _ = await _start(cluster, url)
    load = Load(cluster.token, gws, users=6, rate=3.0)
    await load.connect()
    reg = RedisService(url, prefix=redis_prefix, timeout=3.0)
    await reg.startService()
    try:
        ledger = load.new_ledger()
        load.start()
        await _sleep(4.0)
        load.stop()
        await load.settle(ledger)
        report = ledger.report()
        print(f"\n2 shards: {report.line()}")
        assert report.messages > 30, report
        _check(report)
        # both shards hold keys, each where its hash tag says
        for shard in shards:
            keys = (await threads.deferToThread(redis_cli, shard.port, "--scan", "--pattern",
                                                redis_prefix + "*")).split()
            assert keys
            assert all(reg.node_for(k).spec.port == shard.port for k in keys), keys
        # the redelivery sweep takes its lock (SET NX PX, 0.9 of its 2 s interval) on the sharded Redis
        owners = set()
        for _ in range(60):
            owner = await reg.execute("GET", reg.keys.redeliver_lock())
            if owner:
                owners.add(owner)
            await _sleep(0.1)
        assert owners, "no processor took the redelivery lock"
        # the sweep delivers again what a connected recipient leaves unacknowledged (redeliver_age 3 s)
        ann = await connect_ws(gws[0].ws_url)
        await ann.auth(cluster.token("ann"))
        ben = await connect_ws(gws[1].ws_url)
        await ben.auth(cluster.token("ben"))
        ann.send({"type": "message", "clientMsgId": "r1", "sessionId": "p2p:ann:ben", "body": "again?"})
        assert (await ann.receive_type("message_reply"))["ok"]
        first = await ben.receive_type("message_send", 5.0)
        again = await ben.receive_type("message_send", 15.0)  # never acknowledged: sent again
        assert again["msgId"] == first["msgId"]
        ann.abort()
        ben.abort()
        # a gateway that dies: the reaper removes its entries on both shards
        doomed = await cluster.start_gateway()
        clients = []
        for i in range(12):
            c = await connect_ws(doomed.ws_url)
            await c.auth(cluster.token(f"z{i}"))
            clients.append(c)
        users = [f"z{i}" for i in range(12)]
        assert {reg.node_for(reg.keys.ucir(u)) for u in users} == set(reg.nodes)
        found = await reg.connections_of(users)
        uuid = next(iter(found["z0"])).split("##")[0]
        assert all(len(found[u]) == 1 for u in users)
        await doomed.kill()
        for _ in range(200):
            found = await reg.connections_of(users)
            if not any(found.values()) and uuid not in await reg.servers():
                break
            await _sleep(0.1)
        assert not any(found.values()) and uuid not in await reg.servers()
        assert await reg.execute("EXISTS", reg.keys.wsconns(uuid), reg.keys.server(uuid)) == 0
        for c in clients:
            c.abort()
    finally:
        load.close()
        await reg.stopService()

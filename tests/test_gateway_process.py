"""``twistd imgateway`` as an operator runs it: starts, serves, and exits cleanly on SIGTERM."""

from __future__ import annotations

import json
import signal
import time

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, threads

from tests.support.clients import connect_tcp, connect_ws

pytestmark = pytest.mark.slow

SHUTDOWN_TIMEOUT = 10.0


def http_get(url: str) -> tuple[int, bytes]:
    """Status and body of a GET (blocking: run it in a thread)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


async def keys_under(redis, prefix):
    """Every key under ``prefix`` (tests may SCAN their own prefix)."""
    cursor, found = "0", []
    while True:
        cursor, keys = await redis.execute("SCAN", cursor, "MATCH", prefix.replace("*", r"\*") + "*",
                                           "COUNT", 1000)
        found.extend(keys)
        if str(cursor) == "0":
            return sorted(found)


@pytest_twisted.ensureDeferred
async def test_sigterm_says_going_away_cleans_redis_and_exits_0(cluster, redis_factory, redis_prefix):
    """On SIGTERM clients must be sent elsewhere, no routing entry may linger, and the exit must be clean."""
    gw = await cluster.start_gateway(shutdown_timeout=SHUTDOWN_TIMEOUT, metrics=True)
    ws = await connect_ws(gw.ws_url)
    tcp = await connect_tcp(gw.tcp_port)
    assert (await ws.auth(cluster.token("alice"), device="web"))["ok"]
    reply = await tcp.auth(cluster.token("bob"))
    assert reply["ok"]
    uuid = reply["serverId"]
    redis = await redis_factory()
    keys = await keys_under(redis, redis_prefix)
    assert set(keys) == {f"{redis_prefix}{k}" for k in (
        f"WSSERVER_{{{uuid}}}", "WSSERVERS", f"WSCONNS##{{{uuid}}}", "UCIR##{alice}", "UCIR##{bob}",
        "PRESENCE##{alice}", "PRESENCE##{bob}")}
    info = json.loads(await redis.execute("GET", f"{redis_prefix}WSSERVER_{{{uuid}}}"))
    assert info["ip"] == "127.0.0.1" and info["port"] == gw.ws_port and info["tcpPort"] == gw.tcp_port

    started = time.monotonic()
    rc = await gw.stop(signal.SIGTERM, timeout=SHUTDOWN_TIMEOUT + 5)
    elapsed = time.monotonic() - started
    assert rc == 0, gw.log_tail()
    assert elapsed < SHUTDOWN_TIMEOUT
    code, _ = await ws.closed.addTimeout(5, reactor)
    assert code == 1001
    await tcp.closed.addTimeout(5, reactor)
    assert tcp.received[-1] == {**tcp.received[-1], "type": "error", "code": "going_away"}
    # no routing entry lingers; the users' presence states stay, offline (with a TTL)
    assert await keys_under(redis, redis_prefix) == [f"{redis_prefix}PRESENCE##{{alice}}",
                                                     f"{redis_prefix}PRESENCE##{{bob}}"]
    for user in ("alice", "bob"):
        assert (await redis.execute("GET", f"{redis_prefix}PRESENCE##{{{user}}}")).endswith(":0")


@pytest_twisted.ensureDeferred
async def test_metrics_and_health_endpoints(cluster):
    """Operators must be able to scrape the gateway and probe its health."""
    gw = await cluster.start_gateway(metrics=True)
    ws = await connect_ws(gw.ws_url)
    assert (await ws.auth(cluster.token("alice")))["ok"]
    base = f"http://127.0.0.1:{gw.metrics_port}"
    code, body = await threads.deferToThread(http_get, f"{base}/healthz")
    assert code == 200
    health = json.loads(body)
    assert health["ok"] is True
    assert {name: dep["state"] for name, dep in health["dependencies"].items()} == {
        "redis": "up", "rabbitmq": "up", "gateway": "up"}
    code, body = await threads.deferToThread(http_get, f"{base}/metrics")
    assert code == 200
    assert 'imcluster_connections{authenticated="true",transport="ws"} 1.0' in body.decode()
    ws.close()
    await ws.closed.addTimeout(5, reactor)


@pytest_twisted.ensureDeferred
async def test_sigterm_with_thousands_of_clients(cluster, redis_factory, redis_prefix):
    """A busy gateway must still say goodbye to everyone and exit cleanly within --shutdown-timeout."""
    n = 2000
    gw = await cluster.start_gateway(shutdown_timeout=SHUTDOWN_TIMEOUT)
    token = cluster.token("crowd")
    clients = await defer.gatherResults(
        [defer.Deferred.fromCoroutine(connect_tcp(gw.tcp_port)) for _ in range(n)])
    replies = await defer.gatherResults([defer.Deferred.fromCoroutine(c.auth(token)) for c in clients])
    assert all(r["ok"] for r in replies)
    uuid = replies[0]["serverId"]
    redis = await redis_factory()
    assert await redis.execute("SCARD", f"{redis_prefix}WSCONNS##{{{uuid}}}") == n
    assert await redis.execute("HLEN", f"{redis_prefix}UCIR##{{crowd}}") == n

    started = time.monotonic()
    rc = await gw.stop(signal.SIGTERM, timeout=SHUTDOWN_TIMEOUT + 5)
    elapsed = time.monotonic() - started
    assert rc == 0, gw.log_tail()
    assert elapsed < SHUTDOWN_TIMEOUT
    await defer.gatherResults([c.closed for c in clients]).addTimeout(10, reactor)
    assert all(c.received[-1].get("code") == "going_away" for c in clients)
    assert await keys_under(redis, redis_prefix) == [f"{redis_prefix}PRESENCE##{{crowd}}"]
    print(f"{n} clients: stopped in {elapsed:.2f}s")

"""Issue 13's attacks on a real ``twistd imgateway``: what the attacker and a bystander see.

Each attack runs for a few seconds from threads of blocking sockets
(tests/support/attacks.py) while an ordinary authenticated client measures
its ``ping`` round trips, and the gateway's resident memory is sampled from
``/proc/<pid>/status``. ``bench/attacks.py`` runs the same attackers longer
and prints the figures.
"""

from __future__ import annotations

import jwt
import pytest
import pytest_twisted
from twisted.internet import reactor, threads

from tests.support.attacks import Bystander, HeaderFlood, PingFlood, percentiles, rss_kb
from tests.support.clients import connect_ws
from tests.support.waiting import sleep

pytestmark = pytest.mark.slow

ATTACK = 3.0  # seconds


#: a bystander round trip (p50) this slow means the gateway stalled for it
STALLED_MS = 250


async def attack(gw, attackers, bystander, seconds=ATTACK):
    """Run ``attackers`` for ``seconds``; the gateway's peak RSS growth (KiB) and the bystander's round trips."""
    before = rss_kb(gw.pid)
    started = reactor.seconds()
    since = bystander.samples[-1][0] if bystander.samples else 0.0
    for a in attackers:
        a.start()
    peak = before
    while reactor.seconds() - started < seconds:
        await sleep(0.1)
        peak = max(peak, rss_kb(gw.pid))
    for a in attackers:
        await threads.deferToThread(a.stop)
    return peak - before, percentiles(bystander.round_trips(since=since + 1e-9))


async def start_bystander(cluster, gw):
    bystander = Bystander(gw.ws_port, cluster.token("bystander"), interval=0.05)
    bystander.start()
    await threads.deferToThread(bystander.ready.wait, 20)
    assert bystander.error is None, bystander.error
    await sleep(0.5)  # a baseline
    return bystander


@pytest_twisted.ensureDeferred
async def test_ping_flood_without_reading_is_closed_4003_and_memory_stays_bounded(cluster):
    """A client flooding pings and never reading grew the gateway by hundreds of MB and was never closed."""
    gw = await cluster.start_gateway(output_buffer_limit=256 * 1024, slow_consumer_grace=0.5,
                                     close_timeout=30.0)
    bystander = await start_bystander(cluster, gw)
    floods = [PingFlood(gw.ws_port, token=cluster.token("mallory")), PingFlood(gw.ws_port)]
    growth, rtt = await attack(gw, floods, bystander)
    codes = [await threads.deferToThread(f.close_code) for f in floods]
    bystander.stop()
    sent_mb = sum(f.sent for f in floods) / 1e6
    print(f"ping flood: {sent_mb:.1f} MB of pings, RSS +{growth} KiB, bystander {rtt}, codes {codes}")
    assert sent_mb > 2, "the attack did not run"
    assert codes == [4003, 4003]  # authenticated and not: both slow consumers
    assert growth < 24 * 1024, f"gateway RSS grew {growth} KiB"
    # the gateway keeps answering others (no stall); the bystander runs beside the attackers'
    # threads in this process, so its figure carries their GIL too: the close codes and RSS are
    # what tell a bounded gateway from an unbounded one, bench/attacks.py measures latency
    assert bystander.error is None and rtt["p50"] < STALLED_MS, rtt


@pytest_twisted.ensureDeferred
async def test_endless_handshake_header_gets_431_at_16_kib(cluster):
    """An endless header line took 30 MB per connection and slowed everyone; past 16 KiB it is refused."""
    gw = await cluster.start_gateway()  # handshake_timeout stays at its 10 s default
    bystander = await start_bystander(cluster, gw)
    floods = [HeaderFlood(gw.ws_port) for _ in range(10)]
    growth, rtt = await attack(gw, floods, bystander)
    bystander.stop()
    connections = [c for f in floods for c in f.connections]
    outcomes = {outcome for _, _, outcome in connections}
    longest = max(seconds for seconds, _, _ in connections)
    print(f"header flood: {len(connections)} connections ({outcomes}), longest {longest:.2f}s, "
          f"RSS +{growth} KiB, bystander {rtt}")
    # every connection was refused quickly (431, or closed when our bytes raced the close)
    assert "431" in outcomes
    assert longest < 1.5, f"a handshake connection lived {longest:.1f}s"
    assert len(connections) > 10 * ATTACK
    assert growth < 24 * 1024, f"gateway RSS grew {growth} KiB"
    assert bystander.error is None and rtt["p50"] < STALLED_MS, rtt


@pytest_twisted.ensureDeferred
async def test_max_connections_refuses_at_once_and_counts_handshakes(cluster):
    """Over max_connections a new socket is closed right away, even while the others are still in their handshake."""
    gw = await cluster.start_gateway(max_connections=3)
    import socket

    await sleep(0.5)  # the harness's readiness probes are closed sockets the gateway must notice first
    idle = [socket.create_connection(("127.0.0.1", gw.ws_port)) for _ in range(3)]
    try:
        await sleep(0.3)
        extra = socket.create_connection(("127.0.0.1", gw.ws_port))
        extra.settimeout(5)
        try:
            data = await threads.deferToThread(extra.recv, 1)
        except ConnectionResetError:
            data = b""
        assert data == b""  # closed, nothing read nor written
        extra.close()
        with pytest.raises(Exception):
            await connect_ws(gw.ws_url, timeout=5)
    finally:
        for s in idle:
            s.close()
    await sleep(0.3)
    client = await connect_ws(gw.ws_url)  # slots are given back
    assert (await client.auth(cluster.token("alice")))["ok"]


@pytest_twisted.ensureDeferred
async def test_token_with_exp_10_pow_400_is_invalid_token(cluster, redis_factory, redis_prefix):
    """A validly signed exp of 10**400 left the connection half-authenticated: no auth_reply, recorded in Redis."""
    gw = await cluster.start_gateway()
    token = jwt.encode({"sub": "mallory", "exp": 10**400}, cluster.jwt_secret, algorithm="HS256")
    client = await connect_ws(gw.ws_url)
    reply = await client.auth(token, timeout=5)
    assert reply["ok"] is False and reply["error"]["code"] == "invalid_token", reply
    code, _ = await client.closed.addTimeout(5, reactor)
    assert code == 4001
    redis = await redis_factory()
    assert await redis.execute("HLEN", f"{redis_prefix}UCIR##{{mallory}}") == 0


@pytest_twisted.ensureDeferred
async def test_acknowledgements_are_never_rate_limited(cluster, pg_schema):
    """A member acknowledging each delivery in its own frame got rate_limited and those messages stayed undelivered."""
    gw = await cluster.start_gateway(rate_limit=5, rate_burst=20)
    await cluster.start_processor()
    alice = await connect_ws(gw.ws_url)
    assert (await alice.auth(cluster.token("alice")))["ok"]
    await alice.receive_type("sync_done", timeout=30)
    senders = []
    for name in ("bob", "carol"):
        c = await connect_ws(gw.ws_url)
        assert (await c.auth(cluster.token(name)))["ok"]
        senders.append((name, c))
    per_sender = 15  # within each sender's burst; alice gets 30 > her burst
    for i in range(per_sender):
        for name, c in senders:
            c.send({"type": "message", "clientMsgId": f"{name}-{i}", "sessionId": f"p2p:alice:{name}",
                    "body": {"text": str(i)}})
    got = 0
    while got < per_sender * len(senders):
        frame = await alice.receive(timeout=30)
        if frame["type"] == "message_send":
            got += 1
            alice.send({"type": "message_send_reply", "msgIds": [frame["msgId"]]})
    alice.send({"type": "ping"})
    await alice.receive_type("pong", timeout=10)
    refused = [f for f in alice.received if f.get("type") == "error"]
    assert refused == []
    # every message was acknowledged: a new connection of alice's has nothing to sync
    deadline = reactor.seconds() + 15
    while True:
        again = await connect_ws(gw.ws_url)
        assert (await again.auth(cluster.token("alice")))["ok"]
        count = (await again.receive_type("sync_done", timeout=30))["count"]
        again.close()
        if count == 0 or reactor.seconds() > deadline:
            break
        await sleep(0.5)
    assert count == 0

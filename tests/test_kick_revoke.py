"""Kick and revoke across two real gateways (HTTP-API.md kick/revoke; PROTOCOL.md 1.1 "Kicked and revoked connections").

One cluster for the module: two gateways, one processor, one imapi. Every
transport (WebSocket, raw TCP, HTTP streaming as events and as long polls)
sees ``{"type":"error","code":"kicked"}`` (or ``token_revoked``) and then the
close (WebSocket 4004), within 2 s of the API's answer, on whichever gateway
holds the connection.
"""

from __future__ import annotations

import time
import uuid

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from tests.support.bus import cleanup_namespace
from tests.support.clients import connect_stream, connect_tcp, connect_ws
from tests.support.cluster import Cluster, _delete_redis_prefix
from tests.support.http import http_call, metric_value
from tests.support.ids import POSTGRES_DSN, unique
from tests.support.postgres import drop_schema

pytestmark = pytest.mark.slow

ADMIN = "admin-" + uuid.uuid4().hex
TRANSPORTS = ["ws", "tcp", "stream", "poll"]
#: HTTP-API.md: within 2 s of the kick
KICK_WITHIN = 2.0


class Env:
    def __init__(self, cluster, gw1, gw2, api) -> None:
        self.cluster, self.gw1, self.gw2, self.api = cluster, gw1, gw2, api


@pytest_twisted.async_yield_fixture(scope="module")
async def env(tmp_path_factory):
    from imcluster.db import apply_migrations_sync

    namespace, prefix, schema = unique("imt"), unique("imt:") + ":", unique("imt_")
    apply_migrations_sync(POSTGRES_DSN, schema, 10.0)
    cluster = Cluster(tmp_path_factory.mktemp("kick"), namespace, prefix, schema)
    try:
        gw1, gw2 = await defer.gatherResults([cluster.start_gateway(metrics=True),
                                              cluster.start_gateway(metrics=True)], consumeErrors=True)
        await cluster.start_processor()
        api = await cluster.start_api(api_key=ADMIN)
        yield Env(cluster, gw1, gw2, api)
    finally:
        await cluster.shutdown()
        if cluster.processes:
            print(cluster.report())
        await cleanup_namespace(namespace, cluster.extra_queues, cluster.amqp_url)
        await _delete_redis_prefix(prefix)
        drop_schema(schema)


async def connect(gw, transport: str):
    if transport == "ws":
        return await connect_ws(gw.ws_url)
    if transport in ("stream", "poll"):
        return connect_stream(gw.stream_port, "sse" if transport == "stream" else "poll")
    return await connect_tcp(gw.tcp_port)


async def login(gw, transport: str, token: str):
    client = await connect(gw, transport)
    reply = await client.auth(token)
    assert reply["ok"] is True, reply
    await client.receive_type("sync_done")
    return client


async def closed_with(client, code: str, transport: str, within: float) -> None:
    """The client got the ``error`` frame ``code`` and was closed (WebSocket 4004) within ``within`` s."""
    frame = await client.receive_type("error", within)
    assert frame["code"] == code, frame
    how = await client.closed.addTimeout(within, reactor)
    if transport == "ws":
        assert how[0] == 4004, how


async def still_open(client) -> None:
    client.send({"type": "ping"})
    await client.receive_type("pong")


def token(env, user: str, **claims) -> str:
    claims.setdefault("iat", int(time.time()))
    return env.cluster.token(user, **claims)


@pytest_twisted.ensureDeferred
async def test_kick_closes_every_connection_of_the_user_on_every_gateway(env):
    """An operator kicks a user: each connection, on both gateways and every transport, is told `kicked` and closed within 2 s; others stay."""
    alice, bob = unique("alice"), unique("bob")
    clients = []
    for gw in (env.gw1, env.gw2):
        for transport in TRANSPORTS:
            clients.append((transport, await login(gw, transport, token(env, alice))))
    bystander = await login(env.gw1, "ws", token(env, bob))
    started = time.monotonic()
    r = await http_call(env.api.http_port, "POST", f"/v1/users/{alice}/kick", {"reason": "abuse"}, token=ADMIN)
    assert r.status == 202, r.body
    assert r.json["gateways"] == 2
    await defer.gatherResults([defer.Deferred.fromCoroutine(closed_with(c, "kicked", t, KICK_WITHIN + 1))
                               for t, c in clients], consumeErrors=True)
    assert time.monotonic() - started < KICK_WITHIN + 1
    await still_open(bystander)
    # the kicked user may come back (a kick is no ban: revoke is)
    again = await login(env.gw2, "tcp", token(env, alice))
    await still_open(again)
    metrics = (await http_call(env.gw1.metrics_port, "GET", "/metrics")).text
    assert metric_value(metrics, "imcluster_closes_total", {"reason": "kicked"}) >= 4


@pytest_twisted.ensureDeferred
async def test_kick_is_admin_only_and_checks_the_user_id(env):
    """A user cannot kick anyone (403); a bad user id is 400; a user with no connection is still 202."""
    alice = unique("alice")
    r = await http_call(env.api.http_port, "POST", f"/v1/users/{alice}/kick", None, token=token(env, alice))
    assert r.status == 403
    r = await http_call(env.api.http_port, "POST", "/v1/users/bad%23id/kick", None, token=ADMIN)
    assert r.status == 400
    r = await http_call(env.api.http_port, "POST", f"/v1/users/{alice}/revoke", None, token=token(env, alice))
    assert r.status == 403
    r = await http_call(env.api.http_port, "POST", f"/v1/users/{unique('nobody')}/kick", None, token=ADMIN)
    assert r.status == 202 and r.json["gateways"] == 0


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest_twisted.ensureDeferred
async def test_revoke_closes_old_tokens_and_refuses_them_at_auth(env, transport):
    """After a revoke, connections authenticated with older tokens are told `token_revoked` and closed on both gateways;
    a newer token's connection stays; an old token is refused at auth on every gateway; a token issued after works."""
    alice = unique("alice")
    now = int(time.time())
    old = token(env, alice, iat=now - 60)
    newer = token(env, alice, iat=now + 5)  # issued "after" the revoke below (within the JWT leeway)
    victims = [await login(env.gw1, transport, old), await login(env.gw2, transport, old)]
    survivor = await login(env.gw2, transport, newer)
    r = await http_call(env.api.http_port, "POST", f"/v1/users/{alice}/revoke", None, token=ADMIN)
    assert r.status == 202, r.body
    not_before = r.json["notBefore"]
    assert abs(not_before - time.time() * 1000) < 5000
    await defer.gatherResults([defer.Deferred.fromCoroutine(closed_with(c, "token_revoked", transport, KICK_WITHIN + 1))
                               for c in victims], consumeErrors=True)
    await still_open(survivor)
    for gw in (env.gw1, env.gw2):
        client = await connect(gw, transport)
        reply = await client.auth(old)
        assert reply["ok"] is False and reply["error"]["code"] == "token_revoked", reply
        if transport == "ws":
            how = await client.closed.addTimeout(5, reactor)
            assert how[0] == 4001
    later = await login(env.gw1, transport, token(env, alice, iat=not_before // 1000 + 1))
    await still_open(later)


@pytest_twisted.ensureDeferred
async def test_revoke_of_a_refreshed_connection_follows_its_current_token(env):
    """A connection that refreshed to a newer token before the revoke survives it; a refresh with a revoked token closes it."""
    alice = unique("alice")
    now = int(time.time())
    client = await login(env.gw1, "tcp", token(env, alice, iat=now - 60))
    client.send({"type": "auth", "token": token(env, alice, iat=now + 5)})
    assert (await client.receive_type("auth_reply"))["ok"] is True
    other = await login(env.gw2, "ws", token(env, alice, iat=now - 60))
    r = await http_call(env.api.http_port, "POST", f"/v1/users/{alice}/revoke", None, token=ADMIN)
    assert r.status == 202
    await closed_with(other, "token_revoked", "ws", KICK_WITHIN + 1)
    await still_open(client)
    client.send({"type": "auth", "token": token(env, alice, iat=now - 30)})
    reply = await client.receive_type("auth_reply")
    assert reply["ok"] is False and reply["error"]["code"] == "token_revoked"
    await client.closed.addTimeout(5, reactor)

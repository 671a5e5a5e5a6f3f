"""``--postgres-replica``: history and the HTTP API's reads come from a real streaming replica.

A PostgreSQL primary and a hot standby streaming from it are started by the
test itself (initdb, pg_basebackup; their own ports and data folders under a
temporary folder, tests/support/private.py), never the shared server. While
the replica's WAL replay is paused, what a client and the HTTP API read is
the replica's older view, whereas messages keep being stored, numbered and
synced on the primary; once replay resumes the reads catch up.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import threads

from imcluster.db import apply_migrations_sync
from tests.support.clients import connect_ws
from tests.support.http import http_call
from tests.support.private import PrivatePostgres
from tests.support.waiting import eventually

pytestmark = pytest.mark.slow


@pytest_twisted.async_yield_fixture
async def pg_pair():
    """A private primary and a streaming replica of it on loopback (stopped and deleted afterwards)."""
    base = Path(tempfile.mkdtemp(prefix="imreplica-"))
    primary = PrivatePostgres(base / "primary")
    replica = PrivatePostgres(base / "replica", primary=primary)
    try:
        await primary.start()
        await threads.deferToThread(apply_migrations_sync, primary.dsn, "public", 10.0)
        await replica.start()
        yield primary, replica
    finally:
        await replica.close()
        await primary.close()
        shutil.rmtree(base, ignore_errors=True)


async def _history(client, session: str) -> list[int]:
    client.send({"type": "history", "id": "h", "sessionId": session, "limit": 50})
    reply = await client.receive_type("history_reply", timeout=10.0)
    return [m["seq"] for m in reply["messages"]]


@pytest.mark.timeout(240)
@pytest_twisted.ensureDeferred
async def test_history_is_read_from_the_replica_and_messages_are_stored_on_the_primary(cluster, pg_pair):
    """A replica option that silently read the primary (or stored on the replica) would pass unnoticed without this."""
    primary, replica = pg_pair
    cluster.postgres_dsn = primary.dsn
    cluster.pg_schema = "public"  # the private primary's own database, migrated by pg_pair
    gw = await cluster.start_gateway()
    await cluster.start_processor(postgres_replica=replica.dsn)
    api = await cluster.start_api(postgres_replica=replica.dsn)
    alice = await connect_ws(gw.ws_url)
    await alice.auth(cluster.token("alice"))
    session = "p2p:alice:bob"

    async def say(n: int) -> dict:
        alice.send({"type": "message", "clientMsgId": f"m{n}", "sessionId": session, "body": {"n": n}})
        reply = await alice.receive_type("message_reply", timeout=15.0)
        assert reply["ok"], reply
        return reply

    assert (await say(1))["seq"] == 1
    await eventually(lambda: threads.deferToThread(
        replica.query, "SELECT count(*) FROM messagerecv")
        .addCallback(lambda rows: rows[0][0] == 1), 15.0, "message 1 replayed on the replica")
    assert await _history(alice, session) == [1]

    # the replica stops replaying: the primary goes on alone
    await threads.deferToThread(replica.query, "SELECT pg_wal_replay_pause()")
    assert (await say(2))["seq"] == 2  # seq assigned on the primary, whatever the replica knows
    assert primary.query("SELECT seq FROM messagerecv ORDER BY seq") == [(1,), (2,)]
    assert replica.query("SELECT seq FROM messagerecv ORDER BY seq") == [(1,)]
    # history (the processors) and the HTTP API read the replica's older view ...
    assert await _history(alice, session) == [1]
    token = cluster.token("alice")
    r = await http_call(api.http_port, "GET", f"/v1/sessions/{session}/messages", token=token)
    assert r.status == 200, r.text
    assert [m["seq"] for m in r.json["messages"]] == [1]
    # ... while sync (what a connecting device gets) stays on the primary: bob gets both
    bob = await connect_ws(gw.ws_url)
    await bob.auth(cluster.token("bob"))
    await bob.receive_type("sync_done", timeout=15.0)
    assert sorted(f["seq"] for f in bob.received if f.get("type") == "message_send") == [1, 2]
    # whose connections read the replica: the processor's and the API's replica pools
    names = {n for (n,) in replica.query("SELECT DISTINCT application_name FROM pg_stat_activity")}
    assert {"imcluster-processor-replica", "imcluster-api-replica"} <= names, names

    await threads.deferToThread(replica.query, "SELECT pg_wal_replay_resume()")
    seqs = await eventually(lambda: threads.deferToThread(
        replica.query, "SELECT count(*) FROM messagerecv").addCallback(lambda rows: rows[0][0] == 2),
        15.0, "replay resumed")
    assert seqs
    assert await _history(alice, session) == [1, 2]
    alice.close()
    bob.close()

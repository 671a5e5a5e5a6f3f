"""``twistd improcessor`` as a process: --migrate, /healthz and /metrics, SIGTERM, a bad filter."""

from __future__ import annotations

import json
import signal
import time
import urllib.request

import pytest
import pytest_twisted
from twisted.internet import threads

from imcluster.config import PROCESSOR
from tests.support.clients import connect_tcp
from tests.support.cluster import CLEAN_EXIT
from tests.test_e2e_cluster import WAIT, User, eventually, query, sleep

pytestmark = pytest.mark.slow


def http_get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest_twisted.ensureDeferred
async def test_migrate_health_metrics_and_sigterm_mid_stream(cluster, pg_fresh_schema):
    """An operator's processor would not create its tables, report health, or lose work on SIGTERM."""
    # batch_size 1: slow enough that SIGTERM lands mid-stream
    proc = await cluster.start_processor(metrics=True, migrate=True, postgres_schema=pg_fresh_schema,
                                         batch_size=1)
    assert [v for (v,) in query(pg_fresh_schema, "SELECT version FROM schema_migrations ORDER BY 1")][:1] == ["0001"]
    status, body = await threads.deferToThread(http_get, proc.metrics_port, "/healthz")
    assert status == 200 and json.loads(body)["ok"] is True
    gw = await cluster.start_gateway()
    alice = await User("alice", await connect_tcp(gw.tcp_port)).login(cluster.token("alice"))
    for n in range(90):  # paced: separate queue messages, one window each
        alice.client.send({"type": "message", "clientMsgId": f"m{n}", "sessionId": "p2p:alice:bob", "body": n})
        await sleep(0.003)
    await eventually(lambda: len(alice.of_type("message_reply")) >= 20, WAIT, "first replies")
    started = time.monotonic()
    assert await proc.stop(signal.SIGTERM) in CLEAN_EXIT
    assert time.monotonic() - started < 10.0  # --shutdown-timeout of the harness
    assert "processor stopping" in proc.log_text() or "improcessor stopped" in proc.log_text()
    # what the stopped one did not finish is redelivered to the next processor
    await cluster.start_processor(metrics=True, postgres_schema=pg_fresh_schema)
    await eventually(lambda: {r["clientMsgId"] for r in alice.of_type("message_reply")}
                     >= {f"m{n}" for n in range(90)}, WAIT, "every message answered")
    assert all(r["ok"] for r in alice.of_type("message_reply"))
    rows = query(pg_fresh_schema, "SELECT seq FROM messagerecv ORDER BY seq")
    assert [s for (s,) in rows] == list(range(1, 91))
    second = cluster.processes[-1]
    status, text = await threads.deferToThread(http_get, second.metrics_port, "/metrics")
    assert status == 200 and b"imcluster_batch_size_count" in text


@pytest_twisted.ensureDeferred
async def test_unknown_filter_stops_the_processor_before_it_starts(cluster):
    """A typo in --filters would run a processor without its moderation."""
    proc = cluster.spawn(PROCESSOR, {"filters": ["keyword", "no-such-filter"]})
    rc = await proc.wait(20.0)
    assert rc not in (0, None)
    assert "unknown filter 'no-such-filter'" in proc.log_text()

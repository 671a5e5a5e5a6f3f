"""Retention: ``imcluster prune`` and the processors' ``retention_days`` remove what is old, and only that."""

from __future__ import annotations

import subprocess
import sys

import pytest
import pytest_twisted
from psycopg2 import sql

from imcluster.store.prune import prune
from tests.support.ids import POSTGRES_DSN, unique
from tests.support.postgres import admin_connection
from tests.support.waiting import eventually

DAY = 86400


def seed(schema: str, sessions: int, per_session: int, age_days: float, delivered: bool = True,
         recipients: int = 2) -> None:
    """``sessions`` x ``per_session`` messages created ``age_days`` ago, each with ``recipients`` rows."""
    conn = admin_connection()
    try:
        with conn.cursor() as c:
            c.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
            tag = unique("s")
            c.execute("INSERT INTO session (id) SELECT %s || '-' || g FROM generate_series(1, %s) g", (tag, sessions))
            c.execute(
                "INSERT INTO messagerecv (session_id, seq, sender_id, client_msg_id, body, created_at) "
                "SELECT %s || '-' || s, q, 'alice', %s || '-' || s || '-' || q, '{\"text\":\"hi\"}', "
                "now() - make_interval(secs => %s) FROM generate_series(1, %s) s, generate_series(1, %s) q",
                (tag, tag, age_days * DAY, sessions, per_session))
            c.execute(
                "INSERT INTO messagesend (user_id, msg_id, session_id, seq, status, updated_at) "
                "SELECT 'u' || r, id, session_id, seq, %s, created_at FROM messagerecv, generate_series(1, %s) r "
                "WHERE client_msg_id LIKE %s",
                ("delivered" if delivered else "pending", recipients, tag + "-%"))
    finally:
        conn.close()


def counts(schema: str) -> tuple[int, int, int]:
    """(messages, delivery rows, delivered rows)."""
    conn = admin_connection()
    try:
        with conn.cursor() as c:
            c.execute(sql.SQL("SELECT (SELECT count(*) FROM {s}.messagerecv), (SELECT count(*) FROM {s}.messagesend), "
                              "(SELECT count(*) FROM {s}.messagesend WHERE status = 'delivered')").format(
                s=sql.Identifier(schema)))
            return c.fetchone()
    finally:
        conn.close()


def age_delivered(schema: str, days: float) -> None:
    conn = admin_connection()
    try:
        with conn.cursor() as c:
            c.execute(sql.SQL("UPDATE {}.messagesend SET updated_at = now() - make_interval(secs => %s) "
                              "WHERE status = 'delivered'").format(sql.Identifier(schema)), (days * DAY,))
    finally:
        conn.close()


@pytest_twisted.ensureDeferred
async def test_prune_removes_old_messages_in_small_statements(pg, pg_schema):
    """Messages older than the cutoff go with their delivery rows; younger ones stay; every statement is small."""
    seed(pg_schema, 3, 50, age_days=40)           # 150 old messages, 300 rows
    seed(pg_schema, 2, 10, age_days=1)            # 20 young ones, 40 rows
    result = await prune(pg, 30, None, batch=16)
    assert (result.messages, counts(pg_schema)[:2]) == (150, (20, 40))
    assert result.statements >= 150 // 16 * 2  # batches, not one big DELETE
    again = await prune(pg, 30, None, batch=16)
    assert again.messages == 0 and again.statements == 1


@pytest_twisted.ensureDeferred
async def test_prune_removes_delivered_rows_only(pg, pg_schema):
    """Delivered rows older than their cutoff go; undelivered rows and the messages stay; the walk resumes."""
    seed(pg_schema, 2, 30, age_days=5, delivered=True)
    seed(pg_schema, 1, 30, age_days=5, delivered=False)
    age_delivered(pg_schema, 5)
    stop_after = {"n": 0}

    def keep_going() -> bool:
        stop_after["n"] += 1
        return stop_after["n"] <= 3

    first = await prune(pg, None, 2, batch=10, keep_going=keep_going)
    assert first.next_key is not None and first.deliveries == 30  # 3 pages of 10 rows
    rest = await prune(pg, None, 2, batch=10, start_key=first.next_key)
    assert rest.next_key is None and first.deliveries + rest.deliveries == 120
    assert counts(pg_schema) == (90, 60, 0)


def test_prune_command(pg_schema):
    """`imcluster prune --older-than DAYS` prunes the configured schema and says what it did."""
    seed(pg_schema, 2, 25, age_days=10)
    seed(pg_schema, 1, 5, age_days=0)
    exe = [sys.executable, "-m", "imcluster.cli"]
    out = subprocess.run([*exe, "prune", "--older-than", "7", "--batch", "7", "--postgres", POSTGRES_DSN,
                          "--postgres-schema", pg_schema], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"pruned 50 messages and 0 delivered rows from schema {pg_schema}")
    assert counts(pg_schema)[:2] == (5, 10)
    bad = subprocess.run([*exe, "prune", "--older-than", "-1", "--postgres-schema", pg_schema],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "must be >= 0" in bad.stderr


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_processors_apply_retention_days(cluster, pg_schema):
    """With retention_days, a processor removes old messages by itself (two processors: one at a time)."""
    seed(pg_schema, 4, 100, age_days=3)
    seed(pg_schema, 1, 10, age_days=0)
    for _ in range(2):
        await cluster.start_processor(retention_days=2, retention_delivered_days=1, retention_interval=0.5,
                                      retention_batch=50)
    await eventually(lambda: counts(pg_schema)[:2] == (10, 20), 20, "old messages pruned")
    seed(pg_schema, 1, 30, age_days=1.5)  # kept (younger than 2 days), delivered 1.5 days ago: their rows go
    await eventually(lambda: counts(pg_schema)[:2] == (40, 20), 20, "old delivered rows pruned")
    logs = "".join(p.log_text() for p in cluster.processes)
    assert "retention: pruned" in logs


@pytest.mark.slow
def test_prune_bench_tiny():
    """bench/prune.py --tiny runs: the prune's time and p2p latency before, during and after are printed."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    if not (root / "bench" / "node_modules" / "ws").is_dir():
        from tests.support.node import ensure_npm_packages

        ensure_npm_packages(root / "bench", "ws")
    out = subprocess.run([sys.executable, str(root / "bench" / "prune.py"), "--tiny"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "pruned 20000 messages" in out.stdout
    assert "p2p latency during the prune, window 1: p50 " in out.stdout
    assert "(0 delivered)" not in out.stdout

"""Retention under load: ``imcluster prune`` on a million rows while p2p messages flow (a script, not a test).

    .venv/bin/python bench/prune.py                # 1,000,000 old messages (and as many delivery rows)
    .venv/bin/python bench/prune.py --tiny         # 20,000: a few seconds
    .venv/bin/python bench/prune.py --rows 200000 --batch 500 --pause 0.01

Starts bench/run.py's cluster (2 gateways, 1 processor, its own namespace,
Redis prefix and PostgreSQL schema), fills ``messagerecv`` with ``--rows``
messages 40 days old (100 a session, each with one ``delivered``
``messagesend`` row; with ``--delivered``, 10 days old, so that only their
delivered rows go), then:

1. p2p latency with nothing else running (the generator's p2p-latency
   scenario, ``--pairs`` pairs at ``--rate`` messages/s for ``--seconds``);
2. ``imcluster prune --older-than 30`` (``--batch``, ``--pause``;
   ``--delivered-older-than 5`` with ``--delivered``) in the
   background and, at the same time, p2p latency windows of ``--seconds``
   each until the prune has finished;

and prints the prune's run time, the rows it removed, and the p2p latency
percentiles before and during the prune. Needs ``npm ci --prefix bench``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import run as benchrun  # noqa: E402  (bench/run.py: the cluster and the generator)

SEED_SQL = """
INSERT INTO session (id) SELECT 'old-' || g FROM generate_series(1, %(sessions)s) g;
INSERT INTO messagerecv (session_id, seq, sender_id, client_msg_id, body, created_at)
  SELECT 'old-' || (1 + (g - 1) / 100), 1 + (g - 1) %% 100, 'old-sender', 'old-' || g,
         '{"text":"an old message"}', now() - make_interval(days => %(age)s)
  FROM generate_series(1, %(rows)s) g;
INSERT INTO messagesend (user_id, msg_id, session_id, seq, status, updated_at)
  SELECT 'old-reader', id, session_id, seq, 'delivered', created_at FROM messagerecv
  WHERE sender_id = 'old-sender';
UPDATE session s SET last_seq = 100 WHERE id LIKE 'old-%%';
ANALYZE messagerecv;
ANALYZE messagesend;
"""


def left(args, schema: str) -> dict:
    """What the prune should have removed and did not: seeded rows still there, by status."""
    import psycopg2

    conn = psycopg2.connect(args.postgres)
    try:
        with conn.cursor() as c:
            c.execute(f'SET search_path TO "{schema}"')
            c.execute("SELECT count(*) FROM messagerecv WHERE sender_id = 'old-sender'")
            messages = c.fetchone()[0]
            c.execute("SELECT status, count(*) FROM messagesend WHERE user_id = 'old-reader' GROUP BY status")
            rows = dict(c.fetchall())
        conn.rollback()
    finally:
        conn.close()
    return {"messages": messages, "delivery_rows": rows}


def seed(args, schema: str, rows: int) -> float:
    import psycopg2

    started = time.monotonic()
    conn = psycopg2.connect(args.postgres)
    try:
        conn.autocommit = False
        with conn.cursor() as c:
            c.execute(f'SET search_path TO "{schema}"')
            c.execute(SEED_SQL, {"rows": rows, "sessions": -(-rows // 100), "age": 10 if args.delivered else 40})
        conn.commit()
    finally:
        conn.close()
    return time.monotonic() - started


_windows = iter(range(1, 1000))


def latency(cluster, params: dict) -> dict:
    # each window its own users and clientMsgIds (the generator names them after the run id)
    base = cluster.run_id.split("w")[0]
    cluster.run_id = f"{base}w{next(_windows)}"
    r = benchrun.run_cluster_scenario("p2p-latency", cluster.args, cluster, params)
    return {"latency_ms": r.get("latency_ms"), "delivered": r.get("delivered"), "sent": r.get("sent"),
            "lost": r.get("lost")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="20,000 rows and short windows")
    parser.add_argument("--rows", type=int, default=1_000_000, help="old messages to prune")
    parser.add_argument("--batch", type=int, default=1000, help="imcluster prune --batch")
    parser.add_argument("--delivered", action="store_true",
                        help="the messages are 10 days old and kept (--older-than 30): prune only their "
                             "delivered rows (--delivered-older-than 5), walking messagesend's key")
    parser.add_argument("--pause", type=float, default=0.0, help="imcluster prune --pause")
    parser.add_argument("--pairs", type=int, default=100, help="p2p pairs")
    parser.add_argument("--rate", type=int, default=500, help="p2p messages per second (all pairs)")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds of each latency window")
    parser.add_argument("--json", help="write the results here too")
    parser.add_argument("--redis", default=os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--amqp", default=os.environ.get("BENCH_AMQP", "amqp://guest:guest@127.0.0.1:5672/%2F"))
    parser.add_argument("--postgres", default=os.environ.get("BENCH_POSTGRES",
                                                             "postgresql://root@127.0.0.1:5432/test"))
    args = parser.parse_args(argv)
    if args.tiny:
        args.rows, args.pairs, args.rate, args.seconds = 20_000, 5, 100, 1.0
    # what bench/run.py's Cluster reads
    args.processors, args.rate_limit, args.trace, args.profile = 1, 1000000, False, None
    args.gateway_arg, args.processor_arg = [], []
    if not (BENCH / "node_modules" / "ws").is_dir():
        raise SystemExit("bench: bench/node_modules/ws is missing: run `npm ci --prefix bench`")
    workdir = BENCH / "results" / "logs"
    workdir.mkdir(parents=True, exist_ok=True)
    cluster = benchrun.Cluster(args, workdir)
    params = {"pairs": args.pairs, "rate": args.rate, "seconds": args.seconds, "drain": 30}
    out: dict = {"rows": args.rows, "batch": args.batch, "pause": args.pause, "p2p": params,
                 "machine": benchrun.machine()}
    try:
        cluster.start()
        benchrun.log(f"seeding {args.rows} old messages and {args.rows} delivered rows")
        out["seed_seconds"] = round(seed(args, cluster.schema, args.rows), 1)
        benchrun.log(f"seeded in {out['seed_seconds']}s; p2p latency alone")
        out["before"] = latency(cluster, params)
        prune = subprocess.Popen(
            [str(benchrun.BIN / "imcluster"), "prune", "--older-than", "30",
             *(["--delivered-older-than", "5"] if args.delivered else []), f"--batch={args.batch}",
             f"--pause={args.pause}", f"--postgres={args.postgres}", f"--postgres-schema={cluster.schema}"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started = time.monotonic()
        done = {}

        def wait_prune() -> None:
            stdout, stderr = prune.communicate()
            done["seconds"] = time.monotonic() - started
            done["stdout"], done["stderr"], done["rc"] = stdout.strip(), stderr.strip(), prune.returncode

        waiter = threading.Thread(target=wait_prune)
        waiter.start()
        during = []
        while waiter.is_alive() or not during:
            benchrun.log("p2p latency while the prune runs")
            during.append(latency(cluster, params))
        waiter.join()
        out["prune"] = {"seconds": round(done["seconds"], 1), "output": done["stdout"], "rc": done["rc"],
                        "stderr": done["stderr"][-2000:]}
        out["left"] = left(args, cluster.schema)
        out["during"] = during
        benchrun.log("p2p latency after the prune")
        out["after"] = latency(cluster, params)
    finally:
        cluster.stop()

    def fmt(r: dict) -> str:
        lat = r.get("latency_ms") or {}
        return (f"p50 {lat.get('p50')} ms, p99 {lat.get('p99')} ms, max {lat.get('max')} ms "
                f"({r.get('delivered')} delivered)")

    print(f"prune of {args.rows} messages + {args.rows} delivered rows, batch {args.batch}, pause {args.pause}s: "
          f"{out['prune']['seconds']} s  [{out['prune']['output']}]; seeded rows left: {out['left']}")
    print(f"p2p latency before ({args.pairs} pairs, {args.rate} msgs/s, {args.seconds:g} s windows): "
          f"{fmt(out['before'])}")
    for i, r in enumerate(out["during"], 1):
        print(f"p2p latency during the prune, window {i}: {fmt(r)}")
    print(f"p2p latency after: {fmt(out['after'])}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0 if out["prune"]["rc"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

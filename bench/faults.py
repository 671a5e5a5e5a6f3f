"""Measure how deliveries heal after faults (issue 12): a script, not a test.

    .venv/bin/python bench/faults.py                  # the three faults, steady load
    .venv/bin/python bench/faults.py --tiny           # a minute or so (what CI runs)
    .venv/bin/python bench/faults.py --quiet          # the load stops before the last gateway is back
    .venv/bin/python bench/faults.py --faults redis-restart --users 8 --rate 4 --json out.json

Starts a private RabbitMQ node and a private Redis (tests/support/private.py:
their own ports, data and epmd, stopped afterwards; the shared services are
never touched), two gateways and two processors on them and on a fresh
PostgreSQL schema of the shared server (dropped afterwards), connects the
acknowledging load of tests/support/load.py, then runs each fault in turn on
the same cluster (tests/support/faults.py) and accounts for every
acknowledged message at every connection (tests/support/ledger.py):

lost, duplicated (extra copies; clients de-duplicate by msgId), healed
(acknowledged before the dependency answered again, arrived after), seq gaps,
the worst delay (from the reply, or from the heal when the reply came first:
PROTOCOL.md allows 10 s), and how long after the heal the last stuck delivery
arrived. Prints a table, writes JSON (``--json``), and exits 0 whatever the
figures: it measures, the tests judge.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from twisted.internet import defer, task  # noqa: E402

from tests.support.cluster import Cluster  # noqa: E402
from tests.support.faults import FAULTS, run_fault, start_fault_cluster  # noqa: E402
from tests.support.load import Load  # noqa: E402
from tests.support.private import PrivateRabbit, PrivateRedis  # noqa: E402

COLUMNS = ("fault", "mode", "messages", "pairs", "lost", "dup", "healed", "gaps", "worst_s",
           "last_stuck_s", "first_ok_s", "fault_s")


def log(msg: str) -> None:
    print(f"faults: {msg}", file=sys.stderr, flush=True)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated, of {', '.join(FAULTS)}")
    p.add_argument("--users", type=int, default=6)
    p.add_argument("--rate", type=float, default=3.0, help="messages a second per user")
    p.add_argument("--down", type=float, default=2.0, help="seconds a dependency stays down")
    p.add_argument("--steady", type=float, default=3.0, help="seconds of load before each fault")
    p.add_argument("--after", type=float, default=5.0, help="seconds of load once messages are taken again")
    p.add_argument("--quiet", action="store_true",
                   help="stop the load just before the last gateway is back (what only healing delivers)")
    p.add_argument("--tiny", action="store_true", help="a minute or so: 4 users, short phases")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--keep", action="store_true", help="keep the private services' folders")
    args = p.parse_args(argv)
    if args.tiny:
        args.users, args.rate, args.down, args.steady, args.after = 4, 2.0, 1.0, 1.0, 1.0
    unknown = [f for f in args.faults.split(",") if f not in FAULTS]
    if unknown:
        p.error(f"unknown fault(s) {unknown}; known: {list(FAULTS)}")
    return args


def table(rows: list[dict]) -> str:
    def cell(v):
        if v is None:
            return "-"
        return f"{v:.2f}" if isinstance(v, float) else str(v)
    lines = [" ".join(f"{c:>12}" if i else f"{c:<18}" for i, c in enumerate(COLUMNS))]
    for r in rows:
        lines.append(" ".join(f"{cell(r[c]):>12}" if i else f"{cell(r[c]):<18}" for i, c in enumerate(COLUMNS)))
    return "\n".join(lines)


async def main(reactor, argv: list[str]) -> None:
    from imcluster.db import apply_migrations_sync
    from tests.support.ids import POSTGRES_DSN
    from tests.support.postgres import drop_schema

    args = parse(argv)
    run = uuid.uuid4().hex[:8]
    base = Path(tempfile.mkdtemp(prefix=f"imfaults-{run}-"))
    schema = f"imt_faults_{run}"
    rabbit = PrivateRabbit(base / "rabbit")
    redis = PrivateRedis(base / "redis")
    cluster = Cluster(base, f"imf{run}", f"imf:{run}:", schema)
    fc = load = None
    rows: list[dict] = []
    try:
        apply_migrations_sync(POSTGRES_DSN, schema, 10.0)
        took = await rabbit.start()
        log(f"private RabbitMQ {rabbit.node} on {rabbit.port} started in {took:.2f}s")
        await redis.start()
        fc = await start_fault_cluster(cluster, rabbit, redis)
        load = Load(cluster.token, fc.gateways, users=args.users, rate=args.rate, second_device=not args.quiet)
        await load.connect()
        log(f"{len(load.conns)} connections, sessions {sorted(load.sessions)}")
        for name in args.faults.split(","):
            kw = {"down": args.down}
            if args.quiet and name == "broker-restart":
                kw["gateway_lags"] = (0.0, 1.0)
            log(f"{name}: {args.steady:g}s of load, then the fault")
            report, fault_s = await run_fault(fc, load, name, steady=args.steady, after=args.after,
                                              quiet=args.quiet, **kw)
            log(f"{name}: {report.line()}")
            rows.append({"fault": name, "mode": "quiet" if args.quiet else "steady",
                         "messages": report.messages, "pairs": report.pairs, "lost": report.lost,
                         "dup": report.duplicated, "healed": report.healed,
                         "gaps": report.seq_gaps + report.server_seq_gaps,
                         "worst_s": report.worst_delay_s, "last_stuck_s": report.last_stuck_after_heal_s,
                         "first_ok_s": report.first_ok_after_heal_s, "fault_s": fault_s,
                         "report": report.as_dict()})
    finally:
        if load is not None:
            load.close()
        if fc is not None:
            await fc.close()
        await cluster.shutdown()
        await redis.close()
        await rabbit.close()
        drop_schema(schema)
        if args.keep:
            log(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    print(table(rows))
    print(f"private RabbitMQ start: {', '.join(f'{t:.2f}s' for t in rabbit.start_times)}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "run": run, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "rabbit_start_s": rabbit.start_times, "results": rows}, indent=2, default=str))


if __name__ == "__main__":
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, sys.argv[1:])))

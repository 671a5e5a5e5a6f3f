"""imcluster on several hosts (network namespaces) under load, killing nodes: a script, not a test.

    .venv/bin/python bench/scaleout.py                 # both faults, 6 users
    .venv/bin/python bench/scaleout.py --tiny          # a couple of minutes (what CI runs)
    .venv/bin/python bench/scaleout.py --faults rabbit-node-kill --users 8 --rate 4 --json out.json

Needs root (``ip netns``). Builds the hosts of tests/support/scaleout.py on
a private 10.213.x.0/24 bridge that it creates: a 3-node RabbitMQ cluster
(quorum queues), a PostgreSQL primary and its streaming replica, Redis (a
primary, a replica and 3 Sentinels when the daemons take a
``redis+sentinel://`` URL, else one Redis), two gateway hosts and two
processor hosts, each in a network namespace of its own. It connects the
acknowledging load of tests/support/load.py across both gateways, then in
turn SIGKILLs the RabbitMQ node every daemon is connected to, the Redis
primary (with Sentinels), and one processor host, and prints for each fault the
seconds until deliveries resumed; at the end it accounts for every
acknowledged message at every connection (tests/support/ledger.py: lost,
duplicated, mismatched copies of a msgId, seq gaps) and checks the primary's
seq per session and the replica's copy. Everything it started is stopped
and every namespace, veth and folder it made is deleted afterwards (also
when it fails). Exits 0 whatever the figures (it measures; the test judges),
1 when the cluster could not be built.
"""

from __future__ import annotations

import argparse
import atexit
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from twisted.internet import defer, task  # noqa: E402

from tests.support.netns import available  # noqa: E402
from tests.support.scaleout import (  # noqa: E402
    FAULTS, ScaleoutCluster, as_json, default_faults, run_scaleout, sentinel_supported)


def log(msg: str) -> None:
    print(f"scaleout: {msg}", file=sys.stderr, flush=True)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--faults", default=None,
                   help=f"comma-separated, in order, of {', '.join(FAULTS)} (default: every one the topology has)")
    p.add_argument("--redis-mode", default="auto", choices=("auto", "sentinel", "single"),
                   help="sentinel: Redis primary + replica + 3 Sentinels; auto: sentinel when the daemons "
                        "take a redis+sentinel:// URL, else one Redis")
    p.add_argument("--users", type=int, default=6)
    p.add_argument("--rate", type=float, default=3.0, help="messages a second per user")
    p.add_argument("--steady", type=float, default=4.0, help="seconds of load before the first fault")
    p.add_argument("--after", type=float, default=5.0, help="seconds of load after deliveries resumed")
    p.add_argument("--queue-type", default="quorum", choices=("quorum", "classic"))
    p.add_argument("--tiny", action="store_true", help="4 users, short phases: a couple of minutes")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--keep", action="store_true", help="keep the hosts' folders (logs, data)")
    args = p.parse_args(argv)
    if args.tiny:
        args.users, args.rate, args.steady, args.after = 4, 2.0, 2.0, 3.0
    if args.redis_mode == "auto":
        args.redis_mode = "sentinel" if sentinel_supported() else "single"
    if args.faults is None:
        args.faults = ",".join(default_faults(args.redis_mode))
    unknown = [f for f in args.faults.split(",") if f not in FAULTS]
    if unknown:
        p.error(f"unknown fault(s) {unknown}; known: {list(FAULTS)}")
    return args


async def main(reactor, argv: list[str]) -> None:
    args = parse(argv)
    why = available()
    if why:
        log(f"cannot build hosts here: {why}")
        raise SystemExit(1)
    base = Path(tempfile.mkdtemp(prefix="imscaleout-"))
    if not args.keep:
        # also when SIGTERM/SIGINT stop the reactor before the finally below runs
        atexit.register(shutil.rmtree, base, True)
    sc = ScaleoutCluster(base, queue_type=args.queue_type, redis_mode=args.redis_mode, log=log)
    # SIGTERM/SIGINT: stop the reactor; the finally below (and the Net's atexit) remove everything
    began = time.monotonic()
    ok = False
    try:
        try:
            await sc.start()
        except Exception as e:
            log(f"the cluster could not be built: {e}")
            log(sc.report()[-4000:])
            raise SystemExit(1)
        log(f"cluster up in {sc.timings['start_s']:.1f} s")
        report, results, db = await run_scaleout(
            sc, args.faults.split(","), users=args.users, rate=args.rate, steady=args.steady,
            after=args.after, log=log)
        ok = True
    finally:
        await sc.close()
        left = sc.net.leftovers() if sc.net is not None else []
        if left:
            log(f"LEFT BEHIND: {left}")
        if args.keep or not ok:
            log(f"kept {base}")
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    print(f"{'fault':<22}{'resume_s':>10}{'gap_s':>8}  what")
    for r in results:
        print(f"{r.name:<22}{'-' if r.resume_s is None else f'{r.resume_s:.2f}':>10}"
              f"{'-' if r.longest_gap_s is None else f'{r.longest_gap_s:.2f}':>8}  {r.what}")
    print(report.line())
    print(f"database: {db}")
    print(f"total {time.monotonic() - began:.1f} s (cluster start {sc.timings.get('start_s', 0):.1f} s)")
    if args.json is not None:
        params = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(as_json(report, results, db, sc, params))


if __name__ == "__main__":
    # SIGTERM/SIGINT stop the reactor; the Net's atexit handler then removes every host
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, sys.argv[1:])))

"""Capacity growth: p2p delivered msgs/s with 1 and 2 processor hosts, and where the CPU goes (a script, not a test).

    .venv/bin/python bench/capacity.py                      # 1 and 2 processors, 2 rounds of 15 s
    .venv/bin/python bench/capacity.py --processors 1,2,3 --rounds 3 --duration 20
    .venv/bin/python bench/capacity.py --tiny               # seconds (a smoke run)
    .venv/bin/python bench/capacity.py -- --redis redis://...   # anything after -- goes to bench/run.py

Runs bench/run.py's ``p2p-throughput`` scenario (the Node load generator,
``npm ci --prefix bench`` first; 2 gateways, its own namespace, Redis prefix
and PostgreSQL schema) once per processor count and round, alternating the
counts so that a change in the machine's other load hits each alike, and
prints one row per run: delivered msgs/s, and the CPU shares (% of one core)
of the gateways, the processors (all, and per processor), the generator,
the services (Redis, RabbitMQ, PostgreSQL) and everything else on the
machine (other developers' work: the noise of the figure). Then the median
per count and the ratio to one processor.

A processor *host* on one machine is a process: what a second one adds is
a second Python reactor (its own core, if there is one free). This
machine has 2 cores for everything, so the trend and the CPU shares are
the figures, not a claim of linear scaling (docs/deploy.rst uses them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COLS = ("gateways", "processors", "generator", "services", "other")


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--processors", default="1,2", help="processor counts, comma-separated")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--duration", type=float, default=15.0, help="seconds each measured phase runs")
    p.add_argument("--tiny", action="store_true", help="one round of a few seconds")
    p.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = p.parse_args(argv)
    if args.tiny:
        args.rounds, args.duration = 1, 3.0
    return args, extra


def one_run(processors: int, args: argparse.Namespace, extra: list[str], workdir: Path, n: int) -> dict:
    out = workdir / f"run{n}-p{processors}.json"
    argv = [sys.executable, str(ROOT / "bench" / "run.py"), "--scenarios", "p2p-throughput",
            "--processors", str(processors), "--duration", str(args.duration), "--json", str(out)]
    if args.tiny:
        argv.append("--tiny")
    proc = subprocess.run(argv + extra, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0 or not out.exists():
        raise SystemExit(f"bench/run.py failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    r = json.loads(out.read_text())["results"]["p2p-throughput"]
    row = {"count": processors, "delivered_per_s": round(r["delivered_per_s"]), "lost": r["lost"],
           "p50_ms": r["reply_latency_ms"]["p50"]}
    row.update({c: r["cpu"].get(c) for c in COLS})
    row["per_processor"] = round(row["processors"] / processors, 1) if row["processors"] is not None else None
    return row


def main(argv: list[str]) -> None:
    args, extra = parse(argv)
    counts = [int(c) for c in args.processors.split(",")]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="imcapacity-") as tmp:
        n = 0
        for _ in range(args.rounds):
            for c in counts:
                n += 1
                row = one_run(c, args, extra, Path(tmp), n)
                rows.append(row)
                print(f"capacity: {row}", file=sys.stderr, flush=True)
    cols = (*COLS, "per_processor")
    head = f"{'processors':>10} {'msgs/s':>8} {'p50 ms':>8} " + " ".join(f"{c + ' %':>16}" for c in cols)
    print(head)
    for r in rows:
        print(f"{r['count']:>10} {r['delivered_per_s']:>8} {r['p50_ms']:>8.0f} "
              + " ".join(f"{r[c]:>16}" for c in cols))
    base = None
    print("median per processor count (ratio to the first):")
    for c in counts:
        med = statistics.median([r["delivered_per_s"] for r in rows if r["count"] == c])
        base = base or med
        print(f"{c:>10} {med:>8.0f}  x{med / base:.2f}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows, "duration": args.duration, "extra": extra}, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])

"""Many idle authenticated connections on 2 gateways, and the p2p latency beside them (a script, not a test).

    .venv/bin/python bench/many_conns.py --conns 100000   # issue 14's target
    .venv/bin/python bench/many_conns.py --tiny           # a few seconds (tests/test_bench.py)

Starts a cluster as ``bench/run.py`` does (2 gateways, ``--processors``
processors, a namespace, Redis key prefix and PostgreSQL schema of its own,
all removed at the end), then:

1. opens ``--base`` (5,000) authenticated idle WebSocket connections and runs
   run.py's ``p2p-latency`` (200 pairs, 1,000 msgs/s, ``--duration`` s);
2. opens the rest up to ``--conns``, from ``--generators`` Node processes
   (bench/gen.js ``conn``), each client bound to one of ``--sources``
   loopback source addresses in turn (127.0.0.2, 127.0.0.3, ...: each has
   its own ~28,000 ephemeral ports);
3. prints, per gateway, its RSS growth per connection it holds (and its open
   file descriptors); Redis memory per connection, both as ``INFO memory``'s
   ``used_memory`` delta (the Redis is shared: other clients move it too) and
   as ``MEMORY USAGE`` of the run's own keys (a sample of ``UCIR`` hashes and
   the ``WSCONNS`` sets, which nothing else touches); the CPU of the
   gateways, processors and services over ``--idle`` (30) seconds with
   every connection idle (one WebSocket ping each per ``ws_ping_interval``,
   30 s by default);
4. runs ``p2p-latency`` again beside them and prints both latencies and their
   ratio (the target: p99 with N connections <= 1.5x p99 with 5,000).

Every process it starts gets the file-descriptor limit raised to the hard
limit (``RLIMIT_NOFILE``); a gateway needs one descriptor per connection, so
when the hard limit is below what ``--conns`` needs, it says so and stops
(``--force`` tries anyway). A connection that fails to open or authenticate
is counted and reported, not fatal: the figures are those of what is held.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench  # noqa: E402  (bench/run.py: the cluster, the generator, the CPU windows)

#: descriptors a gateway holds besides its clients (listeners, Redis, AMQP, logs, metrics)
GATEWAY_FDS = 200


def log(msg: str) -> None:
    print(f"many_conns: {msg}", file=sys.stderr, flush=True)


def raise_fd_limit() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit (inherited by every process started after); (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else 1 << 20
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as e:
            log(f"cannot raise RLIMIT_NOFILE to {target}: {e}")
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def redis_cli(args: argparse.Namespace) -> list[str]:
    from urllib.parse import urlparse

    u = urlparse(args.redis)
    return ["redis-cli", "-h", u.hostname or "127.0.0.1", "-p", str(u.port or 6379),
            "-n", (u.path or "/0").strip("/") or "0"]


def redis(args: argparse.Namespace, *command: str) -> str:
    return subprocess.run(redis_cli(args) + list(command), capture_output=True, text=True, check=True).stdout


def used_memory(args: argparse.Namespace) -> int:
    for line in redis(args, "INFO", "memory").splitlines():
        if line.startswith("used_memory:"):
            return int(line.split(":")[1])
    return 0


def redis_bytes_per_conn(args: argparse.Namespace, cluster, users: list[str]) -> dict:
    """MEMORY USAGE of the run's own keys: a sample of the users' UCIR hashes, every WSCONNS set."""
    sample = users[:: max(1, len(users) // 200)][:200]
    ucir = [int(redis(args, "MEMORY", "USAGE", f"{cluster.redis_prefix}UCIR##{u}", "SAMPLES", "0").strip() or 0)
            for u in sample]
    wsconns = 0
    for key in redis(args, "--scan", "--pattern", f"{cluster.redis_prefix}WSCONNS##*").split():
        wsconns += int(redis(args, "MEMORY", "USAGE", key, "SAMPLES", "0").strip() or 0)
    per_ucir = sum(ucir) / max(1, len(ucir))
    return {"ucir_bytes_per_user": round(per_ucir, 1), "wsconns_bytes_total": wsconns,
            "bytes_per_conn": round(per_ucir + wsconns / max(1, len(users)), 1),
            "sampled_users": len(sample)}


def gateway_connections(port: int) -> int | None:
    """Authenticated WebSocket connections a gateway counts (its /metrics)."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    except OSError:
        return None
    total = 0.0
    for line in text.splitlines():
        if line.startswith("imcluster_connections{") and 'authenticated="true"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


class Holders:
    """Generator processes (gen.js ``conn``) opening and holding idle connections until closed."""

    def __init__(self, args: argparse.Namespace, cluster, sources: list[str]) -> None:
        self.args = args
        self.cluster = cluster
        self.sources = sources
        self.gens: list[bench.Generator] = []
        self.offset = 0

    def open(self, n: int, per_generator: int, concurrency: int, timeout: float) -> dict:
        """Open ``n`` more connections from new generator processes; wait until all are settled."""
        count = max(1, math.ceil(n / per_generator))
        done = threading.Event()
        lock = threading.Lock()
        state = {"left": count, "events": []}

        def on_event(gen, ev):
            if ev["event"] == "connected":
                gen.connected = True
                with lock:
                    state["events"].append(ev)
                    state["left"] -= 1
                    if state["left"] == 0:
                        done.set()

        started = time.monotonic()
        # the authenticated connections the gateways count: when it stops growing for --stall
        # seconds, what is held is measured as it is (a stalled generator is reported, not fatal)
        def counted() -> int:
            return sum(c or 0 for c in (gateway_connections(g["metrics"]) for g in self.cluster.gateways))

        progress = {"count": counted(), "at": started}
        new = []
        for i in range(count):
            k = n // count + (1 if i < n % count else 0)
            config = {"scenario": "conn", "run": self.cluster.run_id, "secret": self.cluster.secret,
                      "mode": "imcluster", "gateways": [g["url"] for g in self.cluster.gateways],
                      "transport": "ws",
                      "params": {"n": k, "offset": self.offset, "concurrency": max(10, concurrency // count),
                                 # a connect that fails (auth_timeout while a shared service stalls) is
                                 # counted and reported, not fatal: the run measures what it holds
                                 "localAddresses": self.sources, "tolerant": True}}
            self.offset += k
            gen = bench.Generator(config, None, on_event)
            gen.connected = getattr(gen, "connected", False)
            self.gens.append(gen)
            new.append(gen)
        while not done.wait(1.0):
            for g in new:
                if g.proc.poll() is not None and g.result is not None and g.result.get("event") == "failed":
                    raise RuntimeError(f"a generator failed: {g.result.get('error')}")
                if g.proc.poll() is not None and g.proc.returncode != 0:
                    raise RuntimeError(f"a generator exited with {g.proc.returncode}: "
                                       f"{g.proc.stderr.read()[-2000:]}")
            now = time.monotonic()
            if now - progress["at"] >= 5.0:
                c = counted()
                if c > progress["count"]:
                    progress.update(count=c, at=now, grew=now)
                elif now - progress.get("grew", started) > self.args.stall:
                    log(f"no new connection for {self.args.stall:g}s: measuring the {c} held")
                    stalled = True
                    break
                progress["at"] = now
            if now - started > timeout:
                log(f"{n} connections not settled within {timeout:.0f}s: measuring what is held")
                stalled = True
                break
        else:
            stalled = False
        seconds = time.monotonic() - started
        evs = state["events"]
        ok = sum(e.get("ok", e["n"]) for e in evs) if not stalled else None
        failures = sorted({f for e in evs for f in e.get("first_failures", [])})[:5]
        return {"asked": n, "ok": ok, "failed": sum(e.get("failed", 0) for e in evs), "seconds": round(seconds, 1),
                "rate": round(ok / seconds, 1) if ok is not None else None, "generators": count,
                "stalled": stalled, "generator_rss_kb": [e.get("rss_kb") for e in evs], "first_failures": failures}

    def close(self) -> None:
        for g in self.gens:
            if g.proc.poll() is not None:
                continue
            if g.connected:
                try:
                    g.say("close")
                except OSError:
                    pass
            else:  # still setting clients up (stalled): it would not read "close"
                g.proc.terminate()
        for g in self.gens:
            try:
                g.wait(120)
            except RuntimeError as e:
                log(f"generator: {e}")


def p2p(args: argparse.Namespace, cluster, params: dict, tag: str) -> dict:
    """run.py's p2p-latency; ``tag`` gives its users and clientMsgIds names of their own (the same
    ones again would be duplicates of the first run's messages, answered but never delivered again)."""
    import types

    target = types.SimpleNamespace(**vars(cluster))
    target.run_id, target.mode = f"{cluster.run_id}{tag}", cluster.mode
    r = bench.run_cluster_scenario("p2p-latency", args, target, params)
    return {"latency_ms": r["latency_ms"], "reply_latency_ms": r["reply_latency_ms"], "sent": r["sent"],
            "lost": r["lost"], "duplicated": r["duplicated"], "cpu": r["cpu"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conns", type=int, default=100000, help="idle authenticated connections in all")
    parser.add_argument("--base", type=int, default=5000, help="connections of the first p2p-latency run")
    parser.add_argument("--sources", type=int, default=4, help="loopback source addresses (127.0.0.2, ...)")
    parser.add_argument("--per-generator", type=int, default=15000, help="connections per Node process at most")
    parser.add_argument("--concurrency", type=int, default=100, help="connections being set up at once, in all")
    parser.add_argument("--stall", type=float, default=120.0,
                        help="seconds without a new connection after which what is held is measured")
    parser.add_argument("--idle", type=float, default=30.0, help="seconds of idle CPU measured")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds of each p2p-latency run")
    parser.add_argument("--rate", type=int, default=1000, help="p2p-latency messages/s")
    parser.add_argument("--pairs", type=int, default=200, help="p2p-latency sender/receiver pairs")
    parser.add_argument("--processors", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: a few seconds (CI)")
    parser.add_argument("--force", action="store_true",
                        help="run even when the descriptor limit is too low")
    parser.add_argument("--gateway-arg", action="append", default=[], help="extra imgateway argument")
    parser.add_argument("--processor-arg", action="append", default=[], help="extra improcessor argument")
    parser.add_argument("--json", help="write results here (default bench/results/many-<run>.json)")
    parser.add_argument("--redis", default=os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--amqp", default=os.environ.get("BENCH_AMQP", "amqp://guest:guest@127.0.0.1:5672/%2F"))
    parser.add_argument("--postgres", default=os.environ.get("BENCH_POSTGRES",
                                                             "postgresql://root@127.0.0.1:5432/test"))
    args = parser.parse_args(argv)

    def stop(_signum, _frame):
        raise KeyboardInterrupt  # SIGTERM (or SIGINT in a background job) cleans up as Ctrl-C does

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if args.tiny:
        args.conns, args.base, args.sources, args.per_generator = 120, 40, 2, 40
        args.idle, args.duration, args.rate, args.pairs = 2.0, 1.0, 100, 5
    if args.base > args.conns:
        parser.error("--base must not exceed --conns")
    # what bench/run.py's Cluster and scenarios read
    args.trace, args.profile, args.rate_limit = False, None, 1000000

    soft, hard = raise_fd_limit()
    per_gateway = math.ceil(args.conns / 2) + 2 * args.pairs + GATEWAY_FDS
    per_gen = min(args.per_generator, max(1, soft - 500))
    log(f"RLIMIT_NOFILE {soft}/{hard}; each gateway needs about {per_gateway}")
    if per_gateway > soft:
        most = 2 * (soft - 2 * args.pairs - GATEWAY_FDS)
        msg = (f"{args.conns} connections need about {per_gateway} descriptors per gateway; this process may "
               f"give its children {soft} (hard limit {hard}; raising it needs CAP_SYS_RESOURCE): "
               f"at most about {most} connections on 2 gateways")
        if not args.force:
            log(msg + " (--force tries anyway)")
            return 2
        log(msg + "; --force: trying anyway")
    args.gateway_arg = [f"--max-connections={max(per_gateway, 1000)}", *args.gateway_arg]
    args.processor_arg = list(args.processor_arg)
    sources = [f"127.0.0.{2 + i}" for i in range(args.sources)]

    results_dir = bench.BENCH / "results"
    workdir = results_dir / "logs"
    workdir.mkdir(parents=True, exist_ok=True)
    cluster = bench.Cluster(args, workdir)
    holders = Holders(args, cluster, sources)
    p2p_params = {"pairs": args.pairs, "rate": args.rate, "seconds": args.duration, "drain": 30}
    out: dict = {"meta": {"run": cluster.run_id, "machine": bench.machine(), "processors": args.processors,
                          "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                          "loadavg_start": os.getloadavg(), "fd_limit": [soft, hard], "sources": sources,
                          "argv": sys.argv[1:], "tiny": args.tiny}}
    timeout = 120 + args.conns / 50
    failed = False
    try:
        cluster.start()
        gw = [g["proc"].pid for g in cluster.gateways]
        time.sleep(1.0)
        rss0 = [bench.rss_kb(p) for p in gw]
        redis0 = used_memory(args)
        log(f"opening {args.base} connections")
        out["base_open"] = holders.open(args.base, per_gen, args.concurrency, timeout)
        log(f"{out['base_open']}")
        log(f"p2p-latency with {args.base} connections")
        out["p2p_base"] = p2p(args, cluster, p2p_params, "a")
        rest = args.conns - args.base
        if rest:
            log(f"opening {rest} more connections")
            out["rest_open"] = holders.open(rest, per_gen, args.concurrency, timeout)
            log(f"{out['rest_open']}")
        time.sleep(3.0)  # the last syncs and Redis writes
        held = [gateway_connections(g["metrics"]) for g in cluster.gateways]
        rss1 = [bench.rss_kb(p) for p in gw]
        redis1 = used_memory(args)
        total = sum(c or 0 for c in held)
        users = [f"{cluster.run_id}.c{i}" for i in range(args.conns)]
        out["held"] = {"total": total, "per_gateway": held, "fds": [open_fds(p) for p in gw]}
        out["gateway_rss_kb"] = {"before": rss0, "after": rss1,
                                 "per_conn": [round((b - a) / h, 2) if h else None
                                              for a, b, h in zip(rss0, rss1, held)]}
        out["redis"] = {"used_memory_delta_bytes": redis1 - redis0,
                        "used_memory_bytes_per_conn": round((redis1 - redis0) / max(1, total), 1),
                        **redis_bytes_per_conn(args, cluster, users)}
        log(f"idle for {args.idle:g}s")
        window = bench.CpuWindow({"gateways": gw, "processors": [p.pid for p in cluster.processors]})
        window.start()
        time.sleep(args.idle)
        window.stop()
        out["idle_cpu"] = window.result
        log(f"p2p-latency with {total} connections")
        out["p2p_many"] = p2p(args, cluster, p2p_params, "b")
        out["held_after"] = [gateway_connections(g["metrics"]) for g in cluster.gateways]
    except Exception as e:  # noqa: BLE001 (a script: say what broke, clean up, print what was measured)
        out["error"] = f"{type(e).__name__}: {e}"
        failed = True
        log(f"failed: {e}")
    except KeyboardInterrupt:
        out["error"] = "interrupted"
        failed = True
    finally:
        holders.close()
        cluster.stop()
    out["meta"]["loadavg_end"] = os.getloadavg()
    text = report(out, args)
    print(text)
    out["table"] = text
    path = Path(args.json) if args.json else results_dir / f"many-{cluster.run_id}.json"
    path.write_text(json.dumps(out, indent=2))
    log(f"results written to {path}")
    return 1 if failed else 0


def report(out: dict, args: argparse.Namespace) -> str:
    m = out["meta"]
    lines = [f"imcluster: many idle connections, run {m['run']} on {m['machine']}",
             f"2 gateways, {m['processors']} processor(s); sources {', '.join(m['sources'])}; "
             f"RLIMIT_NOFILE {m['fd_limit'][0]}/{m['fd_limit'][1]}; load average "
             f"{m['loadavg_start'][0]:.2f} at the start, {m.get('loadavg_end', [0])[0]:.2f} at the end"]
    for stage in ("base_open", "rest_open"):
        s = out.get(stage)
        if s:
            if s.get("stalled"):
                lines.append(f"asked {s['asked']:,} from {s['generators']} generator(s): STALLED after "
                             f"{s['seconds']}s (no new connection for --stall s); measured what was held")
            else:
                lines.append(f"opened {s['ok']:,} of {s['asked']:,} in {s['seconds']}s ({s['rate']:,.0f}/s) from "
                             f"{s['generators']} generator(s), failed {s['failed']}"
                             + (f": {'; '.join(s['first_failures'])}" if s["first_failures"] else ""))
    if "held" in out:
        h, r = out["held"], out["gateway_rss_kb"]
        lines.append(f"held: {h['total']:,} authenticated idle connections; per gateway {h['per_gateway']}, "
                     f"open descriptors {h['fds']}")
        lines.append(f"gateway RSS per connection: {r['per_conn']} KB ({r['before']} -> {r['after']} KB)")
        rd = out["redis"]
        lines.append(f"Redis per connection: {rd['bytes_per_conn']:,.0f} bytes by MEMORY USAGE of the run's keys "
                     f"(UCIR hash {rd['ucir_bytes_per_user']:,.0f} bytes per user, WSCONNS "
                     f"{rd['wsconns_bytes_total']:,} bytes in all); INFO used_memory grew "
                     f"{rd['used_memory_bytes_per_conn']:,.0f} bytes per connection (shared Redis: others move it)")
    if "idle_cpu" in out:
        c = out["idle_cpu"]
        lines.append(f"idle for {args.idle:g}s: gateways {c['gateways']}% of a core, processors {c['processors']}%, "
                     f"services {c['services']}% (shared), other {c['other']}%, machine {c['machine']}% of all cores")
    for key, label in (("p2p_base", f"p2p at {args.rate}/s with {args.base:,} connections"),
                       ("p2p_many", f"p2p at {args.rate}/s with {out.get('held', {}).get('total', 0):,} connections")):
        p = out.get(key)
        if p:
            lines.append(f"{label}: {bench.fmt_lat(p['latency_ms'])}; lost {p['lost']} dup {p['duplicated']}; "
                         f"other {p['cpu'].get('other')}%")
    if out.get("p2p_base") and out.get("p2p_many"):
        a, b = out["p2p_base"]["latency_ms"], out["p2p_many"]["latency_ms"]
        if a["p99"] and b["p99"] is not None:
            ratio = b["p99"] / a["p99"]
            out["p99_ratio"] = round(ratio, 2)
            lines.append(f"p99 with many / with {args.base:,}: {ratio:.2f} (target <= 1.5: "
                         f"{'OK' if ratio <= 1.5 else 'MISSED'}); p50 ratio {b['p50'] / a['p50']:.2f}")
    if "error" in out:
        lines.append(f"FAILED: {out['error']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""Issue 13's memory attacks on a gateway, measured (a script, not a test).

    .venv/bin/python bench/attacks.py                          # starts this venv's gateway
    .venv/bin/python bench/attacks.py --twistd /tmp/old/.venv/bin/twistd   # another checkout's gateway
    .venv/bin/python bench/attacks.py --ws-port 8080 --pid 1234 --jwt-secret S   # a running one

For each attack (``--attacks``, default ``ping-flood,header-flood``) it
measures for ``--baseline`` seconds without it, then runs it for
``--seconds``, and prints the gateway's resident memory (VmRSS from
``/proc/<pid>/status``: before, peak during, and ``--settle`` seconds after)
and an ordinary authenticated client's ``ping`` -> ``pong`` round trip (p50
and p99 before and during), plus what the attackers saw:

``ping-flood``
    ``--pingers`` WebSocket clients (the first authenticated, the others
    not) sending 125-byte pings as fast as they can, never reading; the
    close code each finally got (None: never closed).
``header-flood``
    ``--header-floods`` connections sending ``GET /ws HTTP/1.1``, ``Host``,
    ``X-Pad: `` and then endless bytes (``--header-rate`` MB/s each, as in
    the issue), reconnecting when closed; how many connections, how they
    ended and the longest one lived.

A gateway it starts runs on loopback ports, a private namespace and Redis
prefix, with only ``--jwt-secret`` and the listeners given (every other
option at its default), and is stopped (SIGTERM) at the end; its AMQP
exchange is deleted. The attackers are tests/support/attacks.py (standard
library only), so the script measures any gateway, older ones included.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.attacks import (  # noqa: E402
    Bystander, HeaderFlood, PingFlood, percentiles, rss_kb)
from tests.support.cluster import free_port, port_open  # noqa: E402


def log(msg: str) -> None:
    print(f"attacks: {msg}", file=sys.stderr, flush=True)


def token(secret: str, user: str) -> str:
    import jwt

    return jwt.encode({"sub": user, "exp": int(time.time()) + 3600}, secret, algorithm="HS256")


class Gateway:
    """``twistd imgateway`` started by this script (or a running one: ``proc`` None)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.proc = None
        if args.ws_port:
            self.ws_port, self.pid, self.secret = args.ws_port, args.pid, args.jwt_secret
            return
        self.secret = secrets.token_hex(32)
        self.namespace = "attacks-" + secrets.token_hex(4)
        self.ws_port, tcp_port = free_port(), free_port()
        twistd = args.twistd or str(Path(sys.executable).parent / "twistd")
        argv = [twistd, "-n", "--pidfile=", "imgateway", f"--jwt-secret={self.secret}",
                f"--ws=tcp:{self.ws_port}:interface=127.0.0.1",
                f"--tcp=tcp:{tcp_port}:interface=127.0.0.1",
                f"--namespace={self.namespace}", f"--redis-prefix={self.namespace}:",
                "--advertise=127.0.0.1"]
        self.log_path = Path(args.log or f"/tmp/{self.namespace}.log")
        env = {k: v for k, v in os.environ.items() if not k.startswith("IMCLUSTER_")}
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=open(self.log_path, "wb"),
                                     stderr=subprocess.STDOUT, env=env)
        self.pid = self.proc.pid
        deadline = time.monotonic() + 60
        while not (port_open(self.ws_port) and port_open(tcp_port)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the gateway did not start; see {self.log_path}")
            time.sleep(0.1)
        log(f"gateway pid {self.pid} ({twistd}) on ws port {self.ws_port}, log {self.log_path}")
        time.sleep(1.0)  # let it settle (and forget the readiness probes)

    def stop(self, amqp: str) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        try:
            import pika

            conn = pika.BlockingConnection(pika.URLParameters(amqp))
            conn.channel().exchange_delete(f"{self.namespace}.exchange")
            conn.close()
        except Exception as e:  # noqa: BLE001 (clean-up only)
            log(f"AMQP clean-up failed: {e!r}")


def run_attack(name: str, gw: Gateway, args: argparse.Namespace) -> dict:
    bystander = Bystander(gw.ws_port, token(gw.secret, "bystander"), interval=args.interval)
    bystander.start()
    bystander.ready.wait(30)
    if bystander.error:
        raise SystemExit(f"the bystander could not connect: {bystander.error}")
    time.sleep(args.baseline)
    rss_before = rss_kb(gw.pid)
    started = time.monotonic()
    if name == "ping-flood":
        attackers = [PingFlood(gw.ws_port, token=token(gw.secret, "mallory") if i == 0 else None)
                     for i in range(args.pingers)]
    else:
        attackers = [HeaderFlood(gw.ws_port, rate=args.header_rate * 1e6 or None)
                     for _ in range(args.header_floods)]
    for a in attackers:
        a.start()
    peak = rss_before
    while time.monotonic() - started < args.seconds:
        time.sleep(0.1)
        peak = max(peak, rss_kb(gw.pid))
    ended = time.monotonic()
    for a in attackers:
        a.stop()
    result = {
        "attack": name,
        "seconds": args.seconds,
        "rss_kb": {"before": rss_before, "peak": peak},
        "bystander_ms": {"before": percentiles(bystander.round_trips(started - args.baseline, started)),
                         "during": percentiles(bystander.round_trips(started, ended))},
        "attack_mb_sent": round(sum(a.sent for a in attackers) / 1e6, 1),
    }
    if name == "ping-flood":
        # the close frame when it can still be read; a non-reading client usually finds its
        # socket reset instead (dropped close_timeout after the close): 'reset'; else 'open'
        result["close_codes"] = [a.close_code(timeout=5) or ("reset" if a.error else "open")
                                 for a in attackers]
    else:
        conns = [c for a in attackers for c in a.connections]
        outcomes: dict[str, int] = {}
        for _, _, outcome in conns:
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
        result["connections"] = len(conns)
        result["outcomes"] = outcomes
        result["longest_s"] = round(max((c[0] for c in conns), default=0.0), 2)
    time.sleep(args.settle)
    result["rss_kb"]["after"] = rss_kb(gw.pid)
    bystander.stop()
    if bystander.error:
        result["bystander_error"] = bystander.error
    return result


def show(r: dict) -> str:
    rss, b = r["rss_kb"], r["bystander_ms"]
    lines = [f"{r['attack']} ({r['seconds']:g} s, {r['attack_mb_sent']} MB written by the attackers)",
             f"  gateway RSS     before {rss['before'] / 1024:7.1f} MB   peak {rss['peak'] / 1024:7.1f} MB"
             f"   after {rss['after'] / 1024:7.1f} MB",
             f"  bystander ping  before p50 {b['before']['p50']} ms p99 {b['before']['p99']} ms"
             f"   during p50 {b['during']['p50']} ms p99 {b['during']['p99']} ms (n={b['during']['n']})"]
    if "close_codes" in r:
        lines.append(f"  attackers' close codes: {r['close_codes']}")
    else:
        lines.append(f"  {r['connections']} connections {r['outcomes']}, longest {r['longest_s']} s")
    if "bystander_error" in r:
        lines.append(f"  the bystander failed: {r['bystander_error']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--attacks", default="ping-flood,header-flood")
    ap.add_argument("--seconds", type=float, default=10.0, help="each attack's duration")
    ap.add_argument("--baseline", type=float, default=3.0, help="seconds measured before each attack")
    ap.add_argument("--settle", type=float, default=3.0, help="seconds after, before the last RSS sample")
    ap.add_argument("--pingers", type=int, default=2)
    ap.add_argument("--header-floods", type=int, default=10)
    ap.add_argument("--header-rate", type=float, default=3.0,
                    help="MB/s each header-flood connection sends (issue 13 saw 3; 0: unpaced)")
    ap.add_argument("--interval", type=float, default=0.02, help="seconds between the bystander's pings")
    ap.add_argument("--twistd", help="twistd of the checkout to measure (default: beside this python)")
    ap.add_argument("--ws-port", type=int, help="attack a running gateway on this port (with --pid, --jwt-secret)")
    ap.add_argument("--pid", type=int)
    ap.add_argument("--jwt-secret")
    ap.add_argument("--amqp", default="amqp://guest:guest@127.0.0.1:5672/%2F")
    ap.add_argument("--log", help="the started gateway's log file")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    if args.ws_port and not (args.pid and args.jwt_secret):
        ap.error("--ws-port needs --pid and --jwt-secret")
    gw = Gateway(args)
    results = []
    try:
        for name in args.attacks.split(","):
            if name not in ("ping-flood", "header-flood"):
                ap.error(f"unknown attack {name!r}")
            log(f"{name}: {args.baseline:g} s baseline, {args.seconds:g} s attack")
            results.append(run_attack(name, gw, args))
            print(show(results[-1]), flush=True)
    finally:
        gw.stop(args.amqp)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

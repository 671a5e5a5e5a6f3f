"""What one idle authenticated connection costs a gateway, object by object (a script, not a test).

    .venv/bin/python bench/conn_census.py [N]      # default 5000

Runs one real ``GatewayService`` (its WebSocket listener, JWT
authenticator, connection engine and registry) in this process on
in-memory fakes of Redis and RabbitMQ (the fake answers each sync request
with ``sync_done`` at once), connects N clients with ``bench/gen.js conn``,
then prints the RSS growth and the process's CPU per connection and the Python objects that grew
by at least one per connection, with their shallow sizes (``__dict__``
included) per connection. The fakes' own records of the connections are
listed too (as ``imcluster.testing...``): they stand for what Redis holds,
not for gateway memory.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import secrets
import subprocess
import sys
import threading
from collections import Counter, deque
from pathlib import Path

from twisted.internet import defer, reactor, task

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE // 1024


def census() -> tuple[Counter, Counter]:
    gc.collect()
    counts: Counter = Counter()
    sizes: Counter = Counter()
    for o in gc.get_objects():
        t = type(o)
        name = f"{t.__module__}.{t.__qualname__}"
        counts[name] += 1
        size = sys.getsizeof(o)
        d = getattr(o, "__dict__", None) if not isinstance(o, type) else None
        if isinstance(d, dict):
            size += sys.getsizeof(d)
        sizes[name] += size
    return counts, sizes


def detail(n: int) -> None:
    """Who the many small objects belong to (CENSUS_DETAIL=1)."""
    what: Counter = Counter()
    for o in gc.get_objects():
        t = type(o).__name__
        if t == "DelayedCall":
            f = getattr(o, 'func', None); what[f"DelayedCall {getattr(f, '__qualname__', f)} cancelled={o.cancelled} called={o.called}"] += 1
        elif t == "method":
            what[f"method {o.__func__.__qualname__}"] += 1
        elif t == "Deferred":
            what[f"Deferred called={o.called} {[repr(c)[:80] for c in o._callbacks][:2]}"] += 1
        elif t == "deque":
            what[f"deque maxlen={o.maxlen} len={len(o)}"] += 1
    for o in gc.get_objects():
        if type(o).__name__ in ("GatewayWebSocketProtocol", "Server") and hasattr(o, "__dict__"):
            for k, v in vars(o).items():
                if isinstance(v, (dict, list, deque, bytes, str)) and sys.getsizeof(v) > 100:
                    what[f"{type(o).__name__}.{k} {type(v).__name__} {sys.getsizeof(v) // 8 * 8}b"] += 1
            what[f"{type(o).__name__} dict keys={len(vars(o))}"] += 1
    for k, c in sorted(what.items(), key=lambda kv: -kv[1]):
        if c >= n * 0.5:
            print(f"{c / n:6.2f}  {k}")


async def main(n: int) -> None:
    from imcluster.auth import JWTAuthenticator
    from imcluster.gateway.service import GatewayService
    from imcluster.testing.bus import FakeBus
    from imcluster.testing.gateway import gateway_config
    from imcluster.testing.registry import FakeRegistry

    secret = secrets.token_hex(16)
    config = gateway_config(ws=["tcp:0:interface=127.0.0.1"], tcp=[], jwt_secret=secret,
                            rate_limit=1000000, rate_burst=1000000, max_connections=10 * n + 100)
    registry = FakeRegistry("census:", clock=reactor)
    bus = FakeBus("census", clock=reactor)
    registry.startService()
    bus.startService()
    gw = GatewayService(config, registry, bus, JWTAuthenticator.from_config(config), reactor=reactor)

    def request_sync(conn):
        conn.send_frame({"type": "sync_done", "count": 0})
        return defer.succeed(None)

    gw.request_sync = request_sync
    await defer.ensureDeferred(defer.maybeDeferred(gw.startService))
    url = f"ws://127.0.0.1:{gw.port_of('ws')}/ws"
    await task.deferLater(reactor, 0.5, lambda: None)
    gc.collect()
    rss0 = rss_kb()
    counts0, sizes0 = census()
    rss0 = rss_kb()

    config_js = {"scenario": "conn", "run": "census", "secret": secret, "gateways": [url], "params": {"n": n}}
    gen = subprocess.Popen(["node", str(BENCH / "gen.js"), json.dumps(config_js)], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True, cwd=BENCH)
    connected = defer.Deferred()

    def read():
        for line in gen.stdout:
            if json.loads(line)["event"] == "connected":
                reactor.callFromThread(connected.callback, json.loads(line))

    threading.Thread(target=read, daemon=True).start()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    ev = await connected
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu_us = ((cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)) * 1e6 / n
    await task.deferLater(reactor, 1.0, lambda: None)
    gc.collect()
    rss1 = rss_kb()
    counts1, sizes1 = census()
    print(f"{n} connections in {ev['seconds']:.2f}s ({n / ev['seconds']:,.0f}/s); "
          f"RSS {rss0} -> {rss1} KB: {(rss1 - rss0) / n:.2f} KB per connection; "
          f"gateway CPU {cpu_us:.0f} us per connection set up")
    rows = []
    for name, c in counts1.items():
        dc = c - counts0.get(name, 0)
        if dc >= n * 0.9:
            rows.append(((sizes1[name] - sizes0.get(name, 0)) / n, dc / n, name))
    rows.sort(reverse=True)
    total = 0.0
    print(f"{'bytes/conn':>10} {'objs/conn':>9}  type (shallow size, __dict__ included)")
    for size, per, name in rows:
        total += size
        print(f"{size:>10.0f} {per:>9.2f}  {name}")
    print(f"{total:>10.0f}            total of the types above")
    if os.environ.get("CENSUS_DETAIL"):
        detail(n)
    gen.stdin.write("close\n")
    gen.stdin.flush()
    gen.wait(60)
    reactor.stop()


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    d = defer.ensureDeferred(main(count))
    d.addErrback(lambda f: (f.printTraceback(file=sys.stdout), reactor.stop()))
    reactor.run()

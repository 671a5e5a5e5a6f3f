"""The registry's hot calls on their own: calls/s and this process' CPU µs per call (a script, not a test).

    .venv/bin/python bench/registry_calls.py redis://127.0.0.1:6379/0      # or several URLs (shards)

Uses the key prefix ``micro:`` and removes what it wrote (two gateways'
entries). Point it at a private ``redis-server`` to compare two trees
(docs/benchmarks.rst, "Redis shards and Sentinel").
"""
import json, resource, sys, time
from twisted.internet import task, defer
from imcluster.registry import RedisService, conn_meta

URL = sys.argv[1]

def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime

async def main(reactor):
    svc = RedisService(URL, prefix="micro:")
    await svc.startService()
    gws = ["3f0c2a4e-0000-4000-8000-000000000001", "3f0c2a4e-0000-4000-8000-000000000002"]
    for g in gws:
        await svc.register_server(g, {"ip": "10.0.0.1", "port": 8080, "tcpPort": 8081, "startedAt": 1.0}, 300)
    out = {}
    async def bench(name, n, fn, parallel=50):
        t0, c0 = time.perf_counter(), cpu()
        i = 0
        while i < n:
            await defer.gatherResults([fn(i + j) for j in range(parallel)])
            i += parallel
        dt, dc = time.perf_counter() - t0, cpu() - c0
        out[name] = {"ops_s": round(n / dt), "cpu_us": round(dc / n * 1e6, 1)}
    await bench("add_connections(1)", 20000, lambda i: svc.add_connections(gws[i % 2], [(f"u{i}", "10.0.0.1", 1000 + i % 50000, conn_meta("web", 1.0, 2.0))]))
    await bench("routes(2 users)", 20000, lambda i: svc.routes([f"u{i % 20000}", f"u{(i * 7) % 20000}"], [gws[0]]))
    await bench("routes(100 users)", 2000, lambda i: svc.routes([f"u{(i * 100 + k) % 20000}" for k in range(100)], [gws[0]]), parallel=10)
    await bench("alive(1)", 20000, lambda i: svc.alive([gws[i % 2]]))
    await svc.unregister_server(gws[0]); await svc.unregister_server(gws[1])
    print(json.dumps(out))
    await svc.stopService()

task.react(lambda r: defer.ensureDeferred(main(r)))

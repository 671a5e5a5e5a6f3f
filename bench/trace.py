"""Run a daemon under twistd with the latency of its hot calls recorded (a development tool).

    .venv/bin/python bench/trace.py OUT.json twistd -n --pidfile= improcessor ...

Wraps, without editing them, the Deferred-returning calls a processor
window waits on (store_messages, mark_sending, mark_delivered[_receipts],
undelivered_page, connections_of, alive, publish, the pipeline's run) and
the gateway's publish, and writes count / mean / p50 / p99 / max of each
(milliseconds) to OUT.json when the daemon stops. bench/run.py uses it with
``--trace``.
"""

from __future__ import annotations

import atexit
import json
import sys
import time


def _wrap(cls, name, samples):
    original = getattr(cls, name)
    key = f"{cls.__name__}.{name}"
    samples[key] = []

    def wrapper(self, *a, **kw):
        t0 = time.perf_counter()
        d = original(self, *a, **kw)

        def done(result):
            samples[key].append((time.perf_counter() - t0) * 1000)
            return result

        d.addBoth(done)
        return d

    setattr(cls, name, wrapper)


def install(out: str) -> None:
    samples: dict[str, list[float]] = {}
    from imcluster.bus import AMQPService
    from imcluster.processor.pipeline import Pipeline
    from imcluster.processor.router import Router
    from imcluster.store.postgres import MessageStore
    from imcluster.registry import RedisService

    for cls, names in ((MessageStore, ("store_messages", "mark_sending", "mark_delivered",
                                     "mark_delivered_receipts", "undelivered_page",
                                     "undelivered_first_pages")),
                       (RedisService, ("connections_of", "alive")),
                       (AMQPService, ("publish",)),
                       (Router, ("lookup", "publish")),
                       (Pipeline, ("run",))):
        for name in names:
            _wrap(cls, name, samples)

    def dump():
        summary = {}
        for key, v in samples.items():
            if not v:
                continue
            v = sorted(v)
            summary[key] = {"count": len(v), "mean": round(sum(v) / len(v), 2), "p50": round(v[len(v) // 2], 2),
                            "p99": round(v[min(len(v) - 1, int(len(v) * 0.99))], 2), "max": round(v[-1], 2)}
        with open(out, "w") as f:
            json.dump(summary, f, indent=1)

    atexit.register(dump)


if __name__ == "__main__":
    install(sys.argv[1])
    sys.argv = sys.argv[2:]
    from twisted.scripts.twistd import run

    run()

"""Messages per second that MessageStore stores (not a test).

    .venv/bin/python bench/store_throughput.py [--postgres DSN] [--scale 1.0] [--online]

Runs in a throw-away schema (dropped at the end) and prints one line per case:
1:1 sessions (one recipient per message, 100 pairs round-robin) and one
100-member group (99 messagesend rows per message), each with batches of 500
(what a processor does under load) and batches of 1 (one transaction per
message), one batch in flight and ``--concurrency`` in flight.

``--online``: as the pipeline stores a window (``begin_window``, then
``commit(online)`` with half the recipients online, so their rows are
inserted ``sending``), instead of ``store_messages``. It runs on older
trees too (``store_messages(batch, locate)``), to compare before and after.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid

from twisted.internet import defer, task

from imcluster.db import PostgresService, apply_migrations
try:
    from imcluster.store import Incoming
    from imcluster.store.postgres import MessageStore
except ImportError:  # a tree from before imcluster/store: run it with PYTHONPATH to compare
    from imcluster.processor.store import Incoming, MessageStore


def half_online(users):
    """The 'online' half of ``users`` (the online lookup's stand-in: no Redis here)."""
    return [u for u in users if u[-1] in "02468"]


async def store_window(store, batch, online):
    """Store ``batch`` as the pipeline does (``online``), or in one call."""
    if not online:
        return await store.store_messages(batch)
    if hasattr(store, "begin_window"):
        txn = await store.begin_window(batch)
        return await txn.commit(half_online(txn.recipients))
    return await store.store_messages(batch, half_online)  # a tree from before begin_window


async def run_case(store, name, make, total, batch_size, in_flight, online=False):
    messages = [make(i) for i in range(total)]
    batches = [messages[i:i + batch_size] for i in range(0, total, batch_size)]
    started = time.perf_counter()
    pending = iter(batches)

    async def worker():
        for batch in pending:
            results = await store_window(store, batch, online)
            assert all(r.ok and not r.duplicate for r in results), results[:3]

    await defer.gatherResults([defer.Deferred.fromCoroutine(worker()) for _ in range(in_flight)],
                              consumeErrors=True)
    elapsed = time.perf_counter() - started
    rate = total / elapsed
    print(f"{name:<10} batch {batch_size:>4} in flight {in_flight}: {total:>6} messages in {elapsed:6.2f}s "
          f"= {rate:>8.0f} messages/s", flush=True)
    return rate


async def main(reactor, args):
    schema = "bench_store_" + uuid.uuid4().hex[:8]
    db = PostgresService(args.postgres, schema=schema, pool_size=args.concurrency, connect_timeout=10.0)
    await db.startService()
    try:
        await apply_migrations(db)
        store = MessageStore(db, 1000)
        pairs = [(f"a{i:03d}", f"b{i:03d}") for i in range(100)]
        for a, b in pairs:  # created up front: the benchmark measures sending, not creation
            await store.create_session(a, [b], f"p2p:{a}:{b}")
        await store.create_session("u000", [f"u{i:03d}" for i in range(1, 100)], "group100")
        run = iter(range(10**9))

        def p2p(i):
            a, b = pairs[i % len(pairs)]
            return Incoming(a, f"p{next(run)}", f"p2p:{a}:{b}", {"text": "hello there"})

        def group(i):
            return Incoming(f"u{i % 100:03d}", f"g{next(run)}", "group100", {"text": "hello there"})

        s = args.scale
        for name, make, big, small in [("p2p", p2p, 20000, 1000), ("group100", group, 5000, 300)]:
            o = args.online
            await run_case(store, name, make, int(big * s), 500, 1, o)
            await run_case(store, name, make, int(big * s), 500, args.concurrency, o)
            await run_case(store, name, make, int(small * s), 1, 1, o)
            await run_case(store, name, make, int(small * s * 2), 1, args.concurrency, o)
    finally:
        await db.run_operation(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await db.stopService()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--postgres", default="postgresql://root@127.0.0.1:5432/test")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the message counts")
    parser.add_argument("--concurrency", type=int, default=4, help="batches in flight (and pool size)")
    parser.add_argument("--online", action="store_true",
                        help="store as the pipeline does: begin_window, then commit(online)")
    args = parser.parse_args()
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, args)))
    sys.exit(0)

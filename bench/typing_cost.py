"""What ``typing`` costs (a script, not a test): frames through a gateway and a processor, and their CPU.

    .venv/bin/python bench/typing_cost.py              # 200 senders x 10 sessions, a frame every 0.25 s, 20 s
    .venv/bin/python bench/typing_cost.py --tiny       # a few seconds

Starts a private Redis, a PostgreSQL schema (``imcluster migrate``), two
gateways and one processor on a namespace of its own. ``--senders`` users
connect to the first gateway (raw TCP) and ``--senders`` x ``--sessions``
receivers to the second, each sender in a 1:1 session with ``--sessions``
receivers. Every ``--period`` seconds each sender sends ``typing`` for each
of its sessions (a client that sends one per key press). The gateway lets
one per second per connection and session through (``typing_interval``)
and drops the rest; the processor checks membership and routes the frame
to the receiver's gateway. Reports the frames sent, forwarded (what the
receivers got), dropped, and the CPU of each daemon per forwarded frame.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from presence import AMQP_URL, BIN, POSTGRES_DSN, cpu_seconds, delete_namespace, free_port, wait_port  # noqa: E402


def run_load(args, sender_port: int, receiver_port: int, secret: str, pids: dict[str, int]) -> dict:
    import jwt
    from twisted.internet import defer, protocol, reactor, task
    from twisted.internet.endpoints import TCP4ClientEndpoint
    from twisted.protocols.basic import Int32StringReceiver

    exp = int(time.time()) + 3600
    senders = [f"s{i:04d}" for i in range(args.senders)]
    receivers = {s: [f"r{i:04d}x{j:02d}" for j in range(args.sessions)] for i, s in enumerate(senders)}
    counts = {"typing": 0, "errors": 0, "sent": 0}

    def p2p(a: str, b: str) -> str:
        x, y = sorted((a, b))
        return f"p2p:{x}:{y}"

    class Client(Int32StringReceiver):
        def __init__(self, user: str) -> None:
            self.user = user
            self.authed = defer.Deferred()

        def connectionMade(self) -> None:  # noqa: N802
            token = jwt.encode({"sub": self.user, "exp": exp}, secret, algorithm="HS256")
            self.send({"type": "auth", "token": token})

        def send(self, frame: dict) -> None:
            self.sendString(json.dumps(frame).encode())

        def stringReceived(self, data: bytes) -> None:  # noqa: N802
            frame = json.loads(data)
            kind = frame.get("type")
            if kind == "auth_reply":
                self.authed.callback(self)
            elif kind == "typing":
                counts["typing"] += 1
            elif kind == "error":
                counts["errors"] += 1

    class Factory(protocol.ClientFactory):
        def __init__(self, user):
            self.user = user

        def buildProtocol(self, addr):  # noqa: N802
            return Client(self.user)

    async def connect(user: str, port: int):
        c = await TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=30).connect(Factory(user))
        await c.authed
        return c

    async def main() -> dict:
        sem = defer.DeferredSemaphore(200)
        recv = [r for rs in receivers.values() for r in rs]
        rconns = await defer.gatherResults(
            [sem.run(lambda u=u: defer.ensureDeferred(connect(u, receiver_port))) for u in recv], consumeErrors=True)
        sconns = await defer.gatherResults(
            [sem.run(lambda u=u: defer.ensureDeferred(connect(u, sender_port))) for u in senders], consumeErrors=True)
        await task.deferLater(reactor, 2.0, lambda: None)
        counts["typing"] = 0
        before = {k: cpu_seconds(p) for k, p in pids.items()}
        start = time.monotonic()
        frames = [[{"type": "typing", "sessionId": p2p(s, r)} for r in receivers[s]] for s in senders]

        def tick() -> None:
            for conn, fs in zip(sconns, frames):
                for f in fs:
                    conn.send(f)
                counts["sent"] += len(fs)

        loop = task.LoopingCall(tick)
        loop.start(args.period)
        await task.deferLater(reactor, args.seconds, lambda: None)
        loop.stop()
        await task.deferLater(reactor, 1.5, lambda: None)
        window = time.monotonic() - start
        after = {k: cpu_seconds(p) for k, p in pids.items()}
        for c in list(rconns) + list(sconns):
            c.transport.loseConnection()
        fwd = counts["typing"]
        cpu = {k: after[k] - before[k] for k in after}
        return {
            "senders": args.senders, "sessions_each": args.sessions, "period_s": args.period,
            "seconds": args.seconds, "typing_sent": counts["sent"], "typing_delivered": fwd,
            "dropped_at_gateway": counts["sent"] - fwd, "errors": counts["errors"],
            "delivered_per_s": round(fwd / args.seconds),
            "sent_per_s": round(counts["sent"] / args.seconds),
            **{f"cpu_{k}_s": round(v, 2) for k, v in cpu.items()},
            **{f"cpu_{k}_us_per_delivered": round(v / fwd * 1e6, 1) if fwd else None for k, v in cpu.items()},
            "window_s": round(window, 1),
        }

    result: dict = {}

    def done(r):
        result.update(r) if isinstance(r, dict) else result.update({"error": str(r)})
        reactor.stop()

    reactor.callWhenRunning(lambda: defer.ensureDeferred(main()).addBoth(done))
    reactor.run()
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--senders", type=int, default=200)
    ap.add_argument("--sessions", type=int, default=10)
    ap.add_argument("--period", type=float, default=0.25)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--keep", action="store_true", help="keep the daemons' logs (printed path)")
    args = ap.parse_args()
    if args.tiny:
        args.senders, args.sessions, args.seconds = 20, 5, 4.0
    import psycopg2

    workdir = Path(tempfile.mkdtemp(prefix="imbench-typing-"))
    namespace = "imbt" + uuid.uuid4().hex[:8]
    schema = "imbt_" + uuid.uuid4().hex[:8]
    secret = "bench-" + uuid.uuid4().hex
    redis_port = free_port()
    procs: list[subprocess.Popen] = []
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMCLUSTER_")}
    common = ["--namespace", namespace, "--redis", f"redis://127.0.0.1:{redis_port}/0", "--amqp", AMQP_URL]
    try:
        procs.append(subprocess.Popen([shutil.which("redis-server") or "/usr/bin/redis-server", "--port",
                                       str(redis_port), "--bind", "127.0.0.1", "--save", ""],
                                      stdout=open(workdir / "redis.log", "w"), stderr=subprocess.STDOUT))
        wait_port(redis_port)
        subprocess.run([str(BIN / "imcluster"), "migrate", "--postgres", POSTGRES_DSN, "--postgres-schema", schema],
                       check=True, env=env, stdout=subprocess.DEVNULL)
        pids, ports = {}, []
        for i in range(2):
            port = free_port()
            p = subprocess.Popen([str(BIN / "twistd"), "-n", "--pidfile=", "imgateway", *common,
                                  "--jwt-secret", secret, "--tcp", f"tcp:{port}:interface=127.0.0.1",
                                  "--ws", "tcp:0:interface=127.0.0.1", "--stream", "tcp:0:interface=127.0.0.1",
                                  "--advertise", "127.0.0.1"],
                                 stdout=open(workdir / f"gw{i}.log", "w"), stderr=subprocess.STDOUT,
                                 env=env, cwd=workdir)
            procs.append(p)
            pids[f"gateway{i + 1}"] = p.pid
            ports.append(port)
        p = subprocess.Popen([str(BIN / "twistd"), "-n", "--pidfile=", "improcessor", *common,
                              "--postgres", POSTGRES_DSN, "--postgres-schema", schema],
                             stdout=open(workdir / "pr.log", "w"), stderr=subprocess.STDOUT, env=env, cwd=workdir)
        procs.append(p)
        pids["processor"] = p.pid
        for port in ports:
            wait_port(port, 60)
        time.sleep(2.0)
        figures = run_load(args, ports[0], ports[1], secret, pids)
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        try:
            delete_namespace(namespace)
            conn = psycopg2.connect(POSTGRES_DSN)
            conn.autocommit = True
            conn.cursor().execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            conn.close()
        except Exception as e:  # noqa: BLE001
            print(f"cleanup: {e}", file=sys.stderr)
        if args.keep:
            print(f"logs in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    width = max(len(k) for k in figures)
    print("typing: senders on gateway1, receivers on gateway2, one processor")
    for k, v in figures.items():
        print(f"  {k:<{width}}  {v}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if "error" not in figures else 1


if __name__ == "__main__":
    sys.exit(main())

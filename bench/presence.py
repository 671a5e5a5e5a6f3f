"""What live presence costs (a script, not a test): issue 16's load, measured.

    .venv/bin/python bench/presence.py            # 5,000 users x 50 follows, 500 flap over 60 s
    .venv/bin/python bench/presence.py --tiny     # a few seconds (what tests/test_bench_presence.py runs)
    .venv/bin/python bench/presence.py --typing   # also: typing frames/s through a gateway and a processor

Starts its own Redis (``redis-server`` on a free port: its counters are ours
alone), two gateways (``twistd imgateway``, raw TCP) on the shared RabbitMQ
under a namespace of its own, with ``webhook_url`` set so that the
``user.online`` / ``user.offline`` events are published too. Connects
``--users`` users (raw TCP, half on each gateway), each following
``--follows`` others chosen at random (``presence_subscribe``), then, over
``--duration`` seconds, makes ``--flappers`` of them log out and back in
once (each off for 1-5 s). Over that window it measures:

* Redis: commands, bytes in and out, PUBLISH calls, the script's calls, its
  CPU (``INFO``); the pub/sub messages the gateways received;
* AMQP: the webhook messages and bytes in ``<ns>.webhooks``;
* the gateways' CPU (``/proc``) and the presence frames the clients got,
  with the delay from a flapper's logout/login (client side) to each
  subscriber's frame (p50, p99, max), and that no subscriber saw two frames
  in a row with the same state.

``--typing``: one processor more and a PostgreSQL schema, then
``--typing-conns`` connections each send ``typing`` for a session of their
own as fast as the gateway's rate limit lets them for ``--typing-seconds``;
reports the typing frames forwarded per second, the frames delivered, and
the gateway's and the processor's CPU per forwarded frame.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BIN = Path(sys.executable).parent
AMQP_URL = os.environ.get("IMBENCH_AMQP", "amqp://guest:guest@127.0.0.1:5672/%2F")
POSTGRES_DSN = os.environ.get("IMBENCH_POSTGRES", "postgresql://root@127.0.0.1:5432/test")
TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"port {port} did not open within {timeout}s")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


# --- a tiny synchronous Redis client for the counters -----------------------------------


def redis_info(port: int) -> dict[str, str]:
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"INFO all\r\n")
        data = b""
        head = b""
        while b"\r\n" not in head:
            head += s.recv(1)
        size = int(head[1:-2])
        while len(data) < size + 2:
            data += s.recv(65536)
    out = {}
    for line in data.decode().splitlines():
        if ":" in line and not line.startswith("#"):
            k, _, v = line.partition(":")
            out[k] = v
    return out


def cmdstat(info: dict, name: str) -> int:
    raw = info.get(f"cmdstat_{name}")
    if not raw:
        return 0
    return int(dict(kv.split("=") for kv in raw.split(","))["calls"])


def redis_counters(port: int) -> dict[str, float]:
    info = redis_info(port)
    return {
        "commands": int(info["total_commands_processed"]),
        "bytes_in": int(info["total_net_input_bytes"]),
        "bytes_out": int(info["total_net_output_bytes"]),
        "publish": cmdstat(info, "publish"),
        "evalsha": cmdstat(info, "evalsha"),
        "cpu": float(info["used_cpu_sys"]) + float(info["used_cpu_user"]),
    }


# --- the load, on Twisted ---------------------------------------------------------------


def run_load(args: argparse.Namespace, gw_ports: list[int], secret: str, gw_pids: list[int],
             redis_port: int, namespace: str) -> dict:
    import jwt
    from twisted.internet import defer, protocol, reactor, task, threads
    from twisted.protocols.basic import Int32StringReceiver

    rng = random.Random(args.seed)
    users = [f"u{i:05d}" for i in range(args.users)]
    follows = {u: rng.sample([v for v in users if v != u], min(args.follows, args.users - 1)) for u in users}
    flappers = rng.sample(users, args.flappers)
    exp = int(time.time()) + 3600
    tokens = {u: jwt.encode({"sub": u, "exp": exp}, secret, algorithm="HS256") for u in users}
    #: the time (monotonic) of each flapper's action: user -> [(online, t)]
    actions: dict[str, list[tuple[bool, float]]] = {u: [] for u in flappers}
    delays: list[float] = []
    seen: dict[tuple[str, str], list[bool]] = {}
    counts = {"presence": 0, "replies": 0, "errors": 0}

    class Client(Int32StringReceiver):
        MAX_LENGTH = 16 << 20

        def __init__(self, user: str) -> None:
            self.user = user
            self.authed = defer.Deferred()
            self.replied = defer.Deferred()

        def connectionMade(self) -> None:  # noqa: N802
            self.send({"type": "auth", "token": tokens[self.user]})

        def send(self, frame: dict) -> None:
            self.sendString(json.dumps(frame).encode())

        def stringReceived(self, data: bytes) -> None:  # noqa: N802
            frame = json.loads(data)
            kind = frame.get("type")
            if kind == "auth_reply":
                if frame.get("ok"):
                    self.authed.callback(self)
                else:
                    self.authed.errback(RuntimeError(str(frame)))
            elif kind == "presence_reply":
                counts["replies"] += 1
                if not frame.get("ok"):
                    code = frame["error"]["code"]
                    counts[f"reply_{code}"] = counts.get(f"reply_{code}", 0) + 1
                if not self.replied.called:
                    self.replied.callback(frame)
            elif kind == "presence":
                counts["presence"] += 1
                now = time.monotonic()
                who = frame["userId"]
                seen.setdefault((self.user, who), []).append(frame["online"])
                for online, t in reversed(actions.get(who, [])):
                    if online == frame["online"]:
                        delays.append(now - t)
                        break
            elif kind == "error":
                counts["errors"] += 1
                counts[f"error_{frame.get('code')}"] = counts.get(f"error_{frame.get('code')}", 0) + 1

    class Factory(protocol.ClientFactory):
        def __init__(self, user: str) -> None:
            self.user = user

        def buildProtocol(self, addr):  # noqa: N802
            p = Client(self.user)
            p.factory = self
            return p

    clients: dict[str, Client] = {}

    async def connect(user: str) -> Client:
        port = gw_ports[hash(user) % len(gw_ports)]
        from twisted.internet.endpoints import TCP4ClientEndpoint

        client = await TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=30).connect(Factory(user))
        await client.authed
        clients[user] = client
        return client

    async def main() -> dict:
        began = time.monotonic()
        sem = defer.DeferredSemaphore(200)
        await defer.gatherResults([sem.run(lambda u=u: defer.ensureDeferred(connect(u))) for u in users],
                                  consumeErrors=True)
        connected = time.monotonic() - began
        began = time.monotonic()
        def subscribe(u: str) -> defer.Deferred:
            clients[u].send({"type": "presence_subscribe", "id": "s", "users": follows[u]})
            return clients[u].replied

        # at most 200 waiting at once, as the logins: a steady arrival, not one burst
        await defer.gatherResults([sem.run(subscribe, u) for u in users], consumeErrors=True)
        subscribed = time.monotonic() - began
        await task.deferLater(reactor, 1.0, lambda: None)
        counts["presence"] = 0
        seen.clear()
        await threads.deferToThread(drain_webhooks, namespace)  # the logins' events: not the window's
        before_redis = redis_counters(redis_port)
        before_cpu = [cpu_seconds(p) for p in gw_pids]
        start = time.monotonic()
        d = args.duration
        plan = sorted((rng.uniform(0, max(0.1, d - 6.0)), u) for u in flappers)

        async def flap(at: float, user: str) -> None:
            await task.deferLater(reactor, at, lambda: None)
            actions[user].append((False, time.monotonic()))
            clients.pop(user).transport.loseConnection()
            await task.deferLater(reactor, rng.uniform(1.0, 5.0), lambda: None)
            actions[user].append((True, time.monotonic()))
            client = await connect(user)
            client.send({"type": "presence_subscribe", "id": "s", "users": follows[user]})  # as clients do

        await defer.gatherResults([defer.ensureDeferred(flap(at, u)) for at, u in plan], consumeErrors=True)
        rest = d - (time.monotonic() - start)
        await task.deferLater(reactor, max(rest, 0) + 2.0, lambda: None)  # the last frames arrive
        window = time.monotonic() - start
        after_redis = redis_counters(redis_port)
        after_cpu = [cpu_seconds(p) for p in gw_pids]
        msgs, size, events = await threads.deferToThread(drain_webhooks, namespace)
        for c in clients.values():
            c.transport.loseConnection()
        repeats = sum(1 for states in seen.values() for x, y in zip(states, states[1:]) if x == y)
        # a follower that was itself logged out meanwhile misses some: "at most"
        expected = sum(1 for u in users for v in follows[u] if v in actions) * 2
        delays.sort()

        def pct(q: float) -> float:
            return delays[min(len(delays) - 1, int(q * len(delays)))] if delays else float("nan")

        rd = {k: after_redis[k] - before_redis[k] for k in after_redis}
        transitions = 2 * len(flappers)
        return {
            "users": args.users, "follows": args.follows, "flappers": args.flappers,
            "window_s": round(window, 1), "connect_s": round(connected, 1), "subscribe_s": round(subscribed, 1),
            "transitions": transitions,
            "presence_frames": counts["presence"], "presence_frames_expected_at_most": expected,
            "same_state_repeats": repeats, "errors": counts["errors"],
            **{k: v for k, v in counts.items() if k.startswith(("reply_", "error_"))},
            "delay_p50_ms": round(pct(0.5) * 1000, 1), "delay_p99_ms": round(pct(0.99) * 1000, 1),
            "delay_max_ms": round(delays[-1] * 1000, 1) if delays else None,
            "redis_commands": rd["commands"], "redis_bytes_in": rd["bytes_in"], "redis_bytes_out": rd["bytes_out"],
            "redis_publish": rd["publish"], "redis_script_calls": rd["evalsha"],
            "redis_cpu_s": round(rd["cpu"], 2),
            "gateways_cpu_s": round(sum(a - b for a, b in zip(after_cpu, before_cpu)), 2),
            "redis_commands_per_transition": round(rd["commands"] / transitions, 1),
            "redis_bytes_per_transition": round((rd["bytes_in"] + rd["bytes_out"]) / transitions),
            "amqp_webhook_messages": msgs, "amqp_webhook_bytes": size, "webhook_events": events,
        }

    result: dict = {}

    def done(r):
        result.update(r) if isinstance(r, dict) else result.update({"error": str(r)})
        reactor.stop()

    reactor.callWhenRunning(lambda: defer.ensureDeferred(main()).addBoth(done))
    reactor.run()
    return result


def drain_webhooks(namespace: str) -> tuple[int, int, int]:
    """(AMQP messages, bytes, events) in ``<ns>.webhooks``."""
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        ch = conn.channel()
        n = size = events = 0
        while True:
            method, _props, body = ch.basic_get(f"{namespace}.webhooks", auto_ack=True)
            if method is None:
                return n, size, events
            n += 1
            size += len(body)
            events += len(json.loads(body))
    finally:
        conn.close()


def delete_namespace(namespace: str) -> None:
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        ch = conn.channel()
        for q in (f"{namespace}.processor", f"{namespace}.dead", f"{namespace}.webhooks"):
            ch.queue_delete(q)
        for x in (f"{namespace}.exchange", f"{namespace}.dlx"):
            ch.exchange_delete(x)
    finally:
        conn.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=5000)
    ap.add_argument("--follows", type=int, default=50)
    ap.add_argument("--flappers", type=int, default=500)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=16)
    ap.add_argument("--tiny", action="store_true", help="200 users x 10 follows, 20 flap over 8 s")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    if args.tiny:
        args.users, args.follows, args.flappers, args.duration = 200, 10, 20, 8.0
    workdir = Path(tempfile.mkdtemp(prefix="imbench-presence-"))
    namespace = "imbp" + uuid.uuid4().hex[:8]
    secret = "bench-" + uuid.uuid4().hex
    redis_port = free_port()
    procs: list[subprocess.Popen] = []
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMCLUSTER_")}
    try:
        redis = subprocess.Popen([shutil.which("redis-server") or "/usr/bin/redis-server", "--port", str(redis_port),
                                  "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                                 stdout=open(workdir / "redis.log", "w"), stderr=subprocess.STDOUT)
        procs.append(redis)
        wait_port(redis_port)
        gw_ports, gw_pids = [], []
        for i in range(2):
            port = free_port()
            argv = [str(BIN / "twistd"), "-n", "--pidfile=", "imgateway", "--namespace", namespace,
                    "--redis", f"redis://127.0.0.1:{redis_port}/0", "--amqp", AMQP_URL, "--jwt-secret", secret,
                    "--tcp", f"tcp:{port}:interface=127.0.0.1", "--ws", "tcp:0:interface=127.0.0.1",
                    "--stream", "tcp:0:interface=127.0.0.1", "--advertise", "127.0.0.1",
                    "--webhook-url", "http://127.0.0.1:9/bench"]
            p = subprocess.Popen(argv, stdout=open(workdir / f"gw{i}.log", "w"), stderr=subprocess.STDOUT,
                                 env=env, cwd=workdir)
            procs.append(p)
            gw_ports.append(port)
            gw_pids.append(p.pid)
        for port in gw_ports:
            wait_port(port, 60)
        figures = run_load(args, gw_ports, secret, gw_pids, redis_port, namespace)
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
        except Exception as e:  # noqa: BLE001 (a bench cleans up as best it can)
            print(f"could not delete namespace {namespace}: {e}", file=sys.stderr)
        shutil.rmtree(workdir, ignore_errors=True)
    width = max(len(k) for k in figures)
    print(f"presence: {args.users} users x {args.follows} follows, {args.flappers} log out and in "
          f"over {args.duration:g} s (2 gateways, private Redis)")
    for k, v in figures.items():
        print(f"  {k:<{width}}  {v}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if "error" not in figures else 1


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark the cluster side by side with a bare echo ceiling (a script, not a test).

    .venv/bin/python bench/run.py                 # every scenario, default sizes
    .venv/bin/python bench/run.py --tiny          # a few seconds (what CI runs)
    .venv/bin/python bench/run.py --scenarios p2p-latency,fanout --conns 20000
    .venv/bin/python bench/run.py --peer socketio # beside Node socket.io 4 + redis-adapter

Starts its own cluster on the local Redis/RabbitMQ/PostgreSQL (2 gateways,
``--processors`` processors, a private namespace, Redis prefix and PostgreSQL
schema migrated with ``imcluster migrate``), runs the scenarios with the Node
load generator (bench/gen.js, ``npm ci --prefix bench`` first), stops what it
started, deletes the queues, keys and schema, prints a results table and
writes it as JSON (``--json``, default bench/results/<run>.json).

Every figure is printed with its parameters, the generator's own CPU share
(of one core) and the CPU of the gateways, the processors and the whole
machine over the same window.

The scenarios ending in ``-sse`` run the same load over the HTTP streaming
transport (the gateways' ``--stream`` endpoints, Server-Sent Events), beside
their WebSocket twins on the same cluster: their figures add the gateways'
CPU per delivered message as a multiple of WebSocket's (the aim: 1.5x or
less).

``--peer socketio`` also starts the reference peer (bench/peers/socketio.js:
2 Node socket.io 4 nodes on @socket.io/redis-adapter, storing nothing) and
runs each scenario it has (conn, p2p-latency, p2p-throughput, fanout) on it
right after ours, with the same generator (its socketio mode); the peer's
table and the ratios ours / peer's follow ours.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
BIN = Path(sys.executable).parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

#: the targets of the performance issue (docs/benchmarks.rst)
TARGETS = {
    "p2p-throughput": ("delivered msgs/s >= 7000", lambda r: r["delivered_per_s"] >= 7000),
    "p2p-latency": ("p99 <= 10 ms", lambda r: r["latency_ms"]["p99"] is not None and r["latency_ms"]["p99"] <= 10),
    "fanout": ("max >= 50000 deliveries/s", lambda r: r["max"]["deliveries_per_s"] >= 50000),
    "conn": ("<= 12 KB RSS/conn", lambda r: r["rss_kb_per_conn"] <= 12),
    "sync": ("<= 2 s per 10k backlog", lambda r: r["seconds"] * 10000 / max(1, r["backlog"]) <= 2.0),
}


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


# --- /proc sampling ------------------------------------------------------------------

def cpu_ticks(pid: int) -> int:
    """utime + stime of ``pid`` in clock ticks (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except OSError:
        return 0


def machine_ticks() -> tuple[int, int]:
    """(busy, total) ticks of all cores since boot."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + parts[4]
    total = sum(parts[:8])
    return total - idle, total


#: the shared services the cluster leans on (their CPU is part of every figure)
SERVICE_COMMANDS = ("postgres", "beam.smp", "redis-server")


def service_pids() -> list[int]:
    """PIDs of the local PostgreSQL, RabbitMQ and Redis processes (all their workers)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as f:
                    if f.read().strip() in SERVICE_COMMANDS:
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE // 1024


class CpuWindow:
    """CPU of named process groups and of the machine between start() and stop()."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = dict(groups)
        self.result: dict[str, float] = {}

    def start(self) -> None:
        # PostgreSQL forks a backend per connection: look the services up when the window opens
        self.groups["services"] = service_pids()
        self.t0 = time.monotonic()
        self.ticks0 = {g: {p: cpu_ticks(p) for p in pids} for g, pids in self.groups.items()}
        self.machine0 = machine_ticks()

    def stop(self) -> None:
        wall = time.monotonic() - self.t0
        for g, pids in self.groups.items():
            before = self.ticks0.get(g, {})
            # a process gone meanwhile counts 0 (not minus what it had used before)
            used = sum(max(0, cpu_ticks(p) - before.get(p, 0)) for p in pids if p in before) / CLK_TCK
            self.result[g] = round(100 * used / wall, 1)  # % of one core
        busy1, total1 = machine_ticks()
        busy0, total0 = self.machine0
        self.result["seconds"] = round(wall, 2)  # the window's length (CPU per delivery = share x seconds / n)
        self.result["machine"] = round(100 * (busy1 - busy0) / max(1, total1 - total0), 1)  # % of all cores
        # what is left: other work on the machine (the generator's own share is reported beside)
        ncpu = os.cpu_count() or 1
        ours = sum(v for k, v in self.result.items() if k not in ("machine", "other", "seconds"))
        self.result["other"] = round(max(0.0, self.result["machine"] * ncpu - ours), 1)


#: daemon histograms whose deltas over a scenario say where the time goes
HISTOGRAMS = ("imcluster_queue_to_commit_seconds", "imcluster_end_to_end_seconds", "imcluster_batch_size",
              "imcluster_publish_batch_size")


def scrape(ports: list[int]) -> dict[str, dict[str, float]]:
    """Sum of each histogram's buckets/sum/count over the daemons' /metrics."""
    import urllib.request

    out: dict[str, dict[str, float]] = {}
    for port in ports:
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            for h in HISTOGRAMS:
                if line.startswith(h + "_"):
                    key, _, value = line.rpartition(" ")
                    d = out.setdefault(h, {})
                    d[key[len(h) + 1:]] = d.get(key[len(h) + 1:], 0.0) + float(value)
    return out


def histogram_delta(before: dict, after: dict) -> dict[str, dict]:
    """Per histogram: count, mean and the bucket bound holding p50 and p99, over the scenario."""
    import re

    out = {}
    for h, vals in after.items():
        b = before.get(h, {})
        count = vals.get("count", 0) - b.get("count", 0)
        if count <= 0:
            continue
        total = vals.get("sum", 0) - b.get("sum", 0)
        buckets = []
        for k, v in vals.items():
            m = re.match(r'bucket\{le="([^"]+)"\}', k)
            if m:
                buckets.append((float(m.group(1)), v - b.get(k, 0)))
        buckets.sort()
        q = {}
        for name, frac in (("p50_le", 0.5), ("p99_le", 0.99)):
            q[name] = next((le for le, c in buckets if c >= frac * count), None)
        short = h.replace("imcluster_", "")
        out[short] = {"count": int(count), "mean": round(total / count, 6), **q}
    return out


# --- the cluster ---------------------------------------------------------------------

class Cluster:
    """2 gateways + N processors as real twistd processes, on private names; stop() removes all."""

    mode = "imcluster"  # what gen.js speaks to it

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.run_id = secrets.token_hex(4)
        self.namespace = f"bench_{self.run_id}"
        self.redis_prefix = f"bench:{self.run_id}:"
        self.schema = f"bench_{self.run_id}"
        self.secret = secrets.token_hex(16)
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.gateways: list[dict] = []
        self.processors: list[subprocess.Popen] = []
        self.metrics_ports: list[int] = []

    def common(self) -> list[str]:
        a = self.args
        return [f"--namespace={self.namespace}", f"--redis={a.redis}", f"--redis-prefix={self.redis_prefix}",
                f"--amqp={a.amqp}"]

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        argv = [str(self.workdir / f"{name}.trace.json") if x == "{trace}" else x for x in argv]
        logf = open(self.workdir / f"{name}.log", "ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith("IMCLUSTER_")}
        env["PYTHONUNBUFFERED"] = "1"
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                             cwd=self.workdir, env=env)
        logf.close()
        self.procs.append((name, p))
        return p

    def migrate(self) -> None:
        out = subprocess.run([str(BIN / "imcluster"), "migrate", f"--postgres={self.args.postgres}",
                              f"--postgres-schema={self.schema}"], capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"bench: imcluster migrate failed: {out.stderr.strip()}")

    def wait(self, name: str, proc: subprocess.Popen, ready, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if proc.poll() is not None:
                raise SystemExit(f"bench: {name} exited with {proc.returncode}; see {self.workdir}/{name}.log")
            if time.monotonic() > deadline:
                raise SystemExit(f"bench: {name} not ready within {timeout}s; see {self.workdir}/{name}.log")
            time.sleep(0.1)

    def start(self) -> None:
        a = self.args
        self.migrate()
        twistd = [str(BIN / "twistd"), "-n", "--pidfile="]
        if a.trace:  # every daemon under bench/trace.py: hot-call latencies in <workdir>/<name>.trace.json
            twistd = [sys.executable, str(BENCH / "trace.py"), "{trace}", *twistd]
        queue = f"{self.namespace}.processor"
        for i in range(a.processors):
            before = consumer_count(a.amqp, queue)
            mport = free_port()
            p = self.spawn(f"improcessor-{i + 1}", twistd + ["improcessor", *self.common(),
                           f"--postgres={a.postgres}", f"--postgres-schema={self.schema}",
                           f"--metrics=tcp:{mport}:interface=127.0.0.1", *a.processor_arg])
            self.wait(f"improcessor-{i + 1}", p,
                      lambda: port_open(mport) and consumer_count(a.amqp, queue) > before)
            self.processors.append(p)
            self.metrics_ports.append(mport)
        self.start_gateways()
        log(f"cluster up: namespace {self.namespace}, schema {self.schema}, "
            f"gateways {[g['proc'].pid for g in self.gateways]}, processors {[p.pid for p in self.processors]}")

    def start_gateways(self) -> None:
        a = self.args
        twistd = [str(BIN / "twistd"), "-n", "--pidfile="]
        if a.trace:
            twistd = [sys.executable, str(BENCH / "trace.py"), "{trace}", *twistd]
        self.generation = getattr(self, "generation", 0) + 1
        for i in range(2):
            ws, tcp, stream, mport = free_port(), free_port(), free_port(), free_port()
            name = f"imgateway-{i + 1}" + (f".{self.generation}" if self.generation > 1 else "")
            p = self.spawn(name, twistd + [
                "imgateway", *self.common(), f"--jwt-secret={self.secret}", "--advertise=127.0.0.1",
                f"--ws=tcp:{ws}:interface=127.0.0.1", f"--tcp=tcp:{tcp}:interface=127.0.0.1",
                f"--stream=tcp:{stream}:interface=127.0.0.1",
                # the generator's senders run above a phone's rate on purpose
                f"--rate-limit={a.rate_limit}", f"--rate-burst={a.rate_limit}",
                f"--metrics=tcp:{mport}:interface=127.0.0.1", *a.gateway_arg])
            self.wait(name, p,
                      lambda: port_open(ws) and port_open(tcp) and port_open(stream) and port_open(mport))
            self.metrics_ports.append(mport)
            self.gateways.append({"proc": p, "url": f"ws://127.0.0.1:{ws}/ws", "metrics": mport,
                                  "sse": f"http://127.0.0.1:{stream}", "poll": f"http://127.0.0.1:{stream}"})

    def restart_gateways(self) -> None:
        """Fresh gateway processes: a connection scenario measures RSS growth, which memory freed
        by an earlier scenario (and reused without growing) would hide."""
        for g in self.gateways:
            g["proc"].send_signal(signal.SIGTERM)
        for g in self.gateways:
            try:
                g["proc"].wait(30)
            except subprocess.TimeoutExpired:
                g["proc"].kill()
                g["proc"].wait(5)
            self.metrics_ports.remove(g["metrics"])
        self.gateways = []
        self.start_gateways()
        log(f"fresh gateways {[g['proc'].pid for g in self.gateways]}")

    def stop(self) -> None:
        for _name, p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for name, p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                log(f"{name} did not stop within 30s: killed")
                p.kill()
                p.wait(5)
        self.procs.clear()
        cleanup(self.args, self.namespace, self.redis_prefix, self.schema)


class SocketIOPeer:
    """The reference peer: 2 nodes of bench/peers/socketio.js (socket.io 4 + redis-adapter) on our Redis.

    Looks like a :class:`Cluster` to the scenarios (``gateways``, ``processors``,
    ``run_id``, ``secret``, ``mode``); it stores nothing, so it has no processors.
    """

    mode = "socketio"
    label = "Node socket.io 4 + @socket.io/redis-adapter"
    #: the scenarios it has (echo is ours alone, sync needs storage)
    SCENARIOS = ("conn", "p2p-latency", "p2p-throughput", "fanout")

    def __init__(self, args: argparse.Namespace, workdir: Path, run_id: str, secret: str) -> None:
        self.args = args
        self.workdir = workdir
        self.run_id = run_id + "p"
        self.secret = secret
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.gateways: list[dict] = []
        self.processors: list[subprocess.Popen] = []
        self.metrics_ports: list[int] = []

    def start(self) -> None:
        for i in range(2):
            port = free_port()
            name = f"socketio-{i + 1}"
            config = {"port": port, "secret": self.secret, "redis": self.args.redis,
                      "prefix": f"bench:{self.run_id}:sio"}
            logf = open(self.workdir / f"{name}.log", "ab")
            p = subprocess.Popen(["node", str(BENCH / "peers" / "socketio.js"), json.dumps(config)],
                                 stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, cwd=BENCH)
            logf.close()
            self.procs.append((name, p))
            deadline = time.monotonic() + 30
            while not port_open(port):
                if p.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"bench: {name} did not start; see {self.workdir}/{name}.log")
                time.sleep(0.05)
            self.gateways.append({"proc": p, "url": f"http://127.0.0.1:{port}"})
        log(f"peer up: {self.label}, nodes {[g['proc'].pid for g in self.gateways]}")

    def stop(self) -> None:
        for _name, p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for _name, p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        self.procs.clear()


PEERS = {"socketio": SocketIOPeer}


def consumer_count(url: str, queue: str) -> int:
    import pika
    import pika.exceptions

    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        try:
            return conn.channel().queue_declare(queue, passive=True).method.consumer_count
        except pika.exceptions.ChannelClosedByBroker:
            return 0
    finally:
        if conn.is_open:
            conn.close()


def cleanup(args: argparse.Namespace, namespace: str, prefix: str, schema: str) -> None:
    """Delete the run's AMQP topology, Redis keys and PostgreSQL schema (each step on its own)."""
    try:
        import pika

        conn = pika.BlockingConnection(pika.URLParameters(args.amqp))
        ch = conn.channel()
        for q in (f"{namespace}.processor", f"{namespace}.dead"):
            ch.queue_delete(q)
        for x in (f"{namespace}.exchange", f"{namespace}.dlx"):
            ch.exchange_delete(x)
        conn.close()
    except Exception as e:  # noqa: BLE001 (clean-up goes on)
        log(f"AMQP clean-up failed: {e!r}")
    try:
        from urllib.parse import urlparse

        for url in args.redis.split(","):  # one URL per shard (bench with --redis a,b)
            u = urlparse(url)
            redis_cli = ["redis-cli", "-h", u.hostname or "127.0.0.1", "-p", str(u.port or 6379),
                         "-n", (u.path or "/0").strip("/") or "0"]
            keys = subprocess.run(redis_cli + ["--scan", "--pattern", prefix + "*"], capture_output=True,
                                  text=True, check=True).stdout.split()
            for i in range(0, len(keys), 500):
                subprocess.run(redis_cli + ["DEL", *keys[i:i + 500]], capture_output=True, check=True)
    except Exception as e:  # noqa: BLE001
        log(f"Redis clean-up failed: {e!r}")
    try:
        import psycopg2

        pg = psycopg2.connect(args.postgres)
        pg.autocommit = True
        with pg.cursor() as cur:
            cur.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        pg.close()
    except Exception as e:  # noqa: BLE001
        log(f"PostgreSQL clean-up failed: {e!r}")


# --- the generator -------------------------------------------------------------------

class Generator:
    """One `node bench/gen.js` process; marks in its output open/close CPU windows."""

    def __init__(self, config: dict, window: CpuWindow | None, on_event=None) -> None:
        self.window = window
        self.on_event = on_event
        self.result: dict | None = None
        self.proc = subprocess.Popen(["node", str(BENCH / "gen.js"), json.dumps(config)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=BENCH)
        if window is not None:
            window.groups["generator"] = [self.proc.pid]
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            ev = json.loads(line)
            if ev["event"] == "mark" and self.window is not None:
                (self.window.start if ev["name"] == "start" else self.window.stop)()
            elif ev["event"] in ("result", "failed"):
                self.result = ev
            elif self.on_event:
                self.on_event(self, ev)

    def say(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def wait(self, timeout: float) -> dict:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"generator did not finish within {timeout:g}s")
        self.reader.join(5)
        err = self.proc.stderr.read()
        if not self.result or self.result["event"] != "result":
            raise RuntimeError(f"generator failed: {(self.result or {}).get('error') or err[-2000:]}")
        return self.result


# --- scenarios -----------------------------------------------------------------------

#: the scenarios that also run over the HTTP streaming transport (name-sse)
STREAMED = ("conn", "p2p-latency", "p2p-throughput")


def split_name(name: str) -> tuple[str, str]:
    """``(base scenario, transport)``: ``p2p-latency-sse`` is ``p2p-latency`` over ``sse``."""
    for transport in ("sse", "poll"):
        if name.endswith("-" + transport):
            return name[:-len(transport) - 1], transport
    return name, "ws"


def gateway_urls(cluster, name: str) -> tuple[list[str], str]:
    """The gateway URLs a scenario's clients use, and its transport."""
    _, transport = split_name(name)
    return [g["url" if transport == "ws" else transport] for g in cluster.gateways], transport

def scenario_params(args: argparse.Namespace) -> dict[str, dict]:
    """Each scenario's sizes; a streamed twin (``name-sse``) runs with its WebSocket one's."""
    params = _scenario_params(args)
    for name in STREAMED:
        params[f"{name}-sse"] = params[name]
    return params


def _scenario_params(args: argparse.Namespace) -> dict[str, dict]:
    if args.tiny:
        return {
            "echo": {"conns": 4, "window": 8, "warmup": 0.3, "seconds": 0.7},
            "conn": {"n": 40},
            "p2p-latency": {"pairs": 5, "rate": 100, "seconds": 1, "drain": 10},
            "p2p-throughput": {"pairs": 5, "window": 4, "warmup": 0.3, "seconds": 1, "drain": 10},
            "fanout": {"members": 10, "senders": 2, "rate": 20, "windows": [2, 4], "warmup": 0.3, "seconds": 1,
                       "drain": 10},
            "sync": {"backlog": 100, "window": 50},
        }
    d = args.duration
    return {
        "echo": {"conns": 200, "window": 32, "warmup": 2, "seconds": min(d, 10)},
        "conn": {"n": args.conns},
        "p2p-latency": {"pairs": 200, "rate": args.p2p_rate, "seconds": d, "drain": 30},
        "p2p-throughput": {"pairs": 200, "window": 32, "warmup": 3, "seconds": d, "drain": 60},
        "fanout": {"members": args.members, "senders": 5, "rate": 50, "windows": [16, 32, 64], "warmup": 3,
                   "seconds": d, "drain": 60},
        "sync": {"backlog": args.backlog, "window": 500},
    }


def run_echo(args, cluster, params) -> dict:
    port = free_port()
    pin = ["taskset", "-c", "1"] if shutil.which("taskset") and os.cpu_count() > 1 else []
    server = subprocess.Popen(pin + [sys.executable, str(BENCH / "echo_server.py"), str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not port_open(port):
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("echo server did not start")
            time.sleep(0.05)
        window = CpuWindow({"echo_server": [server.pid]})
        gen = Generator({"scenario": "echo", "run": cluster.run_id, "secret": cluster.secret, "gateways": [],
                         "echoUrl": f"ws://127.0.0.1:{port}/", "params": params}, window)
        result = gen.wait(120)
        result["cpu"] = window.result
        return result
    finally:
        server.terminate()
        server.wait(10)


def run_conn(args, cluster, params, name="conn") -> dict:
    n = params["n"]
    # one node process holds at most ~8000 sockets (the fd limit is shared with nothing else then)
    per = 8000
    procs = max(1, -(-n // per))
    gw_pids = [g["proc"].pid for g in cluster.gateways]
    time.sleep(0.5)
    rss0 = {p: rss_kb(p) for p in gw_pids}
    connected = threading.Event()
    waiting = {"left": procs, "seconds": 0.0}
    lock = threading.Lock()

    def on_event(_gen, ev):
        if ev["event"] == "connected":
            with lock:
                waiting["left"] -= 1
                waiting["seconds"] = max(waiting["seconds"], ev["seconds"])
                if waiting["left"] == 0:
                    connected.set()

    window = CpuWindow({"gateways": gw_pids, "processors": [p.pid for p in cluster.processors]})
    gens = []
    base = n // procs
    offset = 0
    for i in range(procs):
        k = base + (1 if i < n % procs else 0)
        urls, transport = gateway_urls(cluster, name)
        gens.append(Generator({"scenario": name, "run": cluster.run_id, "secret": cluster.secret,
                               "mode": cluster.mode, "gateways": urls, "transport": transport,
                               "params": {"n": k, "offset": offset}}, None, on_event))
        offset += k
    window.groups["generator"] = [g.proc.pid for g in gens]
    window.start()
    # the connect phase only: what setting a connection up costs
    profiler = Profiler(args.profile if cluster.mode == "imcluster" else None, "conn", cluster)
    try:
        if not connected.wait(600):
            for g in gens:
                g.proc.kill()
            raise RuntimeError("connections not established within 600s: "
                               + " ".join(str((g.result or {}).get("error", ""))[:500] for g in gens))
    finally:
        profiler.stop()
    window.stop()
    gen_cpu = sum(cpu_ticks(g.proc.pid) for g in gens) / CLK_TCK / waiting["seconds"]
    time.sleep(1.0)  # let the gateways settle (sync replies, Redis writes)
    rss1 = {p: rss_kb(p) for p in gw_pids}
    for g in gens:
        g.say("close")
    results = [g.wait(120) for g in gens]
    growth = sum(rss1.values()) - sum(rss0.values())
    return {"connected": sum(r["connected"] for r in results), "seconds": waiting["seconds"],
            "rate": n / waiting["seconds"], "gateway_rss_kb_before": list(rss0.values()),
            "gateway_rss_kb_after": list(rss1.values()), "rss_kb_per_conn": round(growth / n, 2),
            "unexpected_closes": sum(r["unexpected_closes"] for r in results), "generators": procs,
            "gen_cpu": gen_cpu, "cpu": window.result,
            "errors": [r["errors"] for r in results]}


class Profiler:
    """py-spy record (raw collapsed stacks) of every daemon while a scenario runs (``--profile DIR``)."""

    def __init__(self, directory: str | None, scenario: str, cluster: Cluster) -> None:
        self.procs: list[subprocess.Popen] = []
        if not directory:
            return
        spy = shutil.which("py-spy") or str(BIN / "py-spy")
        Path(directory).mkdir(parents=True, exist_ok=True)
        for name, p in cluster.procs:
            out = Path(directory) / f"{scenario}-{name}.txt"
            self.procs.append(subprocess.Popen(
                [spy, "record", "--format", "raw", "--rate", "200", "--nonblocking", "-o", str(out),
                 "-p", str(p.pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    def stop(self) -> None:
        for p in self.procs:
            p.send_signal(signal.SIGINT)
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


def run_cluster_scenario(name, args, cluster, params) -> dict:
    window = CpuWindow({"gateways": [g["proc"].pid for g in cluster.gateways],
                        "processors": [p.pid for p in cluster.processors]})
    profiler = Profiler(args.profile if cluster.mode == "imcluster" else None, name, cluster)
    before = scrape(cluster.metrics_ports)
    try:
        urls, transport = gateway_urls(cluster, name)
        gen = Generator({"scenario": name, "run": cluster.run_id, "secret": cluster.secret, "mode": cluster.mode,
                         "gateways": urls, "transport": transport, "params": params}, window)
        result = gen.wait(900)
    finally:
        profiler.stop()
    result["cpu"] = window.result
    result["daemon_histograms"] = histogram_delta(before, scrape(cluster.metrics_ports))
    return result


# --- the table -----------------------------------------------------------------------

def fmt_lat(lat: dict) -> str:
    return f"p50 {lat['p50']} p90 {lat['p90']} p99 {lat['p99']} max {lat['max']} ms"


def figures(name: str, r: dict, ceiling: float | None) -> list[str]:
    base, _ = split_name(name)
    if base != name:
        lines = figures(base, r, ceiling)
        if "vs_ws" in r:
            lines.append(r["vs_ws"])
        return lines
    frac = (lambda x: f" ({100 * x / ceiling:.0f}% of echo)") if ceiling else (lambda x: "")
    if name == "echo":
        return [f"{r['echoes_per_s']:,.0f} echoes/s", fmt_lat(r["latency_ms"])]
    if name == "conn":
        return [f"{r['connected']} connected in {r['seconds']:.1f}s = {r['rate']:,.0f} conn/s",
                f"gateway RSS {r['rss_kb_per_conn']} KB/conn", f"unexpected closes {r['unexpected_closes']}"]
    if name == "p2p-latency":
        return [fmt_lat(r["latency_ms"]), f"reply {fmt_lat(r['reply_latency_ms'])}",
                f"sent {r['sent']} ok {r['replied_ok']} lost {r['lost']} dup {r['duplicated']}"]
    if name == "p2p-throughput":
        return [f"{r['delivered_per_s']:,.0f} delivered msgs/s{frac(r['delivered_per_s'])}", fmt_lat(r["latency_ms"]),
                f"sent {r['sent']} ok {r['replied_ok']} lost {r['lost']} dup {r['duplicated']}"]
    if name == "fanout":
        return [f"at {r['rate']['msgs_per_s']} msgs/s: {r['rate']['deliveries_per_s']:,.0f} deliveries/s, "
                + fmt_lat(r["rate"]["latency_ms"]),
                f"max: {r['max']['deliveries_per_s']:,.0f} deliveries/s{frac(r['max']['deliveries_per_s'])} "
                f"at {r['max']['window']} in flight per sender, " + fmt_lat(r["max"]["latency_ms"]),
                "in flight per sender: " + ", ".join(
                    f"{s['window']}: {s['deliveries_per_s']:,.0f}/s p50 {s['latency_ms']['p50']} ms"
                    for s in r["steps"]),
                f"sent {r['sent']} ok {r['replied_ok']} lost {r['lost']} dup {r['duplicated']}"]
    if name == "sync":
        return [f"{r['received']} msgs, sync_done {r['sync_done_count']} in {r['seconds']:.2f}s "
                f"({r['msgs_per_s']:,.0f} msgs/s)", f"lost {r['lost']} dup {r['duplicated']}"]
    return [json.dumps(r)]


def table(results: dict, params: dict, meta: dict, peer: str | None = None) -> str:
    ceiling = results.get("echo", {}).get("echoes_per_s")
    if peer is None:
        lines = [f"imcluster benchmark {meta['run']} on {meta['machine']}",
                 f"cluster: 2 gateways, {meta['processors']} processor(s); generator: node {meta['node']} ws "
                 f"(no compression)",
                 "CPU over each measured window, % of one core: gen = the load generator, gw = both gateways, "
                 "proc = processors, svc = PostgreSQL + RabbitMQ + Redis, other = everything else on the machine; "
                 f"mach = % of all {os.cpu_count()} cores busy", ""]
    else:
        lines = [f"the reference peer, same run: {peer}, 2 nodes, stores nothing; generator: the same, "
                 "socket.io-client over WebSocket; gw = both peer nodes", ""]
    head = (f"{'scenario':<19} {'parameters':<44} {'result':<78} {'target':<28} "
            f"{'gen':>5} {'gw':>5} {'proc':>5} {'svc':>5} {'other':>5} {'mach':>5}")
    lines += [head, "-" * len(head)]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"{name:<19} FAILED: {r['error'][:200]}")
            continue
        target, check = TARGETS.get(split_name(name)[0], ("(ceiling)", None)) if peer is None else ("-", None)
        verdict = "" if check is None else (" OK" if check(r) else " MISSED")
        if split_name(name)[0] in ("p2p-latency", "p2p-throughput", "fanout", "sync") and (
                r.get("lost") or r.get("duplicated")):
            verdict = " LOST/DUP"
        p = " ".join(f"{k}={v}" for k, v in params[name].items() if k != "drain")
        cpu = r.get("cpu", {})
        gen = f"{100 * r.get('gen_cpu', 0):.0f}%"
        gwc = f"{cpu['gateways']:.0f}%" if "gateways" in cpu else f"{cpu.get('echo_server', 0):.0f}%"
        prc = f"{cpu['processors']:.0f}%" if "processors" in cpu else "-"
        mach = f"{cpu.get('machine', 0):.0f}%"
        svc = f"{cpu.get('services', 0):.0f}%"
        other = f"{cpu.get('other', 0):.0f}%"
        for i, fig in enumerate(figures(name, r, ceiling)):
            if i == 0:
                lines.append(f"{name:<19} {p[:44]:<44} {fig:<78} {(target + verdict):<28} {gen:>5} {gwc:>5} {prc:>5} {svc:>5} {other:>5} {mach:>5}")
            else:
                lines.append(f"{'':<19} {p[44 * i:44 * (i + 1)]:<44} {fig:<78}")
    return "\n".join(lines)


def _server_cpu_us(r: dict, delivered_per_s: float) -> float | None:
    """CPU of the servers and the services they use (% of one core), per delivered message, in µs."""
    cpu = r.get("cpu", {})
    if not delivered_per_s:
        return None
    busy = cpu.get("gateways", 0) + cpu.get("processors", 0) + cpu.get("services", 0)
    return round(busy / 100 / delivered_per_s * 1e6, 1)


#: (scenario, figure, how to read it from a result, True when higher is better)
RATIOS = [
    ("conn", "RSS KB per idle authenticated conn", lambda r: r["rss_kb_per_conn"], False),
    ("conn", "connection setup conn/s", lambda r: r["rate"], True),
    ("p2p-latency", "p50 ms at the fixed rate", lambda r: r["latency_ms"]["p50"], False),
    ("p2p-latency", "p99 ms at the fixed rate", lambda r: r["latency_ms"]["p99"], False),
    ("p2p-throughput", "max delivered msgs/s", lambda r: r["delivered_per_s"], True),
    ("p2p-throughput", "server+services CPU µs per msg", lambda r: _server_cpu_us(r, r["delivered_per_s"]), False),
    ("fanout", "max deliveries/s", lambda r: r["max"]["deliveries_per_s"], True),
]


def ratio_rows(ours: dict, theirs: dict) -> list[dict]:
    """Each comparable figure of both runs with ours / theirs (the JSON's ``peer.ratios``)."""
    rows = []
    for name, figure, get, higher in RATIOS:
        a, b = ours.get(name, {}), theirs.get(name, {})
        if "error" in a or "error" in b or not a or not b:
            continue
        try:
            x, y = get(a), get(b)
        except (KeyError, TypeError):
            continue
        if x is None or y is None:
            continue
        rows.append({"scenario": name, "figure": figure, "imcluster": x, "peer": y,
                     "ratio": round(x / y, 2) if y else None, "higher_is_better": higher})
    return rows


def ratio_table(rows: list[dict], peer: str) -> str:
    lines = [f"imcluster beside {peer} (same run, same generator; ratio = imcluster / peer)", ""]
    head = f"{'scenario':<15} {'figure':<36} {'imcluster':>12} {'peer':>12} {'ratio':>7}"
    lines += [head, "-" * len(head)]
    for row in rows:
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}"
        better = "higher is better" if row["higher_is_better"] else "lower is better"
        lines.append(f"{row['scenario']:<15} {row['figure']:<36} {row['imcluster']:>12,.2f} "
                     f"{row['peer']:>12,.2f} {ratio:>7}  {better}")
    return "\n".join(lines)


def gateway_us_per_msg(r: dict) -> float | None:
    """Gateway CPU (both gateways, microseconds of one core) per delivered message, or None."""
    rate = r.get("delivered_per_s") or (r.get("params", {}).get("rate") if "latency_ms" in r else None)
    cpu = r.get("cpu", {}).get("gateways")
    if not rate or cpu is None:
        return None
    return 1e6 * (cpu / 100) / rate


def compare_transports(results: dict) -> None:
    """Put each streamed scenario's cost beside its WebSocket twin's (``vs_ws``: a line of the table)."""
    for name, r in results.items():
        base, transport = split_name(name)
        ws = results.get(base)
        if transport == "ws" or not ws or "error" in r or "error" in ws:
            continue
        if base == "conn":
            if ws.get("rss_kb_per_conn"):
                ratio = r["rss_kb_per_conn"] / ws["rss_kb_per_conn"]
                r["vs_ws"] = (f"{r['rss_kb_per_conn']} KB/conn vs WebSocket's {ws['rss_kb_per_conn']} KB/conn: "
                              f"{ratio:.2f}x")
            continue
        mine, theirs = gateway_us_per_msg(r), gateway_us_per_msg(ws)
        if mine and theirs:
            r["gateway_us_per_msg"], r["ws_gateway_us_per_msg"] = round(mine, 1), round(theirs, 1)
            r["cost_vs_ws"] = round(mine / theirs, 2)
            r["vs_ws"] = (f"gateway CPU {mine:.0f} us/msg vs WebSocket's {theirs:.0f} us/msg: "
                          f"{mine / theirs:.2f}x (aim <= 1.5x)")


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PHYS_PAGES") * PAGE // 2**30
    return f"{os.cpu_count()} x {model}, {mem} GiB, Linux {os.uname().release}"


def settle(limit: float) -> float:
    """Wait (at most ``limit`` seconds) until PostgreSQL, RabbitMQ and Redis are nearly idle again.

    What a scenario leaves behind (autovacuum of the rows it updated, a
    checkpoint, queues draining) would otherwise be billed to the next one.
    """
    started = time.monotonic()
    while time.monotonic() - started < limit:
        window = CpuWindow({})
        window.start()
        time.sleep(1.0)
        window.stop()
        if window.result.get("services", 0) < 15:
            break
    return round(time.monotonic() - started, 1)


# fan-out last: its millions of row writes keep PostgreSQL busy (autovacuum,
# checkpoint) longer than --settle waits, which made a sync after it 10x slower
ORDER = ["echo", "conn", "conn-sse", "p2p-latency", "p2p-latency-sse", "p2p-throughput", "p2p-throughput-sse",
         "sync", "fanout"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", default=",".join(ORDER), help=f"comma-separated, from {','.join(ORDER)}")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: a few seconds (CI)")
    parser.add_argument("--conns", type=int, default=5000, help="conn: idle authenticated connections")
    parser.add_argument("--members", type=int, default=100, help="fanout: group size")
    parser.add_argument("--backlog", type=int, default=10000, help="sync: undelivered messages")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds each measured phase runs")
    parser.add_argument("--p2p-rate", type=int, default=1000, help="p2p-latency: messages per second sent")
    parser.add_argument("--processors", type=int, default=1, help="processes running improcessor")
    parser.add_argument("--peer", choices=sorted(PEERS),
                        help="also run the scenarios on this reference peer (bench/peers/), right after ours")
    parser.add_argument("--settle", type=float, default=20.0,
                        help="seconds at most to wait after each scenario for the services to go idle")
    parser.add_argument("--rate-limit", type=int, default=1000000, help="gateways' --rate-limit/--rate-burst")
    parser.add_argument("--gateway-arg", action="append", default=[], help="extra imgateway argument")
    parser.add_argument("--processor-arg", action="append", default=[], help="extra improcessor argument")
    parser.add_argument("--profile", metavar="DIR",
                        help="record py-spy stacks of every daemon per scenario into DIR (bench/profile.py sums them)")
    parser.add_argument("--trace", action="store_true",
                        help="run the daemons under bench/trace.py (hot-call latencies in bench/results/logs)")
    parser.add_argument("--json", help="write results here (default bench/results/<run>.json)")
    parser.add_argument("--redis", default=os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379/0"),
                        help="the daemons' --redis: one URL, or several comma separated (shards)")
    parser.add_argument("--amqp", default=os.environ.get("BENCH_AMQP", "amqp://guest:guest@127.0.0.1:5672/%2F"))
    parser.add_argument("--postgres", default=os.environ.get("BENCH_POSTGRES",
                                                             "postgresql://root@127.0.0.1:5432/test"))
    args = parser.parse_args(argv)
    wanted = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(wanted) - set(ORDER)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    if not shutil.which("node"):
        raise SystemExit("bench: node is not installed (Node 18+ needed for bench/gen.js)")
    for package in ("ws",) + (("socket.io", "socket.io-client", "@socket.io/redis-adapter") if args.peer else ()):
        if not (BENCH / "node_modules" / package).is_dir():
            raise SystemExit(f"bench: bench/node_modules/{package} is missing: run `npm ci --prefix bench`")

    results_dir = BENCH / "results"
    results_dir.mkdir(exist_ok=True)
    params = scenario_params(args)
    if args.tiny:
        args.settle = 0.0
    node_version = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
    workdir = results_dir / "logs"
    workdir.mkdir(exist_ok=True)
    cluster = Cluster(args, workdir)
    meta = {"run": cluster.run_id, "machine": machine(), "processors": args.processors, "node": node_version,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "tiny": args.tiny,
            "argv": sys.argv[1:]}
    results: dict[str, dict] = {}
    peer = PEERS[args.peer](args, workdir, cluster.run_id, cluster.secret) if args.peer else None
    peer_results: dict[str, dict] = {}
    interrupted = False

    def run(target, name: str, into: dict) -> None:
        log(f"{name}{'' if target is cluster else ' on the peer'}: {params[name]}")
        started = time.monotonic()
        try:
            if name == "echo":
                into[name] = run_echo(args, target, params[name])
            elif split_name(name)[0] == "conn":
                into[name] = run_conn(args, target, params[name], name)
            else:
                into[name] = run_cluster_scenario(name, args, target, params[name])
        except RuntimeError as e:
            into[name] = {"error": str(e)}
        into[name]["params"] = params[name]
        into[name]["wall_seconds"] = round(time.monotonic() - started, 1)
        log(f"{name}: done in {into[name]['wall_seconds']}s")
        into[name]["settled_seconds"] = settle(args.settle)

    try:
        cluster.start()
        if peer is not None:
            peer.start()
        previous = None
        for name in [s for s in ORDER if s in wanted]:
            # a connection scenario on fresh gateways, and none after it (its clients' streaming
            # connections live on for stream_resume)
            if previous is not None and "conn" in (split_name(name)[0], split_name(previous)[0]):
                cluster.restart_gateways()
            previous = name
            run(cluster, name, results)
            # back to back with ours: both see the same machine
            if peer is not None and name in peer.SCENARIOS:
                run(peer, name, peer_results)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if peer is not None:
            peer.stop()
        cluster.stop()
    compare_transports(results)
    text = table(results, params, meta)
    document = {"meta": meta, "results": results}
    if peer is not None:
        rows = ratio_rows(results, peer_results)
        text += "\n\n" + table(peer_results, params, meta, peer=peer.label) + "\n\n" + ratio_table(rows, peer.label)
        document["peer"] = {"name": args.peer, "label": peer.label, "results": peer_results, "ratios": rows}
    print(text)
    document["table"] = text
    out = Path(args.json) if args.json else results_dir / f"{cluster.run_id}.json"
    out.write_text(json.dumps(document, indent=2))
    log(f"results written to {out}")
    failed = interrupted or any("error" in r for r in [*results.values(), *peer_results.values()])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

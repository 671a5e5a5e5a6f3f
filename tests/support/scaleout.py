"""A whole imcluster deployment on several hosts (network namespaces), and the faults of issue 18.

Hosts (tests/support/netns.py), each a namespace of its own on a private
/24: ``rabbit1..3`` (one RabbitMQ cluster, joined with ``rabbitmqctl
join_cluster``), ``pg1`` (PostgreSQL primary) and ``pg2`` (its streaming
replica, ``pg_basebackup -R``), ``redis``, ``gw1``/``gw2`` (``twistd
imgateway``) and ``proc1``/``proc2`` (``twistd improcessor``); with
``redis_mode="sentinel"``, ``redis``/``redis2`` (primary, replica) and
Sentinels on ``redis``, ``redis2`` and ``sentinel3``. Every daemon
gets the three RabbitMQ URLs (``--amqp`` repeated) and ``--queue-type
quorum``; processors read history from the replica (``--postgres-replica``).
The test process reaches the gateways through the bridge, as clients on
another machine would.

Faults, each an async function of the :class:`ScaleoutCluster` (what a
user's operator would see happen to a host):

``rabbit-node-kill``    SIGKILL of the RabbitMQ node every daemon is connected to
                        (the first URL): daemons fail over to the next node, the
                        quorum queue elects a new leader, gateways declare their
                        exclusive queues again and re-sync their connections
``redis-primary-kill``  SIGKILL of the Redis primary (with ``redis_mode="sentinel"``:
                        a primary, a replica and 3 Sentinels, the daemons on
                        ``--redis redis+sentinel://...``): the Sentinels promote the
                        replica, the daemons follow it and re-register
``processor-host-kill`` SIGKILL of processor host 1: its unacknowledged window is
                        redelivered to the other processor

:func:`run_scaleout` drives them in turn under the acknowledging load of
tests/support/load.py across both gateways and accounts for every
acknowledged message at every connection (tests/support/ledger.py); for each
fault it measures the seconds from the fault until deliveries resume: the
end of the longest silence in deliveries after the fault when that was a
stall (over :data:`STALL_S`), else the first delivery of a message
acknowledged after it (a fault the cluster did not stall on). Used by
bench/scaleout.py (and so by tests/test_scaleout.py).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

from twisted.internet import defer, threads

from imcluster.config import GATEWAY, PROCESSOR
from tests.support.cluster import PLUGIN, TWISTD, Cluster, DaemonProcess, cli_args, consumer_count, port_open
from tests.support.ledger import Ledger, Report
from tests.support.load import Load
from tests.support.netns import Host, Net, NetRabbitCluster, NetRedis, NetRedisSentinels
from tests.support.private import PrivatePostgres, _sleep


def now() -> float:
    return time.monotonic()


def sentinel_supported() -> bool:
    """Whether this imcluster takes ``--redis redis+sentinel://...`` (issue 18's Redis part)."""
    from imcluster.config import ConfigError, load_config

    try:
        load_config(PROCESSOR, {"redis": "redis+sentinel://10.0.0.1:26379,10.0.0.2:26379/immaster"})
    except ConfigError:
        return False
    return True


class NetDaemon:
    """A daemon on a host: what the load (tests/support/load.py) needs of a gateway, and the process."""

    def __init__(self, proc: DaemonProcess, host: Host) -> None:
        self.proc = proc
        self.host_obj = host
        self.host = host.ip
        self.ports = proc.ports

    @property
    def ws_port(self) -> int:
        return self.ports["ws"]

    @property
    def tcp_port(self) -> int:
        return self.ports["tcp"]

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.ws_port}/ws"

    @property
    def running(self) -> bool:
        return self.proc.running

    def kill(self) -> defer.Deferred:
        return self.proc.kill()

    def __repr__(self) -> str:
        return f"<{self.proc.name} on {self.host_obj.name} {self.host}>"


@dataclass
class ScaleoutCluster:
    base: Path
    gateways_n: int = 2
    processors_n: int = 2
    queue_type: str = "quorum"
    #: "sentinel": a Redis primary, replica and 3 Sentinels (when the daemons take a Sentinel URL); "single"
    redis_mode: str = "single"
    net: Net | None = None
    rabbits: NetRabbitCluster | None = None
    primary: PrivatePostgres | None = None
    replica: PrivatePostgres | None = None
    redis: NetRedis | None = None
    sentinels: NetRedisSentinels | None = None
    cluster: Cluster | None = None
    gateways: list[NetDaemon] = field(default_factory=list)
    processors: list[NetDaemon] = field(default_factory=list)
    #: seconds each part took to start
    timings: dict[str, float] = field(default_factory=dict)
    #: the shared queues as RabbitMQ lists them: name -> {"type", "members"}
    queues: dict[str, Any] = field(default_factory=dict)
    log: Callable[[str], None] = print

    async def start(self) -> None:
        """Hosts, engines, migrations, then the daemons (processors one at a time: readiness counts consumers)."""
        t = now()
        self.net = net = Net()
        self.rabbits = NetRabbitCluster(net, self.base / "rabbit", 3)
        pg1, pg2 = net.add_host("pg1"), net.add_host("pg2")
        self.primary = PrivatePostgres(self.base / "pg1", host=pg1.ip, port=5432, prefix=pg1.prefix,
                                       trusted=net.subnet)
        self.replica = PrivatePostgres(self.base / "pg2", host=pg2.ip, port=5432, prefix=pg2.prefix,
                                       trusted=net.subnet, primary=self.primary)
        if self.redis_mode == "sentinel":
            self.sentinels = NetRedisSentinels(net, self.base / "redis")
            self.redis = self.sentinels.primary
            redis_url, start_redis = self.sentinels.url, self.sentinels.start
        else:
            self.redis = NetRedis(net, net.add_host("redis"), self.base / "redis")
            redis_url, start_redis = self.redis.url, self.redis.start
        gw_hosts = [net.add_host(f"gw{i}") for i in range(1, self.gateways_n + 1)]
        proc_hosts = [net.add_host(f"proc{i}") for i in range(1, self.processors_n + 1)]
        self.log(f"hosts on {net.subnet}: " + ", ".join(f"{h.name} {h.ip}" for h in net.hosts.values()))

        async def postgres() -> None:
            await self.primary.start()
            from imcluster.db import apply_migrations_sync

            await threads.deferToThread(apply_migrations_sync, self.primary.dsn, "public", 10.0)
            await self.replica.start()

        t1 = now()
        await defer.gatherResults([defer.Deferred.fromCoroutine(self.rabbits.start()),
                                   defer.Deferred.fromCoroutine(postgres()),
                                   defer.Deferred.fromCoroutine(start_redis())], consumeErrors=True)
        self.timings["engines_s"] = now() - t1
        self.log(f"RabbitMQ cluster {[n.node for n in self.rabbits.nodes]} (nodes started in "
                 f"{', '.join(f'{s:.1f}' for s in self.rabbits.start_times)} s), PostgreSQL primary "
                 f"{self.primary.host} + replica {self.replica.host}, Redis {redis_url}: "
                 f"{self.timings['engines_s']:.1f} s")
        c = self.cluster = Cluster(self.base, "im", "", "public")
        c.redis_url = redis_url
        c.amqp_url = self.rabbits.urls[0]
        c.postgres_dsn = self.primary.dsn
        t2 = now()
        for h in gw_hosts:
            self.gateways.append(await self._start_gateway(h))
        for h in proc_hosts:
            self.processors.append(await self._start_processor(h))
        self.timings["daemons_s"] = now() - t2
        self.timings["start_s"] = now() - t
        # what the broker says of the shared queues (quorum: replicated on every node)
        out = await threads.deferToThread(self.rabbits.nodes[1].ctl, "list_queues", "name", "type", "members",
                                          "--formatter", "json")
        self.queues = {q["name"]: {"type": q["type"], "members": q.get("members") or []}
                       for q in json.loads(out) if not q["name"].startswith("im.gateway.")}
        self.log(f"queues: {self.queues}")

    def _opts(self, daemon: str, host: Host) -> dict[str, Any]:
        opts = self.cluster.common_options(daemon)
        opts["amqp"] = self.rabbits.urls
        opts["queue_type"] = self.queue_type
        if daemon == GATEWAY:
            opts["advertise"] = host.ip
        if daemon == PROCESSOR:
            opts["postgres_replica"] = [self.replica.dsn]
        return opts

    def _spawn(self, daemon: str, host: Host, opts: dict[str, Any], ports: dict[str, int]) -> DaemonProcess:
        argv = [*host.prefix, str(TWISTD), "-n", "--pidfile=", PLUGIN[daemon], *cli_args(daemon, opts)]
        return self.cluster.run(f"{PLUGIN[daemon]}-{host.name}", argv, ports, daemon=daemon)

    async def _start_gateway(self, host: Host) -> NetDaemon:
        ports = {"ws": 8080, "tcp": 8081, "stream": 8082}
        opts = self._opts(GATEWAY, host)
        opts.update({"ws": f"tcp:8080:interface={host.ip}", "tcp": f"tcp:8081:interface={host.ip}",
                     "stream": f"tcp:8082:interface={host.ip}"})
        proc = self._spawn(GATEWAY, host, opts, ports)
        await proc.wait_ready(lambda: all(port_open(p, host.ip) for p in ports.values()), 60.0)
        return NetDaemon(proc, host)

    async def _start_processor(self, host: Host) -> NetDaemon:
        url = self.rabbits.urls[0]
        before = await threads.deferToThread(consumer_count, "im.processor", url)
        proc = self._spawn(PROCESSOR, host, self._opts(PROCESSOR, host), {})

        def ready() -> defer.Deferred:
            return threads.deferToThread(consumer_count, "im.processor", url).addCallback(lambda n: n > before)

        await proc.wait_ready(ready, 60.0)
        return NetDaemon(proc, host)

    async def close(self) -> None:
        """Stop the daemons (SIGTERM), then every process of every host, the namespaces and the bridge."""
        if self.cluster is not None:
            await self.cluster.shutdown()
        for pg in (self.replica, self.primary):
            if pg is not None:
                await pg.close()
        if self.net is not None:
            self.net.close()

    def report(self) -> str:
        return self.cluster.report() if self.cluster is not None else ""

    def db_check(self) -> dict[str, Any]:
        """Per session in the primary: rows, and holes in seq; rows the replica has (blocking)."""
        rows = self.primary.query("SELECT session_id, count(*), min(seq), max(seq) FROM messagerecv GROUP BY 1")
        gaps = sum(int(hi) - int(lo) + 1 - int(n) for _, n, lo, hi in rows)
        starts_at_1 = all(int(lo) == 1 for _, n, lo, hi in rows)
        stored = sum(int(n) for _, n, _, _ in rows)
        replica = self.replica.query("SELECT count(*) FROM messagerecv")[0][0]
        return {"sessions": len(rows), "stored": stored, "db_seq_gaps": gaps, "seq_from_1": starts_at_1,
                "replica_rows": int(replica)}


# --- faults ------------------------------------------------------------------------


async def rabbit_node_kill(sc: ScaleoutCluster) -> str:
    node = sc.rabbits.nodes[0]
    await node.kill()
    return f"SIGKILL RabbitMQ {node.node}"


async def redis_primary_kill(sc: ScaleoutCluster) -> str:
    if sc.sentinels is None:
        raise RuntimeError("redis-primary-kill needs the Sentinel topology (redis_mode 'sentinel')")
    before = await threads.deferToThread(sc.sentinels.master)
    await sc.sentinels.kill_primary()
    return f"SIGKILL Redis primary {before} (Sentinels promote {sc.sentinels.replica.host.ip})"


async def processor_host_kill(sc: ScaleoutCluster) -> str:
    p = sc.processors[0]
    await p.kill()
    return f"SIGKILL improcessor on {p.host_obj.name} ({p.host})"


FAULTS: dict[str, Callable[[ScaleoutCluster], Awaitable[str]]] = {
    "rabbit-node-kill": rabbit_node_kill,
    "redis-primary-kill": redis_primary_kill,
    "processor-host-kill": processor_host_kill,
}


def default_faults(redis_mode: str) -> list[str]:
    """Every fault the topology has, in order (the Redis one needs Sentinels)."""
    return [f for f in FAULTS if f != "redis-primary-kill" or redis_mode == "sentinel"]


def resumed_at(ledger: Ledger, since: float) -> float | None:
    """When the first message acknowledged at or after ``since`` was delivered (None: not yet)."""
    fresh = {m for m, s in ledger.sent.items() if s.replied_at >= since}
    if not fresh:
        return None
    # a recipient may get a message before its sender gets the reply: only arrivals after the fault count
    arrivals = [t for rec in ledger.conns.values() for m, t in rec.first.items() if m in fresh and t >= since]
    return min(arrivals) if arrivals else None


def longest_gap(ledger: Ledger, since: float, until: float) -> tuple[float, float]:
    """The longest silence in deliveries (first copies, every connection) between ``since`` and ``until``:
    ``(length, end)``; the silence from ``since`` to the first delivery counts."""
    arrivals = sorted(t for rec in ledger.conns.values() for t in rec.first.values() if since <= t <= until)
    prev, gap, end = since, 0.0, since
    for t in arrivals:
        if t - prev > gap:
            gap, end = t - prev, t
        prev = t
    return gap, end


#: a silence in deliveries longer than this is a stall (the load delivers several times a second)
STALL_S = 1.0


@dataclass
class FaultResult:
    name: str
    what: str
    #: seconds from the fault until deliveries flowed again: the end of the longest silence in
    #: deliveries after it when that was a stall (> STALL_S), else the first delivery of a message
    #: acknowledged after the fault
    resume_s: float | None
    #: the longest silence in deliveries (any connection) from the fault to ``after`` s past the resume
    longest_gap_s: float | None = None


async def run_scaleout(sc: ScaleoutCluster, faults: list[str], users: int = 4, rate: float = 2.0,
                       steady: float = 3.0, after: float = 4.0, resume_timeout: float = 60.0,
                       log: Callable[[str], None] = print) -> tuple[Report, list[FaultResult], dict]:
    """Load across both gateways; each fault in turn, waiting until deliveries resume and ``after`` s more;
    then settle and account. Returns the ledger's report, the faults' results and the database check."""
    load = Load(sc.cluster.token, sc.gateways, users=users, rate=rate)
    results: list[FaultResult] = []
    try:
        await load.connect()
        log(f"{len(load.conns)} connections on {len(sc.gateways)} gateways, sessions {sorted(load.sessions)}")
        ledger = load.new_ledger()
        load.start()
        await _sleep(steady)
        last_heal = now()
        for name in faults:
            t0 = now()
            what = await FAULTS[name](sc)
            deadline = t0 + resume_timeout
            back = None
            while now() < deadline:
                back = resumed_at(ledger, t0)
                if back is not None:
                    break
                await _sleep(0.1)
            await _sleep(after)
            gap, gap_end = longest_gap(ledger, t0, now() - 0.5)
            if back is None:
                resume = None
            elif gap > STALL_S:
                resume = gap_end - t0
            else:
                resume = back - t0
            results.append(FaultResult(name, what, resume, gap))
            log(f"{name}: {what}; deliveries resumed after {'-' if resume is None else f'{resume:.2f}'} s "
                f"(longest silence {gap:.2f} s)")
            last_heal = t0 + resume if resume is not None else now()
        load.stop()
        await load.settle(ledger, last_heal)
        report = ledger.report(last_heal)
        db = await threads.deferToThread(sc.db_check)
        # the replica catches up with what the primary stored
        deadline = now() + 15.0
        while db["replica_rows"] < db["stored"] and now() < deadline:
            await _sleep(0.3)
            db = await threads.deferToThread(sc.db_check)
        return report, results, db
    finally:
        load.close()


def as_json(report: Report, results: list[FaultResult], db: dict, sc: ScaleoutCluster, params: dict) -> str:
    return json.dumps({
        "params": params, "timings": sc.timings, "queues": sc.queues, "redis_mode": sc.redis_mode,
        "faults": [r.__dict__ for r in results],
        "report": report.as_dict(), "db": db,
    }, indent=2, default=str)

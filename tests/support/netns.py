"""Several hosts on one machine: Linux network namespaces on a private bridge, for scale-out tests.

ARCHITECTURE.md "Scale-out": proven on several hosts. Each *host* is a
network namespace of its own (its own loopback, ports and addresses), linked
to a bridge by a veth pair, on a private ``10.213.<k>.0/24`` that this module
creates (``<k>`` picked among the /24s no interface of the machine uses) and
removes; the machine itself gets ``.254`` on the bridge, so the test process
reaches every host, and nothing leaves the machine (no route, no NAT)::

    net = Net()                                   # the bridge
    rabbit1 = net.add_host("rabbit1")             # a namespace, 10.213.k.1
    proc = net.spawn(rabbit1, "epmd", ["epmd"], env, log_path)
    ...
    net.close()                                   # processes, namespaces, bridge: gone

Names: namespaces ``imso-<pid>-<tag>-<host>``, bridge ``imb<tag>``, veths
``imv<tag><n>`` / ``imv<tag><n>p`` (``<tag>``: 4 random hex digits). Every
process started here is the leader of its own process group with
``PR_SET_PDEATHSIG`` (tests/support/private.py ``_Process``); ``close()``
kills those groups (by their pids, nothing else) and deletes the namespaces
and the bridge. ``close()`` also runs at interpreter exit, and
:func:`sweep_stale` deletes what a run that died (SIGKILL) left behind: the
namespaces named after a pid that no longer exists, and their bridges.

:class:`NetRabbitCluster`, :class:`NetRedis` and the PostgreSQL pair
(:class:`tests.support.private.PrivatePostgres` with ``prefix=host.prefix``)
run the engines as hosts. Needs root (``ip netns``), which these machines
give (DEPENDENCIES.md); :func:`available` says whether it works here.
"""

from __future__ import annotations

import atexit
import ipaddress
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from twisted.internet import threads

from tests.support.private import RABBIT_SERVER, _Process, _sleep, port_open

NS_PREFIX = "imso"
RABBIT_CTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"
#: a 3-node cluster on two busy cores: each node took 15-20 s to start here
NET_RABBIT_START_TIMEOUT = float(os.environ.get("IMTEST_RABBIT_START_TIMEOUT", "120"))


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and out.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {out.stderr.strip()}")
    return out


def available() -> str | None:
    """None when network namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    name = f"{NS_PREFIX}-{os.getpid()}-probe"
    out = _ip("netns", "add", name, check=False)
    if out.returncode != 0:
        return f"ip netns add failed: {out.stderr.strip()}"
    _ip("netns", "del", name, check=False)
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale() -> list[str]:
    """Delete namespaces (and their bridges) of runs whose process is gone; the names deleted."""
    out = _ip("netns", "list", check=False).stdout
    gone: list[str] = []
    for line in out.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.match(rf"^{NS_PREFIX}-(\d+)-([0-9a-f]{{4}})-", name)
        if not m or _pid_alive(int(m.group(1))):
            continue
        _kill_namespace(name)
        _ip("netns", "del", name, check=False)
        _delete_links(m.group(2))
        gone.append(name)
    return gone


def _kill_namespace(ns: str) -> None:
    """SIGKILL every process inside namespace ``ns`` (ours only: the namespace is this module's)."""
    pids = [int(p) for p in _ip("netns", "pids", ns, check=False).stdout.split() if p.isdigit()]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if _pid_alive(p) and not _zombie(p)]
        time.sleep(0.05)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _delete_links(tag: str) -> None:
    """The bridge ``imb<tag>`` and every veth ``imv<tag>*`` left on the machine."""
    links = _ip("-o", "link", "show", check=False).stdout
    for name in sorted(set(re.findall(rf"\b(imv{tag}\d+)(?:@|:)", links))):
        _ip("link", "del", name, check=False)
    _ip("link", "del", f"imb{tag}", check=False)


def _used_subnets() -> set[int]:
    """Third octets of the 10.213.x.0/24 networks some interface of the machine already has."""
    out = _ip("-4", "-o", "addr", "show", check=False).stdout
    return {int(m.group(1)) for m in re.finditer(r"inet 10\.213\.(\d+)\.", out)}


class Host:
    """One network namespace of a :class:`Net`: ``ip``, and ``prefix`` (argv prefix to run a command in it)."""

    def __init__(self, net: "Net", name: str, ns: str, ip: str) -> None:
        self.net = net
        self.name = name
        self.ns = ns
        self.ip = ip
        self.prefix = ["ip", "netns", "exec", ns]
        self.processes: list[_Process] = []

    def __repr__(self) -> str:
        return f"<Host {self.name} {self.ip}>"

    async def kill_all(self) -> None:
        """SIGKILL every process started on this host (a host that dies)."""
        for p in self.processes:
            await p.stop(signal.SIGKILL)


class Net:
    """A bridge on a private /24 and the hosts (namespaces) linked to it (see the module docstring)."""

    def __init__(self) -> None:
        sweep_stale()
        self.tag = secrets.token_hex(2)
        used = _used_subnets()
        free = [k for k in range(1, 254) if k not in used]
        if not free:
            raise RuntimeError("no free 10.213.x.0/24")
        k = free[int.from_bytes(secrets.token_bytes(2), "big") % len(free)]
        self.network = ipaddress.ip_network(f"10.213.{k}.0/24")
        self.subnet = str(self.network)
        self.gateway_ip = f"10.213.{k}.254"
        self.bridge = f"imb{self.tag}"
        self.hosts: dict[str, Host] = {}
        self.closed = False
        _ip("link", "add", self.bridge, "type", "bridge")
        atexit.register(self.close)
        _ip("addr", "add", f"{self.gateway_ip}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    def add_host(self, name: str) -> Host:
        """A new namespace ``name`` on the bridge, with the next address (``.1``, ``.2`` ...)."""
        n = len(self.hosts) + 1
        ns = f"{NS_PREFIX}-{os.getpid()}-{self.tag}-{name}"
        ip = str(self.network.network_address + n)
        veth, peer = f"imv{self.tag}{n}", f"imv{self.tag}{n}p"
        _ip("netns", "add", ns)
        host = self.hosts[name] = Host(self, name, ns, ip)
        _ip("link", "add", veth, "type", "veth", "peer", "name", peer)
        _ip("link", "set", peer, "netns", ns)
        _ip("link", "set", veth, "master", self.bridge)
        _ip("link", "set", veth, "up")
        _ip("-n", ns, "addr", "add", f"{ip}/24", "dev", peer)
        _ip("-n", ns, "link", "set", peer, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        return host

    def spawn(self, host: Host, name: str, argv: list[str], env: dict[str, str], log_path: Path,
              cwd: Path | None = None) -> _Process:
        """Start ``argv`` on ``host`` (its own process group, killed with the test run)."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        proc = _Process(f"{host.name}/{name}", [*host.prefix, *argv], env, log_path, cwd or log_path.parent)
        host.processes.append(proc)
        return proc

    def close(self) -> None:
        """Kill every process started on the hosts (their process groups), delete namespaces and bridge."""
        if self.closed:
            return
        self.closed = True
        for host in self.hosts.values():
            for p in host.processes:
                if p.running:
                    try:
                        os.killpg(p.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            for p in host.processes:
                try:
                    p.popen.wait(10)
                except subprocess.TimeoutExpired:
                    pass
                p.running  # reaps it from private._LIVE, closes its log
        for host in self.hosts.values():
            # whatever else runs there (a server that dropped root, and with it PR_SET_PDEATHSIG)
            _kill_namespace(host.ns)
            _ip("netns", "del", host.ns, check=False)
        _delete_links(self.tag)
        try:
            atexit.unregister(self.close)
        except Exception:
            pass

    def leftovers(self) -> list[str]:
        """Namespaces and links of this net that still exist (empty once closed)."""
        ns = _ip("netns", "list", check=False).stdout
        links = _ip("-o", "link", "show", check=False).stdout
        left = [h.ns for h in self.hosts.values() if h.ns in ns]
        left += re.findall(rf"(im[bv]{self.tag}\w*)", links)
        return left


def _handshake(url: str) -> bool:
    import pika

    try:
        conn = pika.BlockingConnection(pika.URLParameters(
            url + "?connection_attempts=1&socket_timeout=2&blocked_connection_timeout=2"))
    except Exception:
        return False
    try:
        conn.close()
    except Exception:
        pass
    return True


class NetRabbit:
    """One RabbitMQ node on a host: ``rabbit@<ip>`` (Erlang long names with the address, no hosts file)."""

    def __init__(self, net: Net, host: Host, base: Path, cookie: str) -> None:
        self.net = net
        self.host = host
        self.base = Path(base)
        self.cookie = cookie
        self.node = f"rabbit@{host.ip}"
        self.port = 5672
        self.url = f"amqp://guest:guest@{host.ip}:5672/%2F"
        self.proc: _Process | None = None
        self.epmd: _Process | None = None
        for sub in ("home", "mnesia", "log"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        cookie_file = self.base / "home" / ".erlang.cookie"
        cookie_file.write_text(cookie)
        cookie_file.chmod(0o400)
        (self.base / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = {host.ip}:5672\n"
            "loopback_users = none\n"  # guest from the other hosts: a private test network
            "log.console = false\nlog.file.level = warning\n"
            "disk_free_limit.absolute = 1MB\n"
            # a lost node is noticed within seconds, not the default minute
            "net_ticktime = 10\n")
        (self.base / "enabled_plugins").write_text("[].\n")
        (self.base / "rabbitmq-env.conf").write_text("")

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_", "IMCLUSTER_"))}
        b = self.base
        env.update({
            "HOME": str(b / "home"),
            "RABBITMQ_USE_LONGNAME": "true",
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": self.host.ip,
            "RABBITMQ_NODE_PORT": "5672",
            "RABBITMQ_DIST_PORT": "25672",
            "RABBITMQ_MNESIA_BASE": str(b / "mnesia"),
            "RABBITMQ_LOG_BASE": str(b / "log"),
            "RABBITMQ_CONFIG_FILE": str(b / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(b / "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": str(b / "rabbitmq-env.conf"),
            "RABBITMQ_PID_FILE": str(b / "rabbit.pid"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "+S 1:1 +sbwt none +sbwtdcpu none +sbwtdio none",
        })
        return env

    async def start(self, timeout: float = NET_RABBIT_START_TIMEOUT) -> float:
        began = time.monotonic()
        if self.epmd is None or not self.epmd.running:
            # epmd in the foreground (no -daemon): its pid is ours to stop
            self.epmd = self.net.spawn(self.host, "epmd", [shutil.which("epmd") or "/usr/bin/epmd"],
                                       self.env(), self.base / "log" / "epmd.log", self.base)
        self.proc = self.net.spawn(self.host, "rabbitmq", [RABBIT_SERVER], self.env(),
                                   self.base / "log" / "server.out", self.base)
        while not (port_open(self.port, self.host.ip) and await threads.deferToThread(_handshake, self.url)):
            if not self.proc.running:
                raise AssertionError(f"RabbitMQ {self.node} exited while starting:\n{self.proc.log_tail()}")
            if time.monotonic() - began > timeout:
                raise AssertionError(f"RabbitMQ {self.node} not ready within {timeout:g}s:\n{self.proc.log_tail()}")
            await _sleep(0.2)
        return time.monotonic() - began

    def ctl(self, *args: str) -> str:
        """``rabbitmqctl -n <node> --longnames ARGS`` from this node's host (blocking)."""
        out = subprocess.run([*self.host.prefix, RABBIT_CTL, "-n", self.node, "--longnames", *args],
                             env=self.env(), capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise AssertionError(f"rabbitmqctl {' '.join(args)} on {self.node}: {out.stdout}{out.stderr}")
        return out.stdout

    async def kill(self) -> None:
        """SIGKILL the node (its process group); the host and its epmd stay."""
        if self.proc is not None:
            await self.proc.stop(signal.SIGKILL)


class NetRabbitCluster:
    """``n`` RabbitMQ nodes on hosts ``rabbit1..n``, joined with ``rabbitmqctl join_cluster`` to the first."""

    def __init__(self, net: Net, base: Path, n: int = 3) -> None:
        cookie = secrets.token_hex(16).upper()
        self.nodes = [NetRabbit(net, net.add_host(f"rabbit{i}"), Path(base) / f"rabbit{i}", cookie)
                      for i in range(1, n + 1)]
        self.start_times: list[float] = []

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    async def start(self) -> None:
        from twisted.internet import defer

        self.start_times = list(await defer.gatherResults(
            [defer.Deferred.fromCoroutine(n.start()) for n in self.nodes], consumeErrors=True))
        first = self.nodes[0]
        for node in self.nodes[1:]:
            await threads.deferToThread(node.ctl, "stop_app")
            await threads.deferToThread(node.ctl, "join_cluster", first.node)
            await threads.deferToThread(node.ctl, "start_app")
        status = await threads.deferToThread(first.ctl, "cluster_status", "--formatter", "json")
        import json

        running = json.loads(status)["running_nodes"]
        assert sorted(running) == sorted(n.node for n in self.nodes), status


class NetRedis:
    """``redis-server`` on a host (no persistence; ``--protected-mode no``: reached from the other hosts)."""

    def __init__(self, net: Net, host: Host, base: Path, port: int = 6379) -> None:
        self.net = net
        self.host = host
        self.base = Path(base)
        self.base.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.url = f"redis://{host.ip}:{port}/0"
        self.proc: _Process | None = None

    def _ping(self) -> bool:
        try:
            with socket.create_connection((self.host.ip, self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    async def start(self, timeout: float = 15.0, extra: tuple[str, ...] = ()) -> None:
        """Start it and wait for ``PONG``; ``extra``: more redis-server arguments (``--replicaof`` ...)."""
        began = time.monotonic()
        exe = shutil.which("redis-server") or "/usr/bin/redis-server"
        env = {k: v for k, v in os.environ.items() if not k.startswith("IMCLUSTER_")}
        self.proc = self.net.spawn(self.host, "redis", [
            exe, "--bind", self.host.ip, "--port", str(self.port), "--protected-mode", "no", "--save", "",
            "--appendonly", "no", "--dir", str(self.base), "--daemonize", "no", *extra],
            env, self.base / "redis.log", self.base)
        while not self._ping():
            if not self.proc.running:
                raise AssertionError(f"redis-server exited:\n{self.proc.log_tail()}")
            if time.monotonic() - began > timeout:
                raise AssertionError(f"redis-server not ready within {timeout:g}s:\n{self.proc.log_tail()}")
            await _sleep(0.05)

    async def kill(self) -> None:
        if self.proc is not None:
            await self.proc.stop(signal.SIGKILL)


def _redis_cli(host: str, port: int, *args: str) -> str:
    exe = shutil.which("redis-cli") or "/usr/bin/redis-cli"
    out = subprocess.run([exe, "-h", host, "-p", str(port), *args], capture_output=True, text=True, timeout=5)
    return out.stdout.strip()


class NetRedisSentinels:
    """A Redis primary (host ``redis``), its replica (``redis2``) and 3 Sentinels (``redis``, ``redis2``, ``sentinel3``).

    ``url`` is the ``--redis`` value ``redis+sentinel://<ip>:26379,.../<master>``
    (the form of ARCHITECTURE.md "Scale-out"). ``kill_primary()`` SIGKILLs
    the primary's process; ``master()`` is the address the Sentinels name.
    """

    SENTINEL_PORT = 26379

    def __init__(self, net: Net, base: Path, master: str = "immaster", down_after_ms: int = 1000) -> None:
        self.net = net
        self.base = Path(base)
        self.master_name = master
        self.down_after_ms = down_after_ms
        h1, h2 = net.add_host("redis"), net.add_host("redis2")
        self.primary = NetRedis(net, h1, self.base / "primary")
        self.replica = NetRedis(net, h2, self.base / "replica")
        self.sentinel_hosts = [h1, h2, net.add_host("sentinel3")]
        self.sentinels: list[_Process] = []
        self.url = ("redis+sentinel://" + ",".join(f"{h.ip}:{self.SENTINEL_PORT}" for h in self.sentinel_hosts)
                    + f"/{master}")

    def master(self) -> str | None:
        """``ip:port`` of the primary as the first Sentinel that answers names it (blocking)."""
        for h in self.sentinel_hosts:
            out = _redis_cli(h.ip, self.SENTINEL_PORT, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name).split()
            if len(out) == 2:
                return f"{out[0]}:{out[1]}"
        return None

    def _ready(self) -> bool:
        for h in self.sentinel_hosts:
            info = _redis_cli(h.ip, self.SENTINEL_PORT, "SENTINEL", "MASTER", self.master_name).split("\n")
            state = dict(zip(info[::2], info[1::2]))
            if state.get("num-slaves") != "1" or state.get("num-other-sentinels") != "2":
                return False
        return True

    async def start(self, timeout: float = 60.0) -> None:
        began = time.monotonic()
        await self.primary.start()
        await self.replica.start(extra=("--replicaof", self.primary.host.ip, str(self.primary.port)))
        while "master_link_status:up" not in await threads.deferToThread(
                _redis_cli, self.replica.host.ip, self.replica.port, "INFO", "replication"):
            if time.monotonic() - began > timeout:
                raise AssertionError("the Redis replica did not sync")
            await _sleep(0.05)
        exe = shutil.which("redis-server") or "/usr/bin/redis-server"
        env = {k: v for k, v in os.environ.items() if not k.startswith("IMCLUSTER_")}
        for i, h in enumerate(self.sentinel_hosts, 1):
            folder = self.base / f"sentinel{i}"
            folder.mkdir(parents=True, exist_ok=True)
            conf = folder / "sentinel.conf"
            conf.write_text(
                f"port {self.SENTINEL_PORT}\nbind {h.ip}\nprotected-mode no\ndir {folder}\ndaemonize no\n"
                f"sentinel monitor {self.master_name} {self.primary.host.ip} {self.primary.port} 2\n"
                f"sentinel down-after-milliseconds {self.master_name} {self.down_after_ms}\n"
                f"sentinel failover-timeout {self.master_name} 10000\n"
                f"sentinel parallel-syncs {self.master_name} 1\n")
            self.sentinels.append(self.net.spawn(h, "sentinel", [exe, str(conf), "--sentinel"], env,
                                                 folder / "sentinel.log", folder))
        while not await threads.deferToThread(self._ready):
            for s in self.sentinels:
                if not s.running:
                    raise AssertionError(f"a Sentinel exited:\n{s.log_tail()}")
            if time.monotonic() - began > timeout:
                raise AssertionError("the Sentinels did not see each other and the replica:\n"
                                     + "\n".join(s.log_tail(10) for s in self.sentinels))
            await _sleep(0.1)

    async def kill_primary(self) -> None:
        await self.primary.kill()

"""Private RabbitMQ and Redis servers that a fault test may stop, wipe and start again.

The shared services on 127.0.0.1 (5672, 6379) are never stopped or restarted
by a test: other runs and other developers use them. A test that needs a
dependency to go away starts its own here, on free ports, with its own data
and log folders under the test's ``tmp_path`` (DEPENDENCIES.md, "pika")::

    async with PrivateRabbit(tmp_path / "rabbit") as rabbit:   # or the fixture
        cluster.amqp_url = rabbit.url
        ...
        await rabbit.stop()            # SIGTERM: clients get 320 CONNECTION_FORCED
        await rabbit.start()           # the same port, node name and data folder
    # left: the node and its epmd are stopped, by PID (their process group)

    async with PrivateRedis(tmp_path / "redis") as redis:
        await redis.restart()          # --save '': it comes back empty

A private RabbitMQ node gets everything of its own: ``HOME`` (its Erlang
cookie), an ``epmd -port N`` started first (``ERL_EPMD_PORT``), node name,
AMQP and distribution ports, Mnesia, log, config, enabled-plugins and
rabbitmq-env files; every inherited ``RABBITMQ_*``/``ERL_*`` variable is
dropped, so it can neither join nor clash with the shared node. It runs
``/usr/lib/rabbitmq/bin/rabbitmq-server`` as the current user (Debian's
``/usr/sbin`` wrapper would switch to the ``rabbitmq`` user and the shared
node's cookie), with one Erlang scheduler: the machine has two cores for
everybody.

Readiness never scrapes logs: a node is ready when an AMQP handshake on its
port succeeds, a Redis when ``PING`` answers ``PONG``. Each started process
is the leader of a new process group, so that stopping it also ends the
children it forked (``beam.smp``, ``erl_child_setup``); nothing else is
signalled. ``start()`` returns the seconds it took (measured here: see
:data:`RABBIT_START_TIMEOUT`).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import reactor, task, threads

#: a private node took 3-6 s to start here (2 busy cores); a cold, loaded machine more
RABBIT_START_TIMEOUT = float(os.environ.get("IMTEST_RABBIT_START_TIMEOUT", "90"))
REDIS_START_TIMEOUT = 15.0
STOP_TIMEOUT = 30.0
RABBIT_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"

#: every private process of this run still alive: pid -> Popen (reaped at session end)
_LIVE: dict[int, subprocess.Popen] = {}


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


async def _sleep(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


def _die_with_parent(user: str | None = None) -> None:
    """In the child: a new process group (stopped as a whole), and SIGKILL if the test run dies.

    ``user``: run as that user; the death signal is set after the switch, as
    changing credentials clears it (a ``setpriv`` in the command would).
    """
    os.setsid()
    if user is not None and os.geteuid() == 0:
        import pwd

        pw = pwd.getpwnam(user)
        os.setgroups([])
        os.setgid(pw.pw_gid)
        os.setuid(pw.pw_uid)
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class _Process:
    """One private server process (and its process group), logged to a file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path, cwd: Path,
                 user: str | None = None) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._log,
                                      stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                      preexec_fn=lambda: _die_with_parent(user))
        self.pid = self.popen.pid  # also its process group id (setsid)
        _LIVE[self.pid] = self.popen

    @property
    def running(self) -> bool:
        if self.popen.poll() is None:
            return True
        _LIVE.pop(self.pid, None)
        if not self._log.closed:
            self._log.close()
        return False

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)  # our own group: this process and what it forked
        except ProcessLookupError:
            pass

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> None:
        """``sig`` to the process (SIGKILL: to its whole group); SIGKILL the group after ``timeout``."""
        if sig == signal.SIGKILL:
            self._signal_group(sig)
        elif self.running:
            self.popen.send_signal(sig)
        deadline = time.monotonic() + timeout
        while self.running and time.monotonic() < deadline:
            await _sleep(0.05)
        # children that outlived their leader (or a leader that did not exit) end here
        self._signal_group(signal.SIGKILL)
        while self.running:
            await _sleep(0.05)


class PrivateRabbit:
    """A RabbitMQ node of the test's own (see the module docstring).

    ``url`` is its AMQP URL (guest, loopback); ``max_message_size`` lowers the
    broker's own limit (a "406 above max_message_size" needs megabytes, not
    128 MiB, of test data). ``start()`` / ``stop()`` /
    ``restart(down=...)`` keep the port, node name and data folder; ``kill()``
    is a crash (SIGKILL). ``close()`` stops the node and its epmd.
    """

    def __init__(self, base: Path, port: int | None = None, max_message_size: int | None = None) -> None:
        self.base = Path(base)
        self.port = port or free_port()
        #: the broker's own limit (RabbitMQ refuses a larger message with 406); None: its default, 128 MiB
        self.max_message_size = max_message_size
        self.dist_port = free_port()
        self.epmd_port = free_port()
        self.node = f"imt{self.port}@localhost"
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"
        self.proc: _Process | None = None
        self.epmd: _Process | None = None
        #: seconds each start took (AMQP handshake included)
        self.start_times: list[float] = []
        for sub in ("home", "mnesia", "log"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        (self.base / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
            "loopback_users.guest = true\n"
            "log.console = false\nlog.file.level = warning\n"
            # a test box's disk may be nearly full; a disk alarm would block publishers
            "disk_free_limit.absolute = 1MB\n"
            + (f"max_message_size = {max_message_size}\n" if max_message_size else ""))
        (self.base / "enabled_plugins").write_text("[].\n")
        (self.base / "rabbitmq-env.conf").write_text("")

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("RABBITMQ_", "ERL_", "IMCLUSTER_"))}
        b = self.base
        env.update({
            "HOME": str(b / "home"),
            "ERL_EPMD_PORT": str(self.epmd_port),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(b / "mnesia"),
            "RABBITMQ_LOG_BASE": str(b / "log"),
            "RABBITMQ_CONFIG_FILE": str(b / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(b / "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": str(b / "rabbitmq-env.conf"),
            "RABBITMQ_PID_FILE": str(b / "rabbit.pid"),
            # one scheduler, no busy waiting: two cores are shared by every developer
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "+S 1:1 +sbwt none +sbwtdcpu none +sbwtdio none",
        })
        return env

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.running

    def _start_epmd(self) -> None:
        if self.epmd is not None and self.epmd.running:
            return
        epmd = shutil.which("epmd") or "/usr/bin/epmd"
        self.epmd = _Process("epmd", [epmd, "-port", str(self.epmd_port)], self.env(),
                             self.base / "log" / "epmd.log", self.base)

    def _amqp_handshake(self) -> bool:
        import pika

        params = pika.URLParameters(self.url + "?connection_attempts=1&socket_timeout=2&blocked_connection_timeout=2")
        try:
            conn = pika.BlockingConnection(params)
        except Exception:
            return False
        try:
            conn.close()
        except Exception:
            pass
        return True

    async def start(self, timeout: float = RABBIT_START_TIMEOUT) -> float:
        """Start the node (its epmd first) and wait for an AMQP handshake; the seconds it took."""
        if self.running:
            return 0.0
        began = time.monotonic()
        self._start_epmd()
        while not port_open(self.epmd_port):
            if not self.epmd.running:
                raise AssertionError(f"epmd -port {self.epmd_port} exited:\n{self.epmd.log_tail()}")
            await _sleep(0.02)
        self.proc = _Process(f"rabbit {self.node}", [RABBIT_SERVER], self.env(),
                             self.base / "log" / "server.out", self.base)
        deadline = began + timeout
        while True:
            if not self.proc.running:
                raise AssertionError(f"RabbitMQ {self.node} exited while starting:\n{self.proc.log_tail()}"
                                     f"\n{self._log_tail()}")
            if port_open(self.port) and await threads.deferToThread(self._amqp_handshake):
                break
            if time.monotonic() > deadline:
                await self.proc.stop(signal.SIGKILL)
                raise AssertionError(f"RabbitMQ {self.node} not ready within {timeout:g}s:\n{self._log_tail()}")
            await _sleep(0.1)
        took = time.monotonic() - began
        self.start_times.append(took)
        return took

    def _log_tail(self) -> str:
        logs = sorted((self.base / "log").glob("*.log"))
        return "\n".join(f"--- {p} ---\n" + "\n".join(p.read_text(errors="replace").splitlines()[-20:])
                         for p in logs)

    async def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop the node gracefully (SIGTERM: connections are closed with 320); epmd stays."""
        if self.proc is not None:
            await self.proc.stop(signal.SIGTERM, timeout)

    async def kill(self) -> None:
        """Crash the node (SIGKILL to its process group): connections just drop."""
        if self.proc is not None:
            await self.proc.stop(signal.SIGKILL)

    async def restart(self, down: float = 0.0) -> float:
        """Stop, stay down ``down`` seconds, start again on the same port and data; the start's seconds."""
        await self.stop()
        await _sleep(down)
        return await self.start()

    async def close(self) -> None:
        """Stop the node and its epmd (the folders stay for the test's tmp_path to hold)."""
        await self.stop()
        if self.epmd is not None:
            await self.epmd.stop()

    async def __aenter__(self) -> "PrivateRabbit":
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


class PrivateRedis:
    """A ``redis-server --port N --save ''`` of the test's own: every restart comes back empty."""

    def __init__(self, base: Path, port: int | None = None, args: list[str] | None = None) -> None:
        self.base = Path(base)
        self.base.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        #: more redis-server arguments (``["--replicaof", "127.0.0.1", "6380"]``)
        self.args = list(args or [])
        self.proc: _Process | None = None
        self.start_times: list[float] = []

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.running

    def _ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    async def start(self, timeout: float = REDIS_START_TIMEOUT) -> float:
        """Start (empty: no persistence) and wait for ``PONG``; the seconds it took."""
        if self.running:
            return 0.0
        began = time.monotonic()
        exe = shutil.which("redis-server") or "/usr/bin/redis-server"
        env = {k: v for k, v in os.environ.items() if not k.startswith("IMCLUSTER_")}
        self.proc = _Process("redis", [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                       "--appendonly", "no", "--dir", str(self.base), "--daemonize", "no",
                                       *self.args],
                             env, self.base / "redis.log", self.base)
        while not self._ping():
            if not self.proc.running:
                raise AssertionError(f"redis-server exited:\n{self.proc.log_tail()}")
            if time.monotonic() - began > timeout:
                await self.proc.stop(signal.SIGKILL)
                raise AssertionError(f"redis-server not ready within {timeout:g}s:\n{self.proc.log_tail()}")
            await _sleep(0.02)
        took = time.monotonic() - began
        self.start_times.append(took)
        return took

    async def stop(self) -> None:
        if self.proc is not None:
            await self.proc.stop(signal.SIGTERM)

    async def kill(self) -> None:
        """Crash it (SIGKILL): connections just drop."""
        if self.proc is not None:
            await self.proc.stop(signal.SIGKILL)

    def command(self, *args: str) -> str:
        """``redis-cli -p <port> <args>``'s output (blocking: call it in a thread)."""
        return redis_cli(self.port, *args)

    async def restart(self, down: float = 0.0) -> float:
        """Stop, stay down ``down`` seconds, start again empty on the same port."""
        await self.stop()
        await _sleep(down)
        return await self.start()

    async def close(self) -> None:
        await self.stop()

    async def __aenter__(self) -> "PrivateRedis":
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


def redis_cli(port: int, *args: str, timeout: float = 5.0) -> str:
    """``redis-cli -p <port> <args>`` on 127.0.0.1 (blocking); its output, stripped."""
    exe = shutil.which("redis-cli") or "/usr/bin/redis-cli"
    out = subprocess.run([exe, "-h", "127.0.0.1", "-p", str(port), *args], capture_output=True,
                         text=True, timeout=timeout)
    return out.stdout.strip()


class PrivateSentinels:
    """A Redis primary, its replica and three Sentinels of the test's own, on free loopback ports.

    ``url`` is the ``--redis`` value (``redis+sentinel://h:p,h:p,h:p/<master>``).
    Each Sentinel is ``redis-server <own config> --sentinel`` with its own port,
    folder and config file (Sentinel rewrites it); ``down_after_ms`` is how
    long the master must be silent before it is seen down. ``kill_primary()``
    SIGKILLs the primary, ``failover()`` asks a Sentinel for a graceful one;
    ``wait_promoted()`` returns once every Sentinel names the other instance
    as master. Everything is stopped by PID in ``close()``.
    """

    def __init__(self, base: Path, master: str = "immaster", down_after_ms: int = 1000) -> None:
        self.base = Path(base)
        self.master = master
        self.down_after_ms = down_after_ms
        self.primary = PrivateRedis(self.base / "primary")
        self.replica = PrivateRedis(self.base / "replica",
                                    args=["--replicaof", "127.0.0.1", str(self.primary.port)])
        self.ports = [free_port() for _ in range(3)]
        self.sentinels: list[_Process] = []
        self.url = (f"redis+sentinel://{','.join(f'127.0.0.1:{p}' for p in self.ports)}/{master}")

    def _master_port(self, sentinel_port: int) -> int | None:
        out = redis_cli(sentinel_port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master).split()
        return int(out[1]) if len(out) == 2 and out[1].isdigit() else None

    def _ready(self) -> bool:
        for port in self.ports:
            info = redis_cli(port, "SENTINEL", "MASTER", self.master).split("\n")
            state = dict(zip(info[::2], info[1::2]))
            if state.get("num-slaves") != "1" or state.get("num-other-sentinels") != "2":
                return False
        return True

    async def start(self, timeout: float = 30.0) -> float:
        """Primary, replica (in sync), then the Sentinels (each knowing the replica and the others)."""
        began = time.monotonic()
        await self.primary.start()
        await self.replica.start()
        while "master_link_status:up" not in await threads.deferToThread(self.replica.command, "INFO", "replication"):
            if time.monotonic() - began > timeout:
                raise AssertionError("the replica did not sync")
            await _sleep(0.05)
        exe = shutil.which("redis-server") or "/usr/bin/redis-server"
        env = {k: v for k, v in os.environ.items() if not k.startswith("IMCLUSTER_")}
        for port in self.ports:
            folder = self.base / f"sentinel-{port}"
            folder.mkdir(parents=True, exist_ok=True)
            conf = folder / "sentinel.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {folder}\ndaemonize no\n"
                f"sentinel monitor {self.master} 127.0.0.1 {self.primary.port} 2\n"
                f"sentinel down-after-milliseconds {self.master} {self.down_after_ms}\n"
                f"sentinel failover-timeout {self.master} 10000\n"
                f"sentinel parallel-syncs {self.master} 1\n")
            self.sentinels.append(_Process(f"sentinel {port}", [exe, str(conf), "--sentinel"], env,
                                           folder / "sentinel.log", folder))
        while not await threads.deferToThread(self._ready):
            for s in self.sentinels:
                if not s.running:
                    raise AssertionError(f"a sentinel exited:\n{s.log_tail()}")
            if time.monotonic() - began > timeout:
                raise AssertionError("the sentinels did not see each other and the replica:\n"
                                     + "\n".join(s.log_tail(10) for s in self.sentinels))
            await _sleep(0.1)
        return time.monotonic() - began

    async def kill_primary(self) -> None:
        """SIGKILL the primary: the Sentinels promote the replica after ``down_after_ms``."""
        await self.primary.kill()

    def failover(self) -> str:
        """``SENTINEL FAILOVER`` (graceful: the old primary becomes a replica; blocking)."""
        return redis_cli(self.ports[0], "SENTINEL", "FAILOVER", self.master)

    async def wait_promoted(self, port: int | None = None, timeout: float = 30.0) -> float:
        """Until every Sentinel names ``port`` (default: the replica's) as master; the seconds it took."""
        port = self.replica.port if port is None else port
        began = time.monotonic()
        while True:
            ports = [await threads.deferToThread(self._master_port, p) for p in self.ports]
            if all(p == port for p in ports):
                return time.monotonic() - began
            if time.monotonic() - began > timeout:
                raise AssertionError(f"no failover to {port} within {timeout:g}s: the sentinels say {ports}")
            await _sleep(0.1)

    async def close(self) -> None:
        for s in self.sentinels:
            await s.stop(signal.SIGTERM)
        await self.replica.close()
        await self.primary.close()

    async def __aenter__(self) -> "PrivateSentinels":
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


@pytest_twisted.async_yield_fixture
async def private_sentinels(tmp_path):
    """A started :class:`PrivateSentinels` (primary, replica, 3 Sentinels); stopped afterwards."""
    async with PrivateSentinels(tmp_path / "sentinels") as s:
        yield s


@pytest_twisted.async_yield_fixture
async def private_rabbit(tmp_path):
    """A started :class:`PrivateRabbit` (its own node, ports and data under tmp_path); closed afterwards."""
    async with PrivateRabbit(tmp_path / "rabbit") as rabbit:
        yield rabbit


@pytest_twisted.async_yield_fixture
async def private_redis(tmp_path):
    """A started :class:`PrivateRedis` (``--save ''``); stopped afterwards."""
    async with PrivateRedis(tmp_path / "redis") as redis:
        yield redis


def pytest_sessionfinish(session, exitstatus):
    """Reap private servers a crashed test left behind (only process groups this run started)."""
    for pid, popen in list(_LIVE.items()):
        if popen.poll() is None:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            popen.wait(5)
        _LIVE.pop(pid, None)


# --- PostgreSQL: a primary and its streaming replicas ------------------------------

PG_BIN = Path(os.environ.get("IMTEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
PG_START_TIMEOUT = 60.0


def _as_user(user: str) -> list[str]:
    """argv prefix running a command as ``user`` (PostgreSQL refuses to run as root)."""
    if os.geteuid() != 0:
        return []
    return ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--"]


class PrivatePostgres:
    """A PostgreSQL server of the test's own (initdb in ``base``), primary or streaming replica.

    ``PrivatePostgres(base).start()`` initialises a primary (``wal_level
    replica``, trust authentication from ``trusted``, no fsync: test data);
    ``PrivatePostgres(base, primary=p).start()`` clones ``p`` with
    ``pg_basebackup -R -X stream`` and starts it as a hot standby that
    streams from it. ``host`` is the address it listens on (its socket
    folder is its own, never the shared server's); ``prefix`` is an argv
    prefix for every command (``ip netns exec <ns>``, to run it on a
    network-namespace host). Run as root, the server runs as ``user``
    (``postgres``), and ``base`` is made theirs. ``kill()`` is a crash,
    ``close()`` a fast shutdown.
    """

    def __init__(self, base: Path, host: str = "127.0.0.1", port: int | None = None,
                 primary: "PrivatePostgres | None" = None, prefix: list[str] | None = None,
                 trusted: str = "127.0.0.1/32", user: str = "postgres") -> None:
        self.base = Path(base)
        self.host = host
        self.port = port or free_port()
        self.primary = primary
        self.prefix = list(prefix or [])
        self.trusted = trusted
        self.user = user
        self.data = self.base / "data"
        self.proc: _Process | None = None
        self.dsn = f"postgresql://{user}@{host}:{self.port}/postgres"

    def _own(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            import pwd

            pw = pwd.getpwnam(self.user)
            for p in [self.base, *self.base.rglob("*")]:
                os.chown(p, pw.pw_uid, pw.pw_gid)
            # its parents must let the server's user through
            for parent in self.base.parents:
                if str(parent) in ("/", "/tmp"):
                    break
                os.chmod(parent, os.stat(parent).st_mode | 0o711)

    def _run(self, argv: list[str]) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "IMCLUSTER_"))}
        out = subprocess.run([*self.prefix, *_as_user(self.user), *argv], env=env, cwd=self.base,
                             capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")

    def _prepare(self) -> None:
        self._own()
        if self.data.exists():
            return
        if self.primary is None:
            self._run([str(PG_BIN / "initdb"), "-D", str(self.data), "-U", self.user, "--auth=trust",
                       "-E", "UTF8", "--no-sync", "--locale=C"])
            with open(self.data / "pg_hba.conf", "a") as f:
                f.write(f"host all all {self.trusted} trust\nhost replication all {self.trusted} trust\n")
        else:
            self._run([str(PG_BIN / "pg_basebackup"), "-h", self.primary.host, "-p", str(self.primary.port),
                       "-U", self.user, "-D", str(self.data), "-R", "-X", "stream", "--no-sync",
                       "--checkpoint=fast"])
        with open(self.data / "postgresql.conf", "a") as f:
            # later lines win: a replica's copy of the primary's settings is overridden here
            f.write(f"\nlisten_addresses = '{self.host}'\nport = {self.port}\n"
                    f"unix_socket_directories = '{self.base}'\n"
                    "fsync = off\nfull_page_writes = off\nsynchronous_commit = off\n"
                    "wal_level = replica\nmax_wal_senders = 8\nhot_standby = on\n"
                    "shared_buffers = 32MB\nmax_connections = 100\nlogging_collector = off\n")

    def _connect(self):
        import psycopg2

        conn = psycopg2.connect(host=self.host, port=self.port, user=self.user, dbname="postgres",
                                connect_timeout=2, application_name="imcluster-tests")
        conn.autocommit = True
        return conn

    def query(self, sql: str, params: Any = None) -> list:
        """Run ``sql`` on this server (blocking, a fresh connection); its rows (or [])."""
        conn = self._connect()
        try:
            cur = conn.cursor()
            cur.execute(sql, params)
            return cur.fetchall() if cur.description else []
        finally:
            conn.close()

    def _ready(self) -> bool:
        try:
            in_recovery = self.query("SELECT pg_is_in_recovery()")[0][0]
        except Exception:
            return False
        return in_recovery == (self.primary is not None)

    async def start(self, timeout: float = PG_START_TIMEOUT) -> float:
        """initdb (or pg_basebackup from the primary) the first time, start, wait until it answers."""
        if self.running:
            return 0.0
        began = time.monotonic()
        await threads.deferToThread(self._prepare)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "IMCLUSTER_"))}
        argv = [str(PG_BIN / "postgres"), "-D", str(self.data)]
        if self.prefix:
            # in a network namespace: `ip netns exec` needs root, setpriv drops it after (the
            # namespace's clean-up, tests/support/netns.py, ends what outlives the run)
            self.proc = _Process(f"postgres {self.host}:{self.port}", [*self.prefix, *_as_user(self.user), *argv],
                                 env, self.base / "server.log", self.base)
        else:
            # here the user is switched before exec: the death signal survives it
            self.proc = _Process(f"postgres {self.host}:{self.port}", argv, env, self.base / "server.log",
                                 self.base, user=self.user if os.geteuid() == 0 else None)
        while not await threads.deferToThread(self._ready):
            if not self.proc.running:
                raise AssertionError(f"postgres exited while starting:\n{self.proc.log_tail()}")
            if time.monotonic() - began > timeout:
                await self.proc.stop(signal.SIGKILL)
                raise AssertionError(f"postgres not ready within {timeout:g}s:\n{self.proc.log_tail()}")
            await _sleep(0.1)
        return time.monotonic() - began

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.running

    async def kill(self) -> None:
        if self.proc is not None:
            await self.proc.stop(signal.SIGKILL)

    async def close(self) -> None:
        """Fast shutdown (SIGINT), SIGKILL after the stop timeout."""
        if self.proc is not None:
            await self.proc.stop(signal.SIGINT)

    async def __aenter__(self) -> "PrivatePostgres":
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

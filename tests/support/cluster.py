"""Real daemons as real processes, for integration and end-to-end tests.

The ``cluster`` fixture starts ``twistd -n --pidfile= imgateway|improcessor|imapi``
from this interpreter's ``bin`` folder (the venv under test), exactly as an
operator would (ARCHITECTURE.md, "Running"), on the test's own namespace,
Redis prefix and PostgreSQL schema, with free loopback ports and short
heartbeats.  Every process writes its output to a log file under the test's
``tmp_path``; a failure to start raises with the log's tail, and the tails of
all logs are printed at teardown (pytest shows them when the test failed).

Readiness never scrapes logs: a gateway is ready when all its listening
ports accept connections (it opens them last), a processor when the queue
``<ns>.processor`` has one more consumer than before it started.

Usage (the API returns Deferreds: ``await`` or ``yield`` them; a plain test
can use ``pytest_twisted.blockon``)::

    @pytest_twisted.ensureDeferred
    async def test_x(cluster):
        gw = await cluster.start_gateway()
        pr = await cluster.start_processor()
        client = await connect_ws(gw.ws_url)          # tests/support/clients.py
        await client.auth(cluster.token("alice"))
        ...
        assert await gw.stop() in CLEAN_EXIT          # SIGTERM, exit code

Teardown stops (SIGTERM, then SIGKILL) every process the test started, and
only those, then deletes the namespace's AMQP queues and exchanges and the
Redis keys under the prefix.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task, threads

from imcluster.config import API, GATEWAY, PROCESSOR, PUSH, options_for
from tests.support.bus import cleanup_namespace
from tests.support.ids import AMQP_URL, POSTGRES_DSN, REDIS_URL

#: the venv under test: twistd sits beside the interpreter running pytest
BIN_DIR = Path(sys.executable).parent
TWISTD = BIN_DIR / "twistd"

PLUGIN = {GATEWAY: "imgateway", PROCESSOR: "improcessor", API: "imapi", PUSH: "impush"}

#: seconds a daemon may take to become ready (two busy cores, cold imports)
START_TIMEOUT = float(os.environ.get("IMTEST_START_TIMEOUT", "30"))
#: seconds a daemon may take to exit after SIGTERM in teardown
STOP_TIMEOUT = 15.0
POLL = 0.05

#: exit codes of a clean stop: our daemons exit 0 once a SIGTERM stop finished in
#: time (imcluster.service.DaemonService); one cut short by --shutdown-timeout dies
#: by the signal (-15), as plain twistd does after any signal
CLEAN_EXIT = (0,)

#: every process started by this pytest run that has not been reaped yet
_LIVE: dict[int, subprocess.Popen] = {}


class DaemonError(AssertionError):
    """A daemon did not start, or did not stop, as it should (the message holds its log tail)."""


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (bind to port 0, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def endpoint(port: int) -> str:
    """A loopback-only Twisted endpoint string for ``port``."""
    return f"tcp:{port}:interface=127.0.0.1"


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """Whether ``host:port`` accepts a TCP connection now (loopback: answers at once)."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def consumer_count(queue: str, amqp_url: str = AMQP_URL) -> int:
    """Consumers of ``queue`` (0 when it does not exist): a passive declare, blocking pika."""
    import pika
    import pika.exceptions

    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        try:
            return channel.queue_declare(queue, passive=True).method.consumer_count
        except pika.exceptions.ChannelClosedByBroker as e:
            if e.reply_code == 404:
                return 0
            raise
    finally:
        if connection.is_open:
            connection.close()


def _die_with_parent() -> None:
    """In the child: get SIGKILL if pytest dies, so no daemon outlives a crashed run."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _child_env(extra: dict[str, str] | None) -> dict[str, str]:
    # a developer's IMCLUSTER_* variables must not leak into a test's daemons
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMCLUSTER_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def cli_args(daemon: str, opts: dict[str, Any]) -> list[str]:
    """Command-line arguments for ``daemon`` from option names (``snake_case``) and values.

    A list gives a repeated option; True a flag (or ``true``); None leaves
    the option out.  An option the daemon does not take is a test bug.
    """
    known = {o.name: o for o in options_for(daemon)}
    secret_paths = {o.name + "_path" for o in known.values() if o.secret}
    args: list[str] = []
    for name, value in opts.items():
        if value is None:
            continue
        if name not in known and name not in secret_paths and name != "config":
            raise TypeError(f"{PLUGIN[daemon]} takes no option {name!r}")
        flag = "--" + name.replace("_", "-")
        option = known.get(name)
        if option is not None and option.flag:
            if value:
                args.append(flag)
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        if option is not None and not option.multi and isinstance(value, (list, tuple)):
            values = [",".join(map(str, value))]
        for v in values:
            if isinstance(v, bool):
                v = "true" if v else "false"
            args.append(f"{flag}={v}")
    return args


async def sleep(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


class DaemonProcess:
    """One daemon started by the harness (or by a test through :meth:`Cluster.spawn`)."""

    def __init__(self, daemon: str, name: str, argv: list[str], log_path: Path,
                 ports: dict[str, int], cwd: Path, env: dict[str, str]) -> None:
        self.daemon = daemon
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.ports = ports
        self._log = open(log_path, "ab")
        self.popen = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            cwd=cwd, env=env, preexec_fn=_die_with_parent)
        _LIVE[self.popen.pid] = self.popen
        self.started_at = time.monotonic()

    # --- what tests read

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        """The exit code once the process has ended (negative: killed by that signal), else None."""
        rc = self.popen.poll()
        if rc is not None:
            _LIVE.pop(self.popen.pid, None)
            if not self._log.closed:
                self._log.close()
        return rc

    @property
    def running(self) -> bool:
        return self.returncode is None

    @property
    def ws_port(self) -> int:
        return self.ports["ws"]

    @property
    def tcp_port(self) -> int:
        return self.ports["tcp"]

    @property
    def stream_port(self) -> int:
        return self.ports["stream"]

    @property
    def http_port(self) -> int:
        return self.ports["http"]

    @property
    def metrics_port(self) -> int:
        return self.ports["metrics"]

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.ws_port}/ws"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def __repr__(self) -> str:
        return f"<{self.name} pid={self.pid} rc={self.returncode}>"

    # --- life cycle

    def _fail(self, what: str) -> DaemonError:
        return DaemonError(
            f"{self.name} (pid {self.pid}) {what}\n$ {' '.join(self.argv)}\n"
            f"--- last lines of {self.log_path} ---\n{self.log_tail()}")

    async def wait_ready(self, check, timeout: float = START_TIMEOUT) -> "DaemonProcess":
        """Poll ``check()`` (may return a Deferred) until true; fail if the process exits first."""
        deadline = time.monotonic() + timeout
        while True:
            if self.returncode is not None:
                raise self._fail(f"exited with {self.returncode} before it was ready")
            try:
                if await defer.maybeDeferred(check):
                    return self
            except Exception:
                pass  # the broker may refuse briefly; keep polling until the deadline
            if time.monotonic() > deadline:
                self.popen.kill()
                raise self._fail(f"was not ready within {timeout:g}s (killed)")
            await sleep(POLL)

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            self.popen.send_signal(sig)

    async def _wait(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while self.returncode is None:
            if time.monotonic() > deadline:
                return None
            await sleep(POLL)
        return self.returncode

    def wait(self, timeout: float = STOP_TIMEOUT) -> defer.Deferred:
        """Fires with the exit code once the process ends by itself; fails after ``timeout``."""
        async def waiting() -> int:
            rc = await self._wait(timeout)
            if rc is None:
                raise self._fail(f"did not exit within {timeout:g}s")
            return rc
        return defer.Deferred.fromCoroutine(waiting())

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> defer.Deferred:
        """Send ``sig`` and fire with the exit code (see :data:`CLEAN_EXIT`); a process still
        alive after ``timeout`` is killed and the Deferred fails (with its log tail)."""
        async def stopping() -> int:
            self.send_signal(sig)
            rc = await self._wait(timeout)
            if rc is None:
                self.popen.kill()
                await self._wait(5.0)
                raise self._fail(f"did not exit within {timeout:g}s of signal {sig} (killed)")
            return rc
        return defer.Deferred.fromCoroutine(stopping())

    def kill(self) -> defer.Deferred:
        """SIGKILL (a crash: nothing is cleaned up); fires with the exit code (-9)."""
        async def killing() -> int:
            self.send_signal(signal.SIGKILL)
            return await self._wait(5.0)
        return defer.Deferred.fromCoroutine(killing())


class Cluster:
    """Starts daemons on one test's namespace, Redis prefix and PostgreSQL schema."""

    def __init__(self, tmp_path: Path, namespace: str, redis_prefix: str,
                 pg_schema: str | None) -> None:
        self.tmp_path = tmp_path
        self.namespace = namespace
        self.redis_prefix = redis_prefix
        self.pg_schema = pg_schema
        self.redis_url = REDIS_URL
        self.amqp_url = AMQP_URL
        self.postgres_dsn = POSTGRES_DSN
        self.jwt_secret = "test-" + uuid.uuid4().hex
        self.processes: list[DaemonProcess] = []
        #: more queues to delete at teardown (the namespace's own are known to the bus)
        self.extra_queues: list[str] = []

    def token(self, user: str, ttl: float = 3600, **claims: Any) -> str:
        """A client JWT for ``user`` signed with this cluster's secret."""
        import jwt

        payload = {"sub": user, "exp": int(time.time() + ttl), **claims}
        return jwt.encode(payload, self.jwt_secret, algorithm="HS256")

    def common_options(self, daemon: str) -> dict[str, Any]:
        """The options every daemon of this cluster gets unless a test overrides them."""
        opts: dict[str, Any] = {
            "namespace": self.namespace,
            "redis": self.redis_url,
            "redis_prefix": self.redis_prefix,
            "amqp": self.amqp_url,
            "postgres": self.postgres_dsn,
            "postgres_schema": self.pg_schema,
            "jwt_secret": self.jwt_secret,
            # short, so that expiry and reaping fit in a test
            "heartbeat": 1.0,
            "server_ttl": 3.0,
            "shutdown_timeout": 10.0,
            "advertise": "127.0.0.1",
        }
        known = {o.name for o in options_for(daemon)}
        return {k: v for k, v in opts.items() if k in known}

    def spawn(self, daemon: str, opts: dict[str, Any], ports: dict[str, int] | None = None,
              env: dict[str, str] | None = None, logger: str | None = None) -> DaemonProcess:
        """Start ``daemon`` without waiting for it (a test of a start-up failure, say)."""
        n = sum(1 for p in self.processes if p.daemon == daemon) + 1
        name = f"{PLUGIN[daemon]}-{n}"
        merged = self.common_options(daemon)
        merged.update(opts)
        argv = [str(TWISTD), "-n", "--pidfile="]
        if logger:
            argv.append(f"--logger={logger}")
        argv += [PLUGIN[daemon], *cli_args(daemon, merged)]
        return self.run(name, argv, ports, env, daemon=daemon)

    def run(self, name: str, argv: list[str], ports: dict[str, int] | None = None,
            env: dict[str, str] | None = None, daemon: str = "") -> DaemonProcess:
        """Start any command as a harness-managed process (logged, reaped at teardown)."""
        workdir = self.tmp_path / "daemons"
        workdir.mkdir(exist_ok=True)
        proc = DaemonProcess(daemon, name, argv, workdir / f"{name}.log", dict(ports or {}),
                             workdir, _child_env(env))
        self.processes.append(proc)
        return proc

    def start_gateway(self, timeout: float = START_TIMEOUT, env: dict[str, str] | None = None,
                      metrics: bool = False, **opts: Any) -> defer.Deferred:
        """Start a gateway on free loopback ports; fires with its :class:`DaemonProcess`
        once its WebSocket, TCP and HTTP streaming ports (and metrics port, with ``metrics=True``) accept."""
        ports = {"ws": free_port(), "tcp": free_port(), "stream": free_port()}
        opts.setdefault("ws", endpoint(ports["ws"]))
        opts.setdefault("tcp", endpoint(ports["tcp"]))
        opts.setdefault("stream", endpoint(ports["stream"]))
        if metrics:
            ports["metrics"] = free_port()
            opts.setdefault("metrics", endpoint(ports["metrics"]))
        proc = self.spawn(GATEWAY, opts, ports, env)
        return defer.Deferred.fromCoroutine(
            proc.wait_ready(lambda: all(port_open(p) for p in ports.values()), timeout))

    def start_processor(self, timeout: float = START_TIMEOUT, env: dict[str, str] | None = None,
                        metrics: bool = False, **opts: Any) -> defer.Deferred:
        """Start a processor; fires with its :class:`DaemonProcess` once ``<ns>.processor``
        has one more consumer than before."""
        ns = opts.get("namespace", self.namespace)
        queue = f"{ns}.processor"
        ports = {}
        if metrics:
            ports["metrics"] = free_port()
            opts.setdefault("metrics", endpoint(ports["metrics"]))

        async def starting() -> DaemonProcess:
            before = await threads.deferToThread(consumer_count, queue, self.amqp_url)
            proc = self.spawn(PROCESSOR, opts, ports, env)

            async def ready() -> bool:
                if not all(port_open(p) for p in ports.values()):
                    return False
                return await threads.deferToThread(consumer_count, queue, self.amqp_url) > before

            return await proc.wait_ready(lambda: defer.Deferred.fromCoroutine(ready()), timeout)

        return defer.Deferred.fromCoroutine(starting())

    def start_api(self, timeout: float = START_TIMEOUT, env: dict[str, str] | None = None,
                  **opts: Any) -> defer.Deferred:
        """Start ``twistd imapi``; fires once its HTTP port accepts."""
        ports = {"http": free_port()}
        opts.setdefault("http", endpoint(ports["http"]))
        proc = self.spawn(API, opts, ports, env)
        return defer.Deferred.fromCoroutine(
            proc.wait_ready(lambda: all(port_open(p) for p in ports.values()), timeout))

    def start_push(self, timeout: float = START_TIMEOUT, env: dict[str, str] | None = None,
                   metrics: bool = False, **opts: Any) -> defer.Deferred:
        """Start ``twistd impush``; fires once ``<ns>.push`` has one more consumer than before
        (and its metrics port accepts, with ``metrics=True``)."""
        queue = f"{opts.get('namespace', self.namespace)}.push"
        if queue not in self.extra_queues:
            self.extra_queues.append(queue)
        ports = {}
        if metrics:
            ports["metrics"] = free_port()
            opts.setdefault("metrics", endpoint(ports["metrics"]))

        async def starting() -> DaemonProcess:
            before = await threads.deferToThread(consumer_count, queue, self.amqp_url)
            proc = self.spawn(PUSH, opts, ports, env)

            async def ready() -> bool:
                if not all(port_open(p) for p in ports.values()):
                    return False
                return await threads.deferToThread(consumer_count, queue, self.amqp_url) > before

            return await proc.wait_ready(lambda: defer.Deferred.fromCoroutine(ready()), timeout)

        return defer.Deferred.fromCoroutine(starting())

    async def shutdown(self) -> None:
        """Stop every process still running (SIGTERM, SIGKILL after STOP_TIMEOUT)."""
        for proc in self.processes:
            proc.send_signal(signal.SIGTERM)
        for proc in self.processes:
            if await proc._wait(STOP_TIMEOUT) is None:
                proc.popen.kill()
                await proc._wait(5.0)

    def report(self) -> str:
        """The tails of all logs, for pytest to show with a failed test."""
        parts = []
        for proc in self.processes:
            parts.append(f"--- {proc.name} (pid {proc.pid}, exit {proc.returncode}) {proc.log_path} ---")
            parts.append(proc.log_tail())
        return "\n".join(parts)


@pytest.fixture
def cluster_pg_schema(request) -> str | None:
    """The test's PostgreSQL schema (``pg_schema`` of tests/support/postgres.py), if that fixture exists."""
    try:
        return request.getfixturevalue("pg_schema")
    except pytest.FixtureLookupError:
        return None


@pytest_twisted.async_yield_fixture
async def cluster(tmp_path, namespace, redis_prefix, cluster_pg_schema):
    """A :class:`Cluster` on this test's namespace/prefix/schema; everything it started is
    stopped and its AMQP topology and Redis keys are deleted afterwards."""
    c = Cluster(tmp_path, namespace, redis_prefix, cluster_pg_schema)
    try:
        yield c
    finally:
        await c.shutdown()
        if c.processes:
            # captured output: pytest shows it only when the test failed
            sys.stdout.write(c.report() + "\n")
        await cleanup_namespace(namespace, c.extra_queues, c.amqp_url)
        await _delete_redis_prefix(redis_prefix)


async def _delete_redis_prefix(prefix: str) -> None:
    from imcluster.registry import RedisService
    from tests.support.redis import delete_prefix

    svc = RedisService(REDIS_URL, prefix=prefix, timeout=5.0)
    await svc.startService()
    try:
        await delete_prefix(svc, prefix)
    finally:
        await svc.stopService()


def pytest_sessionfinish(session, exitstatus):
    """Reap whatever a crashed test left behind (only PIDs this run started)."""
    for pid, popen in list(_LIVE.items()):
        if popen.poll() is None:
            popen.kill()
            popen.wait(5)
        _LIVE.pop(pid, None)

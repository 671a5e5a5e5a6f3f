"""imcluster.service: the service-tree building blocks of every daemon."""

from __future__ import annotations

import signal
import textwrap

import pytest
import pytest_twisted
from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import LogLevel, capturedLogs

from imcluster.service import AsyncMultiService, DaemonService, GuardedLoop, with_timeout
from tests.support.cluster import TWISTD

# starts processes: not part of the fast suite (-m "not slow")
pytestmark = pytest.mark.slow


class Child(service.Service):
    """A child whose start and stop fire when the test says so."""

    def __init__(self, name, events, start=None, stop=None):
        self.setName(name)
        self.events = events
        self.start_d = start
        self.stop_d = stop

    def startService(self):  # noqa: N802
        super().startService()
        self.events.append(("start", self.name))
        return self.start_d

    def stopService(self):  # noqa: N802
        super().stopService()
        self.events.append(("stop", self.name))
        return self.stop_d


class Failing(Child):
    def stopService(self):  # noqa: N802
        super().stopService()
        raise RuntimeError("stop boom")


def _tree(cls=AsyncMultiService, *children, **kw):
    root = cls(**kw) if kw else cls()
    for child in children:
        child.setServiceParent(root)
    return root


def test_start_waits_for_async_start():
    """Listeners would open before the bus is connected if a child's async start were ignored."""
    events = []
    bus_ready = defer.Deferred()
    root = _tree(AsyncMultiService, Child("bus", events, start=bus_ready), Child("listener", events))
    started = root.startService()
    assert events == [("start", "bus")]
    assert not started.called
    bus_ready.callback(None)
    assert events == [("start", "bus"), ("start", "listener")]
    assert started.called


def test_start_failure_stops_the_sequence():
    """A daemon whose Redis client failed to start must not open its listeners anyway."""
    events = []
    root = _tree(AsyncMultiService, Child("redis", events, start=defer.fail(RuntimeError("no redis"))),
                 Child("listener", events))
    started = root.startService()
    failure = []
    started.addErrback(failure.append)
    assert events == [("start", "redis")]
    assert failure and failure[0].check(RuntimeError)


def test_stop_reverse_order_waits_for_each():
    """Clients must be told 'going away' before the bus and Redis close under them."""
    events = []
    listener_stopped = defer.Deferred()
    root = _tree(AsyncMultiService, Child("redis", events), Child("amqp", events),
                 Child("listener", events, stop=listener_stopped))
    root.startService()
    del events[:]
    stopped = root.stopService()
    assert events == [("stop", "listener")]
    listener_stopped.callback(None)
    assert events == [("stop", "listener"), ("stop", "amqp"), ("stop", "redis")]
    assert stopped.called


def test_stop_errors_logged_not_swallowed():
    """A stop failure must show in the log, and must not keep the other children running."""
    events = []
    root = _tree(AsyncMultiService, Child("redis", events), Failing("amqp", events), Child("listener", events))
    root.startService()
    with capturedLogs() as logs:
        stopped = root.stopService()
    assert stopped.called and stopped.result is None
    assert [e for e in events if e[0] == "stop"] == [("stop", "listener"), ("stop", "amqp"), ("stop", "redis")]
    failures = [e for e in logs if e.get("log_failure") is not None]
    assert len(failures) == 1
    assert failures[0]["log_level"] == LogLevel.critical
    assert failures[0]["log_failure"].check(RuntimeError)
    assert failures[0]["child"] == "amqp"


def test_stop_skips_children_not_running():
    """Stopping a tree whose start failed half-way must not stop what never started."""
    events = []
    never = Child("listener", events)
    root = _tree(AsyncMultiService, Child("redis", events, start=defer.Deferred()), never)
    root.startService()
    root.stopService()
    assert ("stop", "listener") not in events and ("stop", "redis") in events


def test_daemon_shutdown_timeout_on_clock():
    """A stuck child must not keep a daemon alive past --shutdown-timeout after SIGTERM."""
    clock = task.Clock()
    events = []
    stuck = defer.Deferred()
    root = _tree(DaemonService, Child("redis", events), Child("gateway", events, stop=stuck),
                 name="imgateway", shutdown_timeout=30, clock=clock)
    root.startService()
    with capturedLogs() as logs:
        stopped = root.stopService()
        clock.advance(29.9)
        assert not stopped.called
        clock.advance(0.2)
    assert stopped.called
    assert any("did not stop within" in e["log_format"] for e in logs)
    # the stuck child finishing later changes nothing and leaves nothing behind
    stuck.callback(None)
    assert clock.getDelayedCalls() == []


def test_daemon_quick_stop_cancels_timer():
    """A daemon that stopped in time must not leave its shutdown timer behind."""
    clock = task.Clock()
    root = _tree(DaemonService, Child("redis", []), name="improcessor", shutdown_timeout=30, clock=clock)
    root.startService()
    stopped = root.stopService()
    assert stopped.called
    assert clock.getDelayedCalls() == []


def test_daemon_start_failure_hook():
    """A daemon that cannot start must not linger half-started."""
    seen = []
    root = _tree(DaemonService, Child("redis", [], start=defer.fail(RuntimeError("no redis"))),
                 name="imgateway", shutdown_timeout=1, clock=task.Clock(), on_start_failure=seen.append)
    with capturedLogs():
        root.startService()
    assert len(seen) == 1 and seen[0].check(RuntimeError)


def test_guarded_loop_survives_raising_callable():
    """A reaper or heartbeat that raised once must keep running (TimerService would stop for good)."""
    clock = task.Clock()
    calls = []

    def fn():
        calls.append(clock.seconds())
        if len(calls) == 1:
            raise RuntimeError("redis hiccup")

    loop = GuardedLoop(5, fn, "reaper", clock=clock)
    with capturedLogs() as logs:
        loop.startService()
        clock.advance(5)
        clock.advance(5)
    assert calls == [0, 5, 10]
    assert len([e for e in logs if e.get("log_failure")]) == 1
    stopped = loop.stopService()
    assert stopped.called
    assert clock.getDelayedCalls() == []


def test_guarded_loop_no_overlap_and_stop_waits():
    """A slow heartbeat must not pile up runs, and stopping must wait for the run in flight."""
    clock = task.Clock()
    pending = []

    def fn():
        pending.append(defer.Deferred())
        return pending[-1]

    loop = GuardedLoop(1, fn, "heartbeat", clock=clock)
    loop.startService()
    clock.advance(3)
    assert len(pending) == 1
    stopped = loop.stopService()
    assert not stopped.called
    pending[0].callback(None)
    assert stopped.called and len(pending) == 1


def test_with_timeout():
    """A Redis or AMQP call without a timeout would hang a client's request forever."""
    clock = task.Clock()
    d = with_timeout(defer.Deferred(), 2, clock, "HGETALL UCIR##bob")
    clock.advance(2)
    with pytest.raises(TimeoutError, match=r"HGETALL UCIR##bob timed out after 2s"):
        d.result.raiseException()
    d.addErrback(lambda f: None)
    ok = with_timeout(defer.succeed(7), 2, clock, "x")
    assert ok.result == 7 and clock.getDelayedCalls() == []


# --- the real twistd process: exit status after a failed start, bounded stop

_TAC = textwrap.dedent("""
    from twisted.application import service
    from twisted.internet import defer, reactor
    from imcluster.service import DaemonService

    class Child(service.Service):
        def startService(self):
            super().startService()
            if {fail_start!r}:
                d = defer.Deferred()
                reactor.callLater(0.1, d.errback, RuntimeError("cannot reach redis"))
                return d
            # ready once the reactor runs: its SIGTERM handler is installed by then
            reactor.callLater(0, lambda: open({ready!r}, "w").close())

        def stopService(self):
            super().stopService()
            if {stuck!r}:
                return defer.Deferred()  # never stops

    application = service.Application("t")
    root = DaemonService("imtest", shutdown_timeout=0.5)
    Child().setServiceParent(root)
    root.setServiceParent(application)
""")


def _tac(cluster, fail_start, stuck=True):
    name = f"t{int(fail_start)}{int(stuck)}"
    ready = cluster.tmp_path / f"{name}.ready"
    path = cluster.tmp_path / f"{name}.tac"
    path.write_text(_TAC.format(fail_start=fail_start, stuck=stuck, ready=str(ready)))
    return cluster.run(name, [str(TWISTD), "-n", "--pidfile=", "-y", str(path)]), ready


@pytest_twisted.ensureDeferred
async def test_failed_start_exits_nonzero(cluster):
    """systemd's Restart=on-failure restarts a daemon only if a failed start exits non-zero."""
    proc, _ = _tac(cluster, fail_start=True)
    rc = await proc.wait(timeout=20)
    assert rc == 1, proc.log_tail()
    assert "failed to start" in proc.log_text()


@pytest_twisted.ensureDeferred
async def test_sigterm_bounded_by_shutdown_timeout(cluster):
    """A daemon stuck in shutdown must still exit after --shutdown-timeout, as systemd expects."""
    proc, ready = _tac(cluster, fail_start=False)
    await proc.wait_ready(ready.exists, timeout=20)
    rc = await proc.stop(signal.SIGTERM, timeout=10)
    assert rc == -signal.SIGTERM, proc.log_tail()
    assert "did not stop within 0.5s" in proc.log_text()


@pytest_twisted.ensureDeferred
async def test_clean_sigterm_exits_zero(cluster):
    """A daemon that stopped cleanly on SIGTERM must exit 0, or supervisors report a failure."""
    proc, ready = _tac(cluster, fail_start=False, stuck=False)
    await proc.wait_ready(ready.exists, timeout=20)
    assert await proc.stop(signal.SIGTERM, timeout=10) == 0, proc.log_tail()

"""Service-tree building blocks shared by every daemon.

``MultiService`` ignores a child's asynchronous start and swallows stop
errors (Twisted #5941, #6790); :class:`AsyncMultiService` waits for each
child's ``startService`` Deferred before starting the next one and stops
children one at a time in reverse order, logging (not hiding) failures, the
way Buildbot's ``util/service.py`` does.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure


class AsyncMultiService(service.MultiService):
    """Starts children in order, waiting for each; stops them in reverse."""

    log = Logger()

    def __init__(self, name: str | None = None) -> None:
        super().__init__()
        if name:
            self.setName(name)

    def startService(self):  # noqa: N802 (Twisted API)
        service.Service.startService(self)
        return self.start_children()

    def stopService(self):  # noqa: N802
        service.Service.stopService(self)
        return self.stop_children()

    @defer.inlineCallbacks
    def start_children(self):
        """Start the children in order, each once the previous one has started.

        For a subclass whose own start must come first (the gateway
        registers before its listeners open).
        """
        for child in list(self):
            yield defer.maybeDeferred(child.startService)

    @defer.inlineCallbacks
    def stop_children(self):
        """Stop the running children in reverse order, one at a time, logging failures."""
        for child in reversed(list(self)):
            if not child.running:
                continue
            try:
                yield defer.maybeDeferred(child.stopService)
            except Exception:
                self.log.failure("stopping {child} failed", child=getattr(child, "name", None) or child)


class GuardedLoop(service.Service):
    """A timer service whose callable may fail without stopping the loop.

    ``TimerService`` stops for good when its callable raises; this one logs
    the failure and runs again at the next interval. The callable may return
    a Deferred; the next run waits for it (no overlapping runs).
    """

    log = Logger()

    def __init__(self, interval: float, fn: Callable[[], Any], name: str,
                 clock: Any = None, now: bool = True) -> None:
        self.interval = interval
        self.fn = fn
        self.now = now
        self.setName(name)
        self._clock = clock
        self._loop: task.LoopingCall | None = None
        self._done: defer.Deferred | None = None

    def _call(self) -> defer.Deferred:
        d = defer.maybeDeferred(self.fn)

        def failed(f: Failure) -> None:
            self.log.failure("{name} failed; it runs again in {interval}s", f,
                             name=self.name, interval=self.interval)

        d.addErrback(failed)
        return d

    def startService(self) -> None:  # noqa: N802
        super().startService()
        self._loop = task.LoopingCall(self._call)
        if self._clock is not None:
            self._loop.clock = self._clock
        self._done = self._loop.start(self.interval, now=self.now)

    def stopService(self) -> defer.Deferred | None:  # noqa: N802
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        return self._done


def with_timeout(d: defer.Deferred, seconds: float, clock: Any, what: str) -> defer.Deferred:
    """``d``, failing with :class:`TimeoutError` naming ``what`` after ``seconds``."""

    def on_timeout(result: Any, timeout: float) -> Any:
        if isinstance(result, Failure) and result.check(defer.CancelledError):
            raise TimeoutError(f"{what} timed out after {seconds:g}s")
        return result

    return d.addTimeout(seconds, clock, onTimeoutCancel=on_timeout)


def exit_after_failed_start(failure: Failure | None = None, reactor: Any = None) -> None:
    """Stop the reactor (stopping what did start), then exit with status 1.

    twistd itself exits 0 after ``reactor.stop()``, which systemd's
    ``Restart=on-failure`` takes for success: the daemon would stay down.
    """
    if reactor is None:
        from twisted.internet import reactor

    def exit_now() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)

    def stop() -> None:
        reactor.addSystemEventTrigger("after", "shutdown", exit_now)
        reactor.stop()

    if reactor.running:
        stop()
    else:  # failed before twistd ran the reactor
        reactor.callWhenRunning(stop)


def _forget_exit_signal(reactor: Any) -> None:
    """Make a completed graceful stop exit with status 0.

    twistd re-raises the signal that stopped the reactor once it is done, so a
    daemon stopped by SIGTERM would die "killed by SIGTERM" even after a clean
    shutdown. Only a stop that finished in time forgets the signal; one cut
    short by the shutdown timeout still dies by it.
    """
    if getattr(reactor, "_exitSignal", None) is not None:
        reactor._exitSignal = None


class DaemonService(AsyncMultiService):
    """The root of a daemon's tree: stopping gives up after ``shutdown_timeout``.

    SIGTERM makes twistd stop the tree; whatever has not stopped within the
    timeout is abandoned (logged) so that the process exits.
    """

    def __init__(self, name: str, shutdown_timeout: float, clock: Any = None,
                 on_start_failure: Callable[[Failure], Any] | None = None) -> None:
        super().__init__(name)
        self.shutdown_timeout = shutdown_timeout
        if clock is None:
            from twisted.internet import reactor as clock
        self._clock = clock
        self.on_start_failure = on_start_failure or exit_after_failed_start

    def startService(self):  # noqa: N802
        d = super().startService()

        def failed(f: Failure) -> None:
            # a daemon that cannot start must not linger half-started
            self.log.failure("{name} failed to start; exiting", f, name=self.name)
            self.on_start_failure(f)

        d.addErrback(failed)
        return d

    def stopService(self):  # noqa: N802
        self.log.info("{name} stopping (at most {timeout}s)", name=self.name, timeout=self.shutdown_timeout)
        d = super().stopService()
        done = defer.Deferred()
        timer = self._clock.callLater(
            self.shutdown_timeout,
            lambda: (self.log.warn("{name} did not stop within {timeout}s; exiting anyway",
                                   name=self.name, timeout=self.shutdown_timeout),
                     done.called or done.callback(None)))

        def finished(_: Any) -> None:
            if timer.active():
                timer.cancel()
            if not done.called:
                self.log.info("{name} stopped", name=self.name)
                _forget_exit_signal(self._clock)
                done.callback(None)

        d.addBoth(finished)
        return done

"""Coarse timers for many connections: one reactor call per tick, not one per timer.

A gateway holds tens of thousands of idle connections, each with timers that
almost never fire (authentication, idle and token-expiry deadlines, and
Autobahn's ping and handshake timeouts). A Twisted ``DelayedCall`` costs
about 450 bytes with its bound methods and keyword dict, and a cancelled one
stays in the reactor's heap until the heap is compacted: 5 of them were a
seventh of an idle connection's memory (``bench/conn_census.py``).

:class:`TimerWheel` keeps each timer as a small :class:`WheelCall` in the
bucket of its tick (``resolution`` seconds) and runs one ``callLater`` on the
clock for the earliest tick with anything in it. A call runs in the first
tick at or after its deadline, so at most ``resolution`` seconds late, and
calls of one tick run in the order they were made. Cancelling removes the
call from its bucket at once (nothing lingers).

:func:`wheel` gives the one wheel of a clock (the reactor, or a test's
``task.Clock``), so every connection of a process shares it.
"""

from __future__ import annotations

import heapq
import math
import weakref
from typing import Any, Callable

from twisted.logger import Logger

#: seconds per tick: how late a connection timer may run
RESOLUTION = 0.25

# a deadline within this many ticks past a boundary belongs to that boundary (float noise)
_EPSILON = 1e-6


class WheelCall:
    """One pending call of a :class:`TimerWheel` (what ``callLater`` returns, in small)."""

    __slots__ = ("_wheel", "_tick", "_fn", "_args")

    def __init__(self, wheel: "TimerWheel", tick: int, fn: Callable[..., Any], args: tuple) -> None:
        self._wheel: TimerWheel | None = wheel
        self._tick = tick
        self._fn = fn
        self._args = args

    def active(self) -> bool:
        """True until it ran or was cancelled."""
        return self._wheel is not None

    def cancel(self) -> None:
        """Forget it; harmless once it ran or was cancelled (unlike ``DelayedCall.cancel``)."""
        wheel = self._wheel
        if wheel is not None:
            self._wheel = None
            wheel._remove(self)
        self._fn = self._args = None


class TimerWheel:
    """Timers bucketed by tick on one clock (see the module docstring)."""

    log = Logger()

    def __init__(self, clock: Any, resolution: float = RESOLUTION) -> None:
        self.clock = clock
        self.resolution = resolution
        # tick -> its calls, in the order they were made (a dict is an ordered set)
        self._buckets: dict[int, dict[WheelCall, None]] = {}
        self._ticks: list[int] = []  # heap of the ticks in _buckets (and some emptied since)
        self._call: Any = None  # the clock's call for self._next
        self._next: int | None = None

    def __len__(self) -> int:
        return sum(len(b) for b in self._buckets.values())

    def call_later(self, delay: float, fn: Callable[..., Any], *args: Any) -> WheelCall:
        """Run ``fn(*args)`` in the first tick at least ``delay`` seconds from now (``delay`` <= 0: at once)."""
        now = self.clock.seconds()
        if delay > 0:
            tick = math.ceil((now + delay) / self.resolution - _EPSILON)
        else:
            # due already: in the clock's next turn, as callLater(0) would
            tick = math.floor(now / self.resolution + _EPSILON)
        call = WheelCall(self, tick, fn, args)
        bucket = self._buckets.get(tick)
        if bucket is None:
            bucket = self._buckets[tick] = {}
            heapq.heappush(self._ticks, tick)
        bucket[call] = None
        if self._next is None or tick < self._next:
            self._schedule(tick)
        return call

    def _remove(self, call: WheelCall) -> None:
        tick = call._tick
        bucket = self._buckets.get(tick)
        if bucket is not None:
            bucket.pop(call, None)
            if not bucket:
                # its tick stays in the heap and is skipped when it comes
                del self._buckets[tick]
                if tick == self._next:
                    # no clock call waits for nothing (nor outlives the last timer)
                    self._skip_empty()
                    if self._ticks:
                        self._schedule(self._ticks[0])
                    else:
                        if self._call is not None and self._call.active():
                            self._call.cancel()
                        self._call = self._next = None

    def _skip_empty(self) -> None:
        ticks = self._ticks
        while ticks and ticks[0] not in self._buckets:
            heapq.heappop(ticks)

    def _schedule(self, tick: int) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._next = tick
        self._call = self.clock.callLater(max(0.0, tick * self.resolution - self.clock.seconds()), self._fire)

    def _fire(self) -> None:
        self._call = None
        self._next = None
        now = math.floor(self.clock.seconds() / self.resolution + _EPSILON)
        ticks = self._ticks
        try:
            while ticks and ticks[0] <= now:
                bucket = self._buckets.pop(heapq.heappop(ticks), None)
                if not bucket:
                    continue
                for call in bucket:
                    if call._wheel is None:
                        continue  # cancelled by an earlier call of this tick
                    call._wheel = None
                    fn, args = call._fn, call._args
                    call._fn = call._args = None
                    try:
                        fn(*args)
                    except Exception:
                        self.log.failure("timer {fn!r} failed", fn=fn)
        finally:
            # (calls made by the ones that ran are in the heap already)
            self._skip_empty()
            if ticks and (self._next is None or ticks[0] < self._next):
                self._schedule(ticks[0])


_WHEELS: "weakref.WeakKeyDictionary[Any, TimerWheel]" = weakref.WeakKeyDictionary()


def wheel(clock: Any) -> TimerWheel:
    """The :class:`TimerWheel` of ``clock`` (made on first use, one per clock)."""
    w = _WHEELS.get(clock)
    if w is None:
        w = _WHEELS[clock] = TimerWheel(clock)
    return w

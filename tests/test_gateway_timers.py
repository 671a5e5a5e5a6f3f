"""The gateway's TimerWheel: coarse connection timers, one clock call per tick."""

from __future__ import annotations

from twisted.internet.task import Clock

from imcluster.gateway.timers import TimerWheel, wheel


def test_a_call_runs_in_the_first_tick_at_or_after_its_deadline():
    """Never early, at most one resolution late."""
    clock = Clock()
    w = TimerWheel(clock, resolution=0.25)
    ran = []
    w.call_later(1.1, ran.append, "a")
    clock.advance(1.09)
    assert ran == []
    clock.advance(0.16)  # 1.25: the tick holding 1.1
    assert ran == ["a"]
    assert clock.getDelayedCalls() == []


def test_calls_of_one_tick_run_in_the_order_made_and_ticks_in_time_order():
    clock = Clock()
    w = TimerWheel(clock, resolution=1.0)
    ran = []
    w.call_later(5, ran.append, 3)
    w.call_later(2, ran.append, 1)
    w.call_later(2, ran.append, 2)
    clock.advance(1.5)
    assert ran == []
    clock.advance(8.5)  # one clock turn runs every tick due
    assert ran == [1, 2, 3]


def test_one_clock_call_for_many_timers():
    clock = Clock()
    w = TimerWheel(clock)
    for i in range(1000):
        w.call_later(10 + i / 1000, lambda: None)
    assert len(clock.getDelayedCalls()) == 1
    assert len(w) == 1000


def test_cancel_removes_at_once_and_leaves_no_clock_call():
    """A cancelled call is gone (not left in a heap), and so is the clock call once nothing waits."""
    clock = Clock()
    w = TimerWheel(clock)
    ran = []
    a = w.call_later(5, ran.append, "a")
    b = w.call_later(8, ran.append, "b")
    a.cancel()
    assert not a.active() and len(w) == 1
    assert [c.getTime() for c in clock.getDelayedCalls()] == [8.0]
    b.cancel()
    assert clock.getDelayedCalls() == [] and len(w) == 0
    clock.advance(10)
    assert ran == []
    b.cancel()  # again, or after it ran: harmless


def test_zero_or_negative_delay_runs_in_the_next_clock_turn():
    clock = Clock()
    clock.advance(1000.1234)
    w = TimerWheel(clock)
    ran = []
    w.call_later(0, ran.append, "now")
    w.call_later(-3, ran.append, "late")
    clock.advance(0)
    assert ran == ["now", "late"]


def test_calls_made_or_cancelled_while_a_tick_runs():
    clock = Clock()
    w = TimerWheel(clock)
    ran = []
    calls = {}

    def first():
        ran.append("first")
        calls["later"].cancel()
        w.call_later(2, ran.append, "again")

    w.call_later(1, first)
    calls["later"] = w.call_later(1, ran.append, "cancelled")  # same tick, after first
    w.call_later(1, lambda: 1 / 0)  # a failing call costs the others nothing
    clock.advance(1)
    assert ran == ["first"]
    clock.advance(2)
    assert ran == ["first", "again"]
    assert clock.getDelayedCalls() == []


def test_one_wheel_per_clock():
    a, b = Clock(), Clock()
    assert wheel(a) is wheel(a)
    assert wheel(a) is not wheel(b)

"""No AMQP message above max_publish_bytes (issue 12): deliveries, sync pages, history replies, batches."""

from __future__ import annotations

import json

import pytest

from imcluster.bus import Refused, TooLarge
from imcluster.envelope import BODY_OVERHEAD, deliveries_body, parse_deliveries, split_frames
from imcluster.processor.handlers.history import fit
from imcluster.processor.router import Outbox, split_entries
from imcluster.testing.bus import FakeBus


def test_a_large_outbox_is_split_in_order_and_each_body_fits():
    """One gateway's deliveries of a huge window would be one message the broker refuses (406)."""
    out = Outbox()
    frames = [json.dumps({"type": "message_send", "n": n, "pad": "x" * 1000}) for n in range(300)]
    for f in frames:
        out.add("gw", ["gw##1.2.3.4##5", "gw##1.2.3.4##6"], f, delivery=True)
    bodies = out.bodies("gw", 64 * 1024)
    assert len(bodies) > 4
    assert all(len(b) <= 64 * 1024 for b in bodies)
    got = [f for b in bodies for d in parse_deliveries(b) for f in d.frames]
    assert [f["n"] for f in got] == list(range(300))


def test_a_small_outbox_stays_one_body():
    """Splitting must not cost the common case a second publish."""
    out = Outbox()
    out.add("gw", ["c1"], '{"type":"x"}')
    assert out.bodies("gw", 1 << 20) == [deliveries_body([[["c1"], ['{"type":"x"}']]])]


def test_split_entries_and_frames_keep_order_and_put_an_oversize_frame_alone():
    big, small = "y" * 500, "z"
    parts = split_entries([[["a"], [small, big, small]]], 300)
    assert [f for p in parts for _c, fs in p for f in fs] == [small, big, small]
    assert any(fs == [big] for p in parts for _c, fs in p)
    assert split_frames([], 10) == [[]]
    assert split_frames(["aa", "bb", "cc"], 6) == [["aa", "bb"], ["cc"]]


def test_history_page_holds_the_newest_messages_that_fit():
    """A page of 200 large messages would be one reply above the broker's limit."""
    msgs = [{"seq": n, "body": "p" * 1000} for n in range(1, 201)]
    page = fit(msgs, 10_000)
    assert page and len(page) < 200
    assert [m["seq"] for m in page] == list(range(201 - len(page), 201))  # the newest, ascending
    assert fit(msgs[:3], 1 << 20) == msgs[:3]


def test_fake_bus_refuses_a_body_above_max_publish_bytes_for_good():
    """The bus must never send what the broker would refuse with 406 (it closes the channel)."""
    bus = FakeBus(max_publish_bytes=1000)
    bus.startService()
    failures = []
    bus.publish("k", b"x" * 1001).addErrback(failures.append)
    assert failures and failures[0].check(TooLarge)
    assert issubclass(TooLarge, Refused)
    from imcluster.interfaces import Unavailable
    assert not issubclass(Refused, Unavailable)  # poison, never retried as "a dependency is down"


def test_body_overhead_covers_an_empty_batch():
    assert len(deliveries_body([[["c"], []]])) <= BODY_OVERHEAD

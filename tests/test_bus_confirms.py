"""AMQPService's publisher-confirm bookkeeping, driven without a broker (injected Clock, stand-in channel)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from pika import spec
from twisted.internet.task import Clock

from imcluster.bus import AMQPService, Nacked, Unavailable, Unroutable


class StandInChannel:
    """What AMQPService uses of its publishing channel: raw.basic_publish and on_close."""

    def __init__(self) -> None:
        self.sent = []
        self.raw = SimpleNamespace(basic_publish=self._publish)
        self.closers = []

    def _publish(self, exchange, routing_key, body, props, mandatory):
        self.sent.append((routing_key, body, props, mandatory))

    def on_close(self, fn) -> None:
        self.closers.append(fn)

    def close_by_broker(self) -> None:
        for fn in self.closers:
            fn(self, "406 PRECONDITION_FAILED")


def ack(tag, multiple=False):
    return SimpleNamespace(method=spec.Basic.Ack(delivery_tag=tag, multiple=multiple))


def nack(tag, multiple=False):
    return SimpleNamespace(method=spec.Basic.Nack(delivery_tag=tag, multiple=multiple))


@pytest.fixture
def svc():
    s = AMQPService("amqp://guest:guest@127.0.0.1:5672/%2F", "unit", publish_timeout=5.0, clock=Clock())
    s.running = True  # as if started, without a connection
    return s


_seen: dict[int, tuple] = {}


def outcome(d):
    """'pending', 'ok' or the exception's class name; reading it handles the failure."""
    if not d.called:
        return "pending"
    if id(d) not in _seen:
        r = d.result
        _seen[id(d)] = (d, "ok" if r is None else r.type.__name__)
        d.addErrback(lambda f: None)
    return _seen[id(d)][1]


def test_multiple_acks_nacks_and_returns_reach_the_right_publishes(svc):
    """A processor would mark a dead gateway's delivery as sent, or a live one as unroutable."""
    ch = StandInChannel()
    svc._install_publisher(ch)
    ds = [svc.publish("k%d" % i, b"b", mandatory=(i == 3)) for i in range(5)]
    assert [s[0] for s in ch.sent] == ["k0", "k1", "k2", "k3", "k4"]
    assert ch.sent[3][2].message_id is not None  # returns are matched by message_id
    svc._on_confirm(ch, ack(3, multiple=True))  # delivery tags count from 1
    assert [outcome(d) for d in ds] == ["ok", "ok", "ok", "pending", "pending"]
    svc._on_return(None, None, SimpleNamespace(message_id=ch.sent[3][2].message_id), b"b")
    svc._on_confirm(ch, nack(5))  # out of order: tag 5 first
    svc._on_confirm(ch, ack(4))
    assert [outcome(d) for d in ds[3:]] == ["Unroutable", "Nacked"]
    assert not svc._unconfirmed and not svc._order and not svc._returned


def test_unconfirmed_publishes_fail_unavailable_at_the_deadline(svc):
    """A gateway would wait for ever for a confirm the broker never sends."""
    ch = StandInChannel()
    svc._install_publisher(ch)
    d1 = svc.publish("k", b"1")
    svc._clock.advance(2)
    d2 = svc.publish("k", b"2")
    svc._clock.advance(3)
    assert outcome(d1) == "Unavailable" and outcome(d2) == "pending"
    svc._on_confirm(ch, ack(1))  # late: ignored
    svc._clock.advance(2)
    failures = []
    d2.addErrback(failures.append)
    assert failures and failures[0].check(Unavailable)
    assert "did not confirm within 5s: no confirm from the broker" in failures[0].getErrorMessage()
    assert not svc._clock.getDelayedCalls()


def test_a_lost_channel_resends_unconfirmed_publishes_in_order(svc):
    """Frames in flight when the broker connection broke would be lost, or resent out of order."""
    first = StandInChannel()
    svc._install_publisher(first)
    ds = [svc.publish("k", b"%d" % i) for i in range(4)]
    svc._on_confirm(first, ack(1))
    first.close_by_broker()
    assert not svc.connected
    waiting = svc.publish("k", b"4")  # while reopening: waits
    second = StandInChannel()
    svc._install_publisher(second)
    assert [s[1] for s in second.sent] == [b"1", b"2", b"3", b"4"]
    svc._on_confirm(first, ack(4, multiple=True))  # the dead channel's confirms mean nothing now
    assert [outcome(d) for d in ds] == ["ok", "pending", "pending", "pending"]
    svc._on_confirm(second, ack(4, multiple=True))
    assert [outcome(d) for d in ds + [waiting]] == ["ok"] * 5


def test_backlog_is_bounded_while_disconnected(svc):
    """A gateway's memory would grow without bound while RabbitMQ is down."""
    svc.publish_backlog = 2
    held = [svc.publish("k", b"x"), svc.publish("k", b"y")]
    refused = svc.publish("k", b"z")
    assert outcome(refused) == "Unavailable"
    svc._clock.advance(5)
    assert [outcome(d) for d in held] == ["Unavailable", "Unavailable"]
    assert not svc._waiting


def test_unroutable_and_nacked_are_publish_errors():
    """Callers catching PublishError would miss some failures."""
    from imcluster.bus import PublishError
    assert issubclass(Unavailable, PublishError) and issubclass(Nacked, PublishError)
    assert issubclass(Unroutable, PublishError)

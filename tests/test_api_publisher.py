"""MessagePublisher: imapi's request/reply bridge to the processors, on FakeBus and a Clock."""

from __future__ import annotations

import json

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from imcluster.api.publisher import MessagePublisher, PublishUnavailable
from imcluster.envelope import is_api_conn
from imcluster.testing import FakeBus

SERVER = "00000000-0000-4000-8000-000000000001"


class Processors:
    """Stands in for the processors: collects the items published to ``<ns>.server``."""

    def __init__(self, bus: FakeBus) -> None:
        self.bus = bus
        self.items: list[dict] = []
        bus.consume(bus.processor_queue(), self._got)

    def _got(self, message) -> None:
        self.items.extend(json.loads(message.body)["items"])
        message.ack()

    def reply(self, item: dict, frame: dict, extra_conns=()) -> None:
        body = {"v": 1, "items": [{"connIds": [*extra_conns, item["connId"]], "frames": [frame]}]}
        self.bus.publish(self.bus.gateway_key(item["serverId"]), json.dumps(body).encode(), mandatory=True)


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def bus(clock):
    b = FakeBus("imt", publish_timeout=1.0, clock=clock)
    b.startService()
    return b


@pytest.fixture
def publisher(bus, clock):
    p = MessagePublisher(bus, timeout=3.0, batch=10, clock=clock, server_id=SERVER)
    d = p.startService()
    clock.advance(0)
    assert d.called
    return p


def ok_reply(item: dict, ts: int | None = None, **extra) -> dict:
    return {"type": "message_reply", "ok": True, "clientMsgId": item["frame"]["clientMsgId"], "msgId": "7",
            "sessionId": item["frame"]["sessionId"], "seq": 3, "ts": item["ts"] if ts is None else ts, **extra}


def results(d: defer.Deferred) -> list:
    out: list = []
    d.addBoth(out.append)
    return out


def test_item_has_the_internal_format(bus, publisher, clock):
    """A message posted over HTTP reaches the processors in the gateway item format they parse."""
    procs = Processors(bus)
    clock.advance(12.345)
    publisher.publish("system", "g1", "c-1", {"text": "hi"}, trusted=True)
    publisher.publish("alice", "g1", "c-2", [1, 2])
    clock.advance(0)  # end of the turn: one coalesced publish
    assert len(bus.published) == 1
    first, second = procs.items
    assert first == {"kind": "frame", "userId": "system", "serverId": SERVER, "connId": first["connId"],
                     "ts": 12345, "trusted": True,
                     "frame": {"type": "message", "clientMsgId": "c-1", "sessionId": "g1", "body": {"text": "hi"}}}
    assert "trusted" not in second
    assert first["connId"] != second["connId"]
    assert is_api_conn(first["connId"]) and first["connId"].startswith(SERVER + "##api##")
    assert bus.published[0][0] == bus.server_key()


def test_reply_is_matched_to_its_request(bus, publisher, clock):
    """Concurrent HTTP posts each get their own reply, not a neighbour's."""
    procs = Processors(bus)
    a = results(publisher.publish("alice", "g1", "a", 1))
    b = results(publisher.publish("bob", "g1", "b", 2))
    clock.advance(0)
    item_a, item_b = procs.items
    procs.reply(item_b, ok_reply(item_b, msgId="9"), extra_conns=["someone##1.2.3.4##5"])
    assert a == [] and b[0][0]["msgId"] == "9" and b[0][1] is False
    procs.reply(item_a, ok_reply(item_a))
    assert a[0] == (ok_reply(item_a), False)
    assert publisher.pending == 0


def test_duplicate_from_flag_or_from_ts(bus, publisher, clock):
    """A repeated clientMsgId answers as a duplicate (HTTP 200), a new one does not (201)."""
    procs = Processors(bus)
    outs = [results(publisher.publish("alice", "g1", f"c{i}", i)) for i in range(4)]
    clock.advance(0)
    items = procs.items
    procs.reply(items[0], ok_reply(items[0], duplicate=True))         # the processors say so
    procs.reply(items[1], ok_reply(items[1], duplicate=False, ts=1))  # ... and are believed
    procs.reply(items[2], ok_reply(items[2], ts=items[2]["ts"] - 5))  # the original's ts
    procs.reply(items[3], ok_reply(items[3]))                         # stored now: the item's ts
    assert [o[0][1] for o in outs] == [True, False, True, False]


def test_error_replies_are_returned(bus, publisher, clock):
    """A refused message comes back as the processors' reply (the resource maps its code to a status)."""
    procs = Processors(bus)
    out = results(publisher.publish("alice", "g1", "c", 1))
    clock.advance(0)
    reply = {"type": "message_reply", "ok": False, "clientMsgId": "c",
             "error": {"code": "rejected", "message": "no"}}
    procs.reply(procs.items[0], reply)
    assert out == [(reply, False)]


def test_no_reply_is_unavailable_within_the_timeout(bus, publisher, clock):
    """With no processor running, a post fails (503) after the timeout instead of hanging."""
    out = results(publisher.publish("alice", "g1", "c", 1))
    clock.advance(2.9)
    assert out == []
    clock.advance(0.2)
    assert out[0].check(PublishUnavailable)
    assert publisher.pending == 0
    assert not clock.getDelayedCalls()


def test_broker_down_is_unavailable(bus, publisher, clock):
    """RabbitMQ not confirming fails the post (503) and leaves nothing waiting."""
    bus.set_available(False)
    out = results(publisher.publish("alice", "g1", "c", 1))
    clock.advance(0)
    clock.advance(1.0)  # publish_timeout of the bus
    assert out[0].check(PublishUnavailable) and "RabbitMQ" in str(out[0].value)
    assert publisher.pending == 0
    clock.advance(5)
    assert not clock.getDelayedCalls()


def test_late_and_unknown_replies_are_ignored(bus, publisher, clock):
    """A reply after the timeout, or for a connection nobody waits on, is dropped without harm."""
    procs = Processors(bus)
    out = results(publisher.publish("alice", "g1", "c", 1))
    clock.advance(0)
    clock.advance(3.1)
    assert out[0].check(PublishUnavailable)
    procs.reply(procs.items[0], ok_reply(procs.items[0]))
    bus.publish(bus.gateway_key(SERVER), b"not json", mandatory=True)
    bus.publish(bus.gateway_key(SERVER), b'{"v":1,"items":[{"connIds":["x"],"frames":[{"type":"message_send"}]}]}')
    assert len(bus.broker.queues[bus.gateway_queue(SERVER).name].messages) == 0  # all acknowledged


def test_stop_answers_waiting_requests(bus, publisher, clock):
    """Stopping imapi answers in-flight posts (503) instead of leaving them open."""
    out = results(publisher.publish("alice", "g1", "c", 1))
    clock.advance(0)
    publisher.stopService()
    clock.advance(0)
    assert out[0].check(PublishUnavailable)
    assert not any(c.queue.name == bus.gateway_queue(SERVER).name for c in bus.consumers)
    assert results(publisher.publish("alice", "g1", "c2", 1))[0].check(PublishUnavailable)


def test_start_does_not_wait_forever_for_rabbitmq(clock):
    """imapi starts (and serves /healthz) even when RabbitMQ is down; the consumer starts later."""
    bus = FakeBus("imt", publish_timeout=1.0, clock=clock)
    bus.available = False
    bus.startService()
    p = MessagePublisher(bus, timeout=3.0, clock=clock, server_id=SERVER)
    d = p.startService()
    assert not d.called
    clock.advance(1.0)
    assert d.called and not p.ready
    bus.set_available(True)
    assert p.ready

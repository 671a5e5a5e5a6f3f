"""The gateway's side of "deliveries heal by themselves", on fakes (memory reactor).

After its queue is declared again (a new AMQP connection: whatever was routed
meanwhile went into no queue) or after it re-registered in Redis (the
processors saw its users offline), the gateway asks the processors to sync
every connection it holds again. The real-process proof is tests/test_faults.py.
"""

from __future__ import annotations

from tests.test_gateway_hub import Hub, result


def syncs(h):
    """The sync items the processors got, in order: (connId, resync flag)."""
    return [(i["connId"], i.get("resync", False))
            for body in h.items for i in body["items"] if i["kind"] == "sync"]


def run_for(h, seconds, step=0.1):
    """Let ``seconds`` pass in steps (calls scheduled by calls run too), ending each turn."""
    for _ in range(round(seconds / step)):
        h.reactor.advance(step)
        h.turn()


def test_queue_declared_again_resyncs_every_authenticated_connection():
    """After a broker restart, messages routed while the gateway queue was gone would never reach open tabs."""
    h = Hub()
    conns = [h.connect(i + 1) for i in range(3)]
    for i, c in enumerate(conns[:2]):
        h.auth(c, f"u{i}")
    h.turn()
    assert syncs(h) == []
    h.bus.simulate_reconnect()  # the exclusive queue is gone and declared again
    h.turn()
    assert sorted(syncs(h)) == sorted((c.conn_id, True) for c in conns[:2])  # not the unauthenticated one
    item = next(i for body in h.items for i in body["items"])
    assert item["userId"] in ("u0", "u1") and item["serverId"] == h.uuid
    assert h.gw.conn_resyncs == 1


def test_resync_says_since_when_the_loss_began():
    """Another device of the user may have acknowledged what this connection missed: 'undelivered' is not enough."""
    h = Hub()
    a = h.connect(1)
    h.auth(a, "alice")
    h.turn()
    h.reactor.advance(3.0)
    lost_at = h.reactor.seconds()
    h.bus.set_available(False)
    h.reactor.advance(4.0)
    h.bus.set_available(True)
    h.turn()
    [item] = [i for body in h.items for i in body["items"] if i.get("resync")]
    assert item["since"] == int((lost_at - 10.0) * 1000)  # a margin for the processors' clocks


def test_redis_loss_since_the_last_time_our_key_was_seen():
    """Entries lost between two heartbeats were lost since the earlier one, not since they were noticed missing."""
    h = Hub()
    a = h.connect(1)
    h.auth(a, "alice")
    h.turn()
    h.reactor.advance(10.0)  # heartbeat: the key is there
    seen_at = h.reactor.seconds()
    h.registry.flush()
    h.reactor.advance(10.0)  # heartbeat: gone
    h.turn()
    [item] = [i for body in h.items for i in body["items"] if i.get("resync")]
    assert item["since"] == int((seen_at - 10.0) * 1000)


def test_first_start_asks_for_nothing():
    """A gateway starting up must not send sync requests of its own (each auth asks for its sync)."""
    h = Hub()
    h.turn()
    assert syncs(h) == [] and h.gw.conn_resyncs == 0


def test_redis_data_loss_resyncs_after_re_registration():
    """After Redis lost its data, messages routed while users looked offline would wait for a reconnect."""
    h = Hub()
    a, b = h.connect(1), h.connect(2)
    h.auth(a, "alice")
    h.auth(b, "bob")
    h.turn()
    result(h.registry.simulate_reconnect(lose_data=True))
    h.turn()
    assert h.wsconns() == ["alice##10.0.0.1##1", "bob##10.0.0.1##2"]  # routable again first
    assert sorted(syncs(h)) == sorted([(a.conn_id, True), (b.conn_id, True)])


def test_heartbeat_noticing_a_lost_key_resyncs():
    """A Redis flush noticed only by the heartbeat must heal the same way."""
    h = Hub()
    a = h.connect(1)
    h.auth(a, "alice")
    h.turn()
    h.registry.flush()
    h.reactor.advance(10.0)  # heartbeat
    h.turn()
    assert syncs(h) == [(a.conn_id, True)]


def test_resync_is_batched_and_rate_bounded():
    """A gateway with many connections must not ask for all their syncs at once after every blip."""
    h = Hub(publish_batch=10, resync_rate=20.0)
    conns = [h.connect(i + 1) for i in range(35)]
    for i, c in enumerate(conns):
        h.auth(c, f"u{i}")
    h.turn()
    publishes = len(h.bodies())
    assert h.gw.resync_connections("test") == 35
    h.turn()
    assert len(syncs(h)) == 10 and len(h.bodies()) == publishes + 1  # one publish per batch
    h.reactor.advance(0.49)
    assert len(syncs(h)) == 10
    h.reactor.advance(0.01)  # 10 connections / 20 per second
    h.turn()
    assert len(syncs(h)) == 20
    run_for(h, 1.2)  # the batches at 1.0 s and 1.5 s
    assert sorted(c for c, _ in syncs(h)) == sorted(c.conn_id for c in conns)


def test_a_newer_pass_supersedes_an_older_one_and_closed_connections_are_skipped():
    """Two losses in a row must not sync every connection twice over; a closed one needs nothing."""
    h = Hub(publish_batch=5, resync_rate=5.0)
    conns = [h.connect(i + 1) for i in range(12)]
    for i, c in enumerate(conns):
        h.auth(c, f"u{i}")
    h.turn()
    h.gw.resync_connections("first")
    h.turn()
    assert len(syncs(h)) == 5
    h.gw.connection_lost(conns[11])
    h.gw.resync_connections("second")  # starts over with every live connection
    run_for(h, 10.0)
    got = [c for c, _ in syncs(h)]
    assert len(got) == 5 + 11
    assert sorted(got[5:]) == sorted(c.conn_id for c in conns[:11])


def test_resync_requests_are_retried_while_the_broker_is_down():
    """A sync request is never dropped: one that meets a dead broker is published once it is back."""
    h = Hub(retry_delay=0.5, retry_max_delay=1.0)
    a = h.connect(1)
    h.auth(a, "alice")
    h.turn()
    h.bus.set_available(False)
    h.gw.resync_connections("test")
    h.turn()
    h.reactor.advance(6.0)  # the publish times out (5 s), and is retried
    assert syncs(h) == []
    h.bus.set_available(True)  # the reconnect itself asks again, and the retried request goes too
    h.turn()
    h.reactor.advance(2.0)
    h.turn()
    assert syncs(h) and set(syncs(h)) == {(a.conn_id, True)}


def test_requests_of_a_superseded_pass_stop_being_retried():
    """A broker flapping for an hour must not pile up one retried sync request per connection per flap."""
    h = Hub(retry_delay=0.5, retry_max_delay=1.0)
    a = h.connect(1)
    h.auth(a, "alice")
    h.turn()
    h.bus.set_available(False)
    for _ in range(5):
        h.gw.resync_connections("flap")
        h.turn()
    run_for(h, 8.0)  # every first publish has failed by now; the retries wait for the broker
    h.bus.set_available(True)  # the reconnect asks once more, and so does only the last pass
    run_for(h, 3.0)
    assert syncs(h) == [(a.conn_id, True)] * 2


def test_stopping_gateway_stops_resyncing():
    """A gateway going away must not keep publishing sync requests for clients it is closing."""
    h = Hub(publish_batch=2, resync_rate=2.0)
    conns = [h.connect(i + 1) for i in range(6)]
    for i, c in enumerate(conns):
        h.auth(c, f"u{i}")
    h.turn()
    h.gw.resync_connections("test")
    h.turn()
    assert len(syncs(h)) == 2
    h.gw.stopService()
    run_for(h, 10.0)
    assert len(syncs(h)) == 2

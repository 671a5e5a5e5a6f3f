"""Presence in Redis (imcluster/presence.py), the gateway's presence hub and typing gate, the liveness watch.

The Tracker suite runs over FakeRegistry (the script's Python twin) and the
real RedisService (the Lua script, pub/sub through RedisSubscriber): one
contract for both. The hub and the watch run on the fakes with a fake clock.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import task

from imcluster import presence as pr
from imcluster.gateway.presence import PresenceHub, TypingGate
from imcluster.processor.liveness import LivenessWatch
from imcluster.processor.reaper import Reaper
from imcluster.registry import conn_meta, server_info
from imcluster.testing import FakeRegistry
from imcluster.testing.gateway import FakeConnection, gateway_config
from tests.support.waiting import eventually

INFO = server_info("10.0.0.9", 8080, 8081, 1764160000)
META = conn_meta("web", 1764160000, 1764163600)


@pytest.fixture(params=["fake", "real"])
def registry(request, redis_prefix):
    if request.param == "fake":
        return FakeRegistry(redis_prefix)
    return request.getfixturevalue("redis_service")


def _subscriber(registry, got):
    return pr.subscriber_for(registry, lambda channel, data: got.append((channel, data)))


# --- the tracker: transitions detected once, published on the user's channel


@pytest_twisted.ensureDeferred
async def test_reconcile_detects_each_transition_once_and_publishes_it(registry):
    """Two gateways checking one user must not both announce it: each change is told exactly once."""
    got = []
    sub = _subscriber(registry, got)
    await sub.start()
    try:
        tracker = pr.Tracker(registry)
        channel = pr.state_key(registry.prefix, "alice")
        await sub.subscribe([channel])
        assert await tracker.reconcile(["alice"]) == []  # never online: nothing to tell
        await registry.add_connections("gw1", [("alice", "10.0.0.1", 1, META)])
        first = await tracker.reconcile(["alice", "alice"])
        assert [(t.user_id, t.online) for t in first] == [("alice", True)]
        assert await tracker.reconcile(["alice"]) == [], "a second check finds no change"
        await registry.add_connections("gw2", [("alice", "10.0.0.2", 2, META)])
        await registry.remove_connections("gw1", [("alice", "10.0.0.1", 1)])
        assert await tracker.reconcile(["alice"]) == [], "one device of two going: still online"
        await registry.remove_connections("gw2", [("alice", "10.0.0.2", 2)])
        second = await tracker.reconcile(["alice"])
        assert [(t.user_id, t.online) for t in second] == [("alice", False)]
        assert second[0].ts > first[0].ts
        await eventually(lambda: len(got) == 2, 5.0, what="two messages")
        assert got == [(channel, f"{first[0].ts}:1"), (channel, f"{second[0].ts}:0")]
        t_ms, states = await tracker.states(["alice", "nobody"])
        assert states == {"alice": (second[0].ts, False), "nobody": None}
        assert t_ms >= first[0].ts
        ttl = await registry.execute("TTL", channel)
        assert 0 < ttl <= pr.OFFLINE_KEEP, "an offline state does not stay for ever"
    finally:
        await sub.stop()


@pytest_twisted.ensureDeferred
async def test_versions_increase_even_within_one_millisecond(registry):
    """A quick flap must still order its transitions: a subscriber keeps the newest."""
    tracker = pr.Tracker(registry)
    stamps = []
    for i in range(6):
        if i % 2 == 0:
            await registry.add_connections("gw1", [("bob", "10.0.0.1", 1, META)])
        else:
            await registry.remove_connections("gw1", [("bob", "10.0.0.1", 1)])
        stamps += [t.ts for t in await tracker.reconcile(["bob"])]
    assert len(stamps) == 6 and stamps == sorted(set(stamps))


@pytest_twisted.ensureDeferred
async def test_reaping_a_gateway_turns_its_users_offline(registry):
    """A dead gateway's users must go offline when it is reaped, unless connected elsewhere."""
    tracker = pr.Tracker(registry)
    await registry.register_server("gw1", INFO, 60)
    await registry.add_connections("gw1", [("alice", "10.0.0.1", 1, META), ("bob", "10.0.0.1", 2, META)])
    await registry.add_connections("gw2", [("bob", "10.0.0.2", 3, META)])
    await tracker.reconcile(["alice", "bob"])
    reaper = Reaper(registry, tracker)
    await reaper.reap_dead("gw1", "test")
    t_ms, states = await tracker.states(["alice", "bob"])
    assert states["alice"][1] is False and states["bob"][1] is True
    assert await registry.execute("EXISTS", registry.keys.server("gw1")) == 0


@pytest_twisted.ensureDeferred
async def test_webhook_events_for_transitions(registry):
    """Each transition must become one user.online / user.offline event, in one persistent batch."""
    from imcluster.testing import FakeBus

    bus = FakeBus("ns")
    bus.startService()
    consumed = []
    bus.declare_queue(bus.names.webhooks_queue())
    bus.consume(bus.names.webhooks_queue(), lambda m: (consumed.append(m.body), m.ack()))
    config = gateway_config(webhook_url="http://biz.example/hook", webhook_events=["user.offline"])
    tracker = pr.Tracker(registry, bus, config)
    await tracker.start()
    await registry.add_connections("gw1", [("alice", "10.0.0.1", 1, META), ("bob", "10.0.0.1", 2, META)])
    await tracker.reconcile(["alice", "bob"])
    await registry.remove_connections("gw1", [("alice", "10.0.0.1", 1), ("bob", "10.0.0.1", 2)])
    await tracker.reconcile(["alice", "bob"])
    await eventually(lambda: consumed, 5.0, what="an events batch")
    import json

    events = [e for body in consumed for e in json.loads(body)]
    assert [(e["event"], e["data"]["userId"], e["key"]) for e in events] == [
        ("user.offline", "alice", "user:alice"), ("user.offline", "bob", "user:bob")]
    assert len(consumed) == 1, "one AMQP message for the batch (persistence: tests/test_presence_typing.py)"


# --- the gateway's presence hub (fakes, fake clock)


class HubRig:
    def __init__(self, presence_max=500):
        self.clock = task.Clock()
        self.clock.advance(1_764_160_000)
        self.registry = FakeRegistry("p:", clock=self.clock)
        self.tracker = pr.Tracker(self.registry, clock=self.clock)
        config = gateway_config(presence_max=presence_max)
        self.hub = PresenceHub(config, self.tracker, self.clock,
                               lambda on_message: self.registry.subscriber(on_message))
        assert self.hub.start("gw-1").called
        self.port = 0

    def conn(self):
        self.port += 1
        return FakeConnection("watcher", port=self.port)

    def turn(self):
        self.clock.advance(0)

    def online(self, user, port=1, gw="gw-9"):
        self.registry.add_connections(gw, [(user, "10.0.0.9", port, META)])
        self.tracker.reconcile([user])

    def offline(self, user, port=1, gw="gw-9"):
        self.registry.remove_connections(gw, [(user, "10.0.0.9", port)])
        self.tracker.reconcile([user])


def frames(conn, kind):
    return [f for f in conn.sent if f.get("type") == kind]


def test_hub_reply_then_only_changes_never_the_same_state_twice():
    """A subscriber must see the current state, then each change once, never a repeat."""
    r = HubRig()
    a = r.conn()
    r.online("bob")
    d = r.hub.subscribe(a, {"type": "presence_subscribe", "id": "r1", "users": ["bob", "carol"]})
    r.turn()
    assert d.called
    reply = frames(a, "presence_reply")[0]
    assert reply["id"] == "r1" and reply["ok"] is True
    assert reply["users"][1] == {"userId": "carol", "online": False}
    assert reply["users"][0]["online"] is True and reply["users"][0]["since"] > 0
    r.online("bob", port=2)  # a second device: no change
    r.offline("bob", port=1)
    assert frames(a, "presence") == []
    r.offline("bob", port=2)
    r.online("carol")
    assert [(f["userId"], f["online"]) for f in frames(a, "presence")] == [("bob", False), ("carol", True)]


def test_hub_second_follower_costs_no_redis_round_trip_and_unsubscribe_stops_frames():
    """Many connections following one user must share one subscription and one read."""
    r = HubRig()
    a, b = r.conn(), r.conn()
    r.hub.subscribe(a, {"type": "presence_subscribe", "users": ["bob"]})
    r.turn()
    before = r.registry.round_trips
    r.hub.subscribe(b, {"type": "presence_subscribe", "users": ["bob"]})
    r.turn()
    assert r.registry.round_trips == before and frames(b, "presence_reply")
    r.hub.unsubscribe(a, {"type": "presence_unsubscribe", "id": 4, "users": ["bob"]})
    assert frames(a, "presence_reply")[-1] == {"type": "presence_reply", "id": 4, "ok": True, "users": []}
    r.online("bob")
    assert frames(a, "presence") == [] and len(frames(b, "presence")) == 1
    r.hub.connection_lost(b)
    r.turn()
    assert r.hub.followed == 0 and r.hub.subscriber.channels == {pr.liveness_channel("p:", "gw-1")}


def test_hub_presence_max():
    """More than presence_max users is too_large, and nothing of that frame is followed."""
    r = HubRig(presence_max=3)
    a = r.conn()
    r.hub.subscribe(a, {"type": "presence_subscribe", "users": ["u1", "u2"]})
    r.turn()
    r.hub.subscribe(a, {"type": "presence_subscribe", "id": "x", "users": ["u1", "u3", "u4"]})
    r.turn()
    err = frames(a, "presence_reply")[-1]
    assert err == {"type": "presence_reply", "id": "x", "ok": False,
                   "error": {"code": "too_large", "message": err["error"]["message"]}}
    r.online("u3")
    assert frames(a, "presence") == []
    r.hub.subscribe(a, {"type": "presence_subscribe", "users": ["u1", "u3"]})  # 3: at the limit
    r.turn()
    assert frames(a, "presence_reply")[-1]["ok"] is True


def test_hub_newer_version_wins_between_a_read_and_a_published_change():
    """A read that answers after a newer published change must not put the old state back."""
    r = HubRig()
    a = r.conn()
    r.online("bob")
    r.hub.subscribe(a, {"type": "presence_subscribe", "users": ["bob"]})
    r.turn()
    ts, online = r.hub._known["bob"]
    r.hub._on_message("p:PRESENCE##{bob}", f"{ts + 5}:0")
    assert frames(a, "presence")[-1]["online"] is False
    r.hub._apply_read(ts + 3, {"bob": (ts, True)})  # an older read arriving late
    r.hub._apply_read(ts + 3, {"bob": None})
    assert len(frames(a, "presence")) == 1
    r.hub._on_message("p:PRESENCE##{bob}", f"{ts + 2}:1")  # an older message arriving late
    assert len(frames(a, "presence")) == 1
    # after a reconnect, a read of newer data (Redis lost the state: offline) applies
    r.hub._on_message("p:PRESENCE##{bob}", f"{ts + 9}:1")
    r.hub._apply_read(ts + 20, {"bob": None})
    assert [f["online"] for f in frames(a, "presence")] == [False, True, False]


def test_hub_reads_everything_again_after_a_pubsub_reconnect():
    """Changes published while the pub/sub connection was down must still reach the subscribers."""
    r = HubRig()
    a = r.conn()
    r.hub.subscribe(a, {"type": "presence_subscribe", "users": ["bob"]})
    r.turn()
    r.hub.subscriber.connected = False  # messages are lost meanwhile
    r.online("bob")
    assert frames(a, "presence") == []
    r.hub.subscriber.connected = True
    checked = []
    r.hub.on_reconnect = lambda: checked.append(True)
    r.hub.subscriber.simulate_reconnect()
    assert [f["online"] for f in frames(a, "presence")] == [True] and checked == [True]


def test_hub_reads_again_only_the_users_of_the_shard_that_came_back():
    """With one pub/sub connection per shard, a shard's reconnect must read its users again, not everyone."""
    r = HubRig()
    a = r.conn()
    r.hub.subscribe(a, {"type": "presence_subscribe", "users": ["bob", "carol"]})
    r.turn()
    r.hub.subscriber.connected = False  # both changes are missed
    r.online("bob")
    r.online("carol")
    r.hub.subscriber.connected = True
    before = r.registry.round_trips
    r.hub._resubscribed({pr.state_key("p:", "bob"), pr.liveness_channel("p:", "gw-1")})
    assert [(f["userId"], f["online"]) for f in frames(a, "presence")] == [("bob", True)]
    assert r.registry.round_trips - before == 1
    r.hub._resubscribed({pr.state_key("p:", "carol")})
    assert [(f["userId"], f["online"]) for f in frames(a, "presence")] == [("bob", True), ("carol", True)]


def test_liveness_channel_shares_the_gateways_hash_tag():
    """The processors ask PUBSUB NUMSUB on the shard of the gateway's key: the gateway must subscribe there."""
    from imcluster.registry import RedisKeys, hash_tag

    assert pr.liveness_channel("p:", "gw-1") == "p:WSALIVE##{gw-1}"
    assert hash_tag(pr.liveness_channel("p:", "gw-1")) == hash_tag(RedisKeys("p:").server("gw-1"))
    assert hash_tag(pr.state_key("p:", "bob")) == hash_tag(RedisKeys("p:").ucir("bob"))


def test_typing_gate_one_per_interval_per_connection_and_session():
    """A client sending typing on every key press must cost one frame a second per session."""
    clock = task.Clock()
    gate = TypingGate(1.0, clock)
    a, b = object(), object()
    assert gate.allow(a, "s1") and not gate.allow(a, "s1") and gate.allow(a, "s2") and gate.allow(b, "s1")
    clock.advance(0.99)
    assert not gate.allow(a, "s1")
    clock.advance(0.02)
    assert gate.allow(a, "s1")
    for i in range(200):
        clock.advance(1.0)
        gate.allow(a, f"x{i}")
    assert len(gate._last[a]) <= TypingGate.PRUNE_AT + 1, "memory per connection stays bounded"
    gate.forget(a)
    assert a not in gate._last
    assert TypingGate(0, clock).allow(a, "s1") and TypingGate(0, clock).allow(a, "s1")


# --- the liveness watch


def test_liveness_watch_reaps_a_gateway_whose_presence_connection_is_gone():
    """A gateway killed without exiting must be reaped after the grace, not after --server-ttl."""
    clock = task.Clock()
    clock.advance(1_764_160_000)
    registry = FakeRegistry("p:", clock=clock)
    tracker = pr.Tracker(registry, clock=clock)
    sub = registry.subscriber(lambda c, d: None)
    sub.start()
    sub.subscribe([pr.liveness_channel("p:", "gw1")])
    registry.register_server("gw1", INFO, 300)
    registry.register_server("gw2", INFO, 300)  # never seen subscribed: left to its TTL
    registry.add_connections("gw1", [("alice", "10.0.0.1", 1, META)])
    tracker.reconcile(["alice"])
    watch = LivenessWatch(registry, Reaper(registry, tracker), grace=3.0, clock=clock)
    assert watch.run().result == []
    sub.kill()
    assert watch.run().result == []
    clock.advance(2.0)
    registry.set_available(False)
    watch.run_once()  # Redis down: skipped, nothing decided
    registry.set_available(True)
    assert watch.run().result == []
    clock.advance(1.0)
    assert watch.run().result == ["gw1"]
    assert tracker.states(["alice"]).result[1]["alice"][1] is False
    assert registry.servers().result == {"gw2"}
    assert watch.run().result == []


# --- the processors' typing handler (fakes)


def test_typing_handler_routes_a_big_window_with_one_membership_lookup():
    """Hundreds of typing frames in one window must be routed (not overflow the stack) for one store call."""
    from imcluster.testing import FakeStore
    from tests.test_processor_service import GW1, GW2, Rig, frame_item, group

    class SlowStore(FakeStore):
        """PostgreSQL answers on a later turn: the window's items queue behind the query semaphore."""

        def session_members(self, session_ids):
            d = super().session_members(session_ids)
            return task.deferLater(rig.clock, 0.01, lambda: d)

    rig = Rig(batch_size=1000, store=SlowStore())
    rig.gateway(GW1)
    rig.gateway(GW2)
    group(rig, "g", "alice", "bob")
    a1, a2, b = rig.connect(GW1, "alice"), rig.connect(GW2, "alice"), rig.connect(GW2, "bob")
    e = rig.connect(GW1, "eve")
    items = [frame_item(a1, "alice", {"type": "typing", "sessionId": "g"}) for _ in range(400)]
    items.append(frame_item(e, "eve", {"type": "typing", "sessionId": "g", "id": 9}))
    items.append(frame_item(e, "eve", {"type": "typing", "sessionId": "nope"}))
    items.append(frame_item(a1, "alice", {"type": "typing", "sessionId": "p2p:alice:zed"}))
    before = len(rig.calls("session_members"))
    rig.send(*items)
    assert len(rig.calls("session_members")) - before == 1
    typing = {"type": "typing", "sessionId": "g", "userId": "alice"}
    assert rig.frames_to(b) == [typing] * 400
    # the sender's other device gets its 1:1 typing too
    assert rig.frames_to(a2) == [typing] * 400 + [{"type": "typing", "sessionId": "p2p:alice:zed", "userId": "alice"}]
    assert rig.frames_to(a1) == []
    errors = rig.frames_to(e)
    assert [(f["code"], f.get("ref")) for f in errors] == [("not_member", 9), ("no_session", None)]
    assert rig.unacked() == 0
    assert rig.store.calls and not [n for n, _ in rig.store.calls if n in ("store_messages", "begin_window")]

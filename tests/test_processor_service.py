"""ProcessorService on fakes (FakeBus, FakeRegistry, FakeStore) and a Clock.

Windows, retries, poison, sync paging and the reply/route rules where time
and failures are controlled. The same flows on the real services are in
test_processor_integration.py.
"""

from __future__ import annotations

import json

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from imcluster import metrics
from imcluster.config import PROCESSOR, load_config
from imcluster.processor.filters import KeywordFilter, Verdict
from imcluster.processor.reaper import Reaper
from imcluster.processor.service import ProcessorService
from imcluster.registry import RegistryUnavailable
from imcluster.testing import FakeBroker, FakeBus, FakeRegistry, FakeStore

NS = "pt"
GW1, GW2 = "gw-one", "gw-two"


def config(**changes):
    base = load_config(PROCESSOR, {}, environ={})
    values = dict(batch_size=100, batch_wait=0.01, retry_delay=1.0, retry_max_delay=8.0, max_attempts=3,
                  sync_page_size=10, namespace=NS, filters=[], unroutable_hold=5.0)
    values.update(changes)
    return base.replace(**values)


class Rig:
    """A started ProcessorService on fakes; the test plays the gateways."""

    def __init__(self, filters=(), store=None, **changes):
        self.clock = Clock()
        self.clock.advance(1_764_160_000)
        self.broker = FakeBroker(self.clock)
        self.bus = FakeBus(NS, clock=self.clock, broker=self.broker)
        self.bus.startService()
        self.gateway_bus = FakeBus(NS, clock=self.clock, broker=self.broker, name="gateways")
        self.gateway_bus.startService()
        self.registry = FakeRegistry("p:", clock=self.clock)
        self.store = store if store is not None else FakeStore()
        self.reaper = Reaper(self.registry)
        self.config = config(**changes)
        self.svc = ProcessorService(self.config, self.bus, self.registry, self.store, list(filters),
                                    reaper=self.reaper, clock=self.clock)
        self.svc.startService()
        assert self.svc.ready.called
        self.inbox = {}  # gateway uuid -> [body, ...]
        self.ports = 0

    # --- the test as gateways

    def gateway(self, uuid, queue=True, ttl=3600.0):
        """Register gateway ``uuid`` in the registry (and give it a queue unless ``queue`` is False)."""
        self.registry.register_server(uuid, {"ip": "127.0.0.1", "port": 1, "tcpPort": 2, "startedAt": 0}, ttl)
        self.inbox.setdefault(uuid, [])
        if queue:
            self.gateway_bus.consume(self.gateway_bus.gateway_queue(uuid),
                                     lambda m, u=uuid: (self.inbox[u].append(json.loads(m.body)), m.ack()))

    def connect(self, uuid, user):
        """A connection of ``user`` on gateway ``uuid``: its connId."""
        self.ports += 1
        self.registry.add_connections(uuid, [(user, "10.0.0.1", self.ports, {"device": None})])
        return f"{uuid}##10.0.0.1##{self.ports}"

    def send(self, *items, settle=True):
        """Publish one queue message holding ``items`` (dicts), as a gateway does."""
        body = json.dumps({"v": 1, "items": list(items)}).encode()
        self.gateway_bus.publish(self.gateway_bus.server_key(), body)
        if settle:
            self.settle()

    def settle(self, seconds=0.05):
        for _ in range(5):
            self.clock.advance(seconds)

    def frames_to(self, conn_id):
        """Every frame delivered to ``conn_id``, in order."""
        out = []
        for body in self.inbox.get(conn_id.split("##")[0], []):
            for item in body["items"]:
                if conn_id in item["connIds"]:
                    out.extend(item["frames"])
        return out

    def unacked(self):
        return len(self.svc.consumer.unacked) if self.svc.consumer else 0

    def dead(self):
        return self.bus.queue_depth(f"{NS}.dead")

    def calls(self, name):
        return [args for n, args in self.store.calls if n == name]


def frame_item(conn_id, user, frame):
    return {"kind": "frame", "userId": user, "serverId": conn_id.split("##")[0], "connId": conn_id,
            "ts": 1_764_160_000_000, "frame": frame}


def message(conn_id, user, cmid, session, body=None):
    return frame_item(conn_id, user, {"type": "message", "clientMsgId": cmid, "sessionId": session,
                                      "body": {"text": "hi"} if body is None else body})


def sync_item(conn_id, user):
    return {"kind": "sync", "userId": user, "serverId": conn_id.split("##")[0], "connId": conn_id, "ts": 0}


def group(rig, sid, *members):
    rig.store.create_session(members[0], list(members[1:]), sid)


@pytest.fixture
def rig():
    r = Rig()
    r.gateway(GW1)
    r.gateway(GW2)
    group(r, "g", "alice", "bob", "carol")
    return r


# --- reply and route --------------------------------------------------------------------


def test_message_is_answered_and_routed_to_every_other_connection(rig):
    """Members would miss messages, or the sender would get its own back, if routing were wrong."""
    a1, a2 = rig.connect(GW1, "alice"), rig.connect(GW2, "alice")
    b1 = rig.connect(GW1, "bob")
    rig.send(message(a1, "alice", "c1", "g"))
    reply = rig.frames_to(a1)
    assert reply == [{"type": "message_reply", "ok": True, "clientMsgId": "c1", "msgId": "1", "sessionId": "g",
                      "seq": 1, "ts": reply[0]["ts"]}]
    sent = {"type": "message_send", "msgId": "1", "sessionId": "g", "seq": 1, "from": "alice",
            "clientMsgId": "c1", "body": {"text": "hi"}, "ts": reply[0]["ts"]}
    assert rig.frames_to(b1) == [sent]
    assert rig.frames_to(a2) == [sent]  # the sender's other device
    # bob was routed (sending), carol is offline (pending)
    assert rig.store.sends[("bob", 1)] == "sending"
    assert rig.store.sends[("carol", 1)] == "pending"
    assert rig.unacked() == 0


def test_a_window_costs_one_lookup_and_one_publish_per_gateway(rig, monkeypatch):
    """A group burst would cost a Redis round trip and an AMQP publish per message without batching."""
    from imcluster import protocol
    encoded = []
    real_encode = protocol.encode
    monkeypatch.setattr(protocol, "encode", lambda f: (encoded.append(f["type"]), real_encode(f))[1])
    a1 = rig.connect(GW1, "alice")
    b1, c2 = rig.connect(GW1, "bob"), rig.connect(GW2, "carol")
    rig.connect(GW2, "bob")
    before = rig.registry.round_trips
    rig.send(*[message(a1, "alice", f"c{n}", "g") for n in range(50)])
    assert len(rig.calls("begin_window")) == 1
    # connections_of of the recipients while the store holds its locks (their rows are
    # inserted sending), then the routing's one routes lookup (connections and live gateways)
    assert rig.registry.round_trips - before == 2
    assert len(rig.inbox[GW1]) == 1 and len(rig.inbox[GW2]) == 1
    assert [f["seq"] for f in rig.frames_to(b1)] == list(range(1, 51))
    assert [f["seq"] for f in rig.frames_to(c2)] == list(range(1, 51))
    # consecutive frames for the same connections share one item
    assert len(rig.inbox[GW2][0]["items"]) == 1
    # each delivery frame is encoded once, whatever its connections and gateways
    assert encoded.count("message_send") == 50


def test_batch_waits_for_batch_wait_or_batch_size():
    """Messages would sit unstored, or every message would cost a transaction, if windows were wrong."""
    r = Rig(batch_size=5, batch_wait=1.0)
    r.gateway(GW1)
    group(r, "g", "alice", "bob")
    a1 = r.connect(GW1, "alice")
    r.send(message(a1, "alice", "x1", "g"), settle=False)
    r.send(message(a1, "alice", "x2", "g"), settle=False)
    r.clock.advance(0.5)
    assert r.calls("begin_window") == []
    r.clock.advance(0.5)
    assert [len(args[0]) for args in r.calls("begin_window")] == [2]
    for n in range(5):
        r.send(message(a1, "alice", f"y{n}", "g"), settle=False)
    r.clock.advance(0)
    assert [len(args[0]) for args in r.calls("begin_window")] == [2, 5]


# --- failures ------------------------------------------------------------------------------


def test_store_down_retries_with_backoff_and_acks_only_after_commit(rig):
    """A PostgreSQL outage would lose messages (early ack) or spin the CPU (hot loop)."""
    a1 = rig.connect(GW1, "alice")
    rig.store.available = False
    retries = metrics.RETRIES._value.get()
    rig.send(message(a1, "alice", "c1", "g"))
    for _ in range(30):
        rig.clock.advance(1.0)
    attempts = len(rig.calls("begin_window"))
    assert 3 <= attempts <= 8, attempts  # 1, 2, 4, 8, 8, ... seconds apart
    assert metrics.RETRIES._value.get() - retries == attempts
    assert rig.unacked() == 1 and rig.frames_to(a1) == []
    rig.store.available = True
    rig.clock.advance(10.0)
    assert [f["seq"] for f in rig.frames_to(a1)] == [1]
    assert rig.unacked() == 0


def test_a_retry_resumes_where_the_window_stopped(rig):
    """After an outage between commit and routing the sender would get two replies."""
    a1 = rig.connect(GW1, "alice")
    b1 = rig.connect(GW1, "bob")
    real = rig.registry.routes
    failures = []

    def flaky(*args, **kw):
        # the routing's lookup, after the commit
        if not failures:
            failures.append(args)
            return defer.fail(RegistryUnavailable("down"))
        return real(*args, **kw)

    rig.registry.routes = flaky
    rig.send(message(a1, "alice", "c1", "g"))
    rig.clock.advance(3.0)
    assert failures and rig.unacked() == 0
    assert len(rig.calls("begin_window")) == 1
    assert [f["type"] for f in rig.frames_to(a1)] == ["message_reply"]
    assert [f["type"] for f in rig.frames_to(b1)] == ["message_send"]
    assert rig.store.sends[("bob", 1)] == "sending"


class PoisonStore(FakeStore):
    """A store that fails (not transiently) on any batch holding clientMsgId 'boom'."""

    def begin_window(self, batch):
        if any(m.client_msg_id == "boom" for m in batch):
            self.calls.append(("begin_window", (list(batch),)))
            return defer.fail(ValueError("boom"))
        return super().begin_window(batch)


def test_poison_message_is_dead_lettered_and_does_not_block_its_batch_mates():
    """One message that always fails would block the queue for everyone behind it."""
    r = Rig(store=PoisonStore(), batch_wait=0.5, poison_after=10.0)
    r.gateway(GW1)
    group(r, "g", "alice", "bob")
    a1 = r.connect(GW1, "alice")
    dead = metrics.DEAD_LETTERED._value.get()
    r.send(message(a1, "alice", "ok1", "g"), settle=False)
    r.send(message(a1, "alice", "boom", "g"), settle=False)
    r.send(message(a1, "alice", "ok2", "g"), settle=False)
    r.clock.advance(0.5)
    r.clock.advance(0)
    assert [f["clientMsgId"] for f in r.frames_to(a1)] == ["ok1", "ok2"]
    # while the poison waits for its next attempt, new messages are not held up
    r.send(message(a1, "alice", "ok3", "g"), settle=False)
    r.clock.advance(0.5)
    assert [f["clientMsgId"] for f in r.frames_to(a1)] == ["ok1", "ok2", "ok3"]
    assert r.dead() == 0
    for _ in range(9):
        r.clock.advance(1.0)
    assert r.dead() == 0  # not before poison_after
    for _ in range(10):
        r.clock.advance(1.0)
    replies = r.frames_to(a1)
    assert [f["clientMsgId"] for f in replies] == ["ok1", "ok2", "ok3", "boom"]
    assert replies[-1]["ok"] is False and replies[-1]["error"]["code"] == "rejected"
    assert r.dead() == 1 and r.unacked() == 0
    assert metrics.DEAD_LETTERED._value.get() - dead == 1
    # the poison message alone was tried a few times (backoff), then never again
    alone = [args for args in r.calls("begin_window") if [m.client_msg_id for m in args[0]] == ["boom"]]
    assert 2 <= len(alone) <= 6
    for _ in range(30):
        r.clock.advance(1.0)
    assert len([args for args in r.calls("begin_window") if [m.client_msg_id for m in args[0]] == ["boom"]]) \
        == len(alone)


def test_a_queue_message_that_is_not_a_batch_is_dead_lettered_at_once(rig):
    """Garbage on the queue would be redelivered for ever."""
    rig.gateway_bus.publish(rig.gateway_bus.server_key(), b"not json")
    rig.gateway_bus.publish(rig.gateway_bus.server_key(), b'{"v":2,"items":[]}')
    rig.settle()
    assert rig.dead() == 2 and rig.unacked() == 0


def test_one_bad_item_is_answered_and_its_batch_mates_go_on(rig):
    """A malformed frame would take the good frames of its batch down with it."""
    a1 = rig.connect(GW1, "alice")
    bad = frame_item(a1, "alice", {"type": "message", "clientMsgId": "c0", "sessionId": "g"})  # no body
    worse = frame_item(a1, "alice", {"type": "history"})  # no sessionId, no clientMsgId
    nameless = {"kind": "frame", "userId": "alice"}  # names no connection: dropped
    rig.send(bad, worse, nameless, message(a1, "alice", "c1", "g"))
    frames = rig.frames_to(a1)
    assert frames[0]["type"] == "message_reply" and frames[0]["ok"] is False
    assert frames[0]["error"]["code"] == "bad_frame" and frames[0]["clientMsgId"] == "c0"
    assert frames[1]["type"] == "error" and frames[1]["code"] == "bad_frame"
    assert frames[2]["ok"] is True and frames[2]["seq"] == 1
    assert rig.unacked() == 0 and rig.dead() == 0


def test_store_refusals_are_answered_per_message(rig):
    """A not_member message would fail the members' messages stored with it."""
    a1 = rig.connect(GW1, "alice")
    z1 = rig.connect(GW1, "zed")
    rig.send(message(z1, "zed", "z", "g"), message(a1, "alice", "a", "g"), message(a1, "alice", "n", "nope"))
    assert rig.frames_to(z1)[0]["error"]["code"] == "not_member"
    a = rig.frames_to(a1)
    assert a[0]["ok"] is True and a[1]["error"]["code"] == "no_session"


# --- duplicates ------------------------------------------------------------------------------


def test_duplicate_is_answered_with_the_original_and_routed_only_to_undelivered(rig):
    """A resend would create a second message, or re-deliver to users who already acknowledged it."""
    a1 = rig.connect(GW1, "alice")
    b1, c1 = rig.connect(GW1, "bob"), rig.connect(GW1, "carol")
    rig.send(message(a1, "alice", "c1", "g", {"text": "first"}))
    first = rig.frames_to(a1)[0]
    rig.send(frame_item(b1, "bob", {"type": "message_send_reply", "msgIds": [first["msgId"]]}))
    assert rig.store.sends[("bob", 1)] == "delivered"
    rig.send(message(a1, "alice", "c1", "g", {"text": "second"}))
    again = rig.frames_to(a1)[1]
    assert (again["msgId"], again["seq"], again["ts"]) == (first["msgId"], first["seq"], first["ts"])
    assert len(rig.frames_to(b1)) == 1  # acknowledged: not again
    assert [f["body"] for f in rig.frames_to(c1)] == [{"text": "first"}, {"text": "first"}]
    assert len(rig.store.messages) == 1


# --- acknowledgements, queries ---------------------------------------------------------------


def test_acks_of_a_window_are_one_statement_and_others_ids_are_ignored(rig):
    """Acknowledgements would cost a statement each, or let a user acknowledge for another."""
    a1, b1, c1 = rig.connect(GW1, "alice"), rig.connect(GW1, "bob"), rig.connect(GW1, "carol")
    rig.send(message(a1, "alice", "m1", "g"), message(a1, "alice", "m2", "g"))
    rig.send(frame_item(b1, "bob", {"type": "message_send_reply", "msgIds": ["1"]}),
             frame_item(c1, "carol", {"type": "message_send_reply", "msgIds": ["1", "2", "999", "x"]}),
             frame_item(a1, "alice", {"type": "message_send_reply", "msgIds": ["2"]}))
    assert len(rig.calls("mark_delivered_receipts")) == 1
    assert rig.store.sends == {("bob", 1): "delivered", ("bob", 2): "sending",
                               ("carol", 1): "delivered", ("carol", 2): "delivered"}


def test_history_read_and_session_create_are_answered(rig):
    """Clients would wait for ever for history, receipts or session replies."""
    a1, a2 = rig.connect(GW1, "alice"), rig.connect(GW2, "alice")
    b1 = rig.connect(GW1, "bob")
    z1 = rig.connect(GW2, "zed")
    rig.send(*[message(a1, "alice", f"m{n}", "g") for n in range(5)])
    rig.send(frame_item(b1, "bob", {"type": "history", "sessionId": "g", "beforeSeq": 5, "limit": 2, "id": "h"}),
             frame_item(z1, "zed", {"type": "history", "sessionId": "g"}),
             frame_item(z1, "zed", {"type": "history", "sessionId": "nope", "id": 7}),
             frame_item(b1, "bob", {"type": "read", "sessionId": "g", "seq": 99}),
             frame_item(z1, "zed", {"type": "session_create", "id": "r1", "members": ["bob"]}),
             frame_item(z1, "zed", {"type": "session_create", "id": "r2", "members": ["bob"], "sessionId": "g"}))
    b = rig.frames_to(b1)
    history = [f for f in b if f["type"] == "history_reply"][0]
    assert history["id"] == "h" and [m["seq"] for m in history["messages"]] == [3, 4]
    z = rig.frames_to(z1)
    assert z[0] == {"type": "error", "code": "not_member", "message": z[0]["message"]}
    assert z[1]["code"] == "no_session" and z[1]["ref"] == 7
    created = z[2]
    assert created["type"] == "session_reply" and created["id"] == "r1" and created["ok"] is True
    assert created["members"] == ["bob", "zed"] and created["sessionId"]
    assert z[3] == {"type": "session_reply", "id": "r2", "ok": False,
                    "error": {"code": "conflict", "message": z[3]["error"]["message"]}}
    receipt = {"type": "read_receipt", "sessionId": "g", "userId": "bob", "seq": 5}
    assert rig.frames_to(a1)[-1] == receipt and rig.frames_to(a2)[-1] == receipt
    assert receipt not in b  # not to the connection that read


# --- moderation ----------------------------------------------------------------------------------


def test_moderation_rejects_and_replaces():
    """Forbidden words would be stored and delivered, or a clean message refused."""
    class Shout:
        name = "shout"

        def check(self, message):
            body = message["body"]
            if isinstance(body, dict) and body.get("text") == "quiet":
                return defer.succeed(Verdict.replace({"text": "QUIET"}))
            return Verdict.accept()

    r = Rig(filters=[KeywordFilter(["darn"]), Shout()])
    r.gateway(GW1)
    group(r, "g", "alice", "bob")
    a1, b1 = r.connect(GW1, "alice"), r.connect(GW1, "bob")
    r.send(message(a1, "alice", "bad", "g", {"text": "well DARN it"}),
           message(a1, "alice", "ok", "g", {"text": "quiet"}))
    replies = r.frames_to(a1)
    assert replies[0]["ok"] is False and replies[0]["error"]["code"] == "rejected"
    assert replies[1]["ok"] is True and replies[1]["seq"] == 1
    assert [f["body"] for f in r.frames_to(b1)] == [{"text": "QUIET"}]
    assert len(r.store.messages) == 1


# --- sync --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backlog", [25, 20, 0])
def test_sync_sends_pages_then_sync_done_with_the_count(rig, backlog):
    """A reconnecting user would miss messages, or be told a wrong count, or load all at once."""
    a1 = rig.connect(GW1, "alice")
    rig.send(*[message(a1, "alice", f"m{n}", "g") for n in range(backlog)])
    b1 = rig.connect(GW2, "bob")
    rig.send(sync_item(b1, "bob"))
    pages = [item["frames"] for body in rig.inbox[GW2] for item in body["items"]]
    assert [len(p) for p in pages] == {25: [10, 10, 6], 20: [10, 10, 1], 0: [1]}[backlog]
    frames = [f for p in pages for f in p]
    assert frames[-1] == {"type": "sync_done", "count": backlog}
    assert [f["seq"] for f in frames[:-1]] == list(range(1, backlog + 1))
    assert all(len(args[2:]) == 0 or args[2] == 10 for args in rig.calls("undelivered_page"))
    assert all(rig.store.sends[("bob", n)] == "sending" for n in range(1, backlog + 1))
    assert rig.unacked() == 0


def test_syncs_of_one_queue_message_read_their_first_pages_with_one_statement(rig):
    """Every new connection's sync would cost its own query (issue 14: setup rate), or get another's rows."""
    a1 = rig.connect(GW1, "alice")
    rig.send(*[message(a1, "alice", f"m{n}", "g") for n in range(12)])
    rig.store.mark_delivered([("carol", ["1", "2"])])
    conns = {c: u for c, u in ((rig.connect(GW2, "bob"), "bob"), (rig.connect(GW2, "carol"), "carol"),
                              (rig.connect(GW1, "bob"), "bob"), (rig.connect(GW1, "zed"), "zed"))}
    conns.update({rig.connect(GW2, f"u{n}"): f"u{n}" for n in range(8)})
    before = len(rig.store.calls)
    rig.send(*[sync_item(c, u) for c, u in conns.items()])
    made = [name for name, _ in rig.store.calls[before:]]
    assert made.count("undelivered_first_pages") == 1
    # only second pages are read one by one: bob's (two connections, 12 rows) and carol's (10 rows: a full page)
    assert made.count("undelivered_page") == 3
    for conn, user in conns.items():
        frames = rig.frames_to(conn)
        expected = {"bob": list(range(1, 13)), "carol": list(range(3, 13))}.get(user, [])
        assert [f["seq"] for f in frames[:-1]] == expected, user
        assert frames[-1] == {"type": "sync_done", "count": len(expected)}
    assert rig.unacked() == 0


def test_sync_waits_out_a_store_outage(rig):
    """A sync request during a PostgreSQL outage would be dropped: the user never gets sync_done."""
    b1 = rig.connect(GW1, "bob")
    rig.store.available = False
    rig.send(sync_item(b1, "bob"))
    rig.clock.advance(20)
    assert rig.frames_to(b1) == [] and rig.unacked() == 1
    rig.store.available = True
    rig.clock.advance(10)
    assert rig.frames_to(b1) == [{"type": "sync_done", "count": 0}]
    assert rig.unacked() == 0


def test_sync_to_a_live_gateway_whose_queue_is_briefly_gone_waits_for_it(rig):
    """After a broker restart a sync handled before the gateway re-declared its queue was dropped:
    the client never got sync_done (ARCHITECTURE.md: a live gateway keeps its key and comes back)."""
    rig.gateway("gw-back", queue=False)  # alive (its WSSERVER_ key is there), queue not declared yet
    b1 = rig.connect("gw-back", "bob")
    rig.send(sync_item(b1, "bob"))
    rig.clock.advance(3)
    assert rig.frames_to(b1) == [] and rig.unacked() == 1  # held, not dropped
    rig.gateway_bus.consume(rig.gateway_bus.gateway_queue("gw-back"),
                            lambda m: (rig.inbox["gw-back"].append(json.loads(m.body)), m.ack()))
    rig.clock.advance(10)
    assert rig.frames_to(b1) == [{"type": "sync_done", "count": 0}]
    assert rig.unacked() == 0


def test_sync_to_a_gateway_whose_key_is_gone_ends(rig):
    """A sync for a connection of a dead gateway would be retried for ever."""
    rig.gateway("gw-gone", queue=False, ttl=2.0)
    b1 = rig.connect("gw-gone", "bob")
    rig.clock.advance(3)  # its WSSERVER_ key expired
    rig.send(sync_item(b1, "bob"))
    assert rig.frames_to(b1) == [] and rig.unacked() == 0


# --- gateways that vanished ---------------------------------------------------------------------------


def test_unroutable_gateway_is_held_back_and_reaped_once_its_key_is_gone(rig):
    """Deliveries to a dead gateway would be retried for ever, or its users stay 'online' for ever."""
    rig.gateway("gw-dead", queue=False, ttl=30.0)  # registered, but its queue is gone: it crashed
    a1 = rig.connect(GW1, "alice")
    rig.connect("gw-dead", "bob")
    rig.send(message(a1, "alice", "m1", "g"))
    assert rig.frames_to(a1)[0]["ok"] is True
    assert rig.svc.router.is_dead("gw-dead")
    # not routed: undelivered (inserted sending, his connection was registered), comes with the next sync
    assert rig.store.sends[("bob", 1)] == "sending"
    published = len(rig.bus.published)
    rig.send(message(a1, "alice", "m2", "g"))
    assert len(rig.bus.published) == published + 1  # only GW1: the dead one is skipped
    # its WSSERVER_ key expires: the reaper removes its entries
    rig.clock.advance(31)
    rig.svc.router.mark_dead("gw-dead")
    rig.settle()
    assert rig.registry.store.keys("p:UCIR##{bob}") == []
    assert "gw-dead" not in rig.registry.store.execute("SMEMBERS", "p:WSSERVERS")


# --- stopping -------------------------------------------------------------------------------------------


def test_stop_finishes_the_window_in_flight_and_leaves_the_rest_for_redelivery(rig):
    """SIGTERM would lose the window being stored, or ack messages it never handled."""
    a1 = rig.connect(GW1, "alice")
    gate = defer.Deferred()
    real = rig.store.begin_window
    rig.store.begin_window = lambda batch: gate.addCallback(lambda _: real(batch))
    rig.send(message(a1, "alice", "m1", "g"))
    rig.send(message(a1, "alice", "m2", "g"))
    assert rig.unacked() == 2
    stopped = rig.svc.stopService()
    assert not stopped.called
    gate.callback(None)
    assert stopped.called
    assert [f["clientMsgId"] for f in rig.frames_to(a1)] == ["m1"]
    assert rig.bus.queue_depth(f"{NS}.processor") == 1  # m2: back on the queue for another processor


def test_redis_down_holds_the_window_until_it_is_back(rig):
    """A Redis outage would drop replies and deliveries of messages already stored."""
    a1, b1 = rig.connect(GW1, "alice"), rig.connect(GW1, "bob")
    rig.registry.set_available(False)
    rig.send(message(a1, "alice", "m1", "g"))
    for _ in range(10):
        rig.clock.advance(1.0)
    # who is online is asked while the store holds its locks: each try is rolled back
    assert len(rig.calls("begin_window")) > 1 and rig.store.messages == {}
    assert rig.frames_to(a1) == [] and rig.unacked() == 1
    rig.registry.set_available(True)
    rig.clock.advance(10.0)
    assert [f["type"] for f in rig.frames_to(a1)] == ["message_reply"]
    assert [f["type"] for f in rig.frames_to(b1)] == ["message_send"]
    [msg_id] = rig.store.messages  # ids of rolled-back tries are spent, as with nextval
    assert rig.store.sends[("bob", msg_id)] == "sending" and rig.unacked() == 0


# --- HTTP API items (docs/internals.rst) ------------------------------------------------------------


def test_api_items_are_trusted_only_from_api_connections_and_answered_without_wsserver(rig):
    """Server-side publish would fail (imapi never registers), or anyone could skip the member check."""
    api = "api-uuid"
    rig.inbox[api] = []
    consumers = []
    rig.gateway_bus.consume(rig.gateway_bus.gateway_queue(api),
                            lambda m: (rig.inbox[api].append(json.loads(m.body)), m.ack())).addCallback(
        consumers.append)
    b1 = rig.connect(GW1, "bob")
    a1 = rig.connect(GW1, "alice")
    conn = f"{api}##api##1"
    system = dict(message(conn, "system", "sys-1", "g", {"t": "hello"}), trusted=True, ts=1_764_160_123_456)
    spoof = dict(message(a1, "zed", "z-1", "g"), trusted=True)  # a gateway item: trusted is ignored
    rig.send(system, spoof)
    [reply] = rig.frames_to(conn)
    assert reply == {"type": "message_reply", "ok": True, "clientMsgId": "sys-1", "msgId": "1", "sessionId": "g",
                     "seq": 1, "ts": 1_764_160_123_456, "duplicate": False}
    refused, sent = rig.frames_to(a1)  # replies come first in a gateway's batch
    assert sent["type"] == "message_send" and sent["from"] == "system"  # every member, alice included
    assert refused["error"]["code"] == "not_member" and "duplicate" not in refused
    assert [f["from"] for f in rig.frames_to(b1)] == ["system"]
    rig.send(system)
    assert rig.frames_to(conn)[1] == dict(reply, duplicate=True)
    # imapi gone: its replies are dropped, and it is not taken for a dead gateway
    consumers[0].cancel()  # its auto-delete queue goes with it
    published = len(rig.bus.published)
    rig.send(dict(message(conn, "system", "sys-2", "g"), trusted=True))
    assert len(rig.store.messages) == 2 and len(rig.bus.published) == published + 1  # GW1 only
    assert not rig.svc.router.is_dead(api) and rig.unacked() == 0


class GatedStore(FakeStore):
    """A store whose batches wait for the test: ``open(n)`` lets batch ``n`` (0-based) go on."""

    def __init__(self):
        super().__init__()
        self.gates = []

    def begin_window(self, batch):
        gate = defer.Deferred()
        self.gates.append(gate)
        return gate.addCallback(lambda _: super(GatedStore, self).begin_window(batch))


@pytest.mark.parametrize("windows, batch_size, running", [(1, 1, 1), (2, 1, 2), (2, 100, 1)])
def test_windows_in_flight_keep_seq_and_delivery_order(windows, batch_size, running):
    """A second window running beside a slow first one would reorder a sender's messages or deliveries.

    (A second window starts beside one still storing only when a full batch waits.)
    """
    store = GatedStore()
    r = Rig(store=store, windows=windows, batch_size=batch_size)
    r.gateway(GW1)
    group(r, "g", "alice", "bob")
    a1, b1 = r.connect(GW1, "alice"), r.connect(GW1, "bob")
    r.send(message(a1, "alice", "m1", "g"))  # window 1: waits in the store
    r.send(message(a1, "alice", "m2", "g"))  # window 2 (with windows=2) starts beside it
    r.settle()
    assert len(r.svc._running) == running
    # window 2 does not even begin its transaction before window 1 holds its locks
    assert len(store.gates) == 1
    store.gates[0].callback(None)
    r.settle()
    assert len(store.gates) == 2
    store.gates[1].callback(None)
    r.settle()
    replies = r.frames_to(a1)
    assert [(f["clientMsgId"], f["seq"]) for f in replies] == [("m1", 1), ("m2", 2)]
    assert [f["seq"] for f in r.frames_to(b1)] == [1, 2]
    assert r.unacked() == 0 and not r.svc._running



def test_one_to_one_recipients_are_looked_up_while_the_store_takes_its_locks():
    """A 1:1 window would wait for its Redis lookup after its locks instead of beside them (latency)."""
    store = GatedStore()
    r = Rig(store=store)
    r.gateway(GW1)
    a1, b1 = r.connect(GW1, "alice"), r.connect(GW1, "bob")
    before = r.registry.round_trips
    r.send(message(a1, "alice", "m1", "p2p:alice:bob"))
    # the store has not locked anything yet: bob (named by the session id) is asked already
    assert len(store.gates) == 1 and r.registry.round_trips - before == 1
    store.gates[0].callback(None)
    r.settle()
    assert r.registry.round_trips - before == 2  # then only the routing's one routes lookup
    [msg_id] = store.messages
    assert store.sends[("bob", msg_id)] == "sending"  # no mark_sending needed
    assert store.calls[-1][0] != "mark_sending"
    assert [f["type"] for f in r.frames_to(b1)] == ["message_send"] and r.unacked() == 0


# --- events in the session's order, delivery receipts (PROTOCOL.md 1.1) -------------------------


def _api_item(user, frame, trusted=True):
    conn = "0f0c2a4e-0000-4000-8000-0000000000aa##api##1"
    item = frame_item(conn, user, frame)
    item["trusted"] = trusted
    return item


def test_recall_and_edit_are_answered_and_routed_after_the_window_messages(rig):
    """A recall or an edit would not reach the members, or arrive before the message stored beside it."""
    a1, a2, b1 = rig.connect(GW1, "alice"), rig.connect(GW2, "alice"), rig.connect(GW1, "bob")
    rig.send(message(a1, "alice", "m1", "g"))
    [m1] = [f for f in rig.frames_to(a1) if f["type"] == "message_reply"]
    rig.send(message(a1, "alice", "m2", "g"),
             frame_item(a1, "alice", {"type": "recall", "id": "r", "msgId": m1["msgId"]}),
             frame_item(b1, "bob", {"type": "edit", "id": "e", "msgId": m1["msgId"], "body": 1}))
    replies = {f["type"]: f for f in rig.frames_to(a1) + rig.frames_to(b1) if f["type"].endswith("_reply")}
    assert replies["recall_reply"]["ok"] is True and replies["recall_reply"]["seq"] == 3
    assert replies["edit_reply"]["error"]["code"] == "not_allowed"
    got = [(f["seq"], f.get("kind")) for f in rig.frames_to(b1) if f["type"] == "message_send"]
    assert got == [(1, None), (2, None), (3, "recall")]
    assert [(f["seq"], f.get("kind")) for f in rig.frames_to(a2) if f["type"] == "message_send"] == got
    assert rig.store.messages[int(m1["msgId"])]["recalled"] is True


def test_members_frames_come_only_from_an_imapi(rig):
    """A client could change a group's members by sending imapi's frame through a gateway."""
    a1, b1 = rig.connect(GW1, "alice"), rig.connect(GW1, "bob")
    frame = {"type": "members", "id": "m", "sessionId": "g", "remove": ["bob"], "clientMsgId": "k1"}
    rig.send(frame_item(a1, "alice", frame))
    assert [f["code"] for f in rig.frames_to(a1) if f["type"] == "error"] == ["bad_frame"]
    assert "bob" in rig.store.sessions["g"]["members"]
    rig.send(_api_item("alice", frame))
    assert "bob" not in rig.store.sessions["g"]["members"]
    [removal] = [f for f in rig.frames_to(b1) if f["type"] == "message_send"]
    assert removal["kind"] == "members" and removal["body"] == {"added": [], "removed": ["bob"]}
    rig.send(message(a1, "alice", "after", "g"))
    assert [f for f in rig.frames_to(b1) if f["type"] == "message_send"] == [removal]


def test_acks_in_a_p2p_session_send_the_sender_a_delivery_receipt(rig):
    """The sender of a 1:1 message would never learn that the other phone got it."""
    a1, a2, b1 = rig.connect(GW1, "alice"), rig.connect(GW2, "alice"), rig.connect(GW1, "bob")
    rig.send(message(a1, "alice", "p1", "p2p:alice:bob"), message(a1, "alice", "p2", "p2p:alice:bob"))
    ids = [f["msgId"] for f in rig.frames_to(b1) if f["type"] == "message_send"]
    rig.send(frame_item(b1, "bob", {"type": "message_send_reply", "msgIds": ids}))
    want = {"type": "delivery_receipt", "sessionId": "p2p:alice:bob", "userId": "bob", "msgIds": ids}
    for conn in (a1, a2):
        assert [f for f in rig.frames_to(conn) if f["type"] == "delivery_receipt"] == [want]
    assert [f for f in rig.frames_to(b1) if f["type"] == "delivery_receipt"] == []
    rig.send(frame_item(b1, "bob", {"type": "message_send_reply", "msgIds": ids}))  # again: nothing new
    assert len([f for f in rig.frames_to(a1) if f["type"] == "delivery_receipt"]) == 1


def test_edits_pass_the_moderation_filters():
    """An edit would smuggle in what moderation refuses in a message."""
    class Shout:
        name = "shout"

        def check(self, message):
            if message["body"] == {"text": "quiet"}:
                return defer.succeed(Verdict.replace({"text": "QUIET"}))
            return Verdict.accept()

    r = Rig(filters=[KeywordFilter(["darn"]), Shout()])
    r.gateway(GW1)
    group(r, "g", "alice", "bob")
    a1, b1 = r.connect(GW1, "alice"), r.connect(GW1, "bob")
    r.send(message(a1, "alice", "m", "g", {"text": "fine"}))
    msg_id = r.frames_to(a1)[0]["msgId"]
    r.send(frame_item(a1, "alice", {"type": "edit", "id": 1, "msgId": msg_id, "body": {"text": "darn"}}),
           frame_item(a1, "alice", {"type": "edit", "id": 2, "msgId": msg_id, "body": {"text": "quiet"}}))
    replies = {f["id"]: f for f in r.frames_to(a1) if f["type"] == "edit_reply"}
    assert replies[1]["ok"] is False and replies[1]["error"]["code"] == "rejected"
    assert replies[2]["ok"] is True
    assert [f["body"] for f in r.frames_to(b1) if f.get("kind") == "edit"] == [{"text": "QUIET"}]
    assert r.store.messages[int(msg_id)]["body"] == {"text": "QUIET"}

"""Calls to business servers (HTTP-API.md): moderation service, webhooks, push requests.

The real ProcessorService on the real RabbitMQ, Redis and PostgreSQL (the
rig of tests/test_processor_integration.py), with a fake business server in
the test's process (tests/support/business.py): the shipped example
moderation server and a webhook receiver that checks every signature.
"""

from __future__ import annotations

import json
import time

import pytest_twisted
from twisted.internet import endpoints, reactor

from imcluster.processor.business import HTTPCaller, ModerationService, Outgoing, WebhookService
from imcluster.store import Incoming
from tests.support.business import BusinessServer
from tests.support.waiting import sleep
from tests.test_processor_integration import (  # noqa: F401 (fixtures)
    eventually, frame, message, processor_config, rig, rows)


@pytest_twisted.async_yield_fixture
async def biz():
    server = await BusinessServer().start()
    yield server
    await server.stop()


async def _closed_port_url() -> str:
    """The URL of a port nobody listens on (a moderation service that is down)."""
    from twisted.web import resource, server

    port = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        server.Site(resource.Resource()))
    n = port.getHost().port
    await port.stopListening()
    return f"http://127.0.0.1:{n}/moderate"


def _moderator(url, secret="s3cret", timeout=2.0, failure="reject"):
    return ModerationService(url, HTTPCaller(secret), timeout, failure)


async def _with_outgoing(svc, **changes):
    """Give ``svc`` (a started ProcessorService) its Outgoing, as twistd improcessor does (``changes``: config)."""
    outgoing = Outgoing(svc.bus, svc.config.replace(**changes) if changes else svc.config)
    await outgoing.declare()
    svc.pipeline.outgoing = outgoing
    return outgoing


def _metric(name, **labels):
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0


# --- moderation --------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_retry_of_a_stored_message_is_never_moderated_and_gets_the_original_reply(rig):
    """With the moderation service down (moderation_failure reject), a client's retry was answered rejected."""
    await rig.store.create_session("alice", ["bob"], "team")
    [original] = await rig.store.store_messages([Incoming("alice", "m1", "team", {"text": "hi"})])
    moderator = _moderator(await _closed_port_url(), failure="reject")
    await rig.processor(filters=[moderator])
    gw = rig.gw
    g1 = await gw.add()
    a1 = await gw.connect(g1, "alice")
    await gw.send(message(a1, "alice", "m1", "team"))
    [reply] = await gw.wait(a1, "message_reply")
    assert reply["ok"] and reply["msgId"] == original.msg_id and reply["seq"] == original.seq, reply
    assert moderator.calls == 0
    # the service is down indeed: a new message is refused, after one call
    await gw.send(message(a1, "alice", "m2", "team"))
    replies = await gw.wait(a1, "message_reply", 2)
    assert replies[1]["ok"] is False and replies[1]["error"]["code"] == "rejected"
    assert moderator.calls == 1


@pytest_twisted.ensureDeferred
async def test_moderation_calls_of_a_window_run_at_once_signed_with_their_verdicts(rig, biz):
    """Ten messages in a window with a 1 s moderator took 10 s, or went unsigned, or verdicts were ignored."""
    biz.moderation.delay = 1.0
    moderator = _moderator(biz.url("moderate"), timeout=5.0)
    await rig.processor(filters=[moderator], batch_wait=0.05)
    gw = rig.gw
    g1 = await gw.add()
    a1 = await gw.connect(g1, "alice")
    await rig.store.create_session("alice", ["bob"], "team")
    items = [message(a1, "alice", f"m{n}", "team") for n in range(9)]
    items.append(message(a1, "alice", "bad", "team", {"text": "buy SPAM now"}))
    started = time.monotonic()
    await gw.send(*items)
    replies = await gw.wait(a1, "message_reply", 10, timeout=15)
    took = time.monotonic() - started
    assert took < 3.0, f"10 moderation calls of 1 s took {took:.1f}s: not concurrent"
    assert biz.moderation.most >= 5
    by = {r["clientMsgId"]: r for r in replies}
    assert all(by[f"m{n}"]["ok"] for n in range(9))  # a bad signature is answered 401: rejected
    assert by["bad"]["ok"] is False and by["bad"]["error"]["code"] == "rejected"
    assert "spam" in by["bad"]["error"]["message"]
    assert [c["clientMsgId"] for c in biz.moderation.calls if c["clientMsgId"] == "bad"] == ["bad"]
    assert biz.moderation.calls[0].keys() == {"sessionId", "from", "clientMsgId", "body"}


@pytest_twisted.ensureDeferred
async def test_a_replace_verdict_is_what_is_stored_and_delivered(rig, biz, pg):
    """A replace verdict was ignored: the unmasked body reached the recipients."""
    biz.moderation.action = "replace"
    await rig.processor(filters=[_moderator(biz.url("moderate"))])
    gw = rig.gw
    g1 = await gw.add()
    a1, b1 = await gw.connect(g1, "alice"), await gw.connect(g1, "bob")
    await rig.store.create_session("alice", ["bob"], "team")
    await gw.send(message(a1, "alice", "m1", "team", {"text": "no spam here"}))
    [sent] = await gw.wait(b1, "message_send")
    assert sent["body"] == {"text": "no **** here"}
    assert await rows(pg, "SELECT body FROM messagerecv") == [({"text": "no **** here"},)]


@pytest_twisted.ensureDeferred
async def test_a_slow_moderation_service_is_cut_at_the_timeout_and_the_policy_applies(rig, biz):
    """A moderator that answers late held messages until it answered, or the failure policy was not applied."""
    biz.moderation.delay = 5.0
    before = _metric("imcluster_business_calls_total", kind="moderation", outcome="failed")
    await rig.processor(filters=[_moderator(biz.url("moderate"), timeout=0.5, failure="reject")])
    gw = rig.gw
    g1 = await gw.add()
    a1 = await gw.connect(g1, "alice")
    await rig.store.create_session("alice", ["bob"], "team")
    started = time.monotonic()
    await gw.send(*[message(a1, "alice", f"m{n}", "team") for n in range(6)])
    replies = await gw.wait(a1, "message_reply", 6, timeout=10)
    assert time.monotonic() - started < 3.0
    for r in replies:
        assert r["ok"] is False and r["error"]["code"] == "rejected" and "unavailable" in r["error"]["message"]
    assert _metric("imcluster_business_calls_total", kind="moderation", outcome="failed") - before == 6


@pytest_twisted.ensureDeferred
async def test_moderation_failure_accept_stores_and_reject_refuses(rig):
    """The moderation_failure policy was not what the option says."""
    url = await _closed_port_url()
    gw = rig.gw
    g1 = await gw.add()
    a1 = await gw.connect(g1, "alice")
    await rig.store.create_session("alice", ["bob"], "team")
    svc = await rig.processor(filters=[_moderator(url, failure="accept")])
    await gw.send(message(a1, "alice", "m1", "team"))
    [r1] = await gw.wait(a1, "message_reply")
    assert r1["ok"]
    await svc.stopService()
    await rig.processor(filters=[_moderator(url, failure="reject")])
    await gw.send(message(a1, "alice", "m2", "team"))
    r2 = (await gw.wait(a1, "message_reply", 2))[1]
    assert r2["ok"] is False and r2["error"]["code"] == "rejected"


# --- webhooks ----------------------------------------------------------------------------------


async def _webhook_processor(rig, biz, **changes):
    values = dict(webhook_url=biz.url("hooks"), webhook_secret=biz.secret, retry_delay=0.1,
                  retry_max_delay=0.3)
    values.update(changes)
    svc = await rig.processor(**values)
    await _with_outgoing(svc)
    hooks = WebhookService(svc.config, svc.bus)
    hooks.startService()
    await hooks.consuming
    rig.stops = getattr(rig, "stops", []) + [hooks]
    return svc, hooks


@pytest_twisted.ensureDeferred
async def test_webhooks_arrive_signed_once_each_in_order_per_session_across_retries(rig, biz):
    """Events were lost, reordered within a session by retries, unsigned, or shared an eventId."""
    svc, hooks = await _webhook_processor(rig, biz)
    try:
        # every event's first two attempts fail: each is retried
        biz.hooks.fail = lambda body, attempt: 503 if attempt <= 2 and body["event"] == "message.stored" else None
        gw = rig.gw
        g1 = await gw.add()
        a1 = await gw.connect(g1, "alice")
        await gw.send(frame(a1, "alice", {"type": "session_create", "members": ["bob"], "sessionId": "s1"}),
                      frame(a1, "alice", {"type": "session_create", "members": ["carol"], "sessionId": "s2"}))
        await gw.wait(a1, "session_reply", 2)
        for n in range(10):
            await gw.send(message(a1, "alice", f"a{n}", "s1"), message(a1, "alice", f"b{n}", "s2"))
        await gw.wait(a1, "message_reply", 20)
        await eventually(lambda: len(biz.hooks.got) >= 22, timeout=20, what="22 webhooks")
        await sleep(0.5)
        got = biz.hooks.got
        assert len(got) == 22 and biz.hooks.bad_signatures == 0
        ids = [body["eventId"] for _, body in got]
        assert len(set(ids)) == 22 and all(len(i) == 32 for i in ids)
        members = [body["data"] for name, body in got if name == "session.members"]
        assert sorted(members, key=lambda d: d["sessionId"]) == [
            {"sessionId": "s1", "added": ["alice", "bob"], "removed": []},
            {"sessionId": "s2", "added": ["alice", "carol"], "removed": []}]
        for sid, prefix in (("s1", "a"), ("s2", "b")):
            # the group's members event is its seq 1 (PROTOCOL.md 1.1), and comes first
            ours = [(name, body["data"]) for name, body in got if body["data"]["sessionId"] == sid]
            assert ours[0][0] == "session.members"
            stored = [d for name, d in ours if name == "message.stored"]
            assert [d["seq"] for d in stored] == list(range(2, 12))
            assert [d["clientMsgId"] for d in stored] == [f"{prefix}{n}" for n in range(10)]
            assert stored[0].keys() == {"sessionId", "msgId", "seq", "from", "clientMsgId", "body", "ts"}
        assert all(biz.hooks.attempts[body["eventId"]] == 3 for name, body in got if name == "message.stored")
        assert all(h["x-imcluster-event-id"] for h in biz.hooks.headers)
    finally:
        await hooks.stopService()


@pytest_twisted.ensureDeferred
async def test_an_event_that_keeps_failing_is_dead_lettered_after_webhook_retry(rig, biz):
    """A dead receiver held its events forever (or lost them silently) instead of dead-lettering them."""
    dead = []
    gw = rig.gw
    await gw.bus.consume(gw.bus.dead_queue(), lambda m: (dead.append(m), m.ack()), prefetch=10)
    before = _metric("imcluster_business_dead_lettered_total", kind="webhook")
    svc, hooks = await _webhook_processor(rig, biz, webhook_retry=1.0)
    try:
        biz.hooks.fail = lambda body, attempt: 500
        g1 = await gw.add()
        a1 = await gw.connect(g1, "alice")
        await rig.store.create_session("alice", ["bob"], "team")
        await gw.send(message(a1, "alice", "m1", "team"))
        await gw.wait(a1, "message_reply")
        await eventually(lambda: dead, timeout=10, what="a dead letter")
        [event] = json.loads(dead[0].body)
        assert event["event"] == "message.stored" and event["data"]["clientMsgId"] == "m1"
        assert "webhook message.stored failed" in dead[0].headers["x-imcluster-reason"]
        assert biz.hooks.attempts[event["eventId"]] >= 3  # retried with backoff before
        # counted once its dead letter is confirmed, which may trail the letter's arrival here
        await eventually(lambda: _metric("imcluster_business_dead_lettered_total", kind="webhook") - before == 1,
                         what="the dead-letter metric")
        # the queue message was acknowledged: nothing is left on <ns>.webhooks
        await sleep(0.3)
        assert not hooks._keys
    finally:
        await hooks.stopService()


@pytest_twisted.ensureDeferred
async def test_a_slow_webhook_receiver_never_slows_message_delivery(rig, biz):
    """A receiver answering after 5 s slowed the replies and deliveries of later messages."""
    biz.hooks.delay = 5.0
    svc, hooks = await _webhook_processor(rig, biz, webhook_timeout=10.0)
    try:
        gw = rig.gw
        g1 = await gw.add()
        a1, b1 = await gw.connect(g1, "alice"), await gw.connect(g1, "bob")
        await rig.store.create_session("alice", ["bob"], "team")
        started = time.monotonic()
        for n in range(20):
            await gw.send(message(a1, "alice", f"m{n}", "team"))
        await gw.wait(b1, "message_send", 20, timeout=10)
        assert time.monotonic() - started < 2.0
        assert biz.hooks.got == []  # the first is still waiting for its answer
    finally:
        await hooks.stopService()


# --- push requests -----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_push_requests_go_to_offline_recipients_only_one_amqp_message_per_window(rig):
    """Online recipients got push requests, offline ones none, or each message cost an AMQP message."""
    pushed = []
    gw = rig.gw
    svc = await rig.processor(push_url="http://127.0.0.1:9/push", batch_wait=0.05)
    outgoing = await _with_outgoing(svc)
    await gw.bus.consume(outgoing.push_queue, lambda m: (pushed.append(m), m.ack()), prefetch=10)
    g1 = await gw.add()
    a1, b1 = await gw.connect(g1, "alice"), await gw.connect(g1, "bob")
    await rig.store.create_session("alice", ["bob", "carol", "dave"], "team")
    long = "x" * 150
    await gw.send(message(a1, "alice", "m1", "team", {"text": long}),
                  message(a1, "alice", "m2", "team", {"image": "https://example.com/a.png"}))
    await gw.wait(a1, "message_reply", 2)
    await eventually(lambda: pushed, what="a push message")
    await sleep(0.3)
    assert len(pushed) == 1
    requests = json.loads(pushed[0].body)
    assert sorted((r["userId"], r["seq"]) for r in requests) == [("carol", 1), ("carol", 2), ("dave", 1), ("dave", 2)]
    for r in requests:
        assert r["sessionId"] == "team" and r["from"] == "alice" and len(r["eventId"]) == 32
        assert set(r) == {"eventId", "userId", "sessionId", "msgId", "from", "seq", "preview"} if r["seq"] == 1 \
            else set(r) == {"eventId", "userId", "sessionId", "msgId", "from", "seq"}
        if r["seq"] == 1:
            assert r["preview"] == "x" * 100
    assert len({r["eventId"] for r in requests}) == 4
    # a client's retry of m1 publishes nothing again
    await gw.send(message(a1, "alice", "m1", "team", {"text": long}))
    await gw.wait(a1, "message_reply", 3)
    await sleep(0.3)
    assert len(pushed) == 1


@pytest_twisted.ensureDeferred
async def test_nothing_is_published_without_webhook_url_or_push_url(rig):
    """A processor without business servers configured published to <ns>.webhooks or <ns>.push."""
    svc = await rig.processor()
    assert not Outgoing(svc.bus, svc.config).enabled
    assert svc.pipeline.outgoing is None


# --- imapi: session.members of HTTP changes -----------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_imapi_creations_and_member_changes_reach_the_webhooks_queue(pg_schema, namespace, redis_prefix,
                                                                          bus_factory):
    """A session created or changed over HTTP never reached the business server's webhook."""
    from imcluster.api.tap import build
    from imcluster.config import API, load_config
    from tests.support.cluster import endpoint, free_port
    from tests.support.ids import AMQP_URL, POSTGRES_DSN, REDIS_URL
    from tests.test_api_http import ADMIN_KEY, SECRET, RunningAPI

    port = free_port()
    hooks = {"webhook_url": "http://127.0.0.1:9/hooks"}
    config = load_config(API, {
        "namespace": namespace, "redis": REDIS_URL, "redis_prefix": redis_prefix, "amqp": AMQP_URL,
        "postgres": POSTGRES_DSN, "postgres_schema": pg_schema, "postgres_pool_size": 2,
        "jwt_secret": SECRET, "api_key": [ADMIN_KEY], "http": [endpoint(port)], "publish_timeout": 2.0,
        "shutdown_timeout": 10.0, **hooks}, environ={})
    root, resource = build(config)
    await root.startService()
    try:
        api = RunningAPI(port, config, resource, root, resource.store, None)
        processor = (await api.start_processor()).service  # member changes go through the processors
        await _with_outgoing(processor, **hooks)
        bus = await bus_factory()
        got = []
        await bus.consume(bus.names.webhooks_queue(), lambda m: (got.extend(json.loads(m.body)), m.ack()))
        r = await api.admin("POST", "/v1/sessions", {"sessionId": "g1", "members": ["bob", "carol"]})
        assert r.status == 201
        r = await api.admin("POST", "/v1/sessions/g1/members", {"add": ["dave"], "remove": ["bob"]})
        assert r.status == 200, r.body
        await eventually(lambda: len(got) >= 2, what="two session.members events")
        assert [(e["event"], e["key"], e["data"]) for e in got] == [
            ("session.members", "g1", {"sessionId": "g1", "added": ["bob", "carol"], "removed": []}),
            ("session.members", "g1", {"sessionId": "g1", "added": ["dave"], "removed": ["bob"]})]
        assert got[0]["eventId"] != got[1]["eventId"]
    finally:
        await root.stopService()
        from tests.support.bus import cleanup_namespace

        await cleanup_namespace(namespace, [f"{namespace}.webhooks"])


@pytest_twisted.ensureDeferred
async def test_one_processor_at_a_time_delivers_webhooks_and_another_takes_over(rig, biz):
    """Two processors delivering one session's events at once reorder them; or none took over when one went."""
    svc, first = await _webhook_processor(rig, biz)
    other = await rig.processor(webhook_url=biz.url("hooks"), webhook_secret=biz.secret)
    await _with_outgoing(other)
    second = WebhookService(other.config, other.bus)
    second.standby_interval = 0.2
    second.startService()
    try:
        await sleep(0.5)
        assert first.consumer is not None and second.consumer is None  # standing by
        gw = rig.gw
        g1 = await gw.add()
        a1 = await gw.connect(g1, "alice")
        await rig.store.create_session("alice", ["bob"], "team")
        await gw.send(message(a1, "alice", "m1", "team"))
        await eventually(lambda: len(biz.hooks.got) == 1, what="the first webhook")
        await first.stopService()
        await second.consuming
        await gw.send(message(a1, "alice", "m2", "team"))
        await eventually(lambda: len(biz.hooks.got) == 2, what="the second webhook, by the other processor")
        assert [b["data"]["seq"] for _, b in biz.hooks.got] == [1, 2]
    finally:
        await first.stopService()
        await second.stopService()



# --- what a window publishes (unit) ------------------------------------------------------------


def test_a_redelivered_duplicate_publishes_its_event_again_with_the_same_id_and_a_retry_nothing():
    """A processor dying between commit and ack lost the window's events; or a client's retry re-sent them."""
    from types import SimpleNamespace

    from imcluster.config import PROCESSOR, load_config
    from imcluster.store import Stored
    from imcluster.testing import FakeBus

    config = load_config(PROCESSOR, {"webhook_url": "http://127.0.0.1:9/", "push_url": "http://127.0.0.1:9/"},
                         environ={})
    outgoing = Outgoing(FakeBus("ns1"), config)

    def window(duplicate, redelivered):
        item = SimpleNamespace(frame={"type": "message"}, envelope=SimpleNamespace(
            message=SimpleNamespace(redelivered=redelivered)))
        stored = Stored("42", "team", 7, 1764160000000, "alice", "c1", {"text": "hi"}, ["bob", "carol"],
                        duplicate=duplicate)
        return SimpleNamespace(of_type=lambda *t: [item] if "message" in t else [], stored={id(item): stored},
                               online={"bob"}, answers={}, first_failed=None)

    events, pushes = outgoing.collect(window(False, False))
    [event] = events
    assert event["key"] == "team" and event["data"]["seq"] == 7 and len(event["eventId"]) == 32
    assert [(p["userId"], p["preview"]) for p in pushes] == [("carol", "hi")]
    again, _ = outgoing.collect(window(True, True))
    assert [e["eventId"] for e in again] == [event["eventId"]]
    assert outgoing.collect(window(True, False)) == ([], [])
    split = window(True, False)
    split.first_failed = 1.0  # a half of a window that failed after storing
    assert [e["eventId"] for e in outgoing.collect(split)[0]] == [event["eventId"]]


def test_a_message_stored_by_another_processor_while_moderated_gets_the_original_reply():
    """The original committed elsewhere while this copy was moderated: the refusal won over the stored original."""
    from imcluster.processor.filters import Verdict
    from tests.test_processor_service import GW1, Rig, group, message as fake_message

    class StoredMeanwhile:
        """Another processor commits the original while this filter thinks; then it refuses (service down)."""

        def __init__(self):
            self.store = None

        def check(self, msg):
            self.store.store_messages([Incoming(msg["from"], msg["clientMsgId"], msg["sessionId"], msg["body"])])
            return Verdict.reject("the moderation service is unavailable")

    flt = StoredMeanwhile()
    rig = Rig(filters=[flt])
    flt.store = rig.store
    rig.gateway(GW1)
    group(rig, "g", "alice", "bob")
    a1 = rig.connect(GW1, "alice")
    rig.send(fake_message(a1, "alice", "c1", "g"))
    [reply] = [f for f in rig.frames_to(a1) if f["type"] == "message_reply"]
    assert reply["ok"] is True and reply["msgId"] == "1", reply
    assert [n for n, _ in rig.store.calls].count("stored_keys") == 2


def test_pure_filters_spare_the_lookup_and_a_refused_retry_still_gets_the_original():
    """The keyword filter alone cost every window a read; or a retry it refuses (its list changed) was answered rejected."""
    from imcluster.processor.filters import KeywordFilter
    from tests.test_processor_service import GW1, Rig, group, message as fake_message

    rig = Rig(filters=[KeywordFilter(["darn"])])
    rig.gateway(GW1)
    group(rig, "g", "alice", "bob")
    a1 = rig.connect(GW1, "alice")
    rig.store.store_messages([Incoming("alice", "old", "g", {"text": "darn"})])  # stored before the list had it
    rig.send(fake_message(a1, "alice", "c1", "g"))
    assert [n for n, _ in rig.store.calls].count("stored_keys") == 0
    rig.send(fake_message(a1, "alice", "old", "g", {"text": "darn"}), fake_message(a1, "alice", "c2", "g", {"text": "darn"}))
    replies = {f["clientMsgId"]: f for f in rig.frames_to(a1) if f["type"] == "message_reply"}
    assert replies["old"]["ok"] is True and replies["old"]["seq"] == 1
    assert replies["c2"]["ok"] is False and replies["c2"]["error"]["code"] == "rejected"
    assert [n for n, _ in rig.store.calls].count("stored_keys") == 1


def test_recall_and_edit_entries_are_message_stored_with_kind_and_members_events_session_members():
    """A recall never reached the business server, or got a push notification, or a members event looked like a message."""
    from types import SimpleNamespace

    from imcluster.config import PROCESSOR, load_config
    from imcluster.store import Stored
    from imcluster.testing import FakeBus

    config = load_config(PROCESSOR, {"webhook_url": "http://127.0.0.1:9/", "push_url": "http://127.0.0.1:9/"},
                         environ={})
    outgoing = Outgoing(FakeBus("ns1"), config)
    recall, members = SimpleNamespace(frame={"type": "recall"}), SimpleNamespace(frame={"type": "members"})
    recalled = Stored("43", "team", 8, 1, "alice", "r1", None, ["bob"], kind="recall", ref="42")
    changed = Stored("44", "team", 9, 2, "alice", "k1", {"added": ["dave"], "removed": ["bob"]}, ["bob", "carol"],
                     kind="members")
    items = {"recall": [recall], "members": [members]}
    w = SimpleNamespace(of_type=lambda *t: [i for k in t for i in items.get(k, [])], stored={},
                        answers={id(members): ("ok", (changed, ["alice", "carol", "dave"])),
                                 id(recall): ("ok", (recalled, ["alice", "bob"]))},
                        online=set(), first_failed=None)
    events, pushes = outgoing.collect(w)
    assert pushes == []
    assert [(e["event"], e["data"].get("kind"), e["data"].get("ref")) for e in events] == [
        ("message.stored", "recall", "42"), ("session.members", None, None)]
    assert events[1]["data"] == {"sessionId": "team", "added": ["dave"], "removed": ["bob"]}

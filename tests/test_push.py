"""Offline push through real ``twistd impush`` daemons to a fake push provider (HTTP-API.md 1.1).

The provider is a ``twisted.web`` server in the test; push messages are put
on ``<ns>.push`` in the processors' wire (a JSON array of
``{"eventId","userId","sessionId","msgId","from","seq","preview"}``);
devices are registered through a real imapi.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid

import pika
import pytest
import pytest_twisted
from psycopg2 import sql
from twisted.internet import defer, reactor, threads
from twisted.web import resource, server

from imcluster.envelope import push_body
from tests.support.cluster import consumer_count
from tests.support.http import http_call, metric_value
from tests.support.ids import AMQP_URL, unique
from tests.support.postgres import admin_connection
from tests.support.waiting import eventually, sleep

pytestmark = pytest.mark.slow

ADMIN = "admin-" + uuid.uuid4().hex
SECRET = "hook-" + uuid.uuid4().hex


class Provider(resource.Resource):
    """A fake push relay: records every request; ``answers`` decides each answer (default 200 ``{}``)."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[dict] = []
        #: callable(request_json, n) -> (status, body bytes)
        self.answer = lambda doc, n: (200, b"{}")

    def render_POST(self, request):  # noqa: N802 (Twisted API)
        raw = request.content.read()
        doc = json.loads(raw)
        self.requests.append({"body": doc, "raw": raw,
                              "signature": request.getHeader(b"x-imcluster-signature"),
                              "event": request.getHeader(b"x-imcluster-event")})
        status, body = self.answer(doc, len(self.requests))
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        return body

    def event_ids(self) -> list[str]:
        return [r["body"]["eventId"] for r in self.requests]


@pytest.fixture
def provider():
    p = Provider()
    port = reactor.listenTCP(0, server.Site(p), interface="127.0.0.1")
    p.url = f"http://127.0.0.1:{port.getHost().port}/push"
    yield p
    port.stopListening()


def publish(namespace: str, requests: list[dict]) -> None:
    """Put one push message on <ns>.push as a processor does (blocking pika; run in a thread)."""
    conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        ch.basic_publish(f"{namespace}.exchange", f"{namespace}.push", push_body(requests),
                         pika.BasicProperties(delivery_mode=2))
    finally:
        conn.close()


def dead_letters(namespace: str) -> list[tuple[dict, bytes]]:
    """Take every message of <ns>.dead: (headers, body)."""
    conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    out = []
    try:
        ch = conn.channel()
        while True:
            method, props, body = ch.basic_get(f"{namespace}.dead", auto_ack=True)
            if method is None:
                return out
            out.append((props.headers or {}, body))
    finally:
        conn.close()


def request(user: str, **kw) -> dict:
    doc = {"eventId": unique("ev"), "userId": user, "sessionId": f"p2p:{user}:zz", "msgId": "42",
           "from": "zz", "seq": 7, "preview": "hello"}
    doc.update(kw)
    return doc


def devices_in_db(schema: str, user: str) -> list[str]:
    conn = admin_connection()
    try:
        with conn.cursor() as c:
            c.execute(sql.SQL("SELECT device_id FROM {}.device WHERE user_id = %s ORDER BY device_id").format(
                sql.Identifier(schema)), (user,))
            return [r[0] for r in c.fetchall()]
    finally:
        conn.close()


async def put_device(api, user: str, device: str, platform: str = "fcm", token: str | None = None):
    r = await http_call(api.http_port, "PUT", f"/v1/users/{user}/devices/{device}",
                        {"platform": platform, "token": token or f"tok-{device}"}, token=ADMIN)
    assert r.status == 200, r.body
    return r


async def start(cluster, provider, **opts):
    opts.setdefault("push_url", provider.url)
    opts.setdefault("webhook_secret", SECRET)
    opts.setdefault("push_retry_delay", 0.2)
    opts.setdefault("push_retry_max_delay", 0.5)
    return await cluster.start_push(**opts)


@pytest_twisted.ensureDeferred
async def test_devices_api(cluster, pg_schema):
    """A user registers and removes its own push targets; another user may not; bad bodies are 400."""
    api = await cluster.start_api(api_key=ADMIN)
    alice, bob = unique("alice"), unique("bob")
    r = await http_call(api.http_port, "PUT", f"/v1/users/{alice}/devices/phone-1",
                        {"platform": "apns", "token": "abc"}, token=cluster.token(alice))
    assert r.status == 200 and r.json["deviceId"] == "phone-1"
    r = await http_call(api.http_port, "PUT", f"/v1/users/{alice}/devices/phone-1",
                        {"platform": "fcm", "token": "def"}, token=cluster.token(alice))
    assert r.status == 200  # replaced, not duplicated
    assert devices_in_db(pg_schema, alice) == ["phone-1"]
    r = await http_call(api.http_port, "PUT", f"/v1/users/{alice}/devices/phone-2",
                        {"platform": "fcm", "token": "x"}, token=cluster.token(bob))
    assert r.status == 403
    for bad in ({"platform": "sms", "token": "x"}, {"platform": "fcm"}, {"platform": "fcm", "token": ""}):
        r = await http_call(api.http_port, "PUT", f"/v1/users/{alice}/devices/phone-2", bad, token=ADMIN)
        assert r.status == 400, bad
    r = await http_call(api.http_port, "PUT", f"/v1/users/{alice}/devices/bad%2Fid",
                        {"platform": "fcm", "token": "x"}, token=ADMIN)
    assert r.status == 400
    r = await http_call(api.http_port, "DELETE", f"/v1/users/{alice}/devices/phone-1", token=cluster.token(bob))
    assert r.status == 403
    r = await http_call(api.http_port, "DELETE", f"/v1/users/{alice}/devices/phone-1", token=cluster.token(alice))
    assert r.status == 204 and r.body == b""
    assert devices_in_db(pg_schema, alice) == []


@pytest_twisted.ensureDeferred
async def test_push_request_shape_signature_and_skipped_users(cluster, pg_schema, provider):
    """A user with devices gets one signed request with all of them; a user without devices gets none."""
    api = await cluster.start_api(api_key=ADMIN)
    push = await start(cluster, provider, metrics=True)
    bob, carol = unique("bob"), unique("carol")
    await put_device(api, bob, "phone", "apns", "apns-token")
    await put_device(api, bob, "browser", "webpush", '{"endpoint":"https://push.example/1"}')
    sent = [request(bob), request(carol)]
    await threads.deferToThread(publish, cluster.namespace, sent)
    await eventually(lambda: provider.requests, 15, "a push request")
    await sleep(0.5)
    assert len(provider.requests) == 1
    got = provider.requests[0]
    expected = dict(sent[0])
    expected["devices"] = [{"deviceId": "browser", "platform": "webpush", "token": '{"endpoint":"https://push.example/1"}'},
                           {"deviceId": "phone", "platform": "apns", "token": "apns-token"}]
    assert got["body"] == expected
    assert got["event"] == b"push"
    assert got["signature"] == b"sha256=" + hmac.new(SECRET.encode(), got["raw"], hashlib.sha256).hexdigest().encode()
    assert await threads.deferToThread(consumer_count, f"{cluster.namespace}.push") == 1
    assert await push.stop() == 0


@pytest_twisted.ensureDeferred
async def test_invalid_devices_are_removed(cluster, pg_schema, provider):
    """410 for a one-device request removes that device; 200 {"invalid":[...]} removes just those; nothing is retried."""
    api = await cluster.start_api(api_key=ADMIN)
    await start(cluster, provider)
    dave, erin = unique("dave"), unique("erin")
    await put_device(api, dave, "old-phone")
    await put_device(api, erin, "a")
    await put_device(api, erin, "b")

    def answer(doc, n):
        if doc["userId"] == dave:
            return 410, b'{"error":"Unregistered"}'
        return 200, b'{"invalid":["b","not-hers"]}'

    provider.answer = answer
    await threads.deferToThread(publish, cluster.namespace, [request(dave), request(erin)])
    await eventually(lambda: devices_in_db(pg_schema, dave) == [] and devices_in_db(pg_schema, erin) == ["a"],
                     15, "invalid devices removed")
    await sleep(1.0)
    assert len(provider.requests) == 2  # a 404/410 is an answer, not a failure


@pytest_twisted.ensureDeferred
async def test_retry_then_success(cluster, pg_schema, provider):
    """A relay that fails twice (503) gets the same request again until it takes it; /metrics counts it all."""
    api = await cluster.start_api(api_key=ADMIN)
    push = await start(cluster, provider, metrics=True)
    frank = unique("frank")
    await put_device(api, frank, "phone")

    def answer(doc, n):
        return (503, b"busy") if n <= 2 else (200, b"{}")

    provider.answer = answer
    sent = request(frank)
    await threads.deferToThread(publish, cluster.namespace, [sent])
    await eventually(lambda: len(provider.requests) >= 3, 15, "three calls")
    await sleep(1.0)
    assert provider.event_ids() == [sent["eventId"]] * 3
    assert await threads.deferToThread(dead_letters, cluster.namespace) == []
    text = (await http_call(push.metrics_port, "GET", "/metrics")).text
    assert metric_value(text, "imcluster_push_calls_total", {"result": "failed"}) == 2
    assert metric_value(text, "imcluster_push_calls_total", {"result": "ok"}) == 1
    assert metric_value(text, "imcluster_push_retries_total") == 2
    assert metric_value(text, "imcluster_push_call_seconds_count") == 3
    assert await push.stop() == 0


@pytest_twisted.ensureDeferred
async def test_dead_letter_after_push_retry(cluster, pg_schema, provider):
    """A relay that keeps failing: after push_retry the request is dead-lettered to <ns>.dead with its reason."""
    api = await cluster.start_api(api_key=ADMIN)
    push = await start(cluster, provider, push_retry=1.5, metrics=True)
    gina = unique("gina")
    await put_device(api, gina, "phone")
    provider.answer = lambda doc, n: (500, b"down")
    sent = request(gina)
    await threads.deferToThread(publish, cluster.namespace, [sent])
    letters = await eventually(lambda: threads.deferToThread(dead_letters, cluster.namespace), 15,
                               "a dead letter")
    assert len(letters) == 1
    headers, body = letters[0]
    doc = json.loads(body)
    assert doc[0]["eventId"] == sent["eventId"] and doc[0]["devices"][0]["deviceId"] == "phone"
    assert "push_retry" in headers["x-imcluster-reason"]
    calls = len(provider.requests)
    assert calls >= 2
    await sleep(1.0)
    assert len(provider.requests) == calls  # no more calls once dead-lettered
    text = (await http_call(push.metrics_port, "GET", "/metrics")).text
    assert metric_value(text, "imcluster_push_dead_lettered_total") == 1


@pytest_twisted.ensureDeferred
async def test_requests_held_past_push_hold_are_handed_on_and_still_dead_lettered_in_time(cluster, pg_schema, provider):
    """A request failing longer than push_hold goes back to <ns>.push with its first attempt: push_retry still ends it."""
    api = await cluster.start_api(api_key=ADMIN)
    push = await start(cluster, provider, push_retry=2.5, push_hold=0.3, metrics=True)
    hank = unique("hank")
    await put_device(api, hank, "phone")
    provider.answer = lambda doc, n: (502, b"bad gateway")
    sent = request(hank)
    await threads.deferToThread(publish, cluster.namespace, [sent])
    letters = await eventually(lambda: threads.deferToThread(dead_letters, cluster.namespace), 15,
                               "a dead letter")
    assert [json.loads(b)[0]["eventId"] for _, b in letters] == [sent["eventId"]]
    assert set(provider.event_ids()) == {sent["eventId"]} and len(provider.requests) >= 3
    assert "still failing after push_hold; handed on" in push.log_text()
    await sleep(1.0)
    assert await threads.deferToThread(dead_letters, cluster.namespace) == []
    assert await push.stop() == 0


@pytest_twisted.ensureDeferred
async def test_two_impush_share_the_queue_without_loss(cluster, pg_schema, provider):
    """Two impush daemons on one queue, one stopped (SIGTERM) half-way: every request arrives at least once."""
    api = await cluster.start_api(api_key=ADMIN)
    first = await start(cluster, provider)
    await start(cluster, provider)
    users = [unique("u") for _ in range(20)]
    for u in users:
        await put_device(api, u, "phone")

    def slow_answer(doc, n):
        return 200, b"{}"

    provider.answer = slow_answer
    sent = []
    for i in range(100):
        batch = [request(u) for u in users[i % 4::4]]  # 5 requests a message
        sent += [r["eventId"] for r in batch]
        await threads.deferToThread(publish, cluster.namespace, batch)
        if i == 50:
            stopping = first.stop()
    assert await stopping == 0
    await eventually(lambda: set(sent) <= set(provider.event_ids()), 30, "every request")
    assert len(sent) == 500

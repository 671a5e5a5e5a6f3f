"""imapi's HTTP API (HTTP-API.md) on the real Redis, RabbitMQ and PostgreSQL.

The API runs in-process (the very tree ``twistd imapi`` builds); the real
processor service runs in-process too (tests/support/api.py) and answers
the ``message`` items it publishes (routing to gateways is the processor
daemon's part: tests/test_api_process.py runs those).
"""

from __future__ import annotations

import json
import time
import uuid

import pytest_twisted
from twisted.internet import defer

from imcluster.api.tap import build
from imcluster.auth import mint_token
from imcluster.bus import AMQPService
from imcluster.config import API, load_config
from imcluster.envelope import is_api_conn
from imcluster.store import Incoming
from imcluster.registry import RedisService, conn_meta, server_info
from tests.support.api import BAD_WORD, InProcessProcessor
from tests.support.bus import cleanup_namespace
from tests.support.cluster import endpoint, free_port
from tests.support.http import http_call, metric_value
from tests.support.ids import AMQP_URL, POSTGRES_DSN, REDIS_URL
from tests.support.redis import delete_prefix

SECRET = "api-test-secret-" + "x" * 32
ADMIN_KEY = "admin-key-" + uuid.uuid4().hex
SECOND_KEY = "second-key-" + uuid.uuid4().hex
MAX_BODY = 4096
MAX_GROUP = 6


def token(user: str, **kw) -> str:
    return mint_token(SECRET, user, 3600, **kw)


class RunningAPI:
    def __init__(self, port, config, resource, root, store, redis) -> None:
        self.port = port
        self.config = config
        self.resource = resource
        self.root = root
        self.store = store
        self.redis = redis
        self.processor: InProcessProcessor | None = None

    def call(self, method: str, path: str, body=None, token: str | None = None, **kw) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(http_call(self.port, method, path, body, token, **kw))

    def admin(self, method: str, path: str, body=None, **kw) -> defer.Deferred:
        return self.call(method, path, body, ADMIN_KEY, **kw)

    def as_user(self, user: str, method: str, path: str, body=None, **kw) -> defer.Deferred:
        return self.call(method, path, body, token(user), **kw)

    async def start_processor(self) -> InProcessProcessor:
        bus = AMQPService(AMQP_URL, self.config.namespace, publish_timeout=2.0, name="processor-amqp")
        bus.setServiceParent(self.root)  # the running tree starts it now, and stops it with the API
        await bus.wait_connected()
        self.processor = InProcessProcessor(bus, self.store)
        await self.processor.start(self.root)  # stopped before its bus
        return self.processor


@pytest_twisted.async_yield_fixture
async def api(pg_schema, namespace, redis_prefix):
    """imapi in-process on a free port with short timeouts, small limits and two admin keys."""
    port = free_port()
    config = load_config(API, {
        "namespace": namespace, "redis": REDIS_URL, "redis_prefix": redis_prefix, "amqp": AMQP_URL,
        "postgres": POSTGRES_DSN, "postgres_schema": pg_schema, "postgres_pool_size": 2,
        "jwt_secret": SECRET, "api_key": [ADMIN_KEY, SECOND_KEY], "http": [endpoint(port)],
        "max_body_size": MAX_BODY, "max_group_size": MAX_GROUP, "publish_timeout": 2.0,
        "request_timeout": 1.0, "health_timeout": 2.0, "shutdown_timeout": 10.0,
    }, environ={})
    root, resource = build(config)
    await root.startService()
    redis = root.getServiceNamed("redis")
    running = RunningAPI(port, config, resource, root, resource.store, redis)
    try:
        yield running
    finally:
        await root.stopService()
        cleaner = RedisService(REDIS_URL, prefix=redis_prefix, timeout=5.0)
        await cleaner.startService()
        await delete_prefix(cleaner, redis_prefix)
        await cleaner.stopService()
        await cleanup_namespace(namespace)


# --- authentication, routing, bodies ------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_authentication(api):
    """Only a valid user JWT or a configured admin key gets in; everything else is 401 with the error shape."""
    path = "/v1/users/alice/sessions"
    r = await api.call("GET", path)
    assert r.status == 401 and r.error_code == "unauthorized"
    assert r.header("www-authenticate").startswith("Bearer")
    for credential in ("", "wrong-key", ADMIN_KEY[:-1], ADMIN_KEY + "x", token("alice") + "x",
                       mint_token("another-secret-" + "y" * 32, "alice", 3600),
                       mint_token(SECRET, "alice", 10, now=time.time() - 3600)):
        r = await api.call("GET", path, headers={"Authorization": f"Bearer {credential}"})
        assert r.status == 401 and r.error_code == "unauthorized", credential
    r = await api.call("GET", path, headers={"Authorization": f"Basic {ADMIN_KEY}"})
    assert r.status == 401
    for key in (ADMIN_KEY, SECOND_KEY):
        assert (await api.call("GET", path, token=key)).status == 200
    r = await api.call("GET", path, headers={"Authorization": f"bearer  {token('alice')} "})
    assert r.status == 200 and r.json == {"sessions": []}


@pytest_twisted.ensureDeferred
async def test_routes_and_bodies(api):
    """Unknown routes are 404, other methods 405, and bad or oversized bodies 400/413, all in the JSON error shape."""
    for path in ("/v1", "/v1/sessions/x/nope", "/v2/sessions", "/v1/users/alice", "/v1/sessions/"):
        r = await api.admin("GET", path)
        assert r.status == 404 and r.error_code == "not_found", path
    r = await api.admin("GET", "/")  # a person opening the API's address finds the web chat
    assert r.status == 302 and r.headers.getRawHeaders(b"location") == [b"/app/"]
    r = await api.call("DELETE", "/v1/sessions/g1")
    assert r.status == 405 and r.error_code == "method_not_allowed" and r.header("allow") == "GET"
    r = await api.call("PUT", "/v1/sessions/g1/messages")
    assert r.status == 405 and r.header("allow") == "GET, POST"
    for raw in (b"{", b"[1,2]", b'"x"', b"", b'{"members": NaN}', b"\xff\xfe", b"[" * 100 + b"]" * 100,
                b'{"members": ["a\\u0000"]}'):
        r = await api.admin("POST", "/v1/sessions", raw=raw)
        assert r.status == 400 and r.error_code == "bad_request", raw
    big = {"members": ["bob"], "pad": "x" * MAX_BODY}
    r = await api.admin("POST", "/v1/sessions", big)
    assert r.status == 413 and r.error_code == "too_large"
    r = await api.admin("POST", "/v1/sessions", big, chunked=True)
    assert r.status == 413 and r.error_code == "too_large"
    r = await api.call("POST", "/v1/sessions", big)  # the size is checked before anything else
    assert r.status == 413
    r = await api.admin("POST", "/v1/sessions", {"members": ["bob"], "pad": "x" * (MAX_BODY - 100)})
    assert r.status == 201


# --- sessions --------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_create_session(api):
    """Creating sessions: creator is member and owner, ids are checked, an existing id is 409."""
    r = await api.as_user("carol", "POST", "/v1/sessions", {"sessionId": "g-1", "members": ["bob", "alice"]})
    assert r.status == 201 and r.json == {"sessionId": "g-1", "kind": "group", "members": ["alice", "bob", "carol"]}
    assert (await api.store.get_session("g-1"))["owners"] == ["carol"]
    r = await api.admin("POST", "/v1/sessions", {"members": ["bob"], "kind": "group"})
    assert r.status == 201 and r.json["members"] == ["bob"] and r.json["kind"] == "group"
    assert (await api.store.get_session(r.json["sessionId"]))["owners"] == []
    r = await api.as_user("bob", "POST", "/v1/sessions", {"sessionId": "g-1", "members": []})
    assert r.status == 409 and r.error_code == "conflict"
    r = await api.as_user("alice", "POST", "/v1/sessions", {"sessionId": "p2p:alice:bob", "members": ["bob"]})
    assert r.status == 201 and r.json == {"sessionId": "p2p:alice:bob", "kind": "p2p", "members": ["alice", "bob"]}
    for body in ({}, {"members": "bob"}, {"members": [1]}, {"members": ["b c"]}, {"members": [], "kind": "x"},
                 {"members": [], "sessionId": 5}, {"members": [], "sessionId": None}, {"members": [], "sessionId": "bad id"},
                 {"members": ["dave"], "sessionId": "p2p:bob:dave"}):
        r = await api.as_user("alice", "POST", "/v1/sessions", body)
        assert r.status == 400 and r.error_code == "bad_request", body
    r = await api.admin("POST", "/v1/sessions", {"members": []})
    assert r.status == 400
    r = await api.admin("POST", "/v1/sessions", {"members": [f"u{i}" for i in range(MAX_GROUP + 1)]})
    assert r.status == 413 and r.error_code == "too_large"


@pytest_twisted.ensureDeferred
async def test_get_session(api):
    """Members and the admin see a session; others get 403; a missing one is 404; 1:1 sessions exist implicitly."""
    await api.store.create_session("alice", ["bob"], "g-2")
    expected = {"sessionId": "g-2", "kind": "group", "members": ["alice", "bob"], "lastSeq": 0}
    for credential in (token("alice"), token("bob"), ADMIN_KEY):
        r = await api.call("GET", "/v1/sessions/g-2", token=credential)
        assert r.status == 200 and r.json == expected
    r = await api.as_user("carol", "GET", "/v1/sessions/g-2")
    assert r.status == 403 and r.error_code == "forbidden"
    for sid in ("nope", "p2p:bob:alice", "p2p:x", "bad%20id", "%ff"):
        r = await api.admin("GET", f"/v1/sessions/{sid}")
        assert r.status == 404 and r.error_code == "not_found", sid
    r = await api.as_user("carol", "GET", "/v1/sessions/nope")
    assert r.status == 404
    implicit = {"sessionId": "p2p:alice:carol", "kind": "p2p", "members": ["alice", "carol"], "lastSeq": 0}
    for credential in (token("alice"), token("carol"), ADMIN_KEY):
        r = await api.call("GET", "/v1/sessions/p2p:alice:carol", token=credential)
        assert r.status == 200 and r.json == implicit
    r = await api.as_user("bob", "GET", "/v1/sessions/p2p%3Aalice%3Acarol")
    assert r.status == 403


@pytest_twisted.ensureDeferred
async def test_change_members(api):
    """Only owners and the admin change members; members, outsiders and 1:1 sessions cannot."""
    await api.start_processor()  # a change is a members event the processors store (PROTOCOL.md 1.1)
    await api.store.create_session("alice", ["bob"], "g-3")
    r = await api.as_user("alice", "POST", "/v1/sessions/g-3/members", {"add": ["carol", "dave"], "remove": ["bob"]})
    assert r.status == 200 and r.json == {"members": ["alice", "carol", "dave"]}
    for user in ("carol", "bob"):  # a member who is not an owner; a former member
        r = await api.as_user(user, "POST", "/v1/sessions/g-3/members", {"add": ["eve"]})
        assert r.status == 403 and r.error_code == "forbidden", user
    r = await api.admin("POST", "/v1/sessions/g-3/members", {"remove": ["alice"]})
    assert r.status == 200 and r.json == {"members": ["carol", "dave"]}
    r = await api.as_user("alice", "POST", "/v1/sessions/g-3/members", {"add": ["alice"]})
    assert r.status == 403  # no longer a member: can no longer see it
    r = await api.admin("POST", "/v1/sessions/g-3/members", {})
    assert r.status == 200 and r.json == {"members": ["carol", "dave"]}
    r = await api.admin("POST", "/v1/sessions/nope/members", {"add": ["x"]})
    assert r.status == 404
    for body in ({"add": "x"}, {"add": ["bad id"]}, {"add": ["x"], "remove": ["x"]}, {"remove": [None]}):
        r = await api.admin("POST", "/v1/sessions/g-3/members", body)
        assert r.status == 400 and r.error_code == "bad_request", body
    r = await api.admin("POST", "/v1/sessions/g-3/members", {"add": [f"u{i}" for i in range(MAX_GROUP)]})
    assert r.status == 413 and r.error_code == "too_large"
    assert (await api.store.get_session("g-3"))["members"] == ["carol", "dave"]  # nothing changed
    r = await api.admin("POST", "/v1/sessions/p2p:alice:bob/members", {"add": ["carol"]})
    assert r.status == 400
    r = await api.as_user("alice", "POST", "/v1/sessions/p2p:alice:bob/members", {"add": ["carol"]})
    assert r.status == 403  # 1:1 sessions have no owner


# --- messages -------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_publish(api):
    """Posting goes through the processors: 201 new, 200 duplicate, and users may only send as themselves."""
    procs = await api.start_processor()
    await api.store.create_session("alice", ["bob"], "g-4")
    r = await api.as_user("bob", "POST", "/v1/sessions/g-4/messages", {"clientMsgId": "c-1", "body": {"text": "hi"}})
    assert r.status == 201, r.body
    first = r.json
    assert set(first) == {"msgId", "sessionId", "seq", "ts"} and first["sessionId"] == "g-4" and first["seq"] == 1
    item = procs.items[-1]
    assert item["userId"] == "bob" and "trusted" not in item and is_api_conn(item["connId"])
    assert item["frame"] == {"type": "message", "clientMsgId": "c-1", "sessionId": "g-4", "body": {"text": "hi"}}
    r = await api.as_user("bob", "POST", "/v1/sessions/g-4/messages", {"clientMsgId": "c-1", "body": "again"})
    assert r.status == 200 and r.json == first
    r = await api.admin("POST", "/v1/sessions/g-4/messages", {"clientMsgId": "c-1", "body": None})
    assert r.status == 201 and r.json["seq"] == 2  # another sender: system
    assert procs.items[-1]["userId"] == "system" and procs.items[-1]["trusted"] is True
    r = await api.admin("POST", "/v1/sessions/g-4/messages", {"clientMsgId": "c-2", "body": 1, "from": "carol"})
    assert r.status == 201 and r.json["seq"] == 3
    r = await api.as_user("alice", "POST", "/v1/sessions/g-4/messages",
                          {"clientMsgId": "c-3", "body": [], "from": "alice"})
    assert r.status == 201
    history = (await api.admin("GET", "/v1/sessions/g-4/messages")).json["messages"]
    assert [(m["seq"], m["from"], m["clientMsgId"], m["body"]) for m in history] == [
        (1, "bob", "c-1", {"text": "hi"}), (2, "system", "c-1", None), (3, "carol", "c-2", 1), (4, "alice", "c-3", [])]
    assert history[0]["msgId"] == first["msgId"] and history[0]["ts"] == first["ts"]
    # what users may not do
    cases = [
        ("bob", "g-4", {"clientMsgId": "c-9", "body": 1, "from": "alice"}, 403),   # send as someone else
        ("carol", "g-4", {"clientMsgId": "c-9", "body": 1}, 403),                   # not a member
        ("carol", "nope", {"clientMsgId": "c-9", "body": 1}, 404),
        ("carol", "p2p:alice:bob", {"clientMsgId": "c-9", "body": 1}, 403),
        ("bob", "g-4", {"clientMsgId": "", "body": 1}, 400),
        ("bob", "g-4", {"clientMsgId": "x" * 65, "body": 1}, 400),
        ("bob", "g-4", {"clientMsgId": 5, "body": 1}, 400),
        ("bob", "g-4", {"clientMsgId": "c-9"}, 400),
        ("bob", "g-4", {"clientMsgId": "c-9", "body": "a\u0000b"}, 400),
        ("bob", "g-4", {"clientMsgId": "c-9", "body": {"t": BAD_WORD}}, 403),    # moderation: rejected
    ]
    for user, sid, body, status in cases:
        r = await api.as_user(user, "POST", f"/v1/sessions/{sid}/messages", body)
        assert r.status == status, (user, sid, body, r.body)
    assert r.json["error"]["message"].startswith("rejected:")
    for sender in ("bad id", None, 5):
        r = await api.admin("POST", "/v1/sessions/g-4/messages", {"clientMsgId": "c-9", "body": 1, "from": sender})
        assert r.status == 400, sender
    r = await api.admin("POST", "/v1/sessions/nope/messages", {"clientMsgId": "c-9", "body": 1})
    assert r.status == 404
    assert (await api.store.get_session("g-4"))["lastSeq"] == 4  # none of those was stored


@pytest_twisted.ensureDeferred
async def test_publish_is_held_to_a_client_frame(api):
    """A message a client could not send (over max_frame_size as a message frame) was accepted over HTTP."""
    procs = await api.start_processor()
    await api.store.create_session("alice", ["bob"], "g-6")
    api.resource.max_frame_size = 200  # the request bodies stay far below max_body_size
    frame = {"type": "message", "clientMsgId": "c-1", "sessionId": "g-6", "body": ""}
    fits = 200 - len(json.dumps(frame, separators=(",", ":")))
    r = await api.as_user("alice", "POST", "/v1/sessions/g-6/messages", {"clientMsgId": "c-1", "body": "x" * fits})
    assert r.status == 201, r.body
    for body in ("x" * (fits + 1), "\u00e9" * (fits // 2 + 1), {"t": ["y" * fits]}):  # bytes of UTF-8 JSON
        r = await api.as_user("alice", "POST", "/v1/sessions/g-6/messages", {"clientMsgId": "c-2", "body": body})
        assert r.status == 413 and r.error_code == "too_large", r.body
        assert "max_frame_size" in r.json["error"]["message"]
    assert [i["frame"]["clientMsgId"] for i in procs.items] == ["c-1"]  # nothing else reached the processors
    r = await api.as_user("alice", "POST", "/v1/sessions/nope/messages", {"clientMsgId": "c-2", "body": "x" * 300})
    assert r.status == 404  # the session first, as for every other error


@pytest_twisted.ensureDeferred
async def test_publish_to_implicit_p2p(api):
    """Either user of a 1:1 session (or the admin) posts to it before it exists; it is created on the way."""
    await api.start_processor()
    r = await api.as_user("bob", "POST", "/v1/sessions/p2p:alice:bob/messages", {"clientMsgId": "p-1", "body": "yo"})
    assert r.status == 201 and r.json["seq"] == 1
    r = await api.admin("POST", "/v1/sessions/p2p:alice:bob/messages", {"clientMsgId": "p-2", "body": "sys"})
    assert r.status == 201 and r.json["seq"] == 2
    r = await api.as_user("alice", "GET", "/v1/sessions/p2p:alice:bob")
    assert r.json == {"sessionId": "p2p:alice:bob", "kind": "p2p", "members": ["alice", "bob"], "lastSeq": 2}
    r = await api.as_user("alice", "GET", "/v1/users/alice/sessions")
    assert r.json == {"sessions": [{"sessionId": "p2p:alice:bob", "kind": "p2p", "lastSeq": 2, "unread": 2}]}
    r = await api.as_user("bob", "GET", "/v1/users/bob/sessions")
    assert r.json["sessions"][0]["unread"] == 1  # his own message is not unread


@pytest_twisted.ensureDeferred
async def test_publish_without_processors(api):
    """With no processor running a post answers 503 within publish_timeout + request_timeout, not never."""
    await api.store.create_session("alice", ["bob"], "g-5")
    started = time.monotonic()
    r = await api.as_user("alice", "POST", "/v1/sessions/g-5/messages", {"clientMsgId": "c-1", "body": 1})
    assert r.status == 503 and r.error_code == "unavailable"
    assert time.monotonic() - started < api.config.publish_timeout + api.config.request_timeout + 1.5
    assert api.resource.publisher.pending == 0


@pytest_twisted.ensureDeferred
async def test_history(api):
    """History pages like the history frame (beforeSeq exclusive, limit default 50, cap 200) for members and admin."""
    await api.store.create_session("alice", ["bob"], "g-6")
    stored = await api.store.store_messages(
        [Incoming("alice", f"h-{i}", "g-6", {"n": i}) for i in range(1, 206)])
    assert all(s.ok for s in stored)
    r = await api.as_user("bob", "GET", "/v1/sessions/g-6/messages")
    assert r.status == 200 and r.json["sessionId"] == "g-6"
    assert [m["seq"] for m in r.json["messages"]] == list(range(156, 206))
    assert set(r.json["messages"][0]) == {"msgId", "seq", "from", "clientMsgId", "body", "ts"}
    r = await api.admin("GET", "/v1/sessions/g-6/messages?limit=1000")
    assert [m["seq"] for m in r.json["messages"]] == list(range(6, 206))
    r = await api.as_user("alice", "GET", "/v1/sessions/g-6/messages?beforeSeq=10&limit=5")
    assert [(m["seq"], m["body"]) for m in r.json["messages"]] == [(i, {"n": i}) for i in range(5, 10)]
    r = await api.as_user("alice", "GET", "/v1/sessions/g-6/messages?beforeSeq=&limit=")
    assert len(r.json["messages"]) == 50
    for query in ("limit=0", "limit=-1", "limit=abc", "beforeSeq=-1", "beforeSeq=1.5", "limit=1e3",
                  "beforeSeq=99999999999999999999"):
        r = await api.admin("GET", f"/v1/sessions/g-6/messages?{query}")
        assert r.status == 400 and r.error_code == "bad_request", query
    r = await api.as_user("carol", "GET", "/v1/sessions/g-6/messages")
    assert r.status == 403
    r = await api.as_user("carol", "GET", "/v1/sessions/nope/messages")
    assert r.status == 404
    r = await api.as_user("carol", "GET", "/v1/sessions/p2p:alice:carol/messages")
    assert r.status == 200 and r.json == {"sessionId": "p2p:alice:carol", "messages": []}
    r = await api.admin("GET", "/v1/sessions/p2p:alice:carol/messages")
    assert r.status == 200 and r.json["messages"] == []
    r = await api.as_user("bob", "GET", "/v1/sessions/p2p:alice:carol/messages")
    assert r.status == 403


# --- users ---------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_user_sessions(api):
    """A user lists their own sessions with unread counts; another user's list is 403 (the admin sees any)."""
    await api.store.create_session("alice", ["bob"], "g-7")
    await api.store.create_session("bob", [], "g-8")
    await api.store.store_messages([Incoming("alice", "u-1", "g-7", 1), Incoming("alice", "u-2", "g-7", 2),
                                    Incoming("bob", "u-3", "g-7", 3)])
    await api.store.read("bob", "g-7", 1)
    r = await api.as_user("bob", "GET", "/v1/users/bob/sessions")
    assert r.status == 200 and r.json == {"sessions": [
        {"sessionId": "g-7", "kind": "group", "lastSeq": 3, "unread": 1},
        {"sessionId": "g-8", "kind": "group", "lastSeq": 0, "unread": 0}]}
    r = await api.admin("GET", "/v1/users/alice/sessions")
    assert r.json == {"sessions": [{"sessionId": "g-7", "kind": "group", "lastSeq": 3, "unread": 1}]}
    r = await api.as_user("alice", "GET", "/v1/users/bob/sessions")
    assert r.status == 403 and r.error_code == "forbidden"
    r = await api.admin("GET", "/v1/users/bad%20id/sessions")
    assert r.status == 400


@pytest_twisted.ensureDeferred
async def test_presence(api):
    """Presence lists connections on live gateways only, with device and auth time; any user may ask."""
    live, dead = str(uuid.uuid4()), str(uuid.uuid4())
    await api.redis.register_server(live, server_info("127.0.0.1", 1, 2, 100), 30)
    await api.redis.add_connections(live, [("alice", "10.0.0.1", 5000, conn_meta("phone", 1000, 2000)),
                                           ("alice", "10.0.0.2", 5001, conn_meta(None, 999, 2000))])
    await api.redis.add_connections(dead, [("alice", "10.0.0.3", 5002, conn_meta("web", 1001, 2000))])
    r = await api.as_user("bob", "GET", "/v1/users/alice/presence")
    assert r.status == 200 and r.json == {"userId": "alice", "online": True, "connections": [
        {"serverId": live, "device": None, "since": 999}, {"serverId": live, "device": "phone", "since": 1000}]}
    r = await api.admin("GET", "/v1/users/carol/presence")
    assert r.json == {"userId": "carol", "online": False, "connections": []}
    await api.redis.execute("DEL", api.redis.keys.server(live))  # the gateway died
    r = await api.as_user("alice", "GET", "/v1/users/alice/presence")
    assert r.json["online"] is False
    r = await api.admin("GET", "/v1/users/a%23b/presence")
    assert r.status == 400


# --- health and metrics ----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_health_metrics_openapi(api):
    """/healthz, /metrics and /openapi.json answer without a credential; metrics move when messages flow."""
    r = await api.call("GET", "/healthz")
    assert r.status == 200 and r.json["ok"] is True
    assert {k: v["state"] for k, v in r.json["dependencies"].items()} == {
        "redis": "up", "rabbitmq": "up", "postgresql": "up"}
    r = await api.call("GET", "/openapi.json")
    assert r.status == 200 and r.json["openapi"].startswith("3.") and "/v1/sessions/{id}/messages" in r.json["paths"]
    before = (await api.call("GET", "/metrics")).text
    await api.start_processor()
    await api.store.create_session("alice", [], "g-9")
    for i in range(3):
        assert (await api.as_user("alice", "POST", "/v1/sessions/g-9/messages",
                                  {"clientMsgId": f"m-{i}", "body": i})).status == 201
    assert (await api.as_user("alice", "POST", "/v1/sessions/g-9/messages",
                              {"clientMsgId": "m-0", "body": 0})).status == 200
    r = await api.call("GET", "/metrics")
    assert r.status == 200 and r.header("content-type").startswith("text/plain")
    after = r.text

    def moved(name, **labels):
        return metric_value(after, name, labels) - metric_value(before, name, labels)

    assert moved("imcluster_api_messages_total", result="created") == 3
    assert moved("imcluster_api_messages_total", result="duplicate") == 1
    assert moved("imcluster_http_requests_total", method="POST", route="/v1/sessions/{id}/messages",
                 status="201") == 3
    assert moved("imcluster_messages_stored_total") == 3  # the processor stores in this process

"""HTTP-API.md conformance, as an independent client author checks it: HTTP (and the wire protocol) only.

Real ``twistd imapi``, ``imgateway`` and ``improcessor`` processes (the
``cluster`` fixture); nothing here imports the API's code. What
tests/test_api_http.py and tests/test_api_process.py already cover (the API
in-process, store-level paging and limits, the HTTP publish reaching WS/TCP)
is not repeated: this file checks the contract's table row by row where those
do not (the error shape on every route, 404-before-403, ownership seen from
outside, de-duplication across transports, unread after a ``read`` frame,
presence after a gateway crash, /healthz with Redis gone, messages near the
client frame limit reaching WebSocket clients, larger ones refused) and validates every answer against
the shipped OpenAPI document.
"""

from __future__ import annotations

import io
import json
import time
import uuid

import jsonschema_rs
import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers

from tests.support.clients import connect_tcp, connect_ws
from tests.support.http import http_call
from tests.support.waiting import eventually

# starts processes: not part of the fast suite (-m "not slow")
pytestmark = pytest.mark.slow

ADMIN_KEY = "conf-admin-" + uuid.uuid4().hex
SMALL_BODY = 2048
#: the gateways' default client frame limit (PROTOCOL.md "Framing")
MAX_FRAME = 65536

ERROR_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 409: "conflict",
               413: "too_large", 429: "rate_limited", 503: "unavailable"}


# --- a client of the document ----------------------------------------------------------


def _to_json_schema(node, components):
    """OpenAPI 3.0 schema -> JSON Schema (``nullable``, ``#/components/schemas`` refs inlined)."""
    if isinstance(node, list):
        return [_to_json_schema(n, components) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        return _to_json_schema(components[node["$ref"].rsplit("/", 1)[1]], components)
    out = {k: _to_json_schema(v, components) for k, v in node.items() if k not in ("nullable", "example")}
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


class Contract:
    """The live /openapi.json: checks that every answer is one the document describes."""

    def __init__(self, doc: dict) -> None:
        self.doc = doc
        self.components = doc["components"]["schemas"]
        self.checked = 0

    def check(self, method: str, template: str, r) -> None:
        op = self.doc["paths"][template][method.lower()]
        assert str(r.status) in op["responses"], f"{method} {template}: {r.status} is not documented"
        content = op["responses"][str(r.status)].get("content", {})
        if "application/json" in content:
            assert r.header("content-type").startswith("application/json"), r.header("content-type")
            schema = _to_json_schema(content["application/json"]["schema"], self.components)
            errors = [str(e) for e in jsonschema_rs.validator_for(schema).iter_errors(r.json)]
            assert not errors, (method, template, r.status, r.json, errors)
        self.checked += 1


async def call(port, method, path, body=None, token=None, contract=None, template=None, **kw):
    r = await http_call(port, method, path, body, token, **kw)
    if r.status >= 400 and path != "/healthz":  # every error is {"error":{"code","message"}} in JSON
        assert (r.header("content-type") or "").startswith("application/json"), (method, path, r.body[:200])
        assert r.error_code == ERROR_CODES.get(r.status, r.error_code)
    if contract is not None and template is not None:
        contract.check(method, template, r)
    return r


async def next_message(client):
    """The next ``message_send`` with a msgId this client has not had (clients de-duplicate by msgId:
    PROTOCOL.md lets a duplicate post re-deliver the original)."""
    seen = client.__dict__.setdefault("_seen_msg_ids", set())
    while True:
        frame = await client.receive_type("message_send")
        if "kind" in frame:  # a 1:1 event (PROTOCOL.md 1.1: members changes here), not a message
            continue
        if frame["msgId"] not in seen:
            seen.add(frame["msgId"])
            return frame


async def start(cluster, gateway=False, processor=False, **api_opts):
    api_opts.setdefault("api_key", ADMIN_KEY)
    if processor:
        await cluster.start_processor()
    gw = await cluster.start_gateway() if gateway else None
    api = await cluster.start_api(**api_opts)
    doc = (await http_call(api.http_port, "GET", "/openapi.json")).json
    return api, gw, Contract(doc)


# --- errors, credentials, sessions, members -------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_errors_sessions_and_members(cluster, pg_schema):
    """A client written against HTTP-API.md gets the documented status and error body on every route and case."""
    # member changes are members events the processors store (PROTOCOL.md 1.1)
    api, _, c = await start(cluster, processor=True, max_body_size=SMALL_BODY)
    port = api.http_port
    alice, bob, carol = (cluster.token(u) for u in ("alice", "bob", "carol"))

    # 401: missing or bad credential, on every /v1 route (even for sessions that do not exist)
    routes = [("POST", "/v1/sessions", "/v1/sessions", {"members": ["bob"]}),
              ("GET", "/v1/sessions/nope", "/v1/sessions/{id}", None),
              ("POST", "/v1/sessions/nope/members", "/v1/sessions/{id}/members", {"add": ["x"]}),
              ("GET", "/v1/sessions/nope/messages", "/v1/sessions/{id}/messages", None),
              ("POST", "/v1/sessions/nope/messages", "/v1/sessions/{id}/messages", {"clientMsgId": "c", "body": 1}),
              ("GET", "/v1/users/alice/sessions", "/v1/users/{id}/sessions", None),
              ("GET", "/v1/users/alice/presence", "/v1/users/{id}/presence", None)]
    bad = [None, "nope", cluster.token("bad id"), cluster.token("alice", ttl=-60),
           cluster.token("alice")[:-2], ADMIN_KEY + "x"]
    for method, path, template, body in routes:
        for credential in bad:
            r = await call(port, method, path, body, credential, c, template)
            assert r.status == 401 and r.error_code == "unauthorized", (path, credential)

    # 400 malformed JSON and 413 too large on every route that takes a body
    for method, path, template, body in routes:
        if method != "POST":
            continue
        for raw in (b"{", b"not json", b'{"a":1}{'):
            r = await call(port, method, path, None, ADMIN_KEY, c, template, raw=raw)
            assert r.status == 400 and r.error_code == "bad_request", (path, raw)
        r = await call(port, method, path, {"pad": "x" * SMALL_BODY}, ADMIN_KEY, c, template)
        assert r.status == 413 and r.error_code == "too_large", path

    # 404 for an unknown route, in the JSON shape, anywhere on the server
    for path in ("/nope", "/v1/nope", "/v1/sessions/s/members/x", "/v1/users/alice", "/app/no-such-file.js",
                 "/app/no-such-dir/"):
        r = await call(port, "GET", path, None, ADMIN_KEY)
        assert r.status == 404 and r.error_code == "not_found", path
    for path in ("/app/", "/app/index.html", "/app/config.json", "/app"):  # the web chat is read-only
        r = await call(port, "POST", path, None, ADMIN_KEY)
        assert r.status == 405 and r.error_code == "method_not_allowed", path

    # one keep-alive connection, as client libraries pool them: errors leave it usable
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 1
    agent = Agent(reactor, pool=pool)
    try:
        for body, want in ((b'{"pad": "' + b"x" * SMALL_BODY + b'"}', 413), (b"{", 400), (b'{"members": ["bob"]}', 201),
                           (b'{"members": 5}', 400), (b'{"members": ["bob"]}', 201)):
            response = await agent.request(b"POST", f"http://127.0.0.1:{port}/v1/sessions".encode(),
                                           Headers({b"authorization": [b"Bearer " + ADMIN_KEY.encode()],
                                                    b"content-type": [b"application/json"]}),
                                           FileBodyProducer(io.BytesIO(body)))
            data = json.loads(await readBody(response))
            assert response.code == want and (want == 201 or data["error"]["code"] == ERROR_CODES[want]), data
    finally:
        await pool.closeCachedConnections()

    # POST /v1/sessions: 201, kind defaults to group, creator is member and owner, 409 on an existing id
    r = await call(port, "POST", "/v1/sessions", {"sessionId": "g1", "members": ["bob"]}, alice, c, "/v1/sessions")
    assert r.status == 201 and r.json == {"sessionId": "g1", "kind": "group", "members": ["alice", "bob"]}
    r = await call(port, "POST", "/v1/sessions", {"members": ["bob", "bob", "alice"]}, alice, c, "/v1/sessions")
    assert r.status == 201 and r.json["kind"] == "group" and r.json["members"] == ["alice", "bob"]
    assert r.json["sessionId"] and r.json["sessionId"] != "g1"
    for credential in (alice, bob, ADMIN_KEY):
        r = await call(port, "POST", "/v1/sessions", {"sessionId": "g1", "members": ["carol"]}, credential, c,
                       "/v1/sessions")
        assert r.status == 409 and r.error_code == "conflict"
    r = await call(port, "POST", "/v1/sessions", {"sessionId": "p2p:alice:carol", "members": ["alice"]}, carol, c,
                   "/v1/sessions")
    assert r.status == 201 and r.json == {"sessionId": "p2p:alice:carol", "kind": "p2p", "members": ["alice", "carol"]}
    r = await call(port, "POST", "/v1/sessions", {"sessionId": "p2p:alice:carol", "members": ["alice", "carol"]},
                   ADMIN_KEY, c, "/v1/sessions")
    assert r.status == 409
    r = await call(port, "POST", "/v1/sessions", {"sessionId": "p2p:bob:dave", "members": ["bob", "dave"]},
                   ADMIN_KEY, c, "/v1/sessions")
    assert r.status == 201 and r.json["kind"] == "p2p"

    # GET /v1/sessions/{id}: members and admin 200; a non-member 403; a session that does not exist 404 for all
    for credential in (alice, bob, ADMIN_KEY):
        r = await call(port, "GET", "/v1/sessions/g1", None, credential, c, "/v1/sessions/{id}")
        assert r.status == 200 and r.json == {"sessionId": "g1", "kind": "group", "members": ["alice", "bob"],
                                              "lastSeq": 0}
    r = await call(port, "GET", "/v1/sessions/g1", None, carol, c, "/v1/sessions/{id}")
    assert r.status == 403 and r.error_code == "forbidden"
    for credential in (alice, carol, ADMIN_KEY):
        for sid in ("nope", "p2p:carol:alice"):
            r = await call(port, "GET", f"/v1/sessions/{sid}", None, credential, c, "/v1/sessions/{id}")
            assert r.status == 404 and r.error_code == "not_found", (sid, credential)
            r = await call(port, "GET", f"/v1/sessions/{sid}/messages", None, credential, c,
                           "/v1/sessions/{id}/messages")
            assert r.status == 404, (sid, credential)
            r = await call(port, "POST", f"/v1/sessions/{sid}/members", {"add": ["x"]}, credential, c,
                           "/v1/sessions/{id}/members")
            assert r.status == 404, (sid, credential)
            # 404 before anything else about the message (even a sender the user may not name)
            for body in ({"clientMsgId": "c-1", "body": 1}, {"clientMsgId": "c-1", "body": 1, "from": "bob"}):
                r = await call(port, "POST", f"/v1/sessions/{sid}/messages", body, credential, c,
                               "/v1/sessions/{id}/messages")
                assert r.status == 404 and r.error_code == "not_found", (sid, credential, body)
    # an existing session the user may not see: 403 on every session route
    for method, path, template, body in routes[1:5]:
        r = await call(port, method, path.replace("nope", "g1"), body, carol, c, template)
        assert r.status == 403 and r.error_code == "forbidden", path

    # members: the owner (the creator) and the admin change them; a mere member may not
    r = await call(port, "POST", "/v1/sessions/g1/members", {"add": ["carol"]}, bob, c, "/v1/sessions/{id}/members")
    assert r.status == 403 and r.error_code == "forbidden"
    r = await call(port, "POST", "/v1/sessions/g1/members", {"add": ["carol", "dave"]}, alice, c,
                   "/v1/sessions/{id}/members")
    assert r.status == 200 and r.json == {"members": ["alice", "bob", "carol", "dave"]}
    r = await call(port, "POST", "/v1/sessions/g1/members", {"remove": ["dave"]}, carol, c,
                   "/v1/sessions/{id}/members")
    assert r.status == 403
    r = await call(port, "POST", "/v1/sessions/g1/members", {"remove": ["bob", "dave"]}, ADMIN_KEY, c,
                   "/v1/sessions/{id}/members")
    assert r.status == 200 and r.json == {"members": ["alice", "carol"]}
    r = await call(port, "GET", "/v1/sessions/g1", None, bob, c, "/v1/sessions/{id}")
    assert r.status == 403  # removed: can no longer see it
    # a session the admin created has no owner: no user may change its members
    r = await call(port, "POST", "/v1/sessions", {"sessionId": "g2", "members": ["alice", "bob"]}, ADMIN_KEY, c,
                   "/v1/sessions")
    assert r.status == 201 and r.json == {"sessionId": "g2", "kind": "group", "members": ["alice", "bob"]}
    r = await call(port, "POST", "/v1/sessions/g2/members", {"add": ["carol"]}, alice, c, "/v1/sessions/{id}/members")
    assert r.status == 403

    # read cursors: members and the admin; recall: no such message is 404, a non-member 403
    read = "/v1/sessions/{id}/read"
    for credential in (alice, carol, ADMIN_KEY):
        r = await call(port, "GET", "/v1/sessions/g1/read", None, credential, c, read)
        assert r.status == 200 and r.json == {"sessionId": "g1", "cursors": [
            {"userId": "alice", "seq": 0}, {"userId": "carol", "seq": 0}]}
    r = await call(port, "GET", "/v1/sessions/g1/read", None, bob, c, read)
    assert r.status == 403
    r = await call(port, "GET", "/v1/sessions/nope/read", None, ADMIN_KEY, c, read)
    assert r.status == 404
    recall = "/v1/sessions/{id}/messages/{msgId}/recall"
    for msg_id in ("123456789", "x"):
        r = await call(port, "POST", f"/v1/sessions/g1/messages/{msg_id}/recall", None, alice, c, recall)
        assert r.status == 404 and r.error_code == "not_found", msg_id
    r = await call(port, "POST", "/v1/sessions/g1/messages/1/recall", None, bob, c, recall)
    assert r.status == 403

    # a user's sessions: that user or the admin; presence: any user or the admin
    r = await call(port, "GET", "/v1/users/alice/sessions", None, bob, c, "/v1/users/{id}/sessions")
    assert r.status == 403 and r.error_code == "forbidden"
    for credential in (alice, ADMIN_KEY):
        r = await call(port, "GET", "/v1/users/alice/sessions", None, credential, c, "/v1/users/{id}/sessions")
        assert r.status == 200 and {s["sessionId"] for s in r.json["sessions"]} >= {"g1", "g2", "p2p:alice:carol"}
    for credential in (bob, ADMIN_KEY):
        r = await call(port, "GET", "/v1/users/alice/presence", None, credential, c, "/v1/users/{id}/presence")
        assert r.status == 200 and r.json == {"userId": "alice", "online": False, "connections": []}
    assert c.checked > 100


# --- messages, de-duplication, delivery, unread ------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_messages_dedup_delivery_and_unread(cluster, pg_schema):
    """Posting, paging, de-duplication across HTTP and the wire, live delivery and unread counts agree with the contract."""
    api, gw, c = await start(cluster, gateway=True, processor=True)
    port = api.http_port
    tok = {u: cluster.token(u) for u in ("alice", "bob", "carol")}
    msgs = "/v1/sessions/{id}/messages"
    r = await call(port, "POST", "/v1/sessions", {"sessionId": "room", "members": ["bob", "carol"]}, tok["alice"],
                   c, "/v1/sessions")
    assert r.status == 201
    alice = await connect_ws(gw.ws_url)
    assert (await alice.auth(tok["alice"], device="web"))["ok"]
    await alice.receive_type("sync_done")
    bob = await connect_tcp(gw.tcp_port)
    assert (await bob.auth(tok["bob"]))["ok"]
    await bob.receive_type("sync_done")

    # the admin, as `system` by default and as any user with `from`
    r = await call(port, "POST", "/v1/sessions/room/messages", {"clientMsgId": "k-1", "body": {"t": 1}}, ADMIN_KEY,
                   c, msgs)
    assert r.status == 201 and set(r.json) == {"msgId", "sessionId", "seq", "ts"} and r.json["seq"] == 1
    first = r.json
    for client in (alice, bob):
        frame = await next_message(client)
        assert (frame["msgId"], frame["from"], frame["seq"], frame["ts"]) == (
            first["msgId"], "system", 1, first["ts"])
    r = await call(port, "POST", "/v1/sessions/room/messages", {"clientMsgId": "k-2", "body": "as bob", "from": "bob"},
                   ADMIN_KEY, c, msgs)
    assert r.status == 201 and r.json["seq"] == 2
    # no connection sent it: every connection of every member gets it, bob's own included
    for client in (alice, bob):
        frame = await next_message(client)
        assert frame["msgId"] == r.json["msgId"] and frame["from"] == "bob"

    # de-duplication by (from, clientMsgId), across the wire and HTTP
    alice.send({"type": "message", "clientMsgId": "w-1", "sessionId": "room", "body": "over ws"})
    wire = await alice.receive_type("message_reply")
    assert wire["ok"] and wire["seq"] == 3
    await next_message(bob)
    for credential, body in ((tok["alice"], {"clientMsgId": "w-1", "body": "again"}),
                             (ADMIN_KEY, {"clientMsgId": "w-1", "body": "again", "from": "alice"})):
        r = await call(port, "POST", "/v1/sessions/room/messages", body, credential, c, msgs)
        assert r.status == 200 and r.json == {k: wire[k] for k in ("msgId", "sessionId", "seq", "ts")}
    r = await call(port, "POST", "/v1/sessions/room/messages", {"clientMsgId": "k-1", "body": "not a dup"},
                   tok["alice"], c, msgs)  # same clientMsgId, another sender: a new message
    assert r.status == 201 and r.json["seq"] == 4
    for client in (alice, bob):
        assert (await next_message(client))["seq"] == 4
    r = await call(port, "POST", "/v1/sessions/room/messages", {"clientMsgId": "k-1", "body": {"t": 1}}, ADMIN_KEY,
                   c, msgs)
    assert r.status == 200 and r.json == first
    # the same message posted five times at once: stored once, one 201 and four 200 with the original
    answers = await defer.gatherResults([defer.Deferred.fromCoroutine(call(
        port, "POST", "/v1/sessions/room/messages", {"clientMsgId": "burst", "body": i}, tok["carol"], c, msgs))
        for i in range(5)])
    assert sorted(a.status for a in answers) == [200, 200, 200, 200, 201]
    assert len({json.dumps(a.json, sort_keys=True) for a in answers}) == 1 and answers[0].json["seq"] == 5
    for client in (alice, bob):
        frame = await next_message(client)
        assert frame["clientMsgId"] == "burst" and frame["seq"] == 5
    # a user names no other sender; a non-member may not post
    r = await call(port, "POST", "/v1/sessions/room/messages", {"clientMsgId": "x-1", "body": 1, "from": "carol"},
                   tok["bob"], c, msgs)
    assert r.status == 403 and r.error_code == "forbidden"
    r = await call(port, "POST", "/v1/sessions/room/messages", {"clientMsgId": "x-1", "body": 1},
                   cluster.token("mallory"), c, msgs)
    assert r.status == 403

    # history: ascending, beforeSeq exclusive, for members and the admin, same frames as delivered
    for credential in (tok["carol"], ADMIN_KEY):
        r = await call(port, "GET", "/v1/sessions/room/messages", None, credential, c, msgs)
        assert r.status == 200 and r.json["sessionId"] == "room"
        assert [(m["seq"], m["from"], m["clientMsgId"]) for m in r.json["messages"]] == [
            (1, "system", "k-1"), (2, "bob", "k-2"), (3, "alice", "w-1"), (4, "alice", "k-1"), (5, "carol", "burst")]
    r = await call(port, "GET", "/v1/sessions/room/messages?beforeSeq=4&limit=2", None, tok["bob"], c, msgs)
    assert [m["seq"] for m in r.json["messages"]] == [2, 3]
    alice.send({"type": "history", "sessionId": "room", "beforeSeq": 4, "limit": 2})  # the same page on the wire
    page = await alice.receive_type("history_reply", skip=("message_send", "read_receipt"))
    assert page == {"type": "history_reply", **r.json}
    r = await call(port, "GET", "/v1/sessions/room/messages?beforeSeq=1", None, tok["bob"], c, msgs)
    assert r.json["messages"] == []
    r = await call(port, "GET", "/v1/sessions/room", None, tok["bob"], c, "/v1/sessions/{id}")
    assert r.json["lastSeq"] == 5

    # unread: messages above the user's read cursor that the user did not send; cursors move with `read`
    async def unread(user):
        r = await call(port, "GET", f"/v1/users/{user}/sessions", None, tok[user], c, "/v1/users/{id}/sessions")
        assert r.status == 200
        return {s["sessionId"]: (s["kind"], s["lastSeq"], s["unread"]) for s in r.json["sessions"]}

    assert (await unread("bob"))["room"] == ("group", 5, 4)    # seq 2 is his own
    assert (await unread("alice"))["room"] == ("group", 5, 3)  # 3 and 4 are hers
    assert (await unread("carol"))["room"] == ("group", 5, 4)  # 5 is hers
    bob.send({"type": "read", "sessionId": "room", "seq": 2})
    receipt = await alice.receive_type("read_receipt")
    assert receipt == {"type": "read_receipt", "sessionId": "room", "userId": "bob", "seq": 2}
    assert (await unread("bob"))["room"] == ("group", 5, 3)
    bob.send({"type": "read", "sessionId": "room", "seq": 1})  # a cursor never moves back
    await alice.receive_type("read_receipt")
    assert (await unread("bob"))["room"] == ("group", 5, 3)
    alice.send({"type": "read", "sessionId": "room", "seq": 1000})  # clamped to lastSeq
    receipt = await bob.receive_type("read_receipt")
    assert receipt["userId"] == "alice" and receipt["seq"] == 5
    assert (await unread("alice"))["room"] == ("group", 5, 0)

    # a p2p session is listed once it exists (its first message), for both users
    assert "p2p:alice:carol" not in await unread("alice")
    r = await call(port, "POST", "/v1/sessions/p2p:alice:carol/messages", {"clientMsgId": "p-1", "body": "hi"},
                   tok["alice"], c, msgs)
    assert r.status == 201 and r.json["sessionId"] == "p2p:alice:carol" and r.json["seq"] == 1
    p2p = r.json
    frame = await next_message(alice)  # her own connection: it did not send it
    assert frame["msgId"] == p2p["msgId"]
    assert (await unread("alice"))["p2p:alice:carol"] == ("p2p", 1, 0)
    assert (await unread("carol"))["p2p:alice:carol"] == ("p2p", 1, 1)
    r = await call(port, "POST", "/v1/sessions", {"sessionId": "p2p:alice:carol", "members": ["carol"]}, tok["alice"],
                   c, "/v1/sessions")
    assert r.status == 409 and r.error_code == "conflict"  # it exists now
    r = await call(port, "GET", "/v1/sessions/p2p:alice:carol", None, tok["carol"], c, "/v1/sessions/{id}")
    assert r.json == {"sessionId": "p2p:alice:carol", "kind": "p2p", "members": ["alice", "carol"], "lastSeq": 1}
    # carol was offline: the room's messages and the p2p message are in her sync
    carol = await connect_ws(gw.ws_url)
    assert (await carol.auth(tok["carol"]))["ok"]
    synced = await carol.receive_until("sync_done")
    assert [(f["sessionId"], f["seq"]) for f in synced if f["type"] == "message_send"] == [
        ("p2p:alice:carol", 1), ("room", 1), ("room", 2), ("room", 3), ("room", 4)]  # not her own 5

    # held to the size of a client's message frame (HTTP-API.md): one larger than a client could send
    # is 413, though the request body is far below max_body_size
    r = await call(port, "POST", "/v1/sessions/room/messages", {"clientMsgId": "big-200000", "body": "x" * 200_000},
                   ADMIN_KEY, c, msgs)
    assert r.status == 413 and r.error_code == "too_large"
    # delivered exactly like a client's message: also one near that limit (its message_send is larger
    # than a client frame may be), on WebSocket as on TCP
    for size in (MAX_FRAME - 80,):
        r = await call(port, "POST", "/v1/sessions/room/messages", {"clientMsgId": f"big-{size}", "body": "x" * size},
                       ADMIN_KEY, c, msgs)
        assert r.status == 201
        for client in (alice, bob, carol):
            frame = await next_message(client)
            assert frame["msgId"] == r.json["msgId"] and len(frame["body"]) == size
    carol.send({"type": "message", "clientMsgId": "near-limit", "sessionId": "room", "body": "y" * (MAX_FRAME - 90)})
    assert (await carol.receive_type("message_reply", skip=("message_send",)))["ok"]
    for client in (alice, bob):
        assert (await next_message(client))["clientMsgId"] == "near-limit"
    alice.send({"type": "history", "sessionId": "room", "limit": 3})  # a page far above a client frame
    page = await alice.receive_type("history_reply", skip=("message_send",))
    assert [m["clientMsgId"] for m in page["messages"]][-2:] == [f"big-{MAX_FRAME - 80}", "near-limit"]

    # a session a client created on the wire: the HTTP API sees it, its creator is its owner
    bob.send({"type": "session_create", "id": "r-1", "members": ["carol"], "sessionId": "wire-made"})
    reply = await bob.receive_type("session_reply", skip=("message_send", "read_receipt"))
    assert reply["ok"] and reply["members"] == ["bob", "carol"]
    r = await call(port, "GET", "/v1/sessions/wire-made", None, tok["carol"], c, "/v1/sessions/{id}")
    # lastSeq 1: the group's members event (PROTOCOL.md 1.1)
    assert r.json == {"sessionId": "wire-made", "kind": "group", "members": ["bob", "carol"], "lastSeq": 1}
    r = await call(port, "POST", "/v1/sessions/wire-made/members", {"add": ["alice"]}, tok["carol"], c,
                   "/v1/sessions/{id}/members")
    assert r.status == 403
    r = await call(port, "POST", "/v1/sessions/wire-made/members", {"add": ["alice"]}, tok["bob"], c,
                   "/v1/sessions/{id}/members")
    assert r.status == 200 and r.json == {"members": ["alice", "bob", "carol"]}
    r = await call(port, "POST", "/v1/sessions", {"sessionId": "wire-made", "members": []}, tok["alice"], c,
                   "/v1/sessions")
    assert r.status == 409

    # members are whom it is delivered to: a removed member gets nothing after the change
    r = await call(port, "POST", "/v1/sessions/room/members", {"remove": ["bob"]}, tok["alice"], c,
                   "/v1/sessions/{id}/members")
    assert r.status == 200 and r.json == {"members": ["alice", "carol"]}
    r = await call(port, "POST", "/v1/sessions/room/messages", {"clientMsgId": "after", "body": 1}, ADMIN_KEY, c, msgs)
    assert r.status == 201
    for client in (alice, carol):
        assert (await next_message(client))["clientMsgId"] == "after"
    # the removal reached bob as his last entry of the session (PROTOCOL.md 1.1); his delivery
    # may trail alice's and carol's of the next message, so wait for it
    def bobs_room():
        return [f for f in bob.received if f.get("type") == "message_send" and f["sessionId"] == "room"]

    await eventually(lambda: any(f.get("kind") == "members" and "bob" in f["body"]["removed"] for f in bobs_room()),
                     what="bob's removal event")
    room = bobs_room()
    assert room[-1]["kind"] == "members" and room[-1]["body"] == {"added": [], "removed": ["bob"]}
    r = await call(port, "POST", "/v1/sessions/p2p:bob:carol/messages", {"clientMsgId": "mark", "body": 1},
                   tok["carol"], c, msgs)
    assert r.status == 201
    assert (await next_message(bob))["clientMsgId"] == "mark"  # not "after"
    r = await call(port, "POST", "/v1/sessions/room/messages", {"clientMsgId": "x-2", "body": 1}, tok["bob"], c, msgs)
    assert r.status == 403 and r.error_code == "forbidden"
    for client in (alice, bob, carol):
        client.close()


# --- presence -------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_presence_drops_a_crashed_gateway(cluster, pg_schema):
    """Presence lists each live connection (serverId, device, since) and drops those of a gateway killed with SIGKILL."""
    api, gw1, c = await start(cluster, gateway=True)
    gw2 = await cluster.start_gateway()
    port = api.http_port
    presence = "/v1/users/{id}/presence"
    before = time.time()
    ws = await connect_ws(gw1.ws_url)
    first = await ws.auth(cluster.token("alice"), device="phone")
    tcp = await connect_tcp(gw2.tcp_port)
    second = await tcp.auth(cluster.token("alice"))
    assert first["ok"] and second["ok"] and first["serverId"] != second["serverId"]

    async def connections():
        r = await call(port, "GET", "/v1/users/alice/presence", None, cluster.token("bob"), c, presence)
        assert r.status == 200 and r.json["userId"] == "alice"
        assert r.json["online"] is bool(r.json["connections"])
        for conn in r.json["connections"]:
            assert set(conn) == {"serverId", "device", "since"}
            assert before - 1 <= conn["since"] <= time.time() + 1  # seconds since the epoch (openapi.json)
        return sorted((x["serverId"], x["device"]) for x in r.json["connections"])

    want = sorted([(first["serverId"], "phone"), (second["serverId"], None)])
    assert await eventually(lambda: defer_call(connections, want), 5.0, "both connections listed")
    assert await gw1.kill() == -9
    # until its key expires the crashed gateway may still be listed; then only the live one is
    await eventually(lambda: defer_call(connections, [(second["serverId"], None)]), 10.0,
                     "the crashed gateway's connection dropped")
    tcp.close()
    await tcp.closed
    await eventually(lambda: defer_call(connections, []), 5.0, "offline")
    r = await call(port, "GET", "/v1/users/alice/presence", None, ADMIN_KEY, c, presence)
    assert r.json == {"userId": "alice", "online": False, "connections": []}


async def _equals(fn, want):
    return (await fn()) == want


def defer_call(fn, want):
    """A Deferred firing with whether ``await fn()`` equals ``want`` (for ``eventually``)."""
    return defer.Deferred.fromCoroutine(_equals(fn, want))


# --- health, metrics, the document --------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_health_metrics_and_document(cluster, pg_schema):
    """/healthz is 200 with every dependency named, 503 naming Redis when it is unreachable; /metrics and /openapi.json parse."""
    from prometheus_client.parser import text_string_to_metric_families

    api, _, c = await start(cluster)
    # the admin keys may also be a list in the configuration file
    keys = ["conf-key-a-" + uuid.uuid4().hex, "conf-key-b-" + uuid.uuid4().hex]
    config_file = cluster.tmp_path / "imapi.toml"
    config_file.write_text(f"api_key = {json.dumps(keys)}\n")
    broken = await cluster.start_api(config=str(config_file), redis="redis://127.0.0.1:1/0", health_timeout=1.0,
                                     request_timeout=1.0, redis_timeout=1.0)
    r = await call(api.http_port, "GET", "/healthz", None, None, c, "/healthz")
    assert r.status == 200 and r.json["ok"] is True
    assert {k: v["state"] for k, v in r.json["dependencies"].items()} == {
        "redis": "up", "rabbitmq": "up", "postgresql": "up"}
    r = await call(broken.http_port, "GET", "/healthz", None, None, c, "/healthz")
    assert r.status == 503 and r.json["ok"] is False
    assert {k: v["state"] for k, v in r.json["dependencies"].items()} == {
        "redis": "down", "rabbitmq": "up", "postgresql": "up"}
    assert r.json["dependencies"]["redis"]["error"]
    # what needs Redis answers 503 unavailable (bounded), what does not still works
    started = time.monotonic()
    r = await call(broken.http_port, "GET", "/v1/users/alice/presence", None, keys[0], c, "/v1/users/{id}/presence")
    assert r.status == 503 and r.error_code == "unavailable"
    assert time.monotonic() - started < 4  # redis_timeout bounds it
    for key in keys:
        r = await call(broken.http_port, "POST", "/v1/sessions", {"members": ["bob"]}, key, c, "/v1/sessions")
        assert r.status == 201
    r = await call(broken.http_port, "POST", "/v1/sessions", {"members": ["bob"]}, ADMIN_KEY, c, "/v1/sessions")
    assert r.status == 401

    for port in (api.http_port, broken.http_port):
        r = await call(port, "GET", "/metrics", None, None, c, "/metrics")
        assert r.status == 200 and r.header("content-type").startswith("text/plain")
        names = {f.name for f in text_string_to_metric_families(r.text)}
        assert "imcluster_http_requests" in names, sorted(names)

    # the document: OpenAPI 3, every row of the contract's table, every reference resolvable
    r = await call(api.http_port, "GET", "/openapi.json", None, None, c, "/openapi.json")
    doc = r.json
    assert r.status == 200 and doc["openapi"].startswith("3.")
    table = {"/v1/sessions": {"post": "201"}, "/v1/sessions/{id}": {"get": "200"},
             "/v1/sessions/{id}/members": {"post": "200"},
             "/v1/sessions/{id}/messages": {"get": "200", "post": "201"},
             "/v1/users/{id}/sessions": {"get": "200"}, "/v1/users/{id}/presence": {"get": "200"},
             "/healthz": {"get": "200"}, "/metrics": {"get": "200"}}
    for path, ops in table.items():
        for method, status in ops.items():
            assert status in doc["paths"][path][method]["responses"], (path, method)
            if path.startswith("/v1"):
                assert "401" in doc["paths"][path][method]["responses"], (path, method)
    assert "200" in doc["paths"]["/v1/sessions/{id}/messages"]["post"]["responses"]  # a duplicate
    assert "503" in doc["paths"]["/healthz"]["get"]["responses"]
    assert "409" in doc["paths"]["/v1/sessions"]["post"]["responses"]

    def refs(node):
        if isinstance(node, dict):
            if "$ref" in node:
                yield node["$ref"]
            for v in node.values():
                yield from refs(v)
        elif isinstance(node, list):
            for v in node:
                yield from refs(v)

    for ref in refs(doc):
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in doc["components"]["schemas"]
    enum = set(doc["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"]["enum"])
    assert set(ERROR_CODES.values()) <= enum
    json.dumps(doc)  # plain JSON

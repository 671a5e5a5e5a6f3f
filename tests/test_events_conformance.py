"""Black-box conformance of a real cluster to PROTOCOL.md 1.1: events in the session's order, delivered state.

Written against PROTOCOL.md "Version 1.1 additions" ("Events in the session's
order", "Delivery state of one's own messages") and HTTP-API.md (HTTP recall,
``GET /v1/sessions/{id}/read``, member changes), as an independent client
author would: real ``twistd imgateway`` (two), ``improcessor`` (with
``recall_window`` 3 s, so that "after the window" fits in a test) and
``imapi`` processes, raw WebSocket, TCP and HTTP streaming clients. The
frame statements run on every transport of tests/test_protocol_conformance.py.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import defer

from tests.support.bus import cleanup_namespace
from tests.support.cluster import Cluster, _delete_redis_prefix
from tests.support.http import http_call
from tests.support.ids import POSTGRES_DSN, unique
from tests.support.postgres import drop_schema
from tests.support.waiting import sleep
from tests.test_protocol_conformance import (
    QUIET, TRANSPORTS, WAIT, Conn, Env, acknowledged, create_session, login, p2p, users,
)

pytestmark = pytest.mark.slow

RECALL_WINDOW = 3.0
ADMIN_KEY = "events-admin-" + unique("k")


class EventsEnv(Env):
    """The module's cluster: two gateways, a processor with a short recall window, an imapi."""

    def __init__(self, cluster: Cluster, gw, gw2, api) -> None:
        super().__init__(cluster, gw, gw2, None)
        self.api = api

    def http(self, method: str, path: str, body=None, user: str | None = None):
        return defer.Deferred.fromCoroutine(http_call(
            self.api.http_port, method, path, body, ADMIN_KEY if user is None else self.token(user)))


@pytest_twisted.async_yield_fixture(scope="module")
async def env(tmp_path_factory):
    from imcluster.db import apply_migrations_sync

    namespace = unique("imev")
    prefix = unique("imev:") + ":"
    schema = unique("imt_ev")
    apply_migrations_sync(POSTGRES_DSN, schema, 10.0)
    cluster = Cluster(tmp_path_factory.mktemp("events"), namespace, prefix, schema)
    try:
        gws = await defer.gatherResults([
            cluster.start_gateway(rate_limit=2000, rate_burst=2000),
            cluster.start_gateway(rate_limit=2000, rate_burst=2000),
        ], consumeErrors=True)
        await cluster.start_processor(recall_window=RECALL_WINDOW)
        api = await cluster.start_api(api_key=ADMIN_KEY)
        yield EventsEnv(cluster, *gws, api)
    finally:
        await cluster.shutdown()
        if cluster.processes:
            print(cluster.report())
        await cleanup_namespace(namespace, cluster.extra_queues, cluster.amqp_url)
        await _delete_redis_prefix(prefix)
        drop_schema(schema)


async def next_send(conn: Conn, timeout: float = WAIT, **match) -> dict:
    """The next ``message_send`` whose fields equal ``match`` (``kind=None``: a plain message)."""
    while True:
        frame = await conn.next("message_send", timeout)
        if all(frame.get(k) == v for k, v in match.items()):
            return frame


async def quiet(conn: Conn, seconds: float = QUIET) -> list[dict]:
    """The frames ``conn`` receives within ``seconds`` (none expected by the caller, usually)."""
    before = len(conn.client.received)
    await sleep(seconds)
    return conn.client.received[before:]


async def group(env, transport: str, n: int = 2) -> tuple[list[str], list[Conn], str]:
    """``n`` users logged in (the second on the other gateway), a group of them created by the first."""
    names = users(n)
    conns = [await login(env, u, transport, gw=env.gw2 if i == 1 else env.gw) for i, u in enumerate(names)]
    sid = (await create_session(conns[0], names[1:], unique("room")))["sessionId"]
    return names, conns, sid


# ====================================================================== membership events


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest_twisted.ensureDeferred
async def test_session_create_is_a_members_event_at_seq_1(env, transport):
    """A member would learn of a new group only by polling: no members event, or one out of seq."""
    (alice, bob), (a, b), sid = await group(env, transport)
    ev = await next_send(b, sessionId=sid)
    assert ev["kind"] == "members" and ev["seq"] == 1 and ev["from"] == alice and "ref" not in ev
    assert ev["body"] == {"added": sorted([alice, bob]), "removed": []}
    b.send({"type": "message_send_reply", "msgIds": [ev["msgId"]]})  # a version-1 ack takes events too
    await acknowledged(env, bob, [ev["msgId"]])
    m = await a.message(sid, "first")
    assert m["seq"] == 2
    history = (await b.history(sid))["messages"]
    assert [(e["seq"], e.get("kind")) for e in history] == [(1, "members"), (2, None)]
    a.close()
    b.close()


@pytest_twisted.ensureDeferred
async def test_http_member_change_reaches_members_and_the_removed_one_last(env):
    """A removed member would miss its removal, or keep receiving (live, in sync or in history) after it."""
    alice, bob, carol, dave = users(4)
    a = await login(env, alice, "ws")
    b = await login(env, bob, "tcp", gw=env.gw2)
    sid = (await create_session(a, [bob], unique("room")))["sessionId"]
    await next_send(b, kind="members", seq=1)
    r = await env.http("POST", f"/v1/sessions/{sid}/members", {"add": [carol, dave], "remove": [bob]}, user=alice)
    assert r.status == 200 and r.json == {"members": sorted([alice, carol, dave])}
    for conn in (a, b):
        ev = await next_send(conn, kind="members", seq=2)
        assert ev["body"] == {"added": sorted([carol, dave]), "removed": [bob]}
    after = await a.message(sid, "after bob left")
    assert after["seq"] == 3
    assert [f for f in await quiet(b, 1.0) if f.get("sessionId") == sid] == []
    # nothing changes: no event
    r = await env.http("POST", f"/v1/sessions/{sid}/members", {"add": [carol]})
    assert r.status == 200 and r.json["members"] == sorted([alice, carol, dave])
    # offline carol syncs both events and the message, in seq; bob's history is closed now
    c = await login(env, carol, "ws")
    synced = [f for f in c.sync if f["sessionId"] == sid]
    assert [(f["seq"], f.get("kind")) for f in synced] == [(2, "members"), (3, None)]
    b.send({"type": "history", "sessionId": sid, "id": "h"})
    assert (await b.next("error"))["code"] == "not_member"
    r = await env.http("POST", f"/v1/sessions/{sid}/members", {"add": [bob]}, user=carol)
    assert r.status == 403
    for conn in (a, b, c):
        conn.close()


# ====================================================================== recall and edit


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest_twisted.ensureDeferred
async def test_recall_within_the_window(env, transport):
    """A recall would not reach the members as the next entry, or history would still show the body."""
    (alice, bob), (a, b), sid = await group(env, transport)
    m = await a.message(sid, {"text": "oops"})
    await next_send(b, msgId=m["msgId"])
    reply = await a.request({"type": "recall", "id": "r-1", "msgId": m["msgId"]}, "recall_reply")
    assert reply == {"type": "recall_reply", "id": "r-1", "ok": True, "msgId": reply["msgId"],
                     "sessionId": sid, "seq": m["seq"] + 1}
    ev = await next_send(b, kind="recall")
    assert ev == {"type": "message_send", "msgId": reply["msgId"], "sessionId": sid, "seq": m["seq"] + 1,
                  "from": alice, "clientMsgId": ev["clientMsgId"], "kind": "recall", "ref": m["msgId"],
                  "body": None, "ts": ev["ts"]}
    history = (await b.history(sid))["messages"]
    original = next(e for e in history if e["msgId"] == m["msgId"])
    assert original["recalled"] is True and original["body"] is None
    assert history[-1]["kind"] == "recall" and history[-1]["ref"] == m["msgId"]
    # recalling it again answers the same event
    again = await a.request({"type": "recall", "id": "r-2", "msgId": m["msgId"]}, "recall_reply")
    assert again["ok"] is True and again["msgId"] == reply["msgId"]
    a.close()
    b.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest_twisted.ensureDeferred
async def test_recall_and_edit_refusals(env, transport):
    """Another member, an unknown msgId, an outsider or an event could be recalled or edited."""
    (alice, bob), (a, b), sid = await group(env, transport)
    m = await a.message(sid, "mine")
    no = {"type": "recall_reply", "ok": False}
    reply = await b.request({"type": "recall", "id": 7, "msgId": m["msgId"]}, "recall_reply")
    assert reply == {**no, "id": 7, "error": {"code": "not_allowed", "message": reply["error"]["message"]}}
    reply = await b.request({"type": "edit", "id": "e", "msgId": m["msgId"], "body": "x"}, "edit_reply")
    assert reply["ok"] is False and reply["error"]["code"] == "not_allowed" and reply["id"] == "e"
    reply = await a.request({"type": "recall", "id": "u", "msgId": "987654321987"}, "recall_reply")
    assert reply["error"]["code"] == "no_message"
    outsider = await login(env, users(1)[0], transport)
    reply = await outsider.request({"type": "recall", "id": "o", "msgId": m["msgId"]}, "recall_reply")
    assert reply["error"]["code"] == "no_message"
    ev = await a.request({"type": "edit", "id": "e1", "msgId": m["msgId"], "body": "mine!"}, "edit_reply")
    assert ev["ok"] is True
    for frame in ({"type": "recall", "id": "x", "msgId": ev["msgId"]},
                  {"type": "edit", "id": "x", "msgId": ev["msgId"], "body": "y"}):
        reply = await a.request(frame, frame["type"] + "_reply")
        assert reply["ok"] is False and reply["error"]["code"] == "not_allowed", frame
    # a malformed one is a bad frame, as any other
    a.send({"type": "edit", "id": "bad", "msgId": m["msgId"]})
    assert (await a.next("error"))["code"] == "bad_frame"
    for conn in (a, b, outsider):
        conn.close()


@pytest_twisted.ensureDeferred
async def test_recall_after_the_window_is_not_allowed(env):
    """A sender could take back a message long after the others read it."""
    (alice, bob), (a, b), sid = await group(env, "ws")
    m = await a.message(sid, "said")
    await sleep(RECALL_WINDOW + 0.5)
    reply = await a.request({"type": "recall", "id": "late", "msgId": m["msgId"]}, "recall_reply")
    assert reply["ok"] is False and reply["error"]["code"] == "not_allowed"
    # editing is allowed for a day
    reply = await a.request({"type": "edit", "id": "e", "msgId": m["msgId"], "body": "still"}, "edit_reply")
    assert reply["ok"] is True
    # the admin key recalls any message at any time, over HTTP
    r = await env.http("POST", f"/v1/sessions/{sid}/messages/{m['msgId']}/recall")
    assert r.status == 201 and set(r.json) == {"msgId", "seq"} and r.json["seq"] == reply["seq"] + 1
    ev = await next_send(b, kind="recall")
    assert ev["msgId"] == r.json["msgId"] and ev["from"] == "system" and ev["ref"] == m["msgId"]
    a.close()
    b.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest_twisted.ensureDeferred
async def test_edit_reaches_members_and_history_shows_the_latest(env, transport):
    """An edit would not reach the members, or history would show the first body."""
    (alice, bob), (a, b), sid = await group(env, transport)
    m = await a.message(sid, {"text": "teh"})
    reply = await a.request({"type": "edit", "id": "e-1", "msgId": m["msgId"], "body": {"text": "the"}},
                            "edit_reply")
    assert reply == {"type": "edit_reply", "id": "e-1", "ok": True, "msgId": reply["msgId"], "sessionId": sid,
                     "seq": m["seq"] + 1}
    ev = await next_send(b, kind="edit")
    assert ev["ref"] == m["msgId"] and ev["body"] == {"text": "the"} and ev["from"] == alice
    await a.request({"type": "edit", "id": "e-2", "msgId": m["msgId"], "body": {"text": "The"}}, "edit_reply")
    history = (await b.history(sid))["messages"]
    original = next(e for e in history if e["msgId"] == m["msgId"])
    assert original["body"] == {"text": "The"} and original["edited"] is True
    assert [e.get("kind") for e in history if e["seq"] > m["seq"]] == ["edit", "edit"]
    a.close()
    b.close()


@pytest_twisted.ensureDeferred
async def test_offline_member_syncs_events_in_seq_and_they_are_not_unread(env):
    """An offline member would miss events, get them out of seq, or see them in its unread badge."""
    alice, bob = users(2)
    a = await login(env, alice, "tcp")
    sid = (await create_session(a, [bob], unique("room")))["sessionId"]
    m1 = await a.message(sid, "one")
    m2 = await a.message(sid, "two")
    await a.request({"type": "recall", "id": "r", "msgId": m1["msgId"]}, "recall_reply")
    await a.request({"type": "edit", "id": "e", "msgId": m2["msgId"], "body": "2"}, "edit_reply")
    r = await env.http("GET", f"/v1/users/{bob}/sessions", user=bob)
    [listed] = [s for s in r.json["sessions"] if s["sessionId"] == sid]
    # the two messages are unread (the recalled one too: it is a message); the events are not
    assert listed["lastSeq"] == 5 and listed["unread"] == 2
    b = await login(env, bob, "ws", gw=env.gw2)
    synced = [f for f in b.sync if f["sessionId"] == sid]
    assert [(f["seq"], f.get("kind")) for f in synced] == [
        (1, "members"), (2, None), (3, None), (4, "recall"), (5, "edit")]
    assert b.done["count"] == len(b.sync)
    b.send({"type": "message_send_reply", "msgIds": [f["msgId"] for f in synced]})
    await acknowledged(env, bob, [f["msgId"] for f in synced])
    b.close()
    b = await login(env, bob, "ws")
    assert [f for f in b.sync if f["sessionId"] == sid] == []
    a.close()
    b.close()


# ====================================================================== delivered state


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest_twisted.ensureDeferred
async def test_delivered_flag_flips_and_a_receipt_arrives(env, transport):
    """The sender of a 1:1 message would never learn that it reached the other phone."""
    alice, bob = users(2)
    a = await login(env, alice, transport)
    a2 = await login(env, alice, "tcp", gw=env.gw2)  # alice's other device
    sid = p2p(alice, bob)
    m = await a.message(sid, "are you there?")
    history = (await a.history(sid))["messages"]
    assert history[-1]["msgId"] == m["msgId"] and history[-1]["delivered"] is False
    b = await login(env, bob, transport, gw=env.gw2)
    [synced] = [f for f in b.sync if f["msgId"] == m["msgId"]]
    b.send({"type": "message_send_reply", "msgIds": [synced["msgId"]]})
    for conn in (a, a2):
        receipt = await conn.next("delivery_receipt")
        assert receipt == {"type": "delivery_receipt", "sessionId": sid, "userId": bob, "msgIds": [m["msgId"]]}
    history = (await a.history(sid))["messages"]
    assert history[-1]["delivered"] is True
    # the reader's own list carries no delivered flag on the other's messages
    assert "delivered" not in (await b.history(sid))["messages"][-1]
    r = await env.http("GET", f"/v1/sessions/{sid}/messages", user=alice)
    assert r.json["messages"][-1]["delivered"] is True
    # a group has no delivered state
    for conn in (a, a2, b):
        conn.close()


# ====================================================================== HTTP


@pytest_twisted.ensureDeferred
async def test_http_recall_and_read_cursors(env):
    """HTTP recall would let others recall, or GET .../read would hide members' cursors."""
    alice, bob, carol = users(3)
    a = await login(env, alice, "ws")
    sid = (await create_session(a, [bob], unique("room")))["sessionId"]
    m = await a.message(sid, "x")
    r = await env.http("POST", f"/v1/sessions/{sid}/messages/{m['msgId']}/recall", user=bob)
    assert r.status == 403 and r.error_code == "forbidden"
    r = await env.http("POST", f"/v1/sessions/{sid}/messages/{m['msgId']}/recall", user=carol)
    assert r.status == 403
    r = await env.http("POST", f"/v1/sessions/{sid}/messages/999999999999/recall", user=alice)
    assert r.status == 404
    r = await env.http("POST", f"/v1/sessions/{sid}/messages/{m['msgId']}/recall", user=alice)
    assert r.status == 201 and r.json["seq"] == m["seq"] + 1
    a.send({"type": "read", "sessionId": sid, "seq": 3})
    r = await env.http("GET", f"/v1/sessions/{sid}/read", user=bob)
    assert r.status == 200 and r.json["sessionId"] == sid
    assert [c["userId"] for c in r.json["cursors"]] == sorted([alice, bob])
    for _ in range(50):
        r = await env.http("GET", f"/v1/sessions/{sid}/read")
        if {c["userId"]: c["seq"] for c in r.json["cursors"]}[alice] == 3:
            break
        await sleep(0.1)
    assert {c["userId"]: c["seq"] for c in r.json["cursors"]} == {alice: 3, bob: 0}
    assert (await env.http("GET", f"/v1/sessions/{sid}/read", user=carol)).status == 403
    assert (await env.http("GET", "/v1/sessions/nope-nope/read")).status == 404
    a.close()

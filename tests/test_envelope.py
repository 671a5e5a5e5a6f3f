"""imcluster.envelope: the daemons' RabbitMQ wire, built and parsed in one place."""

from __future__ import annotations

import json

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from imcluster import envelope as e
from imcluster import protocol

GW = "6f1c2a8e-1111-4222-8333-944455556666"
API = "00000000-0000-4000-8000-000000000001"
CONN = f"{GW}##10.0.0.7##40001"
TS = 1_764_160_000_123
MESSAGE = {"type": "message", "clientMsgId": "c-1", "sessionId": "room", "body": {"text": "héllo ☃"}}


def round_trip(*items: e.Item) -> list[e.Item]:
    return e.parse_items(e.items_body([i.encode() for i in items]))


# --- gateway -> processors: items


def test_frame_item_round_trip():
    """A client's frame would reach the processors changed, or attributed to someone else."""
    sent = e.frame_item("alice", GW, CONN, TS, MESSAGE)
    [got] = round_trip(sent)
    assert (got.kind, got.user_id, got.server_id, got.conn_id, got.ts) == (e.FRAME, "alice", GW, CONN, TS)
    assert got.frame == MESSAGE and got.type == "message" and got.error is None
    assert not got.api and not got.trusted


def test_item_bytes_are_the_gateways():
    """Processors of another version would not read what a gateway publishes."""
    raw = e.frame_item("alice", GW, CONN, TS, {"type": "history", "sessionId": "s"}).encode()
    assert raw == (b'{"kind":"frame","userId":"alice","serverId":"%s","connId":"%s","ts":%d,'
                   b'"frame":{"type":"history","sessionId":"s"}}' % (GW.encode(), CONN.encode(), TS))
    # text beyond ASCII travels as UTF-8, as in PROTOCOL.md's frames (and older processors read it)
    encoded = e.frame_item("alice", GW, CONN, TS, MESSAGE).encode()
    assert "héllo ☃".encode() in encoded and json.loads(encoded)["frame"] == MESSAGE
    # a lone surrogate from a client cannot break the batch's UTF-8: that item is ASCII-escaped
    lone = {**MESSAGE, "body": "\ud800"}
    lone_encoded = e.frame_item("alice", GW, CONN, TS, lone).encode()
    assert lone_encoded.isascii() and b"\\ud800" in lone_encoded
    [got] = round_trip(e.frame_item("alice", GW, CONN, TS, lone))
    assert got.frame is None and got.error["error"]["code"] == protocol.BAD_FRAME  # answered: a broken batch is not
    assert e.sync_item("bob", GW, CONN, TS).encode() == (
        b'{"kind":"sync","userId":"bob","serverId":"%s","connId":"%s","ts":%d}' % (GW.encode(), CONN.encode(), TS))


def test_item_values_orjson_cannot_write_or_read_alike_round_trip_exactly():
    """A body with an integer beyond 64 bits would reach its recipients as a float (or be refused)."""
    big = {**MESSAGE, "body": {"n": 2**70, "m": -(2**64), "f": 0.1, "t": "é\u2028"}}
    encoded = e.frame_item("alice", GW, CONN, TS, big).encode()
    assert b'"n":1180591620717411303424' in encoded
    [got] = round_trip(e.frame_item("alice", GW, CONN, TS, big))
    assert got.frame == big and type(got.frame["body"]["n"]) is int
    # every batch the standard library read, the fast path reads alike (or leaves to it)
    for body in (b'{"v":1,"items":[{"x":1e400}]}', b'{"v":1,"items":[{"x":NaN}]}',
                 b'\xef\xbb\xbf{"v":1,"items":[{"x":"\\ud800"}]}', b'{"v":1,"items":[{"x":-0.0,"x":2}]}'):
        assert repr(e._batch_items(body)) == repr(json.loads(body)["items"])


def test_every_forwarded_frame_type_round_trips():
    """A frame type the processors handle would be refused on its way from the gateway."""
    frames = [MESSAGE, {"type": "message_send_reply", "msgIds": ["1", "2"]},
              {"type": "history", "sessionId": "room", "limit": 20, "id": "h"},
              {"type": "read", "sessionId": "room", "seq": 3},
              {"type": "session_create", "members": ["bob"], "id": "r"}]
    got = round_trip(*(e.frame_item("alice", GW, CONN, TS, f) for f in frames))
    assert [g.type for g in got] == [f["type"] for f in frames]
    assert all(g.error is None for g in got)
    assert {f["type"] for f in frames} <= set(protocol.FORWARDED_TYPES)


def test_sync_item_round_trip():
    """A sync request would be lost, and a reconnecting client never get its backlog."""
    [got] = round_trip(e.sync_item("bob", GW, CONN, TS))
    assert (got.kind, got.user_id, got.server_id, got.conn_id, got.ts, got.frame) == (e.SYNC, "bob", GW, CONN, TS, None)


def test_resync_item_round_trip():
    """A gateway's re-sync would lose the time its loss began, and a processor could not heal other devices."""
    sent = e.sync_item("bob", GW, CONN, TS, resync=True, since=TS - 60_000)
    assert sent.encode().endswith(b',"resync":true,"since":%d}' % (TS - 60_000))
    [got] = round_trip(sent)
    assert (got.kind, got.resync, got.since) == (e.SYNC, True, TS - 60_000)
    [plain] = round_trip(e.sync_item("bob", GW, CONN, TS))
    assert (plain.resync, plain.since) == (False, None)
    raw = {**e.sync_item("bob", GW, CONN, TS, resync=True).to_json(), "since": "yesterday"}
    [odd] = e.parse_items(json.dumps({"v": 1, "items": [raw]}).encode())
    assert (odd.resync, odd.since) == (True, None)  # an implausible since is ignored, the sync kept


def test_api_item_round_trip_and_trust():
    """An imapi's admin message would be refused, or a gateway's client could claim imapi's trust."""
    conn = e.api_conn_id(API, 17)
    sent = e.frame_item("system", API, conn, TS, MESSAGE, trusted=True)
    assert sent.encode().endswith(b',"trusted":true}')  # after the frame, as imapi always sent it
    [got] = round_trip(sent)
    assert got.api and got.trusted and got.conn_id == conn and got.frame == MESSAGE
    # "trusted" from anything but an API connection is ignored
    [forged] = round_trip(e.frame_item("mallory", GW, CONN, TS, MESSAGE, trusted=True))
    assert not forged.api and not forged.trusted
    [untrusted] = round_trip(e.frame_item("bob", API, e.api_conn_id(API, 18), TS, MESSAGE))
    assert untrusted.api and not untrusted.trusted


def test_invalid_frames_are_answered_not_dropped():
    """A client that sent a bad frame would wait forever instead of getting bad_frame."""
    bad = e.frame_item("alice", GW, CONN, TS, {"type": "message", "sessionId": "room"})  # no clientMsgId, no body
    not_ours = e.frame_item("alice", GW, CONN, TS, {"type": "ping"})
    got = round_trip(bad, not_ours)
    assert [g.frame for g in got] == [None, None]
    assert [g.error["type"] for g in got] == ["error", "error"]
    assert [g.error["code"] for g in got] == [protocol.BAD_FRAME, protocol.BAD_FRAME]


@pytest.mark.parametrize("ts", [None, "1764160000123", True, 12, 10**14, -5, 1.5e12])
def test_implausible_ts_is_ignored(ts):
    """A gateway's broken clock would date messages in 1970 or the far future."""
    raw = e.sync_item("bob", GW, CONN, TS).to_json()
    raw["ts"] = ts
    [got] = e.parse_items(json.dumps({"v": 1, "items": [raw]}).encode())
    assert got.ts is None


@pytest.mark.parametrize("change", [
    {"kind": "other"}, {"kind": None}, {"userId": "a b"}, {"userId": ""}, {"userId": 7},
    {"serverId": ""}, {"serverId": "a#b"}, {"serverId": "x" * 65}, {"serverId": None},
    {"connId": None}, {"connId": "other##10.0.0.7##40001"}, {"connId": GW}, {"connId": GW + "##" + "1" * 200},
])
def test_items_naming_no_usable_connection_are_dropped(change):
    """An item nobody can be answered for would be processed, or break the whole batch."""
    good = e.sync_item("bob", GW, CONN, TS).to_json()
    bad = {**good, **change}
    got = e.parse_items(json.dumps({"v": 1, "items": [bad, good, "not an object"]}).encode())
    assert [(g.kind, g.conn_id) for g in got] == [(e.SYNC, CONN)]


@pytest.mark.parametrize("body, message", [
    (b"", "not JSON"),
    (b"\xff{", "not JSON"),
    (b'{"v":1,"items":[' + b"[" * 100_000 + b"]" * 100_000 + b"]}", "not JSON"),
    (None, "not JSON"),
    (b"[]", 'not a {"v":1,"items":[...]} batch'),
    (b'"v"', 'not a {"v":1,"items":[...]} batch'),
    (b'{"items":[]}', 'not a {"v":1,"items":[...]} batch'),
    (b'{"v":2,"items":[]}', 'not a {"v":1,"items":[...]} batch'),
    (b'{"v":"1","items":[]}', 'not a {"v":1,"items":[...]} batch'),
    (b'{"v":1,"items":{}}', 'not a {"v":1,"items":[...]} batch'),
    (b'{"v":1}', 'not a {"v":1,"items":[...]} batch'),
])
def test_malformed_batches_are_rejected(body, message):
    """A body that is not a batch would be retried forever instead of dead-lettered."""
    for parse in (e.parse_items, e.parse_deliveries):
        with pytest.raises(e.MalformedBatch) as info:
            parse(body)
        assert str(info.value).startswith(message)
    assert issubclass(e.MalformedBatch, ValueError)


def test_empty_batch_is_a_batch():
    """An empty batch would be dead-lettered as poison."""
    assert e.parse_items(e.items_body([])) == []
    assert e.parse_deliveries(e.deliveries_body([])) == []


# --- processors -> gateway: deliveries


def _frames(*frames: dict) -> list[str]:
    return [protocol.encode(f) for f in frames]


def test_deliveries_round_trip():
    """A gateway would write frames to the wrong connections, or out of order."""
    send = {"type": "message_send", "msgId": "1", "sessionId": "room", "seq": 1, "from": "alice",
            "clientMsgId": "c-1", "body": {"text": "héllo"}, "ts": TS}
    reply = {"type": "message_reply", "ok": True, "clientMsgId": "c-1", "msgId": "1", "sessionId": "room",
             "seq": 1, "ts": TS}
    other = f"{GW}##::1##7"
    entries = [([CONN], _frames(reply)), ([CONN, other], _frames(send, {"type": "sync_done", "count": 1}))]
    got = e.parse_deliveries(e.deliveries_body(entries))
    assert [(d.conn_ids, d.frames) for d in got] == [
        ([CONN], [reply]), ([CONN, other], [send, {"type": "sync_done", "count": 1}])]
    assert [d.to_json() for d in got] == json.loads(e.deliveries_body(entries))["items"]


def test_delivery_bytes_are_the_processors():
    """Gateways of another version would not read what a processor publishes."""
    frames = _frames({"type": "message_send", "body": "é"}, {"type": "sync_done", "count": 1})
    conns = [CONN, f"{GW}##::1##7"]
    # exactly what Outbox.body and the sync page wrote before they shared this function
    before = ('{"v":1,"items":[{"connIds":%s,"frames":[%s]}]}' % (json.dumps(conns), ",".join(frames))).encode("utf-8")
    assert e.deliveries_body([(conns, frames)]) == before == e.delivery_body(conns, frames)
    assert b'"connIds":["%s", "%s"]' % (conns[0].encode(), conns[1].encode()) in before
    assert e.deliveries_body([(conns, frames), ([CONN], frames[:1])]) == (
        b'{"v":1,"items":[{"connIds":%s,"frames":[%s]},{"connIds":["%s"],"frames":[%s]}]}'
        % (json.dumps(conns).encode(), ",".join(frames).encode(), CONN.encode(), frames[0].encode()))


def test_malformed_deliveries_are_skipped_alone():
    """One bad delivery would cost the others in the batch theirs."""
    good = {"connIds": [CONN], "frames": [{"type": "sync_done", "count": 0}]}
    body = json.dumps({"v": 1, "items": [
        "x", {"frames": []}, {"connIds": CONN, "frames": []}, {"connIds": [CONN], "frames": "f"},
        {"connIds": [CONN], "frames": [{"type": "a"}, "b"]}, good,
        {"connIds": [CONN, 7, None, "other"], "frames": []}]}).encode()
    got = e.parse_deliveries(body)
    assert [(d.conn_ids, d.frames) for d in got] == [([CONN], good["frames"]), ([CONN, "other"], [])]


# --- connection ids


def test_conn_id_round_trip():
    """A connId would be mis-split, and deliveries go to the wrong socket."""
    for ip, port in (("10.0.0.7", 40001), ("2001:db8::1", "443"), ("::1", 7)):
        cid = e.conn_id(GW, ip, port)
        assert cid == f"{GW}##{ip}##{int(port)}"
        assert e.parse_conn_id(cid) == (GW, ip, int(port))
        assert e.gateway_of(cid) == GW


@pytest.mark.parametrize("bad", ["", GW, f"{GW}##10.0.0.1", f"{GW}##10.0.0.1##x", "##10.0.0.1##5",
                                 f"{GW}####5", f"{GW}##a##b##5"])
def test_malformed_conn_ids_are_refused(bad):
    """A forged or truncated connId would be taken apart as if it were sound."""
    with pytest.raises(ValueError):
        e.parse_conn_id(bad)


def test_conn_id_parts_are_checked():
    """A '#' in a part would make the connId split differently than it was built."""
    for args in (("a#b", "10.0.0.1", 1), ("", "10.0.0.1", 1), (GW, "", 1), (GW, "1#2", 1)):
        with pytest.raises(ValueError):
            e.conn_id(*args)


def test_gateway_of():
    """Deliveries would be routed to a gateway a connId does not belong to."""
    assert e.gateway_of(CONN) == GW
    assert e.gateway_of(e.api_conn_id(API, 3)) == API
    assert e.gateway_of(GW) is None
    assert e.gateway_of("##10.0.0.1##5") is None
    assert e.gateway_of("") is None


def test_api_conn_ids():
    """Only connIds an imapi makes look like API connections (processors trust nothing else)."""
    assert e.api_conn_id(API, 12) == f"{API}##{e.API_CONN_MARK}##12" == f"{API}##api##12"
    assert e.is_api_conn(e.api_conn_id(API, 12))
    assert e.parse_conn_id(e.api_conn_id(API, 12)) == (API, "api", 12)
    assert not e.is_api_conn(CONN)
    assert not e.is_api_conn(f"{API}##api##x")
    assert not e.is_api_conn(f"{API}##api##1##2")
    assert not e.is_api_conn(None)
    assert not e.is_api_conn(17)


def test_valid_server_id():
    """A serverId that cannot name a queue or a Redis key would be accepted."""
    assert e.valid_server_id(GW) and e.valid_server_id("x" * 64)
    for bad in ("", "x" * 65, "a##b", None, 5):
        assert not e.valid_server_id(bad)


# --- the batching publisher


class Bus:
    """Records publishes; each answers with the Deferred the test gives it."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes, dict]] = []
        self.answers: list[defer.Deferred] = []

    def publish(self, key: str, body: bytes, **kw) -> defer.Deferred:
        self.published.append((key, body, kw))
        d = defer.Deferred()
        self.answers.append(d)
        return d


def test_publisher_coalesces_a_turn_into_one_batch():
    """Each frame would cost its own AMQP publish and confirm."""
    bus, clock = Bus(), Clock()
    p = e.Publisher(bus, "im.server", clock, max_items=10)
    items = [e.frame_item("alice", GW, CONN, TS, MESSAGE), e.sync_item("bob", GW, CONN, TS)]
    ds = [p.submit(i) for i in items]
    assert p.pending == 2 and bus.published == []
    clock.advance(0)
    [(key, body, kw)] = bus.published
    assert key == "im.server" and kw == {"mandatory": False, "persistent": True}
    assert body == e.items_body([i.encode() for i in items])
    assert [(g.kind, g.user_id) for g in e.parse_items(body)] == [(e.FRAME, "alice"), (e.SYNC, "bob")]
    assert not any(d.called for d in ds)
    bus.answers[0].callback(None)
    assert [d.result for d in ds] == [None, None]
    assert clock.getDelayedCalls() == []


def test_publisher_batch_limit_and_failures():
    """A batch would grow without bound, or a failed publish would leave its callers waiting."""
    bus, clock = Bus(), Clock()
    p = e.Publisher(bus, "im.server", clock, max_items=2)
    first = [p.submit(e.sync_item("bob", GW, CONN, TS)) for _ in range(2)]
    assert len(bus.published) == 1 and p.pending == 0  # at once, not at the end of the turn
    unencodable = p.submit(e.frame_item("bob", GW, CONN, TS, {"type": "message", "body": object()}))
    failed = []
    unencodable.addErrback(failed.append)
    assert failed and failed[0].check(TypeError) and p.pending == 0
    bus.answers[0].errback(RuntimeError("broker down"))
    errors = []
    for d in first:
        d.addErrback(lambda f: errors.append(f.check(RuntimeError)))
    assert errors == [RuntimeError, RuntimeError]
    last = p.submit(e.sync_item("bob", GW, CONN, TS))
    drained = p.drain()
    assert len(bus.published) == 2 and not drained.called
    bus.answers[1].callback(None)
    assert drained.called and last.called
    assert clock.getDelayedCalls() == []

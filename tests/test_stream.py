"""The HTTP streaming adapter's own rules (PROTOCOL.md "HTTP streaming transport"), as a client sees them.

Unit tests: the real ``--stream`` site over StringTransports, time on a
task.Clock, a FakeHub (the rules shared with WebSocket and TCP are in
tests/test_engine_rules.py; a real cluster in tests/test_protocol_conformance.py).
Every test ends by checking that no delayed call outlived its connection and
that the hub heard of each accepted connection's end exactly once.
"""

import json

import pytest
from prometheus_client import REGISTRY
from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure

from imcluster.testing import ClientHarness, FakeHub, StreamHarness, gateway_config
from imcluster.testing.wire import sse_events

A1 = "user:alice:3600"
MESSAGE_SEND = {"type": "message_send", "msgId": "1", "sessionId": "s", "seq": 1, "from": "bob",
                "body": "x" * 900, "ts": 1}


@pytest.fixture
def make_hub():
    hubs = []

    def make(**config):
        hub = FakeHub(config=gateway_config(**config))
        hub.harnesses = []
        hubs.append(hub)
        return hub

    yield make
    for hub in hubs:
        for h in hub.harnesses:
            h.drop()
        assert hub.clock.getDelayedCalls() == [], "a timer outlived its connection"
        assert sorted(map(id, hub.lost)) == sorted(map(id, hub.made))


@pytest.fixture
def hub(make_hub):
    return make_hub()


def harness(hub, **kw):
    h = StreamHarness(hub, **kw)
    hub.harnesses.append(h)
    return h


def authed(hub, **kw):
    h = harness(hub, **kw)
    h.send({"type": "auth", "token": A1})
    frames = h.frames()
    assert h.status == 200 and frames[0]["type"] == "auth_reply" and frames[0]["ok"] is True, frames
    return h


def metric(name, **labels):
    return REGISTRY.get_sample_value(name, labels) or 0.0


def poll(h, after):
    status, _, body = h.request("GET", f"/stream/{h.stream_id}?after={after}")
    return status, json.loads(body)


# --- opening: POST /stream


def test_auth_reply_carries_an_unguessable_stream_id(hub):
    """The auth_reply would lack the stream id, or the id would be short, the token, or reused."""
    ids = set()
    for _ in range(3):
        h = harness(hub)
        h.send({"type": "auth", "token": A1, "device": "web"})
        assert h.status == 200 and h.stream_id not in A1
        assert len(h.stream_id) >= 22  # base64url: >= 128 random bits
        ids.add(h.stream_id)
    assert len(ids) == 3


@pytest.mark.parametrize("token,code,status", [("forged", "invalid_token", 401),
                                               ("expired:alice", "token_expired", 401)])
def test_failed_auth_gets_no_stream_and_leaves_nothing(hub, token, code, status):
    """A refused token would still open a connection (an id, a place in the hub's maps)."""
    h = harness(hub)
    h.send({"type": "auth", "token": token})
    frames = h.frames()
    assert h.status == status and h.refused and h.stream_id is None
    assert frames == [{"type": "auth_reply", "ok": False, "error": {"code": code,
                                                                   "message": frames[0]["error"]["message"]}}]
    assert hub.made == hub.lost and len(hub.made) == 1
    assert hub.clock.getDelayedCalls() == []


def test_body_that_is_not_auth_is_400_and_leaves_nothing(hub):
    """A POST /stream whose body is not an auth frame would open an unauthenticated connection."""
    for body in (b"{not json", b'{"type":"ping"}', b'[{"type":"auth","token":"user:alice"}]'):
        h = harness(hub)
        h.send(body)
        assert h.status == 400 and h.refused
        assert h.frames()[0]["type"] == "error"
    assert hub.made == hub.lost


def test_unrecordable_auth_is_503(hub):
    """When the gateway cannot record the connection (Redis down) the client must be told to retry."""
    hub.auth_failure = RuntimeError("redis down")
    h = harness(hub)
    h.send({"type": "auth", "token": A1})
    assert h.status == 503 and h.frames()[0]["error"]["code"] == "unavailable"
    assert hub.made == hub.lost


def test_held_auth_answers_when_recorded(hub):
    """The POST /stream answer waits for the hub to record the auth; frames sent meanwhile follow it."""
    hub.hold_auth = True
    h = harness(hub)
    h.send({"type": "auth", "token": A1})
    h.send({"type": "ping"})
    assert h.status is None and h.frames() == []
    hub.held[0].callback(None)
    frames = h.frames()
    assert [f["type"] for f in frames] == ["auth_reply", "pong"]


def test_gateway_at_capacity_is_503(hub):
    """A gateway over max_connections would still open streaming connections."""
    slots = {"free": 1}

    def socket_opened():
        if slots["free"] == 0:
            return False
        slots["free"] -= 1
        return True

    hub.socket_opened = socket_opened
    hub.socket_closed = lambda: slots.__setitem__("free", slots["free"] + 1)
    first = authed(hub)
    second = harness(hub)
    second.send({"type": "auth", "token": A1})
    assert second.status == 503 and second.frames()[0]["code"] == "unavailable"
    first.drop()
    assert slots["free"] == 1  # the slot comes back with the connection's end


def test_connections_are_named_apart_from_real_sockets(hub):
    """A streaming connection named by its POST's socket would squat on a port the client (or its NAT) reuses."""
    names = set()
    for _ in range(3):
        h = authed(hub, ip="10.1.2.3", port=40001)  # the same socket each time: kept alive
        assert h.conn.ip == "10.1.2.3" and h.conn.port > 65535
        names.add(h.conn.conn_id)
    assert len(names) == 3
    ws = ClientHarness(hub, "ws", ip="10.1.2.3", port=40001)  # a WebSocket from that port now
    assert ws.status == 101
    ws.drop()


# --- frames up: POST /stream/<id>


def test_posted_frames_in_order_and_arrays(hub):
    """A frame or a JSON array of frames posted to /stream/<id> would be lost, reordered or unanswered."""
    h = authed(hub)
    status, _, body = h.request("POST", f"/stream/{h.stream_id}",
                                b'[{"type":"ping"},{"type":"history","sessionId":"s","id":"h1"},{"type":"ping"}]')
    assert status == 204 and body == b""
    h.send({"type": "nonsense", "id": "x"})
    frames = h.frames()
    assert [f["type"] for f in frames] == ["pong", "pong", "error"]
    assert [f["type"] for _, f in hub.forwarded] == ["history"]


def test_body_over_frame_size_is_413_and_closes(make_hub):
    """A body over max_frame_size would be buffered, or leave the connection open."""
    hub = make_hub(max_frame_size=1024)
    h = authed(hub)
    status, _, body = h.request("POST", f"/stream/{h.stream_id}", b" " * 1025)
    assert status == 413 and json.loads(body)["code"] == "too_large"
    frames = h.frames()
    assert h.closed and frames[-1] == {"type": "error", "code": "too_large", "message": "frame too large"}
    assert h.request("POST", f"/stream/{h.stream_id}", b'{"type":"ping"}')[0] == 404


def test_unknown_id_is_404(hub):
    """A guessed or stale id would reach someone's connection."""
    authed(hub)
    assert harness(hub).request("GET", "/stream/nope?after=0")[0] == 404
    assert harness(hub).request("POST", "/stream/nope", b'{"type":"ping"}')[0] == 404


# --- frames down: event streams and polls


def test_event_stream_format_and_ids(hub):
    """Server-Sent Events would not carry one frame per event with increasing ids."""
    h = authed(hub)
    h.conn.send_frame({"type": "x", "n": 1})
    h.conn.send_frame({"type": "x", "n": 2, "text": "line\nbreak \u2028"})
    status, headers, _, = _events_response(h)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert headers["cache-control"] == "no-store"
    assert [f.get("n") for f in h.frames()] == [1, 2]
    assert h.last_id == 2


def _events_response(h):
    from imcluster.testing.wire import _http_response
    status, headers, _, _ = _http_response(h.transport.value())
    return status, headers, None


def test_keepalive_comment_on_an_idle_event_stream(make_hub):
    """A proxy would drop an event stream that stays silent (PROTOCOL.md: a comment at least every 15 s)."""
    hub = make_hub(stream_keepalive=15.0)
    h = authed(hub)
    before = h.transport.value().count(b":\n\n")
    hub.clock.advance(15.0)
    assert h.transport.value().count(b":\n\n") == before + 1
    hub.clock.advance(15.0)
    assert h.transport.value().count(b":\n\n") == before + 2


def test_resume_with_last_event_id_gets_every_later_frame_once(hub):
    """A client whose event stream dropped would lose, or get twice, frames on resuming with Last-Event-ID."""
    h = authed(hub)
    for n in range(1, 4):
        h.conn.send_frame({"type": "x", "n": n})
    assert [f["n"] for f in h.frames()] == [1, 2, 3]
    # the client saw only up to id 2 before its stream dropped; frames keep coming meanwhile
    events = h._events
    h._events = None
    events[0].connectionLost(Failure(ConnectionLost()))
    for n in range(4, 6):
        h.conn.send_frame({"type": "x", "n": n})
    h.last_id = 2
    h._open_events()
    assert [f["n"] for f in h.frames()] == [3, 4, 5]


def test_new_event_stream_replaces_the_previous_one(hub):
    """Two tabs on one id would both get frames (or the old stream would hang forever)."""
    h = authed(hub)
    old = h._events
    channel, transport = h._connect(50000)
    h._send_request(channel, "GET", f"/stream/{h.stream_id}", headers={"Last-Event-ID": "0"})
    from imcluster.testing.wire import _http_response
    assert _http_response(old[1].value())[3] is not None  # the old one was ended
    h._close_channel(old[0])
    h._events = (channel, transport)
    h._seen = 0
    h._sse_text = b""
    h.conn.send_frame({"type": "x"})
    assert h.frames() == [{"type": "x"}]


def test_long_poll_answers_at_once_then_waits_then_empty(make_hub):
    """A long poll would hold frames back, answer twice, or never answer ([] after stream_poll_timeout)."""
    hub = make_hub(stream_poll_timeout=25.0)
    h = authed(hub)
    h.finish()  # no event stream: this client polls
    h.lost = False
    h.conn.send_frame({"type": "x", "n": 1})
    status, items = poll(h, 0)
    assert items == [{"id": 1, "frame": {"type": "x", "n": 1}}]
    # a poll waits: the answer comes with the next frame
    channel, transport = h._connect(50000)
    h._send_request(channel, "GET", f"/stream/{h.stream_id}?after=1")
    assert transport.value() == b""
    h.conn.send_frame({"type": "x", "n": 2})
    h.conn.send_frame({"type": "x", "n": 3})
    hub.clock.advance(0)  # the end of the reactor turn: one answer for the burst
    from imcluster.testing.wire import _http_response
    status, _, body, _ = _http_response(transport.value())
    assert [i["id"] for i in json.loads(body)] == [2, 3]
    h._close_channel(channel)
    # the same after again (the answer was lost): the same frames again
    assert [i["id"] for i in poll(h, 1)[1]] == [2, 3]
    # nothing new: [] after stream_poll_timeout
    channel, transport = h._connect(50001)
    h._send_request(channel, "GET", f"/stream/{h.stream_id}?after=3")
    hub.clock.advance(24.9)
    assert transport.value() == b""
    hub.clock.advance(0.1)
    assert _http_response(transport.value())[2] == b"[]"
    h._close_channel(channel)


def test_no_stream_for_stream_resume_closes_like_a_socket(make_hub):
    """A client that went away for good would keep its connection (and its Redis entry) forever."""
    hub = make_hub(stream_resume=30.0)
    before = metric("imcluster_closes_total", reason="stream_resume")
    h = authed(hub)
    conn = h.conn
    h.finish()  # the event stream ends; no poll follows
    hub.clock.advance(29.0)
    assert hub.lost == []
    hub.clock.advance(1.0)
    assert hub.lost == [conn]
    assert metric("imcluster_closes_total", reason="stream_resume") == before + 1
    assert h.request("GET", f"/stream/{h.stream_id}?after=0")[0] == 404


def test_polling_keeps_the_connection(make_hub):
    """A long-polling client would be dropped after stream_resume although it keeps polling."""
    hub = make_hub(stream_resume=10.0, stream_poll_timeout=5.0, idle_timeout=1000.0)
    h = authed(hub)
    h.finish()
    h.lost = False
    for _ in range(10):
        channel, transport = h._connect(51000)
        h._send_request(channel, "GET", f"/stream/{h.stream_id}?after=0")
        hub.clock.advance(5.0)
        h._close_channel(channel)
    assert hub.lost == []


def test_client_that_stops_fetching_is_a_slow_consumer(make_hub):
    """A client that opens no stream while frames pile up would make the gateway buffer without bound."""
    hub = make_hub(output_buffer_limit=5000, slow_consumer_grace=1.0, stream_resume=60.0)
    h = authed(hub)
    h.finish()  # no stream from now on: every frame is pending output
    h.lost = False
    for _ in range(8):
        h.conn.send_frame(MESSAGE_SEND)
    assert hub.lost == []
    hub.clock.advance(1.0)  # the grace: nothing was taken
    status, items = poll(h, 0)
    assert items[-1]["frame"]["code"] == "slow_consumer"
    assert hub.lost == [h.conn]
    assert poll(h, 0)[0] == 404


def test_close_sends_the_error_frame_last_then_404(hub):
    """A closed streaming connection would end without saying why, or its id would keep answering."""
    h = authed(hub)
    h.conn.going_away()
    frames = h.frames()
    assert frames[-1] == {"type": "error", "code": "going_away", "message": "server going away"}
    assert h.closed and hub.lost == [h.conn]
    assert h.request("GET", f"/stream/{h.stream_id}")[0] == 404


def test_close_without_a_stream_waits_close_timeout_for_the_last_poll(make_hub):
    """A polling client between two polls would never learn why it was closed."""
    hub = make_hub(close_timeout=5.0)
    h = authed(hub)
    h.finish()
    h.lost = False
    h.conn.close(1013, "try again later")
    assert hub.lost == []
    status, items = poll(h, 0)
    assert items[-1]["frame"]["code"] == "unavailable"
    assert hub.lost == [h.conn]
    # and one that never polls again is dropped after close_timeout
    g = authed(hub, port=41000)
    g.finish()
    g.conn.close(1013, "try again later")
    hub.clock.advance(4.9)
    assert g.conn not in hub.lost
    hub.clock.advance(0.1)
    assert g.conn in hub.lost


def test_resume_from_before_what_is_kept_closes_with_resume_lost(make_hub):
    """A resume the gateway cannot honour (frames trimmed) would silently skip them."""
    hub = make_hub(stream_resume_bytes=2000)
    before = metric("imcluster_closes_total", reason="resume_lost")
    h = authed(hub)
    for _ in range(5):
        h.conn.send_frame(MESSAGE_SEND)  # ~1 KB each, on the open event stream
    assert len(h.frames()) == 5
    h.last_id = 1
    h._open_events()
    frames = h.frames()
    assert [f["code"] for f in frames] == ["resume_lost"]
    assert h.closed and hub.lost == [h.conn]
    assert metric("imcluster_closes_total", reason="resume_lost") == before + 1


# --- HTTP: CORS, methods, paths


def test_cors_headers_for_allowed_origins_and_403_for_others(make_hub):
    """A page of an allowed origin could not read the answers, or a page of any origin could."""
    hub = make_hub(allowed_origins=["https://chat.example"])
    h = harness(hub)
    status, headers, _ = h.request("OPTIONS", "/stream", headers={
        "Origin": "https://chat.example", "Access-Control-Request-Method": "POST"})
    assert status == 204 and headers["access-control-allow-origin"] == "https://chat.example"
    assert "Last-Event-ID" in headers["access-control-allow-headers"]
    status, headers, _ = h.request("POST", "/stream", json.dumps({"type": "auth", "token": A1}).encode(),
                                   headers={"Origin": "https://chat.example"})
    assert status == 200 and headers["access-control-allow-origin"] == "https://chat.example"
    status, headers, body = h.request("POST", "/stream", json.dumps({"type": "auth", "token": A1}).encode(),
                                      headers={"Origin": "https://evil.example"})
    assert status == 403 and "access-control-allow-origin" not in headers
    assert json.loads(body)["error"]["code"] == "forbidden_origin"
    hub.clock.advance(hub.config.stream_resume)  # the allowed page never opens its stream


def test_any_origin_by_default(hub):
    """The default (*) would refuse the web chat served from another port."""
    status, headers, _ = harness(hub).request("OPTIONS", "/stream", headers={"Origin": "http://x.example:8090"})
    assert status == 204 and headers["access-control-allow-origin"] == "*"


def test_other_paths_and_methods_are_json_errors(hub):
    """Anything but the four documented requests would get an HTML page or a crash."""
    h = harness(hub)
    assert h.request("GET", "/")[0] == 404
    assert h.request("GET", "/stream")[0] == 405
    assert h.request("GET", "/stream/a/b")[0] == 404
    status, headers, body = h.request("DELETE", "/stream/x")
    assert status == 405 and json.loads(body)["error"]["code"] == "method_not_allowed"
    assert h.request("GET", "/stream/x?after=-1")[0] in (400, 404)


def test_sse_parser_helper():
    """(the test helper itself) an event stream is split into (id, data) events; comments skipped."""
    events, rest = sse_events(b"retry: 1000\n\n:\n\nid: 1\ndata: {}\n\nid: 2\ndata: {")
    assert events == [(1, b"{}")] and rest == b"id: 2\ndata: {"


def test_posted_array_elements_reach_the_engine_as_written():
    """A frame posted in an array would reach the engine altered (numbers, escapes) or split wrong."""
    from imcluster.gateway.stream import split_array
    assert split_array('[{"a":1.50}, 2 ,"x\\"]"]') == ['{"a":1.50}', "2", '"x\\"]"']
    assert split_array(" [ ] ") == []
    assert split_array('[[1,[2]],{"k":"\\u0000"}]') == ["[1,[2]]", '{"k":"\\u0000"}']
    for bad in ("[1,]", "[1 2]", "[1]x", "{", "["):
        with pytest.raises(ValueError):
            split_array(bad)

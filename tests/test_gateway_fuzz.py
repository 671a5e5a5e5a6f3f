"""Fuzzing both adapters with random bytes and random JSON (hypothesis).

Whatever a client sends, nothing raises out of the protocol; the server
either answers with error frames or closes cleanly; timers do not outlive
connections; and the same factory keeps serving new connections.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.logger import globalLogPublisher

from imcluster.testing import ClientHarness, FakeHub, gateway_config, tcp_encode, ws_frame

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20)

frame_types = st.sampled_from(["auth", "ping", "message", "message_send_reply", "history", "read",
                               "session_create", "pong", "error", "", "auth_reply"])


@st.composite
def frames(draw):
    """Dicts that look like client frames, with random (often wrong) fields."""
    frame = draw(st.dictionaries(
        st.sampled_from(["clientMsgId", "sessionId", "body", "token", "device", "msgIds", "beforeSeq",
                         "limit", "seq", "members", "id", "x"]),
        json_values, max_size=6))
    if draw(st.booleans()):
        frame["type"] = draw(frame_types)
    return frame


# WebSocket close codes a fuzzed connection may end with
ALLOWED_WS_CLOSES = {1000, 1002, 1003, 1007, 1008, 1009, 4001}


class Fuzz:
    """One hub and one factory per transport, used for every example."""

    def __init__(self, kind):
        self.kind = kind
        self.hub = FakeHub(config=gateway_config(ws_ping_interval=0, max_frame_size=4096))
        first = ClientHarness(self.hub, kind)
        self.factory = first.factory
        first.drop()

    def connect(self, authenticate=False):
        h = ClientHarness(self.hub, self.kind, factory=self.factory)
        if authenticate:
            h.send({"type": "auth", "token": "user:alice"})
        return h

    def check(self, h):
        """The connection either answered sensibly or closed cleanly."""
        for frame in h.frames():
            assert isinstance(frame, dict) and isinstance(frame.get("type"), str)
            if frame["type"] == "error":
                assert isinstance(frame["code"], str)
        if h.kind == "ws" and h.close_code is not None:
            assert h.close_code in ALLOWED_WS_CLOSES, h.close_code
        if h.closed:
            h.finish()
        else:
            h.drop()
        self.hub.clock.advance(3600)  # any timer left would fire here
        assert self.hub.clock.getDelayedCalls() == []

    def still_serves(self):
        h = self.connect()
        h.send({"type": "auth", "token": "user:bob"})
        assert h.frames()[0]["ok"] is True
        h.send({"type": "ping"})
        assert h.frames() == [{"type": "pong"}]
        h.drop()
        assert sorted(map(id, self.hub.lost)) == sorted(map(id, self.hub.made))


@pytest.fixture(autouse=True)
def no_logged_failures():
    """A bug caught and logged (log.failure) is as bad as one raised."""
    failures = []

    def observer(event):
        if event.get("log_failure") is not None:
            failures.append(event)

    globalLogPublisher.addObserver(observer)
    yield
    globalLogPublisher.removeObserver(observer)
    assert failures == []


@pytest.mark.parametrize("kind", ["ws", "tcp"])
def test_random_bytes(kind):
    """Random bytes from a client never crash the gateway nor break its listener."""
    fuzz = Fuzz(kind)

    @SETTINGS
    @given(st.lists(st.binary(max_size=300), min_size=1, max_size=5), st.booleans())
    def run(chunks, authenticate):
        h = fuzz.connect(authenticate)
        for chunk in chunks:
            h.send_raw(chunk)
        fuzz.check(h)

    run()
    fuzz.still_serves()


def test_random_bytes_before_websocket_handshake():
    """Garbage instead of an HTTP upgrade request is refused without harm."""
    fuzz = Fuzz("ws")

    @SETTINGS
    @given(st.binary(max_size=400))
    def run(data):
        h = ClientHarness(fuzz.hub, "ws", factory=fuzz.factory, handshake=False)
        h.send_raw(data + b"\r\n\r\n")
        fuzz.check(h)

    run()
    fuzz.still_serves()


@pytest.mark.parametrize("kind", ["ws", "tcp"])
def test_random_json_frames(kind):
    """Random JSON frames get answers (or a clean close), never an exception."""
    fuzz = Fuzz(kind)

    @SETTINGS
    @given(st.lists(frames() | json_values, min_size=1, max_size=12), st.booleans())
    def run(items, authenticate):
        h = fuzz.connect(authenticate)
        for item in items:
            h.send(json.dumps(item))
        fuzz.check(h)

    run()
    fuzz.still_serves()


@pytest.mark.parametrize("kind", ["ws", "tcp"])
def test_random_text_payloads(kind):
    """Random (possibly invalid) text in well-formed frames is answered with bad_frame or a close."""
    fuzz = Fuzz(kind)

    @SETTINGS
    @given(st.lists(st.text(max_size=100) | st.binary(max_size=100), min_size=1, max_size=8))
    def run(payloads):
        h = fuzz.connect(authenticate=True)
        for payload in payloads:
            data = payload.encode("utf-8", "surrogatepass") if isinstance(payload, str) else payload
            h.send_raw(ws_frame(data) if kind == "ws" else tcp_encode(data))
        fuzz.check(h)

    run()
    fuzz.still_serves()

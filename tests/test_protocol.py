"""imcluster.protocol: PROTOCOL.md's frame rules, without I/O."""

import json

import pytest

from imcluster import protocol as p


def bad(data, **kw):
    with pytest.raises(p.FrameError) as info:
        p.parse_client_frame(data, **kw)
    assert info.value.code == p.BAD_FRAME
    return info.value


def msg(**fields):
    frame = {"type": "message", "clientMsgId": "c-1", "sessionId": "s-1", "body": {"text": "hi"}}
    frame.update(fields)
    return frame


def enc(frame):
    return json.dumps(frame).encode()


@pytest.mark.parametrize("data", [
    b"\xff\xfe{}",                       # not UTF-8
    b"{\"type\": \"ping\"",              # truncated JSON
    b"",                                 # empty
    b"[1, 2]",                           # not an object
    b"\"ping\"",                         # not an object
    b"{}",                               # no type
    b"{\"type\": 7}",                    # type not a string
    b"{\"type\": \"auth_reply\"}",       # a server frame type
    b"{\"type\": \"nope\"}",             # unknown type
    b"{\"type\": \"ping\", \"x\": NaN}",  # NaN is not JSON
    b"{\"type\": \"ping\", \"x\": Infinity}",
])
def test_malformed_frames_are_bad_frame(data):
    """A client sending garbage gets bad_frame instead of the server choking."""
    err = bad(data)
    assert err.reply()["type"] == "error"
    assert err.reply()["code"] == "bad_frame"


@pytest.mark.parametrize("body", [
    "a\u0000b",
    {"k\u0000": 1},
    [1, [2, {"x": "\u0000"}]],
    "\ud800",
    {"\udfff": "x"},
])
def test_nul_and_lone_surrogates_rejected_anywhere(body):
    """A body string with U+0000 (or a lone surrogate) is rejected, not stored to fail in PostgreSQL."""
    err = bad(json.dumps(msg(body=body)))
    # a message with a usable clientMsgId is answered with message_reply
    assert err.reply() == {"type": "message_reply", "ok": False, "clientMsgId": "c-1",
                           "error": {"code": "bad_frame", "message": err.message}}


def test_nul_in_other_fields_rejected():
    """U+0000 in a sessionId or clientMsgId is caught too."""
    bad(json.dumps(msg(sessionId="s\u0000")))
    err = bad(json.dumps(msg(clientMsgId="c\u0000")))
    assert err.reply()["type"] == "error"  # no usable clientMsgId


def test_surrogate_pair_and_escaped_backslash_are_fine():
    """An emoji sent as a JSON surrogate pair, or a literal backslash-u0000 text, is accepted."""
    frame = p.parse_client_frame('{"type":"message","clientMsgId":"c","sessionId":"s",'
                                 '"body":["\\ud83d\\ude00","\\\\u0000"]}')
    assert frame["body"] == ["\U0001F600", "\\u0000"]


def test_raw_unicode_passes_and_encodes_compactly():
    """Non-ASCII text round-trips as UTF-8, compact, not as \\u escapes."""
    frame = p.parse_client_frame(enc(msg(body={"text": "héllo 你好"})))
    assert p.encode(frame) == ('{"type":"message","clientMsgId":"c-1","sessionId":"s-1",'
                               '"body":{"text":"héllo 你好"}}')
    assert p.encode_bytes(frame) == p.encode(frame).encode("utf-8")


def test_depth_limit():
    """A deeply nested body is refused instead of blowing the stack when re-encoded."""
    ok = {"a": 1}
    for _ in range(60):
        ok = [ok]
    p.parse_client_frame(enc(msg(body=ok)))
    deep = ok
    for _ in range(10):
        deep = [deep]
    bad(enc(msg(body=deep)))
    bad(b'{"type":"ping","x":' + b"[" * 5000 + b"]" * 5000 + b"}")
    # configurable
    bad(enc(msg(body=[[1]])), max_depth=2)


def test_many_brackets_in_strings_do_not_trip_depth():
    """Brackets inside strings are text, not nesting."""
    frame = p.parse_client_frame(enc(msg(body="[" * 1000)))
    assert frame["body"] == "[" * 1000


@pytest.mark.parametrize("cmid,ok", [("x" * 64, True), ("x" * 65, False), ("", False), (5, False)])
def test_client_msg_id_length(cmid, ok):
    """clientMsgId is 1-64 characters, as PROTOCOL.md says."""
    if ok:
        assert p.parse_client_frame(enc(msg(clientMsgId=cmid)))["clientMsgId"] == cmid
    else:
        err = bad(enc(msg(clientMsgId=cmid)))
        # no usable clientMsgId: an error frame, not a message_reply
        assert err.reply()["type"] == "error"


def test_message_with_usable_client_msg_id_gets_message_reply():
    """A message with a bad sessionId is answered on its clientMsgId, so the client can match it."""
    err = bad(enc(msg(sessionId="")))
    assert err.reply()["type"] == "message_reply"
    assert err.reply()["clientMsgId"] == "c-1"
    err = bad(enc({"type": "message", "clientMsgId": "c-2", "sessionId": "s"}))  # no body
    assert err.reply()["clientMsgId"] == "c-2"


def test_body_may_be_any_json_value():
    """Any JSON body (null, numbers, strings, arrays) is stored with the same meaning."""
    for body in (None, 0, 1.5, "x", [1, "a"], {"a": {"b": [True, False]}}):
        assert p.parse_client_frame(enc(msg(body=body)))["body"] == body


def test_unknown_fields_are_dropped():
    """A newer client's extra fields do not break it, and do not travel to the processors."""
    frame = p.parse_client_frame(enc(msg(extra=1)))
    assert "extra" not in frame


def test_error_ref_uses_client_msg_id_or_id():
    """An error names the offending frame so the client can match it."""
    err = bad(enc({"type": "history", "id": "h-1"}))
    assert err.reply() == {"type": "error", "code": "bad_frame", "message": err.message, "ref": "h-1"}
    err = bad(enc({"type": "history", "id": 7}))
    assert err.reply()["ref"] == 7
    err = bad(enc({"type": "history"}))
    assert "ref" not in err.reply()
    err = bad(enc({"type": "read", "id": {"x": 1}, "sessionId": "s", "seq": 1}))
    assert "ref" not in err.reply()


def test_auth_shape():
    """auth needs a string token; device is optional free text."""
    assert p.parse_client_frame(enc({"type": "auth", "token": "t"})) == {"type": "auth", "token": "t"}
    assert p.parse_client_frame(enc({"type": "auth", "token": "t", "device": "ios"}))["device"] == "ios"
    bad(enc({"type": "auth"}))
    bad(enc({"type": "auth", "token": ""}))
    bad(enc({"type": "auth", "token": 5}))
    bad(enc({"type": "auth", "token": "t", "device": 5}))
    bad(enc({"type": "auth", "token": "t", "device": "x" * 257}))


def test_history_defaults_and_caps():
    """history limit defaults to 50 and is capped at 200; beforeSeq is optional."""
    f = p.parse_client_frame(enc({"type": "history", "sessionId": "s"}))
    assert f == {"type": "history", "sessionId": "s", "limit": 50}
    f = p.parse_client_frame(enc({"type": "history", "sessionId": "s", "beforeSeq": 100, "limit": 500}))
    assert f == {"type": "history", "sessionId": "s", "beforeSeq": 100, "limit": 200}
    f = p.parse_client_frame(enc({"type": "history", "sessionId": "s", "beforeSeq": None, "limit": None}))
    assert f["limit"] == 50 and "beforeSeq" not in f
    for fields in ({"limit": 0}, {"limit": "5"}, {"limit": True}, {"beforeSeq": -1}, {"beforeSeq": 1.5}):
        bad(enc({"type": "history", "sessionId": "s", **fields}))
    # huge numbers are capped like any large value (PROTOCOL.md), not refused
    f = p.parse_client_frame(enc({"type": "history", "sessionId": "s", "beforeSeq": 2**70, "limit": 2**64}))
    assert f["beforeSeq"] == 2**63 - 1 and f["limit"] == 200


def test_read_shape():
    """read needs a sessionId and a non-negative integer seq."""
    assert p.parse_client_frame(enc({"type": "read", "sessionId": "s", "seq": 42}))["seq"] == 42
    # beyond any last seq: clamped later, never refused
    assert p.parse_client_frame(enc({"type": "read", "sessionId": "s", "seq": 2**64}))["seq"] == 2**63 - 1
    for seq in (None, -1, "4", 1.0, False):
        bad(enc({"type": "read", "sessionId": "s", "seq": seq}))


def test_message_send_reply_shape():
    """message_send_reply carries a list of msgId strings."""
    f = p.parse_client_frame(enc({"type": "message_send_reply", "msgIds": ["1", "2"]}))
    assert f["msgIds"] == ["1", "2"]
    assert p.parse_client_frame(enc({"type": "message_send_reply", "msgIds": []}))["msgIds"] == []
    for ids in (None, "1", [1], [""], ["x" * 65], ["1"] * 1001):
        bad(enc({"type": "message_send_reply", "msgIds": ids}))
    assert len(p.parse_client_frame(enc({"type": "message_send_reply", "msgIds": ["1"] * 1000}))["msgIds"]) == 1000


def test_rate_cost_follows_protocol_md():
    """PROTOCOL.md "Framing": work frames draw from the bucket; acks, pings and auth never do."""
    assert {t for t in p.CLIENT_TYPES if p.RATE_COST.get(t, 1)} == {
        p.MESSAGE, p.SESSION_CREATE, p.HISTORY, p.READ, p.RECALL, p.EDIT, p.TYPING, p.PRESENCE_SUBSCRIBE}
    # presence_unsubscribe: work only a gateway does (docs/protocol.rst)
    assert {t for t in p.CLIENT_TYPES if not p.RATE_COST.get(t, 1)} == {
        p.AUTH, p.PING, p.MESSAGE_SEND_REPLY, p.PRESENCE_UNSUBSCRIBE}
    for free in (p.AUTH, p.PING, p.MESSAGE_SEND_REPLY):
        assert p.RATE_COST[free] == 0
    assert p.RATE_COST.get("typing", 1) == 1  # a type not listed yet is limited


def test_session_create_shape():
    """session_create lists valid user ids; sessionId and id are optional."""
    f = p.parse_client_frame(enc({"type": "session_create", "id": "r-1", "members": ["bob", "c.a@x-y_z"]}))
    assert f == {"type": "session_create", "id": "r-1", "members": ["bob", "c.a@x-y_z"]}
    f = p.parse_client_frame(enc({"type": "session_create", "members": [], "sessionId": "g-1"}))
    assert f["sessionId"] == "g-1"
    for members in (None, "bob", ["bad user"], ["x" * 129], [""]):
        bad(enc({"type": "session_create", "members": members}))
    bad(enc({"type": "session_create", "members": [], "sessionId": ""}))


def test_session_id_limits():
    """A p2p id of two maximal user ids fits; control characters do not."""
    long_p2p = "p2p:" + "a" * 128 + ":" + "b" * 128
    assert p.parse_client_frame(enc(msg(sessionId=long_p2p)))["sessionId"] == long_p2p
    bad(enc(msg(sessionId="x" * 301)))
    bad(enc(msg(sessionId="a\nb")))


def test_validate_client_frame_matches_parse():
    """Processors re-validating a forwarded frame reach the same verdict as the gateway."""
    frame = p.parse_client_frame(enc(msg()))
    assert p.validate_client_frame(frame) == frame
    with pytest.raises(p.FrameError):
        p.validate_client_frame(msg(body={"x": "\u0000"}))
    with pytest.raises(p.FrameError):
        p.validate_client_frame(msg(body=float("nan")))
    with pytest.raises(p.FrameError):
        p.validate_client_frame([1])


def test_predicates():
    """User ids and msgIds follow PROTOCOL.md's rules."""
    assert p.is_user_id("alice") and p.is_user_id("a" * 128)
    assert not p.is_user_id("a" * 129) and not p.is_user_id("a b") and not p.is_user_id("")
    assert p.is_msg_id("42") and not p.is_msg_id("0") and not p.is_msg_id("x")
    assert not p.is_msg_id(str(2**63))


def test_builders():
    """Replies have exactly PROTOCOL.md's fields."""
    assert p.auth_reply_ok("alice", "u##1.2.3.4##5", "u") == {
        "type": "auth_reply", "ok": True, "userId": "alice", "connId": "u##1.2.3.4##5", "serverId": "u"}
    assert p.auth_reply_error("invalid_token", "no") == {
        "type": "auth_reply", "ok": False, "error": {"code": "invalid_token", "message": "no"}}
    assert p.error_frame("x", "y") == {"type": "error", "code": "x", "message": "y"}
    assert p.reply_to(msg(), "rate_limited", "slow")["type"] == "message_reply"
    assert p.reply_to({"type": "history", "id": "q"}, "unavailable", "later") == {
        "type": "error", "code": "unavailable", "message": "later", "ref": "q"}


# --- the orjson fast path agrees with the standard library (encode_bytes, parse_frame)

_SAME_FRAMES = [
    {"type": "message_send", "msgId": "12", "sessionId": "p2p:a:b", "seq": 3, "from": "a", "ts": 1765000000000,
     "body": {"t": 1765000000000.123, "text": "héllo \u2028 \u2029 😀 \x00 \x1f \x7f \"q\" \\ </script>"}},
    {"type": "error", "code": "bad_frame", "message": "x", "ref": 7},
    {"type": "message_send", "body": {"big": 2**70, "neg": -2**63 - 1, "list": [1, 2.5, None, True, False, []]}},
    {"type": "x", "body": {1: "int key", "nested": {"a": {"b": [{"c": ""}]}}}},
]


@pytest.mark.parametrize("frame", _SAME_FRAMES)
def test_encode_bytes_writes_what_the_standard_library_writes(frame, monkeypatch):
    """Same bytes as the compact ensure_ascii=False encoder: UTF-8 kept, only quotes, backslashes and controls escaped."""
    fast = p.encode_bytes(frame)
    monkeypatch.setattr(p, "orjson", None)
    assert fast == p.encode_bytes(frame)
    assert p.encode(frame) == fast.decode("utf-8")


def test_encode_still_refuses_lone_surrogates():
    with pytest.raises(UnicodeEncodeError):
        p.encode_bytes({"type": "x", "s": "\ud800"})


_SAME_INPUTS = [
    b'{"type":"message","clientMsgId":"c1","sessionId":"p2p:a:b","body":{"t":1.5,"x":"\\u00e9"}}',
    b'{"type":"read","sessionId":"s","seq":123456789012345678901234567890}',
    b'{"type":"read","sessionId":"s","seq":-9223372036854775809}',
    b'{"type":"message","clientMsgId":"12345678901234567890","sessionId":"s","body":1}',
    b'{"type":"message","clientMsgId":"c","sessionId":"s","body":"\\u0000"}',
    b'{"type":"message","clientMsgId":"c","sessionId":"s","body":"\\ud800"}',
    b'{"type":"message","clientMsgId":"c","sessionId":"s","body":"\\ud83d\\ude00"}',
    b'{"type":"message","clientMsgId":"c","sessionId":"s","body":"a\x00b"}',
    b'{"type":"message","clientMsgId":"c","sessionId":"s","body":NaN}',
    b'{"type":"message","clientMsgId":"c","sessionId":"s","body":1e400}',
    b'{"type":"message","clientMsgId":"c","sessionId":"s","body":' + b"[" * 70 + b"]" * 70 + b"}",
    b'{"type":"message","clientMsgId":"c","sessionId":"s","body":' + b"[" * 2000 + b"]" * 2000 + b"}",
    b'{"type":"a","type":"ping"}',
    b'\xef\xbb\xbf{"type":"ping"}',
    b'{"type":"ping"',
    b'{"type":"ping"} x',
    b'\xff{"type":"ping"}',
    b'["type","ping"]',
    b'{"type":5}',
    b'  {"type":"ping"}\n',
]


@pytest.mark.parametrize("data", _SAME_INPUTS)
def test_parse_frame_fast_path_agrees_with_the_standard_library(data, monkeypatch):
    """The same frame, or the same bad_frame with the same message, with and without orjson."""
    def outcome():
        try:
            return ("ok", p.parse_client_frame(data))
        except p.FrameError as e:
            return ("error", e.code, e.message, e.ref)

    fast = outcome()
    monkeypatch.setattr(p, "orjson", None)
    assert fast == outcome()

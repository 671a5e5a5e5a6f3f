"""imcluster's client wire protocol, version 1: frames, validation, error codes.

``/work/shared/PROTOCOL.md`` is the contract; this module implements it
without any I/O, so the gateway's engine, the processors and tests share one
reading of it. Gateways call :func:`parse_client_frame` on every frame a client
sends; processors call :func:`validate_client_frame` again on what a gateway
forwarded (``docs/internals.rst``) and build their replies with the helpers
below.

Where PROTOCOL.md is silent, imcluster does the following (this is the
project's protocol reference for those points):

* Any client frame may carry ``id``: a string of 1-64 characters or an
  integer. It is echoed as ``ref`` in ``error`` frames about that frame (a
  ``clientMsgId`` takes precedence) and as ``id`` in ``session_reply``. Any
  other value of ``id`` makes the frame a ``bad_frame``.
* Unknown fields are ignored (clients may be newer than the server); the
  validated frame that travels to the processors holds only known fields.
* No string anywhere in a frame, object keys included, may contain U+0000 or
  an unpaired UTF-16 surrogate (``"\\ud800"``): neither survives UTF-8 or
  PostgreSQL's ``jsonb``. Such a frame is a ``bad_frame``. So are ``NaN`` and
  ``Infinity`` (not JSON), and frames nested deeper than ``max_json_depth``
  (default 64) arrays/objects.
* ``auth``: ``token`` must be a non-empty string (else ``bad_frame``; a string
  that is not a valid JWT is ``invalid_token``); ``device`` is an optional
  string of at most 256 characters.
* ``message``: ``sessionId`` is 1-300 characters without control characters
  (a ``p2p:<a>:<b>`` id of two 128-character user ids fits); ``body`` is
  required (``null`` is a value).
* ``message_send_reply``: ``msgIds`` is a list of at most 1000 strings of
  1-64 characters (possibly empty). Ids that are not decimal msgIds are
  ignored like unknown ones.
* ``history``: ``beforeSeq`` is absent, ``null`` or an integer >= 0;
  ``limit`` is absent, ``null`` (50) or an integer >= 1, capped at 200.
* ``read``: ``seq`` is an integer >= 0.
* Integers beyond 2**63-1 in ``beforeSeq``, ``limit`` and ``seq`` count as
  2**63-1 (capped or clamped like any large value, not refused).
* ``session_create``: ``members`` is a list of user ids (PROTOCOL.md's
  ``sub`` rule); ``sessionId`` is optional (absent or ``null``: the server
  picks one).
* ``typing``: ``sessionId`` as for ``message``; refusals are ``error``
  frames (``not_member``, ``no_session``), success has no reply.
* ``presence_subscribe`` / ``presence_unsubscribe``: ``users`` is a list of
  user ids (a user named twice counts once; the list may be empty). Both
  are answered ``presence_reply`` (``ok:false`` with ``too_large`` or
  ``unavailable``); ``presence_unsubscribe`` does not draw from the bucket.
* ``ping`` before ``auth`` gets ``not_authenticated`` like any other frame
  (PROTOCOL.md: "any other frame").
* A frame over the rate limit is answered like a failed one: a ``message``
  gets ``message_reply`` ``ok:false`` code ``rate_limited``, other frames an
  ``error`` frame with that code; the frame is not processed. Which frames
  draw from the bucket is :data:`RATE_COST` (``auth``, ``ping`` and
  ``message_send_reply`` never do); an invalid frame draws like a valid one.
* Every failed ``auth`` (``invalid_token``, ``token_expired``, including a
  refresh whose token names another user) is followed by close 4001. The one
  exception is ``auth_reply`` ``ok:false`` code ``unavailable`` (the server
  could not record the connection): the connection stays open and
  unauthenticated, and the client may send ``auth`` again.
* Frames sent after ``auth`` and before its ``auth_reply`` are held and
  processed, in order, once the ``auth`` is decided (a client may pipeline).
* Close codes other than PROTOCOL.md's: 1000 idle timeout (TCP: ``error``
  ``idle_timeout``), 1008 after too many bad frames in a row (TCP: the last
  ``bad_frame`` error, then close), 1001 going away (TCP: ``error``
  ``going_away``), 503 on the WebSocket handshake when the gateway refuses
  new connections (TCP: ``error`` ``unavailable``, then close). A gateway
  that already holds ``max_connections`` sockets (handshakes included) closes
  a new one right after accepting it, before reading a byte.
* A WebSocket opening handshake over ``max_handshake_size`` bytes (default
  16 KiB) is answered ``HTTP/1.1 431`` and closed; one not complete within
  ``handshake_timeout`` is dropped.
"""

from __future__ import annotations

import json
import re
from typing import Any

try:  # the fast path of encode/parse (setup.cfg installs it); the standard library otherwise
    import orjson
except ImportError:  # pragma: no cover
    orjson = None

VERSION = 1

# --- error codes (PROTOCOL.md; the last group is imcluster's own)
BAD_FRAME = "bad_frame"
TOO_LARGE = "too_large"
NOT_AUTHENTICATED = "not_authenticated"
AUTH_TIMEOUT = "auth_timeout"
INVALID_TOKEN = "invalid_token"
TOKEN_EXPIRED = "token_expired"
SLOW_CONSUMER = "slow_consumer"
RATE_LIMITED = "rate_limited"
UNAVAILABLE = "unavailable"
NOT_MEMBER = "not_member"
NO_SESSION = "no_session"
REJECTED = "rejected"
CONFLICT = "conflict"
GOING_AWAY = "going_away"
IDLE_TIMEOUT = "idle_timeout"

# version 1.1: recall and edit (PROTOCOL.md "Events in the session's order")
NOT_ALLOWED = "not_allowed"
NO_MESSAGE = "no_message"

ERROR_CODES = frozenset({
    BAD_FRAME, TOO_LARGE, NOT_AUTHENTICATED, AUTH_TIMEOUT, INVALID_TOKEN, TOKEN_EXPIRED,
    SLOW_CONSUMER, RATE_LIMITED, UNAVAILABLE, NOT_MEMBER, NO_SESSION, REJECTED, CONFLICT,
    GOING_AWAY, IDLE_TIMEOUT,
}) | {NOT_ALLOWED, NO_MESSAGE}

# --- WebSocket close codes
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_TOO_LARGE = 1009
CLOSE_TRY_AGAIN = 1013
CLOSE_AUTH = 4001
CLOSE_TOKEN_EXPIRED = 4002
CLOSE_SLOW_CONSUMER = 4003

# the `error` frame a TCP client gets before the close that a WebSocket client
# sees as this close code (ClientConnection.close)
TCP_CLOSE_ERRORS = {
    CLOSE_GOING_AWAY: GOING_AWAY,
    CLOSE_TOO_LARGE: TOO_LARGE,
    CLOSE_TRY_AGAIN: UNAVAILABLE,
    CLOSE_AUTH: AUTH_TIMEOUT,
    CLOSE_TOKEN_EXPIRED: TOKEN_EXPIRED,
    CLOSE_SLOW_CONSUMER: SLOW_CONSUMER,
}

# --- an operator throws a user out (PROTOCOL.md 1.1 "Kicked and revoked connections";
# HTTP-API.md kick and revoke): an `error` frame with one of these codes, then close 4004
# on WebSocket (after the frame on every transport); `token_revoked` is also an auth_reply code
KICKED = "kicked"
TOKEN_REVOKED = "token_revoked"
CLOSE_KICKED = 4004
ERROR_CODES = ERROR_CODES | {KICKED, TOKEN_REVOKED}
TCP_CLOSE_ERRORS[CLOSE_KICKED] = KICKED

# --- frame types
AUTH = "auth"
PING = "ping"
MESSAGE = "message"
MESSAGE_SEND_REPLY = "message_send_reply"
HISTORY = "history"
READ = "read"
SESSION_CREATE = "session_create"
# version 1.1: typing and live presence (PROTOCOL.md "Typing", "Presence")
TYPING = "typing"
PRESENCE_SUBSCRIBE = "presence_subscribe"
PRESENCE_UNSUBSCRIBE = "presence_unsubscribe"

CLIENT_TYPES = frozenset({AUTH, PING, MESSAGE, MESSAGE_SEND_REPLY, HISTORY, READ, SESSION_CREATE,
                          TYPING, PRESENCE_SUBSCRIBE, PRESENCE_UNSUBSCRIBE})
# what gateways forward to the processors (docs/internals.rst); presence frames are
# answered by the gateway itself (imcluster/gateway/presence.py)
FORWARDED_TYPES = frozenset({MESSAGE, MESSAGE_SEND_REPLY, HISTORY, READ, SESSION_CREATE, TYPING})

# version 1.1: events stored in the session's order (PROTOCOL.md "Events in the session's order")
RECALL = "recall"
EDIT = "edit"
CLIENT_TYPES = CLIENT_TYPES | {RECALL, EDIT}
FORWARDED_TYPES = FORWARDED_TYPES | {RECALL, EDIT}
#: frames only an imapi sends to the processors (never a client: a gateway refuses them as
#: unknown); ``members`` is HTTP-API.md's ``POST /v1/sessions/{id}/members``
MEMBERS = "members"
API_TYPES = frozenset({MEMBERS})
#: what a ``message_send`` of an event carries in ``kind`` (a plain message has none)
EVENT_KINDS = frozenset({"recall", "edit", "members"})

#: tokens a frame draws from its connection's bucket (``rate_limit``, ``rate_burst``;
#: PROTOCOL.md "Framing"): the frames that make the server work draw one;
#: acknowledgements, keepalive and authentication never do (a refused
#: ``message_send_reply`` would leave its messages undelivered; one carries at
#: most MSG_IDS_MAX ids instead). A type not listed draws one, so a new frame
#: type (``typing``, ``recall``, ``edit``, ``presence_subscribe``) is limited
#: until it is listed here; invalid frames draw one too.
RATE_COST = {
    AUTH: 0,
    PING: 0,
    MESSAGE_SEND_REPLY: 0,
    MESSAGE: 1,
    SESSION_CREATE: 1,
    HISTORY: 1,
    READ: 1,
    TYPING: 1,
    PRESENCE_SUBSCRIBE: 1,
    PRESENCE_UNSUBSCRIBE: 0,  # work only a gateway does, and less of it
    RECALL: 1,
    EDIT: 1,
}

# --- limits fixed by the protocol (sizes and rates are configuration)
CLIENT_MSG_ID_MAX = 64
ID_MAX = 64
MSG_ID_MAX = 64
MSG_IDS_MAX = 1000  # msgIds in one message_send_reply (PROTOCOL.md "Framing")
DEVICE_MAX = 256
SESSION_ID_MAX = 300
USER_ID_MAX = 128
HISTORY_DEFAULT_LIMIT = 50
HISTORY_MAX_LIMIT = 200
DEFAULT_MAX_DEPTH = 64
INT64_MAX = 2**63 - 1

USER_ID_RE = re.compile(r"[A-Za-z0-9_.@-]{1,128}\Z")
_MSG_ID_RE = re.compile(r"[1-9][0-9]{0,18}\Z")
_SESSION_ID_BAD = re.compile(r"[\x00-\x1f\x7f]")
# characters no string may hold: NUL and lone surrogates
_BAD_CHARS = re.compile("[\x00\ud800-\udfff]")
# JSON escapes that may decode to a character of _BAD_CHARS (false positives
# such as an escaped backslash followed by "u0000" only cost a full check)
_SUSPECT_ESCAPE = re.compile(r"\\u(?:0000|[dD][89abcdefABCDEF])")


class FrameError(ValueError):
    """A client frame is not acceptable.

    ``code`` is the error code (usually ``bad_frame``), ``ref`` the frame's
    usable ``clientMsgId`` or ``id`` (None when it has none), ``frame_type``
    its ``type`` when that was a string, ``client_msg_id`` its usable
    ``clientMsgId``. :meth:`reply` builds the frame to answer it with.
    """

    def __init__(self, code: str, message: str, ref: Any = None,
                 frame_type: str | None = None, client_msg_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.ref = ref
        self.frame_type = frame_type
        self.client_msg_id = client_msg_id

    def reply(self) -> dict:
        """``message_reply`` ok:false for a ``message`` with a usable clientMsgId, else ``error``."""
        return error_reply(self.code, self.message, self.frame_type, self.client_msg_id, self.ref)


# --- small predicates (processors use them too)


def is_user_id(value: Any) -> bool:
    """True for a valid user id: 1-128 characters of ``A-Z a-z 0-9 _ . @ -``."""
    return isinstance(value, str) and USER_ID_RE.match(value) is not None


def is_session_id(value: Any) -> bool:
    """True for an acceptable session id: 1-300 characters, no control characters."""
    return (isinstance(value, str) and 0 < len(value) <= SESSION_ID_MAX
            and _SESSION_ID_BAD.search(value) is None and _BAD_CHARS.search(value) is None)


def is_client_msg_id(value: Any) -> bool:
    """True for a usable ``clientMsgId``: a string of 1-64 characters."""
    return (isinstance(value, str) and 0 < len(value) <= CLIENT_MSG_ID_MAX
            and _BAD_CHARS.search(value) is None)


def is_msg_id(value: Any) -> bool:
    """True when ``value`` can name a stored message (a positive decimal bigint as a string)."""
    return isinstance(value, str) and _MSG_ID_RE.match(value) is not None and int(value) <= INT64_MAX


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _usable_id(value: Any) -> bool:
    if isinstance(value, str):
        return 0 < len(value) <= ID_MAX and _BAD_CHARS.search(value) is None
    return _is_int(value) and -INT64_MAX <= value <= INT64_MAX


def frame_ref(frame: Any) -> Any:
    """The ``ref`` for an error about ``frame``: its usable clientMsgId, else its usable id, else None."""
    if not isinstance(frame, dict):
        return None
    cmid = frame.get("clientMsgId")
    if is_client_msg_id(cmid):
        return cmid
    fid = frame.get("id")
    if _usable_id(fid):
        return fid
    return None


# --- builders


def error_frame(code: str, message: str, ref: Any = None) -> dict:
    """``{"type":"error","code":..,"message":..,"ref":..}`` (``ref`` only when there is one)."""
    frame = {"type": "error", "code": code, "message": message}
    if ref is not None:
        frame["ref"] = ref
    return frame


def message_reply_error(client_msg_id: str, code: str, message: str) -> dict:
    """``message_reply`` with ``ok:false`` for the message ``client_msg_id``."""
    return {"type": "message_reply", "ok": False, "clientMsgId": client_msg_id,
            "error": {"code": code, "message": message}}


def error_reply(code: str, message: str, frame_type: str | None, client_msg_id: str | None,
                ref: Any = None) -> dict:
    """How to answer a frame that failed with ``code``.

    A ``message`` with a usable ``clientMsgId`` gets ``message_reply``
    ``ok:false``; anything else an ``error`` frame carrying ``ref``.
    """
    if frame_type == MESSAGE and client_msg_id is not None:
        return message_reply_error(client_msg_id, code, message)
    return error_frame(code, message, ref)


def reply_to(frame: dict, code: str, message: str) -> dict:
    """:func:`error_reply` for a (validated) client ``frame``."""
    cmid = frame.get("clientMsgId")
    return error_reply(code, message, frame.get("type"),
                       cmid if is_client_msg_id(cmid) else None, frame_ref(frame))


def auth_reply_ok(user_id: str, conn_id: str, server_id: str) -> dict:
    """The successful ``auth_reply`` (PROTOCOL.md, field for field)."""
    return {"type": "auth_reply", "ok": True, "userId": user_id, "connId": conn_id,
            "serverId": server_id}


def auth_reply_error(code: str, message: str) -> dict:
    """A failed ``auth_reply``."""
    return {"type": "auth_reply", "ok": False, "error": {"code": code, "message": message}}


PONG = {"type": "pong"}

_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False,
                            check_circular=False)


def encode(frame: Any) -> str:
    """Compact JSON text of ``frame`` (UTF-8 characters kept as they are)."""
    if orjson is not None:
        try:
            return orjson.dumps(frame).decode("utf-8")
        except TypeError:
            pass
    return _encoder.encode(frame)


def encode_bytes(frame: Any) -> bytes:
    """:func:`encode`, as the UTF-8 bytes that go on the wire.

    orjson writes what the standard library's compact ``ensure_ascii=False``
    encoder writes, 10-15 times faster: characters beyond ASCII as UTF-8,
    only ``"``, ``\\`` and control characters escaped (U+0000 as
    ``\\u0000``), object keys in insertion order. What it refuses (integers
    beyond 64 bits, keys that are not strings, strings with lone
    surrogates) goes through the standard library, which writes the first
    two as before and refuses the third (``UnicodeEncodeError``) as before.
    It would write NaN and Infinity as ``null`` where the standard library
    raised: no frame holds them, since :func:`parse_frame` refuses them.
    """
    if orjson is not None:
        try:
            return orjson.dumps(frame)
        except TypeError:
            pass
    return _encoder.encode(frame).encode("utf-8")


def message_frame_size(session_id: str, client_msg_id: str, body: Any) -> int:
    """Bytes of the compact client ``message`` frame that carries ``body``.

    What a message posted another way (imapi's ``POST .../messages``) is
    held to, so that it is no larger than a client could send it
    (``max_frame_size``; HTTP-API.md "Errors").
    """
    return len(encode_bytes({"type": MESSAGE, "clientMsgId": client_msg_id, "sessionId": session_id,
                             "body": body}))


# --- parsing and validation


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_decoder = json.JSONDecoder(parse_constant=_reject_constant)

# runs of digits orjson reads differently: it makes a float of an integer
# beyond 64 bits, where the standard library keeps the integer (19 digits
# catch every negative one below -2**63; a long string of digits only costs
# the standard library's path). Every digit made "0", then one substring
# search: 10x faster than the regular expression [0-9]{19}.
_DIGITS_TO_ZERO = bytes.maketrans(b"123456789", b"000000000")
_LONG_RUN = b"0" * 19


def has_long_number(data: bytes) -> bool:
    """True when ``data`` holds a run of 19 or more digits (orjson may read it otherwise)."""
    return _LONG_RUN in data.translate(_DIGITS_TO_ZERO)


_SUSPECT_ESCAPE_BYTES = re.compile(rb"\\u(?:0000|[dD][89abcdefABCDEF])")


def _fast_parse(data: bytes, max_depth: int) -> Any:
    """The frame orjson reads in ``data``, checked; None to take the standard library's path.

    Valid frames only: whatever orjson refuses (bad UTF-8, a raw control
    character, a lone surrogate escape, NaN, a number out of range, bad
    JSON) is left to the standard library's path, which names the fault
    as it always did.
    """
    if has_long_number(data):
        return None
    try:
        frame = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(frame, dict):
        raise FrameError(BAD_FRAME, "frame must be a JSON object")
    if (_SUSPECT_ESCAPE_BYTES.search(data) is not None
            or data.count(b"[") + data.count(b"{") > max_depth):
        why = check_json_value(frame, max_depth)
        if why is not None:
            raise _bad(why, frame)
    return frame


def _bad(message: str, frame: Any = None) -> FrameError:
    frame_type = frame.get("type") if isinstance(frame, dict) else None
    cmid = frame.get("clientMsgId") if isinstance(frame, dict) else None
    return FrameError(BAD_FRAME, message, frame_ref(frame),
                      frame_type if isinstance(frame_type, str) else None,
                      cmid if is_client_msg_id(cmid) else None)


def check_json_value(value: Any, max_depth: int = DEFAULT_MAX_DEPTH) -> str | None:
    """Why ``value`` (parsed JSON) cannot be carried, or None when it can.

    Walks iteratively (no recursion limit to hit): every string and object
    key must be free of U+0000 and lone surrogates, floats finite, and
    nesting at most ``max_depth`` containers.
    """
    stack = [(value, 0)]
    pop = stack.pop
    push = stack.append
    while stack:
        v, depth = pop()
        if isinstance(v, str):
            if _BAD_CHARS.search(v):
                return "strings may not contain U+0000 or unpaired surrogates"
        elif isinstance(v, dict):
            if depth >= max_depth:
                return f"nested deeper than {max_depth} levels"
            for k, item in v.items():
                if not isinstance(k, str):
                    return "object keys must be strings"
                if _BAD_CHARS.search(k):
                    return "strings may not contain U+0000 or unpaired surrogates"
                if isinstance(item, (dict, list, str, float)):
                    push((item, depth + 1))
        elif isinstance(v, list):
            if depth >= max_depth:
                return f"nested deeper than {max_depth} levels"
            for item in v:
                if isinstance(item, (dict, list, str, float)):
                    push((item, depth + 1))
        elif isinstance(v, float):
            if v != v or v in (float("inf"), float("-inf")):
                return "NaN and Infinity are not JSON"
    return None


def parse_frame(data: bytes | str, max_depth: int = DEFAULT_MAX_DEPTH) -> dict:
    """Decode one frame: UTF-8 JSON, an object with a string ``type``.

    Also applies the string and nesting rules of :func:`check_json_value`
    to the whole frame (with cheap scans of the text first, so that ordinary
    frames are never walked). Raises :class:`FrameError` ``bad_frame``.
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        if orjson is not None:
            frame = _fast_parse(bytes(data), max_depth)
            if frame is not None:
                if not isinstance(frame.get("type"), str):
                    raise _bad("frame needs a string field 'type'", frame)
                return frame
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            raise FrameError(BAD_FRAME, "frame is not valid UTF-8") from None
    elif isinstance(data, str):
        text = data
    else:
        raise TypeError(f"frame data must be bytes or str, not {type(data).__name__}")
    if _BAD_CHARS.search(text):
        raise FrameError(BAD_FRAME, "frame contains U+0000 or unpaired surrogates")
    try:
        frame = _decoder.decode(text)
    except RecursionError:
        raise FrameError(BAD_FRAME, f"frame nested deeper than {max_depth} levels") from None
    except ValueError as e:  # JSONDecodeError, NaN, ints too long to convert
        raise FrameError(BAD_FRAME, f"frame is not JSON: {e}") from None
    if not isinstance(frame, dict):
        raise FrameError(BAD_FRAME, "frame must be a JSON object")
    if (_SUSPECT_ESCAPE.search(text) is not None
            or text.count("[") + text.count("{") > max_depth):
        why = check_json_value(frame, max_depth)
        if why is not None:
            raise _bad(why, frame)
    frame_type = frame.get("type")
    if not isinstance(frame_type, str):
        raise _bad("frame needs a string field 'type'", frame)
    return frame


def parse_client_frame(data: bytes | str, max_depth: int = DEFAULT_MAX_DEPTH) -> dict:
    """:func:`parse_frame` then the shape rules of the frame's type.

    Returns the validated frame (known fields only, defaults filled in).
    This is what a gateway runs on every client frame.
    """
    return _validate_shape(parse_frame(data, max_depth))


def validate_client_frame(frame: Any, max_depth: int = DEFAULT_MAX_DEPTH) -> dict:
    """Check an already decoded client frame (e.g. one a gateway forwarded).

    Applies every rule of :func:`parse_client_frame` and returns the
    validated frame; raises :class:`FrameError`.
    """
    if not isinstance(frame, dict):
        raise FrameError(BAD_FRAME, "frame must be a JSON object")
    why = check_json_value(frame, max_depth)
    if why is not None:
        raise _bad(why, frame)
    if not isinstance(frame.get("type"), str):
        raise _bad("frame needs a string field 'type'", frame)
    return _validate_shape(frame)


def _validate_shape(frame: dict) -> dict:
    frame_type = frame["type"]
    validator = _VALIDATORS.get(frame_type)
    if validator is None:
        raise _bad(f"unknown frame type {frame_type[:40]!r}", frame)
    out = {"type": frame_type}
    fid = frame.get("id")
    if fid is not None:
        if not _usable_id(fid):
            raise _bad("'id' must be a string of 1-64 characters or an integer", frame)
        out["id"] = fid
    validator(frame, out)
    return out


def _session_id(frame: dict, out: dict, required: bool = True) -> None:
    sid = frame.get("sessionId")
    if sid is None and not required:
        return
    if not is_session_id(sid):
        raise _bad("'sessionId' must be a string of 1-300 characters without control characters",
                   frame)
    out["sessionId"] = sid


def _seq(frame: dict, name: str, minimum: int) -> int:
    value = frame.get(name)
    if not _is_int(value) or value < minimum:
        raise _bad(f"'{name}' must be an integer >= {minimum}", frame)
    # PROTOCOL.md caps a limit and clamps a read to the last seq: a huge number
    # is not an error, and no seq exceeds a bigint
    return min(value, INT64_MAX)


def _v_auth(frame: dict, out: dict) -> None:
    token = frame.get("token")
    if not isinstance(token, str) or not token:
        raise _bad("'auth' needs a non-empty string 'token'", frame)
    out["token"] = token
    device = frame.get("device")
    if device is not None:
        if not isinstance(device, str) or len(device) > DEVICE_MAX:
            raise _bad(f"'device' must be a string of at most {DEVICE_MAX} characters", frame)
        out["device"] = device


def _v_ping(frame: dict, out: dict) -> None:
    pass


def _v_message(frame: dict, out: dict) -> None:
    cmid = frame.get("clientMsgId")
    if not is_client_msg_id(cmid):
        raise _bad("'clientMsgId' must be a string of 1-64 characters", frame)
    out["clientMsgId"] = cmid
    _session_id(frame, out)
    if "body" not in frame:
        raise _bad("'message' needs a 'body'", frame)
    out["body"] = frame["body"]


def _v_message_send_reply(frame: dict, out: dict) -> None:
    ids = frame.get("msgIds")
    if not isinstance(ids, list) or len(ids) > MSG_IDS_MAX or not all(
            isinstance(i, str) and 0 < len(i) <= MSG_ID_MAX for i in ids):
        raise _bad(f"'msgIds' must be a list of at most {MSG_IDS_MAX} strings of 1-64 characters", frame)
    out["msgIds"] = ids


def _v_history(frame: dict, out: dict) -> None:
    _session_id(frame, out)
    if frame.get("beforeSeq") is not None:
        out["beforeSeq"] = _seq(frame, "beforeSeq", 0)
    limit = HISTORY_DEFAULT_LIMIT
    if frame.get("limit") is not None:
        limit = min(_seq(frame, "limit", 1), HISTORY_MAX_LIMIT)
    out["limit"] = limit


def _v_read(frame: dict, out: dict) -> None:
    _session_id(frame, out)
    out["seq"] = _seq(frame, "seq", 0)


def _v_session_create(frame: dict, out: dict) -> None:
    members = frame.get("members")
    if not isinstance(members, list) or not all(is_user_id(m) for m in members):
        raise _bad("'members' must be a list of user ids (1-128 characters of A-Z a-z 0-9 _ . @ -)",
                   frame)
    out["members"] = members
    _session_id(frame, out, required=False)


def _v_typing(frame: dict, out: dict) -> None:
    _session_id(frame, out)


def _v_presence_users(frame: dict, out: dict) -> None:
    users = frame.get("users")
    if not isinstance(users, list) or not all(is_user_id(u) for u in users):
        raise _bad("'users' must be a list of user ids (1-128 characters of A-Z a-z 0-9 _ . @ -)", frame)
    out["users"] = list(dict.fromkeys(users))  # a user named twice is one subscription


def _msg_id(frame: dict, out: dict) -> None:
    msg_id = frame.get("msgId")
    if not isinstance(msg_id, str) or not 0 < len(msg_id) <= MSG_ID_MAX or _BAD_CHARS.search(msg_id):
        raise _bad("'msgId' must be a string of 1-64 characters", frame)
    out["msgId"] = msg_id


def _v_recall(frame: dict, out: dict) -> None:
    # sessionId is optional: the msgId names the message (imapi's recall gives the path's session)
    _msg_id(frame, out)
    _session_id(frame, out, required=False)


def _v_edit(frame: dict, out: dict) -> None:
    _msg_id(frame, out)
    _session_id(frame, out, required=False)
    if "body" not in frame:
        raise _bad("'edit' needs a 'body'", frame)
    out["body"] = frame["body"]


def _v_members(frame: dict, out: dict) -> None:
    _session_id(frame, out)
    for name in ("add", "remove"):
        users = frame.get(name, [])
        if not isinstance(users, list) or not all(is_user_id(u) for u in users):
            raise _bad(f"'{name}' must be a list of user ids", frame)
        out[name] = users
    key = frame.get("clientMsgId")
    if not is_client_msg_id(key):
        raise _bad("'clientMsgId' must be a string of 1-64 characters", frame)
    out["clientMsgId"] = key


_VALIDATORS = {
    AUTH: _v_auth,
    PING: _v_ping,
    MESSAGE: _v_message,
    MESSAGE_SEND_REPLY: _v_message_send_reply,
    HISTORY: _v_history,
    READ: _v_read,
    SESSION_CREATE: _v_session_create,
    TYPING: _v_typing,
    PRESENCE_SUBSCRIBE: _v_presence_users,
    PRESENCE_UNSUBSCRIBE: _v_presence_users,
    RECALL: _v_recall,
    EDIT: _v_edit,
}

#: validators of :data:`API_TYPES` (:func:`validate_api_frame`; never a gateway's)
_API_VALIDATORS = {MEMBERS: _v_members}


def validate_api_frame(frame: Any, max_depth: int = DEFAULT_MAX_DEPTH) -> dict:
    """:func:`validate_client_frame` for the frames only an imapi sends (:data:`API_TYPES`), and the others."""
    if isinstance(frame, dict) and frame.get("type") in _API_VALIDATORS:
        why = check_json_value(frame, max_depth)
        if why is not None:
            raise _bad(why, frame)
        out = {"type": frame["type"]}
        fid = frame.get("id")
        if fid is not None:
            if not _usable_id(fid):
                raise _bad("'id' must be a string of 1-64 characters or an integer", frame)
            out["id"] = fid
        _API_VALIDATORS[frame["type"]](frame, out)
        return out
    return validate_client_frame(frame, max_depth)

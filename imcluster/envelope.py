"""The daemons' own wire: every body gateways, processors and imapis send each other over RabbitMQ.

Clients speak PROTOCOL.md (:mod:`imcluster.protocol`); the daemons speak the
documents below (docs/internals.rst has the routing keys and the rules).
This module is the only place that builds or parses them, as
:mod:`imcluster.protocol` is for the client wire. Both directions carry a
*batch*, ``{"v":1,"items":[...]}``: one AMQP message, many items.

Gateway (or imapi) -> processors, routing key ``<ns>.server``
    items are :class:`Item`\\ s, ``{"kind":"frame"|"sync", "userId",
    "serverId", "connId", "ts", "frame"?, "trusted"?}``. A gateway or an
    imapi submits them to a :class:`Publisher` (each one serialised once,
    :meth:`Item.encode`; a batch is a join, :func:`items_body`); a processor
    reads them back with :func:`parse_items` (:func:`parse_item` validates
    each frame again with :mod:`imcluster.protocol`).

Processors -> one gateway (or imapi), routing key ``<ns>.wsserver.<uuid>``
    items are :class:`Delivery`\\ s, ``{"connIds":[...],"frames":[...]}``.
    A processor encodes each frame once, however many connections and
    gateways get it, and :func:`deliveries_body` assembles the body from
    those strings; a gateway (or an imapi, for its replies) reads it with
    :func:`parse_deliveries`.

Connection ids
    ``<serverId>##<ip>##<port>`` (:func:`conn_id`, :func:`parse_conn_id`,
    :func:`gateway_of`), also the field of ``UCIR##<userId>`` in Redis. An
    imapi names each request ``<serverId>##api##<n>`` (:func:`api_conn_id`,
    :func:`is_api_conn`): the literal ``api`` where a client's IP would be.

Hot paths (the gateway's :meth:`Publisher.flush`, the processor's delivery
bodies and sync pages) never decode and encode again what is already JSON:
they join encoded strings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from imcluster import metrics, protocol

try:
    import orjson
except ImportError:  # pragma: no cover
    orjson = None

log = Logger(namespace="imcluster.envelope")

#: the batch format's version (``"v"``)
VERSION = 1

#: item kinds, gateway -> processors
FRAME = "frame"
SYNC = "sync"


class MalformedBatch(ValueError):
    """A body that is not a ``{"v":1,"items":[...]}`` batch: no daemon can ever handle it."""


# --- connection ids -----------------------------------------------------------------

#: separates the parts of a connection id (user ids, uuids and IPs never hold ``#``)
SEP = "##"
#: the ``ip`` part of an imapi's connection id: ``<uuid>##api##<n>``
API_CONN_MARK = "api"
#: the longest connection id an item may name (a uuid, an IPv6 address and a port fit easily)
MAX_CONN_ID = 200
#: the longest server id (a gateway's or an imapi's uuid)
MAX_SERVER_ID = 64


def _check_part(value: str, what: str) -> None:
    if not value or "#" in value:
        raise ValueError(f"{what} must be non-empty and free of '#': {value!r}")


def conn_id(server_id: str, ip: str, port: int | str) -> str:
    """``<serverId>##<ip>##<port>``; ValueError when a part is empty or holds ``#``."""
    _check_part(server_id, "uuid")
    _check_part(ip, "ip")
    return f"{server_id}{SEP}{ip}{SEP}{int(port)}"


def parse_conn_id(value: str, what: str = "connection id") -> tuple[str, str, int]:
    """``<serverId>##<ip>##<port>`` -> ``(server_id, ip, port)``; ValueError when malformed."""
    parts = value.split(SEP)
    if len(parts) != 3 or not parts[0] or not parts[1] or not parts[2].isdigit():
        raise ValueError(f"malformed {what}: {value!r}")
    return parts[0], parts[1], int(parts[2])


def gateway_of(conn_id: str) -> str | None:
    """The server uuid of a ``<uuid>##<ip>##<port>`` connection id (None when malformed)."""
    uuid, sep, _ = conn_id.partition(SEP)
    return uuid if sep and uuid else None


def valid_server_id(value: Any) -> bool:
    """True for a plausible ``serverId``: a non-empty string of at most 64 characters, no ``#``."""
    return isinstance(value, str) and 0 < len(value) <= MAX_SERVER_ID and "#" not in value


def api_conn_id(server_id: str, n: int) -> str:
    """The ``connId`` of the ``n``-th request of the imapi ``server_id``."""
    return f"{server_id}{SEP}{API_CONN_MARK}{SEP}{n}"


def is_api_conn(conn_id: Any) -> bool:
    """True for a ``connId`` an imapi made (``<uuid>##api##<n>``); processors may trust only these."""
    if not isinstance(conn_id, str):
        return False
    parts = conn_id.split(SEP)
    return len(parts) == 3 and parts[1] == API_CONN_MARK and parts[2].isdigit()


# --- batches ------------------------------------------------------------------------

_BATCH_HEAD = b'{"v":1,"items":['
_BATCH_TAIL = b"]}"


def items_body(encoded: Sequence[bytes]) -> bytes:
    """A gateway -> processors batch of items already encoded (:meth:`Item.encode`)."""
    return _BATCH_HEAD + b",".join(encoded) + _BATCH_TAIL


def deliveries_body(entries: Iterable[tuple[Sequence[str], Sequence[str]]]) -> bytes:
    """A processors -> gateway batch: one delivery per ``(conn_ids, encoded_frames)`` entry.

    The frames are JSON text already (:func:`imcluster.protocol.encode`):
    a frame sent to many connections or gateways is encoded once, and the
    body is only joined here.
    """
    # the literals stay inline: measured faster than a module-level format string
    items = ",".join(['{"connIds":%s,"frames":[%s]}' % (json.dumps(conn_ids), ",".join(frames))
                      for conn_ids, frames in entries])
    return ('{"v":1,"items":[%s]}' % items).encode("utf-8")


def delivery_body(conn_ids: Sequence[str], frames: Sequence[str]) -> bytes:
    """``deliveries_body([(conn_ids, frames)])``: a batch of one delivery (a sync page).

    Written out so that a page of a large backlog is copied no more often
    than it must be (``tests/test_envelope.py`` checks the bytes are the same).
    """
    return ('{"v":1,"items":[{"connIds":%s,"frames":[%s]}]}'
            % (json.dumps(conn_ids), ",".join(frames))).encode("utf-8")


#: bytes a batch or delivery body adds around its items and frames (connection ids aside)
BODY_OVERHEAD = 64


def text_size(text: str) -> int:
    """UTF-8 bytes of ``text`` (without encoding it when it is ASCII)."""
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def split_frames(frames: Sequence[str], budget: int) -> list[list[str]]:
    """``frames`` in order, cut into runs whose text (with a comma each) stays within ``budget`` bytes.

    A frame larger than ``budget`` alone is a run of its own (the bus
    refuses it: ``imcluster.bus.TooLarge``). Never an empty run, but ``[[]]``
    for no frames.
    """
    runs: list[list[str]] = [[]]
    used = 0
    for frame in frames:
        size = text_size(frame) + 1
        if runs[-1] and used + size > budget:
            runs.append([])
            used = 0
        runs[-1].append(frame)
        used += size
    return runs


def _loads(body: bytes) -> Any:
    """``json.loads(body)``, by orjson when it reads the same values (a batch without long numbers).

    What orjson refuses (NaN, lone surrogate escapes, bad UTF-8, deep
    nesting, anything not JSON) goes to the standard library, which reads
    it or refuses it as before.
    """
    # a run of 19 digits may be an integer beyond 64 bits, which orjson reads as a float
    if orjson is not None and isinstance(body, bytes) and not protocol.has_long_number(body):
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            pass
    return json.loads(body)


def _batch_items(body: bytes) -> list:
    """The ``items`` of a v1 batch; :class:`MalformedBatch` when ``body`` is not one."""
    try:
        doc = _loads(body)
    except (TypeError, ValueError, RecursionError) as e:
        raise MalformedBatch(f"not JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("v") != VERSION or not isinstance(doc.get("items"), list):
        raise MalformedBatch("not a {\"v\":1,\"items\":[...]} batch")
    return doc["items"]


# --- gateway -> processors ------------------------------------------------------------

#: a plausible ``ts`` in ms (2001 to 5138): anything else is ignored and the processor's clock used
TS_RANGE = (10**12, 10**14)

# the fallback of Item.encode: ASCII escapes, so a lone surrogate cannot break the batch's UTF-8
_item_encoder = json.JSONEncoder(separators=(",", ":"))


@dataclass(eq=False)
class Item:
    """One item of a gateway -> processors batch: a client frame or a sync request.

    Built by a gateway or an imapi (``kind``, the ids, ``ts``, ``frame``,
    ``trusted``) and encoded with :meth:`encode`; parsed by a processor with
    :func:`parse_item`, which also sets ``error``, ``api`` and ``trusted``
    as the processor must see them.
    """

    kind: str
    user_id: str
    server_id: str
    conn_id: str
    #: receipt time in ms at the gateway or imapi (None when absent or implausible)
    ts: int | None = None
    #: the client frame (validated again by the processor), None for ``sync``
    frame: dict | None = None
    #: the reply for a frame that failed validation (then ``frame`` is None)
    error: dict | None = None
    #: the processor's bookkeeping of the queue message this item came in
    envelope: Any = None
    #: an HTTP API connection (``<uuid>##api##<n>``, docs/internals.rst)
    api: bool = False
    #: skip the sender's membership check (only ever on an API item)
    trusted: bool = False
    #: a ``sync`` a gateway asks for again after it lost its queue or its Redis entries
    resync: bool = False
    #: with ``resync``: ms since the epoch when that loss may have begun (None: unknown)
    since: int | None = None

    @property
    def type(self) -> str | None:
        """The frame's type (None for a sync or an invalid frame)."""
        return None if self.frame is None else self.frame["type"]

    def to_json(self) -> dict:
        """The item as it travels (``trusted`` only when set)."""
        doc = {"kind": self.kind, "userId": self.user_id, "serverId": self.server_id,
               "connId": self.conn_id, "ts": self.ts}
        if self.frame is not None:
            doc["frame"] = self.frame
        if self.trusted:
            doc["trusted"] = True
        if self.resync:
            doc["resync"] = True
            if self.since is not None:
                doc["since"] = self.since
        return doc

    def encode(self) -> bytes:
        """The item's compact JSON as UTF-8; TypeError or ValueError when the frame cannot be encoded.

        orjson writes it (characters beyond ASCII as UTF-8, as PROTOCOL.md's
        frames are, 10x faster than the standard library's ASCII escapes,
        which were 15 % of a sending gateway's CPU). What orjson refuses
        (a lone surrogate, an integer beyond 64 bits, a key that is not a
        string) takes the standard library's ASCII path as before: the
        batch stays valid UTF-8, and a frame the processor refuses is
        answered ``bad_frame`` there. No item holds NaN or Infinity (frames
        are validated first), which orjson would write as ``null``.
        """
        doc = self.to_json()
        if orjson is not None:
            try:
                return orjson.dumps(doc)
            except TypeError:
                pass
        return _item_encoder.encode(doc).encode("ascii")


def frame_item(user_id: str, server_id: str, conn_id: str, ts: int, frame: dict,
               trusted: bool = False) -> Item:
    """A ``frame`` item: ``frame`` as received from ``conn_id`` (``trusted`` only from an imapi)."""
    return Item(FRAME, user_id, server_id, conn_id, ts, frame, trusted=trusted)


def sync_item(user_id: str, server_id: str, conn_id: str, ts: int, resync: bool = False,
              since: int | None = None) -> Item:
    """A ``sync`` item: send ``conn_id`` its user's undelivered messages, then ``sync_done``.

    ``resync``: the gateway asks again for a connection that stayed open,
    because what was routed to it since ``since`` (ms, when known) may have
    been lost (docs/internals.rst).
    """
    return Item(SYNC, user_id, server_id, conn_id, ts, resync=resync, since=since if resync else None)


def parse_item(raw: Any, max_depth: int = protocol.DEFAULT_MAX_DEPTH) -> Item | None:
    """An :class:`Item` from one element of ``items``; None when it names no usable connection.

    A frame that fails validation gives an item with ``error`` (the
    ``bad_frame`` reply) instead of ``frame``: the sender is answered.
    """
    if not isinstance(raw, dict):
        return None
    kind, user, server, conn = raw.get("kind"), raw.get("userId"), raw.get("serverId"), raw.get("connId")
    if kind not in (FRAME, SYNC) or not protocol.is_user_id(user) or not valid_server_id(server):
        return None
    if not isinstance(conn, str) or len(conn) > MAX_CONN_ID or gateway_of(conn) != server:
        return None
    ts = raw.get("ts")
    if not isinstance(ts, int) or isinstance(ts, bool) or not TS_RANGE[0] <= ts < TS_RANGE[1]:
        ts = None
    if kind == SYNC:
        resync = raw.get("resync") is True
        since = raw.get("since") if resync else None
        if not isinstance(since, int) or isinstance(since, bool) or not TS_RANGE[0] <= since < TS_RANGE[1]:
            since = None
        return Item(SYNC, user, server, conn, ts, resync=resync, since=since)
    api = is_api_conn(conn)
    # only an imapi may vouch for a sender (it checked authorization itself)
    trusted = api and raw.get("trusted") is True
    frame = raw.get("frame")
    try:
        # an imapi's item may also carry the frames only it sends (protocol.API_TYPES)
        frame = (protocol.validate_api_frame if api else protocol.validate_client_frame)(frame, max_depth)
        if frame["type"] not in protocol.FORWARDED_TYPES and not (api and frame["type"] in protocol.API_TYPES):
            raise protocol.FrameError(protocol.BAD_FRAME, f"{frame['type']!r} frames are not for the processors",
                                      protocol.frame_ref(frame), frame["type"])
    except protocol.FrameError as e:
        return Item(FRAME, user, server, conn, ts, error=e.reply(), api=api)
    return Item(FRAME, user, server, conn, ts, frame=frame, api=api, trusted=trusted)


def parse_items(body: bytes, max_depth: int = protocol.DEFAULT_MAX_DEPTH) -> list[Item]:
    """The items of a gateway -> processors batch; :class:`MalformedBatch` when it is not one.

    Items that name no usable connection (nothing could answer them) are
    logged and left out.
    """
    items = []
    for n, raw in enumerate(_batch_items(body)):
        item = parse_item(raw, max_depth)
        if item is None:
            log.warn("queue item {n} names no usable connection; dropped: {item!r:.200}", n=n, item=raw)
            continue
        items.append(item)
    return items


# --- processors -> gateway ------------------------------------------------------------


@dataclass(eq=False)
class Delivery:
    """One item of a processors -> gateway batch: ``frames``, in order, to each of ``conn_ids``."""

    conn_ids: list[str]
    frames: list[dict]

    def to_json(self) -> dict:
        """The delivery as it travels."""
        return {"connIds": self.conn_ids, "frames": self.frames}


#: control actions, imapi -> the gateways holding a user (HTTP-API.md kick and revoke)
KICK = "kick"
REVOKE = "revoke"


@dataclass(eq=False)
class Control:
    """An item of a batch to ``<ns>.wsserver.<uuid>`` that is no delivery: an operator's order.

    ``{"control":"kick","userId"}`` closes every connection of that user on
    the gateway (``error`` ``kicked``, then close 4004);
    ``{"control":"revoke","userId","notBefore"}`` closes those authenticated
    with a token issued (``iat``) before ``notBefore`` (ms; ``error``
    ``token_revoked``). A reader that knows no control (an imapi's reply
    queue) sees a delivery to nobody: ``conn_ids`` and ``frames`` are empty.
    """

    action: str
    user_id: str
    not_before: int | None = None
    conn_ids: tuple = ()
    frames: tuple = ()

    def to_json(self) -> dict:
        doc = {"control": self.action, "userId": self.user_id}
        if self.not_before is not None:
            doc["notBefore"] = self.not_before
        return doc


def control_body(action: str, user_id: str, not_before: int | None = None) -> bytes:
    """A batch of one :class:`Control` item (``kick``, or ``revoke`` with ``not_before`` ms)."""
    item = Control(action, user_id, not_before).to_json()
    return json.dumps({"v": VERSION, "items": [item]}, separators=(",", ":")).encode("utf-8")


def _parse_control(raw: dict) -> Control | None:
    action, user = raw.get("control"), raw.get("userId")
    if action not in (KICK, REVOKE) or not protocol.is_user_id(user):
        return None
    not_before = raw.get("notBefore")
    if action == REVOKE and (not isinstance(not_before, int) or isinstance(not_before, bool)):
        return None
    return Control(action, user, not_before if action == REVOKE else None)


def parse_delivery(raw: Any) -> Delivery | Control | None:
    """A :class:`Delivery` from one element of ``items``; None when malformed.

    ``connIds`` must be a list and ``frames`` a list of objects; ids that
    are not strings are left out (they name no connection).
    """
    if not isinstance(raw, dict):
        return None
    if "control" in raw:
        return _parse_control(raw)
    conn_ids, frames = raw.get("connIds"), raw.get("frames")
    if not isinstance(conn_ids, list) or not isinstance(frames, list) \
            or not all(isinstance(f, dict) for f in frames):
        return None
    return Delivery([c for c in conn_ids if isinstance(c, str)], frames)


def parse_deliveries(body: bytes) -> list[Delivery]:
    """The deliveries of a processors -> gateway batch; :class:`MalformedBatch` when it is not one.

    A malformed delivery is logged and left out; the others still go.
    """
    deliveries = []
    for n, raw in enumerate(_batch_items(body)):
        delivery = parse_delivery(raw)
        if delivery is None:
            log.warn("malformed delivery item {n}: {item!r:.200}; skipped", n=n, item=raw)
            continue
        deliveries.append(delivery)
    return deliveries


# --- coalesced publishes to the processors --------------------------------------------


class Publisher:
    """Coalesces :class:`Item`\\ s into ``{"v":1,"items":[...]}`` publishes to ``<ns>.server``.

    A batch goes out at the end of the reactor turn (``callLater(0)``), or
    at once when ``max_items`` are pending; each item's Deferred fires or
    fails with its batch's publish (the bus fails a publish within
    ``publish_timeout``). Each item is serialised when submitted, so a batch
    costs one join, and one bad item fails alone. Gateways and imapis use it.
    """

    log = Logger()

    def __init__(self, bus: Any, routing_key: str, clock: Any, max_items: int,
                 max_bytes: int | None = None) -> None:
        self.bus = bus
        self.routing_key = routing_key
        self.clock = clock
        self.max_items = max_items
        #: a batch's body stays within this (the bus' ``max_publish_bytes``)
        if max_bytes is None:
            max_bytes = getattr(bus, "max_publish_bytes", None)
        self.max_bytes = max_bytes if isinstance(max_bytes, int) else 8 << 20
        self._bytes = 0
        self._items: list[bytes] = []
        self._waiters: list[defer.Deferred] = []
        self._call: Any = None
        self._in_flight: set[defer.Deferred] = set()

    def submit(self, item: Item) -> defer.Deferred:
        """Publish ``item`` in the current batch; fires None on the broker's confirm."""
        try:
            encoded = item.encode()
        except (TypeError, ValueError) as e:
            return defer.fail(e)
        d = defer.Deferred()
        size = len(encoded) + 1
        if self._items and self._bytes + size + BODY_OVERHEAD > self.max_bytes:
            self.flush()  # no AMQP message above max_publish_bytes (ARCHITECTURE.md)
        self._items.append(encoded)
        self._bytes += size
        self._waiters.append(d)
        if len(self._items) >= self.max_items:
            self.flush()
        elif self._call is None:
            self._call = self.clock.callLater(0, self.flush)
        return d

    @property
    def pending(self) -> int:
        """Items waiting for the end of the turn."""
        return len(self._items)

    def flush(self) -> None:
        """Publish what is pending now as one message."""
        if self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None
        if not self._items:
            return
        items, self._items = self._items, []
        waiters, self._waiters = self._waiters, []
        self._bytes = 0
        body = items_body(items)
        metrics.PUBLISH_BATCH.observe(len(items))
        d = defer.maybeDeferred(self.bus.publish, self.routing_key, body, mandatory=False, persistent=True)
        self._in_flight.add(d)

        def done(result: Any) -> None:
            self._in_flight.discard(d)
            if isinstance(result, Failure):
                self.log.warn("publish of {n} items failed: {err}", n=len(waiters),
                              err=result.getErrorMessage())
            for w in waiters:
                if isinstance(result, Failure):
                    w.errback(result)
                else:
                    w.callback(None)

        d.addBoth(done)

    def drain(self) -> defer.Deferred:
        """Flush, then fire when every publish so far is confirmed or failed."""
        self.flush()
        return defer.DeferredList(list(self._in_flight), consumeErrors=True)


# --- events for business servers (HTTP-API.md "Calls the cluster makes to business servers") --

#: the event names (webhook_events)
MESSAGE_STORED = "message.stored"
SESSION_MEMBERS = "session.members"
USER_ONLINE = "user.online"
USER_OFFLINE = "user.offline"

#: the header of every call to a business server: ``sha256=<hex HMAC-SHA256 of the raw body>``
SIGNATURE_HEADER = "X-Imcluster-Signature"
#: the header naming the event (``moderation`` for a moderation call)
EVENT_HEADER = "X-Imcluster-Event"

#: characters of a message's ``text`` a push request previews
PREVIEW_CHARS = 100


def sign(secret: str | bytes, body: bytes) -> str:
    """The ``X-Imcluster-Signature`` value of ``body``: ``sha256=<hex HMAC-SHA256 with secret>``."""
    import hashlib
    import hmac

    key = secret.encode() if isinstance(secret, str) else secret
    return "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()


def new_event_id() -> str:
    """A unique ``eventId`` (uuid4 hex): a receiver de-duplicates on it (delivery is at least once)."""
    import uuid

    return uuid.uuid4().hex


def event(name: str, key: str, data: dict, event_id: str | None = None) -> dict:
    """One entry of a ``<ns>.webhooks`` body: ``{"event","eventId","key","data"}``.

    ``key`` orders delivery: events of one key reach the business server in
    the order published (a session id, or ``user:<userId>`` for presence).
    """
    return {"event": name, "eventId": event_id or new_event_id(), "key": key, "data": data}


def message_stored_event(stored: Any) -> dict:
    """``message.stored`` of a :class:`~imcluster.store.Stored`: the history entry, with ``sessionId``.

    A ``recall`` or ``edit`` entry (PROTOCOL.md 1.1) carries ``kind`` and ``ref`` as in history.
    """
    data = {"sessionId": stored.session_id, "msgId": stored.msg_id, "seq": stored.seq, "from": stored.sender,
            "clientMsgId": stored.client_msg_id, "body": stored.body, "ts": stored.ts_ms}
    kind = getattr(stored, "kind", "message")
    if kind != "message":
        data["kind"] = kind
        ref = getattr(stored, "ref", None)
        if ref is not None:
            data["ref"] = str(ref)
    return event(MESSAGE_STORED, stored.session_id, data)


def session_members_event(session_id: str, added: Sequence[str], removed: Sequence[str]) -> dict:
    """``session.members``: ``{"sessionId","added","removed"}`` (creation: every member added)."""
    return event(SESSION_MEMBERS, session_id, {"sessionId": session_id, "added": list(added),
                                               "removed": list(removed)})


def presence_event(name: str, user_id: str, ts: int) -> dict:
    """``user.online`` / ``user.offline``: ``{"userId","ts"}``, ordered per user."""
    return event(name, f"user:{user_id}", {"userId": user_id, "ts": ts})


def _json_array(entries: Sequence[dict], budget: int) -> list[bytes]:
    """``entries`` as JSON arrays of at most ``budget`` bytes each (one entry alone may exceed it)."""
    out: list[bytes] = []
    parts: list[bytes] = []
    size = 2
    for e in entries:
        b = json.dumps(e, separators=(",", ":"), ensure_ascii=False).encode()
        if parts and size + len(b) + 1 > budget:
            out.append(b"[" + b",".join(parts) + b"]")
            parts, size = [], 2
        parts.append(b)
        size += len(b) + 1
    if parts:
        out.append(b"[" + b",".join(parts) + b"]")
    return out


def events_bodies(events: Sequence[dict], budget: int = 8 * 1024 * 1024) -> list[bytes]:
    """The ``<ns>.webhooks`` bodies of ``events`` (JSON arrays, each within ``budget`` bytes)."""
    return _json_array(events, budget)


def parse_events(body: bytes) -> list[dict]:
    """The events of a ``<ns>.webhooks`` body; :class:`MalformedBatch` if it is not a list of events."""
    try:
        raw = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise MalformedBatch(f"not JSON: {e}") from None
    if not isinstance(raw, list):
        raise MalformedBatch("not a JSON array of events")
    for e in raw:
        if not (isinstance(e, dict) and isinstance(e.get("event"), str) and isinstance(e.get("eventId"), str)
                and isinstance(e.get("key"), str) and isinstance(e.get("data"), dict)):
            raise MalformedBatch(f"not an event: {str(e)[:200]}")
    return raw


def preview(body: Any) -> str | None:
    """What a push notification shows: the body's ``text`` cut to :data:`PREVIEW_CHARS` (None without one)."""
    text = body.get("text") if isinstance(body, dict) else None
    return text[:PREVIEW_CHARS] if isinstance(text, str) else None


def push_request(stored: Any, user_id: str) -> dict:
    """One entry of a ``<ns>.push`` body: ``{"eventId","userId","sessionId","msgId","from","seq","preview"?}``.

    ``twistd impush`` adds the user's devices and skips users without any.
    """
    req = {"eventId": new_event_id(), "userId": user_id, "sessionId": stored.session_id,
           "msgId": stored.msg_id, "from": stored.sender, "seq": stored.seq}
    text = preview(stored.body)
    if text is not None:
        req["preview"] = text
    return req


def push_bodies(requests: Sequence[dict], budget: int = 8 * 1024 * 1024) -> list[bytes]:
    """The ``<ns>.push`` bodies of ``requests`` (JSON arrays, each within ``budget`` bytes)."""
    return _json_array(requests, budget)
# --- processors -> impush: offline push requests ----------------------------------------

#: the fields of one push request as the processors publish it to ``<ns>.push``
PUSH_FIELDS = ("eventId", "userId", "sessionId", "msgId", "from", "seq", "preview")


def push_body(requests: Sequence[dict]) -> bytes:
    """One AMQP message to ``<ns>.push``: a JSON array of ``{"eventId","userId","sessionId","msgId","from","seq","preview"}``.

    ``preview`` is absent when the body has no ``text`` (HTTP-API.md). Any
    number of requests (one per recipient without a live connection) share
    one message: impush looks their devices up in one statement.
    """
    return _json_array(list(requests), 1 << 62)[0] if requests else b"[]"


def parse_push_body(body: bytes) -> tuple[list[dict], int]:
    """The usable push requests of a ``<ns>.push`` message, and how many were not usable.

    :class:`MalformedBatch` when the body is not a JSON array at all.
    A request needs a string ``eventId`` and a valid ``userId``; the other
    fields travel as they came.
    """
    try:
        doc = json.loads(body)
    except (TypeError, ValueError, RecursionError) as e:
        raise MalformedBatch(f"not JSON: {e}") from None
    if not isinstance(doc, list):
        raise MalformedBatch("not a JSON array of push requests")
    good, bad = [], 0
    for raw in doc:
        if (isinstance(raw, dict) and isinstance(raw.get("eventId"), str) and raw["eventId"]
                and protocol.is_user_id(raw.get("userId"))):
            good.append({k: raw[k] for k in PUSH_FIELDS if k in raw})
        else:
            bad += 1
    return good, bad


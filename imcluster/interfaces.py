"""The roles of imcluster, as ``zope.interface`` interfaces.

Each interface has a real implementation (``bus``, ``registry``,
``store.postgres``, ``auth``, ``processor.filters``) and a fake in
:mod:`imcluster.testing`; the contract tests in ``tests/`` run the same suite
against both.

Each role also says "my backing service is down" with its own error, all
subclasses of :class:`Unavailable`: ``imcluster.store.StoreUnavailable``,
``imcluster.registry.RegistryUnavailable``, the bus' ``PublishError`` and
``ChannelError``. A caller that retries on outages tests that one base
class (plus timeouts) and never imports a driver.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class Unavailable(Exception):
    """A role could not do the work now (its server down, slow or unreachable): retry later.

    Never a verdict on the input: the same work may succeed once the
    dependency is back.
    """


class IMessageBus(Interface):
    """RabbitMQ, as imcluster uses it: one topic exchange per namespace.

    Names (ARCHITECTURE.md): exchange ``<ns>.exchange`` (topic, durable);
    processors share the durable queue ``<ns>.processor`` bound to
    ``<ns>.server``; each gateway consumes its own exclusive, auto-delete
    queue ``<ns>.gateway.<uuid>`` bound to ``<ns>.wsserver.<uuid>``.
    The topology and every consumer are declared again after each reconnect.
    """

    namespace = Attribute("the namespace <ns>")
    connected = Attribute("True while a channel to the broker is open")
    max_publish_bytes = Attribute("largest body ``publish`` sends (``TooLarge`` above it)")

    def publish(routing_key, body, mandatory=False, persistent=True):
        """Publish ``body`` (bytes) to ``<ns>.exchange`` with publisher confirms.

        Returns a Deferred that fires (with None) when the broker confirms,
        or fails with :class:`imcluster.bus.PublishError` (``Unavailable`` when
        no confirm arrived within ``publish_timeout`` seconds, including while
        disconnected; ``Nacked``; ``Unroutable`` for a ``mandatory`` publish
        that no queue took). Never hangs, never drops silently. A body above
        ``max_publish_bytes`` fails at once with ``TooLarge``, and a message
        the broker refuses for good (406) with ``Refused``: those are not
        transient (``interfaces.Unavailable``), retrying cannot cure them.
        """

    def dead_letter(body, reason):
        """Publish ``body`` to ``<ns>.dead`` with the header ``x-imcluster-reason`` (confirmed)."""

    def consume(queue, callback, prefetch=100, exclusive=False):
        """Declare ``queue`` (see ``queue_spec``) and consume it, now and after every reconnect.

        ``queue`` is one of ``processor_queue()`` or ``gateway_queue(uuid)``.
        ``callback(message)`` receives an :class:`IBusMessage`; the consumer
        must ``ack`` or ``nack`` every message (manual acks, ``prefetch``
        window). Returns a Deferred that fires once the consumer is active,
        with the consumer: its ``add_restart_listener(fn)`` calls
        ``fn(down_since)`` each time it is active again after a reconnect
        (the queue declared again; an exclusive queue may have lost what was
        routed meanwhile, since about ``down_since``, in clock seconds).
        """

    def declare_queue(queue):
        """Declare ``queue`` (a ``QueueSpec``) now if connected and again on every reconnect (queues published to)."""

    def processor_queue():
        """The spec (name, routing key, durable) of ``<ns>.processor``."""

    def gateway_queue(uuid):
        """The spec of the gateway queue ``<ns>.gateway.<uuid>``."""

    def server_key():
        """Routing key of client frames for the processors: ``<ns>.server``."""

    def gateway_key(uuid):
        """Routing key of deliveries to one gateway: ``<ns>.wsserver.<uuid>``."""


class IBusMessage(Interface):
    body = Attribute("the message body, bytes")
    redelivered = Attribute("True when the broker delivered it before")
    headers = Attribute("dict of AMQP headers (may be empty)")

    def ack():
        """Acknowledge: the broker forgets the message."""

    def nack(requeue=True):
        """Reject: requeued, or dead-lettered to ``<ns>.dead`` when ``requeue`` is False."""


class IRegistry(Interface):
    """Redis, with the key layout of ARCHITECTURE.md (after ``redis_prefix``, with hash tags).

    ``WSSERVER_{<uuid>}`` (string with TTL), ``WSSERVERS`` (set),
    ``UCIR##{<userId>}`` (hash: ``<uuid>##<ip>##<port>`` -> JSON),
    ``WSCONNS##{<uuid>}`` (set of ``<userId>##<ip>##<port>``); names from
    :class:`imcluster.registry.RedisKeys`. Redis may be several shards: "one
    round trip" below means one per shard, all sent at once.
    Every method returns a Deferred and fails within ``redis_timeout``.
    No method uses KEYS or SCAN.
    """

    def register_server(uuid, info, ttl):
        """SET ``WSSERVER_<uuid>`` = JSON ``info`` with TTL and SADD ``WSSERVERS`` (one round trip)."""

    def refresh_server(uuid, info, ttl):
        """Refresh the TTL; fires True when the key still existed, False when it had to be re-created."""

    def unregister_server(uuid):
        """Remove every entry of this gateway: its UCIR fields, WSCONNS, WSSERVER_ key, WSSERVERS member."""

    def add_connections(uuid, entries):
        """Write many connections at once (pipelined).

        ``entries``: iterable of ``(user_id, ip, port, meta_dict)``.
        """

    def remove_connections(uuid, entries):
        """Remove many connections (``(user_id, ip, port)``), pipelined."""

    def connections_of(user_ids):
        """One pipelined round trip: ``{user_id: {conn_field: meta_dict}}``.

        ``conn_field`` is ``<uuid>##<ip>##<port>``; users without connections
        map to ``{}``.
        """

    def servers():
        """Members of ``WSSERVERS``."""

    def alive(uuids):
        """The subset of ``uuids`` whose ``WSSERVER_<uuid>`` exists (one round trip)."""

    def routes(user_ids, uuids=()):
        """``connections_of(user_ids)`` and which gateways are alive, in ONE round trip.

        Fires with ``({user_id: {conn_field: meta_dict}}, {alive uuid, ...})``.
        The gateways checked are those of the connections found (the
        ``<uuid>`` of each ``<uuid>##<ip>##<port>`` field) and ``uuids``. This
        is the lookup the processor's Router makes once per window.
        """

    def reap_server(uuid):
        """Only while ``WSSERVER_<uuid>`` is gone, remove its entries (chunk by chunk, each checked).

        Fires True when this call reaped it. Safe with several reapers.
        """


class IAuthenticator(Interface):
    def authenticate(token):
        """Verify a JWT and return :class:`imcluster.auth.Identity`.

        Raises :class:`imcluster.auth.AuthError` with ``code``
        ``invalid_token`` or ``token_expired``. Synchronous.
        """


class IMessageFilter(Interface):
    """A moderation step (the seed's 鉴黄鉴证), run by processors in order."""

    name = Attribute("short name used in configuration and logs")

    def check(message):
        """Inspect ``message`` (dict with ``from``, ``sessionId``, ``body``).

        Returns a :class:`imcluster.processor.filters.Verdict` or a
        Deferred firing with one: accept, reject (with a reason), or replace
        the body.
        """


class IMessageStore(Interface):
    """PostgreSQL, as the processors and the HTTP API use it (``imcluster.store.postgres``).

    Every method returns a Deferred; deterministic refusals fail with
    :class:`imcluster.store.StoreError` (``code``), an unavailable
    PostgreSQL with :class:`imcluster.store.StoreUnavailable` (never a
    driver's error). Full contract:
    the module docstring of ``imcluster.store.postgres`` and the notes of
    PROCESSOR.md.
    """

    def begin_window(batch):
        """Begin storing ``[Incoming]`` in one transaction: fires with an :class:`IWindowTransaction`.

        Fires once the batch's sessions are locked, with the recipients of
        the new messages known: a window begun after this one may begin its
        own transaction from then on and still take seq numbers after this
        one's. Nothing is written until the caller's ``commit(online)``; the
        caller must ``commit`` or ``abort`` (the locks are held until then).
        The store never calls back into its caller or any other role.
        """

    def store_messages(batch):
        """``begin_window(batch)`` then ``commit(())``: ``[Stored | Rejected]`` in batch order."""

    def stored_keys(keys):
        """The ``(sender, clientMsgId)`` keys of ``keys`` stored already, as a set (de-duplication before moderation)."""

    def mark_sending(pairs):
        """``pending`` -> ``sending`` for ``(user_id, msg_id)`` pairs; fires with the count."""

    def mark_delivered(acks):
        """``[(user_id, [msg_id, ...])]`` -> ``delivered`` (others' or unknown ids ignored); count."""

    def undelivered_page(user_id, after, limit):
        """A page of undelivered message dicts by (sessionId in byte order, seq), after ``after``."""

    def undelivered_first_pages(user_ids, limit):
        """``{user_id: undelivered_page(user_id, None, limit)}`` for every distinct id, in one statement."""

    def recent_messages(user_id, since_ms, per_session, limit):
        """Message dicts of the user's sessions stored since ``since_ms`` (delivered or not, own too)."""

    def stale_undelivered(after, age, horizon, limit):
        """Rows left undelivered ``age`` s, after the cursor ``after``: message dicts with ``userId``, ``cursor``."""

    def history(user_id, session_id, before_seq=None, limit=None):
        """Message dicts in ascending seq; ``no_session`` / ``not_member``."""

    def read(user_id, session_id, seq):
        """Move the read cursor (never back, clamped): ``(cursor, members)``."""

    def create_session(creator, members, session_id=None, kind="group"):
        """``(session_id, members sorted)``; ``bad_request`` / ``too_large`` / ``conflict``."""

    def add_remove_members(session_id, add=(), remove=()):
        """Members after the change, sorted; the owner check is the caller's."""

    def session_members(session_ids):
        """``{session_id: [user_id, ...]}`` for those that exist."""

    def get_session(session_id):
        """``{"sessionId","kind","members","owners","lastSeq"}``; ``no_session``."""

    def user_sessions(user_id):
        """``[{"sessionId","kind","lastSeq","unread"}]`` sorted by sessionId (events never unread)."""

    def store_event(event):
        """A recall, edit or members :class:`imcluster.store.Event` as the session's next entry.

        ``(Stored | None, members after)``; ``no_message`` / ``not_allowed`` / ``no_session`` /
        ``bad_request`` / ``too_large``.
        """

    def create_session_with_event(creator, members, session_id=None, client_msg_id=None, ts_ms=None):
        """``create_session`` of a group with its ``members`` event as seq 1: ``(session_id, members, Stored|None)``."""

    def mark_delivered_receipts(acks):
        """``mark_delivered``: ``(count, [{"sessionId","userId","msgIds"}])`` of the 1:1 rows it delivered."""

    def read_cursors(session_id):
        """``[{"userId","seq"}]`` of every member; ``no_session``."""


class IWindowTransaction(Interface):
    """A window's store transaction between its locks and its commit (``IMessageStore.begin_window``).

    Should the transaction have to run again (a lost race on a clientMsgId,
    a deadlock, a lost connection), the store does that on its own, with
    the ``online`` users already given; the caller never sees it.
    """

    recipients = Attribute("users the new messages are written to, sorted (empty: nothing new)")
    decided = Attribute("per message of the batch: its Rejected or duplicate's Stored when known at "
                        "begin_window, else None (a new message)")

    def commit(online=()):
        """Write and commit: fires with ``[Stored | Rejected]`` in batch order.

        ``online``: the recipients the caller found connected; their
        ``messagesend`` rows are inserted ``sending`` (which spares a
        ``mark_sending``), the others ``pending``.
        """

    def abort():
        """Roll back (no-op once committed or failed); fires when the transaction is over."""


class IClientConnection(Interface):
    """One client connection on a gateway, whatever the transport."""

    transport_name = Attribute("'ws', 'tcp' or 'stream': the ITransportAdapter's name")
    peer_key = Attribute("'<ip>##<port>' of the client")
    user_id = Attribute("the authenticated user id, or None")

    def send_frame(frame):
        """Queue one frame (a dict) for the client."""

    def close(code, reason):
        """Close the connection (WebSocket close code; TCP sends an error frame first)."""


class ITransportAdapter(Interface):
    """A transport of the gateway: what the connection engine needs from it.

    The engine (:class:`imcluster.gateway.engine.ClientConnection`) runs
    PROTOCOL.md for one client and knows nothing of sockets; an adapter
    (``GatewayWebSocketProtocol``, ``RawSocketProtocol``) turns its
    transport's bytes into complete frames and carries out what the engine
    asks for. The engine never asks which transport it runs on: whatever
    differs between transports is behind these methods. Shared helpers
    (close reasons, peer address, buffered output) live in
    :mod:`imcluster.gateway.transport`.

    What an adapter does for its engine, in order:

    1. take one of the hub's ``max_connections`` slots as soon as its
       transport connects (``hub.socket_opened()``, before reading a byte,
       so handshakes count too); False: abort the transport at once and
       never create an engine. Give the slot back (``hub.socket_closed()``)
       exactly once, when the transport is gone;
    2. set ``client_address``, then create ``ClientConnection(hub, adapter)``
       and call its ``open()``; False means the hub refused the connection:
       the adapter says so in its transport's terms (WebSocket handshake 503;
       TCP ``error`` ``unavailable`` then close) and never calls the engine
       again;
    3. register the engine (an ``IPushProducer``) on its transport, or call
       its ``pauseProducing()`` / ``resumeProducing()`` itself: pause when
       the output it holds for the client passes its buffer size, resume
       when that output has drained. This drives the slow-consumer rule;
    4. feed it: ``frame_received(data)`` for every complete text frame (JSON
       as bytes, any size: the engine checks ``max_frame_size``),
       ``frame_too_large()`` as soon as a frame is known to be over the
       limit (before buffering it), ``binary_received(size)`` for a message
       the transport marks as binary, ``activity()`` for client traffic that
       is not a frame (a WebSocket ping or pong), and ``output_written(size)``
       for bytes it writes to the client on its own, not through
       ``write_message`` (a WebSocket pong): they are pending output too;
    5. call ``connection_lost()`` once the transport is gone, whatever the
       reason (the engine ignores repeats).

    The third transport (the HTTP streaming transport of PROTOCOL.md:
    ``POST /stream``, ``GET /stream/<id>`` as Server-Sent Events or long
    polling, ``POST /stream/<id>`` for frames up;
    :mod:`imcluster.gateway.stream`) provides this same interface, and the
    engine, the hub and the rules stay as they are. What it provides:

    * one adapter object per logical connection (per stream id), not per
      HTTP request: it outlives the requests that carry it, and calls
      ``connection_lost()`` only when the connection ends (closed, or no
      stream open for ``stream_resume``), exactly like a closed socket;
    * one ``max_connections`` slot per logical connection, taken when
      ``POST /stream`` opens it and given back when it ends, not one per
      HTTP request;
    * ``client_address``: the ip of the ``POST /stream`` request that opened
      it (``forwarded_ip`` behind a trusted proxy). ``(ip, port)`` names the
      connection in ``connId`` and in Redis, and the hub refuses a second
      live connection with the same pair; the opening request's socket
      closes long before the streaming connection does, and the client (or
      anyone behind the same NAT) reuses its port meanwhile, so the adapter
      names the connection with a number of its own above 65535 instead of
      that port (``imcluster.gateway.stream.FIRST_PORT``): no real socket can
      collide with it. A refusal by the hub is answered 503;
    * ``write_message`` queues the frame with its event id in a resume buffer
      (for ``Last-Event-ID`` and ``?after=n``) and writes it to the open
      event stream, if any; ``buffered_bytes`` counts the frames held and
      not yet taken by the client, and the adapter pauses the engine while
      no stream is open or the held output passes its buffer size, so a
      client that stops fetching is closed as a slow consumer;
    * ``close_for`` renders a reason as a transport without close codes
      does: :func:`imcluster.gateway.transport.write_farewell` (the
      ``error`` frame goes out as the last event), then end the stream and
      answer 404 to that id from then on;
    * each frame of a ``POST /stream/<id>`` body to ``frame_received`` in
      order (a body over ``max_frame_size`` is ``frame_too_large()``; the
      HTTP answer is 413), and ``activity()`` for a poll or a stream (re)open.
    """

    transport_name = Attribute(
        "short name of the transport ('ws', 'tcp', 'stream'): "
        "the connection's transport_name and the 'transport' label of the metrics")
    client_address = Attribute(
        "(ip, port) of the client as the gateway records it (a trusted proxy's forwarded "
        "address included); set before the engine is created")
    conn = Attribute("the engine (ClientConnection) this adapter feeds; None until the hub accepted it")

    def write_message(data):
        """Send one frame: ``data`` is its JSON as UTF-8 bytes, already encoded.

        Framed the transport's way (a WebSocket text message, a
        length-prefixed TCP frame, an SSE event). Nothing is sent once
        the adapter is closing. Any size: ``max_frame_size`` bounds what
        clients send, not what they receive.
        """

    def buffered_bytes():
        """The output held for the client and not yet taken, in bytes; None when the transport cannot tell.

        Read by the engine's slow-consumer rule while it is paused (None:
        the engine counts the bytes written since the pause instead).
        """

    def close_for(reason):
        """Close the connection for ``reason`` (:class:`imcluster.gateway.transport.CloseReason`).

        Rendered the transport's way: a WebSocket close handshake with
        ``reason.code``; on a transport without close codes,
        ``write_farewell(self, reason)`` (the ``error`` frame, when the
        reason has one) and then close. The engine calls it at most once and
        writes nothing after it; the adapter ends the connection even when
        the client does not cooperate (aborting it after ``close_timeout``)
        and then calls the engine's ``connection_lost()``.
        """

"""The roles of imcluster, as ``zope.interface`` interfaces.

Each interface has a real implementation (``bus``, ``registry``, ``db`` /
``processor.store``, ``auth``, ``processor.filters``) and a fake in
:mod:`imcluster.testing`; the contract tests in ``tests/`` run the same suite
against both.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


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

    def publish(routing_key, body, mandatory=False, persistent=True):
        """Publish ``body`` (bytes) to ``<ns>.exchange`` with publisher confirms.

        Returns a Deferred that fires (with None) when the broker confirms,
        or fails with :class:`imcluster.bus.PublishError` (``Unavailable`` when
        no confirm arrived within ``publish_timeout`` seconds, including while
        disconnected; ``Nacked``; ``Unroutable`` for a ``mandatory`` publish
        that no queue took). Never hangs, never drops silently.
        """

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
    """Redis, with the exact key layout of ARCHITECTURE.md (after ``redis_prefix``).

    ``WSSERVER_<uuid>`` (string with TTL), ``WSSERVERS`` (set),
    ``UCIR##<userId>`` (hash: ``<uuid>##<ip>##<port>`` -> JSON),
    ``WSCONNS##<uuid>`` (set of ``<userId>##<ip>##<port>``).
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

    def reap_server(uuid):
        """Atomically, only if ``WSSERVER_<uuid>`` is gone, remove its entries.

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
    """PostgreSQL, as the processors and the HTTP API use it (``imcluster.processor.store``).

    Every method returns a Deferred; deterministic refusals fail with
    :class:`imcluster.processor.store.StoreError` (``code``). Full contract:
    the module docstring of ``imcluster.processor.store`` and the notes of
    PROCESSOR.md.
    """

    def store_messages(batch, locate=None, locked=None):
        """Store ``[Incoming]`` in one transaction: ``[Stored | Rejected]`` in batch order.

        ``locate(recipients)`` (optional) returns the online ones; a store that
        calls it inserts their ``messagesend`` rows ``sending`` at once.
        ``locked()`` (optional) is called as soon as the batch's sessions
        are locked (again if the batch runs again): a window started after
        this one may then begin its own transaction and still take seq
        numbers after this one's. A store that never calls it only makes the
        next window wait for this one's end."""

    def mark_sending(pairs):
        """``pending`` -> ``sending`` for ``(user_id, msg_id)`` pairs; fires with the count."""

    def mark_delivered(acks):
        """``[(user_id, [msg_id, ...])]`` -> ``delivered`` (others' or unknown ids ignored); count."""

    def undelivered_page(user_id, after, limit):
        """A page of undelivered message dicts by (sessionId in byte order, seq), after ``after``."""

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
        """``[{"sessionId","kind","lastSeq","unread"}]`` sorted by sessionId."""


class IClientConnection(Interface):
    """One client connection on a gateway, whatever the transport."""

    transport_name = Attribute("'ws' or 'tcp'")
    peer_key = Attribute("'<ip>##<port>' of the client")
    user_id = Attribute("the authenticated user id, or None")

    def send_frame(frame):
        """Queue one frame (a dict) for the client."""

    def close(code, reason):
        """Close the connection (WebSocket close code; TCP sends an error frame first)."""

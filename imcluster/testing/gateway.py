"""FakeHub and FakeConnection: the gateway engine's two sides without sockets."""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.task import Clock
from zope.interface import implementer

from imcluster.interfaces import IClientConnection as _IClientConnection
from imcluster.protocol import TCP_CLOSE_ERRORS, error_frame
from imcluster.testing.auth import FakeAuthenticator


def gateway_config(**changes):
    """A gateway Config with defaults, a test JWT secret and ``changes`` applied.

    The ``--stream`` listener is on a free loopback port unless ``stream`` is
    given (its default, ``tcp:8082``, would clash between tests).
    """
    from imcluster.config import GATEWAY, load_config
    changes.setdefault("stream", ["tcp:0:interface=127.0.0.1"])
    config = load_config(GATEWAY, {"jwt_secret": "test-secret"}, environ={})
    return config.replace(**changes)


class FakeHub:
    """The hub interface of GATEWAY.md, recording what a ClientConnection asks of it.

    The default authenticator is a :class:`FakeAuthenticator` on the hub's
    clock (tokens ``"user:alice"``, ``"user:alice:<exp>"``, ``"expired:alice"``).

    ``refuse``: connection_made answers False. ``sockets``: sockets holding
    a ``max_connections`` slot (``socket_opened`` refuses past
    ``config.max_connections``). ``forward_failure`` /
    ``auth_failure`` / ``sync_failure``: an exception the corresponding call
    fails with (None: succeeds). ``hold_auth``: hub.authenticated returns a
    Deferred kept in ``held`` for the test to fire.

    ``made`` / ``lost`` / ``auths`` / ``syncs`` / ``forwarded`` record every
    call; :meth:`user_of` is what the hub holds now, as the real hub's: the
    user of an accepted connection whose auth was recorded, until it is lost.
    ``tests/test_contract_gateway.py`` runs it and the real hub through one suite.
    """

    def __init__(self, config=None, clock=None, authenticator=None, server_id="gw-0000"):
        self.server_id = server_id
        self.clock = clock if clock is not None else Clock()
        self.config = config if config is not None else gateway_config()
        self.authenticator = (authenticator if authenticator is not None
                              else FakeAuthenticator(clock=self.clock))
        self.accepting = True
        self.refuse = False
        self.made = []
        self.lost = []
        self.auths = []
        self.syncs = []
        self.forwarded = []
        self.forward_failure = None
        self.auth_failure = None
        self.sync_failure = None
        self.hold_auth = False
        self.held = []
        self._users = {}
        self.sockets = 0

    def user_of(self, conn):
        """The user ``conn`` is recorded for (None: unauthenticated, refused, failed or lost)."""
        return self._users.get(conn)

    def socket_opened(self):
        if self.sockets >= self.config.max_connections:
            return False
        self.sockets += 1
        return True

    def socket_closed(self):
        self.sockets -= 1

    def connection_made(self, conn):
        if self.refuse or not self.accepting:
            return False
        self.made.append(conn)
        return True

    def authenticated(self, conn, identity, refresh):
        self.auths.append((conn, identity, refresh))

        def recorded(result):
            if conn in self.made and conn not in self.lost:
                self._users[conn] = identity.user_id
            return result

        if self.hold_auth:
            d = defer.Deferred()
            self.held.append(d)
            return d.addCallback(recorded)
        if self.auth_failure is not None:
            return defer.fail(self.auth_failure)
        return defer.succeed(None).addCallback(recorded)

    def request_sync(self, conn):
        self.syncs.append(conn)
        if self.sync_failure is not None:
            return defer.fail(self.sync_failure)
        return defer.succeed(None)

    def forward(self, conn, frame):
        self.forwarded.append((conn, frame))
        if self.forward_failure is not None:
            return defer.fail(self.forward_failure)
        return defer.succeed(None)

    def connection_lost(self, conn):
        self.lost.append(conn)
        self._users.pop(conn, None)


@implementer(_IClientConnection)
class FakeConnection:
    """An IClientConnection that records what the hub sends it (for hub unit tests).

    ``sent`` is what the client would read (a TCP client's ``error`` frame
    before a close included), ``closed`` the ``(code, reason)`` of the close.
    ``tests/test_contract_gateway.py`` runs it and the real engine through one suite.
    """

    def __init__(self, user_id=None, ip="10.0.0.1", port=40000, server_id="gw-0000",
                 transport_name="ws", device=None, identity=None, clock=None):
        self.transport_name = transport_name
        self.ip = ip
        self.port = port
        self.peer_key = f"{ip}##{port}"
        self.conn_id = f"{server_id}##{self.peer_key}"
        self.user_id = user_id
        self.device = device
        self.identity = identity
        self.connected_at = clock.seconds() if clock is not None else 0.0
        self.sent = []
        self.closed = None
        self.went_away = False

    def send_frame(self, frame):
        if self.closed is None:
            self.sent.append(frame)

    def send_encoded(self, data):
        import json
        if self.closed is None:
            self.sent.append(json.loads(data))

    def close(self, code, reason):
        """Record the close; a TCP client first gets the ``error`` frame for ``code``, as from the engine."""
        if self.closed is None:
            tcp_error = TCP_CLOSE_ERRORS.get(code)
            if self.transport_name == "tcp" and tcp_error is not None:
                self.sent.append(error_frame(tcp_error, reason))
            self.closed = (code, reason)

    def going_away(self):
        self.went_away = True
        self.close(1001, "server going away")


# wire helpers: what a client puts on (and reads from) the wire

"""The gateway's connection maps (ARCHITECTURE.md flows 2, 3 and 7).

One :class:`ConnectionRegistry` belongs to one ``GatewayService``; there are
no module globals, so two gateways can live in one process (tests do).

* unauthenticated: ``<ip>##<port>`` -> connection (flow 2);
* authenticated: ``userId`` -> ``{<ip>##<port>: connection}`` (flow 3);
* by ``connId`` (``<serverId>##<ip>##<port>``), for deliveries.

Every add, move, remove and lookup is O(1). The registry also keeps the
``imcluster_connections`` gauge (labels ``transport``, ``authenticated``)
right: it moves with every change.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterator

from twisted.logger import Logger

from imcluster import metrics


def _label(authenticated: bool) -> str:
    return "true" if authenticated else "false"


class ConnectionRegistry:
    """Where a gateway finds its live connections.

    The registry records each connection's user id itself (``user_of``), so
    it never depends on when the connection object sets ``conn.user_id``.
    """

    log = Logger()

    def __init__(self) -> None:
        self._unauthed: dict[str, Any] = {}
        self._authed: dict[str, dict[str, Any]] = {}
        self._by_id: dict[str, Any] = {}
        # conn_id -> user id, and the meta written to Redis (authenticated only)
        self._users: dict[str, str] = {}
        self._meta: dict[str, dict] = {}
        self._counts: Counter[tuple[str, bool]] = Counter()

    # --- changes

    def add(self, conn: Any) -> bool:
        """Enter a new connection in the unauthenticated map.

        False (nothing changed) when a live connection already has its
        ``connId``: two sockets cannot share one ``<ip>##<port>`` in Redis,
        so the newcomer is refused rather than silently shadowing the other.
        """
        if conn.conn_id in self._by_id:
            self.log.warn("refusing {conn}: a live connection already has this connId",
                          conn=conn.conn_id)
            return False
        self._unauthed[conn.peer_key] = conn
        self._by_id[conn.conn_id] = conn
        self._count(conn, False, +1)
        return True

    def authenticate(self, conn: Any, user_id: str, meta: dict | None = None) -> str | None:
        """Move ``conn`` to ``user_id``'s authenticated map, remembering ``meta``.

        ``meta`` is what the gateway wrote to ``UCIR##<user>`` (device,
        authedAt, exp): it is written again if Redis loses its data.

        Returns the user id it was authenticated as before (None when it was
        not), so the caller can remove a stale Redis entry. A connection that
        is no longer registered is left out (returns None, nothing changes):
        check :meth:`__contains__` first when that matters.
        """
        cid = conn.conn_id
        if self._by_id.get(cid) is not conn:
            return None
        previous = self._users.get(cid)
        self._meta[cid] = meta if meta is not None else {}
        if previous == user_id:
            return previous
        if previous is None:
            self._unauthed.pop(conn.peer_key, None)
            self._count(conn, False, -1)
            self._count(conn, True, +1)
        else:
            self._drop_authed(previous, conn)
        self._authed.setdefault(user_id, {})[conn.peer_key] = conn
        self._users[cid] = user_id
        return previous

    def deauthenticate(self, conn: Any) -> str | None:
        """Move ``conn`` back to the unauthenticated map (its auth could not be recorded).

        Returns the user id it had, or None.
        """
        cid = conn.conn_id
        if self._by_id.get(cid) is not conn:
            return None
        user_id = self._users.pop(cid, None)
        if user_id is None:
            return None
        self._meta.pop(cid, None)
        self._drop_authed(user_id, conn)
        self._unauthed[conn.peer_key] = conn
        self._count(conn, True, -1)
        self._count(conn, False, +1)
        return user_id

    def remove(self, conn: Any) -> str | None:
        """Forget ``conn``. Returns its user id when it was authenticated, else None.

        Removing a connection twice (or one never added) is harmless.
        """
        cid = conn.conn_id
        if self._by_id.get(cid) is not conn:
            return None
        del self._by_id[cid]
        self._meta.pop(cid, None)
        user_id = self._users.pop(cid, None)
        if user_id is None:
            self._unauthed.pop(conn.peer_key, None)
            self._count(conn, False, -1)
        else:
            self._drop_authed(user_id, conn)
            self._count(conn, True, -1)
        return user_id

    def clear(self) -> None:
        """Forget every connection (the gauge goes back down with them)."""
        for conn in list(self._by_id.values()):
            self.remove(conn)

    def _drop_authed(self, user_id: str, conn: Any) -> None:
        conns = self._authed.get(user_id)
        if conns is None:
            return
        conns.pop(conn.peer_key, None)
        if not conns:
            del self._authed[user_id]

    def _count(self, conn: Any, authenticated: bool, delta: int) -> None:
        transport = conn.transport_name
        self._counts[(transport, authenticated)] += delta
        metrics.CONNECTIONS.labels(transport=transport, authenticated=_label(authenticated)).inc(delta)

    # --- lookups

    def get(self, conn_id: str) -> Any | None:
        """The live connection with this ``connId``, or None."""
        return self._by_id.get(conn_id)

    def unauthenticated(self, peer_key: str) -> Any | None:
        """The unauthenticated connection at ``<ip>##<port>``, or None."""
        return self._unauthed.get(peer_key)

    def of_user(self, user_id: str) -> dict[str, Any]:
        """``{<ip>##<port>: connection}`` of ``user_id`` on this gateway (a copy)."""
        return dict(self._authed.get(user_id, {}))

    def user_of(self, conn: Any) -> str | None:
        """The user id ``conn`` is authenticated as here, or None."""
        if self._by_id.get(conn.conn_id) is not conn:
            return None
        return self._users.get(conn.conn_id)

    def meta_of(self, conn: Any) -> dict | None:
        """The meta recorded when ``conn`` authenticated, or None."""
        if self._by_id.get(conn.conn_id) is not conn:
            return None
        return self._meta.get(conn.conn_id)

    def users(self) -> list[str]:
        """User ids with at least one connection here."""
        return list(self._authed)

    def authenticated(self) -> Iterator[tuple[str, Any]]:
        """``(user_id, connection)`` for every authenticated connection (a snapshot)."""
        return iter([(u, c) for u, conns in self._authed.items() for c in conns.values()])

    def __iter__(self) -> Iterator[Any]:
        """Every live connection, authenticated or not (a snapshot)."""
        return iter(list(self._by_id.values()))

    def __contains__(self, conn: Any) -> bool:
        return self._by_id.get(getattr(conn, "conn_id", None)) is conn

    def __len__(self) -> int:
        return len(self._by_id)

    def count(self, transport: str | None = None, authenticated: bool | None = None) -> int:
        """Live connections, optionally of one transport and/or authentication state."""
        return sum(n for (t, a), n in self._counts.items()
                   if (transport is None or t == transport)
                   and (authenticated is None or a == authenticated))

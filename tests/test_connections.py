"""ConnectionRegistry: the gateway's unauthenticated / authenticated / by-connId maps."""

from dataclasses import dataclass

from imcluster import metrics
from imcluster.gateway.connections import ConnectionRegistry

SERVER = "11111111-2222-3333-4444-555555555555"


@dataclass(eq=False)
class Conn:
    """Just the attributes the registry reads (engine.ClientConnection has them all)."""

    ip: str
    port: int
    transport_name: str = "ws"

    @property
    def peer_key(self) -> str:
        return f"{self.ip}##{self.port}"

    @property
    def conn_id(self) -> str:
        return f"{SERVER}##{self.peer_key}"


def gauge(transport: str, authenticated: bool) -> float:
    return metrics.CONNECTIONS.labels(
        transport=transport, authenticated="true" if authenticated else "false")._value.get()


def test_add_enters_the_unauthenticated_map():
    """A fresh connection is not findable by user until it authenticates."""
    reg = ConnectionRegistry()
    c = Conn("10.0.0.1", 5000)
    assert reg.add(c)
    assert reg.unauthenticated("10.0.0.1##5000") is c
    assert reg.get(c.conn_id) is c
    assert reg.user_of(c) is None
    assert reg.users() == []
    assert c in reg and len(reg) == 1
    assert reg.count(authenticated=False) == 1 and reg.count(authenticated=True) == 0


def test_duplicate_conn_id_is_refused():
    """A second socket with the same ip##port must not shadow the first one's routing."""
    reg = ConnectionRegistry()
    a, b = Conn("10.0.0.1", 5000), Conn("10.0.0.1", 5000, "tcp")
    assert reg.add(a)
    assert not reg.add(b)
    assert reg.get(a.conn_id) is a
    assert len(reg) == 1


def test_authenticate_moves_to_the_user_map():
    """After auth, a user's connections (several devices) are all found under the user id."""
    reg = ConnectionRegistry()
    a, b, other = Conn("10.0.0.1", 5000), Conn("10.0.0.2", 6000, "tcp"), Conn("10.0.0.3", 7)
    for c in (a, b, other):
        reg.add(c)
    assert reg.authenticate(a, "alice") is None
    assert reg.authenticate(b, "alice") is None
    assert reg.of_user("alice") == {a.peer_key: a, b.peer_key: b}
    assert reg.unauthenticated(a.peer_key) is None
    assert reg.unauthenticated(other.peer_key) is other
    assert reg.user_of(b) == "alice"
    assert sorted(c.peer_key for _, c in reg.authenticated()) == sorted([a.peer_key, b.peer_key])
    assert reg.count("ws", True) == 1 and reg.count("tcp", True) == 1 and reg.count("ws", False) == 1
    # refresh (same user) changes nothing
    assert reg.authenticate(a, "alice") == "alice"
    assert reg.count(authenticated=True) == 2


def test_authenticate_as_another_user_moves_between_users():
    """A connection re-authenticated as someone else must stop receiving the first user's messages."""
    reg = ConnectionRegistry()
    a = Conn("10.0.0.1", 5000)
    reg.add(a)
    reg.authenticate(a, "alice")
    assert reg.authenticate(a, "bob") == "alice"
    assert reg.of_user("alice") == {}
    assert "alice" not in reg.users()
    assert reg.of_user("bob") == {a.peer_key: a}
    assert reg.count(authenticated=True) == 1


def test_deauthenticate_moves_back():
    """When Redis could not record the auth, the connection is unauthenticated again."""
    reg = ConnectionRegistry()
    a = Conn("10.0.0.1", 5000)
    reg.add(a)
    reg.authenticate(a, "alice")
    assert reg.deauthenticate(a) == "alice"
    assert reg.of_user("alice") == {}
    assert reg.unauthenticated(a.peer_key) is a
    assert reg.deauthenticate(a) is None
    assert reg.count(authenticated=False) == 1 and reg.count(authenticated=True) == 0


def test_remove_forgets_everywhere_and_is_idempotent():
    """A disconnected client must not be delivered to, nor counted."""
    reg = ConnectionRegistry()
    a, b = Conn("10.0.0.1", 5000), Conn("10.0.0.2", 5000)
    reg.add(a)
    reg.add(b)
    reg.authenticate(a, "alice")
    assert reg.remove(a) == "alice"
    assert reg.remove(a) is None
    assert reg.remove(b) is None
    assert reg.get(a.conn_id) is None and reg.get(b.conn_id) is None
    assert reg.users() == [] and len(reg) == 0
    assert reg.count() == 0


def test_stale_object_cannot_touch_a_newer_connection():
    """A late callback about an old socket must not remove the new socket on the same ip##port."""
    reg = ConnectionRegistry()
    old, new = Conn("10.0.0.1", 5000), Conn("10.0.0.1", 5000)
    reg.add(old)
    reg.remove(old)
    reg.add(new)
    assert reg.remove(old) is None
    assert reg.authenticate(old, "alice") is None
    assert reg.get(new.conn_id) is new
    assert old not in reg and new in reg


def test_gauge_follows_changes():
    """The imcluster_connections gauge must match the live connections."""
    reg = ConnectionRegistry()
    before = {(t, a): gauge(t, a) for t in ("ws", "tcp") for a in (True, False)}
    a, b = Conn("10.9.0.1", 1), Conn("10.9.0.2", 2, "tcp")
    reg.add(a)
    reg.add(b)
    reg.authenticate(b, "bob")
    assert gauge("ws", False) == before[("ws", False)] + 1
    assert gauge("tcp", True) == before[("tcp", True)] + 1
    assert gauge("tcp", False) == before[("tcp", False)]
    reg.clear()
    assert {(t, a): gauge(t, a) for t in ("ws", "tcp") for a in (True, False)} == before


def test_meta_is_kept_for_re_registration():
    """After Redis loses its data, the gateway must write the same device/exp again."""
    reg = ConnectionRegistry()
    a = Conn("10.0.0.1", 5000)
    reg.add(a)
    assert reg.meta_of(a) is None
    reg.authenticate(a, "alice", {"device": "web", "authedAt": 1, "exp": 2})
    assert reg.meta_of(a) == {"device": "web", "authedAt": 1, "exp": 2}
    reg.authenticate(a, "alice", {"device": "web", "authedAt": 1, "exp": 3})
    assert reg.meta_of(a)["exp"] == 3
    reg.remove(a)
    assert reg.meta_of(a) is None

"""The gateway's TurnWriter: a connection's frames of one reactor turn go to its socket in one send."""

from __future__ import annotations

from twisted.internet.task import Clock


def _tcp_pair():
    """A real connected socket pair, the server side in a bare ``tcp.Server`` (what TurnWriter touches)."""
    import socket

    from twisted.internet import tcp

    a, b = socket.socketpair()
    a.setblocking(False)
    t = tcp.Server.__new__(tcp.Server)
    t.socket = a
    t.connected = True
    t.disconnecting = False
    t.dataBuffer = b""
    t._tempDataLen = 0
    t.written = []
    t.write = t.written.append
    return t, b


def test_turn_writer_sends_a_turns_frames_at_once_to_the_socket():
    from imcluster.gateway.transport import TurnWriter

    clock = Clock()
    w = TurnWriter(clock)
    t, peer = _tcp_pair()
    w.write(t, b"one")
    w.write(t, b"two")
    clock.advance(0)
    assert peer.recv(100) == b"onetwo"
    assert t.written == []  # nothing went through the transport's buffer
    assert clock.getDelayedCalls() == []


def test_turn_writer_leaves_the_rest_to_the_transport():
    """A transport holding output, or a closing one, gets the bytes through write() (order and close kept)."""
    from imcluster.gateway.transport import TurnWriter

    clock = Clock()
    w = TurnWriter(clock)
    t, peer = _tcp_pair()
    t.dataBuffer = b"earlier"
    w.write(t, b"later")
    clock.advance(0)
    assert t.written == [b"later"]
    t.dataBuffer = b""
    t.written.clear()
    w.write(t, b"bye")
    w.flush_one(t)  # before a loseConnection
    assert t.written == [b"bye"]
    clock.advance(0)
    assert t.written == [b"bye"]


def test_turn_writer_sends_large_output_at_once():
    """A sync or history page is not held to the end of the turn: flow control sees it at the write."""
    from imcluster.gateway.transport import TurnWriter

    clock = Clock()
    w = TurnWriter(clock)
    t, peer = _tcp_pair()
    w.write(t, b"small")
    w.write(t, b"x" * TurnWriter.LARGE)
    got = b""
    while len(got) < TurnWriter.LARGE + 5:
        got += peer.recv(1 << 20)
    assert got == b"small" + b"x" * TurnWriter.LARGE
    assert t.written == []


def test_turn_writer_writes_other_transports_through_them():
    from imcluster.gateway.transport import TurnWriter

    class Other:
        def __init__(self):
            self.written = []

        def write(self, data):
            self.written.append(data)

    clock = Clock()
    w = TurnWriter(clock)
    o = Other()
    w.write(o, b"x")
    assert o.written == [b"x"] and clock.getDelayedCalls() == []

"""The process harness of tests/support/cluster.py, on a trivial twistd plugin.

If these fail, every integration test that starts real daemons is suspect.
"""

import signal

import pytest
import pytest_twisted

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory
from twisted.protocols.basic import Int32StringReceiver

from tests.support.clients import FrameTimeout, connect_tcp, connect_ws
from tests.support.cluster import CLEAN_EXIT, TWISTD, DaemonError, cli_args, consumer_count, endpoint, free_port, port_open
from imcluster.config import GATEWAY, PROCESSOR

# starts processes: not part of the fast suite (-m "not slow")
pytestmark = pytest.mark.slow


def _web(cluster, port):
    argv = [str(TWISTD), "-n", "--pidfile=", "web", "--listen", endpoint(port), "--path", str(cluster.tmp_path)]
    return cluster.run("web", argv, {"http": port})


@pytest_twisted.ensureDeferred
async def test_start_ready_stop(cluster):
    """A harness that reports readiness too early or loses exit codes makes e2e tests flaky."""
    port = free_port()
    proc = _web(cluster, port)
    await proc.wait_ready(lambda: port_open(port))
    assert proc.running and port_open(port)
    rc = await proc.stop(signal.SIGTERM)
    assert rc == -signal.SIGTERM  # twistd re-raises the signal after a clean stop
    assert not proc.running and not port_open(port)
    assert "Received SIGTERM" in proc.log_text()


@pytest_twisted.ensureDeferred
async def test_kill_gives_sigkill_code(cluster):
    """A crash test that cannot SIGKILL a daemon tests nothing."""
    port = free_port()
    proc = _web(cluster, port)
    await proc.wait_ready(lambda: port_open(port))
    assert await proc.kill() == -signal.SIGKILL


@pytest_twisted.ensureDeferred
async def test_failed_start_shows_log_tail(cluster):
    """A daemon that dies on start must fail the test with its own error, not a timeout."""
    proc = cluster.run("bad", [str(TWISTD), "-n", "--pidfile=", "no-such-plugin"])
    with pytest.raises(DaemonError) as e:
        await proc.wait_ready(lambda: False, timeout=20)
    assert "exited with" in str(e.value)
    assert "no-such-plugin" in str(e.value)


@pytest_twisted.ensureDeferred
async def test_teardown_reaps(cluster):
    """Daemons left running by a test would hold ports and consume queues of later tests."""
    port = free_port()
    proc = _web(cluster, port)
    await proc.wait_ready(lambda: port_open(port))
    await cluster.shutdown()
    assert proc.returncode == -signal.SIGTERM  # plain twistd dies by the signal


def test_cli_args_maps_options():
    """A harness that passes options wrongly starts daemons with the wrong settings."""
    args = cli_args(GATEWAY, {"namespace": "x", "ws": ["tcp:1", "tcp:2"], "heartbeat": 1.5,
                              "compression": False, "advertise": None})
    assert args == ["--namespace=x", "--ws=tcp:1", "--ws=tcp:2", "--heartbeat=1.5", "--compression=false"]
    assert cli_args(PROCESSOR, {"migrate": True}) == ["--migrate"]
    with pytest.raises(TypeError):
        cli_args(PROCESSOR, {"ws": "tcp:1"})


def test_consumer_count_of_missing_queue(namespace):
    """Processor readiness relies on a missing queue counting as zero consumers."""
    assert consumer_count(f"{namespace}.processor") == 0


class _EchoTCP(Int32StringReceiver):
    def stringReceived(self, data):  # noqa: N802
        self.sendString(data)


class _EchoWS(WebSocketServerProtocol):
    def onMessage(self, payload, isBinary):  # noqa: N802, N803
        if payload == b'{"type":"bye"}':
            self.sendClose(4001, "bye")
        else:
            self.sendMessage(payload, isBinary)


@pytest_twisted.ensureDeferred
async def test_tcp_client_frames():
    """A test client that mis-frames TCP would blame the gateway for its own bugs."""
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(_EchoTCP))
    try:
        client = await connect_tcp(port.getHost().port)
        client.send({"type": "ping", "n": 1})
        client.send_frame_bytes(b'{"type":"pong"}')
        assert await client.receive() == {"type": "ping", "n": 1}
        assert await client.receive_type("pong", skip=()) == {"type": "pong"}
        with pytest.raises(FrameTimeout):
            await client.receive(timeout=0.05)
        client.close()
        await client.closed
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_ws_client_frames_and_close_code():
    """WebSocket tests read close codes (4001, 1001...) through this client."""
    factory = WebSocketServerFactory()
    factory.protocol = _EchoWS
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    try:
        client = await connect_ws(f"ws://127.0.0.1:{port.getHost().port}/ws")
        client.send({"type": "note", "text": "é"})
        assert await client.receive() == {"type": "note", "text": "é"}
        with pytest.raises(AssertionError, match="expected a 'auth_reply' frame"):
            await client.auth("tok")  # the echo is an 'auth' frame, not the reply
        client.send({"type": "bye"})
        assert await client.closed == (4001, "bye")
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_real_cluster_round_trip(cluster):
    """The harness must bring up a usable gateway+processor pair on the test's own namespace and schema."""
    assert cluster.pg_schema and cluster.pg_schema.startswith("imt_")
    processor = await cluster.start_processor()
    gateway = await cluster.start_gateway()
    assert consumer_count(f"{cluster.namespace}.processor") == 1
    alice = await connect_ws(gateway.ws_url)
    bob = await connect_tcp(gateway.tcp_port)
    assert (await alice.auth(cluster.token("alice")))["ok"]
    assert (await bob.auth(cluster.token("bob")))["ok"]
    await alice.receive_type("sync_done")
    await bob.receive_type("sync_done")
    alice.send({"type": "message", "clientMsgId": "c1", "sessionId": "p2p:alice:bob", "body": {"t": 1}})
    reply = await alice.receive_type("message_reply")
    assert reply["ok"] and reply["seq"] == 1
    delivered = await bob.receive_type("message_send")
    assert delivered["msgId"] == reply["msgId"] and delivered["body"] == {"t": 1}
    alice.close()
    bob.close()
    assert await gateway.stop() in CLEAN_EXIT
    assert await processor.stop() in CLEAN_EXIT

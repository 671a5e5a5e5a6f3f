"""``--amqp`` with several nodes (failover) and ``--queue-type quorum`` (ARCHITECTURE.md "Scale-out").

The 3-node cluster under load is tests/test_scaleout.py; here each rule alone:
quorum queues on the shared broker (their own namespace), and failover
between two private RabbitMQ nodes (tests/support/private.py) that the test
kills.
"""

from __future__ import annotations

import pika
import pika.exceptions
import pytest
import pytest_twisted
from twisted.internet import threads

from imcluster.bus import AMQPService, BusNames, queue_arguments, split_urls
from imcluster.config import ConfigError, load_config
from tests.support.bus import FAST_RETRY, cleanup_namespace
from tests.support.ids import AMQP_URL, unique
from tests.support.private import PrivateRabbit
from tests.support.waiting import eventually


def test_queue_arguments_build_every_shared_queue_from_the_config():
    """A daemon declaring a shared queue with other arguments than its peers would be refused with 406."""
    quorum = load_config("processor", {"queue_type": "quorum"})
    classic = load_config("processor", {})
    assert classic.queue_type == "classic"
    assert queue_arguments(classic) == {}
    assert queue_arguments(quorum) == {"x-queue-type": "quorum"}
    assert queue_arguments(quorum, **{"x-dead-letter-exchange": "im.dlx"}) == {
        "x-dead-letter-exchange": "im.dlx", "x-queue-type": "quorum"}
    names = BusNames("im", "quorum")
    for q in (names.processor_queue(), names.dead_queue(), names.shared_queue("im.webhooks", "im.webhooks")):
        assert q.arguments["x-queue-type"] == "quorum" and q.durable and not q.exclusive and not q.auto_delete
    # <ns>.webhooks and <ns>.push too; the webhooks' one sender at a time needs x-single-active-consumer
    assert names.webhooks_queue().arguments == {"x-queue-type": "quorum", "x-single-active-consumer": True}
    assert names.push_queue().arguments == {"x-queue-type": "quorum"}
    classic_names = BusNames("im")
    assert classic_names.webhooks_queue().arguments == {} and classic_names.push_queue().arguments == {}
    # a gateway's own queue can never be a quorum queue (exclusive, auto-delete)
    assert names.gateway_queue("u1").arguments == {}
    with pytest.raises(ConfigError, match="queue_type"):
        load_config("gateway", {"queue_type": "stream", "jwt_secret": "x"})
    with pytest.raises(ValueError):
        queue_arguments("stream")


def test_amqp_takes_several_urls_repeated_or_comma_separated():
    """An operator listing the cluster's nodes would get one node, or a config error."""
    c = load_config("processor", {"amqp": ["amqp://a:5672/%2F,amqp://b:5672/%2F", "amqps://c/%2F"]})
    assert c.amqp == ["amqp://a:5672/%2F", "amqp://b:5672/%2F", "amqps://c/%2F"]
    env = load_config("processor", environ={"IMCLUSTER_AMQP": "amqp://a/%2F, amqp://b/%2F"})
    assert env.amqp == ["amqp://a/%2F", "amqp://b/%2F"]
    bus = AMQPService.from_config(c)
    assert [(n.host, n.port, n.tls) for n in bus.nodes] == [("a", 5672, False), ("b", 5672, False),
                                                            ("c", 5671, True)]
    assert split_urls("amqp://x/%2F") == ["amqp://x/%2F"]
    with pytest.raises(ConfigError, match="amqp"):
        load_config("processor", {"amqp": ["redis://a"]})


def _declare_classic(url: str, queue: str) -> int:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        conn.channel().queue_declare(queue, durable=True, arguments={"x-dead-letter-exchange": "x"})
        return 0
    except pika.exceptions.ChannelClosedByBroker as e:
        return e.reply_code
    finally:
        if conn.is_open:
            conn.close()


@pytest_twisted.ensureDeferred
async def test_quorum_processor_queue_is_a_quorum_queue_and_counts_redeliveries(namespace):
    """With --queue-type quorum the processor queue would still live on one node (and die with it)."""
    bus = AMQPService(AMQP_URL, namespace, publish_timeout=5.0, retry_policy=FAST_RETRY,
                      connection_name=unique("imcluster-test-"), queue_type="quorum")
    await bus.startService()
    try:
        got = []

        def inbox(msg):
            got.append(msg)
            if len(got) == 1:
                msg.nack(requeue=True)  # a processor died with it: redelivered
            else:
                msg.ack()

        await bus.consume(bus.processor_queue(), inbox, prefetch=10)
        await bus.publish(bus.server_key(), b"frame")
        await eventually(lambda: len(got) >= 2, 10.0, "redelivery")
        assert [m.body for m in got[:2]] == [b"frame", b"frame"]
        assert got[1].redelivered and got[1].headers.get("x-delivery-count") == 1
        # the broker says which type it is: a classic declare of the same name is refused
        code = await threads.deferToThread(_declare_classic, AMQP_URL, bus.processor_queue().name)
        assert code == 406
        # and a classic bus on the same namespace cannot start consuming it (every daemon must agree)
        classic = AMQPService(AMQP_URL, namespace, publish_timeout=2.0, retry_policy=FAST_RETRY,
                              connection_name=unique("imcluster-test-"))
        await classic.startService()
        try:
            assert not classic.connected
            assert "x-queue-type" in classic._last_error, classic._last_error
        finally:
            await classic.stopService()
    finally:
        await bus.stopService()
        await cleanup_namespace(namespace, [])


@pytest_twisted.ensureDeferred
async def test_one_webhook_sender_at_a_time_on_a_quorum_queue(namespace):
    """Two processors would both send webhooks (out of order) from a quorum queue, which ignores exclusive consumers."""
    buses = [AMQPService(AMQP_URL, namespace, publish_timeout=5.0, retry_policy=FAST_RETRY,
                         connection_name=unique("imcluster-test-"), queue_type="quorum") for _ in range(2)]
    got: dict[int, list] = {0: [], 1: []}
    try:
        for i, bus in enumerate(buses):
            await bus.startService()
            # what imcluster.processor.business.WebhookService does
            await bus.consume(bus.names.webhooks_queue(), lambda m, i=i: (got[i].append(m.body), m.ack()),
                              prefetch=10, exclusive=True)
        for n in range(20):
            await buses[0].publish(buses[0].names.webhooks_queue().routing_key, b"%d" % n)
        await eventually(lambda: len(got[0]) + len(got[1]) == 20, 10.0, "20 webhook events")
        assert sorted(len(v) for v in got.values()) == [0, 20], got
    finally:
        for bus in buses:
            if bus.running:
                await bus.stopService()
        await cleanup_namespace(namespace, [f"{namespace}.webhooks"])


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest_twisted.ensureDeferred
async def test_a_daemon_fails_over_to_the_next_node_and_declares_its_exclusive_queue_there(tmp_path, namespace):
    """A gateway whose RabbitMQ node died would stay cut off (no queue, no publishes) until that node came back."""
    a = PrivateRabbit(tmp_path / "a")
    b = PrivateRabbit(tmp_path / "b")
    bus = None
    try:
        await a.start()
        await b.start()
        bus = AMQPService([a.url, b.url], namespace, publish_timeout=5.0, retry_policy=FAST_RETRY,
                          connection_name=unique("imcluster-test-"))
        await bus.startService()
        assert bus.connected and bus.port == a.port
        got, restarts = [], []
        names = bus.names
        consumer = await bus.consume(names.gateway_queue("gw1"), lambda m: (got.append(m.body), m.ack()),
                                     exclusive=True)
        consumer.add_restart_listener(restarts.append)
        await bus.publish(names.gateway_key("gw1"), b"one", mandatory=True)
        await eventually(lambda: got == [b"one"], 10.0, "delivery on node a")

        await a.kill()  # SIGKILL: the connection just drops
        await eventually(lambda: bus.connected and bus.port == b.port and consumer.active, 20.0,
                         "failover to node b")
        assert len(restarts) == 1  # the gateway re-syncs its connections from here
        # publisher confirms: the publish is confirmed by node b, into the queue declared again there
        await bus.publish(names.gateway_key("gw1"), b"two", mandatory=True)
        await eventually(lambda: got == [b"one", b"two"], 10.0, "delivery on node b")
        assert bus.reconnects == 1
    finally:
        if bus is not None and bus.running:
            await bus.stopService()
        await a.close()
        await b.close()

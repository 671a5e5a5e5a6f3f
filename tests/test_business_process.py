"""``twistd improcessor`` with a moderation service and a webhook receiver, as an operator runs them.

The example moderation server runs as ``python -m imcluster.contrib.moderation_server``
(the command README gives); the webhook receiver is the test's
(tests/support/business.py).
"""

from __future__ import annotations

import sys

import pytest
import pytest_twisted

from imcluster.processor.filters import default_words_path
from tests.support.business import BusinessServer
from tests.support.cluster import endpoint, free_port, port_open
from tests.support.clients import connect_tcp
from tests.support.http import http_call
from tests.support.waiting import eventually

pytestmark = pytest.mark.slow

SECRET = "business-secret"


@pytest_twisted.ensureDeferred
async def test_processor_daemon_calls_the_example_moderation_server_and_the_webhook(cluster):
    """An operator following README got no moderation calls, unsigned ones, or no webhooks from twistd improcessor."""
    port = free_port()
    moderation = cluster.run("moderation", [sys.executable, "-m", "imcluster.contrib.moderation_server",
                                            "--listen", endpoint(port), "--secret", SECRET, "--word", "spam"],
                             ports={"http": port})
    await moderation.wait_ready(lambda: port_open(port))
    receiver = await BusinessServer(secret=SECRET).start()
    try:
        gateway = await cluster.start_gateway()
        processor = await cluster.start_processor(
            metrics=True, moderation_url=f"http://127.0.0.1:{port}/", webhook_secret=SECRET,
            webhook_url=receiver.url("hooks"), webhook_events=["message.stored"])
        alice = await connect_tcp(gateway.tcp_port)
        assert (await alice.auth(cluster.token("alice")))["ok"]
        await alice.receive_type("sync_done")
        alice.send({"type": "message", "clientMsgId": "c1", "sessionId": "p2p:alice:bob",
                    "body": {"text": "cheap spam"}})
        refused = await alice.receive_type("message_reply")
        assert refused["ok"] is False and refused["error"]["code"] == "rejected", refused
        alice.send({"type": "message", "clientMsgId": "c2", "sessionId": "p2p:alice:bob", "body": {"text": "hello"}})
        ok = await alice.receive_type("message_reply")
        assert ok["ok"], ok
        await eventually(lambda: receiver.hooks.got, what="a webhook")
        [(event, body)] = receiver.hooks.got
        assert event == "message.stored" and body["data"]["msgId"] == ok["msgId"]
        assert body["data"]["body"] == {"text": "hello"} and receiver.hooks.bad_signatures == 0
        text = (await http_call(processor.metrics_port, "GET", "/metrics")).text
        assert 'imcluster_business_calls_total{kind="moderation",outcome="ok"} 2.0' in text
        assert 'imcluster_business_calls_total{kind="webhook",outcome="ok"} 1.0' in text
        assert "imcluster_business_call_seconds_bucket" in text
        # the keyword filter moderates with the shipped list too (default filters)
        assert default_words_path().is_file()
    finally:
        await receiver.stop()

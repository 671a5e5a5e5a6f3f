"""Fixtures of the bus subsystem (see tests/conftest.py).

``bus_factory`` makes :class:`~imcluster.bus.AMQPService` instances on the
test's own ``namespace`` (each with a ``connection_name`` unique to the test,
so that ``rabbitmqctl`` can find it, and fast reconnects) and stops them
afterwards; then every exchange and queue of the namespace, and every queue
they declared, is deleted through a fresh connection. ``amqp_bus`` is one
started service. ``fake_bus`` is a started :class:`~imcluster.testing.FakeBus`.
"""

from __future__ import annotations

import os
import shutil

import pytest
import pytest_twisted
from twisted.application.internet import backoffPolicy
from twisted.internet import utils

from imcluster.bus import AMQPService
from imcluster.testing import FakeBus
from tests.support.ids import AMQP_URL, unique
from tests.support.services import Made

#: seconds a publish (and a stop) may take in tests: the broker is local
TEST_TIMEOUT = 2.0
#: reconnect at once, then quickly: tests wait for recoveries
FAST_RETRY = backoffPolicy(0.05, 0.5, 2.0, jitter=lambda: 0.0)


async def cleanup_namespace(namespace: str, queues=(), url: str = AMQP_URL) -> None:
    """Delete ``namespace``'s exchanges and queues (and ``queues``) through a fresh connection."""
    cleaner = AMQPService(url, namespace, publish_timeout=TEST_TIMEOUT, retry_policy=FAST_RETRY,
                          connection_name=unique("imcluster-test-cleaner-"))
    await cleaner.startService()
    try:
        if cleaner.connected:
            await cleaner.delete_topology(queues)
    finally:
        await cleaner.stopService()


@pytest_twisted.async_yield_fixture
async def bus_factory(namespace):
    """``await make(url=..., namespace=..., publish_timeout=..., start=True, **kw)``: AMQPServices cleaned up afterwards."""
    made = Made()

    async def make(url: str = AMQP_URL, namespace: str = namespace, publish_timeout: float = TEST_TIMEOUT,
                   start: bool = True, **kw) -> AMQPService:
        kw.setdefault("retry_policy", FAST_RETRY)
        kw.setdefault("connection_name", unique("imcluster-test-"))
        return await made.add(AMQPService(url, namespace, publish_timeout=publish_timeout, **kw), start)

    yield make
    await made.stop_all()
    # every namespace, also of buses that reached the broker through a test's proxy:
    # what they declared lives on the real broker all the same
    namespaces: dict[str, set[str]] = {}
    for svc in made:
        namespaces.setdefault(svc.namespace, set()).update(svc.declared_queues)
    for ns, queues in namespaces.items():
        await cleanup_namespace(ns, sorted(queues))


@pytest_twisted.async_fixture
async def amqp_bus(bus_factory):
    """A started AMQPService on this test's namespace; its exchanges and queues are deleted afterwards."""
    return await bus_factory()


@pytest_twisted.async_yield_fixture
async def fake_bus(namespace):
    """A started FakeBus (real reactor as its clock) on this test's namespace."""
    from twisted.internet import reactor

    bus = FakeBus(namespace, publish_timeout=TEST_TIMEOUT, clock=reactor)
    await bus.startService()
    yield bus
    if bus.running:
        await bus.stopService()


# --- rabbitmqctl helpers (real-only tests) ---------------------------------


async def rabbitmqctl(*args: str) -> str:
    """Run ``rabbitmqctl -q ARGS`` without blocking the reactor; its stdout (AssertionError on failure)."""
    exe = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    out, err, code = await utils.getProcessOutputAndValue(exe, ("-q", *args), env=dict(os.environ))
    assert code == 0, f"rabbitmqctl {' '.join(args)} exited {code}: {err.decode(errors='replace')}"
    return out.decode(errors="replace")


async def connection_pids(connection_name: str) -> list[str]:
    """Erlang pids of the broker connections whose client property ``connection_name`` is ``connection_name``."""
    out = await rabbitmqctl("list_connections", "pid", "client_properties")
    needle = '{"connection_name","%s"}' % connection_name
    return [line.split("\t", 1)[0] for line in out.splitlines() if needle in line]


async def close_connection(connection_name: str, reason: str = "test") -> int:
    """Make the broker close every connection named ``connection_name``; how many it closed."""
    pids = await connection_pids(connection_name)
    for pid in pids:
        await rabbitmqctl("close_connection", pid, reason)
    return len(pids)


@pytest.fixture
def rabbitmq_close():
    """``await close(connection_name)``: the broker closes that connection (rabbitmqctl close_connection)."""
    return close_connection

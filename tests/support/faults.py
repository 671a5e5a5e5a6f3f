"""Faults of issue 12 on a real cluster, measured with :mod:`tests.support.ledger`.

A fault cluster is two gateways and two processors (tests/support/cluster.py)
on a private RabbitMQ and a private Redis (tests/support/private.py); the
shared PostgreSQL holds the run's own schema. Each gateway reaches the broker
through its own :class:`~tests.support.proxy.CuttableProxy`, so that one
gateway's AMQP connection can be cut alone, and so that after a broker
restart the gateways come back *after* the processors: the order in which
deliveries were lost in issue 12 (the processors route to gateway queues that
do not exist yet), made certain instead of left to reconnect backoff.

Each fault is an async function returning the monotonic time at which the
dependency answered again (``healed_at``, the start of PROTOCOL.md's 10 s):

``broker_restart``     RabbitMQ stopped (SIGTERM) for ``down`` s and started again:
                       every gateway queue is gone; the gateways' proxies open
                       ``gateway_lag`` s after the broker answers
``redis_restart``      Redis stopped and started again empty (``--save ''``)
``gateway_amqp_cut``   gateway 0's AMQP connection cut for ``down`` s (its
                       exclusive queue goes with it), then allowed again

``run_fault`` drives one of them under a :class:`~tests.support.load.Load`
and returns the ledger's :class:`~tests.support.ledger.Report`. Used by
tests/test_faults.py and bench/faults.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from twisted.internet import reactor, task

from tests.support.ledger import Report
from tests.support.load import Load
from tests.support.private import PrivateRabbit, PrivateRedis
from tests.support.proxy import CuttableProxy


async def _sleep(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


@dataclass
class FaultCluster:
    cluster: Any
    rabbit: PrivateRabbit
    redis: PrivateRedis
    gateways: list = field(default_factory=list)
    processors: list = field(default_factory=list)
    proxies: list[CuttableProxy] = field(default_factory=list)
    #: seconds each broker start took
    broker_starts: list[float] = field(default_factory=list)

    async def close(self) -> None:
        for p in self.proxies:
            await p.close()


async def start_fault_cluster(cluster: Any, rabbit: PrivateRabbit, redis: PrivateRedis,
                              gateways: int = 2, processors: int = 2,
                              gateway_opts: dict | None = None,
                              processor_opts: dict | None = None) -> FaultCluster:
    """Point ``cluster`` (a tests.support.cluster.Cluster) at the private services and start the daemons."""
    cluster.amqp_url = rabbit.url
    cluster.redis_url = redis.url
    fc = FaultCluster(cluster, rabbit, redis)
    for _ in range(gateways):
        proxy = CuttableProxy("127.0.0.1", rabbit.port)
        fc.proxies.append(proxy)
        fc.gateways.append(await cluster.start_gateway(amqp=proxy.url(rabbit.url), **(gateway_opts or {})))
    for _ in range(processors):  # one at a time: readiness counts consumers
        fc.processors.append(await cluster.start_processor(**(processor_opts or {})))
    return fc


# --- the faults ------------------------------------------------------------------


async def broker_restart(fc: FaultCluster, down: float = 2.0, gateway_lag: float = 2.0) -> float:
    for p in fc.proxies:
        await p.cut()
    await fc.rabbit.stop()
    await _sleep(down)
    fc.broker_starts.append(await fc.rabbit.start())
    healed_at = time.monotonic()
    await _sleep(gateway_lag)
    for p in fc.proxies:
        p.restore()
    return healed_at


async def redis_restart(fc: FaultCluster, down: float = 2.0) -> float:
    await fc.redis.restart(down)
    return time.monotonic()


async def gateway_amqp_cut(fc: FaultCluster, down: float = 2.0, gateway: int = 0) -> float:
    proxy = fc.proxies[gateway]
    await proxy.cut()
    await _sleep(down)
    proxy.restore()
    return time.monotonic()


FAULTS: dict[str, Callable[..., Awaitable[float]]] = {
    "broker-restart": broker_restart,
    "redis-restart": redis_restart,
    "gateway-amqp-cut": gateway_amqp_cut,
}


async def run_fault(fc: FaultCluster, load: Load, name: str, steady: float = 2.0, after: float = 3.0,
                    recover_timeout: float = 20.0, **fault_kw: Any) -> tuple[Report, float]:
    """Load, ``steady`` s, the fault, more load until a message is acknowledged again (at most
    ``recover_timeout`` s) and ``after`` s beyond, then wait for the rule's deadline.

    Returns the report and how long the fault itself took (s).
    """
    ledger = load.new_ledger()
    load.start()
    await _sleep(steady)
    began = time.monotonic()
    healed_at = await FAULTS[name](fc, **fault_kw)
    took = time.monotonic() - began
    # the load goes on until the cluster takes messages again (reconnect backoff), then ``after`` s
    deadline = time.monotonic() + recover_timeout
    while time.monotonic() < deadline and not any(s.replied_at >= healed_at for s in ledger.sent.values()):
        await _sleep(0.1)
    await _sleep(after)
    load.stop()
    await load.settle(ledger, healed_at)
    load.ledgers.remove(ledger)
    return ledger.report(healed_at), took

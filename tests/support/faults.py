"""Faults of issue 12 on a real cluster, measured with :mod:`tests.support.ledger`.

A fault cluster is two gateways and two processors (tests/support/cluster.py)
on a private RabbitMQ and a private Redis (tests/support/private.py); the
shared PostgreSQL holds the run's own schema. Each gateway reaches the broker
and Redis through proxies of its own (:class:`~tests.support.proxy.CuttableProxy`),
so that one gateway's AMQP connection can be cut alone, and so that after a
restart the gateways come back after the processors and one after the other
(``gateway_lags``): the order in which deliveries were lost in issue 12 (the
processors route to gateway queues or registrations that do not exist yet;
a user's device on the first gateway back acknowledges what its device on the
second one never got), made certain instead of left to reconnect backoff.

Each fault is an async function returning the monotonic time at which the
dependency answered again for every daemon (``healed_at``, the start of
PROTOCOL.md's 10 s: for a lagging gateway the service is back only when its
way to it is):

``broker_restart``     RabbitMQ stopped (SIGTERM) for ``down`` s and started again:
                       every gateway queue is gone; gateway *i* may reach it
                       ``gateway_lags[i]`` s after it answers
``redis_restart``      Redis stopped and started again empty (``--save ''``);
                       gateway *i* may reach it ``gateway_lags[i]`` s after
``gateway_amqp_cut``   gateway 0's AMQP connection cut for ``down`` s (its
                       exclusive queue goes with it), then allowed again

``before_heal(back_at)`` runs (and is awaited) just before the last gateway
may reach the dependency again, ``back_at`` being when the dependency itself
answered again: the "quiet" variants wait there until the cluster has taken
a message since ``back_at`` (the gateways that are back work), let the load
run a little longer, and stop it, so that what must heal is exactly what was
stored while deliveries could not be routed to the last gateway.

``run_fault`` drives one of them under a :class:`~tests.support.load.Load`
and returns the ledger's :class:`~tests.support.ledger.Report`. Used by
tests/test_faults.py and bench/faults.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Sequence

from twisted.internet import defer, reactor, task

from tests.support.ledger import Report
from tests.support.load import Load
from tests.support.private import PrivateRabbit, PrivateRedis
from tests.support.proxy import CuttableProxy


async def _sleep(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


def _nothing(back_at: float) -> None:
    return None


@dataclass
class FaultCluster:
    cluster: Any
    rabbit: PrivateRabbit
    redis: PrivateRedis
    gateways: list = field(default_factory=list)
    processors: list = field(default_factory=list)
    #: per gateway: its way to RabbitMQ, and to Redis
    amqp_proxies: list[CuttableProxy] = field(default_factory=list)
    redis_proxies: list[CuttableProxy] = field(default_factory=list)
    #: seconds each broker start took
    broker_starts: list[float] = field(default_factory=list)

    async def close(self) -> None:
        for p in self.amqp_proxies + self.redis_proxies:
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
        amqp = CuttableProxy("127.0.0.1", rabbit.port)
        red = CuttableProxy("127.0.0.1", redis.port)
        fc.amqp_proxies.append(amqp)
        fc.redis_proxies.append(red)
        fc.gateways.append(await cluster.start_gateway(amqp=amqp.url(rabbit.url), redis=red.url(redis.url),
                                                       **(gateway_opts or {})))
    for _ in range(processors):  # one at a time: readiness counts consumers
        fc.processors.append(await cluster.start_processor(**(processor_opts or {})))
    return fc


async def _restore_in_turn(proxies: Sequence[CuttableProxy], lags: Sequence[float],
                           before_heal: Callable[[float], Any]) -> float:
    """Restore proxy *i* ``lags[i]`` s from now (in order of lag); ``before_heal(started)`` (awaited
    when it returns a Deferred or coroutine) before the last.

    Returns when the last one was restored.
    """
    began = time.monotonic()
    order = sorted(range(len(proxies)), key=lambda i: lags[i] if i < len(lags) else 0.0)
    for n, i in enumerate(order):
        lag = lags[i] if i < len(lags) else 0.0
        await _sleep(max(0.0, began + lag - time.monotonic()))
        if n == len(order) - 1:
            await _maybe_await(before_heal(began))
        proxies[i].restore()
    return time.monotonic()


async def _maybe_await(result: Any) -> None:
    if hasattr(result, "__await__") or isinstance(result, defer.Deferred):
        await result


# --- the faults ------------------------------------------------------------------


async def broker_restart(fc: FaultCluster, down: float = 2.0, gateway_lags: Sequence[float] = (1.0, 3.0),
                         before_heal: Callable[[float], Any] = _nothing) -> float:
    for p in fc.amqp_proxies:
        await p.cut()
    await fc.rabbit.stop()
    await _sleep(down)
    fc.broker_starts.append(await fc.rabbit.start())
    return await _restore_in_turn(fc.amqp_proxies, gateway_lags, before_heal)


async def redis_restart(fc: FaultCluster, down: float = 2.0, gateway_lags: Sequence[float] = (0.0, 3.0),
                        before_heal: Callable[[float], Any] = _nothing) -> float:
    for p in fc.redis_proxies:
        await p.cut()
    await fc.redis.stop()
    await _sleep(down)
    await fc.redis.start()
    return await _restore_in_turn(fc.redis_proxies, gateway_lags, before_heal)


async def gateway_amqp_cut(fc: FaultCluster, down: float = 2.0, gateway: int = 0,
                           before_heal: Callable[[float], Any] = _nothing) -> float:
    proxy = fc.amqp_proxies[gateway]
    await proxy.cut()
    began = time.monotonic()
    await _maybe_await(before_heal(began))
    await _sleep(max(0.0, began + down - time.monotonic()))
    proxy.restore()
    return time.monotonic()


FAULTS: dict[str, Callable[..., Awaitable[float]]] = {
    "broker-restart": broker_restart,
    "redis-restart": redis_restart,
    "gateway-amqp-cut": gateway_amqp_cut,
}


async def run_fault(fc: FaultCluster, load: Load, name: str, steady: float = 2.0, after: float = 3.0,
                    recover_timeout: float = 20.0, quiet: bool = False, quiet_load: float = 1.5,
                    **fault_kw: Any) -> tuple[Report, float]:
    """Load, ``steady`` s, the fault, more load until a message is acknowledged again (at most
    ``recover_timeout`` s) and ``after`` s beyond, then wait for the rule's deadline.

    ``quiet``: once the cluster takes messages again, the load runs
    ``quiet_load`` s more and stops, then the last gateway may reach the
    dependency again (see the module docstring). Returns the report and how
    long the fault itself took (s).
    """
    ledger = load.new_ledger()
    load.start()
    await _sleep(steady)
    began = time.monotonic()
    if quiet:
        async def stop_once_taking_messages(back_at: float) -> None:
            deadline = time.monotonic() + recover_timeout
            while time.monotonic() < deadline and not any(s.replied_at >= back_at for s in ledger.sent.values()):
                await _sleep(0.1)
            await _sleep(quiet_load)
            load.stop()

        fault_kw["before_heal"] = stop_once_taking_messages
    healed_at = await FAULTS[name](fc, **fault_kw)
    took = time.monotonic() - began
    if not quiet:
        # the load goes on until the cluster takes messages again, then ``after`` s
        deadline = time.monotonic() + recover_timeout
        while time.monotonic() < deadline and not any(s.replied_at >= healed_at for s in ledger.sent.values()):
            await _sleep(0.1)
        await _sleep(after)
    load.stop()
    await load.settle(ledger, healed_at)
    load.ledgers.remove(ledger)
    return ledger.report(healed_at), took

"""Issue 12, part 1: deliveries heal by themselves (ARCHITECTURE.md "Failure rules", PROTOCOL.md "Delivery").

Two gateways and two processors on a private RabbitMQ and a private Redis
(tests/support/faults.py), six users on both gateways (two groups, three
1:1 sessions, one user with a second device on the other gateway) sending
~18 messages a second in all, every client acknowledging and never
reconnecting. After each fault, every message that got an ok
``message_reply`` must reach every connected recipient within 10 s of its
reply, or of the dependency answering again (tests/support/ledger.py counts
lost, duplicated, seq gaps and delays; the report is printed: ``-s``).

Under steady load the processors' side of healing is needed too (the
redelivery sweep of rows left pending, a re-sync honouring ``since``,
deliveries held back for a gateway whose queue is missing and published again
once it is back; docs/internals.rst "When things fail"). The "quiet" variants stop the load just before the last gateway is
back, so what must heal is exactly what was stored while deliveries could
not be routed to it: the gateway's re-sync alone heals them.
"""

from __future__ import annotations

import pytest
import pytest_twisted

from tests.support.faults import run_fault, start_fault_cluster
from tests.support.ledger import DEADLINE
from tests.support.load import Load

pytestmark = pytest.mark.slow



async def _env(private_rabbit, private_redis, cluster, second_device: bool):
    fc = await start_fault_cluster(cluster, private_rabbit, private_redis)
    load = Load(cluster.token, fc.gateways, users=6, rate=3.0, second_device=second_device)
    await load.connect()
    return fc, load


async def _close(fc, load, private_rabbit) -> None:
    load.close()
    await fc.close()
    if not private_rabbit.running:
        await private_rabbit.start()  # the cluster's clean-up talks to it


@pytest_twisted.async_yield_fixture
async def fault_env(private_rabbit, private_redis, cluster, pg_schema):
    """A fault cluster under load, u0 with two devices: (FaultCluster, Load); all stopped afterwards."""
    fc, load = await _env(private_rabbit, private_redis, cluster, second_device=True)
    try:
        yield fc, load
    finally:
        await _close(fc, load, private_rabbit)


@pytest_twisted.async_yield_fixture
async def quiet_env(private_rabbit, private_redis, cluster, pg_schema):
    """The same with one device per user."""
    fc, load = await _env(private_rabbit, private_redis, cluster, second_device=False)
    try:
        yield fc, load
    finally:
        await _close(fc, load, private_rabbit)


def check(name: str, report, load, quiet: bool = False) -> None:
    print(f"\n{name}: {report.line()}")
    assert load.reconnected() == 0, "a client was disconnected: the rule is 'without reconnecting'"
    assert report.messages > 20, report
    if quiet:
        assert report.healed > 0, report  # something was stuck and had to heal
    else:
        assert report.after_heal >= 10, report  # the load really ran through the fault and after it
    assert report.mismatched == 0, report
    assert report.lost == 0, report
    assert report.seq_gaps == 0 and report.server_seq_gaps == 0, report
    assert report.late == 0 and report.worst_delay_s <= DEADLINE, report


@pytest_twisted.ensureDeferred
async def test_broker_restart_every_acknowledged_message_reaches_connected_recipients(fault_env):
    """After a RabbitMQ restart, messages stored while gateway queues were gone would wait for a reconnect."""
    fc, load = fault_env
    report, _ = await run_fault(fc, load, "broker-restart", down=2.0)
    check("broker-restart", report, load)


@pytest_twisted.ensureDeferred
async def test_redis_restart_empty_every_acknowledged_message_reaches_connected_recipients(fault_env):
    """After Redis came back empty, messages stored while users looked offline would wait for a reconnect."""
    fc, load = fault_env
    report, _ = await run_fault(fc, load, "redis-restart", down=2.0)
    check("redis-restart", report, load)


@pytest_twisted.ensureDeferred
async def test_gateway_amqp_cut_every_acknowledged_message_reaches_its_connected_clients(fault_env):
    """A gateway whose AMQP connection dropped would never deliver what was routed while its queue was gone."""
    fc, load = fault_env
    report, _ = await run_fault(fc, load, "gateway-amqp-cut", down=2.0)
    check("gateway-amqp-cut", report, load)


@pytest_twisted.ensureDeferred
async def test_broker_restart_quiet_gateway_resync_delivers_what_its_missing_queue_lost(quiet_env):
    """Messages routed to a gateway whose queue was not declared again yet would wait for a reconnect."""
    fc, load = quiet_env
    # gateway 0 is back (and its users send) for seconds while gateway 1's queue is still missing
    report, _ = await run_fault(fc, load, "broker-restart", down=1.0, quiet=True, gateway_lags=(0.0, 1.0))
    check("broker-restart (quiet)", report, load, quiet=True)


@pytest_twisted.ensureDeferred
async def test_redis_restart_quiet_gateway_resync_delivers_what_offline_looking_users_missed(quiet_env):
    """Messages stored while Redis had forgotten a gateway's users would wait for a reconnect."""
    fc, load = quiet_env
    report, _ = await run_fault(fc, load, "redis-restart", down=2.0, quiet=True)
    check("redis-restart (quiet)", report, load, quiet=True)


@pytest_twisted.ensureDeferred
async def test_gateway_amqp_cut_quiet_gateway_resync_delivers_what_its_lost_queue_lost(quiet_env):
    """Messages routed while one gateway's AMQP connection was down would wait for a reconnect."""
    fc, load = quiet_env
    report, _ = await run_fault(fc, load, "gateway-amqp-cut", down=2.0, quiet=True)
    check("gateway-amqp-cut (quiet)", report, load, quiet=True)

"""The private RabbitMQ and Redis of fault tests (tests/support/private.py) start, restart and clean up."""

from __future__ import annotations

import pytest
import pytest_twisted

from imcluster.registry import RedisService
from tests.support.private import PrivateRabbit, PrivateRedis, port_open

pytestmark = pytest.mark.slow


def _declare_durable(url: str, queue: str, passive: bool = False) -> bool:
    import pika
    import pika.exceptions

    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        try:
            conn.channel().queue_declare(queue, durable=True, passive=passive)
            return True
        except pika.exceptions.ChannelClosedByBroker as e:
            if e.reply_code == 404:
                return False
            raise
    finally:
        if conn.is_open:
            conn.close()


@pytest_twisted.ensureDeferred
async def test_private_rabbit_restarts_on_the_same_port_and_data_then_is_gone(tmp_path):
    """A fault test whose broker restart touched the shared node, lost its data or leaked a node would break others."""
    from twisted.internet import threads

    rabbit = PrivateRabbit(tmp_path / "rabbit")
    async with rabbit:
        assert rabbit.port != 5672 and rabbit.epmd_port != 4369
        await threads.deferToThread(_declare_durable, rabbit.url, "kept")
        await rabbit.stop()
        assert not port_open(rabbit.port)
        took = await rabbit.start()
        print(f"private RabbitMQ start times: {[round(t, 2) for t in rabbit.start_times]} s")
        assert took > 0 and rabbit.start_times[-1] == took
        # the same node name and Mnesia folder: durable queues are still there
        assert await threads.deferToThread(_declare_durable, rabbit.url, "kept", True)
        node_pid, epmd_pid = rabbit.proc.pid, rabbit.epmd.pid
    assert not port_open(rabbit.port) and not port_open(rabbit.epmd_port)
    assert not rabbit.proc.running and not rabbit.epmd.running
    assert (node_pid, epmd_pid) == (rabbit.proc.pid, rabbit.epmd.pid)
    assert port_open(5672)  # the shared node never noticed


@pytest_twisted.ensureDeferred
async def test_private_redis_restart_comes_back_empty_on_the_same_port(tmp_path):
    """A 'Redis lost its data' test that kept the data, or flushed the shared Redis, would prove nothing or break others."""
    async with PrivateRedis(tmp_path / "redis") as redis:
        svc = RedisService(redis.url, timeout=2.0)
        await svc.startService()
        try:
            await svc.execute("SET", "k", "v")
            assert await svc.execute("GET", "k") == "v"
            await redis.restart(down=0.2)
            for _ in range(100):  # txredisapi reconnects by itself
                try:
                    assert await svc.execute("GET", "k") is None
                    break
                except Exception:
                    from tests.support.waiting import sleep
                    await sleep(0.1)
            else:
                raise AssertionError("no answer from the restarted Redis")
        finally:
            await svc.stopService()
    assert not port_open(redis.port)

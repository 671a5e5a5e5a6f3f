"""Fixtures of the registry subsystem (see tests/conftest.py).

``redis_service`` is a started :class:`~imcluster.registry.RedisService` on the
test's own ``redis_prefix``; every key under that prefix is deleted afterwards
(SCAN is fine here, in tests only; never FLUSHALL/FLUSHDB: other runs and a
live cluster may share this Redis).
"""

from __future__ import annotations

import re

import pytest_twisted

from imcluster.registry import RedisService
from tests.support.ids import REDIS_URL
from tests.support.services import Made

#: commands of these tests are all local and small
TEST_TIMEOUT = 3.0


def _glob_escape(text: str) -> str:
    return re.sub(r"([\\*?\[\]])", r"\\\1", text)


async def delete_prefix(svc, prefix: str) -> int:
    """Delete every key under ``prefix`` through ``svc`` (on every shard); returns how many (tests only: SCAN)."""
    if not prefix:
        raise ValueError("refusing to delete every key of a shared Redis")
    nodes = getattr(svc, "nodes", None)
    if nodes is not None and len(nodes) > 1:
        deleted = 0
        for node in nodes:
            deleted += await delete_prefix(node, prefix)
        return deleted
    cursor, deleted = "0", 0
    while True:
        cursor, keys = await svc.execute("SCAN", cursor, "MATCH", _glob_escape(prefix) + "*", "COUNT", 1000)
        if keys:
            deleted += await svc.execute("DEL", *keys)
        if str(cursor) == "0":
            return deleted


@pytest_twisted.async_yield_fixture
async def redis_factory(redis_prefix):
    """``await make(url=..., prefix=..., timeout=..., start=True, **kw)``: more services, all stopped afterwards."""
    made = Made()

    async def make(url: str = REDIS_URL, prefix: str = redis_prefix, timeout: float = TEST_TIMEOUT,
                   start: bool = True, **kw) -> RedisService:
        return await made.add(RedisService(url, prefix=prefix, timeout=timeout, **kw), start)

    yield make
    await made.stop_all()


@pytest_twisted.async_yield_fixture
async def redis_service(redis_factory, redis_prefix):
    """A started RedisService on this test's prefix; its keys are deleted afterwards."""
    svc = await redis_factory()
    yield svc
    # a fresh connection: the test may have broken or stopped its own
    cleaner = await redis_factory()
    await delete_prefix(cleaner, redis_prefix)


@pytest_twisted.async_fixture
async def redis_peer(redis_factory, redis_service):
    """A second started RedisService on the same prefix (another process sharing Redis)."""
    return await redis_factory()


@pytest_twisted.async_yield_fixture
async def sharded_redis(tmp_path):
    """Two private Redis primaries (``--save ''``): ``(url, [PrivateRedis, PrivateRedis])``, the
    ``--redis`` value naming both (client-side sharding); stopped afterwards."""
    from tests.support.private import PrivateRedis

    async with PrivateRedis(tmp_path / "shard-a") as a, PrivateRedis(tmp_path / "shard-b") as b:
        yield f"{a.url},{b.url}", [a, b]


@pytest_twisted.async_yield_fixture
async def sharded_redis_service(redis_factory, redis_prefix, sharded_redis):
    """A started RedisService over :func:`sharded_redis`'s two shards, on this test's prefix."""
    url, _ = sharded_redis
    yield await redis_factory(url)


@pytest_twisted.async_fixture
async def sharded_redis_peer(redis_factory, sharded_redis_service, sharded_redis):
    """A second started RedisService on the same two shards (another process)."""
    return await redis_factory(sharded_redis[0])

"""Unique names per test run, so that runs never share a queue, a key or a table."""

import itertools
import os
import uuid

import pytest

RUN_ID = uuid.uuid4().hex[:8]
_counter = itertools.count(1)

# the local services of ARCHITECTURE.md; a test run may point elsewhere
REDIS_URL = os.environ.get("IMTEST_REDIS", "redis://127.0.0.1:6379/0")
AMQP_URL = os.environ.get("IMTEST_AMQP", "amqp://guest:guest@127.0.0.1:5672/%2F")
POSTGRES_DSN = os.environ.get("IMTEST_POSTGRES", "postgresql://root@127.0.0.1:5432/test")


def unique(prefix: str) -> str:
    return f"{prefix}{RUN_ID}x{next(_counter)}"


@pytest.fixture
def namespace() -> str:
    """A fresh AMQP namespace (queues and exchanges are deleted by the bus fixtures)."""
    return unique("imt")


@pytest.fixture
def redis_prefix() -> str:
    """A fresh Redis key prefix (keys are deleted by the redis fixtures)."""
    return unique("imt:") + ":"

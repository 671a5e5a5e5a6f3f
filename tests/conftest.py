"""Shared fixtures.

Every test run gets its own AMQP namespace, Redis key prefix and PostgreSQL
schema, and removes them afterwards, so the suite can run twice in a row and
beside a running cluster. Subsystem fixtures live in ``tests/support/``.
"""

pytest_plugins = [
    "tests.support.ids",
    "tests.support.bus",
    "tests.support.redis",
    "tests.support.postgres",
    "tests.support.cluster",
    "tests.support.services",
    "tests.support.private",
]

"""The processor's contracts with its roles: what it retries, what it imports, who answers each frame type."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from twisted.internet import defer

from imcluster import bus, interfaces
from imcluster.envelope import MalformedBatch
from imcluster.processor.pipeline import GatewayQueueMissing, is_transient
from imcluster.registry import RegistryUnavailable
from imcluster.store import StoreError, StoreUnavailable

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("error", [
    StoreUnavailable("PostgreSQL down"), RegistryUnavailable("Redis down"), bus.Unavailable("no confirm"),
    bus.Nacked("nack"), bus.ChannelError("closed"), GatewayQueueMissing("gw"), TimeoutError("slow"),
    defer.TimeoutError(),
])
def test_outages_are_retried(error):
    """A dependency's outage would dead-letter the messages caught in it."""
    assert is_transient(error)


@pytest.mark.parametrize("error", [StoreError("no_session", "no"), MalformedBatch("x"), ValueError("bug"), KeyError("k")])
def test_bad_input_and_bugs_are_not_retried_for_ever(error):
    """A bug or a refusal would be retried as if PostgreSQL were down (never dead-lettered)."""
    assert not is_transient(error)


def test_every_roles_unavailable_error_shares_one_base():
    """The pipeline would have to list every driver's exceptions again."""
    for cls in (StoreUnavailable, RegistryUnavailable, bus.PublishError, bus.ChannelError):
        assert issubclass(cls, interfaces.Unavailable), cls


@pytest.mark.parametrize("path", ["imcluster/processor/pipeline.py", "imcluster/api/resources.py",
                                  "imcluster/store/__init__.py", "imcluster/store/base.py"])
def test_callers_of_the_store_import_no_driver(path):
    """A caller would depend on psycopg2 (and break when the store changes its driver)."""
    tree = ast.parse((ROOT / path).read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not {n for n in names if n.split(".")[0] in ("psycopg2", "txpostgres", "txredisapi", "pika")
                or n in ("imcluster.db", "imcluster.store.postgres", "imcluster.processor.store")}, names


def test_every_forwarded_frame_type_has_a_handler():
    """A frame type the gateways forward would reach the processor with nobody to answer it."""
    from imcluster import protocol
    from imcluster.processor.handlers import HANDLERS, Handler

    assert set(HANDLERS) == set(protocol.FORWARDED_TYPES) | set(protocol.API_TYPES)
    assert all(isinstance(h, Handler) and h.type == t for t, h in HANDLERS.items())

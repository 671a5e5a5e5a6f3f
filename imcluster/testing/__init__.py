"""Test doubles of imcluster's roles, part of the public package (like treq.testing).

One module per fake, each implementing the same interface as the real
service and run through the same contract suite (a parametrised fixture,
``fake`` and ``real``):

- :mod:`.bus`: :class:`FakeBroker`, :class:`FakeBus` (``IMessageBus``;
  ``tests/test_contract_bus.py``)
- :mod:`.registry`: :class:`FakeRegistry` (``IRegistry``, ``routes`` included;
  ``tests/test_contract_registry.py``)
- :mod:`.auth`: :class:`FakeAuthenticator` (``IAuthenticator``; the JWT
  suite, ``tests/test_auth.py``)
- :mod:`.store`: :class:`FakeStore` (``IMessageStore``)
- :mod:`.gateway`: :class:`FakeHub`, :class:`FakeConnection` (the engine's two
  sides: ``GatewayService`` and ``ClientConnection``; ``tests/test_contract_gateway.py``)
- :mod:`.wire`: client-side frame helpers and harnesses that drive real gateway protocols
"""

from imcluster.testing.auth import FakeAuthenticator
from imcluster.testing.bus import FakeBroker, FakeBus
from imcluster.testing.gateway import FakeConnection, FakeHub, gateway_config
from imcluster.testing.registry import FakeRedisStore, FakeRegistry
from imcluster.store import StoreUnavailable  # what FakeStore raises: the real one
from imcluster.testing.store import FakeStore
from imcluster.testing.wire import (
    ClientHarness, LenientStringTransport, LoopbackGateway, StreamHarness, TcpFrameReader, WsFrameReader,
    self_signed_cert, tcp_encode, ws_close_frame, ws_frame, ws_handshake,
)

__all__ = [
    "ClientHarness", "FakeAuthenticator", "FakeBroker", "FakeBus", "FakeConnection", "FakeHub",
    "FakeRedisStore", "FakeRegistry", "FakeStore", "LenientStringTransport", "LoopbackGateway",
    "StoreUnavailable", "StreamHarness", "TcpFrameReader", "WsFrameReader", "gateway_config", "self_signed_cert",
    "tcp_encode", "ws_close_frame", "ws_frame", "ws_handshake",
]

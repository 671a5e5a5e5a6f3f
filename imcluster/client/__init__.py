"""A Python client of imcluster on Twisted (PROTOCOL.md), and the terminal chat built on it.

::

    from imcluster.client import Client

    client = Client(["ws://gw1:8080/ws", "tcp://gw2:8081"], token, on_message=handle)
    await client.start()                                  # authenticated
    reply = await client.send("p2p:alice:bob", {"text": "hi"})
    page = await client.history("p2p:alice:bob", limit=20)
    client.read("p2p:alice:bob", reply["seq"])
    await client.stop()

See :class:`imcluster.client.core.Client` for what it guarantees across
reconnects, and :mod:`imcluster.client.testing` for an in-process server.
"""

from typing import Any

# imported on first use: ``imcluster chat --help`` (and every other imcluster command, which
# builds the chat's argument parser) need not load Autobahn
_EXPORTS = {
    "AuthFailed": "core", "Client": "core", "ClientError": "core", "ClientStopped": "core",
    "Disconnected": "core", "SendError": "core", "new_client_msg_id": "core", "p2p_session_id": "core",
    "is_event": "core", "frame_size": "core",
    "BadURL": "links", "connect_link": "links",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'imcluster.client' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f"imcluster.client.{module}"), name)
    globals()[name] = value
    return value

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

from imcluster.client.core import (
    AuthFailed,
    Client,
    ClientError,
    ClientStopped,
    Disconnected,
    SendError,
    new_client_msg_id,
    p2p_session_id,
)
from imcluster.client.links import BadURL, connect_link

__all__ = [
    "AuthFailed", "BadURL", "Client", "ClientError", "ClientStopped", "Disconnected", "SendError",
    "connect_link", "new_client_msg_id", "p2p_session_id",
]

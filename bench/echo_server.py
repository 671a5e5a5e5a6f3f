"""The ceiling: a bare Autobahn WebSocket echo server (no auth, no JSON, no bus).

    .venv/bin/python bench/echo_server.py PORT

bench/run.py pins it to one core (taskset) and drives it with the same
generator as the cluster, so each cluster figure can be read as a fraction of
what Twisted + Autobahn + this generator do at all on this machine.
"""

from __future__ import annotations

import sys

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet import endpoints, reactor


class EchoProtocol(WebSocketServerProtocol):
    """Sends every message back as it came."""

    def onMessage(self, payload, isBinary):  # noqa: N802 (Autobahn API)
        self.sendMessage(payload, isBinary)


def main(port: int) -> None:
    factory = WebSocketServerFactory()
    factory.protocol = EchoProtocol
    endpoints.serverFromString(reactor, f"tcp:{port}:interface=127.0.0.1").listen(factory)
    reactor.run()


if __name__ == "__main__":
    main(int(sys.argv[1]))

"""A loopback TCP forwarder to a real service that a test can cut and restore."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.protocols import portforward


class CuttableProxy:
    """A loopback TCP forwarder to a real service that a test can cut and restore.

    Cut: stop listening (new connections are refused) and abort every
    forwarded connection, as a dependency that went down. Restore: listen on
    the same port again. ``url(real_url)`` rewrites a service URL to go
    through the proxy.
    """

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.factory = portforward.ProxyFactory(host, port)
        self.servers: set = set()
        build = self.factory.buildProtocol

        def build_protocol(addr):
            p = build(addr)
            made, lost = p.connectionMade, p.connectionLost
            p.connectionMade = lambda: (self.servers.add(p), made())[1]
            p.connectionLost = lambda reason: (self.servers.discard(p), lost(reason))[1]
            return p

        self.factory.buildProtocol = build_protocol
        self.listening = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.port = self.listening.getHost().port

    def url(self, real_url: str) -> str:
        """``real_url`` with its ``host:port`` replaced by this proxy's."""
        host, port = self.target
        return real_url.replace(f"{host}:{port}", f"127.0.0.1:{self.port}", 1)

    async def cut(self) -> None:
        await self.listening.stopListening()
        for p in list(self.servers):
            p.transport.abortConnection()

    def restore(self) -> None:
        self.listening = reactor.listenTCP(self.port, self.factory, interface="127.0.0.1")

    async def close(self) -> None:
        if self.listening.connected:
            await self.cut()

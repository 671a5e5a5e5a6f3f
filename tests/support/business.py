"""A fake business server for tests: twisted.web in the test's process, on a free port.

``/moderate`` is the shipped example (:class:`imcluster.contrib.moderation_server.ModerationResource`);
``/hooks`` is :class:`Receiver`, which checks every webhook's signature and
records what it accepted, and can answer late or fail on purpose.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from twisted.internet import endpoints, reactor
from twisted.web import resource, server

from imcluster.contrib.moderation_server import ModerationResource, valid_signature


class Receiver(resource.Resource):
    """Webhook receiver: ``got`` lists the accepted calls ``(event name header, body dict)`` in order.

    ``fail(body, attempt)`` -> an HTTP status to answer instead of 200 (or
    None); ``delay`` seconds before each answer; ``attempts`` counts calls
    per eventId; ``bad_signatures`` counts calls whose signature was wrong.
    """

    isLeaf = True

    def __init__(self, secret: str) -> None:
        super().__init__()
        self.secret = secret.encode()
        self.got: list[tuple[str, dict]] = []
        self.attempts: dict[str, int] = {}
        self.headers: list[dict] = []
        self.bad_signatures = 0
        self.delay = 0.0
        self.fail: Callable[[dict, int], int | None] = lambda body, attempt: None

    def render_POST(self, request: Any) -> Any:  # noqa: N802
        raw = request.content.read()
        if not valid_signature(self.secret, raw, request.getHeader(b"x-imcluster-signature")):
            self.bad_signatures += 1
            request.setResponseCode(401)
            return b"bad signature"
        body = json.loads(raw)
        event_id = body["eventId"]
        self.attempts[event_id] = attempt = self.attempts.get(event_id, 0) + 1
        code = self.fail(body, attempt)
        headers = {k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()}

        def answer() -> None:
            if request._disconnected:
                return
            if code is not None:
                request.setResponseCode(code)
            else:
                self.got.append((headers.get("x-imcluster-event"), body))
                self.headers.append(headers)
            request.write(b"{}")
            request.finish()

        if self.delay:
            reactor.callLater(self.delay, answer)
        else:
            reactor.callLater(0, answer)
        return server.NOT_DONE_YET


class BusinessServer:
    """``/moderate`` and ``/hooks`` on 127.0.0.1:<free port>; ``url(path)``."""

    def __init__(self, secret: str = "s3cret", words=("spam",), action: str = "reject", delay: float = 0.0) -> None:
        self.secret = secret
        self.moderation = ModerationResource(secret, words, action, delay)
        self.hooks = Receiver(secret)
        root = resource.Resource()
        root.putChild(b"moderate", self.moderation)
        root.putChild(b"hooks", self.hooks)
        self.site = server.Site(root)
        self.port: Any = None

    async def start(self) -> "BusinessServer":
        self.port = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(self.site)
        return self

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port.getHost().port}/{path}"

    async def stop(self) -> None:
        if self.port is not None:
            await self.port.stopListening()

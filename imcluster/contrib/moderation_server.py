"""An example moderation service (``moderation_url``): a few lines of ``twisted.web``.

Run it, then point the processors at it::

    python -m imcluster.contrib.moderation_server --listen tcp:8095 --secret s3cret --word spam
    twistd -n improcessor --moderation-url http://127.0.0.1:8095/ --webhook-secret s3cret ...

Each call is a JSON ``POST`` of ``{"sessionId","from","clientMsgId","body"}``
with ``X-Imcluster-Signature: sha256=<hex HMAC-SHA256 of the raw body>``
(checked here when ``--secret`` is given: a bad one is answered 401). It
answers ``{"verdict":"reject","reason":...}`` when the body's ``text``
holds a listed word (``--action replace``: ``{"verdict":"replace","body":...}``
with the word masked), else ``{"verdict":"accept"}``. ``--delay`` makes each
answer wait (to watch ``moderation_timeout`` at work). The tests use
:class:`ModerationResource` in their own process.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import sys
from typing import Any, Iterable

from twisted.web import resource, server


def valid_signature(secret: bytes, body: bytes, header: bytes | None) -> bool:
    """True when ``header`` is ``sha256=<hex HMAC-SHA256 of body with secret>``."""
    expected = b"sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest().encode()
    return header is not None and hmac.compare_digest(expected, header)


class ModerationResource(resource.Resource):
    """Answers moderation calls (module docstring); ``calls`` records each parsed call, ``most`` the peak in flight."""

    isLeaf = True

    def __init__(self, secret: str = "", words: Iterable[str] = (), action: str = "reject",
                 delay: float = 0.0, reactor: Any = None) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.secret = secret.encode()
        self.words = [w.lower() for w in words]
        self.action = action
        self.delay = delay
        self.calls: list[dict] = []
        self.in_flight = 0
        self.most = 0

    def verdict(self, message: dict) -> dict:
        body = message.get("body")
        text = body.get("text") if isinstance(body, dict) else None
        hit = next((w for w in self.words if isinstance(text, str) and w in text.lower()), None)
        if hit is None:
            return {"verdict": "accept"}
        if self.action == "replace":
            masked = text
            for w in self.words:
                start = masked.lower().find(w)
                while start >= 0:
                    masked = masked[:start] + "*" * len(w) + masked[start + len(w):]
                    start = masked.lower().find(w)
            return {"verdict": "replace", "body": {**body, "text": masked}}
        return {"verdict": "reject", "reason": f"{hit!r} is not allowed here"}

    def render_POST(self, request: Any) -> Any:  # noqa: N802 (twisted.web API)
        raw = request.content.read()
        request.setHeader(b"content-type", b"application/json")
        if self.secret and not valid_signature(self.secret, raw, request.getHeader(b"x-imcluster-signature")):
            request.setResponseCode(401)
            return b'{"error":"bad signature"}'
        try:
            message = json.loads(raw)
        except ValueError:
            request.setResponseCode(400)
            return b'{"error":"not JSON"}'
        self.calls.append(message)
        answer = json.dumps(self.verdict(message)).encode()
        if not self.delay:
            return answer
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)

        def finish() -> None:
            self.in_flight -= 1
            if not request._disconnected:
                request.write(answer)
                request.finish()

        self.reactor.callLater(self.delay, finish)
        return server.NOT_DONE_YET


def main(argv: list[str] | None = None) -> None:
    from twisted.internet import endpoints, reactor
    from twisted.logger import Logger, globalLogBeginner, textFileLogObserver

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="tcp:8095:interface=127.0.0.1", help="Twisted endpoint string")
    parser.add_argument("--secret", default="", help="webhook_secret of the cluster (checks signatures)")
    parser.add_argument("--word", action="append", default=[], help="a word that is not allowed (repeat)")
    parser.add_argument("--action", choices=("reject", "replace"), default="reject")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds each answer waits")
    args = parser.parse_args(argv)
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    log = Logger(namespace="moderation_server")
    site = server.Site(ModerationResource(args.secret, args.word, args.action, args.delay))
    d = endpoints.serverFromString(reactor, args.listen).listen(site)
    d.addCallback(lambda port: log.info("moderation server listening on {addr}", addr=port.getHost()))
    d.addErrback(lambda f: (log.failure("cannot listen", f), reactor.stop()))
    reactor.run()


if __name__ == "__main__":
    main()

"""The HTTP call of one push request: a signed JSON ``POST`` to ``push_url``.

HTTP-API.md "Calls the cluster makes to business servers": the body is the
request's JSON, ``X-Imcluster-Signature: sha256=<hex HMAC-SHA256 of the raw
body with webhook_secret>`` and ``X-Imcluster-Event: push``.

What the answer means (docs/operations.rst "Offline push"; README):

2xx
    delivered to the provider. A JSON body ``{"invalid":[deviceId, ...]}``
    names devices the provider refused (FCM ``UNREGISTERED``, APNs 410):
    they are removed; the others were pushed.
404 or 410
    every device of the request is gone: all are removed, nothing is retried.
408, 429, 5xx, a timeout, no connection
    failed: retried with backoff until ``push_retry`` passes, then
    dead-lettered.
any other 4xx
    refused: a retry cannot cure it (a bad signature, a body the relay
    cannot read); dead-lettered at once.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from imcluster import envelope

#: the most of an answer read (a provider's {"invalid":[...]} is small)
MAX_ANSWER = 1 << 20

OK, INVALID, FAILED, REFUSED = "ok", "invalid", "failed", "refused"


def signature(body: bytes, secret: str | None) -> str:
    """``sha256=<hex HMAC-SHA256 of body with secret>`` (an empty key when no secret is set)."""
    return envelope.sign(secret or "", body)


@dataclass
class Outcome:
    """What a call came to: ``result`` (ok, invalid, failed, refused), the devices to remove, why."""

    result: str
    invalid: list[str] = field(default_factory=list)
    why: str = ""
    status: int | None = None


@implementer(IBodyProducer)
class _Body:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.length = len(data)

    def startProducing(self, consumer: Any) -> defer.Deferred:  # noqa: N802 (Twisted API)
        consumer.write(self.data)
        return defer.succeed(None)

    def pauseProducing(self) -> None:  # noqa: N802
        pass

    def stopProducing(self) -> None:  # noqa: N802
        pass


def judge(status: int, answer: bytes, device_ids: list[str]) -> Outcome:
    """The :class:`Outcome` of an HTTP answer (module docstring)."""
    if 200 <= status < 300:
        invalid: list[str] = []
        try:
            doc = json.loads(answer) if answer.strip() else None
        except ValueError:
            doc = None
        if isinstance(doc, dict) and isinstance(doc.get("invalid"), list):
            invalid = [d for d in doc["invalid"] if isinstance(d, str) and d in device_ids]
        return Outcome(INVALID if invalid else OK, invalid, status=status)
    if status in (404, 410):
        return Outcome(INVALID, list(device_ids), f"HTTP {status}", status)
    if status in (408, 429) or status >= 500:
        return Outcome(FAILED, why=f"HTTP {status}", status=status)
    return Outcome(REFUSED, why=f"HTTP {status}: {answer[:200].decode('utf-8', 'replace')}", status=status)


class PushClient:
    """POSTs push requests to ``url``, at most ``timeout`` seconds each, over a persistent pool."""

    def __init__(self, url: str, secret: str | None, timeout: float, concurrency: int,
                 reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.url = url.encode("utf-8")
        self.secret = secret
        self.timeout = timeout
        self.reactor = reactor
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = concurrency
        self.pool._factory.noisy = False
        self.agent = Agent(reactor, connectTimeout=timeout, pool=self.pool)

    async def post(self, request: dict) -> tuple[Outcome, float]:
        """Send one push request; ``(outcome, seconds)`` (never raises for a network failure)."""
        body = json.dumps(request, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        headers = Headers({b"content-type": [b"application/json"], b"user-agent": [b"imcluster-impush"],
                           b"x-imcluster-event": [b"push"],
                           b"x-imcluster-signature": [signature(body, self.secret).encode("ascii")]})
        device_ids = [d["deviceId"] for d in request.get("devices", [])]
        started = time.monotonic()
        try:
            d = self.agent.request(b"POST", self.url, headers, _Body(body))
            d.addTimeout(self.timeout, self.reactor)
            response = await d
            read = readBody(response)
            read.addTimeout(self.timeout, self.reactor)
            answer = await read
        except defer.TimeoutError:
            return Outcome(FAILED, why=f"no answer within {self.timeout:g}s"), time.monotonic() - started
        except Exception as e:  # connection refused, reset, DNS...
            return Outcome(FAILED, why=f"{type(e).__name__}: {e}"[:300]), time.monotonic() - started
        return judge(response.code, answer[:MAX_ANSWER], device_ids), time.monotonic() - started

    def close(self) -> defer.Deferred:
        return self.pool.closeCachedConnections()

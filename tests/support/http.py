"""A tiny HTTP client for tests of imapi and the ``--metrics`` endpoints (twisted.web's Agent).

::

    r = await http_call(port, "POST", "/v1/sessions", {"members": ["bob"]}, token=t)
    assert r.status == 201 and r.json["members"] == ["alice", "bob"]
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

#: seconds a test request may take before the test fails
HTTP_TIMEOUT = 15.0


@dataclass
class Response:
    status: int
    headers: Headers
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None

    @property
    def error_code(self) -> str | None:
        """``error.code`` of a JSON error body (asserts the HTTP-API.md shape)."""
        doc = self.json
        assert set(doc) == {"error"} and set(doc["error"]) == {"code", "message"}, doc
        assert isinstance(doc["error"]["message"], str) and doc["error"]["message"]
        return doc["error"]["code"]


class _ChunkedProducer:
    """A body of unknown length (sent with chunked transfer encoding)."""

    length = UNKNOWN_LENGTH

    def __init__(self, data: bytes, chunk: int = 1024) -> None:
        self.data = data
        self.chunk = chunk

    def startProducing(self, consumer):  # noqa: N802 (Twisted API)
        for i in range(0, len(self.data), self.chunk):
            consumer.write(self.data[i:i + self.chunk])
        return defer.succeed(None)

    def pauseProducing(self):  # noqa: N802
        pass

    def resumeProducing(self):  # noqa: N802
        pass

    def stopProducing(self):  # noqa: N802
        pass


async def http_call(port: int, method: str, path: str, body: Any = None, token: str | None = None,
                    raw: bytes | None = None, chunked: bool = False, headers: dict[str, str] | None = None,
                    host: str = "127.0.0.1") -> Response:
    """One request to ``http://host:port/path``; ``body`` is sent as JSON, ``raw`` as is."""
    agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
    h = Headers()
    if token is not None:
        h.addRawHeader(b"authorization", f"Bearer {token}".encode())
    for name, value in (headers or {}).items():
        h.addRawHeader(name.encode(), value.encode())
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    producer = None
    if data is not None:
        h.addRawHeader(b"content-type", b"application/json")
        producer = _ChunkedProducer(data) if chunked else FileBodyProducer(io.BytesIO(data))
    d = agent.request(method.encode(), f"http://{host}:{port}{path}".encode(), h, producer)
    d.addTimeout(HTTP_TIMEOUT, reactor)
    response = await d
    content = await _read_body(response).addTimeout(HTTP_TIMEOUT, reactor)
    return Response(response.code, response.headers, content)


class _Collector(protocol.Protocol):
    def __init__(self, done: defer.Deferred) -> None:
        self.done = done
        self.parts: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted API)
        self.parts.append(data)

    def connectionLost(self, reason=protocol.connectionDone) -> None:  # noqa: N802
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(reason)


def _read_body(response) -> defer.Deferred:
    done: defer.Deferred = defer.Deferred()
    response.deliverBody(_Collector(done))
    return done


def metric_value(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    """The value of one sample in a Prometheus text exposition (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    want = labels or {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in want.items()):
                return sample.value
    return 0.0

"""Helpers for tests of imapi: the real processor, in this process.

:class:`InProcessProcessor` is the very :class:`ProcessorService` that
``twistd improcessor`` runs (pipeline, store, replies, routing), consuming
the test's namespace on the real RabbitMQ and storing with the real
:class:`~imcluster.store.postgres.MessageStore`, with a moderation filter
that rejects :data:`BAD_WORD`. Only the presence registry is a
:class:`~imcluster.testing.FakeRegistry` (no gateway is involved: imapi's
replies go to its own queue whatever Redis says). The API's side is thus
answered exactly as in production, whatever state other processors are in;
the end-to-end tests run the real ``improcessor`` daemon.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer

from imcluster.config import PROCESSOR, load_config
from imcluster.processor.filters import KeywordFilter
from imcluster.processor.service import ProcessorService
from imcluster.testing import FakeRegistry

#: the processor's moderation rejects message bodies containing this
BAD_WORD = "forbidden-word"


class _RecordingBus:
    """The bus, recording every item of the queue messages the processor consumes."""

    def __init__(self, bus: Any, items: list[dict]) -> None:
        self._bus = bus
        self._items = items

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bus, name)

    def consume(self, queue: Any, callback: Any, **kw: Any) -> defer.Deferred:
        def recording(message: Any) -> Any:
            try:
                self._items.extend(json.loads(message.body)["items"])
            except (ValueError, KeyError, TypeError):
                pass  # the processor dead-letters it; nothing to record
            return callback(message)

        return self._bus.consume(queue, recording, **kw)


class InProcessProcessor:
    """The real processor on ``bus`` (AMQPService) and ``store`` (MessageStore); records what it consumed.

    ``items`` lists every item imapi published, in order, so tests can check
    what imapi sent.
    """

    def __init__(self, bus: Any, store: Any, **config: Any) -> None:
        self.items: list[dict] = []
        values = {"namespace": bus.namespace, "batch_wait": 0.005}
        values.update(config)
        self.service = ProcessorService(load_config(PROCESSOR, values, environ={}),
                                        _RecordingBus(bus, self.items), FakeRegistry(), store,
                                        [KeywordFilter([BAD_WORD])])

    async def start(self, parent: Any = None) -> None:
        """Start consuming (as a child of the running service ``parent``, stopped with it); fires once active."""
        if parent is not None:
            self.service.setServiceParent(parent)  # a running parent starts it
        if not self.service.running:
            self.service.startService()
        await self.service.ready

    async def stop(self) -> None:
        """Finish the windows in flight and stop consuming (unacknowledged messages go back)."""
        if self.service.running:
            await self.service.stopService()

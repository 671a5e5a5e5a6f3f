"""Helpers for tests of imapi: a stand-in for the processors.

:class:`StandInProcessor` answers the ``message`` items imapi publishes as
the processors do (moderation by one word, store with the real
:class:`~imcluster.store.postgres.MessageStore`, ``message_reply`` to the
item's connection) and nothing more: no routing to gateways. It lets the
API's side be tested on the real RabbitMQ and PostgreSQL whatever state the
processors are in; the end-to-end tests run the real ``improcessor``.
"""

from __future__ import annotations

import json

from twisted.internet import defer

from imcluster.api.publisher import is_api_conn_id
from imcluster.bus import AMQPService
from imcluster.store import Incoming
from imcluster.store.postgres import MessageStore
from imcluster.protocol import message_reply_error

#: the stand-in rejects message bodies containing this (as moderation would)
BAD_WORD = "forbidden-word"


class StandInProcessor:
    """Answers imapi's ``message`` items as the processors do (store, then ``message_reply``), nothing more.

    Records every item so tests can check what imapi sent. ``trusted`` is
    honoured only on API connIds, as docs/internals.rst tells processors.
    """

    def __init__(self, bus: AMQPService, store: MessageStore) -> None:
        self.bus = bus
        self.store = store
        self.items: list[dict] = []

    def start(self) -> defer.Deferred:
        return self.bus.consume(self.bus.processor_queue(), self._on_message, prefetch=50)

    def _on_message(self, message) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(self._handle(message))

    async def _handle(self, message) -> None:
        for item in json.loads(message.body)["items"]:
            self.items.append(item)
            frame = item["frame"]
            if BAD_WORD in json.dumps(frame["body"]):
                reply = message_reply_error(frame["clientMsgId"], "rejected", "the message contains a forbidden word")
            else:
                trusted = item.get("trusted") is True and is_api_conn_id(item["connId"])
                [r] = await self.store.store_messages([Incoming(
                    item["userId"], frame["clientMsgId"], frame["sessionId"], frame["body"],
                    ts_ms=item["ts"], trusted=trusted)])
                if r.ok:
                    reply = {"type": "message_reply", "ok": True, "clientMsgId": r.client_msg_id,
                             "msgId": r.msg_id, "sessionId": r.session_id, "seq": r.seq, "ts": r.ts_ms}
                else:
                    reply = message_reply_error(r.client_msg_id, r.code, r.message)
            batch = {"v": 1, "items": [{"connIds": [item["connId"]], "frames": [reply]}]}
            await self.bus.publish(self.bus.gateway_key(item["serverId"]), json.dumps(batch).encode(),
                                   mandatory=True)
        message.ack()

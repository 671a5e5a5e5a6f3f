"""One handler per frame type the processors answer, in a table keyed by frame type.

The :class:`~imcluster.processor.pipeline.Pipeline` runs a window's stages
by asking the handlers of the types present (``base.Handler`` lists the
hooks), in the order of :data:`HANDLERS`: that order is the order of each
stage's work (deliveries before read receipts). Adding a frame type is a
validator in ``imcluster/protocol.py`` and a module here
(docs/internals.rst "How to add a frame type").

``sync`` is not a frame of a window: a sync request (after ``auth``, or a
gateway's re-sync) is paged by its own handler, the
:class:`~imcluster.processor.handlers.sync.Syncer` (``sync.py``), which the
service runs beside the windows; :data:`ITEM_HANDLERS` names it.
"""

from __future__ import annotations

from imcluster.processor.handlers.ack import AckHandler
from imcluster.processor.handlers.base import Handler
from imcluster.processor.handlers.history import HistoryHandler
from imcluster.processor.handlers.message import MessageHandler
from imcluster.processor.handlers.read import ReadHandler
from imcluster.processor.handlers.session_create import SessionCreateHandler
from imcluster.processor.handlers.sync import Syncer
from imcluster.processor.handlers.recall import RecallHandler
from imcluster.processor.handlers.edit import EditHandler
from imcluster.processor.handlers.members import MembersHandler
from imcluster.processor.handlers.typing import TypingHandler

#: frame type -> its handler, in stage order
HANDLERS: dict[str, Handler] = {h.type: h for h in (
    MessageHandler(), AckHandler(), HistoryHandler(), ReadHandler(), SessionCreateHandler(),
    # 1.1 events: stored after the window's messages, delivered after them (events.py)
    RecallHandler(), EditHandler(), MembersHandler(),
    TypingHandler(),
)}

#: item kinds that are not frames of a window -> the class that answers them
ITEM_HANDLERS: dict[str, type] = {"sync": Syncer}

__all__ = ["HANDLERS", "ITEM_HANDLERS", "Syncer", "AckHandler", "Handler", "HistoryHandler", "MessageHandler", "ReadHandler",
           "SessionCreateHandler", "RecallHandler", "EditHandler", "MembersHandler", "TypingHandler"]

"""What a frame type's handler is: its part in each stage of a window (``Pipeline``).

A :class:`Handler` is stateless (one instance serves every window); what a
window remembers between stages and across a retry lives in the
:class:`~imcluster.processor.pipeline.Window` (``stored``, ``answers``,
``verdicts``, ``online``...). Each hook receives the pipeline (``p``: its
``store``, ``router``, ``filters``, ``clock``, ``config``), the window and
the window's items of the handler's type, in window order. Every hook has a
do-nothing default; a handler overrides the stages it takes part in:

``prepare``
    before anything is stored (moderation of messages);
``store``
    the window's ordered write, in its lock turn (messages: seq numbers);
``apply``
    work the window waits for before it is done, but its replies and
    deliveries do not (acknowledgements);
``query``
    one store call per item, at most ``postgres_pool_size`` at once; its
    result (or :class:`~imcluster.store.StoreError`) is kept in
    ``window.answers`` for ``reply`` and ``route``;
``users``
    whom the outbox must look up in the registry (one round trip for all);
``reply``
    the frame that answers one item (None: no reply);
``route``
    deliveries and receipts, after every reply, in table order;
``unmarked``
    the ``(user, msgId)`` pairs routed that still need ``mark_sending``;
``observe``
    metrics, once the window is published.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

from twisted.internet import defer

from imcluster import protocol

if TYPE_CHECKING:  # the pipeline imports the handlers, not the other way round
    from imcluster.processor.pipeline import Item, Pipeline, Window, _Turn
    from imcluster.processor.router import Lookup, Outbox


class Handler:
    """One frame type's part in a window (module docstring); every hook does nothing by default."""

    #: the frame type (``protocol.MESSAGE``...) this handler answers
    type: str = ""
    #: True when ``store`` must run in the window's lock turn
    ordered = False
    #: True when ``query`` answers the items (one store call each)
    queries = False

    async def prepare(self, p: "Pipeline", w: "Window", items: list["Item"]) -> None:
        """Before the store stage."""

    async def store(self, p: "Pipeline", w: "Window", items: list["Item"], locked: "_Turn") -> None:
        """The ordered write; ``locked.done()`` as soon as the store holds its locks."""

    async def apply(self, p: "Pipeline", w: "Window", items: list["Item"]) -> None:
        """Work the window waits for, beside the store, the queries and the routing."""

    def query(self, p: "Pipeline", item: "Item") -> defer.Deferred:
        """The store call that answers ``item`` (only when ``queries``)."""
        raise NotImplementedError

    def users(self, p: "Pipeline", w: "Window", items: list["Item"]) -> Iterable[str]:
        """Users whose connections the outbox needs."""
        return ()

    def reply(self, p: "Pipeline", w: "Window", item: "Item") -> dict | None:
        """The frame answering ``item`` (None: none)."""
        return None

    def route(self, p: "Pipeline", w: "Window", items: list["Item"], outbox: "Outbox", lookup: "Lookup") -> None:
        """Add deliveries and receipts to ``outbox`` (after every reply)."""

    def unmarked(self, w: "Window", pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """``pairs`` routed, minus the rows already ``sending``."""
        return pairs

    def observe(self, p: "Pipeline", w: "Window", items: list["Item"]) -> None:
        """Record metrics once the window is published."""


#: store codes that PROTOCOL.md does not have
_CODE_MAP = {"bad_request": protocol.BAD_FRAME}


def client_code(code: str) -> str:
    """A :class:`~imcluster.store.StoreError` code as a PROTOCOL.md error code."""
    return _CODE_MAP.get(code, code)


async def gather(ds: list[defer.Deferred]) -> list:
    """Wait for every Deferred; raise the first failure only once all have settled."""
    results = await defer.DeferredList(ds, consumeErrors=True)
    for ok, value in results:
        if not ok:
            value.raiseException()
    return [value for _, value in results]


def answer(w: "Window", item: "Item") -> tuple[str, Any]:
    """``("ok", result)`` or ``("error", StoreError)`` of a queried item."""
    return w.answers[id(item)]

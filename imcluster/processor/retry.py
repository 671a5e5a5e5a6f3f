"""What the processor retries and how: transient failures (a dependency down) and backoff.

A failure is *transient* when a dependency (PostgreSQL, Redis, RabbitMQ) is
down or slow: the work is retried with backoff. Anything else is
*unexplained*, possibly poison (ARCHITECTURE.md "Failure rules"); the
service isolates and dead-letters it (``service.py``).
"""

from __future__ import annotations

import random
from typing import Sequence

from twisted.internet import defer, error as ierror
from twisted.python.failure import Failure

from imcluster.interfaces import Unavailable


class GatewayQueueMissing(Unavailable):
    """A live gateway's queue is not there (a broker restart): it declares it again soon."""


#: failures that say a dependency (PostgreSQL, Redis, RabbitMQ) is down or slow:
#: the work is retried with backoff, never dead-lettered. Each role says so with
#: its own subclass of ``interfaces.Unavailable`` (the store's StoreUnavailable,
#: the registry's RegistryUnavailable, the bus' PublishError and ChannelError);
#: the rest are timeouts and Twisted's own connection errors
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    Unavailable, TimeoutError, defer.TimeoutError, defer.CancelledError,
    ierror.ConnectError, ierror.ConnectionLost, ierror.ConnectionDone,
)


def is_transient(failure: Failure | BaseException, extra: Sequence[type] = ()) -> bool:
    """True when ``failure`` means a dependency is unavailable (retry), not a bad input (poison)."""
    exc = failure.value if isinstance(failure, Failure) else failure
    return isinstance(exc, TRANSIENT_ERRORS) or (bool(extra) and isinstance(exc, tuple(extra)))


def backoff(attempt: int, first: float, most: float) -> float:
    """Exponential delay for retry ``attempt`` (1, 2, ...): ``first`` doubling up to ``most``, jittered."""
    delay = min(most, first * 2 ** min(max(attempt - 1, 0), 30))
    return delay * (0.8 + random.random() * 0.4)


class Abandoned(Exception):
    """The service is stopping: the work is left for redelivery."""

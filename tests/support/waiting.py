"""Waiting in tests without blocking the reactor."""

from __future__ import annotations

import time
from typing import Any, Callable

from twisted.internet import defer, reactor, task


async def sleep(seconds: float) -> None:
    """Let the reactor run for ``seconds``."""
    await task.deferLater(reactor, seconds, lambda: None)


async def eventually(check: Callable[[], Any], timeout: float = 10.0, what: str = "condition",
                     step: float = 0.02) -> Any:
    """Poll ``check()`` (which may return a Deferred) until truthy and return its value.

    Fails the test after ``timeout`` seconds, naming ``what`` and the last value.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = await defer.maybeDeferred(check)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s (last: {value!r})")
        await sleep(step)

"""What service fixtures share: start what a test asks for, stop all of it afterwards."""

from __future__ import annotations

from typing import Any

import pytest_twisted


class Made:
    """Services a fixture made, stopped in reverse order at teardown (only those still running)."""

    def __init__(self) -> None:
        self.services: list[Any] = []

    async def add(self, svc: Any, start: bool = True) -> Any:
        self.services.append(svc)
        if start:
            await svc.startService()
        return svc

    async def stop_all(self) -> None:
        for svc in reversed(self.services):
            if svc.running:
                await svc.stopService()

    def __iter__(self):
        return iter(self.services)


@pytest_twisted.async_yield_fixture
async def gateways():
    """``make(**config)``: a :class:`~imcluster.testing.LoopbackGateway` (FakeHub behind the real adapters), stopped afterwards."""
    from imcluster.testing import LoopbackGateway

    made = []

    def make(**config):
        gw = LoopbackGateway(**config)
        made.append(gw)
        return gw

    yield make
    for gw in made:
        await gw.stop()

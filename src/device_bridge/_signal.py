"""A re-armable wake-up for trio tasks."""

from __future__ import annotations

import trio

__all__ = ["Signal"]


class Signal:
    """`fire()` wakes every task waiting in `wait()` now; later waiters wait for the next fire.

    A task that checks its condition and then waits does so without a checkpoint in
    between, so it cannot miss a fire (trio is cooperative).
    """

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = trio.Event()

    def fire(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def wait(self) -> None:
        await self._event.wait()

"""Writes that do not complete, found by one task instead of a cancel scope per write.

A bridge writes each VM's update at every period start (1,201 writes for a 1,200-peer
hub's TVD); a VM that takes nothing must not hold its worker for ever, and the others
must not pay a cancel scope each for that. A worker files a write when it starts and
takes it back when it completes; the watchdog task sleeps until the oldest one's time is
up and calls the `stuck` callback of every write older than the timeout.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable

import trio

from ._signal import Signal

__all__ = ["WriteWatchdog"]


class WriteWatchdog:
    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        # Filed in the order they started (a dict keeps insertion order): the first is
        # the oldest.
        self._writes: dict[Hashable, tuple[float, Callable[[], None]]] = {}
        self._new_oldest = Signal()

    def __len__(self) -> int:
        return len(self._writes)

    def started(self, key: Hashable, stuck: Callable[[], None]) -> None:
        """A write of `key`'s began; `stuck` is called if it is still on after the timeout."""
        self._writes.pop(key, None)
        if not self._writes:
            self._new_oldest.fire()
        self._writes[key] = (trio.current_time(), stuck)

    def done(self, key: Hashable) -> None:
        self._writes.pop(key, None)

    async def run(self) -> None:
        while True:
            oldest = next(iter(self._writes.values()), None)
            when = oldest[0] + self.timeout if oldest is not None else math.inf
            with trio.move_on_at(when):
                await self._new_oldest.wait()
                continue
            now = trio.current_time()
            for key, (began, stuck) in list(self._writes.items()):
                if now < began + self.timeout:
                    break
                del self._writes[key]
                stuck()

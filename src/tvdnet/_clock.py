"""Unix time read through trio's clock, so that `trio.testing.MockClock` drives it in tests."""

from __future__ import annotations

import time
from time import perf_counter

import trio

__all__ = ["WallClock"]


class WallClock:
    """Schedules are in Unix seconds; trio sleeps in its own clock's seconds.

    `now()` is `offset + trio.current_time()`: with the real clock that is the wall
    time (the offset is measured once, at first use, inside a trio run); with a
    MockClock and a fixed `offset`, a test decides what the time is and `autojump`
    moves it.

    With the real clock, trio's time is its clock's fixed offset plus
    `time.perf_counter()`, and `now()` reads that directly: one C call instead of five
    Python calls through trio, on every message's path (`Node.send`).
    """

    __slots__ = ("_base", "_offset")

    def __init__(self, offset: float | None = None) -> None:
        self._offset = offset
        self._base: float | None = None  # wall time minus perf_counter() (the real clock)

    @property
    def offset(self) -> float:
        if self._offset is None:
            self._offset = time.time() - trio.current_time()
            # trio's SystemClock: current_time() is `clock.offset + perf_counter()`.
            clock_offset = getattr(trio.lowlevel.current_clock(), "offset", None)
            if type(clock_offset) is float:
                base = self._offset + clock_offset
                if abs(base + perf_counter() - (self._offset + trio.current_time())) < 1e-3:
                    self._base = base
        return self._offset

    def now(self) -> float:
        base = self._base
        if base is not None:
            return base + perf_counter()
        return self.offset + trio.current_time()

    def trio_time(self, wall: float) -> float:
        """The trio clock reading at which the wall clock shows `wall`."""
        return wall - self.offset

    async def sleep_until(self, wall: float) -> None:
        await trio.sleep_until(self.trio_time(wall))

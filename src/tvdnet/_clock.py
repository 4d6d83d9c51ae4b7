"""Unix time read through trio's clock, so that `trio.testing.MockClock` drives it in tests."""

from __future__ import annotations

import time

import trio

__all__ = ["WallClock"]


class WallClock:
    """Schedules are in Unix seconds; trio sleeps in its own clock's seconds.

    `now()` is `offset + trio.current_time()`: with the real clock that is the wall
    time (the offset is measured once, at first use, inside a trio run); with a
    MockClock and a fixed `offset`, a test decides what the time is and `autojump`
    moves it. `now()` and `trio_time()` convert through the same offset, so a timer set
    for a wall time finds that time come when it fires.
    """

    __slots__ = ("_offset",)

    def __init__(self, offset: float | None = None) -> None:
        self._offset = offset

    @property
    def offset(self) -> float:
        if self._offset is None:
            self._offset = time.time() - trio.current_time()
        return self._offset

    def now(self) -> float:
        offset = self._offset  # not through the property: every send() comes here
        if offset is None:
            offset = self.offset
        return offset + trio.current_time()

    def trio_time(self, wall: float) -> float:
        """The trio clock reading at which the wall clock shows `wall`."""
        return wall - self.offset

    async def sleep_until(self, wall: float) -> None:
        await trio.sleep_until(self.trio_time(wall))

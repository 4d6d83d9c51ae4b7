"""WallClock: Unix time through trio's clock, under the real clock and a MockClock."""

from __future__ import annotations

import time

import trio
import trio.testing

from tvdnet import WallClock


def test_the_real_clock_reads_the_wall_time_as_trio_does() -> None:
    async def main() -> tuple[float, float, float, float]:
        clock = WallClock()
        first = clock.now()  # measures the offset at first use
        await trio.sleep(0.01)
        return first, clock.now(), clock.offset + trio.current_time(), time.time()

    first, now, through_trio, wall = trio.run(main)
    assert abs(now - through_trio) < 0.005
    assert abs(now - wall) < 0.5
    assert now >= first + 0.01


def test_a_mock_clock_decides_the_time() -> None:
    async def main() -> tuple[float, float]:
        clock = WallClock(offset=1_000.0)
        before = clock.now()
        await trio.sleep(5)
        return before, clock.now()

    assert trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0)) == (1_000.0, 1_005.0)


def test_without_an_offset_a_mock_clock_is_still_followed() -> None:
    async def main() -> float:
        clock = WallClock()
        before = clock.now()
        await trio.sleep(60)
        return clock.now() - before

    elapsed = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert abs(elapsed - 60.0) < 1e-6

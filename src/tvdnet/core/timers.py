"""Named deadlines for sans-I/O state machines: set, cancel, and collect the due ones.

A deadline may move often (a keepalive after every frame sent); moving it later costs
nothing, because the heap keeps the earlier entry and, once that entry reaches the top,
the key is filed again at its newer time. Only a deadline moved earlier pushes a new
entry. `next()` files again what it finds moved at the top, so that the time it names
is a real deadline: a driver that sleeps until then is not woken for nothing.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Hashable


class Timers:
    __slots__ = ("_counter", "_heap", "_scheduled", "_when")

    def __init__(self) -> None:
        self._when: dict[Hashable, float] = {}  # the true deadline of each key
        self._scheduled: dict[Hashable, float] = {}  # the heap entry of each key
        self._heap: list[tuple[float, int, Hashable]] = []
        self._counter = itertools.count()

    def __len__(self) -> int:
        return len(self._when)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._when

    def get(self, key: Hashable) -> float | None:
        return self._when.get(key)

    def set(self, key: Hashable, when: float) -> None:
        self._when[key] = when
        scheduled = self._scheduled.get(key)
        if scheduled is None or when < scheduled:
            self._scheduled[key] = when
            heapq.heappush(self._heap, (when, next(self._counter), key))

    def set_earliest(self, key: Hashable, when: float) -> None:
        """Set the deadline unless it is already due earlier."""
        current = self._when.get(key)
        if current is None or when < current:
            self.set(key, when)

    def cancel(self, key: Hashable) -> None:
        self._when.pop(key, None)

    def next(self) -> float:
        """The earliest deadline; inf if none."""
        top = self._top()
        return math.inf if top is None else top[0]

    def pop_due(self, now: float) -> list[Hashable]:
        """Remove and return every key whose deadline is <= now, earliest first."""
        due: list[Hashable] = []
        while (top := self._top()) is not None and top[0] <= now:
            heapq.heappop(self._heap)
            key = top[1]
            del self._scheduled[key]
            del self._when[key]
            due.append(key)
        return due

    def _top(self) -> tuple[float, Hashable] | None:
        """The earliest real entry of the heap, left at its top: entries superseded or
        cancelled are dropped on the way, and one whose deadline moved later is filed
        again at its real time."""
        heap = self._heap
        while heap:
            when, _, key = heap[0]
            if self._scheduled.get(key) != when:
                heapq.heappop(heap)  # superseded by an earlier entry
                continue
            true_when = self._when.get(key)
            if true_when is None:
                heapq.heappop(heap)  # cancelled
                del self._scheduled[key]
            elif true_when > when:
                self._scheduled[key] = true_when
                heapq.heapreplace(heap, (true_when, next(self._counter), key))
            else:
                return when, key
        return None

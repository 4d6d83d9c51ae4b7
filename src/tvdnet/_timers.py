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
                # Moved later since it was filed: file it again at its real time.
                self._scheduled[key] = true_when
                heapq.heapreplace(heap, (true_when, next(self._counter), key))
            else:
                return when
        return math.inf

    def pop_due(self, now: float) -> list[Hashable]:
        """Remove and return every key whose deadline is <= now, earliest first."""
        due: list[Hashable] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            when, _, key = heapq.heappop(heap)
            if self._scheduled.get(key) != when:
                continue  # superseded by an earlier entry
            del self._scheduled[key]
            true_when = self._when.get(key)
            if true_when is None:
                continue  # cancelled
            if true_when > now:
                self._scheduled[key] = true_when
                heapq.heappush(heap, (true_when, next(self._counter), key))
                continue
            del self._when[key]
            due.append(key)
        return due

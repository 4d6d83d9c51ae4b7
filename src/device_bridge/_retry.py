"""The bridge's retry and back-off rules, sans-I/O: no trio, no clock, unit-tested alone.

The trio workers only sleep until the times these name and report what happened:

- `Backoff`: waits that double after each failure up to a cap and start over after a
  success (re-opening a port, re-listening, restarting a crashed worker, re-writing the
  keystore). Never zero, so a failure that repeats at once is never a busy loop.
- `SwapPlan`: approach I (SPEC §5), which image goes into a VM's CD-ROM drive and when: the
  newest period's update, retried after a failed swap (1 s, backing off) until its period
  ends, at once when a newer update supersedes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .constants import CHANNEL_RESEND_INITIAL, CHANNEL_RESEND_MAX

__all__ = ["Backoff", "PlannedSwap", "SwapPlan"]


class Backoff:
    """Doubling waits from `initial` up to `maximum`; `succeeded()` starts over."""

    __slots__ = ("_delay", "initial", "maximum")

    def __init__(self, initial: float, maximum: float) -> None:
        if not 0 < initial <= maximum:
            raise ValueError(f"a back-off needs 0 < initial <= maximum (got {initial}, {maximum})")
        self.initial = initial
        self.maximum = maximum
        self._delay = initial

    def __repr__(self) -> str:
        return f"<Backoff next={self._delay:g} s of {self.initial:g}..{self.maximum:g}>"

    @property
    def delay(self) -> float:
        """How long the next failure makes the caller wait."""
        return self._delay

    def failed(self) -> float:
        """A failure: the seconds to wait before the next attempt (then the wait doubles)."""
        delay = self._delay
        self._delay = min(delay * 2, self.maximum)
        return delay

    def succeeded(self) -> None:
        self._delay = self.initial


@dataclass(frozen=True, slots=True)
class PlannedSwap:
    """An update to put into the drive: period `t`, the encoded `update` message."""

    t: int
    update: bytes


class SwapPlan:
    """Approach I for one VM: what to swap in, and when (SPEC §5).

    The worker asks `due(now)` for the swap to try now (None: nothing, or not yet), tries
    it, and reports `swapped(t)` or `failed(t, now)`; it sleeps until `next_deadline()`
    or until a `new_update` wakes it.
    """

    __slots__ = ("_backoff", "_end", "_pending", "_retry_at", "swapped_t")

    def __init__(self) -> None:
        self.swapped_t = 0  # the newest period swapped in
        self._pending: PlannedSwap | None = None
        self._end = math.inf  # the pending update's period ends here: retried until then
        self._retry_at = math.inf
        self._backoff = Backoff(CHANNEL_RESEND_INITIAL, CHANNEL_RESEND_MAX)

    def __repr__(self) -> str:
        pending = self._pending.t if self._pending is not None else None
        return f"<SwapPlan swapped={self.swapped_t} pending={pending}>"

    def new_update(self, t: int, update: bytes, period_end: float, *, resend: bool) -> bool:
        """Period t's update; True if it is to be swapped in (the worker is woken).

        Approach I carries no welcome or members message: after a membership change
        (`resend`), the same period's image goes in again, without the removed peer.
        """
        if t == self.swapped_t and not resend:
            return False
        self._pending = PlannedSwap(t, update)
        self._end = period_end
        self._retry_at = -math.inf  # at once
        self._backoff.succeeded()
        return True

    def drop(self) -> None:
        """No current update (before the first period or after the last)."""
        self._pending = None
        self._retry_at = math.inf

    def due(self, now: float) -> PlannedSwap | None:
        """The swap to try now, if any; an update whose period ended is dropped."""
        pending = self._pending
        if pending is None:
            return None
        if now >= self._end:
            self.drop()  # retried until its period ends, no longer
            return None
        return pending if now >= self._retry_at else None

    def next_deadline(self) -> float:
        """When `due` may have something new to say (inf: only after a new update)."""
        if self._pending is None:
            return math.inf
        return min(self._retry_at, self._end)

    def swapped(self, swap: PlannedSwap) -> None:
        self.swapped_t = max(self.swapped_t, swap.t)
        if self._pending is swap:
            self._pending = None
            self._retry_at = math.inf

    def failed(self, swap: PlannedSwap, now: float) -> float:
        """The swap failed; returns when it is tried again (unless superseded)."""
        if self._pending is swap:
            self._retry_at = now + self._backoff.failed()
        return self._retry_at

"""How each period's update reached the VMs: period start to the last VM's ack (SPEC §5).

At every period start the daemon opens a `Rollout` naming the VMs whose channel is
connected at that moment; each ack of that period (approach I: each swap) ticks one off.
When none is left, the period's update is everywhere: `all_acked_after` is the time from
the period's scheduled start to that last ack, the figure the paper's 1 : 1,200 case is
about (`tvdnet loadtest` reports its p50 and max). A VM that was not connected at the
start is not waited for; one that goes away before acking leaves the period incomplete
(`all_acked_after` stays None), which the status shows as `acked` < `vms`.

Sans-I/O: the daemon passes the times in. Only the last BRIDGE_ROLLOUT_HISTORY periods
are kept.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from .constants import BRIDGE_ROLLOUT_HISTORY

__all__ = ["KeyUpdate", "Rollout", "RolloutLog"]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


@dataclass(frozen=True, slots=True)
class KeyUpdate:
    """One period's rollout as `tvdnet-bridge status` shows it (seconds after its start)."""

    t: int
    vms: int  # VMs connected when the update went out: the ones waited for
    acked: int  # how many of those acknowledged it
    pushed_after: float  # when the bridge handed the update to the workers
    written_after: float | None  # when the last of those VMs' updates was written
    last_ack_after: float | None  # the latest ack among those VMs so far
    all_acked_after: float | None  # the ack that completed the set; None while incomplete

    def to_json(self) -> dict[str, object]:
        return {
            "t": self.t,
            "vms": self.vms,
            "acked": self.acked,
            "pushed_ms": _ms(self.pushed_after),
            "written_ms": _ms(self.written_after),
            "last_ack_ms": _ms(self.last_ack_after),
            "all_acked_ms": _ms(self.all_acked_after),
        }


class Rollout:
    """Period t's update on its way to the VMs connected when it went out."""

    __slots__ = ("_unwritten", "_waiting", "all_acked_after", "last_ack_after", "pushed_after",
                 "start", "t", "vms", "written_after")  # fmt: skip

    def __init__(self, t: int, start: float, pushed: float, waiting: Iterable[str]) -> None:
        self.t = t
        self.start = start
        self.pushed_after = pushed - start
        self._waiting = set(waiting)
        self._unwritten = set(self._waiting)
        self.vms = len(self._waiting)
        self.written_after: float | None = None if self._unwritten else self.pushed_after
        self.last_ack_after: float | None = None
        # Nobody to wait for: complete when it went out.
        self.all_acked_after: float | None = None if self._waiting else self.pushed_after

    def __repr__(self) -> str:
        return f"<Rollout t={self.t} acked={self.vms - len(self._waiting)}/{self.vms}>"

    def acked(self, vm: str, now: float) -> None:
        if vm not in self._waiting:
            return  # not connected at the start, or acked already (a re-sent update)
        self._waiting.discard(vm)
        self.last_ack_after = now - self.start
        if not self._waiting:
            self.all_acked_after = self.last_ack_after

    def written(self, vm: str, now: float) -> None:
        """`vm`'s update was written to its port (the first time)."""
        if vm in self._unwritten:
            self._unwritten.discard(vm)
            if not self._unwritten:
                self.written_after = now - self.start

    def forget(self, vm: str) -> None:
        """A member removed by a reload is no longer waited for."""
        self._unwritten.discard(vm)
        if not self._unwritten and self.written_after is None:
            self.written_after = self.pushed_after
        if vm in self._waiting:
            self._waiting.discard(vm)
            self.vms -= 1
            if not self._waiting and self.all_acked_after is None:
                last = self.last_ack_after
                self.all_acked_after = last if last is not None else self.pushed_after

    def snapshot(self) -> KeyUpdate:
        return KeyUpdate(
            self.t,
            self.vms,
            self.vms - len(self._waiting),
            self.pushed_after,
            self.written_after,
            self.last_ack_after,
            self.all_acked_after,
        )


class RolloutLog:
    """The rollouts of the last BRIDGE_ROLLOUT_HISTORY periods, oldest first."""

    def __init__(self, history: int = BRIDGE_ROLLOUT_HISTORY) -> None:
        self._rollouts: deque[Rollout] = deque(maxlen=history)
        self._by_t: dict[int, Rollout] = {}

    def begin(self, t: int, start: float, pushed: float, connected: Iterable[str]) -> Rollout:
        if len(self._rollouts) == self._rollouts.maxlen:
            oldest = self._rollouts[0]
            if self._by_t.get(oldest.t) is oldest:
                del self._by_t[oldest.t]
        rollout = Rollout(t, start, pushed, connected)
        self._rollouts.append(rollout)
        self._by_t[t] = rollout
        return rollout

    def acked(self, vm: str, t: int, now: float) -> None:
        rollout = self._by_t.get(t)
        if rollout is not None:
            rollout.acked(vm, now)

    def written(self, vm: str, t: int, now: float) -> None:
        rollout = self._by_t.get(t)
        if rollout is not None:
            rollout.written(vm, now)

    def forget(self, vm: str) -> None:
        for rollout in self._rollouts:
            rollout.forget(vm)

    def snapshot(self) -> tuple[KeyUpdate, ...]:
        return tuple(r.snapshot() for r in self._rollouts)

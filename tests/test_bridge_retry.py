"""The bridge's retry and back-off rules (device_bridge._retry), sans-I/O: no trio here."""

from __future__ import annotations

import math

import pytest

from device_bridge._retry import Backoff, SwapPlan
from device_bridge.constants import CHANNEL_RESEND_INITIAL, CHANNEL_RESEND_MAX


def test_backoff_doubles_up_to_its_cap_and_starts_over_after_a_success() -> None:
    backoff = Backoff(0.5, 5.0)
    assert [backoff.failed() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    backoff.succeeded()
    assert backoff.failed() == 0.5


@pytest.mark.parametrize(("initial", "maximum"), [(0.0, 1.0), (-1.0, 1.0), (2.0, 1.0)])
def test_a_backoff_that_could_spin_or_shrink_is_refused(initial: float, maximum: float) -> None:
    with pytest.raises(ValueError, match="0 < initial <= maximum"):
        Backoff(initial, maximum)


def test_a_new_update_is_due_at_once_and_leaves_the_plan_once_swapped() -> None:
    plan = SwapPlan()
    assert plan.due(0.0) is None and plan.next_deadline() == math.inf
    assert plan.new_update(3, b"u3", period_end=30.0, resend=False)
    swap = plan.due(10.0)
    assert swap is not None and (swap.t, swap.update) == (3, b"u3")
    plan.swapped(swap)
    assert plan.swapped_t == 3
    assert plan.due(11.0) is None and plan.next_deadline() == math.inf
    # The same period again is nothing new, unless membership changed (SPEC §5, approach I).
    assert not plan.new_update(3, b"u3", period_end=30.0, resend=False)
    assert plan.new_update(3, b"u3-without-vm-c", period_end=30.0, resend=True)
    again = plan.due(12.0)
    assert again is not None and again.update == b"u3-without-vm-c"


def test_a_failed_swap_is_retried_backing_off_until_its_period_ends() -> None:
    plan = SwapPlan()
    plan.new_update(3, b"u3", period_end=30.0, resend=False)
    now, waits, last = 10.0, [], 10.0
    while now < math.inf:
        swap = plan.due(now)
        if swap is not None:
            waits.append(plan.failed(swap, now) - now)
            last = now
        now = plan.next_deadline()
    expected = [CHANNEL_RESEND_INITIAL * 2**i for i in range(len(waits))]
    assert waits == [min(w, CHANNEL_RESEND_MAX) for w in expected]
    assert last + waits[-1] > 30.0  # the next try would be after its period: none is made
    assert plan.swapped_t == 0 and plan.due(30.0) is None  # given up with period 3


def test_a_newer_update_supersedes_a_failing_one_at_once() -> None:
    plan = SwapPlan()
    plan.new_update(3, b"u3", period_end=30.0, resend=False)
    first = plan.due(10.0)
    assert first is not None
    plan.failed(first, 10.0)
    plan.failed(first, 11.0)  # backed off to 2 s
    plan.new_update(4, b"u4", period_end=40.0, resend=False)
    newer = plan.due(12.5)
    assert newer is not None and newer.t == 4
    # The failure of the superseded swap, reported late, does not delay the newer one.
    plan.failed(first, 12.5)
    assert plan.due(12.5) is newer
    # Nor does its success, reported late, count as the newer one swapped.
    plan.swapped(first)
    assert plan.swapped_t == 3 and plan.due(12.5) is newer

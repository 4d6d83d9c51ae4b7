"""The per-period rollout record (sans-I/O): period start to the last VM's ack."""

from __future__ import annotations

from device_bridge._rollout import RolloutLog


def test_a_period_completes_with_the_last_vm_it_waited_for() -> None:
    log = RolloutLog()
    log.begin(5, start=100.0, pushed=100.002, connected=["vm-a", "vm-b"])
    log.acked("vm-a", 5, 100.010)
    log.acked("vm-x", 5, 100.011)  # connected after the start: not waited for
    (record,) = log.snapshot()
    assert (record.vms, record.acked, record.all_acked_after) == (2, 1, None)
    log.acked("vm-a", 5, 100.5)  # a second ack of the same period changes nothing
    log.written("vm-a", 5, 100.004)
    log.written("vm-b", 5, 100.006)  # the last of the two updates written
    log.written("vm-b", 5, 100.5)  # a re-sent one: not the first write
    log.acked("vm-b", 5, 100.030)
    (record,) = log.snapshot()
    assert record.to_json() == {
        "t": 5,
        "vms": 2,
        "acked": 2,
        "pushed_ms": 2.0,
        "written_ms": 6.0,
        "last_ack_ms": 30.0,
        "all_acked_ms": 30.0,
    }


def test_acks_of_other_or_forgotten_periods_are_ignored_and_history_is_bounded() -> None:
    log = RolloutLog(history=2)
    for t in (1, 2, 3):
        log.begin(t, start=10.0 * t, pushed=10.0 * t, connected=["vm-a"])
    log.acked("vm-a", 1, 31.0)  # period 1 fell out of the history
    log.acked("vm-a", 7, 31.0)  # never begun
    assert [(r.t, r.acked) for r in log.snapshot()] == [(2, 0), (3, 0)]
    log.acked("vm-a", 2, 31.0)  # late, but still that period's ack
    assert [(r.t, r.acked, r.all_acked_after) for r in log.snapshot()] == [
        (2, 1, 11.0),
        (3, 0, None),
    ]


def test_a_removed_member_is_no_longer_waited_for() -> None:
    log = RolloutLog()
    log.begin(4, start=40.0, pushed=40.0, connected=["vm-a", "vm-b"])
    log.acked("vm-a", 4, 40.25)
    log.forget("vm-b")
    (record,) = log.snapshot()
    assert (record.vms, record.acked, record.all_acked_after) == (1, 1, 0.25)

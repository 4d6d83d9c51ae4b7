"""`tvdnet soak` (issue 20): its checker on records made by hand, and a real seeded soak."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from tvdnet_tools.soak import FAULTS, BridgeProcess, NodeProcess, Proxy, Soak, check

ARGS = argparse.Namespace(seed=5, duration=10.0, period=1.0, faults=list(FAULTS))


def soak_with(tmp_path: Path, records: dict[str, list[dict[str, Any]]], **logs: str) -> Soak:
    """A finished soak whose applications recorded `records` (t is filled in)."""
    soak = Soak(ARGS, tmp_path)
    for vm, events in records.items():
        record = tmp_path / f"{vm}.jsonl"
        record.write_text("".join(json.dumps({"t": 1.0, **e}) + "\n" for e in events))
        log = tmp_path / f"{vm}.log"
        log.write_text(logs.get(vm, ""))
        node = NodeProcess(vm, tmp_path / f"{vm}.toml", [], record, log, 0.5)
        node.incarnation = max((e["inc"] for e in events if e["e"] == "start"), default=1)
        soak.nodes[vm] = node
        soak.final[vm] = node.incarnation
        soak.tvd_of[vm] = "mesh"
    soak.groups = {"mesh": list(records)}
    (tmp_path / "bridge.log").write_text(logs.get("bridge", ""))
    soak.bridges = {"mesh": BridgeProcess([], tmp_path / "bridge.log")}
    return soak


def start(inc: int) -> dict[str, Any]:
    return {"e": "start", "inc": inc}


def sent(to: str, inc: int, n: int, ok: bool = True) -> dict[str, Any]:
    return {"e": "sent", "to": to, "inc": inc, "n": n, "ok": ok, "lat": 0.01}


def recv(sender: str, inc: int, n: int) -> dict[str, Any]:
    return {"e": "recv", "from": sender, "inc": inc, "n": n}


def test_a_clean_run_passes(tmp_path: Path) -> None:
    report = check(
        soak_with(
            tmp_path,
            {
                "a": [start(1), sent("b", 1, 0), sent("b", 1, 1), recv("b", 1, 0)],
                "b": [start(1), recv("a", 1, 0), recv("a", 1, 1), sent("a", 1, 0)],
            },
        )
    )
    assert report["ok"] and report["violations"] == []
    assert (report["messages_sent"], report["lost"], report["duplicates"]) == (3, 0, 0)


@pytest.mark.parametrize(
    ("a", "b", "problem"),
    [
        # b got a's message 0 twice in one instance.
        ([start(1), sent("b", 1, 0)], [start(1), recv("a", 1, 0), recv("a", 1, 0)],
         "duplicate: b#1 got a#1 message 0 again"),
        # acknowledged, never received by any instance of b.
        ([start(1), sent("b", 1, 0), sent("b", 1, 1)], [start(1), recv("a", 1, 0)],
         "lost: a#1 -> b message 1 (acked)"),
        # a lived to the end: a message still queued (timed out) must arrive too.
        ([start(1), sent("b", 1, 0, ok=False)], [start(1)], "lost: a#1 -> b message 0 (queued)"),
        ([start(1), sent("b", 1, 0), sent("b", 1, 1)],
         [start(1), recv("a", 1, 1), recv("a", 1, 0)], "out of order: b#1 got a#1 message 0"),
    ],
)  # fmt: skip
def test_a_broken_promise_is_named(
    tmp_path: Path, a: list[dict[str, Any]], b: list[dict[str, Any]], problem: str
) -> None:
    report = check(soak_with(tmp_path, {"a": a, "b": b}))
    assert not report["ok"]
    assert any(problem in v for v in report["violations"]), report["violations"]


def test_what_a_restart_may_cost_is_not_a_violation(tmp_path: Path) -> None:
    # a#1 was killed with message 1 unacknowledged: its queue died with it (SPEC §4).
    # b#1 was killed after delivering a#2's message 0, which a re-sent to b#2.
    soak = soak_with(
        tmp_path,
        {
            "a": [start(1), sent("b", 1, 0), sent("b", 1, 1, ok=False), start(2), sent("b", 2, 0)],
            "b": [start(1), recv("a", 1, 0), recv("a", 2, 0), start(2), recv("a", 2, 0)],
        },
    )
    soak.nodes["a"].ended[1] = "killed"
    soak.nodes["b"].ended[1] = "killed"
    report = check(soak)
    assert report["ok"], report["violations"]
    assert (report["lost"], report["duplicates"], report["redelivered_after_restart"]) == (0, 0, 1)


def test_a_traceback_or_a_key_in_a_log_fails_the_run(tmp_path: Path) -> None:
    records = {"a": [start(1)], "b": [start(1)]}
    report = check(soak_with(tmp_path, records, a="Traceback (most recent call last):\n"))
    assert report["violations"] == ["a's log holds a traceback"]
    report = check(soak_with(tmp_path, records, bridge="key=" + "ab" * 32 + "\n"))
    assert report["violations"] == [
        "the mesh bridge's log holds something shaped like key material"
    ]


def test_a_cut_short_last_line_is_skipped(tmp_path: Path) -> None:
    soak = soak_with(tmp_path, {"a": [start(1), sent("b", 1, 0)], "b": [start(1)]})
    with soak.nodes["b"].record.open("a") as record:
        record.write('{"e": "recv", "from": "a", "in')  # SIGKILL mid-write
    report = check(soak)
    assert report["lost"] == 1 and report["messages_received"] == 0


def test_a_seeded_soak_keeps_every_promise(tmp_path: Path) -> None:
    """Issue 20: 60 s of every kind of fault on five real node processes and a real
    bridge, periods of 1 s. A failure prints the seed to replay it with."""
    report_path = tmp_path / "soak.json"
    command = [
        sys.executable, "-m", "tvdnet", "soak", "--peers", "4", "--duration", "60",
        "--period", "1", "--seed", "7", "--fault-every", "1.5", "--quiet",
        "--json", str(report_path),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=400)
    assert report_path.exists(), done.stderr
    report = json.loads(report_path.read_text())
    assert (report["violations"], done.returncode) == ([], 0), done.stderr
    assert report["lost"] == 0 and report["duplicates"] == 0
    assert report["messages_acked"] > 500
    assert sum(report["faults_per_kind"].values()) >= 10


def test_a_node_that_does_not_stop_on_sigterm_fails_the_run(tmp_path: Path) -> None:
    soak = soak_with(tmp_path, {"a": [start(1)], "b": [start(1)]})
    soak.nodes["a"].ended[1] = "stuck"
    assert check(soak)["violations"] == ["a#1 did not stop within 20 s of SIGTERM"]


def test_an_acknowledged_message_may_die_only_with_a_receiver_killed_at_once(
    tmp_path: Path,
) -> None:
    """SPEC §4 promises delivery while both processes run: a receiver SIGKILLed right
    after acknowledging may lose what its application had not taken from its inbox yet."""
    records = {"a": [start(1), sent("b", 1, 0)], "b": [start(1)]}  # sent's t is 1.0
    soak = soak_with(tmp_path, records)
    for killed_at in (2.0, 0.5):  # after the acknowledgement, or while b was dying
        soak.faults = [{"t": killed_at, "kind": "node-kill", "vm": "b", "incarnation": 1}]
        report = check(soak)
        assert (report["ok"], report["acked_then_receiver_killed"]) == (True, 1)
    for killed_at in (9.0, -1.0):  # long after; before (the next instance acknowledged it)
        soak.faults = [{"t": killed_at, "kind": "node-kill", "vm": "b", "incarnation": 1}]
        assert check(soak)["violations"] == ["lost: a#1 -> b message 0 (acked)"]


def test_a_queued_message_may_go_with_a_peer_that_left_later(tmp_path: Path) -> None:
    """A message whose send() timed out stays queued; if its peer is then suspended, the
    node drops it (SendFailed, with no send() waiting any more): not lost. Queued after
    the peer left and came back, it must arrive."""
    soak = soak_with(tmp_path, {"a": [start(1), sent("b", 1, 0, ok=False)], "b": [start(1)]})
    soak.faults = [{"t": 2.0, "kind": "membership", "vm": "b", "away_s": 1.0}]
    report = check(soak)
    assert (report["ok"], report["messages_queued_peer_left_later"]) == (True, 1)
    soak.faults[0]["t"] = 0.5
    assert check(soak)["violations"] == ["lost: a#1 -> b message 0 (queued)"]


@pytest.mark.parametrize("kind", ["node-term", "clock-skew"])
def test_a_gracefully_stopped_receiver_loses_no_acknowledged_message(
    tmp_path: Path, kind: str
) -> None:
    """A graceful stop stops acknowledging first and empties the inbox
    (`Node.stop_receiving`): an acknowledged message it did not record is lost."""
    records = {"a": [start(1), sent("b", 1, 0)], "b": [start(1)]}
    soak = soak_with(tmp_path, records)
    soak.faults = [{"t": 1.5, "kind": kind, "vm": "b", "incarnation": 1}]
    assert check(soak)["violations"] == ["lost: a#1 -> b message 0 (acked)"]


def test_a_send_that_failed_because_the_peer_left_may_arrive_but_never_twice(
    tmp_path: Path,
) -> None:
    """A member suspended by a reload: the messages queued to it fail (SendFailedError),
    some of them already delivered. Neither case is lost; twice is still a duplicate."""
    failed = [{**sent("b", 1, n, ok=False), "failed": True} for n in (0, 1)]
    soak = soak_with(tmp_path, {"a": [start(1), *failed], "b": [start(1), recv("a", 1, 0)]})
    report = check(soak)
    assert (report["ok"], report["lost"], report["messages_failed_peer_left"]) == (True, 0, 2)
    soak = soak_with(
        tmp_path, {"a": [start(1), *failed], "b": [start(1), recv("a", 1, 0), recv("a", 1, 0)]}
    )
    assert check(soak)["violations"] == ["duplicate: b#1 got a#1 message 0 again"]


def reject(to: str, reason: str = "unknown", count: int = 1, t: float = 20.0) -> dict[str, Any]:
    return {"e": "reject", "to": to, "reason": reason, "count": count, "t": t}


def test_each_reject_is_held_against_a_fault_of_its_pair_or_fails_the_run(
    tmp_path: Path,
) -> None:
    records = {
        "a": [start(1), reject("b"), reject("c", "expired", 2)],
        "b": [start(1)],
        "c": [start(1)],
    }  # the nodes up at t = 1, the REJECTs at t = 20
    soak = soak_with(tmp_path, records)
    soak.faults = [{"t": 19.5, "kind": "node-kill", "vm": "b", "down_s": 0.3}]
    report = check(soak)
    assert report["rejects"] == {"unknown": 1, "expired": 2}
    assert report["rejects_per_fault_kind"] == {"node-kill": 1}
    assert report["rejects_unattributed"] == 2
    assert report["violations"] == [
        "2 REJECTs outside every fault's window, the first: a refused c (expired) x2 at 20.0 s"
    ]
    soak.faults.append({"t": 19.9, "kind": "bridge-kill", "tvd": "mesh", "down_s": 0.1})
    soak.groups["star"], soak.tvd_of["d"] = ["d"], "star"  # not a's, b's or c's bridge
    soak.faults.append({"t": 19.9, "kind": "bridge-kill", "tvd": "star", "down_s": 0.1})
    report = check(soak)
    assert report["rejects_per_fault_kind"] == {"node-kill": 1, "bridge-kill": 2}
    assert [f.get("rejects", 0) for f in report["faults"]] == [1, 2, 0]  # what each caused
    assert report["ok"]
    soak.faults = soak.faults[:1] + soak.faults[2:]  # only the star's bridge went down
    assert check(soak)["rejects_unattributed"] == 2
    soak.faults = [{"t": 10.0, "kind": "node-kill", "vm": "b", "down_s": 0.3}]  # long over
    assert check(soak)["rejects_unattributed"] == 3
    # While the nodes were getting their first keys: the start-up's.
    records["a"] = [start(1), reject("b", t=5.0)]
    report = check(soak_with(tmp_path, records))
    assert (report["rejects_per_fault_kind"], report["ok"]) == ({"start-up": 1}, True)


def test_a_refused_reload_fails_the_run(tmp_path: Path) -> None:
    soak = soak_with(tmp_path, {"a": [start(1)], "b": [start(1)]})
    fault = {"t": 0.5, "kind": "membership", "vm": "b", "away_s": 1.0, "reload": "ok",
             "reload_back": "refused: new member(s) x"}  # fmt: skip
    soak.faults = [fault]
    assert check(soak)["violations"] == [f"the bridge refused the reload of {fault}"]


async def test_overlapping_stalls_release_every_waiting_pump(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A 30-minute soak (seed 1) found a key channel stuck for good: a second stall
    replaced the event a pump was waiting on, and nobody ever set that one."""
    proxy = Proxy(0, 0)
    released: list[float] = []

    async def pump() -> None:
        await proxy.resume.wait()
        released.append(trio.current_time())

    with trio.fail_after(10):  # before the fix, the first pump waited for ever
        await _stalls(proxy, pump)
    assert len(released) == 2 and min(released) >= 2.0


async def _stalls(proxy: Proxy, pump: Any) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(proxy.stall, 2.0)
        await trio.sleep(0.1)
        nursery.start_soon(pump)  # waits on the first stall's event
        await trio.sleep(0.1)
        nursery.start_soon(proxy.stall, 1.0)  # overlaps, ends first
        await trio.sleep(0.1)
        nursery.start_soon(pump)


async def test_a_slowed_proxy_carries_everything_late_and_in_pieces(
    autojump_clock: trio.testing.MockClock,
) -> None:
    proxy = Proxy(0, 0)
    into, source = trio.testing.memory_stream_one_way_pair()
    sink, out = trio.testing.memory_stream_one_way_pair()
    data = bytes(range(100))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(proxy.slow, 5.0, 16)
        await trio.sleep(0.01)
        nursery.start_soon(proxy._pump, source, sink, nursery.cancel_scope)
        began = trio.current_time()
        await into.send_all(data)
        pieces: list[bytes | bytearray] = []
        while sum(map(len, pieces)) < len(data):
            pieces.append(await out.receive_some())
        assert b"".join(pieces) == data and max(map(len, pieces)) <= 16
        assert trio.current_time() - began >= 6 * 0.02  # seven pieces, 20 ms apart
        nursery.cancel_scope.cancel()
    assert proxy.slow_chunk == 0  # the slow ended with its task

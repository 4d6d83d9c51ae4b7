"""A period change under traffic, with real nodes and the real bridge (MockClock).

SPEC §4 (revision 2): two nodes whose period-t updates arrive s seconds apart talk on
without a REJECT while s is under both the period length and the allowance (2 s here),
and nothing waits for the change; the previous key goes as soon as the pair's
connection carries a frame under the new one. An update later than the allowance cuts
the late node off until it arrives, and then nothing is lost or repeated.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing
from nodes import Harness

from tvdnet import Node
from tvdnet.core.constants import KEY_CHANGE_SPREAD, SKEW_ALLOWANCE

RATE = 20.0  # messages per second, each way


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def _traffic(
    h: Harness, seconds: float, checks: list[tuple[float, str]]
) -> tuple[dict[str, list[int]], list[float], dict[str, list[float]]]:
    """vm-a and vm-b send each other RATE messages a second for `seconds`; returns what
    each received, every send's wait for its ACK, and when each still held an older key
    at the times in `checks` (trio time, node)."""
    a, b = h.nodes["vm-a"], h.nodes["vm-b"]
    count = int(seconds * RATE)
    got: dict[str, list[int]] = {"vm-a": [], "vm-b": []}
    waits: list[float] = []
    older_seen: dict[str, list[float]] = {"vm-a": [], "vm-b": []}

    async def receiver(node: Node) -> None:
        async for message in node:
            got[node.vm].append(message.body)
            if len(got[node.vm]) == count:
                return

    async def sender(node: Node, peer: str) -> None:
        for i in range(count):
            sent_at = trio.current_time()
            await node.send(peer, i)
            waits.append(trio.current_time() - sent_at)
            await trio.sleep_until(sent_at + 1 / RATE)

    async def watch() -> None:
        for when, vm in checks:
            await trio.sleep_until(when)
            node = h.nodes[vm]
            peer = "vm-b" if vm == "vm-a" else "vm-a"
            older = node._session.key_state(peer).older
            if older is not None and older.held:
                older_seen[vm].append(when)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        for node, peer in ((a, "vm-b"), (b, "vm-a")):
            nursery.start_soon(receiver, node)
            nursery.start_soon(sender, node, peer)
    return got, waits, older_seen


@pytest.mark.parametrize(
    ("period_s", "lead", "late_a", "late_b"),
    [
        (5.0, 0.0, 0.0, 0.0),
        (5.0, 0.0, 0.0, 1.0),
        (5.0, 0.0, 0.0, 1.9),
        (5.0, 1.0, 0.0, 1.9),  # vm-a 1 s early (within the allowance), vm-b 0.9 s late
        (1.0, 0.0, 0.0, 0.5),
        (1.0, 0.0, 0.0, 0.9),
        (1.0, 0.5, 0.0, 0.9),  # vm-a 0.5 s early, vm-b 0.4 s late
    ],
)
async def test_updates_apart_under_the_allowance_stall_nothing(
    tmp_path: Path,
    clock: trio.testing.MockClock,
    period_s: float,
    lead: float,
    late_a: float,
    late_b: float,
) -> None:
    h = Harness(tmp_path, ["vm-a", "vm-b"], period_s=period_s, bridge_lead=lead)
    async with h.running(), trio.open_nursery() as nursery:
        await h.wait_keys()
        for vm, late in (("vm-a", late_a), ("vm-b", late_b)):
            if late:
                h.delay_updates(vm, late, nursery)
        seconds = 4 * period_s if period_s > 1 else 6.0
        # Just after vm-b's update (plus a round trip of KEY and a frame under t),
        # each node must have erased its previous key, long before the overlap ends
        # (where that moment comes before vm-a's next update, which brings a new one).
        # A pair that may go on with its previous key derives the new one at an offset
        # of up to `spread` after its update (docs/architecture.md); both ends alike.
        spread = min(KEY_CHANGE_SPREAD, min(SKEW_ALLOWANCE, period_s) / 4)
        first = h.clock.trio_time(h.schedule.start(h.schedule.period_at(h.clock.now()) + 1))
        checks = sorted(
            (first + k * period_s - lead + late_b + spread + 0.2, vm)
            for k in range(int(seconds / period_s) - 1)
            for vm in ("vm-a", "vm-b")
            if late_b + spread + 0.2 < period_s
        )
        got, waits, older_seen = await _traffic(h, seconds, checks)
        nursery.cancel_scope.cancel()
    count = int(seconds * RATE)
    assert got == {"vm-a": list(range(count)), "vm-b": list(range(count))}  # once, in order
    stats = {vm: h.nodes[vm].stats for vm in ("vm-a", "vm-b")}
    rejects = {
        vm: (s.get("rejected_expired", 0), s.get("rejected_unknown", 0)) for vm, s in stats.items()
    }
    assert rejects == {"vm-a": (0, 0), "vm-b": (0, 0)}
    assert max(waits) < 0.05  # no message waited for the change (an ACK is at once)
    assert older_seen == {"vm-a": [], "vm-b": []}
    assert all(s.get("connections", 0) <= 2 for s in stats.values())  # no reconnect


async def test_an_update_past_the_allowance_cuts_the_late_node_off_until_it_comes(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    h = Harness(tmp_path, ["vm-a", "vm-b"], period_s=5.0)
    async with h.running(), trio.open_nursery() as nursery:
        await h.wait_keys()
        h.delay_updates("vm-b", 3.0, nursery)
        got, waits, _ = await _traffic(h, 20.0, [])
        nursery.cancel_scope.cancel()
    count = int(20.0 * RATE)
    assert got == {"vm-a": list(range(count)), "vm-b": list(range(count))}  # nothing lost
    b = h.nodes["vm-b"]
    assert b.stats.get("rejected_unknown", 0) > 0  # cut off between 2 s and 3 s
    assert max(waits) < 2.5  # caught up once the key came (3 s late, 2 s of overlap)

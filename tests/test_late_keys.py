"""Nodes whose key updates come late, every period: the starved machine's case.

A bridge that is not scheduled in time (or a node too busy to read its channel) hands a
node its period key after the skew allowance: the node is cut off for a while each period
while its peers are not. Traffic must still flow, exactly once, and the connection between
them must not be torn down for it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing
from nodes import Harness

from tvdnet import Node


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def test_a_node_whose_keys_come_late_every_period_keeps_talking(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    h = Harness(tmp_path, ["vm-a", "vm-b"], period_s=5.0)
    async with h.running(), trio.open_nursery() as nursery:
        await h.wait_keys()
        a, b = h.nodes["vm-a"], h.nodes["vm-b"]
        # vm-a's update comes 3.5 s into each period, past the 2 s allowance: vm-a holds
        # no key from 2 s to 3.5 s of every period (the old one's overlap ends at 2 s),
        # while vm-b holds the new one.
        h.delay_updates("vm-a", 3.5, nursery)
        got: dict[str, list[int]] = {"vm-a": [], "vm-b": []}
        count = 80  # one every 0.5 s: 40 s, 8 periods
        latencies: list[float] = []

        async def receiver(node: Node) -> None:
            async for message in node:
                got[node.vm].append(message.body)
                if len(got[node.vm]) == count:
                    return

        async def sender(node: Node, peer: str) -> None:
            for i in range(count):
                sent_at = trio.current_time()
                await node.send(peer, i)
                latencies.append(trio.current_time() - sent_at)
                await trio.sleep(0.5)

        async with trio.open_nursery() as traffic:
            for node, peer in ((a, "vm-b"), (b, "vm-a")):
                traffic.start_soon(receiver, node)
                traffic.start_soon(sender, node, peer)
        assert got == {"vm-a": list(range(count)), "vm-b": list(range(count))}  # once, in order
        # The scenario happened: vm-a's keys lapsed every period (SPEC §4: a node whose
        # update comes later than the allowance is cut off until it arrives): once the
        # overlap closed, vm-b sealed under the new period, which vm-a refused unknown.
        assert a.stats["keys_erased"] >= 7
        assert a.stats["rejected_unknown"] > 0
        # No message waited past vm-a's late key: a new key re-sends at once (SPEC §4),
        # rather than after the re-send back-off that the REJECTs had started.
        assert max(latencies) < 4.5
        # ...and the connection rode it out: no close for a missing key, no redial.
        assert a.stats["connections"] <= 2 and b.stats["connections"] <= 2
        nursery.cancel_scope.cancel()

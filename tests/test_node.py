"""Nodes in one trio run, with keys pushed over socketpairs and peers on loopback TCP."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing
from nodes import Harness

from tvdnet import SendTimeout, UnknownPeer


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def test_two_nodes_exchange_messages(tmp_path: Path, clock: trio.testing.MockClock) -> None:
    h = Harness(tmp_path, ["vm-a", "vm-b"])
    async with h.running():
        await h.wait_keys()
        a, b = h.nodes["vm-a"], h.nodes["vm-b"]
        await a.send("vm-b", {"hello": "b"})
        message = await b.receive()
        assert (message.sender, message.period, message.body) == ("vm-a", 1, {"hello": "b"})
        await b.send("vm-a", "hi")
        assert (await a.receive()).body == "hi"
        assert a.stats["sent"] == 1
        assert b.stats["delivered"] == 1


async def test_send_to_a_stranger_is_refused(tmp_path: Path, clock: trio.testing.MockClock) -> None:
    h = Harness(tmp_path, ["vm-a", "vm-b"])
    async with h.running():
        await h.wait_keys()
        with pytest.raises(UnknownPeer):
            await h.nodes["vm-a"].send("vm-z", "x")


async def test_messages_in_flight_across_period_changes_arrive_once_in_order(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    h = Harness(tmp_path, ["vm-a", "vm-b", "vm-c"], period_s=2.0)
    async with h.running():
        await h.wait_keys()
        got: dict[str, list[int]] = {"vm-b": [], "vm-c": []}

        async def receiver(vm: str) -> None:
            async for message in h.nodes[vm]:
                got[vm].append(message.body)
                if len(got[vm]) == 200:
                    return

        async def sender(peer: str) -> None:
            for i in range(200):
                await h.nodes["vm-a"].send(peer, i)
                await trio.sleep(0.05)  # 200 x 50 ms = 10 s: five period changes

        async with trio.open_nursery() as nursery:
            for peer in got:
                nursery.start_soon(receiver, peer)
                nursery.start_soon(sender, peer)
        assert got == {"vm-b": list(range(200)), "vm-c": list(range(200))}
        assert h.nodes["vm-a"].period is not None
        assert h.nodes["vm-a"].period >= 5


async def test_send_times_out_when_the_peer_is_unreachable(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    h = Harness(tmp_path, ["vm-a", "vm-b"])
    async with h.running():
        await h.wait_keys()
        h.nodes["vm-a"]._agent.members.pop("vm-b")  # no address: dials fail
        with pytest.raises(SendTimeout, match="vm-b"):
            await h.nodes["vm-a"].send("vm-b", "nobody home", timeout=3)

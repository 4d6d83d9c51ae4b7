"""Nodes and the real bridge in one trio run: key channels on Unix sockets, TCP peers."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trio
import trio.testing
from nodes import Harness

from device_bridge import TvdConfig
from tvdnet import KeyErased, Node, SendTimeout, UnknownPeer
from tvdnet.control import control_request, serve_control

if TYPE_CHECKING:
    from _typeshed import DataclassInstance


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


async def test_a_node_stopping_with_messages_queued_says_how_many(
    tmp_path: Path, clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 18: stopping said nothing of the messages that are lost with the process."""
    h = Harness(tmp_path, ["vm-a", "vm-b", "vm-c"], external=("vm-b", "vm-c"))
    async with h.running():
        await h.wait_keys()
        a = h.nodes["vm-a"]
        async with trio.open_nursery() as nursery:  # vm-b and vm-c never run: no ACK comes
            for peer, count in (("vm-b", 2), ("vm-c", 1)):
                for i in range(count):
                    nursery.start_soon(functools.partial(a.send, peer, i, timeout=math.inf))
            await trio.sleep(1)
            assert a.unacknowledged() == 3
            nursery.cancel_scope.cancel()
    lines = [r.getMessage() for r in caplog.records if "stopped" in r.getMessage()]
    assert "event=stopped-with-unacknowledged vm=vm-a messages=3 peers=vm-b:2,vm-c:1" in lines


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
        updates_before = h.nodes["vm-a"].key_updates
        assert updates_before >= 1
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
        # one update a period: at least four more in the 10 s of traffic
        assert h.nodes["vm-a"].key_updates >= updates_before + 4
        assert h.nodes["vm-a"].key_updates == h.nodes["vm-a"].stats["key_updates"]
        assert h.nodes["vm-a"].unacknowledged() == 0


async def test_send_times_out_when_the_peer_is_unreachable(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    h = Harness(tmp_path, ["vm-a", "vm-b"])
    async with h.running():
        await h.wait_keys()
        h.nodes["vm-a"]._agent.members.pop("vm-b")  # no address: dials fail
        with pytest.raises(SendTimeout, match="vm-b"):
            await h.nodes["vm-a"].send("vm-b", "nobody home", timeout=3)


async def test_a_bridge_outage_longer_than_a_period_loses_nothing(
    tmp_path: Path, clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    h = Harness(tmp_path, ["vm-a", "vm-b"], period_s=5.0)
    async with h.running():
        await h.wait_keys()
        a, b = h.nodes["vm-a"], h.nodes["vm-b"]
        h.stop_bridge()
        await trio.sleep(15)  # periods end, no update comes: keys are erased
        assert a.period is None
        assert a.status()["cut_off"] is True
        delivered = trio.Event()

        async def send_while_cut_off() -> None:
            await a.send("vm-b", "queued while cut off")
            delivered.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_while_cut_off)
            await trio.sleep(3)
            assert not delivered.is_set()  # nothing is sealed without a key
            await h.start_bridge()
        message = await b.receive()
        assert message.body == "queued while cut off"
        assert message.period == h.schedule.period_at(h.clock.now())
        cut_off_lines = [r for r in caplog.records if "event=cut-off vm=vm-a" in r.getMessage()]
        assert len(cut_off_lines) == 1  # said once, not once per peer or per period
        assert a.status()["cut_off"] is False


async def send_each(node: Node, peer: str, bodies: Iterable[int], sent: list[int]) -> None:
    """Send each body in turn (each send() returns on the peer's ACK); note each sent."""
    for body in bodies:
        await node.send(peer, body)
        sent.append(body)


async def test_a_peer_restart_gets_every_unacknowledged_message_once(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    h = Harness(tmp_path, ["vm-a", "vm-b"])
    async with h.running():
        await h.wait_keys()
        a = h.nodes["vm-a"]
        for i in range(5):
            await a.send("vm-b", i)
        assert [(await h.nodes["vm-b"].receive()).body for _ in range(5)] == list(range(5))
        h.stop_node("vm-b")
        results: list[int] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_each, a, "vm-b", range(5, 10), results)
            await trio.sleep(2)
            b2 = await h.restart_node("vm-b")
            got = [(await b2.receive()).body for _ in range(5)]
        assert got == [5, 6, 7, 8, 9]
        assert results == [5, 6, 7, 8, 9]
        assert a.stats["peer_restarts"] == 1


async def test_a_graceful_stop_acknowledges_only_what_the_application_takes(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    """Issue 20 (found by the soak): a node acknowledged messages into its inbox while its
    application was stopping, and they died with the process. After `stop_receiving()`
    nothing new is acknowledged, the inbox empties and ends the `async for`, and the
    sender delivers the rest to the VM's next instance, once and in order."""
    h = Harness(tmp_path, ["vm-a", "vm-b"])
    async with h.running():
        await h.wait_keys()
        a, b = h.nodes["vm-a"], h.nodes["vm-b"]
        for i in range(5):
            await a.send("vm-b", i)  # acknowledged: in b's inbox
        assert [(await b.receive()).body for _ in range(2)] == [0, 1]
        b.stop_receiving()
        results: list[int] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_each, a, "vm-b", range(5, 8), results)
            await trio.sleep(3)
            assert [m.body async for m in b] == [2, 3, 4]  # what it acknowledged, then the end
            with pytest.raises(trio.EndOfChannel):
                await b.receive()
            # send() waits for each ACK: message 5 stays queued, re-sent and not taken.
            assert (results, a.unacknowledged("vm-b")) == ([], 1)
            assert b.stats["undelivered_closing"] >= 2 and b.stats["delivered"] == 5
            h.stop_node("vm-b")
            b2 = await h.restart_node("vm-b")
            assert [(await b2.receive()).body for _ in range(3)] == [5, 6, 7]
        assert results == [5, 6, 7] and b2.stats["delivered"] == 3


async def test_a_member_suspended_and_resumed_by_reload_talks_again_without_duplicates(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    """Issue 20: a member leaves (suspended by a reload) and comes back. Meanwhile it is
    no peer (UnknownPeer); back, its numberings resume on both sides, so nothing it had
    delivered is delivered again and its queued messages arrive once."""
    h = Harness(tmp_path, ["vm-a", "vm-b", "vm-c"])
    async with h.running():
        await h.wait_keys()
        assert h.bridge is not None
        a, c = h.nodes["vm-a"], h.nodes["vm-c"]
        for i in range(3):
            await a.send("vm-c", i)
            await c.send("vm-a", i)
        assert [(await c.receive()).body for _ in range(3)] == [0, 1, 2]
        assert [(await a.receive()).body for _ in range(3)] == [0, 1, 2]
        members = h.config_of_tvd.members
        away = [dataclasses.replace(m, suspended=m.id == "vm-c") for m in members]
        await h.bridge.reload(TvdConfig.for_schedule(h.tvd, h.schedule, away))
        await trio.sleep(1)
        assert "vm-c" not in a.peers and "vm-c" not in h.nodes["vm-b"].peers
        with pytest.raises(UnknownPeer):
            await a.send("vm-c", "while away")
        async with trio.open_nursery() as nursery:
            # vm-c still thinks vm-a a member: its message waits, queued, for the return.
            nursery.start_soon(functools.partial(c.send, "vm-a", 3, timeout=math.inf))
            await trio.sleep(25)  # past the end of vm-c's keys
            await h.bridge.reload(h.config_of_tvd)
            with trio.fail_after(30):
                while "vm-c" not in a.peers or not a._session.key_state("vm-c").has_key:
                    await trio.sleep(0.1)
            await a.send("vm-c", 3, timeout=30)
        assert (await c.receive()).body == 3
        assert (await a.receive()).body == 3
        assert a.stats.get("duplicates", 0) == c.stats.get("duplicates", 0) == 0
        assert a.stats["delivered"] == c.stats["delivered"] == 4


async def test_control_socket_status_and_send(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    h = Harness(tmp_path, ["vm-a", "vm-b"])
    async with h.running():
        await h.wait_keys()
        node = h.nodes["vm-a"]
        path = tmp_path / "control.sock"
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(serve_control, path, node.handle_control))
            assert (path.stat().st_mode & 0o077) == 0
            reply = await control_request(path, {"command": "status"})
            assert await control_request(
                path, {"command": "send", "peer": "vm-b", "body": [1, 2]}
            ) == {"ok": True}
            bad = await control_request(path, {"command": "send", "peer": "vm-q", "body": 1})
            assert bad["ok"] is False
            assert bad["type"] == "UnknownPeer"
            assert (await control_request(path, {"command": "dance"}))["ok"] is False
            nursery.cancel_scope.cancel()
        assert (await h.nodes["vm-b"].receive()).body == [1, 2]
        status = reply["status"]
        assert status["vm"] == "vm-a"
        assert status["peers"]["vm-b"]["has_key"] is True
        key = node._session.key_state("vm-b").open_key().hex()
        assert key not in json.dumps(reply)


async def test_simultaneous_dials_leave_one_connection_per_pair(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    h = Harness(tmp_path, ["vm-a", "vm-b"])
    async with h.running():
        await h.wait_keys()
        a, b = h.nodes["vm-a"], h.nodes["vm-b"]
        async with trio.open_nursery() as nursery:  # both dial at the same moment
            nursery.start_soon(a.send, "vm-b", "from a")
            nursery.start_soon(b.send, "vm-a", "from b")
        assert (await b.receive()).body == "from a"
        assert (await a.receive()).body == "from b"
        await trio.sleep(1)
        for node, peer in ((a, "vm-b"), (b, "vm-a")):
            assert node.status()["peers"][peer]["connections"] == 1
            assert node.status()["peers"][peer]["connected"] is True


async def test_a_reader_that_lags_holds_senders_back(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    h = Harness(tmp_path, ["vm-a", "vm-b"])
    async with h.running():
        await h.wait_keys()
        a, b = h.nodes["vm-a"], h.nodes["vm-b"]
        b.config = type(b.config)(**{**_fields(b.config), "inbox_size": 50})
        a._session._window_messages = 100
        sent = 0

        async def flood() -> None:
            nonlocal sent
            async with trio.open_nursery() as nursery:
                for i in range(300):
                    nursery.start_soon(a.send, "vm-b", i)
                    sent += 1

        with trio.move_on_after(5):
            await flood()
        # vm-b's application read nothing: vm-b stopped reading its socket once its inbox
        # held 50, and vm-a's window of 100 unacknowledged messages closed behind that.
        waiting = b.waiting
        assert 50 <= waiting < 200  # the inbox limit, plus what one read carried past it
        assert a.unacknowledged("vm-b") <= 100
        assert a.unacknowledged() == a.unacknowledged("vm-b")  # vm-a's only peer
        assert a.unacknowledged("vm-b") == 100  # the window is full: the rest wait to enter it
        assert sent == 300  # every send() was started...
        got = [(await b.receive()).body for _ in range(waiting)]
        assert len(set(got)) == len(got)  # ...and what arrived, arrived once
        assert b.waiting == 0


def _fields(config: DataclassInstance) -> dict[str, Any]:
    return {name: getattr(config, name) for name in config.__dataclass_fields__}


async def test_a_timed_out_send_leaves_its_message_queued_and_it_arrives_once(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    h = Harness(tmp_path, ["vm-a", "vm-b"])
    async with h.running():
        await h.wait_keys()
        a, b = h.nodes["vm-a"], h.nodes["vm-b"]
        address = a._agent.members.pop("vm-b")  # no address: dials fail
        with pytest.raises(SendTimeout):
            await a.send("vm-b", "late but once", timeout=2)
        assert a.unacknowledged("vm-b") == 1
        a._agent.members["vm-b"] = address
        with trio.fail_after(120):
            message = await b.receive()
        assert message.body == "late but once"
        with trio.move_on_after(5):
            await b.receive()
            raise AssertionError("delivered twice")
        assert a.unacknowledged("vm-b") == 0


async def test_a_cancelled_send_leaves_nothing_behind(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    h = Harness(tmp_path, ["vm-a", "vm-b"])
    async with h.running():
        await h.wait_keys()
        a, b = h.nodes["vm-a"], h.nodes["vm-b"]
        address = a._agent.members.pop("vm-b")
        with trio.move_on_after(1):
            await a.send("vm-b", "cancelled caller", timeout=30)
        assert not a._waiters and not a._send_deadlines  # no waiter, no deadline left
        a._agent.members["vm-b"] = address
        with trio.fail_after(120):
            assert (await b.receive()).body == "cancelled caller"  # still delivered


@pytest.mark.parametrize("ending", ["timeout", "cancelled"])
async def test_a_send_that_waits_for_the_window_ends_cleanly(
    tmp_path: Path, clock: trio.testing.MockClock, ending: str
) -> None:
    """A send waiting for room in the send window times out or is cancelled, and leaves
    nothing behind: its message never entered, and its cancel scope left the node's table
    (a cancelled one stayed there for good before: review)."""
    h = Harness(tmp_path, ["vm-a", "vm-b"])
    async with h.running():
        await h.wait_keys()
        a = h.nodes["vm-a"]
        a._agent.members.pop("vm-b")  # vm-b can acknowledge nothing
        a._session._window_messages = 1
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(a.send, "vm-b", "fills the window", timeout=60))
            await trio.sleep(0.1)
            if ending == "timeout":
                with pytest.raises(SendTimeout):
                    await a.send("vm-b", "never enters", timeout=2)
            else:
                with trio.move_on_after(1) as waited:
                    await a.send("vm-b", "never enters", timeout=30)
                assert waited.cancelled_caught
            assert not a._window_scopes
            nursery.cancel_scope.cancel()
        assert a.unacknowledged("vm-b") == 1  # only the first ever entered


async def test_a_write_that_does_not_complete_is_dropped_by_the_watchdog(
    tmp_path: Path, clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """No cancel scope per write: the timer task drops a connection whose write began
    more than the write timeout ago (here one stuck since 11 s), and only that one."""
    h = Harness(tmp_path, ["vm-a", "vm-b"])
    async with h.running():
        await h.wait_keys()
        await h.nodes["vm-a"].send("vm-b", "connected")
        a = h.nodes["vm-a"]
        (conn,) = a._streams
        a._writes[conn] = trio.current_time() - 11.0  # as if send_all had hung since then
        a._arm(a._clock.now())
        with trio.fail_after(5):
            while conn in a._streams:
                await trio.sleep(0.01)
        assert "event=write-timeout" in caplog.text
        await a.send("vm-b", "reconnected")  # a new connection carries on
        assert [(await h.nodes["vm-b"].receive()).body for _ in range(2)] == [
            "connected",
            "reconnected",
        ]


async def test_an_erasure_reported_for_a_peer_just_removed_is_harmless(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    """A `members` message may remove a peer in the same read that erased its key."""
    h = Harness(tmp_path, ["vm-a", "vm-b"])
    async with h.running():
        await h.wait_keys()
        a = h.nodes["vm-a"]
        a._dispatch(KeyErased("vm-gone", 1))  # no UnknownPeer escapes into the node
        await a.send("vm-b", "still here")

"""Hostile input against a running node: each refused, counted, logged once per cause,
while the node keeps serving its real peers."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest
import trio
import trio.testing
from nodes import Harness

from tvdnet.core import frames
from tvdnet.core.constants import FRAME_LIMIT
from tvdnet_tools import forge


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


@pytest.fixture(autouse=True)
async def close_raw_peers() -> Any:
    yield
    for raw in RawPeer.opened:
        await raw.stream.aclose()
    RawPeer.opened.clear()


class RawPeer(forge.RawPeer):
    """`tvdnet_tools.forge.RawPeer`, closed after each test."""

    opened: ClassVar[list[RawPeer]] = []

    def __init__(self, stream: trio.abc.Stream) -> None:
        super().__init__(stream)
        RawPeer.opened.append(self)


async def still_serving(h: Harness) -> None:
    """The real vm-a -> vm-b path still works."""
    await h.nodes["vm-a"].send("vm-b", "still here")
    assert (await h.nodes["vm-b"].receive()).body == "still here"


async def open_as_member(h: Harness) -> forge.RawPeer:
    """A raw connection to vm-b that claims to be vm-a (it holds vm-a's keys)."""
    raw = await RawPeer.connect(h.ports["vm-b"])
    await raw.hello(h.tvd, "vm-a", "vm-b")
    assert (await raw.frame() or [None])[0] == frames.HELLO
    return raw


async def test_a_frame_under_the_previous_periods_key_is_rejected_expired(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    h = Harness(tmp_path, ["vm-a", "vm-b"], period_s=5.0)
    async with h.running():
        await trio.sleep(5)  # into period 2
        await h.wait_keys(2)
        b = h.nodes["vm-b"]
        raw = await open_as_member(h)
        old_key = h.period_key("vm-a", "vm-b", 1)
        frame = raw.data(old_key, h.tvd, "vm-a", "vm-b", 1, [[0, 1, "from the past"]])
        await raw.send(frame)
        reject = await raw.until(frames.REJECT)
        assert reject == [frames.REJECT, 1, 0, "expired", 2]
        assert b.stats["rejected_expired"] == 1
        # A frame of a period not begun yet: unknown.
        future = h.period_key("vm-a", "vm-b", 3)
        await raw.send(raw.data(future, h.tvd, "vm-a", "vm-b", 3, [[0, 1, "from the future"]]))
        assert await raw.until(frames.REJECT) == [frames.REJECT, 3, 1, "unknown", 2]
        assert b.stats["rejected_unknown"] == 1
        await still_serving(h)
        assert [m async for m in _drain(b)] == []  # nothing from the raw peer was delivered


async def _drain(node: Any) -> Any:
    while node._inbox:
        yield await node.receive()


async def test_a_replayed_frame_is_refused(tmp_path: Path, clock: trio.testing.MockClock) -> None:
    h = Harness(tmp_path, ["vm-a", "vm-b"])
    async with h.running():
        await h.wait_keys()
        b = h.nodes["vm-b"]
        key = h.period_key("vm-a", "vm-b", 1)
        raw = await open_as_member(h)
        captured = raw.data(key, h.tvd, "vm-a", "vm-b", 1, [[1, 0, None]])
        await raw.send(captured)
        await trio.sleep(0.1)
        # Replayed on the same connection: the counter has moved on.
        await raw.send(captured)
        assert await raw.until(frames.CLOSE) == [frames.CLOSE, "bad-frame"]
        # Replayed on a new connection: new nonces, so another key: authentication fails.
        raw2 = await open_as_member(h)
        await raw2.send(captured)
        assert await raw2.until(frames.CLOSE) is None  # closed, no REJECT, no CLOSE
        assert b.stats["auth_failures"] == 1
        await still_serving(h)


@pytest.mark.parametrize(
    ("hello", "reason"),
    [
        (("t1", "vm-x", "vm-b"), "not-a-member"),
        (("other-tvd", "vm-a", "vm-b"), "not-a-member"),
        (("t1", "vm-a", "vm-c"), "bad-hello"),
    ],
)
async def test_bad_hellos_are_closed(
    tmp_path: Path, clock: trio.testing.MockClock, hello: tuple[str, str, str], reason: str
) -> None:
    h = Harness(tmp_path, ["vm-a", "vm-b"])
    async with h.running():
        await h.wait_keys()
        raw = await RawPeer.connect(h.ports["vm-b"])
        await raw.hello(*hello)
        assert await raw.frame() == [frames.CLOSE, reason]
        assert await raw.frame() is None
        await still_serving(h)


async def test_garbage_and_oversized_frames_are_closed_and_logged_once(
    tmp_path: Path, clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    h = Harness(tmp_path, ["vm-a", "vm-b"])
    async with h.running():
        await h.wait_keys()
        for _ in range(5):
            raw = await RawPeer.connect(h.ports["vm-b"])
            await raw.send(b"\xc1 this is not msgpack")
            assert await raw.frame() == [frames.CLOSE, "bad-frame"]
        raw = await RawPeer.connect(h.ports["vm-b"])
        await raw.send(b"\x97\x00\x01\xc6" + (FRAME_LIMIT * 2).to_bytes(4, "big"))
        await raw.send(bytes(FRAME_LIMIT + 10))
        assert await raw.frame() == [frames.CLOSE, "too-large"]
        lines = [r.getMessage() for r in caplog.records if "cause=bad-frame" in r.getMessage()]
        assert len(lines) == 1  # five garbage connections, one log line
        assert h.nodes["vm-b"].stats["protocol_errors"] == 6
        await still_serving(h)


async def test_a_slow_sender_that_never_finishes_a_frame_is_timed_out(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    h = Harness(tmp_path, ["vm-a", "vm-b"], period_s=60.0)
    async with h.running():
        await h.wait_keys()
        raw = await RawPeer.connect(h.ports["vm-b"])
        hello = frames.encode_hello(h.tvd, "vm-a", "vm-b", raw.nonce, raw.instance)
        sent = 0
        try:
            for byte in hello[:-1]:  # one byte a second, never the last one
                await raw.send(bytes([byte]))
                sent += 1
                await trio.sleep(1)
        except trio.BrokenResourceError:
            pass
        assert sent < len(hello) - 1  # the node hung up before the drip ended
        assert await raw.frame() == [frames.CLOSE, "timeout"]
        await still_serving(h)


async def test_a_flood_of_connections_is_capped_and_real_peers_still_talk(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    h = Harness(tmp_path, ["vm-a", "vm-b"], max_unauthenticated=4)
    async with h.running():
        await h.wait_keys()
        await still_serving(h)  # vm-a and vm-b are connected before the flood
        flood = [await RawPeer.connect(h.ports["vm-b"]) for _ in range(20)]
        for raw in flood:
            await raw.hello(h.tvd, "vm-a", "vm-b")  # HELLOs that will never authenticate
        await trio.sleep(0.5)
        b = h.nodes["vm-b"]
        assert b.stats["connections_displaced"] >= 16
        await still_serving(h)

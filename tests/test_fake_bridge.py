"""A fake bridge on a node's key channel (issue 18): whatever it says (garbage, wrong or
oversized messages, hostile welcomes and updates), the node neither crashes nor logs a
traceback or a key, and it still takes its keys from the real thing afterwards."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
import trio.testing

from tvdnet import KeyChannelSpec, NodeConfig, WallClock, channel, open_node
from tvdnet.control import bind_owner_only
from tvdnet.core.channel import Member
from tvdnet.core.constants import CHANNEL_LIMIT
from tvdnet.core.scheme import Schedule, generate
from tvdnet.keyfile import write_computer_keys

SCHEDULE = Schedule(1_800_000_000.0, 10.0, 1000)
MEMBERS = ("vm-a", "vm-b")


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


def welcome(tvd: str = "fake", schedule: Schedule = SCHEDULE) -> bytes:
    members = tuple(Member(vm, f"127.0.0.1:{7000 + i}") for i, vm in enumerate(MEMBERS))
    return channel.encode(channel.Welcome(tvd, "vm-a", schedule, members))


def hostile_messages(seed: int) -> list[bytes]:
    """What a fake bridge may say: each is sent on a connection of its own."""
    pack = msgpack.packb
    said: list[bytes] = [
        b"\xc1" * 7,  # never valid msgpack
        pack({"type": "welcome"}),
        pack({"type": "update", "t": 3, "partials": {"vm-b": b"short"}}),
        pack({"type": "update", "t": 2**64 - 1, "partials": {}}),
        pack({"type": "update", "t": -1, "partials": {"vm-b": bytes(32)}}),
        pack({"type": "update", "t": 3, "partials": [1, 2, 3]}),
        pack({"type": "members", "members": "everyone"}),
        pack({"type": "error", "reason": "\x1b[31m" + "x" * 500}),
        pack({"type": "nonsense", "v": 99}),
        pack([1, 2, 3]),
        welcome() + pack({"type": "update", "t": 1, "partials": {"vm-b": b"\x00" * 33}}),
        b"\xdb" + (CHANNEL_LIMIT + 1).to_bytes(4, "big") + b"x" * 1000,  # str over the limit
    ]
    rng = random.Random(seed)
    for _ in range(60):
        wire: dict[str, Any] = {"type": rng.choice(["welcome", "update", "members", "ack"])}
        for key in rng.sample(["v", "tvd", "vm", "t", "partials", "members", "epoch"], 3):
            wire[key] = rng.choice([None, -1, 2**64 - 1, 1.5, "x", b"\x00" * 32, [], {"vm-b": 1}])
        said.append(pack(wire))
    return said


def first_message(data: bytes) -> dict[str, Any]:
    unpacker = msgpack.Unpacker()
    unpacker.feed(data)
    message: dict[str, Any] = next(unpacker)
    return message


async def test_a_fake_bridge_changes_nothing_and_leaks_nothing(
    tmp_path: Path, clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    provisioning = generate("fake", MEMBERS)
    computer_keys = provisioning.for_vm("vm-a")
    secret = bytes(computer_keys.get("vm-b") or b"").hex()
    write_computer_keys(tmp_path / "vm-a.keys", computer_keys, SCHEDULE)
    socket_path = tmp_path / "bridge.sock"
    config = NodeConfig(
        key_file=tmp_path / "vm-a.keys",
        listen="127.0.0.1:0",
        key_channel=KeyChannelSpec("unix", str(socket_path)),
    )
    node_clock = WallClock(offset=SCHEDULE.start(3) + 1)
    hellos = 0
    device = provisioning.for_bridge(1)
    listener = bind_owner_only(socket_path)
    async with open_node(config, clock=node_clock) as node, listener:
        for message in hostile_messages(seed=18):
            stream = await listener.accept()
            async with stream:
                assert first_message(await stream.receive_some(1 << 16))["type"] == "hello"
                hellos += 1
                try:
                    await stream.send_all(message)
                    with trio.move_on_after(1.5):
                        while await stream.receive_some(1 << 16):
                            pass  # its answers (error, hello again) until it hangs up
                except trio.BrokenResourceError:
                    pass  # it hung up while we were still writing: fine
            assert node.period is None  # nothing the fake said gave it a key
        # Then the bridge says the right things: the node takes its keys as if nothing
        # had happened.
        async with await listener.accept() as stream:
            assert first_message(await stream.receive_some(1 << 16))["type"] == "hello"
            now = SCHEDULE.period_at(node_clock.now())  # mock time ran on meanwhile
            device.evolve_to(now)
            partials = {p: bytearray(k) for p, k in device.partials_for("vm-a").items()}
            await stream.send_all(welcome() + channel.encode(channel.Update(now, partials)))
            with trio.move_on_after(5):
                while node.period != now:
                    await trio.sleep(0.01)
            assert node.period == now, node.status()
        # A welcome of another TVD or schedule (SPEC §5): `error schedule`, every key
        # erased, nothing applied from that bridge any more, said in the log.
        async with await listener.accept() as stream:
            await stream.receive_some(1 << 16)
            await stream.send_all(welcome(schedule=Schedule(0.0, 3.0, 5)))
            answer = first_message(await stream.receive_some(1 << 16))
            assert answer == {"type": "error", "reason": "schedule"}
        assert node.period is None and node.status()["schedule_mismatch"] is True
    assert hellos == len(hostile_messages(seed=18))
    assert "event=schedule-mismatch" in caplog.text
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert "Traceback" not in text and not any(r.exc_info for r in caplog.records)
    assert secret and secret not in text

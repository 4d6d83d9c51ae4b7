"""The program each end-to-end guest runs (inside QEMU, with the host's Python over 9p).

It runs a real tvdnet node whose key channel is the guest's virtio-serial port
`org.tvdnet.keys.0`. The harness leads over a second port, `org.tvdnet.e2e.0`: it sends
the plan (one JSON line), then the words `go` and `all-sent`; the guest reports on the
serial console, one JSON object per line prefixed with "E2E ", what the harness asserts
on: readiness, every message received, its own acknowledged sends, the attack's outcome
and its final counters. It never prints key material.

Phases:
1. messaging: every `interval` s, a message to every other member, for `duration` s
   (the periods change several times meanwhile; the harness restarts the bridge midway);
2. the attack (vm-c only): the period key of pair {vm-c, vm-a} that this node holds at
   the start (what malware in vm-c would steal), used after the period changed, in a DATA
   frame sent to vm-a: vm-a must refuse it with REJECT `expired`;
3. measure (vm-a, if the plan says so): the harness sends updates of k partial keys on a
   third port, `org.tvdnet.measure.0` (approach II), and swaps CD-ROM media holding
   UPDATE.MP over QMP (approach I); the guest acknowledges each update on that port as
   soon as it has it, and the harness times period start to acknowledgement.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
from pathlib import Path
from typing import Any

import msgpack
import trio

import tvdnet
from tvdnet import channel
from tvdnet.core import frames
from tvdnet.ports import find_virtio_port, open_char_device

PORT = 7000


def report(kind: str, **fields: Any) -> None:
    print("E2E " + json.dumps({"type": kind, **fields}), flush=True)


class Control:
    """The harness's port: JSON lines in (the plan first, then words)."""

    def __init__(self) -> None:
        self.stream = open_char_device(find_virtio_port("org.tvdnet.e2e.0"))
        self.buffer = b""

    async def line(self) -> str:
        while b"\n" not in self.buffer:
            data = await self.stream.receive_some()
            if not data:  # the harness is not connected (yet): look again
                await trio.sleep(0.2)
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode()

    async def word(self, expected: str) -> None:
        while (line := await self.line()) != expected:
            report("error", detail=f"expected {expected!r} from the harness, got {line!r}")


async def messaging(node: tvdnet.Node, plan: dict[str, Any], control: Control) -> None:
    peers = [m for m in plan["members"] if m != node.vm]
    received: dict[str, list[int]] = {peer: [] for peer in peers}
    acked: dict[str, int] = dict.fromkeys(peers, 0)

    async def receive() -> None:
        async for message in node:
            sender, seq = message.body
            received[sender].append(seq)
            report("received", vm=node.vm, sender=sender, seq=seq, period=message.period)

    async def send_to(peer: str) -> None:
        seq = 0
        deadline = trio.current_time() + plan["duration"]
        # At least `min_messages`, however slow the emulation: the period changes must
        # fall between messages, not before the first one.
        while trio.current_time() < deadline or seq < plan["min_messages"]:
            await node.send(peer, [node.vm, seq], timeout=plan["send_timeout"])
            acked[peer] += 1
            seq += 1
            await trio.sleep(plan["interval"])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive)
        async with trio.open_nursery() as senders:
            for peer in peers:
                senders.start_soon(send_to, peer)
        report("sent", vm=node.vm, acked=acked)
        # Peers may still be sending to us: wait for the harness's word that all are done.
        await control.word("all-sent")
        nursery.cancel_scope.cancel()
    report("received-all", vm=node.vm, counts={p: len(s) for p, s in received.items()},
           in_order={p: s == list(range(len(s))) for p, s in received.items()})  # fmt: skip


async def attack(node: tvdnet.Node, plan: dict[str, Any]) -> None:
    """Malware in this VM steals the current period key of {me, victim}, then uses it late."""
    victim = plan["attack"]["victim"]
    key_state = node._session.key_state(victim)
    stolen_period = key_state.period
    stolen = bytes(key_state.open_key())
    while node.period is None or node.period <= stolen_period:
        await trio.sleep(0.2)
    # SPEC §4 revision 2: a key stays usable on connections of its pair for a short overlap
    # after its period (at most the allowance), and a victim whose clock is a little behind
    # still counts the stolen period as current. Strike once both are surely over.
    schedule = node._agent.schedule
    await node._clock.sleep_until(schedule.end(stolen_period) + node.config.skew_allowance + 2.0)
    # An emulated guest can be slow enough for the victim's handshake timeout: try again.
    for _ in range(3):
        reply = await _forge(node, plan, victim, stolen, stolen_period)
        if reply is None or reply[:2] != [frames.CLOSE, "timeout"]:
            break
    report("attack", vm=node.vm, victim=victim, period=stolen_period,
           reply=reply[:4] if reply else None)  # fmt: skip


async def _forge(
    node: tvdnet.Node, plan: dict[str, Any], victim: str, stolen: bytes, stolen_period: int
) -> list[Any] | None:
    address = plan["addresses"][victim]
    host, port = channel.parse_address(address)
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        nonce, instance = secrets.token_bytes(16), secrets.token_bytes(8)
        await stream.send_all(frames.encode_hello(plan["tvd"], node.vm, victim, nonce, instance))
        unpacker = msgpack.Unpacker(raw=False)
        reply: list[Any] | None = None
        hello: list[Any] | None = None
        with trio.move_on_after(30):
            while reply is None:
                data = await stream.receive_some()
                if not data:
                    break
                unpacker.feed(data)
                for frame in unpacker:
                    if frame[0] == frames.HELLO and hello is None:
                        hello = frame
                        key = frames.traffic_key(
                            stolen, plan["tvd"], node.vm, victim, stolen_period,
                            nonce, hello[5], instance, hello[6],
                        )  # fmt: skip
                        forged = frames.seal_data(
                            frames.new_aead(key), stolen_period, 0,
                            msgpack.packb([[0, 1, [node.vm, "forged"]]]),
                        )  # fmt: skip
                        await stream.send_all(forged)
                    elif frame[0] in (frames.REJECT, frames.CLOSE):
                        reply = frame
                        break
    return reply


async def measure(vm: str) -> None:
    """Acknowledge every update that arrives, by either approach, on the measure port.

    Approach II: `update` messages on the port itself. Approach I: a new medium in the
    CD-ROM drive holding UPDATE.MP, polled every 50 ms as a guest agent would.
    """
    from device_bridge import IsoError, read_update_from_iso

    port = open_char_device(find_virtio_port("org.tvdnet.measure.0"))
    seen: set[int] = set()

    async def ack(update: channel.Update) -> None:
        seen.add(update.t)
        await port.send_all(channel.encode(channel.Ack(update.t, len(update.partials), ())))

    async def serial() -> None:
        reader = channel.ChannelReader()
        while True:
            data = await port.receive_some()
            if not data:
                await trio.sleep(0.05)
            for message in reader.feed(data):
                if isinstance(message, channel.Update):
                    await ack(message)
                elif isinstance(message, channel.Error):  # the harness's "done"
                    return

    async def cdrom() -> None:
        while True:
            try:
                with open("/dev/sr0", "rb") as device:
                    message = channel.decode(read_update_from_iso(device.read()))
                if isinstance(message, channel.Update) and message.t not in seen:
                    await ack(message)
            except (OSError, ValueError, IsoError, channel.ChannelError):
                pass  # no medium yet, or one mid-swap (read short): look again shortly
            await trio.sleep(0.05)

    async with port, trio.open_nursery() as nursery:
        nursery.start_soon(cdrom)
        report("measure-ready", vm=vm)
        await serial()
        nursery.cancel_scope.cancel()
    report("measured", vm=vm, updates=len(seen))


async def main(args: argparse.Namespace) -> None:
    control = Control()
    plan = json.loads(await control.line())
    config = tvdnet.NodeConfig(
        key_file=Path(args.key_file),
        listen=f"{args.ip}:{PORT}",
        key_channel=tvdnet.KeyChannelSpec("virtio", "org.tvdnet.keys.0"),
        send_timeout=plan["send_timeout"],
    )
    async with tvdnet.open_node(config) as node:
        with trio.fail_after(plan["ready_timeout"]):
            while node.period is None or not node._agent.members:
                await trio.sleep(0.2)
        report("ready", vm=node.vm, period=node.period)
        await control.word("go")
        async with trio.open_nursery() as nursery:
            if plan.get("attack", {}).get("attacker") == node.vm:
                nursery.start_soon(attack, node, plan)
            await messaging(node, plan, control)
        report("final", vm=node.vm, stats=dict(node.stats), period=node.period)
    if plan.get("measure") == args.vm:
        await measure(args.vm)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    for name in ("--vm", "--key-file", "--ip"):
        parser.add_argument(name, required=True)
    arguments = parser.parse_args()
    try:
        trio.run(main, arguments)
    except BaseException as exc:  # the harness must see why, on the console
        report("crash", vm=arguments.vm, error=f"{type(exc).__name__}: {exc}"[:500])
        raise
    sys.exit(0)

"""A TVD of real nodes in one trio run, for node tests.

Each VM's key channel is one end of a Unix socketpair (the node reads it as `fd:N`);
the other end is served by a bridge loop built from the same sans-I/O pieces as the
daemon: `DeviceKeys` (U*) and one `VmChannel` per VM. Peers talk over real TCP on
127.0.0.1. Time is a `WallClock` over trio's clock, so MockClock drives the periods.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import trio

from device_bridge._vmchannel import VmChannel
from tvdnet import Node, NodeConfig, WallClock, channel, open_node
from tvdnet.keyfile import write_computer_keys
from tvdnet.scheme import DeviceKeys, Schedule, generate

EPOCH = 1_800_000_000.0


class Harness:
    def __init__(self, tmp: Path, members: list[str], *, period_s: float = 10.0, tvd: str = "t1"):
        self.tmp = tmp
        self.tvd = tvd
        self.members = members
        self.schedule = Schedule(EPOCH, period_s, 100_000)
        provisioning = generate(tvd, members)
        self.device: DeviceKeys = provisioning.for_bridge()
        for vm in members:
            write_computer_keys(tmp / f"{vm}.keys", provisioning.for_vm(vm), self.schedule)
        provisioning.erase()
        # Time starts a little into period 1.
        self.clock = WallClock(offset=EPOCH + 1.0)
        self.nodes: dict[str, Node] = {}
        self.bridge_ends: dict[str, socket.socket] = {}
        self.channels: dict[str, VmChannel] = {}
        self.bridge_up = True
        self._wakeups: dict[str, trio.Event] = {}

    def config(self, vm: str, fd: int) -> NodeConfig:
        return NodeConfig(
            key_file=self.tmp / f"{vm}.keys",
            listen="127.0.0.1:0",
            key_channel=channel_spec(fd),
            send_timeout=60.0,
        )

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Harness]:
        async with trio.open_nursery() as nursery:
            for vm in self.members:
                await nursery.start(self._run_node, vm)
            welcome_members = tuple(
                channel.Member(vm, f"127.0.0.1:{node.listen_port}")
                for vm, node in self.nodes.items()
            )
            for vm in self.members:
                welcome = channel.Welcome(self.tvd, vm, self.schedule, welcome_members)
                self.channels[vm] = VmChannel(vm, welcome)
                nursery.start_soon(self._serve_vm, vm)
            nursery.start_soon(self._periods)
            yield self
            nursery.cancel_scope.cancel()

    async def _run_node(self, vm: str, task_status: trio.TaskStatus[None]) -> None:
        node_end, bridge_end = socket.socketpair()
        self.bridge_ends[vm] = bridge_end
        fd = node_end.detach()
        async with open_node(self.config(vm, fd), clock=self.clock) as node:
            self.nodes[vm] = node
            task_status.started()
            await trio.sleep_forever()

    # ------------------------------------------------------------------ the bridge side

    def _push(self, vm: str, now: float) -> None:
        t = self.device.period
        update = channel.encode(channel.Update(t, self.device.partials_for(vm)))
        self.channels[vm].new_update(t, update, self.schedule.end(t), now)
        self._wake(vm)

    def _wake(self, vm: str) -> None:
        self._wakeups.setdefault(vm, trio.Event()).set()

    async def _periods(self) -> None:
        while True:
            now = self.clock.now()
            t = self.schedule.period_at(now)
            if (self.bridge_up and t > self.device.period) or not self.channels_have_update:
                self.device.evolve_to(t)
                for vm in self.members:
                    self._push(vm, now)
                self.channels_have_update = True
            await self.clock.sleep_until(self.schedule.end(t))

    channels_have_update = False

    async def _serve_vm(self, vm: str) -> None:
        sock = trio.socket.from_stdlib_socket(self.bridge_ends[vm])
        stream = trio.SocketStream(sock)
        vmch = self.channels[vm]
        vmch.connection_made(self.clock.now())

        async def reader() -> None:
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return
                if self.bridge_up:
                    vmch.receive_data(data, self.clock.now())
                    self._wake(vm)

        async def timers() -> None:
            while True:
                deadline = vmch.next_deadline()
                if deadline == float("inf"):
                    await trio.sleep(0.5)
                else:
                    await self.clock.sleep_until(deadline)
                    vmch.handle_timeout(self.clock.now())
                    self._wake(vm)

        async with stream, trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            nursery.start_soon(timers)
            while True:
                event = self._wakeups.setdefault(vm, trio.Event())
                await event.wait()
                self._wakeups[vm] = trio.Event()
                data = vmch.data_to_send()
                if data and self.bridge_up:
                    await stream.send_all(data)

    async def wait_keys(self, t: int | None = None) -> None:
        """Until every node holds keys for every pair (of period t, if given)."""
        with trio.fail_after(60):
            while True:
                ok = all(
                    node.period is not None
                    and (t is None or node.period >= t)
                    and all(node._session.key_state(p).has_key for p in node.peers)
                    for node in self.nodes.values()
                )
                if ok:
                    return
                await trio.sleep(0.01)


def channel_spec(fd: int) -> object:
    from tvdnet import KeyChannelSpec

    return KeyChannelSpec("fd", str(fd))

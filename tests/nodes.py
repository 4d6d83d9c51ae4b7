"""A TVD of real nodes in one trio run, for node tests.

Each VM's key channel is one end of a Unix socketpair (the node reads it as `fd:N`);
the other end is served by a small bridge loop built from the daemon's own sans-I/O
pieces: `DeviceKeys` (U*) and one `VmChannel` per VM. Peers talk over real TCP on
127.0.0.1. Time is a `WallClock` over trio's clock, so MockClock drives the periods.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import trio

from device_bridge._vmchannel import VmChannel
from tvdnet import KeyChannelSpec, Node, NodeConfig, WallClock, channel, open_node
from tvdnet._forge import period_key_from
from tvdnet.keyfile import write_computer_keys
from tvdnet.scheme import DeviceKeys, Pair, Schedule, generate

EPOCH = 1_800_000_000.0


class Harness:
    def __init__(
        self,
        tmp: Path,
        members: list[str],
        *,
        period_s: float = 10.0,
        tvd: str = "t1",
        max_unauthenticated: int = 64,
        epoch: float = EPOCH,
        clock: WallClock | None = None,
        external: tuple[str, ...] = (),
    ) -> None:
        """`external` members' nodes run elsewhere: `external_config(vm)` says how."""
        self.max_unauthenticated = max_unauthenticated
        self.external = external
        self.tmp = tmp
        self.tvd = tvd
        self.members = members
        self.schedule = Schedule(epoch, period_s, 100_000)
        provisioning = generate(tvd, members)
        self.device: DeviceKeys = provisioning.for_bridge()
        # For tests that forge frames: dev_1 of each pair and every VM's computer keys.
        start = provisioning.for_bridge()
        self._dev_1 = {pair: bytes(start.key_bytes(pair)) for pair in start.pairs}
        self._computer = {vm: provisioning.for_vm(vm) for vm in members}
        for vm in members:
            write_computer_keys(tmp / f"{vm}.keys", provisioning.for_vm(vm), self.schedule)
        provisioning.erase()
        # By default time starts 1 s into period 1 (for MockClock); real-time tests pass
        # WallClock() and an epoch just behind the real time.
        self.clock = clock or WallClock(offset=epoch + 1.0)
        self.nodes: dict[str, Node] = {}
        self.ports: dict[str, int] = {}
        self._external_fds: dict[str, int] = {}
        self._external_ends: dict[str, socket.socket] = {}
        self.channels: dict[str, VmChannel] = {}
        self.bridge_up = True
        self.pushed = 0  # the newest period the bridge pushed
        self._nursery: trio.Nursery | None = None
        self._node_scopes: dict[str, trio.CancelScope] = {}
        self._wakeups: dict[str, trio.Event] = {}
        for vm in external:
            node_end, bridge_end = socket.socketpair()
            self._external_ends[vm] = bridge_end
            self.ports[vm] = _free_port()
            self._external_fds[vm] = node_end.detach()

    def period_key(self, a: str, b: str, t: int) -> bytes:
        """SK_t of pair {a, b}, computed from scratch (G, U*, U), for forging test frames."""
        comp = self._computer[a].get(b)
        assert comp is not None
        return period_key_from(self._dev_1[Pair.of(a, b)], 1, comp, self.tvd, a, b, t)

    def external_config(self, vm: str) -> NodeConfig:
        """The config of an external member's node (its key channel end is already made)."""
        return self.config(vm, self._external_fds[vm])

    def config(self, vm: str, fd: int) -> NodeConfig:
        port = self.ports.get(vm, 0)
        return NodeConfig(
            key_file=self.tmp / f"{vm}.keys",
            listen=f"127.0.0.1:{port}",
            key_channel=KeyChannelSpec("fd", str(fd)),
            send_timeout=120.0,
            max_unauthenticated=self.max_unauthenticated,
        )

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Harness]:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            # Nodes first (their ports go into the welcome), then the bridge's side of each
            # channel: a node's hello waits in the socket until the bridge reads it.
            ends = {
                vm: self._external_ends[vm]
                if vm in self.external
                else await self._start_node_only(vm)
                for vm in self.members
            }
            members = tuple(
                channel.Member(vm, f"127.0.0.1:{self.ports[vm]}") for vm in self.members
            )
            for vm in self.members:
                welcome = channel.Welcome(self.tvd, vm, self.schedule, members)
                self.channels[vm] = VmChannel(vm, welcome)
                await nursery.start(self._serve_vm, vm, ends[vm])
            nursery.start_soon(self._periods)
            yield self
            nursery.cancel_scope.cancel()

    async def _start_node_only(self, vm: str) -> socket.socket:
        assert self._nursery is not None
        node_end, bridge_end = socket.socketpair()
        await self._nursery.start(self._run_node, vm, node_end.detach())
        return bridge_end

    async def restart_node(self, vm: str) -> Node:
        """Start vm's node again (a new process: a new instance), with a new key channel."""
        assert self._nursery is not None
        bridge_end = await self._start_node_only(vm)
        await self._nursery.start(self._serve_vm, vm, bridge_end)
        return self.nodes[vm]

    def stop_node(self, vm: str) -> None:
        self._node_scopes.pop(vm).cancel()
        del self.nodes[vm]

    async def _run_node(self, vm: str, fd: int, task_status: trio.TaskStatus[None]) -> None:
        with trio.CancelScope() as scope:
            self._node_scopes[vm] = scope
            async with open_node(self.config(vm, fd), clock=self.clock) as node:
                self.nodes[vm] = node
                assert node.listen_port is not None
                self.ports[vm] = node.listen_port
                task_status.started()
                await trio.sleep_forever()

    # ------------------------------------------------------------------ the bridge side

    def _push(self, vm: str, now: float) -> None:
        t = self.device.period
        update = channel.encode(channel.Update(t, self.device.partials_for(vm)))
        self.channels[vm].new_update(t, update, self.schedule.end(t), now)
        self._wake(vm)

    def push_all(self) -> None:
        now = self.clock.now()
        self.pushed = self.schedule.period_at(now)
        self.device.evolve_to(self.pushed)
        for vm in (*self.nodes, *self.external):
            self._push(vm, now)

    def _wake(self, vm: str) -> None:
        self._wakeups.setdefault(vm, trio.Event()).set()

    async def _periods(self) -> None:
        while True:
            t = self.schedule.period_at(self.clock.now())
            if self.bridge_up and t > self.pushed:
                self.push_all()
            await self.clock.sleep_until(self.schedule.end(t))

    async def _serve_vm(
        self, vm: str, sock: socket.socket, task_status: trio.TaskStatus[None]
    ) -> None:
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        vmch = self.channels[vm]
        vmch.connection_made(self.clock.now())

        async def reader() -> None:
            while data := await stream.receive_some(65536):
                if self.bridge_up:
                    vmch.receive_data(data, self.clock.now())
                    self._wake(vm)
            nursery.cancel_scope.cancel()  # the node went away

        async def timers() -> None:
            while True:
                deadline = vmch.next_deadline()
                await self.clock.sleep_until(min(deadline, self.clock.now() + 0.5))
                vmch.handle_timeout(self.clock.now())
                self._wake(vm)

        async with stream, trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            nursery.start_soon(timers)
            task_status.started()
            while True:
                event = self._wakeups.setdefault(vm, trio.Event())
                await event.wait()
                self._wakeups[vm] = trio.Event()
                data = vmch.data_to_send()
                if data and self.bridge_up:
                    with contextlib.suppress(trio.BrokenResourceError):
                        await stream.send_all(data)

    async def wait_keys(self, t: int | None = None) -> None:
        """Until every node holds keys for every pair (of period t or later, if given)."""
        with trio.fail_after(120):
            while not all(
                node.period is not None
                and (t is None or node.period >= t)
                and all(node._session.key_state(p).has_key for p in node.peers)
                for node in self.nodes.values()
            ):
                await trio.sleep(0.01)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port

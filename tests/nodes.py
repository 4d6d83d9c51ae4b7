"""A TVD of real nodes and the real bridge in one trio run, for node tests.

The bridge is `device_bridge.open_bridge`, listening on one Unix socket per VM in the
test's directory (`unix-listen:`); each node's key channel connects there (`unix:`), so a
bridge that stops and starts again is an outage the nodes ride out by reconnecting, as
they would a host daemon restart. Peers talk over real TCP on 127.0.0.1. Time is a
`WallClock` over trio's clock, so MockClock drives the periods.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import trio

from device_bridge import Bridge, MemberConfig, TvdConfig, UnixListen, open_bridge
from tvdnet import KeyChannelSpec, Node, NodeConfig, WallClock, open_node
from tvdnet.core.scheme import DeviceKeys, Pair, Schedule, generate
from tvdnet.keyfile import write_computer_keys
from tvdnet_tools.forge import period_key_from
from tvdnet_tools.local import free_port

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
        bridge_lead: float = 0.0,
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
        # A bridge whose clock runs `bridge_lead` seconds ahead pushes each period's
        # update that much early (within the nodes' allowance: they apply it early).
        self.bridge_clock = (
            WallClock(offset=self.clock.offset + bridge_lead) if bridge_lead else self.clock
        )
        # Ports are chosen up front: they go into the welcome before any node runs, and a
        # restarted node comes back where its peers expect it.
        self.ports = {vm: free_port() for vm in members}
        self.config_of_tvd = TvdConfig.for_schedule(
            tvd,
            self.schedule,
            [
                MemberConfig(vm, f"127.0.0.1:{self.ports[vm]}", UnixListen(self._socket(vm)))
                for vm in members
            ],
        )
        self.nodes: dict[str, Node] = {}
        self.bridge: Bridge | None = None
        self._nursery: trio.Nursery | None = None
        self._bridge_scope: trio.CancelScope | None = None
        self._node_scopes: dict[str, trio.CancelScope] = {}

    def _socket(self, vm: str) -> Path:
        return self.tmp / f"{vm}.channel"

    def period_key(self, a: str, b: str, t: int) -> bytes:
        """SK_t of pair {a, b}, computed from scratch (G, U*, U), for forging test frames."""
        comp = self._computer[a].get(b)
        assert comp is not None
        return period_key_from(self._dev_1[Pair.of(a, b)], 1, comp, self.tvd, a, b, t)

    def external_config(self, vm: str) -> NodeConfig:
        """The config of an external member's node: it reaches the same bridge."""
        return self.config(vm)

    def config(self, vm: str) -> NodeConfig:
        return NodeConfig(
            key_file=self.tmp / f"{vm}.keys",
            listen=f"127.0.0.1:{self.ports[vm]}",
            key_channel=KeyChannelSpec("unix", str(self._socket(vm))),
            send_timeout=120.0,
            max_unauthenticated=self.max_unauthenticated,
        )

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Harness]:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self.start_bridge()
            for vm in self.members:
                if vm not in self.external:
                    await nursery.start(self._run_node, vm)
            yield self
            nursery.cancel_scope.cancel()

    @property
    def bridge_up(self) -> bool:
        return self.bridge is not None

    async def start_bridge(self) -> None:
        """Start the bridge (again): it evolves to the current period and pushes it."""
        assert self._nursery is not None and self.bridge is None
        await self._nursery.start(self._run_bridge)

    def stop_bridge(self) -> None:
        """Stop the bridge: its sockets close, the nodes lose their key channel."""
        assert self._bridge_scope is not None
        self._bridge_scope.cancel()
        self._bridge_scope = self.bridge = None

    async def _run_bridge(self, task_status: trio.TaskStatus[None]) -> None:
        with trio.CancelScope() as scope:
            self._bridge_scope = scope
            async with open_bridge(
                self.config_of_tvd, self.device, clock=self.bridge_clock
            ) as bridge:
                self.bridge = bridge
                task_status.started()
                await trio.sleep_forever()

    async def restart_node(self, vm: str) -> Node:
        """Start vm's node again (a new process: a new instance)."""
        assert self._nursery is not None
        await self._nursery.start(self._run_node, vm)
        return self.nodes[vm]

    def stop_node(self, vm: str) -> None:
        self._node_scopes.pop(vm).cancel()
        del self.nodes[vm]

    async def _run_node(self, vm: str, task_status: trio.TaskStatus[None]) -> None:
        with trio.CancelScope() as scope:
            self._node_scopes[vm] = scope
            async with open_node(self.config(vm), clock=self.clock) as node:
                self.nodes[vm] = node
                task_status.started()
                await trio.sleep_forever()

    def delay_updates(self, vm: str, delay: float, nursery: trio.Nursery) -> None:
        """Every update the bridge hands `vm`'s worker reaches it `delay` seconds later."""
        assert self.bridge is not None
        worker = self.bridge.worker(vm)
        deliver = worker.new_update

        async def later(
            t: int, update: bytes, start: float, end: float, kwargs: dict[str, Any]
        ) -> None:
            await trio.sleep(delay)
            deliver(t, update, start, end, self.bridge_clock.now(), **kwargs)

        def new_update(
            t: int, update: bytes, period_start: float, period_end: float, now: float, **kw: Any
        ) -> None:
            nursery.start_soon(later, t, update, period_start, period_end, kw)

        # Replacing a method on one instance is the point here (mypy refuses that).
        worker.new_update = new_update  # type: ignore[method-assign]

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

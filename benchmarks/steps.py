"""What a period costs the bridge and the nodes, counted rather than timed.

One trio run under MockClock holds the real bridge (`open_bridge`), a hub node and N-1
peer nodes (`open_node`) in a star TVD: the key channels are socket pairs, the peers
talk to the hub over TCP on 127.0.0.1. After two periods to start and connect (each peer
sends the hub one message), --periods more periods of 5 s pass with no traffic, and
these are counted, per period:

- task steps: how many times trio ran a task of the bridge, of the hub, or of the peers
  (a trio Instrument's `before_task_step`);
- Python calls: the function calls made while such a task ran (`sys.setprofile`), trio's
  own included.

Figures: bridge per VM, each peer node, and the hub per peer.

The data path (`--data`) is counted the same way: two nodes on loopback TCP under
MockClock, vm-a sends --messages messages of 64 bytes to vm-b, each `send()` returning on
the peer's ACK, first one at a time (`1 in flight`: no coalescing, the whole path per
message) and then with 64 sends outstanding (`64 in flight`). Figures: task steps and
Python calls per message, both nodes together (sending, sealing, writing, reading,
opening, delivering to the inbox, the ACK back), with the sending and receiving tasks'
few calls of their own.

Counts do not depend on how busy the machine is, which timings on these shared machines
do (BENCHMARKS.md): a task step or a call costs the same CPU before and after a change,
so fewer is less CPU, and a regression shows as a count.

    python benchmarks/steps.py [--vms 50] [--periods 4] [--messages 2000] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import FrameType
from typing import Any

import trio
import trio.testing

from device_bridge import TvdConfig, open_bridge
from device_bridge._config import MemberConfig
from device_bridge._transports import StreamPort
from tvdnet import KeyChannelSpec, NodeConfig, WallClock, open_node
from tvdnet.core.scheme import Schedule, generate
from tvdnet.keyfile import write_computer_keys
from tvdnet_tools.local import free_port_block

PERIOD_S = 5.0
EPOCH = 1_800_000_000.0
HUB = "hub"


class Tally(trio.abc.Instrument):
    """Task steps and Python calls, by whose task ran: bridge, hub or peer."""

    def __init__(self, hub_tasks: set[trio.lowlevel.Task]) -> None:
        self.counting = False
        self.steps: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()
        self.hub_tasks = hub_tasks
        self._now: str | None = None

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._now = _owner(task, self.hub_tasks)
        if self.counting and self._now is not None:
            self.steps[self._now] += 1

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        self._now = None

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        parent = task.parent_nursery.parent_task if task.parent_nursery else None
        if parent in self.hub_tasks:
            self.hub_tasks.add(task)

    def profile(self, frame: FrameType, event: str, arg: object) -> None:
        if event == "call" and self.counting and self._now is not None:
            self.calls[self._now] += 1


def _owner(task: trio.lowlevel.Task, hub_tasks: set[trio.lowlevel.Task]) -> str | None:
    if task in hub_tasks:
        return HUB
    if task.name.startswith(("vm:", "periods", "keystore", "device_bridge.")):
        return "bridge"
    if task.name.startswith("tvdnet."):
        return "peer"
    return None  # the benchmark's own tasks and trio's


async def _node(
    config: NodeConfig,
    clock: WallClock,
    ready: trio.Event,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    async with open_node(config, clock=clock) as node:
        task_status.started()
        while node.period is None:
            await trio.sleep(0.05)
        if node.vm != HUB:
            await node.send(HUB, "connect")
        ready.set()
        async for _ in node:
            pass


async def _run(vms: int, periods: int, tally: Tally, directory: Path) -> None:
    ids = [HUB, *(f"vm{i:04d}" for i in range(1, vms))]
    schedule = Schedule(EPOCH, PERIOD_S, 1000)
    ports = {vm: StreamPort(vm) for vm in ids}
    base = free_port_block(len(ids))
    addresses = {vm: f"127.0.0.1:{base + i}" for i, vm in enumerate(ids)}
    members = [MemberConfig(vm, addresses[vm], ports[vm]) for vm in ids]
    config = TvdConfig.for_schedule("steps", schedule, members, pairs=f"star:{HUB}")
    provisioning = generate("steps", ids, pairs=[(HUB, vm) for vm in ids[1:]])
    clock = WallClock(offset=schedule.start(1) + 0.5)
    async with (
        open_bridge(config, provisioning.for_bridge(1), clock=clock),
        trio.open_nursery() as nursery,
    ):
        readies = []
        for vm in ids:
            key_file = directory / f"{vm}.keys"
            write_computer_keys(key_file, provisioning.for_vm(vm), schedule)
            bridge_end, node_end = socket.socketpair()
            await ports[vm].attach(trio.SocketStream(trio.socket.from_stdlib_socket(bridge_end)))
            node_config = NodeConfig(
                key_file=key_file,
                listen=addresses[vm],
                key_channel=KeyChannelSpec("fd", str(node_end.detach())),
                max_unauthenticated=vms + 64,
            )
            ready = trio.Event()
            readies.append(ready)
            if vm == HUB:
                # Everything the hub's node task starts is the hub's.
                await nursery.start(_hub_node, node_config, clock, ready, tally)
            else:
                await nursery.start(_node, node_config, clock, ready)
        for ready in readies:
            await ready.wait()
        await trio.sleep_until(clock.trio_time(schedule.start(3)) - 0.01)
        tally.counting = True
        await trio.sleep_until(clock.trio_time(schedule.start(3 + periods)) - 0.01)
        tally.counting = False
        nursery.cancel_scope.cancel()


async def _hub_node(
    config: NodeConfig,
    clock: WallClock,
    ready: trio.Event,
    tally: Tally,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    tally.hub_tasks.add(trio.lowlevel.current_task())
    await _node(config, clock, ready, task_status=task_status)


def _counted(run: Callable[..., Awaitable[Any]], tally: Tally | DataTally, *args: Any) -> Any:
    """`run(*args, tally, directory)` under MockClock, with `tally` counting steps and calls."""
    with tempfile.TemporaryDirectory(prefix="tvdsteps") as directory:
        sys.setprofile(tally.profile)
        try:
            return trio.run(
                run,
                *args,
                tally,
                Path(directory),
                clock=trio.testing.MockClock(autojump_threshold=0),
                instruments=[tally],
            )
        finally:
            sys.setprofile(None)


def measure(vms: int, periods: int) -> dict[str, Any]:
    tally = Tally(set())
    _counted(_run, tally, vms, periods)
    peers = vms - 1
    per = {"bridge": vms * periods, "peer": peers * periods, HUB: peers * periods}
    return {
        "vms": vms,
        "periods_counted": periods,
        "task_steps": {k: tally.steps[k] / n for k, n in per.items()},
        "python_calls": {k: tally.calls[k] / n for k, n in per.items()},
    }


class DataTally(trio.abc.Instrument):
    """Task steps and Python calls of every task: the nodes' and the senders' and the
    receiver's, which call `send()` and read the inbox (a few calls of their own)."""

    def __init__(self) -> None:
        self.counting = False
        self.steps = 0
        self.calls = 0
        self._node_task = False

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._node_task = self.counting
        self.steps += self._node_task

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        self._node_task = False

    def profile(self, frame: FrameType, event: str, arg: object) -> None:
        if event == "call" and self._node_task:
            self.calls += 1


async def _data_run(messages: int, tally: DataTally, directory: Path) -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from nodes import Harness  # the test suite's two-node harness (bridge over sockets)

    harness = Harness(directory, ["vm-a", "vm-b"], period_s=3600.0)
    body = bytes(64)
    result: dict[str, Any] = {}
    async with harness.running():
        await harness.wait_keys()
        a, b = harness.nodes["vm-a"], harness.nodes["vm-b"]

        async def drain() -> None:
            async for _ in b:
                pass

        async def send_many(count: int) -> None:
            for _ in range(count):
                await a.send("vm-b", body)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain)
            await a.send("vm-b", b"warm-up")
            for label, in_flight in (("1 in flight", 1), ("64 in flight", 64)):
                await trio.sleep(1)  # every timer and ACK of the warm-up has run
                tally.steps = tally.calls = 0
                tally.counting = True
                async with trio.open_nursery() as senders:
                    for _ in range(in_flight):
                        senders.start_soon(send_many, messages // in_flight)
                tally.counting = False
                sent = messages // in_flight * in_flight
                result[label] = {
                    "task_steps": tally.steps / sent,
                    "python_calls": tally.calls / sent,
                }
            nursery.cancel_scope.cancel()
    return result


def measure_data(messages: int) -> dict[str, Any]:
    result: dict[str, Any] = _counted(_data_run, DataTally(), messages)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vms", type=int, default=50, help="VMs: a hub and VMS-1 peers")
    parser.add_argument("--periods", type=int, default=4, help="idle periods counted")
    parser.add_argument("--messages", type=int, default=2048, help="data-path messages")
    parser.add_argument("--data", action="store_true", help="count the data path only")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    data = measure_data(args.messages)
    print(f"data path, {args.messages} messages of 64 B, both nodes, per message:")
    for label, figures in data.items():
        print(
            f"  {label:16} {figures['task_steps']:6.2f} task steps "
            f"{figures['python_calls']:7.0f} Python calls"
        )
    if args.data:
        if args.json:
            args.json.write_text(json.dumps({"data_path": data}, indent=2) + "\n")
        return
    result = measure(args.vms, args.periods)
    result["data_path"] = data
    print(f"{args.vms} VMs, {args.periods} idle periods of {PERIOD_S:g} s counted, per period:")
    for who, label in (("bridge", "bridge, per VM"), ("peer", "peer node"), (HUB, "hub, per peer")):
        print(
            f"  {label:16} {result['task_steps'][who]:6.2f} task steps "
            f"{result['python_calls'][who]:7.0f} Python calls"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

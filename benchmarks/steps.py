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

Figures: bridge per VM, each peer node, and the hub per peer. Counts do not depend on how
busy the machine is, which timings on these shared machines do (BENCHMARKS.md): a task
step or a call costs the same CPU before and after a change, so fewer is less CPU.

    python benchmarks/steps.py [--vms 50] [--periods 4] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
from collections import Counter
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
from tvdnet_tools.local import free_port

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
    addresses = {vm: f"127.0.0.1:{free_port()}" for vm in ids}
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


def measure(vms: int, periods: int) -> dict[str, Any]:
    tally = Tally(set())
    with tempfile.TemporaryDirectory(prefix="tvdsteps") as directory:
        sys.setprofile(tally.profile)
        try:
            trio.run(
                _run,
                vms,
                periods,
                tally,
                Path(directory),
                clock=trio.testing.MockClock(autojump_threshold=0),
                instruments=[tally],
            )
        finally:
            sys.setprofile(None)
    peers = vms - 1
    per = {"bridge": vms * periods, "peer": peers * periods, HUB: peers * periods}
    return {
        "vms": vms,
        "periods_counted": periods,
        "task_steps": {k: tally.steps[k] / n for k, n in per.items()},
        "python_calls": {k: tally.calls[k] / n for k, n in per.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vms", type=int, default=50, help="VMs: a hub and VMS-1 peers")
    parser.add_argument("--periods", type=int, default=4, help="idle periods counted")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = measure(args.vms, args.periods)
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

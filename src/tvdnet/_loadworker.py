"""One worker process of `tvdnet loadtest`: many nodes in one trio run.

    python -m tvdnet._loadworker SPEC.json

The spec names the nodes to run (configs), whom each sends to, the rate, the size and
the length. The worker talks to the orchestrator in JSON lines: on stdout `ready`, one
`tick` a second and a `final` report; on stdin `go` (start sending) and `stop`.
Bodies are `[sender, seq, monotonic send time, padding]`, so that receivers can tell
a duplicate, a gap, and the one-way latency (CLOCK_MONOTONIC is shared by every process
on the machine).
"""

from __future__ import annotations

import json
import logging
import math
import random
import resource
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from ._config import NodeConfig
from ._errors import TvdnetError
from ._node import Node, open_node

logger = logging.getLogger("tvdnet.loadtest")


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _emit(kind: str, **fields: Any) -> None:
    print(json.dumps({"type": kind, **fields}), flush=True)


class Tally:
    """What this worker saw: sends, latencies, and every (sender, seq) received."""

    def __init__(self) -> None:
        self.acked = 0
        self.failed: Counter[str] = Counter()
        self.latencies: list[float] = []  # send() to acknowledgement, seconds
        self.one_way: list[float] = []  # send() call to delivery at the receiver, seconds
        self.sent_by: Counter[str] = Counter()  # (sender->receiver) -> acknowledged sends
        self.received: dict[str, int] = {}  # sender->receiver -> highest seq seen in order
        self.lost_order = 0
        self.duplicates = 0
        self.tick_acked = 0
        self.tick_latencies: list[float] = []

    def on_received(self, receiver: str, body: Any) -> None:
        sender, seq, sent_at = body[0], body[1], body[2]
        key = f"{sender}>{receiver}"
        expected = self.received.get(key, -1) + 1
        if seq == expected:
            self.received[key] = seq
        elif seq < expected:
            self.duplicates += 1
        else:
            self.lost_order += 1  # a gap: some earlier message never came
            self.received[key] = seq
        self.one_way.append(time.monotonic() - sent_at)


async def _sender(
    node: Node, peer: str, rate: float, pad: bytes, tally: Tally, stop: trio.Event, offset: float
) -> None:
    seq = 0
    interval = 1.0 / rate
    start = trio.current_time() + offset
    key = f"{node.vm}>{peer}"
    while not stop.is_set():
        await trio.sleep_until(start + seq * interval)
        if stop.is_set():
            return
        began = time.monotonic()
        try:
            await node.send(peer, [node.vm, seq, began, pad])
        except TvdnetError as exc:
            tally.failed[type(exc).__name__] += 1
            seq += 1
            continue
        latency = time.monotonic() - began
        tally.acked += 1
        tally.sent_by[key] += 1
        tally.latencies.append(latency)
        tally.tick_acked += 1
        tally.tick_latencies.append(latency)
        seq += 1


async def _receiver(node: Node, tally: Tally) -> None:
    async for message in node:
        tally.on_received(node.vm, message.body)


@asynccontextmanager
async def _nodes(configs: list[NodeConfig]) -> AsyncIterator[list[Node]]:
    async with AsyncExitStack() as stack:
        nodes = [await stack.enter_async_context(open_node(config)) for config in configs]
        yield nodes


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


async def run(spec: dict[str, Any]) -> None:
    configs = [NodeConfig.from_mapping(c, source=f"node {c['key_file']}") for c in spec["nodes"]]
    pad = bytes(max(0, spec["size"] - 40))
    tally = Tally()
    rss_before = _rss_kb()
    async with _nodes(configs) as nodes, trio.open_nursery() as nursery:
        with trio.fail_after(spec.get("ready_timeout", 300)):
            while not all(node.period is not None for node in nodes):
                await trio.sleep(0.05)
        for node in nodes:
            nursery.start_soon(_receiver, node, tally)
        rss_ready = _rss_kb()
        _emit("ready", nodes=len(nodes), rss_kb=rss_ready, rss_before_kb=rss_before)
        stdin = trio.lowlevel.FdStream(0)
        line = await stdin.receive_some()
        if not line.startswith(b"go"):
            return
        stop = trio.Event()
        targets = spec["targets"]  # vm -> peers it sends to
        rng = random.Random(spec.get("seed", 1))  # noqa: S311 -- jitter, not keys
        for node in nodes:
            for peer in targets.get(node.vm, []):
                offset = spec.get("start_delay", 0.0) + rng.random() / spec["rate"]
                nursery.start_soon(_sender, node, peer, spec["rate"], pad, tally, stop, offset)

        per_peer_kb: float | None = None

        async def ticks() -> None:
            nonlocal per_peer_kb
            while True:
                await trio.sleep(1.0)
                if spec["role"] == "hub" and per_peer_kb is None:
                    hub = nodes[0]
                    connected = sum(
                        1 for p in hub.peers if hub._session.peer_status(p)["connected"]
                    )
                    if connected == len(hub.peers):
                        # Everything a peer costs the hub, measured once all are connected.
                        per_peer_kb = (_rss_kb() - rss_ready) / max(1, connected)
                _emit(
                    "tick",
                    at=time.time(),
                    acked=tally.tick_acked,
                    p50_ms=_percentile(tally.tick_latencies, 0.5) * 1000,
                    p99_ms=_percentile(tally.tick_latencies, 0.99) * 1000,
                )
                tally.tick_acked = 0
                tally.tick_latencies = []

        nursery.start_soon(ticks)
        await stdin.receive_some()  # "stop" (or EOF: the orchestrator went away)
        stop.set()
        # Let what is in flight be acknowledged, then report.
        with trio.move_on_after(spec.get("drain", 30)):
            while any(n._session.unacknowledged(p) for n in nodes for p in n.peers):
                await trio.sleep(0.1)
            await trio.sleep(1.0)  # the last deliveries reach the receivers' tallies
        totals: Counter[str] = Counter()
        for node in nodes:
            totals.update(node.stats)
        _emit(
            "final",
            role=spec["role"],
            acked=tally.acked,
            failed=dict(tally.failed),
            sent_by=dict(tally.sent_by),
            received={k: v + 1 for k, v in tally.received.items()},
            gaps=tally.lost_order,
            duplicates=tally.duplicates,
            latencies_ms=[round(x * 1000, 3) for x in tally.latencies],
            one_way_ms=[round(x * 1000, 3) for x in tally.one_way],
            stats=dict(totals),
            peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            per_peer_state_kb=per_peer_kb,
        )
        nursery.cancel_scope.cancel()


def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s %(message)s")
    spec = json.loads(Path(sys.argv[1]).read_text())
    trio.run(run, spec)


if __name__ == "__main__":
    main()

"""One worker process of `tvdnet loadtest`: many nodes in one trio run.

    python -m tvdnet_tools.loadworker SPEC.json

The spec names the nodes to run (configs), whom each sends to, the rate, the size, and
where to write the final report. The worker and the orchestrator talk in JSON lines, in
phases:

    worker -> `ready`       every node has applied a key update (holds keys for its pairs)
    <- `connect`            peers send message 0 to the hub and wait for its ack; the hub
                            waits until every peer's message 0 arrived, then measures
                            what the peers cost it
    worker -> `connected`   (the hub's carries `per_peer_kib`)
    <- `go`                 traffic at the rate, both ways; a `tick` a second
    <- `stop`               stop sending, let what is in flight be acknowledged
    worker -> `drained`     nothing this worker sent is unacknowledged
    <- `report`             (every worker drained) take what is left in the inboxes
    worker -> `final`       the report is in the file the spec named

Bodies are `[sender, seq, monotonic send time, padding]`, so that receivers can tell a
duplicate, a gap, and the one-way latency (CLOCK_MONOTONIC is shared by every process
on the machine).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
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

from tvdnet import Node, NodeConfig, open_node
from tvdnet.core.errors import TvdnetError

logger = logging.getLogger("tvdnet.loadtest")


def _trim() -> None:
    """Collect garbage and hand freed heap back to the OS (glibc), so that resident
    memory counts what is held, not the allocator's slack from a connection storm."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class GcTimer:
    """CPU seconds this process spent in the cyclic garbage collector (gc.callbacks).

    CPU time of the collecting thread, not wall time: on a machine that preempts the
    process mid-collection, wall time would charge the wait to the collector.
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self.collections = 0
        self._began = 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._began = time.thread_time()
        else:
            self.seconds += time.thread_time() - self._began
            self.collections += 1


def _emit(kind: str, **fields: Any) -> None:
    print(json.dumps({"type": kind, **fields}), flush=True)


class Tally:
    """What this worker saw: sends, latencies, and every (sender, seq) received."""

    def __init__(self) -> None:
        self.acked = 0
        self.in_flight = 0  # send() calls not returned yet
        self.failed: Counter[str] = Counter()
        # (monotonic time send() was called, send() to acknowledgement in seconds)
        self.latencies: list[tuple[float, float]] = []
        # (monotonic send time, send() call to delivery at the receiver in seconds)
        self.one_way: list[tuple[float, float]] = []
        self.sent_by: Counter[str] = Counter()  # sender>receiver -> acknowledged sends
        self.received: dict[str, int] = {}  # sender>receiver -> highest seq seen in order
        self.gaps = 0
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
            self.gaps += 1  # some earlier message never came (or comes out of order)
            self.received[key] = seq
        self.one_way.append((sent_at, time.monotonic() - sent_at))

    async def send(
        self, node: Node, peer: str, seq: int, pad: bytes, timeout: float | None = None
    ) -> bool:
        began = time.monotonic()
        self.in_flight += 1
        try:
            await node.send(peer, [node.vm, seq, began, pad], timeout=timeout)
        except TvdnetError as exc:
            self.failed[type(exc).__name__] += 1
            return False
        finally:
            self.in_flight -= 1
        latency = time.monotonic() - began
        self.acked += 1
        self.sent_by[f"{node.vm}>{peer}"] += 1
        self.latencies.append((began, latency))
        self.tick_acked += 1
        self.tick_latencies.append(latency)
        return True


async def _sender(
    node: Node,
    peer: str,
    first_seq: int,
    rate: float,
    pad: bytes,
    tally: Tally,
    stop: trio.Event,
    offset: float,
) -> None:
    interval = 1.0 / rate
    start = trio.current_time() + offset
    seq = first_seq
    while not stop.is_set():
        await trio.sleep_until(start + (seq - first_seq) * interval)
        if stop.is_set():
            return
        await tally.send(node, peer, seq, pad)
        seq += 1


async def _receiver(node: Node, tally: Tally) -> None:
    async for message in node:
        tally.on_received(node.vm, message.body)


@asynccontextmanager
async def _nodes(configs: list[NodeConfig], *, freeze: bool) -> AsyncIterator[list[Node]]:
    async with AsyncExitStack() as stack:
        nodes = []
        for config in configs:
            nodes.append(await stack.enter_async_context(open_node(config)))
            if freeze:
                gc.freeze()
        yield nodes


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


class _Commands:
    """The orchestrator's lines on stdin (read in a thread: stdin may be a pipe or a tty)."""

    def __init__(self) -> None:
        self._stdin = trio.wrap_file(sys.stdin)

    async def next(self) -> str:
        line = await self._stdin.readline()
        return line.strip() or "eof"


async def _connect_peers(
    nodes: list[Node], targets: dict[str, list[str]], pad: bytes, tally: Tally, ramp: int
) -> None:
    """Each peer's message 0 to the hub, acknowledged: every connection is up.

    At most `ramp` at a time per worker: a thousand handshakes at once on a busy machine
    would outlast the handshake timeout and retry in waves, which measures nothing.
    No per-message timeout: a message that outlasts send_timeout stays queued and arrives
    later all the same, so giving up on it would only fail the phase for nothing; the
    orchestrator bounds the whole phase.
    """
    limiter = trio.CapacityLimiter(ramp)

    async def one(node: Node, peer: str) -> None:
        async with limiter:
            await tally.send(node, peer, 0, pad, timeout=math.inf)

    async with trio.open_nursery() as nursery:
        for node in nodes:
            for peer in targets.get(node.vm, []):
                nursery.start_soon(one, node, peer)


def _rejects(nodes: list[Node]) -> dict[str, int]:
    """REJECTs these nodes sent so far, by reason."""
    return {
        reason: sum(node.stats.get(f"rejected_{reason}", 0) for node in nodes)
        for reason in ("expired", "unknown")
    }


async def _hub_measure(hub: Node, tally: Tally, rss_before: int) -> float:
    """Wait until every peer's message 0 arrived; the hub's memory per peer, KiB."""
    peers = len(hub.peers)
    while len(tally.received) < peers:
        await trio.sleep(0.1)
    _trim()
    # Everything the peers cost the hub: period keys, sessions, connections, tasks and
    # buffers, measured as resident memory since before the node was opened (both
    # readings after a collection and a malloc_trim).
    return (_rss_kb() - rss_before) / max(1, peers)


async def run(spec: dict[str, Any]) -> None:
    _trim()
    rss_before = _rss_kb()
    gc_timer = GcTimer()
    configs = [NodeConfig.from_mapping(c, source=f"node {c['key_file']}") for c in spec["nodes"]]
    pad = bytes(max(0, spec["size"] - 40))
    tally = Tally()
    commands = _Commands()
    hub = spec["role"] == "hub"
    targets: dict[str, list[str]] = spec["targets"]  # vm -> peers it sends to
    # Hundreds of peers share one process here, each a VM with its own small heap in
    # real life: their long-lived state (keys, sessions, member lists) is moved out of
    # the collector's sight as it is made, or every collection would walk all of it
    # (quadratic in the number of peers). The hub is one node, as in a VM: default GC.
    async with (
        _nodes(configs, freeze=not hub) as nodes,
        trio.open_nursery() as nursery,
    ):
        # Ready once every node has applied an update: not "all hold a key at the same
        # instant", which a machine that stalls for seconds may never show for 600 nodes
        # at once (a node whose keys lapse and return is the system under test).
        with trio.fail_after(spec.get("ready_timeout", 600)):
            while not all(node.key_updates for node in nodes):
                await trio.sleep(0.05)
                if not hub:
                    gc.freeze()  # the members lists and keys the bridge just sent
        for node in nodes:
            nursery.start_soon(_receiver, node, tally)
        _emit("ready", nodes=len(nodes), rss_kb=_rss_kb(), gc_s=round(gc_timer.seconds, 3))
        if await commands.next() != "connect":
            return
        per_peer_kib = None
        if hub:
            per_peer_kib = await _hub_measure(nodes[0], tally, rss_before)
        else:
            await _connect_peers(nodes, targets, pad, tally, spec.get("ramp", 32))
        _emit(
            "connected", per_peer_kib=per_peer_kib, failed=sum(tally.failed.values()),
            rss_kb=_rss_kb(), rejects=_rejects(nodes),
        )  # fmt: skip
        if await commands.next() != "go":
            return
        stop = trio.Event()
        rng = random.Random(spec.get("seed", 1))  # noqa: S311 -- jitter, not keys
        first_seq = 0 if hub else 1  # message 0 of each peer went in the connect phase
        for node in nodes:
            for peer in targets.get(node.vm, []):
                offset = rng.random() / spec["rate"]
                nursery.start_soon(
                    _sender, node, peer, first_seq, spec["rate"], pad, tally, stop, offset
                )

        async def ticks() -> None:
            while True:
                await trio.sleep(1.0)
                _emit(
                    "tick",
                    acked=tally.tick_acked,
                    p99_ms=_percentile(tally.tick_latencies, 0.99) * 1000,
                )
                tally.tick_acked = 0
                tally.tick_latencies = []

        nursery.start_soon(ticks)
        await commands.next()  # "stop" (or EOF: the orchestrator went away)
        stop.set()
        # Let what this worker sent be acknowledged...
        with trio.move_on_after(spec.get("drain", 60)):
            while tally.in_flight or any(n.unacknowledged() for n in nodes):
                await trio.sleep(0.1)
        _emit("drained")
        # ...and once every worker has said so, every acknowledged message sits in its
        # receiver's inbox or was taken from it: take the rest, then count.
        await commands.next()  # "report"
        with trio.move_on_after(spec.get("drain", 60)):
            while any(n.waiting for n in nodes):
                await trio.sleep(0.05)
            await trio.sleep(0.1)  # the receiver tasks finish what they took
        totals: Counter[str] = Counter()
        for node in nodes:
            totals.update(node.stats)
        final = {
            "role": spec["role"],
            "acked": tally.acked,
            "in_flight": tally.in_flight,
            "failed": dict(tally.failed),
            "sent_by": dict(tally.sent_by),
            "received": {k: v + 1 for k, v in tally.received.items()},
            "gaps": tally.gaps,
            "duplicates": tally.duplicates,
            "latencies": [[round(at, 4), round(s * 1000, 3)] for at, s in tally.latencies],
            "one_way": [[round(at, 4), round(s * 1000, 3)] for at, s in tally.one_way],
            "stats": dict(totals),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "gc_s": gc_timer.seconds,
            "cpu_s": time.process_time(),
            "gc_collections": gc_timer.collections,
            "per_peer_kib": per_peer_kib,
            # Update arrived on the key channel -> ack written, per node (the hub's are
            # what issue 17 measures: 1,200 partial keys at once).
            "key_apply_ms": [round(ms, 3) for n in nodes for ms in n.key_apply_ms],
        }
        Path(spec["final"]).write_text(json.dumps(final))
        _emit("final", role=spec["role"])
        nursery.cancel_scope.cancel()


def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s %(message)s")
    spec = json.loads(Path(sys.argv[1]).read_text())
    trio.run(run, spec)


if __name__ == "__main__":
    main()

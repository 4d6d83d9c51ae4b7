"""`tvdnet soak`: exactly once while the world around the nodes fails (issue 20, first part).

A real bridge (`tvdnet-bridge run`) and N+1 real node processes
(`python -m tvdnet_tools.soakworker`) on loopback, an all-pairs TVD, traffic both ways on
every pair, and a nemesis that injects faults on a seeded random schedule:

- `bridge-kill`: SIGKILL the bridge, start it again 0.2 to 3 s later (past the skew
  allowance at times: it must evolve forward from its keystore);
- `node-kill`: SIGKILL a node, start it again 0.2 to 2 s later (a new instance);
- `node-term`: SIGTERM a node (a graceful stop), start it again;
- `tcp-reset`: reset every TCP connection into a node (RST both ways) at its proxy;
- `tcp-stall`: stop carrying a node's TCP connections for 0.5 to 3 s;
- `tcp-slow`: for 1 to 5 s, carry a node's TCP connections 16, 64 or 256 bytes at a
  time, 20 ms apart (frames arrive late and cut in pieces);
- `tcp-halfopen`: close the dialer's side of a node's connections and leave the node's
  side open and silent for 1 to 5 s (one side closed, the other never told);
- `channel-cut`: reset a node's key channel (the node says hello again);
- `update-withhold`: hold a node's key channel for 0.5 to 4 s, past the skew allowance at
  times, so that the updates of a period change reach it late;
- `clock-skew`: restart a node (SIGTERM) with its clock 0.1 to 0.5 s ahead or behind, a
  test-only offset, so that two nodes differ by at most 1 s: within the 2 s allowance with
  room for a loaded bridge's push (a first 30-minute run allowed 1.5 s each way; pairs
  2.3 s apart then could not talk at periods of 1 s, as SPEC §4 says, and their queued
  messages were reported lost);
- `membership`: suspend a member by `reload` (`suspended = true` in the TVD file: the
  others erase its keys and connections, their queued messages to it fail with
  `SendFailedError`), and resume it 1 to 4 s later (it talks again without provisioning).

Peers reach each node through a fault-injecting proxy on loopback (the TVD file gives the
proxy's address; the node listens behind it), and each node reaches the bridge through
another (a Unix socket in front of its key channel).

The checker reads what the applications recorded (each `send()` result, each message
received) and each process's log:

- duplicates: a message delivered twice to the same receiver instance (never allowed);
- lost: a message whose `send()` returned that no instance of its receiver got, or any
  message of a sender instance that lived to the end that was never delivered (a killed
  or stopped sender loses only its own queue, SPEC §4; a SIGKILLed receiver, what its
  application had not taken from its inbox; a graceful stop loses nothing). A message
  whose `send()` failed because the peer left may arrive or not, but never twice;
- reloads: a reload the bridge refused;
- order: per sender instance and receiver instance, message numbers only increase;
- logs: no traceback and nothing shaped like key material.
- REJECTs: each node records every REJECT it sends (peer, reason) within 0.25 s; each is
  held against a fault on either node of the pair (on any node, for `bridge-kill`) from
  the fault's start to REJECT_GRACE_S plus two periods past its end, and counted per
  fault kind and on the fault itself (`rejects` in its entry of the JSON report's
  `faults`, which lists every fault with its time and what it did); one that no fault
  explains fails the run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import random
import re
import signal
import socket
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w
import trio

from tvdnet import ControlError
from tvdnet.control import control_request

from .local import (
    LocalMember,
    LocalTvd,
    console_command,
    free_port_block,
    scratch_dir,
    seconds,
    stop_processes,
    whole_number,
)

__all__ = ["FAULTS", "register", "run_soak"]

FAULTS = (
    "bridge-kill", "node-kill", "node-term", "tcp-reset", "tcp-stall", "tcp-slow",
    "tcp-halfopen",
    "channel-cut", "update-withhold", "clock-skew", "membership",
)  # fmt: skip
SECRET = re.compile(r"\b[0-9a-f]{64}\b")
DRAIN_S = 15.0  # after the last fault: time for queued messages to be delivered
MAX_SKEW_S = 0.5  # a clock-skew fault sets a node's clock at most this far off
REJECT_GRACE_S = 4.0  # past a fault's end (plus two periods): its REJECTs are its own
SLOW_DELAY_S = 0.02  # a slowed link carries one chunk per this many seconds
STOP_WINDOW_S = 3.0  # an acknowledged message may die with a receiver killed this soon
RECORD_LAG_S = 1.0  # how late a loaded sender may record an acknowledgement


def register(commands: Any) -> None:
    """`tvdnet soak` (the entry point `tvdnet.commands`: soak)."""
    p = commands.add_parser("soak", help="real processes under injected faults; checks delivery")
    p.set_defaults(handler=run_soak)
    p.add_argument("--peers", type=whole_number(1), default=4, help="N: the TVD has N+1 nodes")
    p.add_argument(
        "--duration", type=seconds(zero_ok=False), default=60.0, help="seconds of faults"
    )
    p.add_argument("--period", type=seconds(zero_ok=False), default=1.0, help="period length")
    p.add_argument("--seed", type=int, default=1, help="the nemesis's schedule")
    p.add_argument(
        "--faults",
        type=lambda s: [f for f in s.split(",") if f],
        default=list(FAULTS),
        help=f"comma-separated, of {', '.join(FAULTS)} (default: all)",
    )
    p.add_argument(
        "--fault-every",
        type=seconds(zero_ok=False),
        default=0.7,
        help="mean s between faults (0.7: over 200 of each kind in 30 minutes)",
    )
    p.add_argument(
        "--interval", type=seconds(zero_ok=False), default=0.5, help="s between a node's sends"
    )
    p.add_argument("--json", type=Path, help="write the report here")
    p.add_argument("--plot", type=Path, help="throughput and latency with the faults (PNG)")
    p.add_argument("--keep", type=Path, help="keep the records and logs in this directory")
    p.add_argument("--quiet", action="store_true", help="no live progress")


# ------------------------------------------------------------------ the proxy


class Proxy:
    """Peers' connections to one node pass here: faults are applied to them."""

    def __init__(self, listen: int | Path, target: int | Path) -> None:
        self.listen = listen  # a TCP port on 127.0.0.1, or a Unix socket path
        self.target = target
        self.links: set[tuple[trio.SocketStream, trio.SocketStream]] = set()
        self.resume = trio.Event()
        self.resume.set()
        self.stalls = 0  # stalls in progress: they may overlap
        self.slow_chunk = 0  # bytes carried at a time while slowed (0: not slowed)
        self.slows = 0

    async def serve(self) -> None:
        if isinstance(self.listen, int):
            await trio.serve_tcp(self._handle, self.listen, host="127.0.0.1")
            return
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(str(self.listen))
        sock.listen(16)
        await trio.serve_listeners(self._handle, [trio.SocketListener(sock)])

    async def _connect(self) -> trio.SocketStream:
        if isinstance(self.target, int):
            return await trio.open_tcp_stream("127.0.0.1", self.target)
        return await trio.open_unix_socket(str(self.target))

    async def _handle(self, outer: trio.SocketStream) -> None:
        try:
            inner = await self._connect()
        except OSError:
            await outer.aclose()
            return
        link = (outer, inner)
        self.links.add(link)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, outer, inner, nursery.cancel_scope)
                nursery.start_soon(self._pump, inner, outer, nursery.cancel_scope)
        finally:
            self.links.discard(link)
            for stream in link:
                with trio.CancelScope(shield=True):
                    await stream.aclose()

    async def _pump(
        self, source: trio.abc.ReceiveStream, sink: trio.abc.SendStream, scope: trio.CancelScope
    ) -> None:
        try:
            while data := await source.receive_some(65536):
                await self.resume.wait()
                while self.slow_chunk and len(data) > self.slow_chunk:
                    await sink.send_all(data[: self.slow_chunk])
                    data = data[self.slow_chunk :]
                    await trio.sleep(SLOW_DELAY_S)
                await sink.send_all(data)
                if self.slow_chunk:
                    await trio.sleep(SLOW_DELAY_S)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()

    def reset(self) -> int:
        """RST both ways on every connection."""
        count = 0
        for link in list(self.links):
            for stream in link:
                _abort(stream)
            count += 1
        return count

    async def stall(self, seconds: float) -> None:
        """Carry nothing for `seconds`. Overlapping stalls share one event, set when the
        last ends: a pump waiting on an event that a later stall replaced would wait for
        ever (a 30-minute soak found a key channel stuck that way)."""
        if self.resume.is_set():
            self.resume = trio.Event()
        self.stalls += 1
        try:
            await trio.sleep(seconds)
        finally:
            self.stalls -= 1
            if not self.stalls:
                self.resume.set()

    async def slow(self, seconds: float, chunk: int) -> None:
        """Carry at most `chunk` bytes every SLOW_DELAY_S for `seconds` (a congested or
        lossy link: frames arrive late and in pieces)."""
        self.slows += 1
        self.slow_chunk = chunk
        try:
            await trio.sleep(seconds)
        finally:
            self.slows -= 1
            if not self.slows:
                self.slow_chunk = 0

    async def half_open(self, seconds: float) -> int:
        """The dialer's side is reset; the node's side stays open, silent, then closes."""
        links = list(self.links)
        for outer, _ in links:
            _abort(outer)
        await trio.sleep(seconds)
        for _, inner in links:
            _abort(inner)
        return len(links)


def _abort(stream: trio.SocketStream) -> None:
    """Close with RST (SO_LINGER 0): the other end is told at once, by an error."""
    with contextlib.suppress(OSError):
        if stream.socket.family != socket.AF_UNIX:
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00" * 2)
        stream.socket.shutdown(socket.SHUT_RDWR)


# ------------------------------------------------------------------ the processes


@dataclass
class NodeProcess:
    vm: str
    config: Path
    peers: list[str]
    record: Path
    log: Path
    interval: float
    incarnation: int = 0
    clock_offset: float = 0.0
    process: trio.Process | None = None
    ended: dict[int, str] = field(default_factory=dict)  # incarnation -> how it ended

    async def start(self) -> None:
        self.incarnation += 1
        command = [
            sys.executable, "-m", "tvdnet_tools.soakworker", str(self.config),
            "--incarnation", str(self.incarnation), "--peers", ",".join(self.peers),
            "--record", str(self.record), "--interval", str(self.interval),
            "--clock-offset", str(self.clock_offset),
        ]  # fmt: skip
        with self.log.open("ab") as log:
            self.process = await trio.lowlevel.open_process(command, stderr=log)

    async def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        await self.process.wait()
        self.ended[self.incarnation] = "killed"

    async def terminate(self) -> None:
        assert self.process is not None
        self.process.terminate()
        with trio.move_on_after(20):
            await self.process.wait()
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
            self.ended[self.incarnation] = "stuck"  # a graceful stop that did not stop
        else:
            self.ended[self.incarnation] = "stopped"


@dataclass
class BridgeProcess:
    command: list[str]
    log: Path
    process: trio.Process | None = None
    starts: int = 0

    async def start(self) -> None:
        self.starts += 1
        with self.log.open("ab") as log:
            self.process = await trio.lowlevel.open_process(self.command, stderr=log)

    async def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        await self.process.wait()


# ------------------------------------------------------------------ the run


class Soak:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.dir = workdir
        self.rng = random.Random(args.seed)  # noqa: S311 -- a fault schedule, not keys
        self.faults: list[dict[str, Any]] = []
        self.nodes: dict[str, NodeProcess] = {}
        self.proxies: dict[str, Proxy] = {}  # peers -> each node
        self.channels: dict[str, Proxy] = {}  # each node -> the bridge (its key channel)
        self.bridges: dict[str, BridgeProcess] = {}  # one per TVD: "mesh", "star"
        self.groups: dict[str, list[str]] = {}  # each TVD's members
        self.tvd_of: dict[str, str] = {}  # each node's TVD
        self.locals: dict[str, LocalTvd] = {}
        self.began = 0.0
        self.final: dict[str, int] = {}  # each node's instance that lived to the end
        self.down: set[str] = set()  # nodes stopped by a fault, not started again yet
        self.away: set[str] = set()  # members suspended by a fault, not resumed yet

    def control(self, tvd: str) -> Path:
        return self.dir / "control" / f"{tvd}.sock"

    def provision(self) -> None:
        """Two TVDs side by side, each with its own bridge: a small one of all pairs
        ("mesh", up to six nodes: every node talks to every other) and a star of the rest
        ("star": one hub and its leaves, the paper's shape), when there are enough nodes."""
        count = self.args.peers + 1
        ids = [f"n{i:02d}" for i in range(count)]
        mesh = max(2, min(6, count // 3)) if count >= 4 else count
        self.groups = {"mesh": ids[:mesh]}
        if count - mesh >= 2:
            self.groups["star"] = ids[mesh:]
        base = free_port_block(2 * count)
        for tvd, group in self.groups.items():
            directory = self.dir / tvd
            members = [
                LocalMember(vm, f"127.0.0.1:{base + ids.index(vm)}", f"unix-listen:{vm}.sock",
                            f"unix:{self.dir / (vm + '.kc.sock')}")
                for vm in group
            ]  # fmt: skip
            pairs = "all" if tvd == "mesh" else f"star:{group[0]}"
            local = LocalTvd(directory, f"soak-{tvd}", members, period_s=self.args.period,
                             pairs=pairs)  # fmt: skip
            self.locals[tvd] = local
            local.write()
            local.provision()
            for vm in group:
                self.tvd_of[vm] = tvd
                real = base + count + ids.index(vm)
                self.proxies[vm] = Proxy(base + ids.index(vm), real)
                self.channels[vm] = Proxy(self.dir / f"{vm}.kc.sock", directory / f"{vm}.sock")
                config = local.node_config(vm, listen=f"127.0.0.1:{real}")
                path = self.dir / f"{vm}.toml"
                path.write_text(tomli_w.dumps(config))
                if tvd == "mesh":
                    peers = [p for p in group if p != vm]
                else:
                    peers = group[1:] if vm == group[0] else [group[0]]
                self.nodes[vm] = NodeProcess(
                    vm, path, peers, self.dir / f"{vm}.jsonl", self.dir / f"{vm}.log",
                    self.args.interval,
                )  # fmt: skip
            command = [*console_command("tvdnet-bridge", "device_bridge"), "run"]
            command += ["--config", str(local.tvd_file), "--keystore", str(local.keystore)]
            command += ["--control", str(self.control(tvd))]
            command += ["--log-level", "WARNING"]
            self.bridges[tvd] = BridgeProcess(command, self.dir / f"bridge-{tvd}.log")

    def now(self) -> float:
        return round(time.monotonic() - self.began, 3)

    async def main(self) -> dict[str, Any]:
        self.provision()
        self.began = time.monotonic()
        async with trio.open_nursery() as nursery:
            for proxy in [*self.proxies.values(), *self.channels.values()]:
                nursery.start_soon(proxy.serve)
            for bridge in self.bridges.values():
                await bridge.start()
            for node in self.nodes.values():
                await node.start()
            with _progress(self.args) as progress:
                await self.nemesis(nursery, progress)
                progress(f"draining for {DRAIN_S:g} s")
                await self.settle()
                await self.settle_nodes()
                for node in self.nodes.values():  # stop sending; deliver what is queued
                    assert node.process is not None
                    node.process.send_signal(signal.SIGUSR1)
                await trio.sleep(DRAIN_S)
            self.final = {vm: node.incarnation for vm, node in self.nodes.items()}
            for node in self.nodes.values():
                await node.terminate()
            await stop_processes(
                {tvd: b.process for tvd, b in self.bridges.items() if b.process}, timeout=20
            )
            nursery.cancel_scope.cancel()
        return check(self)

    async def settle(self, tvd: str | None = None) -> None:
        """A bridge (every bridge) up again: a restart may still be pending."""
        with trio.fail_after(60):
            for bridge in [self.bridges[tvd]] if tvd else self.bridges.values():
                while bridge.process is None or bridge.process.returncode is not None:
                    await trio.sleep(0.1)

    async def settle_nodes(self) -> None:
        with trio.fail_after(60):
            while self.down or self.away:
                await trio.sleep(0.1)

    async def nemesis(self, nursery: trio.Nursery, progress: Any) -> None:
        args, rng = self.args, self.rng
        end = self.began + args.duration
        while True:
            await trio.sleep(rng.expovariate(1.0 / args.fault_every))
            if time.monotonic() >= end:
                return
            kind = rng.choice(args.faults)
            fault: dict[str, Any] = {"t": self.now(), "kind": kind}
            self.faults.append(fault)
            progress(f"{fault['t']:7.1f} s  {kind}", advance=True)
            await self.inject(kind, fault, nursery)

    async def inject(self, kind: str, fault: dict[str, Any], nursery: trio.Nursery) -> None:
        rng = self.rng
        vm = rng.choice(sorted(self.nodes))
        if kind == "bridge-kill":
            fault["tvd"] = tvd = rng.choice(sorted(self.bridges))
            fault["down_s"] = down = round(rng.uniform(0.2, 3.0), 2)
            await self.settle(tvd)  # back from the last kill first: one at a time
            fault["t"] = self.now()  # the kill, after that wait
            bridge = self.bridges[tvd]
            await bridge.kill()
            nursery.start_soon(self._restart_bridge, bridge, down, fault)
        elif kind in ("node-kill", "node-term"):
            idle = sorted(set(self.nodes) - self.down)
            if not idle:  # every node is down already: nothing to do this time
                fault["skipped"] = True
                return
            vm = rng.choice(idle)
            fault["vm"], fault["incarnation"] = vm, self.nodes[vm].incarnation
            fault["down_s"] = round(rng.uniform(0.2, 2.0), 2)
            self.down.add(vm)
            nursery.start_soon(self._node_down, kind, vm, fault["down_s"], fault)
        elif kind == "tcp-reset":
            fault["vm"], fault["connections"] = vm, self.proxies[vm].reset()
        elif kind == "tcp-slow":
            fault["vm"], fault["s"] = vm, round(rng.uniform(1.0, 5.0), 2)
            fault["bytes_per_step"] = chunk = rng.choice((16, 64, 256))
            nursery.start_soon(self.proxies[vm].slow, fault["s"], chunk)
        elif kind == "tcp-stall":
            fault["vm"], fault["s"] = vm, round(rng.uniform(0.5, 3.0), 2)
            nursery.start_soon(self.proxies[vm].stall, fault["s"])
        elif kind == "channel-cut":
            fault["vm"], fault["connections"] = vm, self.channels[vm].reset()
        elif kind == "update-withhold":
            fault["vm"], fault["s"] = vm, round(rng.uniform(0.5, 4.0), 2)
            nursery.start_soon(self.channels[vm].stall, fault["s"])
        elif kind == "clock-skew":
            idle = sorted(set(self.nodes) - self.down)
            if not idle:
                fault["skipped"] = True
                return
            vm = rng.choice(idle)
            # Any two nodes stay within 1 s of each other: the allowance (2 s) less the
            # clock difference must still cover a loaded bridge's push (SPEC §4).
            offset = rng.uniform(0.1, MAX_SKEW_S) * rng.choice((-1, 1))
            fault["vm"], fault["offset_s"] = vm, round(offset, 3)
            self.nodes[vm].clock_offset = offset
            self.down.add(vm)
            nursery.start_soon(self._node_down, "node-term", vm, 0.2, fault)
        elif kind == "membership":
            vm = rng.choice(sorted(set(self.nodes) - self.away))
            if len(set(self.groups[self.tvd_of[vm]]) - self.away) < 3:  # keep two at least
                fault["skipped"] = True
                return
            fault["vm"], fault["away_s"] = vm, round(rng.uniform(1.0, 4.0), 2)
            self.away.add(vm)
            nursery.start_soon(self._away, vm, fault)
        elif kind == "tcp-halfopen":
            fault["vm"], fault["s"] = vm, round(rng.uniform(1.0, 5.0), 2)
            nursery.start_soon(self.proxies[vm].half_open, fault["s"])
        else:  # pragma: no cover -- checked by run_soak
            raise ValueError(kind)

    async def _node_down(self, kind: str, vm: str, seconds: float, fault: dict[str, Any]) -> None:
        """Stop one node (SIGKILL or SIGTERM) and start it again `seconds` later; the
        fault ends (`back_t`) when the new process was started."""
        node = self.nodes[vm]
        try:
            if kind == "node-kill":
                await node.kill()
            else:
                await node.terminate()
            await trio.sleep(seconds)
            await node.start()
            fault["back_t"] = self.now()
        finally:
            self.down.discard(vm)

    async def _restart_bridge(
        self, bridge: BridgeProcess, seconds: float, fault: dict[str, Any]
    ) -> None:
        await trio.sleep(seconds)
        await bridge.start()
        fault["back_t"] = self.now()

    async def _away(self, vm: str, fault: dict[str, Any]) -> None:
        """Suspend `vm` by a reload, then resume it `away_s` later (SPEC §5 `members`)."""
        try:
            self._set_suspended(vm, True)
            fault["reload"] = await self._reload(self.tvd_of[vm])
            await trio.sleep(fault["away_s"])
            fault["back_t"] = self.now()
            self._set_suspended(vm, False)
            fault["reload_back"] = await self._reload(self.tvd_of[vm])
        finally:
            self.away.discard(vm)

    def _set_suspended(self, vm: str, suspended: bool) -> None:
        local = self.locals[self.tvd_of[vm]]
        local.members[vm] = dataclasses.replace(local.members[vm], suspended=suspended)
        local.write()

    async def _reload(self, tvd: str) -> str:
        """`tvdnet-bridge reload`, over the control socket. A bridge that is down reads
        the TVD file when it starts again, so the change is never lost."""
        with trio.move_on_after(10):
            while True:
                try:
                    answer = await control_request(self.control(tvd), {"command": "reload"})
                except ControlError:  # down, or starting: try again shortly
                    await trio.sleep(0.2)
                    continue
                if answer.get("ok"):
                    return "ok"
                return f"refused: {answer.get('error')}"
        return "no bridge answered within 10 s (it reads the file as it starts)"

    @staticmethod
    async def _later(delay: float, start: Any) -> None:
        await trio.sleep(delay)
        await start()


@contextmanager
def _progress(args: argparse.Namespace) -> Iterator[Any]:
    """A live bar of the time spent and the faults so far (rich), or nothing."""
    if args.quiet:
        yield lambda text, advance=False: None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("[bold]soak"), BarColumn(), TimeElapsedColumn(),
        TextColumn("faults {task.completed:.0f}"), TextColumn("{task.description}"),
    ) as bar:  # fmt: skip
        task = bar.add_task("", total=None)

        def say(text: str, advance: bool = False) -> None:
            bar.update(task, description=text, advance=1 if advance else 0)

        yield say


# ------------------------------------------------------------------ the checker


def _records(path: Path) -> list[dict[str, Any]]:
    events = []
    if path.exists():
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a line a SIGKILL cut short
                events.append(json.loads(line))
    return events


def check(soak: Soak) -> dict[str, Any]:
    violations: list[str] = []
    sent: dict[tuple[str, int, str, int], dict[str, Any]] = {}
    received: dict[tuple[str, int, str, int], list[tuple[str, int]]] = defaultdict(list)
    finals: dict[str, Counter[str]] = defaultdict(Counter)
    latencies: list[tuple[float, float]] = []
    rejects_seen: list[tuple[float, str, str, str, int]] = []  # t, by, to, reason, count
    up = soak.began  # when the last node's first instance had started
    for vm, node in soak.nodes.items():
        incarnation = 0
        last: dict[tuple[int, str, int], int] = {}  # (my inc, sender, its inc) -> last n
        for event in _records(node.record):
            if event["e"] == "start":
                incarnation = event["inc"]
                up = max(up, event["t"]) if incarnation == 1 else up
            elif event["e"] == "sent":
                sent[(vm, event["inc"], event["to"], event["n"])] = event
                if event["ok"]:
                    latencies.append((event["t"] - soak.began, event["lat"]))
            elif event["e"] == "recv":
                key = (event["from"], event["inc"], vm, event["n"])
                received[key].append((vm, incarnation))
                stream = (incarnation, event["from"], event["inc"])
                what = f"{vm}#{incarnation} got {event['from']}#{event['inc']} message {event['n']}"
                if received[key].count((vm, incarnation)) > 1:
                    violations.append(f"duplicate: {what} again")
                elif event["n"] < last.get(stream, -1):
                    violations.append(f"out of order: {what} after {last[stream]}")
                last[stream] = max(event["n"], last.get(stream, -1))
            elif event["e"] == "final":
                finals[vm].update(event["stats"])
            elif event["e"] == "reject":
                rejects_seen.append((event["t"], vm, event["to"], event["reason"], event["count"]))
    duplicates = 0
    redelivered = 0
    for receivers in received.values():
        per_instance = Counter(receivers)
        duplicates += sum(c - 1 for c in per_instance.values() if c > 1)
        redelivered += len(per_instance) - 1  # to a later instance of a restarted receiver
    lost: list[str] = []
    died_with_receiver = 0
    kills: dict[str, list[float]] = defaultdict(list)  # vm -> when it was SIGKILLed
    suspensions: dict[str, list[float]] = defaultdict(list)  # vm -> when it was suspended
    for fault in soak.faults:
        if fault.get("skipped"):
            continue
        if fault["kind"] == "node-kill":
            kills[fault["vm"]].append(soak.began + fault["t"])
        elif fault["kind"] == "membership":
            suspensions[fault["vm"]].append(soak.began + fault["t"])
    left_later = 0
    for (vm, inc, peer, n), event in sent.items():
        survived = soak.final.get(vm) == inc  # this sender instance lived to the end
        if event.get("failed"):  # SendFailedError: the peer left; delivered at most once
            continue
        if not event["ok"] and any(k >= event["t"] for k in suspensions[peer]):
            # Queued (its send() had timed out) and dropped when the peer left the TVD
            # later: a SendFailed that no send() was waiting for any more.
            left_later += 1
            continue
        if (event["ok"] or survived) and not received.get((vm, inc, peer, n)):
            acked = event["t"]
            if event["ok"] and any(
                acked - RECORD_LAG_S <= k <= acked + STOP_WINDOW_S for k in kills[peer]
            ):
                # Acknowledged into the inbox of a receiver SIGKILLed just after, and never
                # taken by its application: what a killed process may lose (SPEC §4:
                # delivery "while both node processes run"). A graceful stop loses nothing:
                # the node stops acknowledging and its application empties the inbox.
                died_with_receiver += 1
                continue
            lost.append(
                f"{vm}#{inc} -> {peer} message {n} ({'acked' if event['ok'] else 'queued'})"
            )
    violations += [f"lost: {what}" for what in lost[:50]]
    for fault in soak.faults:
        for step in ("reload", "reload_back"):
            if str(fault.get(step, "ok")).startswith("refused"):
                violations.append(f"the bridge refused the reload of {fault}")
    for vm, node in soak.nodes.items():
        for incarnation, how in node.ended.items():
            if how == "stuck":
                violations.append(f"{vm}#{incarnation} did not stop within 20 s of SIGTERM")
    logs = {vm: node.log.read_text(errors="replace") for vm, node in soak.nodes.items()}
    for tvd, bridge in soak.bridges.items():
        logs[f"the {tvd} bridge"] = bridge.log.read_text(errors="replace")
    for name, text in logs.items():
        if "Traceback" in text:
            violations.append(f"{name}'s log holds a traceback")
        if SECRET.search(text):
            violations.append(f"{name}'s log holds something shaped like key material")
    faults = [dict(fault) for fault in soak.faults]  # each with what it caused
    attributed, unattributed = _attribute_rejects(soak, faults, rejects_seen, up)
    if unattributed:
        violations.append(
            f"{sum(r[4] for r in unattributed)} REJECTs outside every fault's window, the "
            "first: "
            + "; ".join(
                f"{by} refused {to} ({reason}) x{count} at {t - soak.began:.1f} s"
                for t, by, to, reason, count in unattributed[:5]
            )
        )
    rejects: Counter[str] = Counter()
    for _, _, _, reason, count in rejects_seen:
        rejects[reason] += count
    per_kind = Counter(f["kind"] for f in soak.faults if not f.get("skipped"))
    return {
        "seed": soak.args.seed,
        "nodes": len(soak.nodes),
        "duration_s": soak.args.duration,
        "period_s": soak.args.period,
        "faults": faults,
        "faults_per_kind": {kind: per_kind.get(kind, 0) for kind in soak.args.faults},
        "messages_sent": len(sent),
        "messages_acked": sum(1 for e in sent.values() if e["ok"]),
        "messages_failed_peer_left": sum(1 for e in sent.values() if e.get("failed")),
        "messages_queued_peer_left_later": left_later,
        "messages_received": sum(len(r) for r in received.values()),
        "lost": len(lost),
        "duplicates": duplicates,
        "redelivered_after_restart": redelivered,
        "acked_then_receiver_killed": died_with_receiver,
        "rejects": dict(rejects),
        "rejects_per_fault_kind": dict(attributed),
        "rejects_unattributed": sum(r[4] for r in unattributed),
        "violations": violations,
        "latency_p99_ms": _p99(latencies),
        "timeline": latencies,
        "ok": not violations,
    }


def _attribute_rejects(
    soak: Soak,
    faults: list[dict[str, Any]],
    rejects: list[tuple[float, str, str, str, int]],
    up: float,
) -> tuple[Counter[str], list[tuple[float, str, str, str, int]]]:
    """Hold each REJECT against a fault that could have made it inevitable: one on either
    node of the pair (any node, for the bridge), from its start until REJECT_GRACE_S past
    its end (the keys of a late update, a reconnect); the REJECTs counted per fault kind,
    and those no fault explains. A fault's time is when it began; `back_t`, `down_s`,
    `s` or `away_s` say when it ended. The start of the run counts as one (`start-up`,
    until `up`, when the last node had started, plus the same grace): the nodes get their
    first keys at different times. Each fault of `faults` (the report's copies) gets the
    number of REJECTs held against it (`rejects`)."""
    grace = REJECT_GRACE_S + 2 * soak.args.period
    windows: list[tuple[float, float, set[str], dict[str, Any]]] = [
        (soak.began, up + grace, set(soak.nodes), {"kind": "start-up"})
    ]
    for fault in faults:
        if fault.get("skipped"):
            continue
        began = soak.began + fault["t"]
        lasted = max(fault.get(k, 0.0) for k in ("down_s", "s", "away_s"))
        ended = soak.began + fault.get("back_t", fault["t"] + lasted)
        if fault["kind"] == "bridge-kill":  # every node of its TVD
            vms = set(soak.groups.get(fault.get("tvd", ""), soak.nodes))
        else:
            vms = {fault.get("vm", "")}
        windows.append((began, ended + grace, vms, fault))
    attributed: Counter[str] = Counter()
    unattributed: list[tuple[float, str, str, str, int]] = []
    for reject in rejects:
        t, by, to = reject[:3]
        cause: dict[str, Any] | None = next(
            (
                f
                for began, until, vms, f in windows
                if began <= t <= until and (by in vms or to in vms)
            ),
            None,
        )
        if cause is None:
            unattributed.append(reject)
        else:
            attributed[cause["kind"]] += reject[4]
            cause["rejects"] = cause.get("rejects", 0) + reject[4]
    return attributed, unattributed


def _p99(latencies: list[tuple[float, float]]) -> float | None:
    values = sorted(lat for _, lat in latencies)
    return round(values[int(0.99 * (len(values) - 1))] * 1000, 1) if values else None


def print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"tvdnet soak, seed {report['seed']}", show_header=False)
    rows = [
        ("nodes, periods", f"{report['nodes']}, {report['period_s']:g} s"),
        ("faults", ", ".join(f"{k} {v}" for k, v in report["faults_per_kind"].items())),
        ("messages sent / acked / received",
         f"{report['messages_sent']} / {report['messages_acked']} / {report['messages_received']}"),
        ("lost", str(report["lost"])),
        ("duplicates", str(report["duplicates"])),
        ("redelivered to a restarted receiver", str(report["redelivered_after_restart"])),
        ("failed: the peer left (membership)", str(report["messages_failed_peer_left"])),
        ("REJECTs by reason", ", ".join(f"{k} {v}" for k, v in report["rejects"].items())
         or "none"),
        ("REJECTs per fault kind", ", ".join(
            f"{k} {v}" for k, v in sorted(report["rejects_per_fault_kind"].items())) or "none"),
        ("REJECTs no fault explains", str(report["rejects_unattributed"])),
        ("latency p99", f"{report['latency_p99_ms']} ms"),
        ("verdict", "PASS" if report["ok"] else "FAIL: " + "; ".join(report["violations"][:5])),
    ]  # fmt: skip
    for name, value in rows:
        table.add_row(name, value)
    Console().print(table)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timeline = report["timeline"]
    if not timeline:
        return
    seconds = int(max(t for t, _ in timeline)) + 1
    counts = [0] * seconds
    worst = [0.0] * seconds
    for t, lat in timeline:
        counts[int(t)] += 1
        worst[int(t)] = max(worst[int(t)], lat * 1000)
    figure, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(10, 6))
    top.plot(range(seconds), counts)
    top.set_ylabel("acknowledged / s")
    bottom.plot(range(seconds), worst)
    bottom.set_ylabel("worst latency ms")
    bottom.set_yscale("log")
    bottom.set_xlabel("seconds")
    palette = (
        "red",
        "purple",
        "orange",
        "blue",
        "green",
        "brown",
        "grey",
        "olive",
        "cyan",
        "magenta",
        "black",
    )
    colours = dict(zip(FAULTS, palette, strict=True))
    for fault in report["faults"]:
        for axis in (top, bottom):
            axis.axvline(fault["t"], color=colours[fault["kind"]], alpha=0.3, linewidth=1)
    from matplotlib.lines import Line2D

    used = [kind for kind in FAULTS if any(f["kind"] == kind for f in report["faults"])]
    top.legend(
        handles=[Line2D([0], [0], color=colours[kind], label=kind) for kind in used],
        fontsize=7, ncol=5, loc="lower left",
    )  # fmt: skip
    top.set_title(f"tvdnet soak (seed {report['seed']}): faults marked by kind")
    figure.tight_layout()
    figure.savefig(path)


def run_soak(args: argparse.Namespace) -> int:
    unknown = [f for f in args.faults if f not in FAULTS]
    if unknown:
        print(f"tvdnet soak: --faults: unknown {', '.join(unknown)} (known: "
              f"{', '.join(FAULTS)})", file=sys.stderr)  # fmt: skip
        return 2
    with scratch_dir("tvdnet-soak-", args.keep) as workdir:
        report = trio.run(Soak(args, workdir).main)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    if args.plot:
        plot(report, args.plot)
    if not args.quiet:
        print_report(report)
    if not report["ok"]:
        print(f"tvdnet soak: FAILED with seed {args.seed}; replay with --seed {args.seed}",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0

"""`tvdnet loadtest`: one hub talking to N peers through period changes, all on loopback.

The paper's case is one VM talking to 1,200 others. This starts, as separate processes,
a real bridge (`tvdnet-bridge run`), a hub node, and N peer nodes spread over K worker
processes (`python -m tvdnet._loadworker`); provisions a star-shaped TVD (hub <-> each
peer); drives traffic both ways between the hub and every peer for the duration while
the bridge rotates periods; and reports what happened:

- lost, duplicates: from every (sender, seq) each receiver saw (both must be 0);
- messages_per_s and latency_ms (send() to acknowledgement) p50/p99/p999;
- key_update_ms: period start to the last VM's acknowledgement, p50 and max;
- resends, rejects (expired, unknown, auth), rotations, peak RSS per process, and the
  hub's memory per peer.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import trio

__all__ = ["add_loadtest_parser", "run_loadtest"]

HUB = "hub"


def add_loadtest_parser(commands: Any) -> None:
    p = commands.add_parser("loadtest", help="one hub and many peers on loopback, with a report")
    p.add_argument("--peers", type=int, required=True, help="peer nodes (the paper: 1,200)")
    p.add_argument("--duration", type=float, required=True, help="seconds of traffic")
    p.add_argument("--period", type=float, required=True, help="period length in seconds")
    p.add_argument("--rate", type=float, default=1.0, help="messages/s each way per peer")
    p.add_argument("--size", type=int, default=64, help="message body size in bytes")
    p.add_argument("--processes", type=int, default=os.cpu_count() or 1, help="peer workers")
    p.add_argument("--json", type=Path, help="write the report here")
    p.add_argument("--plot", type=Path, help="write throughput and latency over time (PNG)")
    p.add_argument("--keep", type=Path, help="keep the TVD files and logs in this directory")
    p.add_argument("--quiet", action="store_true", help="no live progress")


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def _free_port_block(count: int) -> int:
    """A base port such that base..base+count-1 are free on 127.0.0.1 (below the
    ephemeral range, so that outgoing connections never take them)."""
    rng = random.Random()  # noqa: S311 -- picking ports, not keys
    for _ in range(50):
        base = rng.randrange(10000, 30000 - count)
        probes = []
        try:
            for port in range(base, base + count):
                probe = socket.socket()
                probes.append(probe)
                probe.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
    raise RuntimeError(f"no block of {count} free ports on 127.0.0.1")


class Run:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.dir = workdir
        self.peers = [f"p{i:04d}" for i in range(1, args.peers + 1)]
        self.members = [HUB, *self.peers]
        self.ticks: list[dict[str, Any]] = []
        self.finals: list[dict[str, Any]] = []
        self.ready: list[dict[str, Any]] = []
        self.rss: dict[str, float] = {}
        self.epoch = 0.0

    # ------------------------------------------------------------------ setup

    def provision(self) -> None:
        base = _free_port_block(len(self.members))
        sockets = self.dir / "channels"
        sockets.mkdir(mode=0o700)
        self.epoch = time.time()
        lines = [
            'tvd = "loadtest"',
            f"period_seconds = {self.args.period!r}",
            "periods = 1000000",
            f"epoch = {self.epoch!r}",
            f'pairs = "star:{HUB}"',
        ]
        self.addresses = {}
        for i, vm in enumerate(self.members):
            self.addresses[vm] = f"127.0.0.1:{base + i}"
            lines += [
                "[[members]]",
                f'id = "{vm}"',
                f'address = "{self.addresses[vm]}"',
                f'channel = "unix-listen:{sockets / vm}.sock"',
            ]
        self.tvd_file = self.dir / "tvd.toml"
        self.tvd_file.write_text("\n".join(lines) + "\n")
        self.keys = self.dir / "keys"
        subprocess_run(
            [
                _bridge_command(),
                "provision",
                str(self.tvd_file),
                "--out",
                str(self.keys),
                "--plaintext",
            ]
        )

    def node_config(self, vm: str) -> dict[str, Any]:
        return {
            "key_file": str(self.keys / "export" / f"{vm}.keys"),
            "listen": self.addresses[vm],
            "key_channel": f"unix:{self.dir / 'channels' / vm}.sock",
            "send_timeout": 120.0,
            "max_unauthenticated": len(self.members) + 64,
        }

    def worker_specs(self) -> list[dict[str, Any]]:
        common = {"rate": self.args.rate, "size": self.args.size, "drain": 60}
        hub = {
            **common,
            "role": "hub",
            "nodes": [self.node_config(HUB)],
            "targets": {HUB: self.peers},
            "start_delay": 1.0,  # peers dial first: fewer crossing connections
            "seed": 0,
        }
        specs = [hub]
        k = max(1, min(self.args.processes, len(self.peers)))
        for w in range(k):
            mine = self.peers[w::k]
            specs.append(
                {
                    **common,
                    "role": "peers",
                    "nodes": [self.node_config(vm) for vm in mine],
                    "targets": {vm: [HUB] for vm in mine},
                    "seed": w + 1,
                }
            )
        return specs

    # ------------------------------------------------------------------ running

    async def main(self) -> dict[str, Any]:
        self.provision()
        control = self.dir / "bridge.control"
        logs = self.dir / "logs"
        logs.mkdir()
        async with trio.open_nursery() as nursery:
            command = [_bridge_command(), "run", "--config", str(self.tvd_file)]
            command += ["--keystore", str(self.keys / "keystore.json")]
            command += ["--control", str(control), "--log-level", "WARNING"]
            bridge = await trio.lowlevel.open_process(
                command, stderr=(logs / "bridge.log").open("wb")
            )
            workers = []
            for i, spec in enumerate(self.worker_specs()):
                path = self.dir / f"worker-{i}.json"
                path.write_text(json.dumps(spec))
                proc = await trio.lowlevel.open_process(
                    [sys.executable, "-m", "tvdnet._loadworker", str(path)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=(logs / f"worker-{i}.log").open("wb"),
                )
                workers.append(proc)
            try:
                await self._drive(nursery, workers)
                self.key_updates = await self._bridge_status(control)
                self.rss["bridge"] = _peak_rss_of(bridge.pid)
            finally:
                for proc in [*workers, bridge]:
                    if proc.returncode is None:
                        proc.send_signal(signal.SIGTERM)
                with trio.move_on_after(10):
                    for proc in [*workers, bridge]:
                        await proc.wait()
                for proc in [*workers, bridge]:
                    if proc.returncode is None:
                        proc.kill()
                        await proc.wait()
            nursery.cancel_scope.cancel()
        return self.report()

    async def _drive(self, nursery: trio.Nursery, workers: list[trio.Process]) -> None:
        lines: trio.MemorySendChannel[tuple[int, dict[str, Any]]]
        lines, incoming = trio.open_memory_channel(10_000)

        async def read(i: int, proc: trio.Process) -> None:
            assert proc.stdout is not None
            buffer = b""
            async for chunk in proc.stdout:
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    await lines.send((i, json.loads(line)))

        for i, proc in enumerate(workers):
            nursery.start_soon(read, i, proc)
        progress = _Progress(self.args.quiet)
        with progress:
            ready = progress.task("starting nodes", total=len(workers))
            with trio.fail_after(600):
                while len(self.ready) < len(workers):
                    _, message = await incoming.receive()
                    if message["type"] == "ready":
                        self.ready.append(message)
                        progress.advance(ready)
            for proc in workers:
                assert proc.stdin is not None
                await proc.stdin.send_all(b"go\n")
            self.started = time.time()
            traffic = progress.task("traffic", total=self.args.duration)
            with trio.move_on_after(self.args.duration):
                async for _, message in incoming:
                    if message["type"] == "tick":
                        self.ticks.append(message)
                    progress.update(traffic, time.time() - self.started)
            self.stopped = time.time()
            progress.update(traffic, self.args.duration)
            for proc in workers:
                assert proc.stdin is not None
                await proc.stdin.send_all(b"stop\n")
            draining = progress.task("draining", total=len(workers))
            with trio.fail_after(180):
                while len(self.finals) < len(workers):
                    i, message = await incoming.receive()
                    if message["type"] == "final":
                        self.finals.append(message)
                        name = "hub" if message["role"] == "hub" else f"worker-{i}"
                        self.rss[name] = message["peak_rss_mb"]
                        progress.advance(draining)

    async def _bridge_status(self, control: Path) -> dict[str, Any]:
        result = await trio.run_process(
            [_bridge_command(), "status", "--json", "--control", str(control)],
            capture_stdout=True,
            check=False,
        )
        try:
            status: dict[str, Any] = json.loads(result.stdout)
        except ValueError:
            return {}
        return status

    # ------------------------------------------------------------------ report

    def report(self) -> dict[str, Any]:
        sent: Counter[str] = Counter()
        received: Counter[str] = Counter()
        stats: Counter[str] = Counter()
        latencies: list[float] = []
        one_way: list[float] = []
        duplicates = gaps = 0
        failed: Counter[str] = Counter()
        for final in self.finals:
            sent.update(final["sent_by"])
            received.update(final["received"])
            stats.update(final["stats"])
            latencies += final["latencies_ms"]
            one_way += final["one_way_ms"]
            duplicates += final["duplicates"]
            gaps += final["gaps"]
            failed.update(final["failed"])
        # A message counts as lost when its send() returned (acknowledged) but its
        # receiver never saw it: per pair, messages arrive in order, so the receiver's
        # count is the highest in-order seq + 1.
        lost = sum(max(0, n - received.get(pair, 0)) for pair, n in sent.items()) + gaps
        duration = self.stopped - self.started
        hub_final = next(f for f in self.finals if f["role"] == "hub")
        periods = self.key_updates.get("periods", []) if self.key_updates else []
        key_ms = [p["all_acked_ms"] for p in periods if p.get("all_acked_ms") is not None]
        rotations = sum(
            1
            for t in range(1, 1_000_000)
            if self.started < self.epoch + t * self.args.period < self.stopped
        )
        return {
            "peers": len(self.peers),
            "duration_s": round(duration, 3),
            "period_s": self.args.period,
            "rate_per_peer": self.args.rate,
            "size": self.args.size,
            "processes": len(self.finals) - 1,
            "lost": lost,
            "duplicates": duplicates,
            "unacknowledged": dict(failed),
            "messages": sum(sent.values()),
            "messages_per_s": round(sum(sent.values()) / duration, 1),
            "latency_ms": {
                "p50": _percentile(latencies, 0.5),
                "p99": _percentile(latencies, 0.99),
                "p999": _percentile(latencies, 0.999),
            },
            "hub_latency_ms": {
                "p50": _percentile(hub_final["latencies_ms"], 0.5),
                "p99": _percentile(hub_final["latencies_ms"], 0.99),
            },
            "one_way_ms": {"p50": _percentile(one_way, 0.5), "p99": _percentile(one_way, 0.99)},
            "key_update_ms": {
                "p50": _percentile(key_ms, 0.5),
                "max": max(key_ms) if key_ms else math.nan,
                "periods": len(key_ms),
            },
            "resends": stats["resends"],
            "rejects": {
                "expired": stats["rejected_expired"],
                "unknown": stats["rejected_unknown"],
                "auth": stats["auth_failures"],
            },
            "rotations": rotations,
            "peak_rss_mb": {k: round(v, 1) for k, v in self.rss.items()},
            "hub_per_peer_state_kb": hub_final.get("per_peer_state_kb"),
            "timeline": self._timeline(),
        }

    def _timeline(self) -> list[dict[str, Any]]:
        by_second: dict[int, dict[str, Any]] = {}
        for tick in self.ticks:
            second = int(tick["at"] - self.started)
            slot = by_second.setdefault(second, {"t": second, "acked": 0, "p99_ms": 0.0})
            slot["acked"] += tick["acked"]
            if not math.isnan(tick["p99_ms"]):
                slot["p99_ms"] = max(slot["p99_ms"], tick["p99_ms"])
        return [by_second[k] for k in sorted(by_second)]


class _Progress:
    """rich progress bars, or nothing with --quiet."""

    def __init__(self, quiet: bool) -> None:
        self._bar: Any = None
        if not quiet:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(
                TextColumn("{task.description:>15}"),
                BarColumn(),
                TextColumn("{task.percentage:>5.1f}%"),
                TimeElapsedColumn(),
            )

    def __enter__(self) -> _Progress:
        if self._bar is not None:
            self._bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def task(self, description: str, total: float) -> int:
        return int(self._bar.add_task(description, total=total)) if self._bar is not None else 0

    def advance(self, task: int) -> None:
        if self._bar is not None:
            self._bar.advance(task)

    def update(self, task: int, completed: float) -> None:
        if self._bar is not None:
            self._bar.update(task, completed=completed)


def _bridge_command() -> str:
    found = shutil.which("tvdnet-bridge", path=str(Path(sys.executable).parent))
    return found or "tvdnet-bridge"


def subprocess_run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True, check=False)  # noqa: S603
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:2])} failed: {result.stderr.strip()}")


def _peak_rss_of(pid: int) -> float:
    """Peak resident memory (VmHWM) of a running process, in MB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return math.nan


def print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"tvdnet loadtest: 1 hub, {report['peers']} peers, {report['duration_s']} s"
    )
    table.add_column("figure")
    table.add_column("value", justify="right")
    latency = report["latency_ms"]
    hub = report["hub_latency_ms"]
    keys = report["key_update_ms"]
    rejects = report["rejects"]
    per_peer = report["hub_per_peer_state_kb"]
    rows = [
        ("lost", report["lost"]),
        ("duplicates", report["duplicates"]),
        ("messages acknowledged", report["messages"]),
        ("messages/s", report["messages_per_s"]),
        ("latency p50 / p99 / p99.9 ms",
         f"{latency['p50']:.1f} / {latency['p99']:.1f} / {latency['p999']:.1f}"),
        ("hub latency p50 / p99 ms", f"{hub['p50']:.1f} / {hub['p99']:.1f}"),
        ("key update p50 / max ms", f"{keys['p50']:.1f} / {keys['max']:.1f}"),
        ("rotations", report["rotations"]),
        ("resends", report["resends"]),
        ("rejects expired / unknown / auth",
         f"{rejects['expired']} / {rejects['unknown']} / {rejects['auth']}"),
        ("hub memory per peer KiB", "n/a" if per_peer is None else f"{per_peer:.1f}"),
        ("peak RSS MB", ", ".join(f"{k} {v}" for k, v in report["peak_rss_mb"].items())),
    ]  # fmt: skip
    for name, value in rows:
        table.add_row(name, str(value))
    Console().print(table)


def plot(report: dict[str, Any], path: Path, period: float, epoch_offset: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timeline = report["timeline"]
    seconds = [row["t"] for row in timeline]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(9, 6))
    top.plot(seconds, [row["acked"] for row in timeline], color="tab:blue")
    top.set_ylabel("messages acknowledged / s")
    bottom.plot(seconds, [row["p99_ms"] for row in timeline], color="tab:red")
    bottom.set_ylabel("p99 latency, ms")
    bottom.set_xlabel("seconds since traffic started")
    first = period - (epoch_offset % period)
    change = first
    while seconds and change <= seconds[-1]:
        for axis in (top, bottom):
            axis.axvline(change, color="grey", linestyle=":", linewidth=1)
        change += period
    top.set_title(f"{report['peers']} peers, periods of {period:g} s (dotted: period changes)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_loadtest(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="tvdnet-loadtest-"))
    run = Run(args, workdir)
    try:
        report = trio.run(run.main)
    finally:
        if args.keep:
            shutil.copytree(workdir, args.keep, dirs_exist_ok=True)
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if args.plot:
        plot(report, args.plot, args.period, run.started - run.epoch)
    if not args.quiet:
        print_report(report)
    return 0 if report["lost"] == 0 and report["duplicates"] == 0 else 1

"""Shared by benchmarks/fig3a.py and benchmarks/bridge.py: how long one VM takes to get
the k partial keys of a period, by each approach of the paper.

One *run* of a variant (approach, k) starts, in one trio run on the real clock:

- a real bridge (`device_bridge.open_bridge`, the daemon's own code path) for a star TVD
  of one VM ("vm") and k peers, with periods of `period_s` seconds; the peers' channels
  are never connected, so every period the bridge waits for that one VM only;
- the VM's side, a `KeyAgent` over a `Session` holding the VM's computer keys, which
  derives every period key (U) as a node does:
  - approach II (virtio-serial stand-ins): `tvdnet`'s own key-channel driver
    (`run_key_channel`) over a Unix socket the bridge listens on, a pty the bridge opens
    with pyserial (the guest holds the master, as QEMU does), or TCP on loopback; the
    agent acknowledges, and the bridge's worker reads the ack;
  - approach I (virtual CD-ROM): the bridge's `CdromWorker` writes the ISO image of the
    update on tmpfs (pycdlib) and asks "QEMU" over QMP to swap the medium; here a small
    QMP server stands in for QEMU and for the guest, which reads UPDATE.MP from the image
    (`read_update_from_iso`) and applies it (`KeyAgent.apply_image`) before the swap is
    answered. There is no real drive, no guest kernel noticing the new medium and no
    mount: this is a lower bound of approach I.

then waits for `periods` period starts and reads the bridge's own record of each
(`Bridge.status().key_updates`): from the period's scheduled start, when the bridge woke
and began U* (`pushed`), and when the VM's ack (or swap) completed. A sample is:

- `start_to_ack_ms`: period start to ack, what an operator sees;
- `push_to_ack_ms`: from the bridge beginning the period (evolving dev_t, deriving the
  k partials) to the ack: the delivery itself, without the timer's lateness, which on a
  busy machine is scheduling noise common to every approach.

Runs are interleaved: every repetition runs every variant once, in a shuffled order, so
that the machine's load swings spread over all of them.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import random
import shutil
import socket
import statistics
import tempfile
import time
import tty
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import trio
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from device_bridge import (
    CdromSwap,
    ChannelSpec,
    MemberConfig,
    SerialLine,
    StreamPort,
    TcpListen,
    TvdConfig,
    UnixListen,
    open_bridge,
    read_update_from_iso,
)
from tvdnet import WallClock
from tvdnet.config import KeyChannelSpec
from tvdnet.core.agent import KeyAgent, KeysUpdated
from tvdnet.core.scheme import Schedule, generate
from tvdnet.core.session import Session
from tvdnet.keychannel import run_key_channel
from tvdnet_tools.local import free_port

APPROACHES = {
    "iso": "I: ISO image (pycdlib, tmpfs) + QMP swap",
    "unix": "II: Unix socket",
    "pty": "II: pty (pyserial)",
    "tcp": "II (dev): TCP loopback",
}
VM = "vm"


@dataclass(frozen=True, slots=True)
class Variant:
    approach: str  # a key of APPROACHES
    k: int  # partial keys per update: the VM's peers

    def __str__(self) -> str:
        return f"{self.approach} k={self.k}"


@dataclass(frozen=True, slots=True)
class Sample:
    approach: str
    k: int
    repetition: int
    t: int
    start_to_ack_ms: float
    push_to_ack_ms: float


class _Wakeup:
    def __init__(self) -> None:
        self._event = trio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()
        self._event = trio.Event()


def _tmpfs_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="tvdnet-bench-", dir="/dev/shm"))


class _Guest:
    """The VM's key handling: a KeyAgent over a Session with the VM's computer keys."""

    def __init__(self, agent: KeyAgent) -> None:
        self.agent = agent
        self.wakeup = _Wakeup()
        self.applied = 0  # the newest period applied

    def after_agent(self) -> None:
        while (event := self.agent.next_event()) is not None:
            if isinstance(event, KeysUpdated):
                self.applied = max(self.applied, event.t)
        self.wakeup.set()


async def _serve_qmp(listener: trio.SocketListener, guest: _Guest, clock: WallClock) -> None:
    """QEMU's monitor for the swap, and the guest reading UPDATE.MP off the new medium."""

    async def one(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.send_all(b'{"QMP": {"version": {}, "capabilities": []}}\r\n')
            buffer = bytearray()
            while True:
                try:
                    data = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    return  # the bridge hangs up after each swap, sometimes with a reset
                if not data:
                    return
                buffer += data
                while b"\n" in buffer:
                    line, _, rest = bytes(buffer).partition(b"\n")
                    buffer = bytearray(rest)
                    request = json.loads(line)
                    if request["execute"] == "blockdev-change-medium":
                        image = Path(request["arguments"]["filename"])
                        guest.agent.apply_image(read_update_from_iso(image), clock.now())
                        guest.after_agent()
                    answer = {"return": {}, "id": request.get("id")}
                    await stream.send_all(json.dumps(answer).encode() + b"\r\n")

    async with trio.open_nursery() as nursery:
        while True:
            nursery.start_soon(one, await listener.accept())


@contextlib.asynccontextmanager
async def _vm_side(
    approach: str, tmp: Path, guest: _Guest, clock: WallClock
) -> AsyncIterator[tuple[ChannelSpec, KeyChannelSpec | None, trio.Nursery]]:
    """The bridge's spec for the VM's channel, and the guest's, with what serves them."""
    async with trio.open_nursery() as nursery:
        if approach == "unix":
            path = tmp / "vm.sock"
            yield UnixListen(path), KeyChannelSpec("unix", str(path)), nursery
        elif approach == "tcp":
            port = free_port()
            yield TcpListen("127.0.0.1", port), KeyChannelSpec("tcp", f"127.0.0.1:{port}"), nursery
        elif approach == "pty":
            # QEMU's -chardev pty: QEMU (here the guest) holds the master; the bridge opens
            # the slave path. Raw from the start, so nothing is echoed before the bridge
            # opens it.
            master, slave = os.openpty()
            tty.setraw(slave)
            try:
                yield (
                    SerialLine("pty", Path(os.ttyname(slave))),
                    KeyChannelSpec("fd", str(master)),
                    nursery,
                )
            finally:
                os.close(slave)  # the master is closed by run_key_channel's stream
        elif approach == "iso":
            sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            await sock.bind(str(tmp / "qmp.sock"))
            sock.listen(4)
            listener = trio.SocketListener(sock)
            nursery.start_soon(_serve_qmp, listener, guest, clock)
            yield CdromSwap(tmp / "qmp.sock"), None, nursery
        else:
            raise ValueError(approach)
        nursery.cancel_scope.cancel()


async def run_variant(
    variant: Variant, repetition: int, *, periods: int, period_s: float
) -> list[Sample]:
    """One run of `variant`: the samples of `periods` consecutive period starts."""
    peers = [f"p{i:04d}" for i in range(1, variant.k + 1)]
    provisioning = generate("bench", [VM, *peers], pairs=[(VM, p) for p in peers])
    clock = WallClock()
    # Period 1 began at most a second ago; the VM connects during it and is measured from
    # the next period start on.
    schedule = Schedule(math.floor(time.time()), period_s, 10_000_000)
    session = Session(provisioning.for_vm(VM), schedule)
    guest = _Guest(KeyAgent(session, schedule))
    tmp = Path(tempfile.mkdtemp(prefix="tvb", dir="/tmp"))  # short: socket paths
    iso_dir = _tmpfs_dir()
    try:
        async with _vm_side(variant.approach, tmp, guest, clock) as (spec, guest_spec, nursery):
            config = TvdConfig.for_schedule(
                "bench",
                schedule,
                [
                    MemberConfig(VM, "127.0.0.1:10000", spec),
                    # The peers' own channels: never connected, so never waited for.
                    *(
                        MemberConfig(p, f"127.0.0.1:{10000 + i}", StreamPort(p))
                        for i, p in enumerate(peers, start=1)
                    ),
                ],
                pairs=f"star:{VM}",
            )
            async with open_bridge(
                config,
                provisioning.for_bridge(1),
                clock=clock,
                allow_dev_transports=True,
                iso_dir=iso_dir,
            ) as bridge:
                if guest_spec is not None:
                    nursery.start_soon(
                        run_key_channel, guest_spec, guest.agent, guest.after_agent,
                        guest.wakeup, clock,
                    )  # fmt: skip
                with trio.fail_after(max(120.0, 20 * period_s)):
                    first = bridge.period or 1
                    await bridge.wait_acked(VM, first)  # the update at hello (or first swap)
                    last = first + 1 + periods
                    await bridge.wait_acked(VM, last - 1)
                    # Each measured period may finish before the next begins; wait for the
                    # start of `last` so that the record of `last - 1` is final.
                    await clock.sleep_until(schedule.start(last) + 0.01)
                records = {r.t: r for r in bridge.status().key_updates}
            samples = []
            for t in range(first + 1, last):
                record = records.get(t)
                if record is None or record.vms != 1 or record.all_acked_after is None:
                    # The bridge woke too late to begin t at all (it began t+1), the VM
                    # was not connected at t's start, or never acked t.
                    continue
                samples.append(
                    Sample(
                        variant.approach,
                        variant.k,
                        repetition,
                        t,
                        record.all_acked_after * 1000,
                        (record.all_acked_after - record.pushed_after) * 1000,
                    )
                )
            return samples
    finally:
        provisioning.erase()
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(iso_dir, ignore_errors=True)


def run_interleaved(
    variants: Sequence[Variant],
    repetitions: int,
    *,
    periods: int,
    period_s: float,
    seed: int = 1,
    quiet: bool = False,
) -> tuple[list[Sample], dict[str, int]]:
    """Every variant once per repetition, in a new shuffled order each time.

    Returns the samples and, per variant, how many periods gave no sample (the VM missed
    a whole period: on this machine, a stall longer than `period_s`).
    """
    rng = random.Random(seed)
    samples: list[Sample] = []
    missed: dict[str, int] = {str(v): 0 for v in variants}
    columns = (
        TextColumn("{task.description:<28}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, disable=quiet) as progress:
        task = progress.add_task("runs", total=repetitions * len(variants))
        for repetition in range(repetitions):
            order = list(variants)
            rng.shuffle(order)
            for variant in order:
                progress.update(task, description=f"rep {repetition + 1}: {variant}")
                got: list[Sample] = []
                try:
                    got = trio.run(
                        functools.partial(
                            run_variant, variant, repetition, periods=periods, period_s=period_s
                        )
                    )
                except* trio.TooSlowError:
                    pass  # the VM never caught up (a channel stuck for minutes): missed
                samples += got
                missed[str(variant)] += periods - len(got)
                progress.advance(task)
    return samples, missed


@dataclass(frozen=True, slots=True)
class Summary:
    approach: str
    k: int
    n: int
    median_ms: float
    p25_ms: float
    p75_ms: float
    best_ms: float
    worst_ms: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def summarize(samples: Iterable[Sample], field: str) -> dict[tuple[str, int], Summary]:
    """Per (approach, k): median, quartiles, best and worst of `field`."""
    groups: dict[tuple[str, int], list[float]] = {}
    for sample in samples:
        groups.setdefault((sample.approach, sample.k), []).append(getattr(sample, field))
    out = {}
    for (approach, k), values in sorted(groups.items()):
        values.sort()
        quartiles = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
        out[(approach, k)] = Summary(
            approach,
            k,
            len(values),
            statistics.median(values),
            quartiles[0],
            quartiles[2],
            values[0],
            values[-1],
        )
    return out


def machine() -> dict[str, Any]:
    """What the figures were measured on (they mean little without it)."""
    load = Path("/proc/loadavg").read_text().split()[:3]
    return {
        "cpus": os.cpu_count(),
        "loadavg": [float(x) for x in load],
        "python": ".".join(map(str, __import__("sys").version_info[:3])),
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }

"""Fake guests for the bridge tests: they speak SPEC §5 with `tvdnet.channel`, nothing else.

A fake guest never derives a key: it records what the bridge sent (with the mock time it
arrived) and answers with `ack` when asked to. The tests recompute every expected partial
independently from the provisioning output.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar, cast

import trio

from device_bridge._config import MemberConfig, TvdConfig
from device_bridge._transports import StreamPort
from tvdnet import WallClock, channel
from tvdnet.core.scheme import (
    DeviceKeys,
    Pair,
    Provisioning,
    Schedule,
    device_update,
    evolve_device_key,
)

# Periods of 10 s; the epoch is far from 0 so that wall time and mock time differ.
EPOCH = 1_700_000_000.0
PERIOD_S = 10.0
SCHEDULE = Schedule(EPOCH, PERIOD_S, 1000)


def clock_at(wall: float) -> WallClock:
    """A WallClock that shows `wall` when the MockClock of the current run shows 0."""
    return WallClock(offset=wall)


def start_of(t: int) -> float:
    return SCHEDULE.start(t)


@contextmanager
def short_tmp() -> Iterator[Path]:
    """A private directory with a short path: Unix socket paths must fit 107 bytes."""
    directory = Path(tempfile.mkdtemp(prefix="tvb", dir="/tmp"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory)


def stream_config(
    ids: Iterable[str], tvd: str = "test-tvd", schedule: Schedule = SCHEDULE, pairs: str = "all"
) -> tuple[TvdConfig, dict[str, StreamPort]]:
    ports = {vm: StreamPort(vm) for vm in ids}
    members = [
        MemberConfig(vm, f"127.0.0.1:{7000 + i}", port)
        for i, (vm, port) in enumerate(ports.items())
    ]
    return TvdConfig.for_schedule(tvd, schedule, members, pairs=pairs), ports


class Reference:
    """An independent copy of dev_1 of every pair, evolved by hand with the SPEC §3 formula."""

    def __init__(self, provisioning: Provisioning) -> None:
        keys = provisioning.for_bridge(1)
        self.tvd = keys.tvd
        self._dev = {pair: bytes(keys.key_bytes(pair)) for pair in keys.pairs}
        keys.erase()

    def dev(self, pair: Pair, t: int) -> bytes:
        key = self._dev[pair]
        for period in range(1, t):
            key = evolve_device_key(key, self.tvd, pair.lo, pair.hi, period)
        return key

    def partials(self, vm: str, t: int) -> dict[str, bytes]:
        return {
            pair.other(vm): device_update(self.dev(pair, t), self.tvd, pair.lo, pair.hi, t)
            for pair in self._dev
            if vm in pair
        }

    def all_key_hex(self, last_period: int) -> set[str]:
        """Every dev_t and partial_t hex up to `last_period`: none may reach a log."""
        out = set()
        for pair in self._dev:
            for t in range(1, last_period + 1):
                dev = self.dev(pair, t)
                out.add(dev.hex())
                out.add(device_update(dev, self.tvd, pair.lo, pair.hi, t).hex())
        return out


M = TypeVar("M", bound=channel.ChannelMessage)


@dataclass
class Received(Generic[M]):
    at: float  # wall time by the bridge's clock when the guest read it
    message: M


class FakeGuest:
    """A node's key-channel end, minimal: hello, read, ack (or not)."""

    def __init__(
        self, vm: str, stream: trio.abc.Stream, clock: WallClock, *, ack: bool = True
    ) -> None:
        self.vm = vm
        self.stream = stream
        self.clock = clock
        self.ack = ack
        self.reader = channel.ChannelReader()
        self.received: list[Received[channel.ChannelMessage]] = []
        self._arrived = trio.Event()
        self.eof = trio.Event()  # set when the bridge hung up (or the stream broke)
        self._sending = trio.StrictFIFOLock()

    async def send(self, message: channel.ChannelMessage) -> None:
        await self.send_bytes(channel.encode(message))

    async def send_bytes(self, data: bytes) -> None:
        async with self._sending:
            await self.stream.send_all(data)

    async def hello(self, vm: str | None = None, have: int = 0) -> None:
        await self.send(channel.Hello(vm or self.vm, have))

    async def hello_until_welcome(self) -> None:
        """SPEC §5: a node says hello again every second until welcomed (a pty may have
        dropped what was written before the bridge opened it)."""
        while not self.of(channel.Welcome):
            await self.hello()
            with trio.move_on_after(1.0):
                await self.wait_for(channel.Welcome)

    async def run(self) -> None:
        """Read until EOF, acking every update if asked to; then close."""
        try:
            await self._read()
        finally:
            self.eof.set()
            await trio.aclose_forcefully(self.stream)

    async def _read(self) -> None:
        while True:
            try:
                data = await self.stream.receive_some(1 << 16)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                return
            for message in self.reader.feed(bytes(data)):
                self.received.append(Received(self.clock.now(), message))
                if self.ack and isinstance(message, channel.Update):
                    await self.send(channel.Ack(message.t, len(message.partials), ()))
            self._arrived.set()
            self._arrived = trio.Event()

    async def wait_for(self, kind: type[Any], count: int = 1, timeout: float = 30.0) -> list[Any]:
        """The first `count` messages of `kind` (mock seconds of patience)."""
        with trio.fail_after(timeout):
            while len(found := self.of(kind)) < count:
                await self._arrived.wait()
        return found[:count]

    def of(self, kind: type[Any]) -> list[Any]:
        return [r.message for r in self.received if isinstance(r.message, kind)]

    def updates(self) -> list[Received[channel.Update]]:
        updates = [r for r in self.received if isinstance(r.message, channel.Update)]
        return cast("list[Received[channel.Update]]", updates)  # each message is an Update


def partials_bytes(update: channel.Update) -> dict[str, bytes]:
    return {peer: bytes(p) for peer, p in update.partials.items()}


def device_keys_at(provisioning: Provisioning, t: int) -> DeviceKeys:
    return provisioning.for_bridge(t)


def close_fd(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


INF = math.inf

"""The node's key-channel I/O: open the channel, pump bytes to and from the KeyAgent,
and reopen it after EOF, HUP or EIO, at most once a second (SPEC §5: never spin)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Protocol

import trio

from ._clock import WallClock
from ._logs import RateLimitedLog
from .config import KeyChannelSpec
from .core.agent import KeyAgent
from .core.channel import parse_address
from .core.constants import CHANNEL_HELLO_RETRY
from .ports import find_virtio_port, open_char_device, open_serial
from .streams import fileno_of, receive_some, write_now

__all__ = ["run_key_channel"]

logger = logging.getLogger("tvdnet.keychannel")

_READ_SIZE = 65536
_IMAGE_POLL = 0.05  # seconds between looks at an approach-I image (as in the paper's setup)


class Wakeup(Protocol):
    def set(self) -> None: ...

    async def wait(self) -> None: ...


class KeyChannelOutput:
    """What the agent has for the bridge, written at once by whoever made it (an ack
    right after its update was applied) when the channel's descriptor takes it whole;
    the rest, and everything while a write is under way, by the channel's writer task."""

    def __init__(self, agent: KeyAgent, clock: WallClock, wakeup: Wakeup) -> None:
        self._agent = agent
        self._clock = clock
        self._wakeup = wakeup
        self._fd: int | None = None
        self.leftover = b""
        self.busy = False  # the writer task is writing

    def attach(self, stream: trio.abc.Stream) -> None:
        self._fd = fileno_of(stream)

    def detach(self) -> None:
        self._fd = None
        self.leftover = b""

    def flush(self) -> None:
        agent = self._agent
        if not agent.output_size():
            return
        if self._fd is None or self.busy or self.leftover:
            self._wakeup.set()
            return
        data = agent.data_to_send()
        written = write_now(self._fd, data)
        if written < len(data):
            self.leftover = data[written:]
            self._wakeup.set()
        else:
            agent.written(self._clock.now())


async def _open(spec: KeyChannelSpec) -> trio.abc.Stream:
    if spec.kind == "virtio":
        return open_char_device(find_virtio_port(spec.target))
    if spec.kind == "tty":
        return open_serial(spec.target)
    if spec.kind == "unix":
        return await trio.open_unix_socket(spec.target)
    if spec.kind == "tcp":
        host, port = parse_address(spec.target)
        return await trio.open_tcp_stream(host, port)
    raise ValueError(f"cannot open a key channel of kind {spec.kind!r}")


async def run_key_channel(
    spec: KeyChannelSpec,
    agent: KeyAgent,
    after_agent: Callable[[], None],
    wakeup: Wakeup,
    clock: WallClock,
    output: KeyChannelOutput | None = None,
) -> None:
    """Serve the key channel for as long as the node runs. `after_agent` is called after
    every call into the agent; it writes what the agent has through `output` (or wakes
    `wakeup`, which the writer task waits on)."""
    if output is None:
        output = KeyChannelOutput(agent, clock, wakeup)
    log = RateLimitedLog(logger)
    if spec.kind == "image":
        await _poll_image(spec.target, agent, after_agent, clock, log)
        return
    # An inherited descriptor cannot be reopened: keep it, and retry on it after errors.
    persistent = trio.lowlevel.FdStream(int(spec.target)) if spec.kind == "fd" else None
    try:
        await _serve(spec, persistent, agent, after_agent, wakeup, clock, log, output)
    finally:
        if persistent is not None:
            await persistent.aclose()


async def _serve(
    spec: KeyChannelSpec,
    persistent: trio.lowlevel.FdStream | None,
    agent: KeyAgent,
    after_agent: Callable[[], None],
    wakeup: Wakeup,
    clock: WallClock,
    log: RateLimitedLog,
    output: KeyChannelOutput,
) -> None:
    while True:
        if persistent is not None:
            stream: trio.abc.Stream = persistent
        else:
            try:
                stream = await _open(spec)
            except (OSError, ValueError) as exc:
                log.warning("open", "event=key-channel-unavailable channel=%s error=%s", spec, exc)
                await trio.sleep(CHANNEL_HELLO_RETRY)
                continue
        output.attach(stream)
        agent.connection_made(clock.now())
        after_agent()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_write, stream, agent, wakeup, clock, output)
                reason = await _read(stream, agent, after_agent, clock)
                nursery.cancel_scope.cancel()
        finally:
            output.detach()
            agent.connection_lost(clock.now())
            after_agent()
            if persistent is None:
                await stream.aclose()
        log.info("lost", "event=key-channel-lost channel=%s reason=%s", spec, reason)
        await trio.sleep(CHANNEL_HELLO_RETRY)


async def _read(
    stream: trio.abc.Stream, agent: KeyAgent, after_agent: Callable[[], None], clock: WallClock
) -> str:
    """Feed the agent until EOF or an error; returns why it stopped."""
    fd = fileno_of(stream)
    try:
        while True:
            data = await receive_some(stream, fd, _READ_SIZE)
            if not data:
                return "eof"
            agent.receive_data(data, clock.now())
            after_agent()
    except (trio.BrokenResourceError, OSError) as exc:
        cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else exc
        return f"error ({cause!s})" if cause else "broken"


async def _write(
    stream: trio.abc.Stream,
    agent: KeyAgent,
    wakeup: Wakeup,
    clock: WallClock,
    output: KeyChannelOutput,
) -> None:
    while True:
        data = output.leftover or agent.data_to_send()
        output.leftover = b""
        if not data:
            await wakeup.wait()
            continue
        output.busy = True
        try:
            with trio.move_on_after(5) as scope:  # a host end that never reads must not block us
                await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return  # the reader sees the same failure and ends this connection
        finally:
            output.busy = False
        if not scope.cancelled_caught:
            agent.written(clock.now())


async def _poll_image(
    path: str,
    agent: KeyAgent,
    after_agent: Callable[[], None],
    clock: WallClock,
    log: RateLimitedLog,
) -> None:
    """Approach I: read UPDATE.MP whenever its contents change."""
    last: bytes | None = None
    while True:
        try:
            data = await trio.to_thread.run_sync(_read_file, path)
        except OSError as exc:
            log.info("image", "event=image-unreadable path=%s error=%s", path, exc.strerror)
            data = None
        if data is not None and data != last:
            last = data
            agent.apply_image(data, clock.now())
            after_agent()
        await trio.sleep(_IMAGE_POLL)


def _read_file(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)

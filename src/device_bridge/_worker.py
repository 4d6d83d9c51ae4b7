"""One VM's key channel, driven by its own trio tasks (SPEC §5).

`ChannelWorker` moves bytes between a port and the VM's sans-I/O `VmChannel`: it opens
or accepts the port, reads into the channel, writes what the channel says, wakes it at
its deadlines, and reconnects. Each worker has its own tasks and its own bounded output,
so one VM's slow, stuck or hostile channel never delays another VM's update:

- `new_update` (called at each period start) never blocks: it queues bytes and wakes the
  writer task;
- a write that does not complete within BRIDGE_WRITE_TIMEOUT is a stuck channel: the
  connection is dropped (a pty or serial line is re-opened) and its queue discarded;
- while more than BRIDGE_OUTPUT_LIMIT bytes wait to be written, the worker stops reading
  from that VM, so a VM that asks and never reads cannot grow the bridge's memory.

`CdromWorker` is approach I: no connection, an ISO image per period and a QMP swap.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from tvdnet import WallClock, channel
from tvdnet.core.channel import Member
from tvdnet.streams import fileno_of, receive_some, write_now

from ._iso import open_qmp, write_update_image
from ._log import emit
from ._retry import Backoff, PlannedSwap, SwapPlan
from ._signal import Signal
from ._transports import (
    CdromSwap,
    ChannelSpec,
    SerialLine,
    StreamPort,
    TcpConnect,
    TcpListen,
    UnixConnect,
    UnixListen,
    open_listener,
    open_stream,
    unix_socket_problem,
)
from ._vmchannel import Acked, NodeSaid, Refused, VmChannel
from ._watchdog import WriteWatchdog
from .constants import (
    BRIDGE_CLOSE_TIMEOUT,
    BRIDGE_FEED_PIECE,
    BRIDGE_OUTPUT_LIMIT,
    BRIDGE_READ_CHUNK,
    BRIDGE_RECONNECT_INITIAL,
    BRIDGE_RECONNECT_MAX,
    BRIDGE_WRITE_TIMEOUT,
)
from .errors import ControlError, IsoError, QmpError

__all__ = ["CdromWorker", "ChannelWorker", "OnAcked", "VmStatus", "Worker"]

_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)

OnAcked = Callable[[str, int, float], None]
"""Told (vm, t, now) when a VM acknowledges period t (approach I: when t is swapped in)."""


def _ignore_ack(vm: str, t: int, now: float) -> None:
    pass


@dataclass(frozen=True, slots=True)
class VmStatus:
    """What `tvdnet-bridge status` shows for one VM."""

    vm: str
    channel: str
    connected: bool
    state: str
    acked: int  # the newest period the VM acknowledged (approach I: the newest swapped in)
    lag: int  # periods the VM is behind the current one (0 when there is no current period)
    resends: int
    last_latency: float | None  # seconds from the first send of an update to its ack
    connections: int
    stuck: int  # connections dropped because a write did not complete in time

    def to_json(self) -> dict[str, object]:
        return {
            "vm": self.vm,
            "channel": self.channel,
            "connected": self.connected,
            "state": self.state,
            "acked": self.acked,
            "lag": self.lag,
            "resends": self.resends,
            "last_latency": self.last_latency,
            "connections": self.connections,
            "stuck": self.stuck,
        }


def _lag(current: int | None, acked: int) -> int:
    return max(0, current - acked) if current is not None else 0


class _Dropped(Exception):
    """Ends one connection; `why` goes to the log."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


class ChannelWorker:
    """The bridge end of one VM's key channel over a stream transport."""

    def __init__(
        self,
        vm: str,
        spec: ChannelSpec,
        welcome: channel.Welcome,
        clock: WallClock,
        *,
        allow_dev: bool = False,
        on_acked: OnAcked = _ignore_ack,
        on_written: OnAcked = _ignore_ack,
        watchdog: WriteWatchdog | None = None,
    ) -> None:
        self.vm = vm
        self.spec = spec
        self.channel = VmChannel(vm, welcome)
        self._on_written = on_written
        # The bridge's one watchdog for every VM's writes (a private one if run alone,
        # as by a test; then nothing runs it and writes are unwatched).
        self._watchdog = watchdog if watchdog is not None else WriteWatchdog(BRIDGE_WRITE_TIMEOUT)
        self._connection_scope: trio.CancelScope | None = None
        self._stuck_why: str | None = None
        self._fd: int | None = None  # the port's descriptor while connected (`_write_now`)
        self._writing = False  # the writer task is in a write
        self._leftover: tuple[bytes, int | None] | None = None  # what `_write_now` left
        self._clock = clock
        self._allow_dev = allow_dev
        self._on_acked = on_acked
        self._wake = Signal()  # output queued, or a deadline may have moved
        self._drained = Signal()  # the writer emptied the queue
        self._acked_signal = Signal()
        self._resolved = Signal()  # the writer handled wants_disconnect
        self._writer_wait: trio.CancelScope | None = None  # the writer's idle wait, if any
        self.connected = False
        self.connections = 0
        self.stuck = 0
        self.last_latency: float | None = None
        self.last_ack_after_start: float | None = None
        self._period_start = math.nan

    def __repr__(self) -> str:
        return f"<ChannelWorker vm={self.vm!r} {self.spec} connected={self.connected}>"

    # ------------------------------------------------------------------ what the bridge calls

    def new_update(
        self,
        t: int,
        update: bytes,
        period_start: float,
        period_end: float,
        now: float,
        *,
        members: tuple[Member, ...] | None = None,
    ) -> None:
        """Queue period t's update (SPEC §5); never blocks, whatever the VM is doing."""
        self._period_start = period_start
        self.channel.new_update(t, update, period_end, now, members=members)
        if not self._write_now(now):
            self._after_channel(now)

    def _write_now(self, now: float) -> bool:
        """Write what the channel has at once, when the port's descriptor takes it whole:
        at a period start the bridge hands out 1,201 updates, and this spares a task step
        each. Whatever the port does not take goes to the writer task. False if nothing
        was attempted (no descriptor, or the writer is busy)."""
        fd = self._fd
        channel = self.channel
        if fd is None or self._writing or self._leftover is not None:
            return False
        if channel.wants_disconnect or not channel.output_size():
            return False
        data = channel.data_to_send()
        t = channel.taken_update
        written = write_now(fd, data)
        if written < len(data):
            self._leftover = (data[written:], t)
            self._wake.fire()
            return True
        if t is not None:
            self._on_written(self.vm, t, now)
        self._drained.fire()
        self._move_writer_wait()  # the update's re-send is due at a new time
        return True

    def drop_update(self) -> None:
        self.channel.drop_update()
        self._wake.fire()

    def status(self, current: int | None) -> VmStatus:
        return VmStatus(
            vm=self.vm,
            channel=str(self.spec),
            connected=self.connected,
            state=self.channel.state.value,
            acked=self.channel.acked,
            lag=_lag(current, self.channel.acked),
            resends=self.channel.resends,
            last_latency=self.last_latency,
            connections=self.connections,
            stuck=self.stuck,
        )

    async def wait_acked(self, t: int) -> None:
        while self.channel.acked < t:
            await self._acked_signal.wait()

    # ------------------------------------------------------------------ the channel's output

    def _after_channel(self, now: float) -> None:
        # The output stays in the channel until the writer takes it, so that a later
        # hello can supersede an answer not yet written (VmChannel._on_message).
        while (event := self.channel.next_event()) is not None:
            self._on_event(event, now)
        if self.channel.output_size() or self.channel.wants_disconnect:
            self._wake.fire()
        else:
            self._move_writer_wait()

    def _move_writer_wait(self) -> None:
        """Nothing to write, but the next deadline may have moved (an ack cancels the
        re-send, a new update sets one): move the idle writer's wake-up instead of waking
        it to look."""
        if (waiting := self._writer_wait) is not None:
            waiting.deadline = self._clock.trio_time(self.channel.next_deadline())

    def _on_event(self, event: Acked | NodeSaid | Refused, now: float) -> None:
        match event:
            case Acked(t, applied, missing, latency):
                self.last_latency = latency
                self.last_ack_after_start = now - self._period_start
                emit(
                    logging.INFO,
                    "acked",
                    vm=self.vm,
                    t=t,
                    applied=applied,
                    missing=len(missing) or None,
                    latency_ms=latency * 1000,
                    after_start_ms=self.last_ack_after_start * 1000,
                )
                if missing:
                    emit(logging.WARNING, "missing-keys", vm=self.vm, t=t, peers=",".join(missing))
                self._on_acked(self.vm, t, now)
                self._acked_signal.fire()
            case NodeSaid(reason):
                level = logging.ERROR if reason == channel.SCHEDULE else logging.WARNING
                emit(level, "node-error", vm=self.vm, reason=reason)
            case Refused(reason, detail):
                emit(logging.WARNING, "refused", vm=self.vm, reason=reason, detail=detail)

    # ------------------------------------------------------------------ the port

    async def run(self) -> None:
        """Serve the port until cancelled: reconnect, re-accept, re-open, never busy-loop."""
        spec = self.spec
        match spec:
            case UnixConnect() | TcpConnect() | SerialLine():
                await self._dial_forever(spec)
            case UnixListen() | TcpListen() | StreamPort():
                await self._accept_forever(spec)
            case CdromSwap():
                raise TypeError("a cdrom channel is served by CdromWorker")

    async def _dial_forever(self, spec: UnixConnect | TcpConnect | SerialLine) -> None:
        backoff = Backoff(BRIDGE_RECONNECT_INITIAL, BRIDGE_RECONNECT_MAX)
        last_problem = ""
        while True:
            problem = ""
            if isinstance(spec, UnixConnect) and not self._allow_dev:
                # SPEC §5: re-checked at each connect, since QEMU may create the socket late.
                problem = unix_socket_problem(spec.path) or ""
            stream: trio.abc.Stream | None = None
            if not problem:
                try:
                    stream = await open_stream(spec)
                except OSError as exc:
                    problem = f"cannot open: {exc.strerror or exc}"
            if stream is None:
                if problem != last_problem:
                    emit(logging.INFO, "port-unavailable", vm=self.vm, port=spec, why=problem)
                    last_problem = problem
                await trio.sleep(backoff.failed())
                continue
            last_problem = ""
            backoff.succeeded()
            await self._serve(stream, resettable=isinstance(spec, SerialLine))
            # The port closed (EOF, EIO, a refused hello, a stuck write): wait before
            # opening it again, so a port that fails at once is not a busy loop.
            await trio.sleep(BRIDGE_RECONNECT_INITIAL)

    async def _accept_forever(self, spec: UnixListen | TcpListen | StreamPort) -> None:
        backoff = Backoff(BRIDGE_RECONNECT_INITIAL, BRIDGE_RECONNECT_MAX)
        while True:
            try:
                listener = await open_listener(spec)
                break
            except (OSError, ControlError) as exc:
                why = exc.strerror if isinstance(exc, OSError) else str(exc)
                emit(logging.ERROR, "listen-failed", vm=self.vm, port=spec, why=why)
                await trio.sleep(backoff.failed())
        emit(logging.INFO, "listening", vm=self.vm, port=spec)
        try:
            async with trio.open_nursery() as nursery:
                current: tuple[trio.CancelScope, trio.Event] | None = None
                while True:
                    try:
                        stream = await listener.accept()
                    except OSError as exc:  # out of descriptors, say: not a reason to spin
                        emit(logging.ERROR, "accept-failed", vm=self.vm, why=exc.strerror)
                        await trio.sleep(BRIDGE_RECONNECT_INITIAL)
                        continue
                    if current is not None:
                        # A newer connection (QEMU restarted) replaces the one being served.
                        current[0].cancel()
                        await current[1].wait()
                    current = await nursery.start(self._serve_replaceable, stream)
        finally:
            with trio.CancelScope(shield=True):
                await listener.aclose()
            if isinstance(spec, UnixListen):
                _remove_socket(spec.path)

    async def _serve_replaceable(
        self,
        stream: trio.abc.Stream,
        task_status: trio.TaskStatus[
            tuple[trio.CancelScope, trio.Event]
        ] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        scope, done = trio.CancelScope(), trio.Event()
        task_status.started((scope, done))
        try:
            with scope:
                await self._serve(stream, resettable=False)
            if scope.cancelled_caught:
                emit(logging.INFO, "replaced", vm=self.vm)
        finally:
            done.set()

    async def _serve(self, stream: trio.abc.Stream, *, resettable: bool) -> None:
        """One connection: wait for hello, then updates flow (SPEC §5)."""
        now = self._clock.now()
        self.connections += 1
        self.connected = True
        self.channel.connection_made(now)
        emit(logging.INFO, "connected", vm=self.vm, port=self.spec)
        why = "cancelled"
        self._stuck_why = None
        self._fd = fileno_of(stream)
        try:
            async with trio.open_nursery() as nursery:
                self._connection_scope = nursery.cancel_scope
                nursery.start_soon(self._read_loop, stream)
                nursery.start_soon(self._write_loop, stream, resettable)
        except* _Dropped as group:
            why = group.exceptions[0].why if isinstance(group.exceptions[0], _Dropped) else why
        finally:
            self._connection_scope = None
            self._fd = None
            self._leftover = None
            if self._stuck_why is not None:
                why = self._stuck_why
            self.connected = False
            self._drained.fire()
            self.channel.connection_lost(self._clock.now())
            with trio.move_on_after(BRIDGE_CLOSE_TIMEOUT) as scope:
                scope.shield = True
                await stream.aclose()
            emit(logging.INFO, "disconnected", vm=self.vm, why=why)

    async def _read_loop(self, stream: trio.abc.Stream) -> None:
        while True:
            try:
                data = await receive_some(stream, self._fd, BRIDGE_READ_CHUNK)
            except _BROKEN as exc:
                raise _Dropped(f"read failed ({type(exc).__name__})") from None
            if not data:
                raise _Dropped("end of stream")
            view = memoryview(data)
            for offset in range(0, len(view), BRIDGE_FEED_PIECE):
                while self.channel.output_size() > BRIDGE_OUTPUT_LIMIT:
                    await self._drained.wait()  # bounded output: a VM that never reads waits
                now = self._clock.now()
                self.channel.receive_data(bytes(view[offset : offset + BRIDGE_FEED_PIECE]), now)
                self._after_channel(now)
                if self.channel.wants_disconnect:
                    break  # the rest of this input is discarded with the connection (SPEC §5)
            while self.channel.wants_disconnect:
                # Read nothing more until the writer has sent the error and hung up (or,
                # on a line that cannot hang up, reset the channel to wait for a hello).
                await self._resolved.wait()

    async def _write_loop(self, stream: trio.abc.Stream, resettable: bool) -> None:
        while True:
            deadline = self.channel.next_deadline()
            if (
                not self.channel.output_size()
                and not self.channel.wants_disconnect
                and self._leftover is None
            ):
                with trio.move_on_at(self._clock.trio_time(deadline)) as waiting:
                    self._writer_wait = waiting
                    try:
                        await self._wake.wait()
                    finally:
                        self._writer_wait = None
            now = self._clock.now()
            if now >= self.channel.next_deadline():
                self.channel.handle_timeout(now)
                self._after_channel(now)
            if self._leftover is not None:
                data, t = self._leftover
                self._leftover = None
            else:
                data, t = self.channel.data_to_send(), self.channel.taken_update
            if data:
                self._writing = True
                try:
                    await self._send(stream, data)
                finally:
                    self._writing = False
                if t is not None:
                    self._on_written(self.vm, t, self._clock.now())
                self._drained.fire()
            if self.channel.wants_disconnect and not self.channel.output_size():
                if not resettable:
                    raise _Dropped("refused input")
                # SPEC §5: a pty cannot be hung up; discard what was read, wait for a hello.
                self.channel.connection_made(self._clock.now())
                self._resolved.fire()

    async def _send(self, stream: trio.abc.Stream, data: bytes) -> None:
        started = time.perf_counter()
        connection = self._connection_scope

        def stuck() -> None:
            self.stuck += 1
            self._stuck_why = "stuck: a write did not complete in time"
            emit(
                logging.WARNING,
                "stuck",
                vm=self.vm,
                bytes=len(data),
                timeout_s=self._watchdog.timeout,
                real_ms=(time.perf_counter() - started) * 1000,
            )
            if connection is not None:
                connection.cancel()

        self._watchdog.started(self, stuck)
        try:
            await stream.send_all(data)
        except _BROKEN as exc:
            raise _Dropped(f"write failed ({type(exc).__name__})") from None
        finally:
            self._watchdog.done(self)


def _remove_socket(path: Path) -> None:
    with contextlib.suppress(OSError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            path.unlink()


class CdromWorker:
    """Approach I (SPEC §5): each period's update as an ISO image, swapped in over QMP.

    No acknowledgement exists on this path; `acked` is the newest period swapped in. A
    failed swap is retried (1 s, backing off) until the period ends. The image lives on
    tmpfs and is deleted as soon as QEMU has opened it.
    """

    def __init__(
        self,
        vm: str,
        spec: CdromSwap,
        clock: WallClock,
        iso_dir: Path,
        *,
        allow_dev: bool = False,
        on_acked: OnAcked = _ignore_ack,
    ) -> None:
        self.vm = vm
        self.spec = spec
        self._clock = clock
        self._on_acked = on_acked
        self._iso_dir = iso_dir
        self._allow_dev = allow_dev
        self._wake = Signal()
        self._acked_signal = Signal()
        self.plan = SwapPlan()
        self.connected = False
        self.attempts = 0
        self.failures = 0  # swaps that failed and were retried
        self.last_latency: float | None = None

    def __repr__(self) -> str:
        return f"<CdromWorker vm={self.vm!r} {self.spec} swapped={self.swapped}>"

    def new_update(
        self,
        t: int,
        update: bytes,
        period_start: float,
        period_end: float,
        now: float,
        *,
        members: tuple[Member, ...] | None = None,
    ) -> None:
        if self.plan.new_update(t, update, period_end, resend=members is not None):
            self._wake.fire()

    def drop_update(self) -> None:
        self.plan.drop()

    @property
    def swapped(self) -> int:
        """The newest period swapped in."""
        return self.plan.swapped_t

    def status(self, current: int | None) -> VmStatus:
        return VmStatus(
            vm=self.vm,
            channel=str(self.spec),
            connected=self.connected,
            state="cdrom",
            acked=self.swapped,
            lag=_lag(current, self.swapped),
            resends=self.failures,
            last_latency=self.last_latency,
            connections=self.attempts,
            stuck=0,
        )

    async def wait_acked(self, t: int) -> None:
        while self.swapped < t:
            await self._acked_signal.wait()

    async def run(self) -> None:
        while True:
            swap = self.plan.due(self._clock.now())
            if swap is None:
                with trio.move_on_at(self._clock.trio_time(self.plan.next_deadline())):
                    await self._wake.wait()
                continue
            if not await self._swap(swap):
                self.plan.failed(swap, self._clock.now())

    async def _swap(self, swap: PlannedSwap) -> bool:
        t, data = swap.t, swap.update
        self.attempts += 1
        started = self._clock.now()
        image: Path | None = None
        try:
            if not self._allow_dev and (problem := unix_socket_problem(self.spec.qmp)):
                raise QmpError(problem)
            # In the event loop, not a thread: pycdlib is pure Python (a thread would hold
            # the GIL all the same) and tmpfs never blocks on a disk.
            image = write_update_image(self._iso_dir, f"{self.vm}.{t}.iso", data)
            async with open_qmp(self.spec.qmp) as qmp:
                # force: a guest that is reading the drive has locked its tray, and an
                # update must not wait for the guest's consent (it may never give it).
                await qmp.change_medium(self.spec.device, image, force=True)
        except (IsoError, QmpError, OSError, trio.BrokenResourceError) as exc:
            self.connected = False
            self.failures += 1
            emit(logging.WARNING, "swap-failed", vm=self.vm, t=t, why=str(exc))
            return False
        finally:
            if image is not None:
                # SPEC §5: deleted after the swap (QEMU holds it open; nothing stays on disk).
                _unlink(image)
        self.connected = True
        self.plan.swapped(swap)
        self.last_latency = self._clock.now() - started
        emit(logging.INFO, "swapped", vm=self.vm, t=t, latency_ms=self.last_latency * 1000)
        self._on_acked(self.vm, t, self._clock.now())
        self._acked_signal.fire()
        return True


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


Worker = ChannelWorker | CdromWorker

"""The bridge's end of one VM's key channel (SPEC §5), sans-I/O.

`VmChannel` knows which VM is behind its port from the bridge's configuration, never
from what the VM says. It waits for a `hello`, answers with `welcome` and the current
`update`, sends each new period's update, and re-sends an unacknowledged update after
1 s, backing off, until it is acknowledged or its period ends.

The daemon drives it: `connection_made` when the port opens, `receive_data` /
`data_to_send` to move bytes, `new_update` at each period start (and after a membership
change, with `members`), `handle_timeout` at `next_deadline()`. When `wants_disconnect`
becomes true the daemon drops the connection (a socket) or just waits for the next
hello (a pty or serial line, which cannot be hung up).
"""

from __future__ import annotations

import enum
import math
from collections import deque
from dataclasses import dataclass

from tvdnet import channel
from tvdnet.core.channel import Member
from tvdnet.core.errors import ChannelError

from ._retry import Backoff
from .constants import CHANNEL_RESEND_INITIAL, CHANNEL_RESEND_MAX

__all__ = ["Acked", "ChannelEvent", "ChannelState", "NodeSaid", "Refused", "VmChannel"]


class ChannelState(enum.Enum):
    DISCONNECTED = "disconnected"
    WAIT_HELLO = "wait-hello"
    READY = "ready"  # welcomed; updates flow
    REFUSED = "refused"  # the node refused our schedule: nothing more until its next hello


@dataclass(slots=True)
class Acked:
    t: int
    applied: int
    missing: tuple[str, ...]
    latency: float  # seconds from the first send of this update to its ack


@dataclass(slots=True)
class NodeSaid:
    """The node answered with an error message (`early`, `schedule`, `bad-message`, ...)."""

    reason: str


@dataclass(slots=True)
class Refused:
    """The bridge refused what came from the port (`wrong-vm`, `bad-message`, `version`)."""

    reason: str
    detail: str


ChannelEvent = Acked | NodeSaid | Refused


class _Pending:
    __slots__ = ("data", "first_sent", "t")

    def __init__(self, t: int, data: bytes) -> None:
        self.t = t
        self.data = data  # the encoded update, kept for re-sends and re-hellos this period
        self.first_sent: float | None = None


class VmChannel:
    def __init__(self, vm: str, welcome: channel.Welcome) -> None:
        self.vm = vm
        self.state = ChannelState.DISCONNECTED
        self.acked = 0  # the newest period the node acknowledged
        self.resends = 0
        self.wants_disconnect = False
        self._welcome = welcome
        self._update: _Pending | None = None  # the current period's update
        self._unacked = False
        self._end_of_update = math.inf  # when the current update's period ends
        self._resend_at = math.inf
        self._backoff = Backoff(CHANNEL_RESEND_INITIAL, CHANNEL_RESEND_MAX)
        self._reader = channel.ChannelReader()
        self._out = bytearray()
        self._update_queued: int | None = None  # the period of the update in `_out`
        self.taken_update: int | None = None  # ... in what `data_to_send` last gave
        self._events: deque[ChannelEvent] = deque()

    def __repr__(self) -> str:
        return f"<VmChannel vm={self.vm!r} state={self.state.value} acked={self.acked}>"

    # ------------------------------------------------------------------ connection

    def connection_made(self, now: float) -> None:
        """The port (re)opened: wait for a hello (SPEC §5), forgetting partial input."""
        self._reader.reset()
        self._out.clear()
        self._update_queued = None
        self.wants_disconnect = False
        self.state = ChannelState.WAIT_HELLO
        self._resend_at = math.inf

    def connection_lost(self, now: float) -> None:
        self._reader.reset()
        self._out.clear()
        self._update_queued = None
        self.state = ChannelState.DISCONNECTED
        self._resend_at = math.inf

    def receive_data(self, data: bytes | bytearray, now: float) -> None:
        if self.state is ChannelState.DISCONNECTED:
            return
        try:
            for message in self._reader.feed(data):
                self._on_message(message, now)
                if self.wants_disconnect:
                    return
        except ChannelError as exc:
            self._refuse(exc.reason, exc.detail, disconnect=True)

    def data_to_send(self) -> bytes:
        """Take what is queued for the port. Call it just before writing: what stays
        queued can still be superseded by a later hello (see `_on_message`).
        `taken_update` says which period's update it carries, if any."""
        data = bytes(self._out)
        self._out.clear()
        self.taken_update, self._update_queued = self._update_queued, None
        return data

    def output_size(self) -> int:
        """Bytes queued and not yet taken by `data_to_send`."""
        return len(self._out)

    def next_event(self) -> ChannelEvent | None:
        return self._events.popleft() if self._events else None

    # ------------------------------------------------------------------ what the daemon says

    def set_welcome(self, welcome: channel.Welcome) -> None:
        self._welcome = welcome

    def new_update(
        self,
        t: int,
        update: bytes,
        period_end: float,
        now: float,
        *,
        members: tuple[Member, ...] | None = None,
    ) -> None:
        """The update of period t (encoded), to send now and until acknowledged.

        With `members`, the membership changed: a `members` message goes first (SPEC §5).
        """
        self._update = _Pending(t, update)
        self._unacked = True
        self._end_of_update = period_end
        self._backoff.succeeded()
        if members is not None:
            self._welcome = channel.Welcome(
                self._welcome.tvd, self._welcome.vm, self._welcome.schedule, members
            )
        if self.state is ChannelState.READY:
            if members is not None:
                self._out += channel.encode(channel.Members(members))
            self._send_update(now)

    def drop_update(self) -> None:
        """No current update (before the first period or after the last)."""
        self._update = None
        self._unacked = False
        self._resend_at = math.inf

    # ------------------------------------------------------------------ time

    def next_deadline(self) -> float:
        return min(self._resend_at, self._end_of_update if self._unacked else math.inf)

    def handle_timeout(self, now: float) -> None:
        if self._unacked and now >= self._end_of_update:
            self._unacked = False  # SPEC §5: re-send until acknowledged or the period ends
            self._resend_at = math.inf
        if now >= self._resend_at and self._unacked and self.state is ChannelState.READY:
            self.resends += 1
            self._backoff.failed()
            self._send_update(now)

    # ------------------------------------------------------------------ messages

    def _send_update(self, now: float) -> None:
        pending = self._update
        if pending is None or not self._unacked:
            return
        if pending.first_sent is None:
            pending.first_sent = now
        self._out += pending.data
        self._update_queued = pending.t
        self._resend_at = now + self._backoff.delay

    def _refuse(self, reason: str, detail: str, *, disconnect: bool) -> None:
        self._out += channel.encode(channel.Error(reason))
        self._events.append(Refused(reason, detail))
        if disconnect:
            self.wants_disconnect = True

    def _on_message(self, message: channel.ChannelMessage, now: float) -> None:
        match message:
            case channel.Hello(vm):
                if vm != self.vm:
                    # SPEC §5: `wrong-vm` and nothing else; the port is the authentication.
                    self._refuse(channel.WRONG_VM, "a hello naming another VM", disconnect=True)
                    return
                self.state = ChannelState.READY
                # A hello restarts the conversation: the node discarded what it had
                # partly read, so nothing still queued from before it matters, and the
                # welcome and update below supersede it. A node that says hello again
                # before reading our answer (a busy hub retries every 1 s) thus gets
                # one answer, not one per hello.
                self._out.clear()
                self._update_queued = None
                self._out += channel.encode(self._welcome)
                # SPEC §5: after every hello, the current update, acknowledged before or not.
                pending = self._update
                if pending is not None and now < self._end_of_update:
                    pending.first_sent = None
                    self._unacked = True
                    self._backoff.succeeded()
                    self._send_update(now)
            case channel.Ack(t, applied, missing):
                pending = self._update
                if pending is not None and t == pending.t and self._unacked:
                    self._unacked = False
                    self._resend_at = math.inf
                    self.acked = max(self.acked, t)
                    sent = pending.first_sent if pending.first_sent is not None else now
                    self._events.append(Acked(t, applied, missing, now - sent))
            case channel.Error(reason):
                self._events.append(NodeSaid(reason))
                if reason == channel.SCHEDULE:
                    self.state = ChannelState.REFUSED
                    self._resend_at = math.inf
            case _:
                self._refuse(
                    channel.BAD_MESSAGE,
                    f"a {type(message).__name__.lower()} from a node",
                    disconnect=True,
                )

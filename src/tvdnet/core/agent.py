"""The node's end of the key channel (SPEC §5), sans-I/O: the paper's U, fed by the bridge.

`KeyAgent` turns channel bytes into key updates for a `Session` and answers the bridge.
Whoever drives it opens the channel, calls `connection_made` (which queues a `hello`),
moves bytes with `receive_data` / `data_to_send`, calls `connection_lost` on EOF, HUP or
EIO, and runs `handle_timeout` at `next_deadline()`: until a welcome arrives the agent
asks to say hello again every second, so a bridge that restarts is found again without
polling in a busy loop. After it, a period whose update is 1 s overdue makes the agent say
hello again (every second while it is missing): a port whose host end changed without the
guest seeing a hang-up (a VM live-migrated to another host's bridge, issue 19) is found
again before the skew allowance runs out, since every hello is answered with the current
update (SPEC §5).

Approach I (the virtual CD-ROM) feeds whole `UPDATE.MP` files to `apply_image`.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from dataclasses import dataclass
from typing import Final

from . import channel
from .channel import Member
from .constants import CHANNEL_HELLO_RETRY
from .errors import ChannelError
from .scheme import Schedule
from .session import Session

__all__ = [
    "AgentEvent",
    "AgentState",
    "BridgeSaid",
    "ChannelRefused",
    "KeyAgent",
    "KeysUpdated",
    "ScheduleMismatch",
    "Welcomed",
]


class AgentState(enum.Enum):
    DISCONNECTED = "disconnected"
    WAIT_WELCOME = "wait-welcome"
    WELCOMED = "welcomed"
    REFUSED = "refused"  # the bridge's schedule differs from the key file's: nothing applied


@dataclass(slots=True)
class Welcomed:
    members: tuple[Member, ...]
    missing: list[str]  # members this node holds no computer key for


@dataclass(slots=True)
class KeysUpdated:
    t: int
    applied: int
    missing: list[str]


@dataclass(slots=True)
class ScheduleMismatch:
    """A welcome whose schedule (or TVD) differs from the key file's: keys erased."""

    detail: str


@dataclass(slots=True)
class ChannelRefused:
    """The agent refused a message from the bridge (and said so with an error)."""

    reason: str
    detail: str


@dataclass(slots=True)
class BridgeSaid:
    """The bridge sent an error message."""

    reason: str


AgentEvent = Welcomed | KeysUpdated | ScheduleMismatch | ChannelRefused | BridgeSaid

_HELLO_TIMER: Final = "hello"
_IMAGE_TIMER: Final = "image"


class KeyAgent:
    """Applies the bridge's partial keys to a Session (SPEC §5, node side)."""

    def __init__(self, session: Session, schedule: Schedule) -> None:
        self.session = session
        self.schedule = schedule  # from the computer-key file: the one to trust
        self.state = AgentState.DISCONNECTED
        self.members: dict[str, Member] = {}
        self.last_update = 0  # the newest period an update was applied or acknowledged for
        self._reader = channel.ChannelReader()
        self._out = bytearray()
        self._events: deque[AgentEvent] = deque()
        self._hello_at = math.inf
        self._held_image: channel.Update | None = None
        self._ack_since: float | None = None  # when the update now acknowledged arrived
        self.apply_seconds: deque[float] = deque(maxlen=64)  # update arrived -> ack written

    def __repr__(self) -> str:
        return f"<KeyAgent vm={self.session.me!r} state={self.state.value}>"

    # ------------------------------------------------------------------ the driver's calls

    def connection_made(self, now: float) -> None:
        """The channel is (re)open: discard any partial input and say hello."""
        self._reader.reset()
        if self.state is not AgentState.REFUSED:
            self.state = AgentState.WAIT_WELCOME
        self._say_hello(now)

    def connection_lost(self, now: float) -> None:
        """EOF, HUP or EIO: discard what was partly read; the driver reopens and says hello."""
        self._reader.reset()
        self._out.clear()
        if self.state is not AgentState.REFUSED:
            self.state = AgentState.DISCONNECTED
        self._hello_at = now + CHANNEL_HELLO_RETRY

    def receive_data(self, data: bytes | bytearray, now: float) -> None:
        if data and self.state is AgentState.WAIT_WELCOME:
            # The bridge is answering: the hello retry counts 1 s from its last byte, so a
            # node too busy to read a large welcome at once does not ask for another.
            self._hello_at = now + CHANNEL_HELLO_RETRY
        try:
            for message in self._reader.feed(data):
                self._on_message(message, now)
        except ChannelError as exc:
            # SPEC §5: undecodable input is discarded (the reader was reset); say hello again.
            self._refuse(exc.reason, exc.detail)
            self._say_hello(now)

    def data_to_send(self) -> bytes:
        data = bytes(self._out)
        self._out.clear()
        return data

    def written(self, now: float) -> None:
        """The driver wrote what `data_to_send` gave it: an ack in it closes the timing of
        its update (arrival to ack written, `apply_seconds`)."""
        if self._ack_since is not None:
            self.apply_seconds.append(now - self._ack_since)
            self._ack_since = None

    def output_size(self) -> int:
        """Bytes queued for the bridge and not yet taken by `data_to_send`."""
        return len(self._out)

    def next_event(self) -> AgentEvent | None:
        return self._events.popleft() if self._events else None

    def next_deadline(self) -> float:
        held = self._held_image
        image_at = self._image_due(held.t) if held is not None else math.inf
        return min(self._hello_at, image_at)

    def handle_timeout(self, now: float) -> None:
        if now >= self._hello_at:
            if self.state in (AgentState.WAIT_WELCOME, AgentState.DISCONNECTED):
                self._say_hello(now)
            elif self.state is AgentState.WELCOMED:
                # The next period's update is overdue (an update moves this deadline on):
                # ask again, and every second while it stays missing.
                self._say_hello(now)
            else:
                self._hello_at = math.inf
        held = self._held_image
        if held is not None and now >= self._image_due(held.t):
            self._held_image = None
            self._apply(held, now, ack=False)

    def have(self) -> int:
        """The highest period this node holds a key for, over all pairs (0 if none)."""
        return max((self.session.key_state(p).period for p in self.session.peers), default=0)

    # ------------------------------------------------------------------ approach I

    def apply_image(self, data: bytes, now: float) -> None:
        """The contents of UPDATE.MP from a virtual CD-ROM (SPEC §5, approach I).

        No acknowledgement and no `early` error on this path: an update that arrives early
        is held until its period starts (minus the allowance), then applied.
        """
        try:
            message = channel.decode(data)
        except ChannelError as exc:
            self._events.append(ChannelRefused(exc.reason, f"UPDATE.MP: {exc.detail}"))
            return
        if not isinstance(message, channel.Update):
            self._events.append(ChannelRefused(channel.BAD_MESSAGE, "UPDATE.MP is not an update"))
            return
        if not self._period_exists(message):
            return
        if now < self._image_due(message.t):
            held = self._held_image
            if held is None or held.t < message.t:
                if held is not None:
                    held.erase()
                self._held_image = message
            else:
                message.erase()
            return
        self._apply(message, now, ack=False)

    def _image_due(self, t: int) -> float:
        return self.schedule.start(t) - self.session.allowance

    # ------------------------------------------------------------------ messages

    def _say_hello(self, now: float) -> None:
        self._out += channel.encode(channel.Hello(self.session.me, self.have()))
        self._hello_at = now + CHANNEL_HELLO_RETRY

    def _overdue_at(self, now: float) -> float:
        """When to ask again for an update that has not come: 1 s into the period after
        the newest one applied, and at least 1 s from now (never a burst of hellos)."""
        t = self.last_update + 1
        if t > self.schedule.periods:
            return math.inf
        return max(self.schedule.start(t), now) + CHANNEL_HELLO_RETRY

    def _refuse(self, reason: str, detail: str) -> None:
        self._out += channel.encode(channel.Error(reason))
        self._events.append(ChannelRefused(reason, detail))

    def _on_message(self, message: channel.ChannelMessage, now: float) -> None:
        match message:
            case channel.Welcome():
                self._on_welcome(message, now)
            case channel.Update():
                if self.state is AgentState.WELCOMED:
                    self._on_update(message, now)
                else:
                    message.erase()  # before a welcome, or refused: apply nothing
            case channel.Members(members):
                if self.state is AgentState.WELCOMED:
                    self._set_members(members, now)
            case channel.Error(reason):
                self._events.append(BridgeSaid(reason))
            case _:
                self._refuse(
                    channel.BAD_MESSAGE, f"a {type(message).__name__.lower()} from the bridge"
                )

    def _on_welcome(self, welcome: channel.Welcome, now: float) -> None:
        me = self.session
        if welcome.vm != me.me:
            self._refuse(channel.BAD_MESSAGE, "a welcome for another VM")
            return
        if welcome.tvd != me.tvd or welcome.schedule != self.schedule:
            # SPEC §5: error `schedule`, erase all keys, apply nothing from this bridge.
            what = "TVD" if welcome.tvd != me.tvd else "schedule"
            self._out += channel.encode(channel.Error(channel.SCHEDULE))
            me.erase_all_keys()
            self.state = AgentState.REFUSED
            self._hello_at = math.inf
            self._events.append(
                ScheduleMismatch(
                    f"the bridge's {what} differs from the computer-key file's; "
                    "no key from this bridge is applied (provision the TVD again)"
                )
            )
            return
        self.state = AgentState.WELCOMED
        self._hello_at = self._overdue_at(now)
        missing = self._set_members(welcome.members, now)
        self._events.append(Welcomed(welcome.members, missing))

    def _set_members(self, members: tuple[Member, ...], now: float) -> list[str]:
        self.members = {m.id: m for m in members}
        return self.session.set_members(self.members, now)

    def _period_exists(self, update: channel.Update) -> bool:
        if update.t > self.schedule.periods:
            update.erase()
            self._refuse(channel.BAD_MESSAGE, f"an update for period {update.t}, past the last")
            return False
        return True

    def _on_update(self, update: channel.Update, now: float) -> None:
        if not self._period_exists(update):
            return
        if self.schedule.start(update.t) > now + self.session.allowance:
            # SPEC §5: not begun by this node's clock: `early`, no ack; the bridge re-sends.
            update.erase()
            self._out += channel.encode(channel.Error(channel.EARLY))
            self._events.append(ChannelRefused(channel.EARLY, f"an update for period {update.t}"))
            return
        self._apply(update, now, ack=True)

    def _apply(self, update: channel.Update, now: float, *, ack: bool) -> None:
        applied, missing = self.session.apply_update(update.t, update.partials, now)
        self.last_update = max(self.last_update, update.t)
        if ack:
            self._out += channel.encode(channel.Ack(update.t, applied, tuple(missing)))
            self._ack_since = now
            if self.state is AgentState.WELCOMED:
                self._hello_at = self._overdue_at(now)
        self._events.append(KeysUpdated(update.t, applied, missing))

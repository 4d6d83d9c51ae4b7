"""What the sans-I/O `Session` tells the layer that drives it (h11 style: small records).

Treat them as immutable. They are plain slotted dataclasses, not frozen ones, because a
busy node creates one per message and a frozen dataclass costs three times as much.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class Message:
    """A message from `sender`, delivered in order and exactly once, under period `period`."""

    sender: str
    period: int
    body: Any


@dataclass(slots=True)
class MessagesAcknowledged:
    """The peer acknowledged the messages that `Session.send` returned these handles for."""

    peer: str
    handles: list[int]


@dataclass(slots=True)
class SendFailed:
    """The message `handle` will never be delivered (its peer left the TVD)."""

    peer: str
    handle: int
    reason: str


@dataclass(slots=True)
class Dial:
    """The session wants a connection to `peer`: dial it, then call `connect` or `dial_failed`."""

    peer: str


@dataclass(slots=True)
class ConnectionAuthenticated:
    """The peer's first DATA frame on `conn` authenticated; `active` is the kept connection."""

    conn: int
    peer: str
    active: bool


@dataclass(slots=True)
class PeerRestarted:
    """An authenticated connection showed a new instance of `peer` (SPEC §4 Delivery)."""

    peer: str


@dataclass(slots=True)
class Refused:
    """Input refused on `conn`: a REJECT sent, a CLOSE sent, or an authentication failure."""

    conn: int
    peer: str | None
    cause: str
    detail: str


@dataclass(slots=True)
class KeyErased:
    """The period key of `peer` for `period` ended (plus the allowance) and was erased."""

    peer: str
    period: int


Event = (
    Message
    | MessagesAcknowledged
    | SendFailed
    | Dial
    | ConnectionAuthenticated
    | PeerRestarted
    | Refused
    | KeyErased
)

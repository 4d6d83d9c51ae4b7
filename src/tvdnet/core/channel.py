"""The key channel between a bridge and a node (SPEC §5): message classes and their codec.

Sans-I/O, used by both ends: `encode(message)` gives bytes; a `ChannelReader` turns a
byte stream back into messages and raises `ChannelError` (with the SPEC §5 error reason
to answer) for anything malformed. A decoded message has had every field checked: ids
are valid, periods are integers >= 1, partial keys are exactly 32 bytes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import msgpack

from .constants import CHANNEL_LIMIT, KEY_LEN, PROTOCOL_VERSION
from .errors import ChannelError
from .ids import is_valid_id
from .reader import UNPACK_ERRORS, MsgpackReader, StreamDecodeError
from .scheme import Schedule

__all__ = [
    "Ack",
    "ChannelError",
    "ChannelMessage",
    "ChannelReader",
    "Error",
    "Hello",
    "Member",
    "Members",
    "Update",
    "Welcome",
    "decode",
    "encode",
    "parse_address",
]

# Error reasons (SPEC §5).
WRONG_VM: Final = "wrong-vm"
EARLY: Final = "early"
SCHEDULE: Final = "schedule"
BAD_MESSAGE: Final = "bad-message"
VERSION: Final = "version"
ERROR_REASONS: Final = frozenset({WRONG_VM, EARLY, SCHEDULE, BAD_MESSAGE, VERSION})

_U64_LIMIT: Final = 1 << 64


def parse_address(addr: str, *, any_port: bool = False) -> tuple[str, int]:
    """Split "host:port" or "[v6]:port"; ValueError says what is wrong.

    `any_port` admits port 0 (a listener that takes whatever port is free).
    """
    host, sep, port_text = addr.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError("an address must be host:port")
    port = int(port_text)
    if not (0 if any_port else 1) <= port <= 65535:
        raise ValueError("a port must be 1..65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError("an IPv6 host must be in brackets, as [::1]:port")
    if not host or any(c.isspace() for c in host):
        raise ValueError("an address needs a host")
    return host, port


@dataclass(frozen=True, slots=True)
class Member:
    id: str
    addr: str  # "host:port" where the member's node listens for peers

    def host_port(self) -> tuple[str, int]:
        return parse_address(self.addr)


@dataclass(frozen=True, slots=True)
class Hello:
    """node -> bridge: who the node says it is, and the newest period it holds."""

    vm: str
    have: int = 0


@dataclass(frozen=True, slots=True)
class Welcome:
    """bridge -> node: the TVD, the schedule and the members with their addresses."""

    tvd: str
    vm: str
    schedule: Schedule
    members: tuple[Member, ...]


@dataclass(frozen=True, slots=True)
class Update:
    """bridge -> node: every partial key of this VM's pairs for period t (U*)."""

    t: int
    partials: Mapping[str, bytearray] = field(repr=False)

    def __repr__(self) -> str:
        return f"Update(t={self.t}, partials=<{len(self.partials)} partial keys>)"

    def erase(self) -> None:
        for partial in self.partials.values():
            partial[:] = bytes(len(partial))


@dataclass(frozen=True, slots=True)
class Ack:
    """node -> bridge: the update of period t was handled."""

    t: int
    applied: int
    missing: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Members:
    """bridge -> node: the new member list, followed at once by the current update."""

    members: tuple[Member, ...]


@dataclass(frozen=True, slots=True)
class Error:
    reason: str


ChannelMessage = Hello | Welcome | Update | Ack | Members | Error


# --------------------------------------------------------------------------- encoding


def _members_wire(members: tuple[Member, ...]) -> list[dict[str, str]]:
    return [{"id": m.id, "addr": m.addr} for m in members]


def encode(message: ChannelMessage) -> bytes:
    """The msgpack map of `message` (SPEC §5)."""
    wire: dict[str, Any]
    match message:
        case Hello(vm, have):
            wire = {"type": "hello", "v": PROTOCOL_VERSION, "vm": vm, "have": have}
        case Welcome(tvd, vm, schedule, members):
            wire = {
                "type": "welcome",
                "v": PROTOCOL_VERSION,
                "tvd": tvd,
                "vm": vm,
                "epoch": float(schedule.epoch),
                "period_s": float(schedule.period_s),
                "periods": schedule.periods,
                "members": _members_wire(members),
            }
        case Update(t, partials):
            # msgpack packs a bytearray as bin, as it does bytes: no immutable copy of
            # each partial key (which could not be zeroed), and none of the time.
            wire = {"type": "update", "t": t, "partials": dict(partials)}
        case Ack(t, applied, missing):
            wire = {"type": "ack", "t": t, "applied": applied, "missing": list(missing)}
        case Members(members):
            wire = {"type": "members", "members": _members_wire(members)}
        case Error(reason):
            wire = {"type": "error", "reason": reason}
    return msgpack.packb(wire)


# --------------------------------------------------------------------------- decoding


def _bad(detail: str) -> ChannelError:
    return ChannelError(BAD_MESSAGE, detail)


def _get(wire: dict[str, Any], key: str, kind: str) -> Any:
    if key not in wire:
        raise _bad(f"{kind}: the field {key!r} is missing")
    return wire[key]


def _int(wire: dict[str, Any], key: str, kind: str, minimum: int) -> int:
    value = _get(wire, key, kind)
    if type(value) is not int or not minimum <= value < _U64_LIMIT:
        raise _bad(f"{kind}.{key} must be an integer >= {minimum}")
    return value


def _number(wire: dict[str, Any], key: str, kind: str) -> float:
    value = _get(wire, key, kind)
    if type(value) not in (int, float) or not math.isfinite(value):
        raise _bad(f"{kind}.{key} must be a finite number")
    return float(value)


def _id(value: object, where: str) -> str:
    if not is_valid_id(value):
        raise _bad(f"{where} must be an id of 1 to 64 characters from [A-Za-z0-9._-]")
    assert isinstance(value, str)
    return value


def _version(wire: dict[str, Any], kind: str) -> None:
    version = _get(wire, "v", kind)
    if version != PROTOCOL_VERSION or type(version) is not int:
        raise ChannelError(VERSION, f"{kind} of protocol version {version!r}, this side speaks 1")


def _members(value: object, kind: str) -> tuple[Member, ...]:
    if type(value) is not list:
        raise _bad(f"{kind}.members must be an array")
    members: list[Member] = []
    seen: set[str] = set()
    for i, entry in enumerate(value):
        if type(entry) is not dict:
            raise _bad(f"{kind}.members[{i}] must be a map")
        member_id = _id(entry.get("id"), f"{kind}.members[{i}].id")
        addr = entry.get("addr")
        if type(addr) is not str:
            raise _bad(f"{kind}.members[{i}].addr must be a string")
        try:
            parse_address(addr)
        except ValueError as exc:
            raise _bad(f"{kind}.members[{i}].addr: {exc}") from None
        if member_id in seen:
            raise _bad(f"{kind}.members[{i}]: the id appears twice")
        seen.add(member_id)
        members.append(Member(member_id, addr))
    return tuple(members)


def _id_list(value: object, where: str) -> tuple[str, ...]:
    if type(value) is not list:
        raise _bad(f"{where} must be an array")
    return tuple(_id(v, f"{where}[{i}]") for i, v in enumerate(value))


def parse_message(wire: object) -> ChannelMessage:
    """Check one decoded msgpack object against SPEC §5."""
    if type(wire) is not dict:
        raise _bad("a key-channel message must be a map")
    kind = wire.get("type")
    if kind == "update":
        t = _int(wire, "t", "update", 1)
        raw = _get(wire, "partials", "update")
        if type(raw) is not dict:
            raise _bad("update.partials must be a map")
        partials: dict[str, bytearray] = {}
        for peer, partial in raw.items():
            _id(peer, "update.partials key")
            if type(partial) is not bytes or len(partial) != KEY_LEN:
                raise _bad(f"update.partials[{peer!r}] must be {KEY_LEN} bytes of bin")
            partials[peer] = bytearray(partial)
        return Update(t, partials)
    if kind == "ack":
        return Ack(
            _int(wire, "t", "ack", 0),
            _int(wire, "applied", "ack", 0),
            _id_list(_get(wire, "missing", "ack"), "ack.missing"),
        )
    if kind == "hello":
        _version(wire, "hello")
        return Hello(_id(_get(wire, "vm", "hello"), "hello.vm"), _int(wire, "have", "hello", 0))
    if kind == "welcome":
        _version(wire, "welcome")
        periods = _get(wire, "periods", "welcome")
        if type(periods) is not int or not 1 <= periods < _U64_LIMIT:
            raise _bad("welcome.periods must be an integer >= 1")
        period_s = _number(wire, "period_s", "welcome")
        if period_s <= 0:
            raise _bad("welcome.period_s must be > 0")
        schedule = Schedule(_number(wire, "epoch", "welcome"), period_s, periods)
        return Welcome(
            _id(_get(wire, "tvd", "welcome"), "welcome.tvd"),
            _id(_get(wire, "vm", "welcome"), "welcome.vm"),
            schedule,
            _members(_get(wire, "members", "welcome"), "welcome"),
        )
    if kind == "members":
        return Members(_members(_get(wire, "members", "members"), "members"))
    if kind == "error":
        reason = _get(wire, "reason", "error")
        if type(reason) is not str or len(reason) > 200:
            raise _bad("error.reason must be a short string")
        return Error(reason)
    raise _bad("unknown message type")


def decode(data: bytes) -> ChannelMessage:
    """One whole message (the UPDATE.MP file of approach I)."""
    if len(data) > CHANNEL_LIMIT:
        raise _bad(f"{len(data)} bytes, over the {CHANNEL_LIMIT}-byte limit")
    try:
        wire = msgpack.unpackb(data, raw=False)
    except UNPACK_ERRORS as exc:
        raise _bad(f"undecodable msgpack ({type(exc).__name__})") from None
    return parse_message(wire)


class ChannelReader:
    """Splits a key channel's byte stream into checked messages."""

    __slots__ = ("_reader",)

    def __init__(self, limit: int = CHANNEL_LIMIT) -> None:
        self._reader = MsgpackReader(limit)

    @property
    def buffered(self) -> int:
        return self._reader.buffered

    def reset(self) -> None:
        """Discard a partly read message (SPEC §5: on EOF, HUP, EIO or undecodable input)."""
        self._reader.reset()

    def feed(self, data: bytes | bytearray) -> Iterator[ChannelMessage]:
        """Yield every message completed by `data`; raise ChannelError at the first bad one.

        After a ChannelError the reader has been reset: what followed is discarded.
        """
        try:
            for wire in self._reader.feed(data):
                yield parse_message(wire)
        except StreamDecodeError as exc:
            self._reader.reset()
            raise _bad(exc.detail) from None
        except ChannelError:
            self._reader.reset()
            raise

"""The TVD file (TOML): which VMs form the TVD, where their nodes listen, and where the
bridge reaches each VM's key channel. `docs/bridge.md` is the reference; in short:

    tvd = "demo"
    period_seconds = 30.0
    periods = 100000
    # epoch = 1764460800.0      # Unix seconds; default: the time of provisioning
    # pairs = "all"             # or "star:HUB": only HUB <-> member pairs
    # hosts = ["kvm1", "kvm2"]  # the TVD's hosts; default: the members' hosts
    [[members]]
    id = "vm-a"
    address = "127.0.0.1:7001"  # where vm-a's node listens for peers
    channel = "unix:/run/tvdnet/vm-a.sock"
    # host = "kvm1"             # the host whose bridge serves vm-a (default "local")

Every problem is a `ConfigError` naming the file, the line and the key. Relative socket
paths are relative to the TVD file. `period_seconds`, `periods`, `epoch` and `pairs` are
used by `provision`; afterwards the keystore's schedule rules (SPEC §3), and a TVD file
that disagrees with it is refused.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from tvdnet.config import read_toml
from tvdnet.core.channel import parse_address
from tvdnet.core.errors import InvalidId
from tvdnet.core.ids import check_id
from tvdnet.core.scheme import Schedule

from ._transports import (
    CdromSwap,
    ChannelSpec,
    SerialLine,
    StreamPort,
    TcpConnect,
    TcpListen,
    UnixConnect,
    UnixListen,
    parse_channel,
)
from .constants import MAX_PERIOD_S, MIN_PERIOD_S
from .errors import ConfigError

__all__ = ["DEFAULT_HOST", "MemberConfig", "TvdConfig", "load_config"]

_TOP_KEYS: Final = ("tvd", "period_seconds", "periods", "epoch", "pairs", "hosts", "members")
_REQUIRED_TOP: Final = ("tvd", "period_seconds", "periods", "members")
_MEMBER_KEYS: Final = ("id", "address", "channel", "host", "suspended")
_REQUIRED_MEMBER: Final = ("id", "address", "channel")
# The host of a member whose entry names none: a TVD on one host never says "host".
DEFAULT_HOST: Final = "local"
_U64_LIMIT: Final = 1 << 64


@dataclass(frozen=True, slots=True)
class MemberConfig:
    """One VM of the TVD as the bridge sees it."""

    id: str
    address: str  # "host:port" where its node listens for peers (sent in welcome/members)
    channel: ChannelSpec  # where the bridge reaches its key channel (on its own host)
    host: str = DEFAULT_HOST  # the host whose bridge serves it (SPEC §1, §6)
    # Left the TVD for now: not served, not in anyone's member list, its pairs' device
    # keys kept (and evolved) so that it comes back with a reload, without provisioning.
    suspended: bool = False


@dataclass(frozen=True, slots=True)
class TvdConfig:
    """A TVD file, checked. Build one in code with `TvdConfig.for_schedule`."""

    tvd: str
    members: tuple[MemberConfig, ...]
    period_seconds: float
    periods: int
    epoch: float | None = None
    pairs: str = "all"  # "all" or "star:HUB"
    # Every host of the TVD, the members' and any named in `hosts` (a host a member may
    # move to): provisioning gives each pair of hosts a transfer key (SPEC §6).
    host_names: tuple[str, ...] = ()
    path: Path | None = field(default=None, compare=False)
    lines: Mapping[str, int] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        _check_semantics(self)

    @property
    def hosts(self) -> tuple[str, ...]:
        """The TVD's hosts: those named in `hosts`, then the members' own, in order."""
        seen = dict.fromkeys(self.host_names)
        seen.update(dict.fromkeys(m.host for m in self.members))
        return tuple(seen)

    def members_on(self, host: str) -> tuple[MemberConfig, ...]:
        """The members whose keys `host` holds, suspended ones included."""
        return tuple(m for m in self.members if m.host == host)

    def served_on(self, host: str) -> tuple[MemberConfig, ...]:
        """The members `host`'s bridge serves: on it and not suspended."""
        return tuple(m for m in self.members if m.host == host and not m.suspended)

    @property
    def suspended(self) -> frozenset[str]:
        return frozenset(m.id for m in self.members if m.suspended)

    def host_of(self, vm: str) -> str:
        return self.member(vm).host

    @classmethod
    def for_schedule(
        cls,
        tvd: str,
        schedule: Schedule,
        members: Iterable[MemberConfig],
        *,
        pairs: str = "all",
        hosts: Iterable[str] = (),
    ) -> TvdConfig:
        return cls(
            tvd,
            tuple(members),
            schedule.period_s,
            schedule.periods,
            schedule.epoch,
            pairs,
            tuple(hosts),
        )

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(self.path, _line_of(self.lines, key), key, problem)

    def member(self, vm: str) -> MemberConfig:
        for member in self.members:
            if member.id == vm:
                return member
        raise KeyError(vm)

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(m.id for m in self.members)

    def schedule(self, default_epoch: float | None = None) -> Schedule:
        """The schedule this file asks for; `default_epoch` stands in for a missing epoch."""
        epoch = self.epoch if self.epoch is not None else default_epoch
        if epoch is None:
            raise self.error("epoch", "no epoch: give one, or take the schedule from a keystore")
        return Schedule(epoch, self.period_seconds, self.periods)

    def pair_list(self) -> list[tuple[str, str]] | None:
        """The pairs to provision: None for every two members, else the hub's pairs."""
        if self.pairs == "all":
            return None
        hub = self.pairs.removeprefix("star:")
        return [(hub, m.id) for m in self.members if m.id != hub]

    def check_schedule(self, schedule: Schedule) -> None:
        """SPEC §3: the schedule is fixed at provisioning; refuse a file that says otherwise."""
        for key, mine, theirs in (
            ("period_seconds", self.period_seconds, schedule.period_s),
            ("periods", self.periods, schedule.periods),
            ("epoch", self.epoch, schedule.epoch),
        ):
            if mine is not None and float(mine) != float(theirs):
                raise self.error(
                    key,
                    f"{mine!r} differs from the keystore's {theirs!r}: the schedule is fixed at "
                    "provisioning (SPEC §3); provision again to change it",
                )


def channel_key(spec: ChannelSpec) -> tuple[object, ...]:
    """What two members may not share: the same socket path, device or TCP port."""
    match spec:
        case UnixConnect(path) | UnixListen(path) | SerialLine(_, path) | CdromSwap(path):
            return ("path", str(path))
        case TcpListen(host, port) | TcpConnect(host, port):
            return ("tcp", host, port)
        case StreamPort():
            return ("stream", id(spec))


def _check_semantics(config: TvdConfig) -> None:
    def fail(key: str, problem: str) -> ConfigError:
        return config.error(key, problem)

    try:
        check_id(config.tvd, "tvd")
    except InvalidId as exc:
        raise fail("tvd", _id_problem(exc)) from None
    period_s = config.period_seconds
    if type(period_s) not in (int, float) or not math.isfinite(period_s) or period_s <= 0:
        raise fail("period_seconds", "must be a number of seconds > 0")
    if not MIN_PERIOD_S <= period_s <= MAX_PERIOD_S:
        # Shorter: the bridge and every node would spend the period on key updates (and
        # log every one); longer: a key stolen once would serve for more than a year.
        raise fail(
            "period_seconds",
            f"{period_s:g} s is outside {MIN_PERIOD_S:g} s to {MAX_PERIOD_S:g} s "
            "(a period is how long one key serves)",
        )
    if type(config.periods) is not int or not 1 <= config.periods < _U64_LIMIT:
        raise fail("periods", "must be an integer >= 1")
    epoch = config.epoch
    if epoch is not None and (type(epoch) not in (int, float) or not math.isfinite(epoch)):
        raise fail("epoch", "must be a number (Unix seconds)")
    if len(config.members) < 2:
        raise fail("members", f"a TVD needs at least two members (got {len(config.members)})")
    ids: dict[str, int] = {}
    addresses: dict[str, int] = {}
    channels: dict[tuple[object, ...], int] = {}
    for i, member in enumerate(config.members):
        where = f"members[{i}]"
        try:
            check_id(member.id, f"{where}.id")
        except InvalidId as exc:
            raise fail(f"{where}.id", _id_problem(exc)) from None
        if member.id in ids:
            raise fail(f"{where}.id", f"{member.id!r} is already members[{ids[member.id]}]")
        ids[member.id] = i
        try:
            parse_address(member.address)
        except (ValueError, TypeError) as exc:
            raise fail(f"{where}.address", str(exc)) from None
        if member.address in addresses:
            raise fail(
                f"{where}.address", f"already the address of members[{addresses[member.address]}]"
            )
        addresses[member.address] = i
        # A path or port names a thing on the member's own host: two hosts may reuse it.
        key = (member.host, *channel_key(member.channel))
        if key in channels:
            raise fail(f"{where}.channel", f"already the channel of members[{channels[key]}]")
        channels[key] = i
        try:
            check_id(member.host, f"{where}.host")
        except InvalidId as exc:
            raise fail(f"{where}.host", _id_problem(exc)) from None
    for i, host in enumerate(config.host_names):
        try:
            check_id(host, f"hosts[{i}]")
        except InvalidId as exc:
            raise fail("hosts", _id_problem(exc)) from None
        if host in config.host_names[:i]:
            raise fail("hosts", f"names {host!r} twice")
    if config.host_names:
        unnamed = sorted({m.host for m in config.members} - set(config.host_names))
        if unnamed:
            raise fail("hosts", f"misses {', '.join(map(repr, unnamed))}, the host of a member")
    if config.pairs != "all":
        hub = config.pairs.removeprefix("star:")
        if not config.pairs.startswith("star:") or hub not in ids:
            raise fail("pairs", 'must be "all" or "star:HUB" where HUB is a member id')


def _id_problem(exc: InvalidId) -> str:
    # check_id says "where: problem"; the key is already named by the ConfigError.
    return str(exc).partition(": ")[2] or str(exc)


# --------------------------------------------------------------------------- the file

_HEADER: Final = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\-\"' ]+?)\s*\]\]?\s*(#.*)?$")
_KEY: Final = re.compile(r"^\s*([A-Za-z0-9_\-]+|\"[^\"]*\")\s*=")


def _key_lines(text: str) -> dict[str, int]:
    """Where each key was written: "tvd", "members", "members[1]", "members[1].channel".

    tomllib does not say where a value came from, and errors must name the line (issue:
    "the error names the file, line and key"), so a small scan of the text finds it.
    """
    lines: dict[str, int] = {}
    table = ""
    counts: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        header = _HEADER.match(line)
        if header is not None:
            name = header.group(2).strip().strip("\"'")
            if header.group(1) == "[[":
                index = counts.get(name, 0)
                counts[name] = index + 1
                table = f"{name}[{index}]"
                lines.setdefault(name, number)
            else:
                table = name
            lines.setdefault(table, number)
            continue
        key = _KEY.match(line)
        if key is not None:
            name = key.group(1).strip('"')
            lines.setdefault(f"{table}.{name}" if table else name, number)
    return lines


def _line_of(lines: Mapping[str, int], key: str) -> int | None:
    """The line of `key`, else of the nearest enclosing table that was written down."""
    while key not in lines:
        if "." in key:
            key = key.rsplit(".", 1)[0]  # members[1].channel -> members[1]
        elif "[" in key:
            key = key.split("[", 1)[0]  # members[1] -> members
        else:
            return None
    return lines[key]


def load_config(path: Path | str) -> TvdConfig:
    """Read and check a TVD file; ConfigError names the file, line and key of any problem."""
    path = Path(path)
    document, text = read_toml(path)
    lines = _key_lines(text)
    base = path.resolve().parent

    def fail(key: str, problem: str) -> ConfigError:
        return ConfigError(path, _line_of(lines, key), key, problem)

    for key in document:
        if key not in _TOP_KEYS:
            raise fail(key, f"unknown key (the top level takes {', '.join(_TOP_KEYS)})")
    for key in _REQUIRED_TOP:
        if key not in document:
            raise ConfigError(path, None, key, "missing")
    raw_members = document["members"]
    if type(raw_members) is not list:
        raise fail("members", "must be an array of tables ([[members]])")
    members = [_member(raw, i, base, fail) for i, raw in enumerate(raw_members)]
    for key, kinds in (
        ("period_seconds", (int, float)),
        ("periods", (int,)),
        ("epoch", (int, float)),
    ):
        value = document.get(key)
        if value is not None and type(value) not in kinds:
            raise fail(key, "must be a number" if float in kinds else "must be an integer")
    pairs = document.get("pairs", "all")
    if type(pairs) is not str:
        raise fail("pairs", 'must be "all" or "star:HUB"')
    hosts = document.get("hosts", [])
    if type(hosts) is not list or not all(type(h) is str for h in hosts):
        raise fail("hosts", "must be a list of host names")
    epoch = document.get("epoch")
    return TvdConfig(
        tvd=_string(document, "tvd", "tvd", fail),
        members=tuple(members),
        period_seconds=float(document["period_seconds"]),
        periods=document["periods"],
        epoch=float(epoch) if epoch is not None else None,
        pairs=pairs,
        host_names=tuple(hosts),
        path=path,
        lines=lines,
    )


def _string(table: dict[str, Any], key: str, where: str, fail: Any) -> str:
    value = table.get(key)
    if type(value) is not str:
        raise fail(where, "must be a string")
    return value


def _member(raw: object, i: int, base: Path, fail: Any) -> MemberConfig:
    where = f"members[{i}]"
    if type(raw) is not dict:
        raise fail(where, "must be a table with id, address and channel")
    for key in raw:
        if key not in _MEMBER_KEYS:
            raise fail(f"{where}.{key}", f"unknown key (a member takes {', '.join(_MEMBER_KEYS)})")
    for key in _REQUIRED_MEMBER:
        if key not in raw:
            raise fail(where, f"the key {key!r} is missing")
    member_id = _string(raw, "id", f"{where}.id", fail)
    address = _string(raw, "address", f"{where}.address", fail)
    text = _string(raw, "channel", f"{where}.channel", fail)
    host = _string(raw, "host", f"{where}.host", fail) if "host" in raw else DEFAULT_HOST
    suspended = raw.get("suspended", False)
    if type(suspended) is not bool:
        raise fail(f"{where}.suspended", "must be true or false")
    try:
        # Parsed again once resolved: the absolute path must still fit a Unix socket.
        channel = parse_channel(str(_resolved(parse_channel(text), base)))
    except ValueError as exc:
        raise fail(f"{where}.channel", str(exc)) from None
    return MemberConfig(member_id, address, channel, host, suspended)


def _resolved(spec: ChannelSpec, base: Path) -> ChannelSpec:
    """Relative socket paths are relative to the TVD file."""
    match spec:
        case UnixConnect(path) if not path.is_absolute():
            return UnixConnect(base / path)
        case UnixListen(path) if not path.is_absolute():
            return UnixListen(base / path)
        case CdromSwap(path, device) if not path.is_absolute():
            return CdromSwap(base / path, device)
    return spec

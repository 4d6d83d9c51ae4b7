"""Where the bridge reaches each VM's key channel (SPEC §5), and how it opens it.

A member's `channel` in the TVD file names one of these (who listens, then what it is):

- `unix:PATH`             QEMU listens (`-chardev socket,path=PATH,server=on`, what
                          libvirt's `<channel type='unix'>` makes); the bridge connects
- `unix-listen:PATH`      the bridge listens (socket mode 0600); QEMU connects
                          (`-chardev socket,path=PATH` without server=on)
- `pty:PATH`              `-chardev pty`: the bridge opens the pty with pyserial (raw mode)
- `serial:PATH`           a serial line, the same way
- `tcp:HOST:PORT`         development: the bridge listens on loopback; a node whose key
                          channel is `tcp:HOST:PORT` dials it
- `tcp-connect:HOST:PORT` development: the bridge dials (QEMU `-chardev socket,host=,port=,
                          server=on`)
- `cdrom:QMP[#ID]`        approach I: ISO images swapped into drive ID (default cdrom0)
                          over the QMP socket QMP

`StreamPort` is the programmatic transport: code (tests, benchmarks, a node test that
runs a bridge in-process) hands the bridge connected streams.

SPEC §5: the port is the authentication, so a transport that any local process can reach
(TCP, or a Unix socket whose file or directory others may write) is refused unless the
bridge is started with the development option.
"""

from __future__ import annotations

import ipaddress
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import trio

from tvdnet.control import open_owner_only_listener
from tvdnet.core.channel import parse_address
from tvdnet.ports import open_serial

__all__ = [
    "CdromSwap",
    "ChannelSpec",
    "SerialLine",
    "StreamPort",
    "TcpConnect",
    "TcpListen",
    "UnixConnect",
    "UnixListen",
    "development_reason",
    "is_loopback",
    "open_listener",
    "open_stream",
    "parse_channel",
    "unix_socket_problem",
]

_UNIX_PATH_MAX: Final = 107  # sun_path holds 108 bytes with the terminating NUL
DEFAULT_CDROM_ID: Final = "cdrom0"


@dataclass(frozen=True, slots=True)
class UnixConnect:
    """QEMU listens on PATH (`server=on`); the bridge connects."""

    path: Path

    def __str__(self) -> str:
        return f"unix:{self.path}"


@dataclass(frozen=True, slots=True)
class UnixListen:
    """The bridge listens on PATH (mode 0600); QEMU connects."""

    path: Path

    def __str__(self) -> str:
        return f"unix-listen:{self.path}"


@dataclass(frozen=True, slots=True)
class SerialLine:
    """A pty or serial line, opened with pyserial in raw mode. It cannot be hung up."""

    kind: str  # "pty" or "serial"
    path: Path

    def __str__(self) -> str:
        return f"{self.kind}:{self.path}"


@dataclass(frozen=True, slots=True)
class TcpListen:
    """Development: the bridge listens on loopback; a node's `tcp:` key channel dials it."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"tcp:{_host_port(self.host, self.port)}"


@dataclass(frozen=True, slots=True)
class TcpConnect:
    """Development: the bridge dials loopback (QEMU `-chardev socket,host=,port=,server=on`)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"tcp-connect:{_host_port(self.host, self.port)}"


@dataclass(frozen=True, slots=True)
class CdromSwap:
    """Approach I: ISO images with UPDATE.MP, swapped into drive `device` over QMP at `qmp`."""

    qmp: Path
    device: str = DEFAULT_CDROM_ID

    def __str__(self) -> str:
        return f"cdrom:{self.qmp}#{self.device}"


class StreamPort(trio.abc.Listener[trio.abc.Stream]):
    """A key channel whose connections code hands in (in-process nodes, tests, benchmarks).

    `await port.connect()` makes a connected socket pair, gives one end to the bridge and
    returns the other, the guest's end; `await port.attach(stream)` hands the bridge a
    stream made elsewhere. A newer connection replaces the one being served, as a QEMU
    that reconnects does.
    """

    def __init__(self, name: str = "stream") -> None:
        self.name = name
        self._send, self._receive = trio.open_memory_channel[trio.abc.Stream](math.inf)

    def __repr__(self) -> str:
        return f"<StreamPort {self.name}>"

    def __str__(self) -> str:
        return f"stream:{self.name}"

    async def connect(self) -> trio.SocketStream:
        """A new connection to the bridge; the returned stream is the guest's end."""
        bridge_end, guest_end = trio.socket.socketpair()
        await self._send.send(trio.SocketStream(bridge_end))
        return trio.SocketStream(guest_end)

    async def attach(self, stream: trio.abc.Stream) -> None:
        await self._send.send(stream)

    async def accept(self) -> trio.abc.Stream:
        return await self._receive.receive()

    async def aclose(self) -> None:
        # The port outlives one bridge (a test may start another on the same config).
        await trio.lowlevel.checkpoint()


ChannelSpec = (
    UnixConnect | UnixListen | SerialLine | TcpListen | TcpConnect | CdromSwap | StreamPort
)


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _unix_path(text: str) -> Path:
    if not text:
        raise ValueError("needs a path")
    if "\0" in text:
        raise ValueError("a socket path cannot hold a NUL byte")
    if len(os.fsencode(text)) > _UNIX_PATH_MAX:
        raise ValueError(f"a Unix socket path may have at most {_UNIX_PATH_MAX} bytes")
    return Path(text)


def _loopback(text: str) -> tuple[str, int]:
    host, port = parse_address(text)
    if not is_loopback(host):
        raise ValueError("TCP key channels are for development and must stay on loopback")
    return host, port


def parse_channel(text: str) -> ChannelSpec:
    """The channel spelled `text` (see the module docstring); ValueError says what is wrong."""
    kind, sep, rest = text.partition(":")
    if not sep:
        raise ValueError("a channel is KIND:TARGET (unix:, unix-listen:, pty:, serial:, tcp:, ...)")
    match kind:
        case "unix":
            return UnixConnect(_unix_path(rest))
        case "unix-listen":
            return UnixListen(_unix_path(rest))
        case "pty" | "serial":
            if not rest.startswith("/"):
                raise ValueError(f"{kind}: needs an absolute device path")
            if "\0" in rest:
                raise ValueError(f"{kind}: a device path cannot hold a NUL byte")
            return SerialLine(kind, Path(rest))
        case "tcp" | "tcp-listen":
            return TcpListen(*_loopback(rest))
        case "tcp-connect":
            return TcpConnect(*_loopback(rest))
        case "cdrom":
            path, _, device = rest.partition("#")
            if device and not device.replace("-", "").replace("_", "").isalnum():
                raise ValueError("cdrom: the drive id after # must be letters, digits, - or _")
            return CdromSwap(_unix_path(path), device or DEFAULT_CDROM_ID)
    raise ValueError(
        f"unknown channel kind {kind!r} (unix, unix-listen, pty, serial, tcp, tcp-connect, cdrom)"
    )


def _others_may_write(path: Path) -> bool:
    try:
        return bool(os.stat(path).st_mode & stat.S_IWOTH)
    except OSError:
        return False


def unix_socket_problem(path: Path) -> str | None:
    """Why a Unix socket at `path` can be reached by any local process, or None."""
    directory = path.parent
    if _others_may_write(directory):
        return f"the directory {directory} is writable by others (anyone may put a socket there)"
    if _others_may_write(path):
        return f"the socket {path} is writable by others (any local process may connect)"
    return None


def development_reason(spec: ChannelSpec) -> str | None:
    """Why `spec` is a development-only transport (SPEC §5), or None if it is not."""
    match spec:
        case TcpListen() | TcpConnect():
            return "TCP on loopback can be reached by any local process"
        case UnixConnect(path) | UnixListen(path) | CdromSwap(path):
            return unix_socket_problem(path)
    return None


# --------------------------------------------------------------------------- opening


async def open_stream(spec: UnixConnect | TcpConnect | SerialLine) -> trio.abc.Stream:
    """Dial or open a port the bridge does not listen on; OSError when it is not there."""
    match spec:
        case UnixConnect(path):
            return await trio.open_unix_socket(os.fspath(path))
        case TcpConnect(host, port):
            return await trio.open_tcp_stream(host, port)
        case SerialLine(_, path):
            return open_serial(path)  # pyserial's SerialException is an OSError


async def open_listener(
    spec: UnixListen | TcpListen | StreamPort,
) -> trio.abc.Listener[trio.abc.Stream]:
    """Listen where QEMU or a node will connect."""
    match spec:
        case StreamPort():
            return spec
        case TcpListen(host, port):
            listeners = await trio.open_tcp_listeners(port, host=host)
            for extra in listeners[1:]:
                await extra.aclose()
            return listeners[0]
        case UnixListen(path):
            # Owner-only (SPEC §5: the port is the authentication); a socket another
            # live process answers on is refused, one left by a dead bridge replaced.
            return await open_owner_only_listener(path, 4)

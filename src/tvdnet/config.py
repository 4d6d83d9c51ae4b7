"""`NodeConfig`: what a node needs to run, from a TOML file or from code.

    key_file = "vm-a.keys"               # the VM's computer-key file (mode 0600)
    listen = "127.0.0.1:7001"            # where peers reach this node
    key_channel = "virtio:org.tvdnet.keys.0"
    # skew_allowance = 2.0               # seconds (SPEC §4)
    # send_timeout = 30.0                # seconds before send() gives up waiting for the ACK
    # max_unauthenticated = 64           # connections that have not authenticated yet
    # inbox_size = 10000                 # received messages the application has not taken
    # control_socket = "vm-a.control"    # owner-only Unix socket: status, send (JSON lines)

Relative paths are relative to the TOML file. Key channels:

- `virtio:NAME`  the guest's virtio-serial port NAME (`/dev/virtio-ports/NAME`, or found
                 under `/sys/class/virtio-ports` without udev)
- `tty:PATH`     a tty or pty, through pyserial (raw mode)
- `unix:PATH`    connect to a Unix socket where the bridge listens (development)
- `tcp:HOST:PORT` connect over TCP (development)
- `fd:N`         an inherited descriptor (a pty master a harness handed over)
- `image:PATH`   approach I: read UPDATE.MP at PATH (a mounted CD-ROM) whenever it changes
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from .core.channel import parse_address
from .core.constants import MAX_ALLOWANCE, MAX_SEND_TIMEOUT, SKEW_ALLOWANCE
from .core.errors import ConfigError

__all__ = ["ConfigError", "KeyChannelSpec", "NodeConfig", "read_toml"]

CHANNEL_KINDS: Final = ("virtio", "tty", "unix", "tcp", "fd", "image")
_SYNTAX_AT: Final = re.compile(r"\s*\(at line (\d+), column (\d+)\)")


def read_toml(path: Path) -> tuple[dict[str, Any], str]:
    """A TOML file (a node's, a TVD file) and its text; ConfigError names the file, and
    the line of a syntax error."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        problem = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(path, None, "", f"cannot read it ({problem})") from None
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        at = _SYNTAX_AT.search(message)
        line = int(at.group(1)) if at else None
        raise ConfigError(path, line, "", f"TOML syntax: {_SYNTAX_AT.sub('', message)}") from None


@dataclass(frozen=True, slots=True)
class KeyChannelSpec:
    kind: str
    target: str  # NAME, PATH, HOST:PORT or N

    @classmethod
    def parse(cls, text: str) -> KeyChannelSpec:
        kind, sep, target = text.partition(":")
        if not sep or kind not in CHANNEL_KINDS or not target:
            raise ValueError(f"must be one of {', '.join(k + ':...' for k in CHANNEL_KINDS)}")
        if kind == "tcp":
            parse_address(target)
        if kind == "fd" and not target.isdigit():
            raise ValueError("fd: takes a descriptor number")
        return cls(kind, target)

    def __str__(self) -> str:
        return f"{self.kind}:{self.target}"


@dataclass(frozen=True, slots=True)
class NodeConfig:
    key_file: Path
    listen: str
    key_channel: KeyChannelSpec = field(
        default_factory=lambda: KeyChannelSpec("virtio", "org.tvdnet.keys.0")
    )
    skew_allowance: float = SKEW_ALLOWANCE
    send_timeout: float = 30.0
    max_unauthenticated: int = 64
    inbox_size: int = 10_000
    control_socket: Path | None = None
    # Where it was read from, for errors found when the node starts (ConfigError).
    source: str = field(default="NodeConfig", compare=False)

    def __post_init__(self) -> None:
        source = self.source
        try:
            parse_address(self.listen, any_port=True)
        except ValueError as exc:
            raise ConfigError(source, None, "listen", str(exc)) from None
        for name, most in (("skew_allowance", MAX_ALLOWANCE), ("send_timeout", MAX_SEND_TIMEOUT)):
            value = getattr(self, name)
            if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
                raise ConfigError(source, None, name, "must be a number >= 0")
            if value > most:
                raise ConfigError(
                    source, None, name, f"{value:g} s is over the {most:g} s this setting allows"
                )
        for name in ("key_file", "control_socket"):
            value = getattr(self, name)
            if value is not None and "\0" in os.fspath(value):
                raise ConfigError(source, None, name, "a path cannot hold a NUL byte")
        if "\0" in self.key_channel.target:
            raise ConfigError(source, None, "key_channel", "cannot hold a NUL byte")
        for name in ("max_unauthenticated", "inbox_size"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ConfigError(source, None, name, "must be an integer >= 1")

    @classmethod
    def load(cls, path: str | Path) -> NodeConfig:
        """Read a node's TOML file; every problem names the file and the key."""
        path = Path(path)
        document, _text = read_toml(path)
        return cls.from_mapping(document, base=path.parent, source=str(path))

    @classmethod
    def from_mapping(
        cls, document: dict[str, Any], *, base: Path = Path("."), source: str = "config"
    ) -> NodeConfig:
        known = set(cls.__dataclass_fields__)
        for key in document:
            if key not in known:
                raise ConfigError(
                    source, None, key, f"unknown key (known: {', '.join(sorted(known))})"
                )
        values: dict[str, Any] = {}
        for key in ("key_file", "listen"):
            if not isinstance(document.get(key), str):
                raise ConfigError(source, None, key, "required, a string")
        values["key_file"] = base / document["key_file"]
        values["listen"] = document["listen"]
        if "key_channel" in document:
            try:
                values["key_channel"] = KeyChannelSpec.parse(str(document["key_channel"]))
            except ValueError as exc:
                raise ConfigError(source, None, "key_channel", str(exc)) from None
            if values["key_channel"].kind in ("tty", "unix", "image"):
                target = base / values["key_channel"].target
                values["key_channel"] = KeyChannelSpec(values["key_channel"].kind, str(target))
        if "control_socket" in document:
            if not isinstance(document["control_socket"], str):
                raise ConfigError(source, None, "control_socket", "must be a path string")
            values["control_socket"] = base / document["control_socket"]
        for key in ("skew_allowance", "send_timeout", "max_unauthenticated", "inbox_size"):
            if key in document:
                values[key] = document[key]
        try:
            return cls(**values, source=source)
        except ConfigError as exc:
            raise ConfigError(source, None, exc.key, exc.problem) from None

"""What the demo, the load test, the benchmarks and the tests need to run a TVD on one
machine: free loopback ports, the commands of this installation, stopping processes, the
number types of their command lines, and `LocalTvd`, the one way they all write a TVD file
and node configurations."""

from __future__ import annotations

import argparse
import math
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tomli_w
import trio

if TYPE_CHECKING:
    from device_bridge import ProvisionResult

__all__ = [
    "LocalMember",
    "LocalTvd",
    "Stopped",
    "console_command",
    "free_port",
    "free_port_block",
    "scratch_dir",
    "seconds",
    "stop_process",
    "stop_processes",
    "whole_number",
]


def whole_number(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number >= `minimum`, or an error that says so."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {minimum} or more, not {value}")
        return value

    return parse


def seconds(*, zero_ok: bool) -> Callable[[str], float]:
    """An argparse type: a finite number of seconds > 0 (>= 0 with `zero_ok`)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
            raise argparse.ArgumentTypeError(
                f"must be a finite number {'>=' if zero_ok else '>'} 0, not {text}"
            )
        return value

    return parse


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def free_port_block(count: int) -> int:
    """A base port such that base..base+count-1 are free on 127.0.0.1 (below the
    ephemeral range, so that outgoing connections never take them)."""
    rng = random.Random()  # noqa: S311 -- picking ports, not keys
    for _ in range(50):
        base = rng.randrange(10000, 30000 - count)
        probes = []
        try:
            for port in range(base, base + count):
                probe = socket.socket()
                probes.append(probe)
                probe.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
    raise RuntimeError(f"no block of {count} free ports on 127.0.0.1")


@contextmanager
def scratch_dir(prefix: str, keep: Path | None) -> Iterator[Path]:
    """A temporary directory for a tool's run, copied to `keep` (if given) and removed
    afterwards, whatever happened. Sockets are not copied: they are of no use later, and
    one a killed process left behind cannot be copied."""
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield directory
    finally:
        try:
            if keep is not None:
                ignore = shutil.ignore_patterns("*.sock")
                shutil.copytree(directory, keep, dirs_exist_ok=True, ignore=ignore)
        finally:
            shutil.rmtree(directory, ignore_errors=True)


def console_command(script: str, module: str) -> list[str]:
    """The installed console script beside this Python, else `python -m module`."""
    installed = Path(sys.executable).parent / script
    return [str(installed)] if installed.exists() else [sys.executable, "-m", module]


# --------------------------------------------------------------------------- stopping


@dataclass(frozen=True, slots=True)
class Stopped:
    """How a process ended: its exit code, and whether SIGTERM was not enough."""

    returncode: int
    killed: bool


async def stop_processes(
    processes: Mapping[str, trio.Process], *, timeout: float = 30.0
) -> dict[str, Stopped]:
    """SIGTERM every process still running, wait up to `timeout` for all of them, then
    SIGKILL what is left; says how each ended."""
    for process in processes.values():
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
    with trio.move_on_after(timeout):
        for process in processes.values():
            await process.wait()
    stopped = {}
    for name, process in processes.items():
        killed = process.returncode is None
        if killed:
            process.kill()
        stopped[name] = Stopped(await process.wait(), killed)
    return stopped


def stop_process(process: subprocess.Popen[Any], *, timeout: float = 30.0) -> Stopped:
    """`stop_processes` for one process started with `subprocess` (code without trio)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return Stopped(process.wait(timeout=timeout), killed=False)
    except subprocess.TimeoutExpired:
        process.kill()
        return Stopped(process.wait(), killed=True)


# --------------------------------------------------------------------------- a local TVD


@dataclass(frozen=True, slots=True)
class LocalMember:
    """One member of a TVD on this machine.

    `channel` is the bridge's end of its key channel as the TVD file says it
    (`unix-listen:PATH`, `pty:PATH`, `unix:PATH`, ...), `key_channel` the node's end as
    its configuration says it (`unix:PATH`, `tty:PATH`, `fd:N`, `virtio:NAME`).
    """

    id: str
    address: str
    channel: str
    key_channel: str
    host: str | None = None  # the host whose bridge serves it (a TVD on several hosts)
    suspended: bool = False  # left the TVD for now (`suspended = true` in the TVD file)


class LocalTvd:
    """A TVD written the one way that tests, benchmarks and tools share: its TVD file
    (`tvd.toml`), its keys (`keys/keystore.json`, `keys/export/VM.keys`) and node
    configurations, all in `directory`.

    `write()` writes the TVD file; `provision()` runs G in this process (what
    `tvdnet-bridge provision --plaintext` does, without starting a second interpreter);
    `node_config(vm)` is the mapping `NodeConfig.from_mapping` takes, and
    `write_node_config(vm)` the same as a TOML file.
    """

    def __init__(
        self,
        directory: Path,
        tvd: str,
        members: Iterable[LocalMember],
        *,
        period_s: float,
        periods: int = 1_000_000,
        epoch: float | None = None,
        pairs: str | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.tvd = tvd
        self.members = {member.id: member for member in members}
        self.period_s = period_s
        self.periods = periods
        self.epoch = epoch
        self.pairs = pairs
        self.tvd_file = self.directory / "tvd.toml"
        self.keystore = self.directory / "keys" / "keystore.json"
        self.export_dir = self.directory / "keys" / "export"

    def __repr__(self) -> str:
        return f"<LocalTvd {self.tvd!r} members={len(self.members)} in {self.directory}>"

    def key_file(self, vm: str) -> Path:
        return self.export_dir / f"{vm}.keys"

    def write(self) -> Path:
        document: dict[str, Any] = {
            "tvd": self.tvd,
            "period_seconds": self.period_s,
            "periods": self.periods,
        }
        if self.epoch is not None:
            document["epoch"] = self.epoch
        if self.pairs is not None:
            document["pairs"] = self.pairs
        document["members"] = [
            {"id": m.id, "address": m.address, "channel": m.channel}
            | ({"host": m.host} if m.host is not None else {})
            | ({"suspended": True} if m.suspended else {})
            for m in self.members.values()
        ]
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Atomically: a bridge may read it at any moment (a reload, a restart).
        partial = self.tvd_file.with_suffix(".toml.partial")
        partial.write_text("# Written by tvdnet_tools.local.LocalTvd.\n" + tomli_w.dumps(document))
        partial.replace(self.tvd_file)
        return self.tvd_file

    def provision(self) -> ProvisionResult:
        from device_bridge import load_config, provision  # the host's side, only here

        return provision(
            load_config(self.tvd_file), self.keystore, self.export_dir, passphrase=None
        )

    def node_config(self, vm: str, **settings: Any) -> dict[str, Any]:
        member = self.members[vm]
        return {
            "key_file": str(self.key_file(vm)),
            "listen": member.address,
            "key_channel": member.key_channel,
            **settings,
        }

    def write_node_config(self, vm: str, **settings: Any) -> Path:
        path = self.directory / f"{vm}.toml"
        path.write_text(tomli_w.dumps(self.node_config(vm, **settings)))
        return path

"""The bridge's control socket: `tvdnet-bridge status` and `tvdnet-bridge reload`.

The protocol and the owner-only socket are tvdnet's (`tvdnet.control`, the same as a
node's): JSON lines, mode 0600, SO_PEERCRED checked, a live bridge's socket never taken
over. The bridge adds a directory of its own (mode 0700, its user's) and its commands:

    -> {"command": "status"}    <- {"ok": true, "status": {...}}
    -> {"command": "reload"}    <- {"ok": true, "reload": {...}} | {"ok": false, "error": "..."}
"""

from __future__ import annotations

import functools
import logging
import os
import stat
from pathlib import Path
from typing import Any

import trio

from tvdnet.control import serve_control as serve_owner_only

from ._daemon import Bridge
from ._log import emit
from .errors import ControlError, TvdnetError

__all__ = ["COMMANDS", "default_control_path", "serve_control"]

COMMANDS = ("status", "reload")


def default_control_path() -> Path:
    """$RUNTIME_DIRECTORY (systemd) or /run/tvdnet-bridge for root, else a per-user directory."""
    runtime = os.environ.get("RUNTIME_DIRECTORY")
    if runtime:
        return Path(runtime.split(":")[0]) / "control.sock"
    if os.getuid() == 0:
        return Path("/run/tvdnet-bridge/control.sock")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(xdg) if xdg else Path("/tmp")  # noqa: S108 (a 0700 directory of our own)
    return base / f"tvdnet-bridge-{os.getuid()}" / "control.sock"


def _private_directory(directory: Path) -> None:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = os.stat(directory)
    if info.st_uid != os.getuid():
        raise ControlError(f"{directory} belongs to another user")
    if info.st_mode & 0o022:
        raise ControlError(
            f"{directory} may be written by others (mode {stat.S_IMODE(info.st_mode):04o}); "
            "the control socket needs a directory of its own (mode 0700)"
        )


async def serve_control(
    bridge: Bridge, path: Path, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Answer status and reload requests on `path` until cancelled; removes the socket after."""
    _private_directory(path.parent)
    emit(logging.INFO, "control-listening", path=path)
    await serve_owner_only(path, functools.partial(_handle, bridge), task_status=task_status)


async def _handle(bridge: Bridge, request: dict[str, Any]) -> dict[str, Any]:
    command = request["command"]
    if command == "status":
        return {"ok": True, "status": bridge.status().to_json()}
    if command == "reload":
        try:
            result = await bridge.reload()
        except TvdnetError as exc:
            emit(logging.ERROR, "reload-failed", why=str(exc))
            raise
        return {"ok": True, "reload": result.to_json()}
    raise ValueError(f"unknown command {command!r} (known: {', '.join(COMMANDS)})")

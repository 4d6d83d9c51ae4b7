"""The bridge's control socket: `tvdnet-bridge status` and `tvdnet-bridge reload`.

The protocol and the owner-only socket are tvdnet's (`tvdnet.control`, the same as a
node's): JSON lines, mode 0600, SO_PEERCRED checked, a live bridge's socket never taken
over. The bridge adds a directory of its own (mode 0700, its user's) and its commands:

    -> {"command": "status"}    <- {"ok": true, "status": {...}}
    -> {"command": "reload"}    <- {"ok": true, "reload": {...}} | {"ok": false, "error": "..."}
    -> {"command": "move-out", "vm": X, "to": HOST, "bundle": "/abs/path"}
                                <- {"ok": true, "move": {...}}   (the bundle written, mode 0600)
    -> {"command": "move-in", "bundle": "/abs/path"}
                                <- {"ok": true, "move": {...}}

The bridge reads and writes bundle files itself (the socket is its owner's only), so that
no key crosses the control socket.
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
from tvdnet.keyfile import KeyFileError, check_private, write_private

from ._daemon import Bridge
from ._log import emit
from ._moves import MAX_BUNDLE_BYTES
from .errors import ControlError, MoveError, TvdnetError

__all__ = ["COMMANDS", "default_control_path", "serve_control"]

COMMANDS = ("status", "reload", "move-out", "move-in")


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
    if command in ("move-out", "move-in"):
        try:
            path = _bundle_path(request)
            if command == "move-out":
                vm, target = request.get("vm"), request.get("to")
                if not isinstance(vm, str) or not isinstance(target, str):
                    raise MoveError("move-out needs the VM and the host it goes to")

                async def write(bundle: bytes) -> None:
                    await trio.to_thread.run_sync(_write_bundle, path, bundle)

                move = await bridge.move_out(vm, target, write)
            else:
                data = await trio.to_thread.run_sync(_read_bundle, path)
                try:
                    move = await bridge.move_in(data)
                except MoveError as exc:
                    raise MoveError(f"{path}: {exc}") from None
        except TvdnetError as exc:
            emit(logging.ERROR, f"{command}-failed", why=str(exc))
            raise
        return {"ok": True, "move": move.to_json()}
    raise ValueError(f"unknown command {command!r} (known: {', '.join(COMMANDS)})")


def _bundle_path(request: dict[str, Any]) -> Path:
    path = request.get("bundle")
    if not isinstance(path, str) or not Path(path).is_absolute():
        raise MoveError("the bundle's path must be absolute")
    return Path(path)


def _write_bundle(path: Path, bundle: bytes) -> None:
    try:
        write_private(path, bundle, overwrite=False)
    except FileExistsError:
        raise MoveError(f"{path} exists: a bundle is never written over another") from None
    except OSError as exc:
        raise MoveError(f"cannot write {path}: {exc.strerror or exc}") from None


def _read_bundle(path: Path) -> bytes:
    """A bundle file: private to its owner (it carries device keys, encrypted)."""
    try:
        check_private(path)
        if path.stat().st_size > MAX_BUNDLE_BYTES:
            raise MoveError(f"{path}: over {MAX_BUNDLE_BYTES} bytes, not a move bundle")
        return path.read_bytes()
    except KeyFileError as exc:
        raise MoveError(str(exc)) from None
    except OSError as exc:
        raise MoveError(f"cannot read {path}: {exc.strerror or exc}") from None

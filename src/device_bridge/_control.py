"""The control socket: `tvdnet-bridge status` and `tvdnet-bridge reload` talk to a running bridge.

A Unix socket, owner-only three ways: its directory belongs to the bridge's user and no one
else may write it, the socket is created mode 0600, and each client's SO_PEERCRED uid must
be the bridge's (or root's). One request per connection, one JSON line each way:

    -> {"command": "status"}    <- {"ok": true, "status": {...}}
    -> {"command": "reload"}    <- {"ok": true, "reload": {...}} | {"ok": false, "error": "..."}
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import stat
import struct
from pathlib import Path
from typing import Any

import trio

from tvdnet._constants import BRIDGE_CONTROL_REQUEST_LIMIT, BRIDGE_CONTROL_TIMEOUT

from ._daemon import Bridge
from ._errors import BridgeError, ControlError
from ._log import emit
from ._transports import bind_unix_private

__all__ = ["control_request", "default_control_path", "serve_control"]

COMMANDS = ("status", "reload")
_REPLY_PIECE = 1 << 14  # a reply is written this much at a time, each within the timeout


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


def _peer_uid(sock: trio.socket.SocketType) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


async def _bind(path: Path) -> trio.socket.SocketType:
    _private_directory(path.parent)
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise ControlError(f"{path} exists and is not a socket")
        try:
            probe = await trio.open_unix_socket(os.fspath(path))
        except OSError:
            path.unlink()  # left by a bridge that is gone
        else:
            await probe.aclose()
            raise ControlError(f"another bridge answers on {path}")
    return bind_unix_private(path, 8)


async def serve_control(
    bridge: Bridge, path: Path, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Answer status and reload requests on `path` until cancelled; removes the socket after."""
    sock = await _bind(path)
    listener = trio.SocketListener(sock)
    emit(logging.INFO, "control-listening", path=path)
    try:
        task_status.started()
        async with trio.open_nursery() as nursery:
            while True:
                stream = await listener.accept()
                nursery.start_soon(_answer, bridge, stream)
    finally:
        with trio.CancelScope(shield=True):
            await listener.aclose()
        with contextlib.suppress(OSError):
            path.unlink()


async def _answer(bridge: Bridge, stream: trio.SocketStream) -> None:
    async with stream:
        uid = _peer_uid(stream.socket)
        if uid not in (os.getuid(), 0):
            emit(logging.WARNING, "control-refused", uid=uid)
            return
        request = bytearray()
        with trio.move_on_after(BRIDGE_CONTROL_TIMEOUT):
            while b"\n" not in request and len(request) <= BRIDGE_CONTROL_REQUEST_LIMIT:
                data = await stream.receive_some(BRIDGE_CONTROL_REQUEST_LIMIT)
                if not data:
                    break
                request += data
        reply = await _handle(bridge, bytes(request).partition(b"\n")[0])
        answer = memoryview(json.dumps(reply).encode() + b"\n")
        # The status of a thousand VMs is hundreds of KiB: a client that stops reading for
        # BRIDGE_CONTROL_TIMEOUT is dropped, but one that reads from a busy bridge is not.
        with contextlib.suppress(trio.BrokenResourceError):
            for offset in range(0, len(answer), _REPLY_PIECE):
                with trio.move_on_after(BRIDGE_CONTROL_TIMEOUT) as scope:
                    await stream.send_all(answer[offset : offset + _REPLY_PIECE])
                if scope.cancelled_caught:
                    break


async def _handle(bridge: Bridge, line: bytes) -> dict[str, Any]:
    try:
        request = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {"ok": False, "error": "a request is one JSON object on one line"}
    command = request.get("command") if isinstance(request, dict) else None
    if command == "status":
        return {"ok": True, "status": bridge.status().to_json()}
    if command == "reload":
        try:
            result = await bridge.reload()
        except BridgeError as exc:
            emit(logging.ERROR, "reload-failed", why=str(exc))
            return {"ok": False, "error": str(exc)}
        return {"ok": True, "reload": result.to_json()}
    return {"ok": False, "error": f"unknown command (known: {', '.join(COMMANDS)})"}


def control_request(path: Path, command: str, *, timeout: float = 30.0) -> dict[str, Any]:
    """Ask the bridge listening on `path`; ControlError when none answers."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(os.fspath(path))
        except OSError as exc:
            raise ControlError(
                f"no bridge answers on {path} ({exc.strerror or exc}); is it running, and is "
                "this its --control path?"
            ) from None
        reply = bytearray()
        try:
            sock.sendall(json.dumps({"command": command}).encode() + b"\n")
            while b"\n" not in reply:
                data = sock.recv(1 << 16)
                if not data:
                    break
                reply += data
        except TimeoutError:
            raise ControlError(
                f"{path}: no answer within {timeout:g} s (got {len(reply)} bytes); is the "
                "bridge overloaded?"
            ) from None
        except OSError:
            reply.clear()
    if not reply:
        raise ControlError(
            f"{path} closed the connection without an answer (only the bridge's user may ask)"
        )
    if b"\n" not in reply:
        raise ControlError(
            f"{path}: the answer was cut short after {len(reply)} bytes (the bridge gives up "
            f"writing to a client that reads nothing for {BRIDGE_CONTROL_TIMEOUT:g} s; is it "
            "overloaded?)"
        )
    try:
        answer = json.loads(bytes(reply).partition(b"\n")[0])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ControlError(f"{path} answered something that is not JSON") from None
    if not isinstance(answer, dict):
        raise ControlError(f"{path} answered something that is not a JSON object")
    return answer

"""A node's local control socket: JSON lines over an owner-only Unix socket.

Requests, one per line; each gets one reply line:

    {"cmd": "status"}                               -> {"ok": true, "status": {...}}
    {"cmd": "send", "peer": "vm-b", "body": ...}    -> {"ok": true}  once vm-b acknowledged
    {"cmd": "broadcast", "body": ...}               -> {"ok": true}  once every peer did
    anything else                                   -> {"ok": false, "error": "...", "type": "..."}

`send` and `broadcast` take an optional "timeout" in seconds. Operators use it through
`tvdnet status` and `tvdnet send`; the demo and the process tests drive nodes with it.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from typing import TYPE_CHECKING, Any, Final

import trio

from ._errors import TvdnetError

if TYPE_CHECKING:
    from ._node import Node

__all__ = ["control_request", "serve_control"]

_LINE_LIMIT: Final = 1 << 20
_REPLY_TIMEOUT: Final = 5.0


async def bind_private_unix(path: os.PathLike[str] | str) -> trio.SocketListener:
    """A listening Unix socket that only its owner may connect to (mode 0600)."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)  # a stale socket from an earlier run
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # owner-only from the moment it exists
    try:
        await sock.bind(os.fspath(path))
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(16)
    return trio.SocketListener(sock)


async def _read_line(stream: trio.abc.ReceiveStream, buffer: bytearray) -> bytes | None:
    while b"\n" not in buffer:
        if len(buffer) > _LINE_LIMIT:
            raise ValueError(f"a request over {_LINE_LIMIT} bytes")
        data = await stream.receive_some(65536)
        if not data:
            return None
        buffer += data
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return line


async def serve_control(
    node: Node,
    path: os.PathLike[str] | str,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    listener = await bind_private_unix(path)
    task_status.started()
    async with listener, trio.open_nursery() as nursery:
        while True:
            stream = await listener.accept()
            nursery.start_soon(_serve_one, node, stream)


async def _serve_one(node: Node, stream: trio.abc.Stream) -> None:
    buffer = bytearray()
    async with stream:
        while True:
            try:
                line = await _read_line(stream, buffer)
            except (ValueError, trio.BrokenResourceError):
                return
            if line is None:
                return
            reply = await _handle(node, line)
            try:
                with trio.move_on_after(_REPLY_TIMEOUT):
                    await stream.send_all(json.dumps(reply).encode() + b"\n")
            except trio.BrokenResourceError:
                return


async def _handle(node: Node, line: bytes) -> dict[str, Any]:
    try:
        request = json.loads(line)
        if not isinstance(request, dict):
            raise ValueError("a request is a JSON object")
        command = request.get("cmd")
        timeout = request.get("timeout")
        if timeout is not None and not isinstance(timeout, int | float):
            raise ValueError('"timeout" must be a number of seconds')
        if command == "status":
            return {"ok": True, "status": node.status()}
        if command == "send":
            if not isinstance(request.get("peer"), str):
                raise ValueError('"send" needs "peer"')
            await node.send(request["peer"], request.get("body"), timeout=timeout)
            return {"ok": True}
        if command == "broadcast":
            await node.broadcast(request.get("body"), timeout=timeout)
            return {"ok": True}
        raise ValueError(f"unknown command {command!r} (status, send, broadcast)")
    except (ValueError, TvdnetError) as exc:
        return {"ok": False, "error": str(exc), "type": type(exc).__name__}


async def control_request(path: os.PathLike[str] | str, request: dict[str, Any]) -> dict[str, Any]:
    """Send one request to a node's control socket and return its reply."""
    stream = await trio.open_unix_socket(os.fspath(path))
    async with stream:
        await stream.send_all(json.dumps(request).encode() + b"\n")
        line = await _read_line(stream, bytearray())
    if line is None:
        raise ConnectionError(f"{path}: the node closed the control socket without a reply")
    reply: dict[str, Any] = json.loads(line)
    return reply

"""The control socket of a node and of a bridge: one protocol, one owner-only Unix socket.

JSON lines over a Unix socket that only its owner (and root) may use. A client sends one
request per line and gets one reply line for each, in order; a connection may carry
several requests:

    -> {"command": "status"}                  <- {"ok": true, "status": {...}}
    -> {"command": NAME, ...arguments}        <- {"ok": true, ...}
                                              <- {"ok": false, "error": "...", "type": "..."}

A node answers `status`, `send` and `broadcast` (`tvdnet status`, `tvdnet send`); a
bridge answers `status` and `reload` (`tvdnet-bridge status`, `tvdnet-bridge reload`).

Owner-only three ways: the socket is created mode 0600 (set on the socket before it is
bound, so it never exists with a looser mode and the process umask is never touched),
each client's SO_PEERCRED uid must be the server's or root's, and a socket path that
another live server answers on is refused, never taken over.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

import trio

from .core.errors import ControlError, TvdnetError

__all__ = [
    "REQUEST_LIMIT",
    "Handler",
    "answers",
    "bind_owner_only",
    "control_request",
    "open_owner_only_listener",
    "serve_control",
]

logger = logging.getLogger("tvdnet.control")

REQUEST_LIMIT: Final = 4 << 20  # one request line, bytes (a node's `send` carries a body)
IO_TIMEOUT: Final = 5.0  # a client has this long to send a request, and to take each piece
_REPLY_PIECE: Final = 1 << 14  # a reply is written this much at a time, each within IO_TIMEOUT
_UNIX_PATH_MAX: Final = 107  # sun_path holds 108 bytes with the terminating NUL

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
"""Answers one request (a JSON object with a "command"); raises TvdnetError or ValueError
for a request it refuses, which the client receives as {"ok": false, ...}."""


def _check_path(path: Path) -> None:
    text = os.fspath(path)
    if "\0" in text:
        raise ControlError(f"{text!r}: a socket path cannot hold a NUL byte")
    if len(text.encode()) > _UNIX_PATH_MAX:
        raise ControlError(
            f"{path}: {len(text.encode())} bytes is too long for a Unix socket path "
            f"(at most {_UNIX_PATH_MAX})"
        )


def bind_owner_only(path: os.PathLike[str] | str, backlog: int = 16) -> trio.SocketListener:
    """A listening Unix socket at `path` that only its owner may connect to (mode 0600).

    The mode is set on the socket before `bind` creates the file, so no other local user
    can connect in between and the process-wide umask is left alone. The caller has made
    sure that nothing else lives at `path` (see `open_owner_only_listener`).
    """
    path = Path(path)
    _check_path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.fchmod(sock.fileno(), 0o600)
        sock.bind(os.fspath(path))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))


async def open_owner_only_listener(
    path: os.PathLike[str] | str, backlog: int = 16
) -> trio.SocketListener:
    """`bind_owner_only` at `path`, after clearing the way: a socket left by a server
    that is gone is replaced; one that a live server answers on, or anything that is
    not a socket, is refused with a ControlError that says so."""
    path = Path(path)
    _check_path(path)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ControlError(f"{path}: cannot look at it ({exc.strerror or exc})") from None
    else:
        if not stat.S_ISSOCK(info.st_mode):
            raise ControlError(f"{path} exists and is not a socket; it is not ours to replace")
        if await answers(path):
            raise ControlError(f"another process answers on {path}; is it already running?")
        path.unlink(missing_ok=True)  # left by a server that is gone
    try:
        return bind_owner_only(path, backlog)
    except OSError as exc:
        raise ControlError(f"{path}: cannot listen there ({exc.strerror or exc})") from None


async def serve_control(
    path: os.PathLike[str] | str,
    handle: Handler,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer requests on `path` with `handle` until cancelled; removes the socket after."""
    path = Path(path)
    listener = await open_owner_only_listener(path)
    ours = os.stat(path).st_ino
    try:
        task_status.started()
        async with trio.open_nursery() as nursery:
            while True:
                stream = await listener.accept()
                nursery.start_soon(_serve_client, stream, handle)
    finally:
        with trio.CancelScope(shield=True):
            await listener.aclose()
        with contextlib.suppress(OSError):
            if os.lstat(path).st_ino == ours:
                path.unlink()  # never another server's socket that replaced ours


async def _serve_client(stream: trio.SocketStream, handle: Handler) -> None:
    async with stream:
        uid = _peer_uid(stream.socket)
        if uid not in (os.getuid(), 0):
            logger.warning("event=control-refused uid=%d", uid)
            return
        buffer = bytearray()
        while True:
            line = await _read_request(stream, buffer)
            if line is None:
                return
            if isinstance(line, dict):  # the request was refused before it was read whole
                await _write_reply(stream, line)
                await _discard_rest(stream)
                return
            reply = await _answer(line, handle)
            if not await _write_reply(stream, reply):
                return


async def _discard_rest(stream: trio.SocketStream) -> None:
    """After refusing a request that is still arriving: say no more, and read (and drop)
    what the client still sends, for IO_TIMEOUT at most, so that it finishes sending and
    reads the refusal (closing with unread bytes would reset the connection and lose it)."""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        await stream.send_eof()
        with trio.move_on_after(IO_TIMEOUT):
            while await stream.receive_some(1 << 16):
                pass


async def _read_request(
    stream: trio.SocketStream, buffer: bytearray
) -> bytes | dict[str, Any] | None:
    """The next request line; None at EOF or after IO_TIMEOUT of silence; a refusal to
    send back for a request over REQUEST_LIMIT."""
    while (end := buffer.find(b"\n")) < 0:
        if len(buffer) > REQUEST_LIMIT:
            return _refusal(f"a request over {REQUEST_LIMIT} bytes", "ValueError")
        data = b""
        # A silent client is hung up on; a broken one is gone.
        with trio.move_on_after(IO_TIMEOUT), contextlib.suppress(trio.BrokenResourceError):
            data = await stream.receive_some(1 << 16)
        if not data:
            return None
        buffer += data
    line = bytes(buffer[:end])
    del buffer[: end + 1]
    return line


def _refusal(error: str, kind: str) -> dict[str, Any]:
    return {"ok": False, "error": error, "type": kind}


async def _answer(line: bytes, handle: Handler) -> dict[str, Any]:
    try:
        request = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return _refusal("a request is one JSON object on one line", "ValueError")
    if not isinstance(request, dict) or not isinstance(request.get("command"), str):
        return _refusal('a request is a JSON object with a "command" string', "ValueError")
    try:
        return await handle(request)
    except (TvdnetError, ValueError) as exc:
        return _refusal(str(exc), type(exc).__name__)


async def _write_reply(stream: trio.SocketStream, reply: dict[str, Any]) -> bool:
    """Write one reply line; False if the client went away or stopped reading.

    A large reply (the status of a thousand VMs is hundreds of KiB) goes out in pieces,
    each within IO_TIMEOUT: a client that reads slowly gets it all, one that stops
    reading is dropped.
    """
    answer = memoryview(json.dumps(reply).encode() + b"\n")
    try:
        for offset in range(0, len(answer), _REPLY_PIECE):
            with trio.move_on_after(IO_TIMEOUT) as scope:
                await stream.send_all(answer[offset : offset + _REPLY_PIECE])
            if scope.cancelled_caught:
                return False
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return False
    return True


async def control_request(
    path: os.PathLike[str] | str, request: dict[str, Any], *, timeout: float = 60.0
) -> dict[str, Any]:
    """Send one request to the control socket at `path` and return its reply.

    ControlError says what went wrong: nothing answers there, no answer came within
    `timeout`, the answer was cut short, or it is not a JSON object.
    """
    path = Path(path)
    line = json.dumps(request).encode() + b"\n"
    if len(line) > REQUEST_LIMIT:
        raise ControlError(
            f"{path}: the request is {len(line)} bytes, over the {REQUEST_LIMIT}-byte limit "
            "of a control request"
        )
    try:
        stream = await trio.open_unix_socket(os.fspath(path))
    except OSError as exc:
        raise ControlError(
            f"nothing answers on {path} ({exc.strerror or exc}); is it running, and is "
            "this its control socket?"
        ) from None
    reply = bytearray()
    async with stream:
        with trio.move_on_after(timeout) as scope:
            try:
                await stream.send_all(line)
                while b"\n" not in reply:
                    data = await stream.receive_some(1 << 16)
                    if not data:
                        break
                    reply += data
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
    if scope.cancelled_caught:
        raise ControlError(
            f"{path}: no answer within {timeout:g} s (got {len(reply)} bytes); is it overloaded?"
        )
    if not reply:
        raise ControlError(
            f"{path} closed the connection without an answer (only its owner and root may ask)"
        )
    if b"\n" not in reply:
        raise ControlError(
            f"{path}: the answer was cut short after {len(reply)} bytes (a server gives up "
            f"writing to a client that reads nothing for {IO_TIMEOUT:g} s; is it "
            "overloaded?)"
        )
    try:
        answer = json.loads(bytes(reply).partition(b"\n")[0])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ControlError(f"{path} answered something that is not JSON") from None
    if not isinstance(answer, dict):
        raise ControlError(f"{path} answered something that is not a JSON object")
    return answer


async def answers(path: os.PathLike[str] | str) -> bool:
    """Whether a live server accepts connections on the Unix socket at `path`."""
    try:
        probe = await trio.open_unix_socket(os.fspath(path))
    except OSError:
        return False
    await probe.aclose()
    return True


def _peer_uid(sock: trio.socket.SocketType) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)

"""Reading and writing trio streams in fewer task steps, for the node and the bridge.

`trio.SocketStream.receive_some` and `FdStream.receive_some` take two task steps for
every read that finds data: the read, then a checkpoint before returning it (and, back in
the loop, a read that fails with EAGAIN before waiting). A node's or bridge's reader reads
one small frame per wake-up nearly always, so that doubles its scheduling cost.
`receive_some` here waits until the descriptor is readable and then reads: one task step
per read, and still a checkpoint on every call, so one busy stream never starves the
others and cancellation arrives as usual.

A stream without a descriptor (a memory stream in a test, a TLS stream) is read through
its own `receive_some`.

`write_now` is the other half: a write from the task that made the bytes, without a task
step, that the socket nearly always takes whole; a writer task sends what it leaves.
"""

from __future__ import annotations

import os

import trio

__all__ = ["fileno_of", "receive_some", "write_now"]


def fileno_of(stream: trio.abc.Stream) -> int | None:
    """The descriptor under a socket or fd stream, or None."""
    if isinstance(stream, trio.SocketStream):
        return stream.socket.fileno()
    if isinstance(stream, trio.lowlevel.FdStream):
        return stream.fileno()
    return None


async def receive_some(
    stream: trio.abc.Stream, fd: int | None, max_bytes: int
) -> bytes | bytearray:
    """Up to `max_bytes` from `stream` (whose descriptor is `fd`, if any): b"" at end of
    stream. Errors are the operating system's (`OSError`) or trio's
    (`ClosedResourceError` when another task closed the stream)."""
    if fd is None:
        return await stream.receive_some(max_bytes)
    while True:
        await trio.lowlevel.wait_readable(fd)
        try:
            return os.read(fd, max_bytes)
        except BlockingIOError:  # another reader of the same file took it (a shared pty)
            continue


def write_now(fd: int | None, data: bytes | bytearray) -> int:
    """Write what the descriptor takes of `data` without waiting; how many bytes it took.
    0 without a descriptor or on any error (EAGAIN, or broken: the writer task's
    `send_all` of the rest tells which)."""
    if fd is None:
        return 0
    try:
        return os.write(fd, data)
    except OSError:
        return 0

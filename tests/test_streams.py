"""tvdnet.streams: one task step per read that finds data, the same bytes as the stream's
own receive_some, and end of stream as b""."""

from __future__ import annotations

import os
import socket

import trio
import trio.testing

from tvdnet.streams import fileno_of, receive_some


async def test_a_socket_stream_is_read_through_its_descriptor() -> None:
    a, b = socket.socketpair()
    left, right = (
        trio.SocketStream(trio.socket.from_stdlib_socket(a)),
        trio.SocketStream(trio.socket.from_stdlib_socket(b)),
    )
    fd = fileno_of(right)
    assert fd == b.fileno()
    async with left, right:
        await left.send_all(b"hello")
        assert await receive_some(right, fd, 3) == b"hel"
        assert await receive_some(right, fd, 100) == b"lo"
        await left.send_eof()
        assert await receive_some(right, fd, 100) == b""


async def test_a_read_that_finds_data_takes_one_task_step() -> None:
    a, b = socket.socketpair()
    a.send(b"ready")
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(b))
    steps = 0

    class Count(trio.abc.Instrument):
        def before_task_step(self, task: trio.lowlevel.Task) -> None:
            nonlocal steps
            if task is me:
                steps += 1

    me = trio.lowlevel.current_task()
    trio.lowlevel.add_instrument(counter := Count())
    try:
        await trio.lowlevel.checkpoint()  # count from a fresh step
        steps = 0
        assert await receive_some(stream, fileno_of(stream), 100) == b"ready"
        await trio.lowlevel.checkpoint()
    finally:
        trio.lowlevel.remove_instrument(counter)
    assert steps == 2  # the wake-up that reads, then the checkpoint after it
    a.close()
    await stream.aclose()


async def test_an_fd_stream_and_a_stream_without_a_descriptor() -> None:
    r, w = os.pipe()
    os.set_blocking(r, False)
    stream = trio.lowlevel.FdStream(r)
    assert fileno_of(stream) == r
    os.write(w, b"pipe")
    assert await receive_some(stream, fileno_of(stream), 100) == b"pipe"
    os.close(w)
    assert await receive_some(stream, fileno_of(stream), 100) == b""
    await stream.aclose()
    left, right = trio.testing.memory_stream_pair()
    assert fileno_of(right) is None
    await left.send_all(b"memory")
    assert await receive_some(right, None, 100) == b"memory"


async def test_an_empty_descriptor_waits_and_never_reads_as_end_of_stream() -> None:
    """Bytes another reader of the descriptor took leave nothing: the read waits for the
    next bytes instead of returning b"" (which would mean end of stream)."""
    r, w = os.pipe()
    os.set_blocking(r, False)
    stream = trio.lowlevel.FdStream(r)
    got: list[bytes | bytearray] = []

    async def reader() -> None:
        got.append(await receive_some(stream, r, 100))

    async with trio.open_nursery() as nursery:
        os.write(w, b"x")
        os.read(r, 1)  # another reader took it
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        os.write(w, b"y")
    assert got == [b"y"]
    os.close(w)
    await stream.aclose()

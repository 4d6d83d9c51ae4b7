"""Key-channel stand-ins: a pty through pyserial must carry binary msgpack intact."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from tvdnet.ports import find_virtio_port, open_char_device, open_serial

BINARY = bytes(range(256)) * 8  # CR, LF, ^C, ^D, ^S, DEL...: what a cooked tty would eat


async def _read_exactly(stream: trio.abc.ReceiveStream, size: int) -> bytes:
    got = bytearray()
    with trio.fail_after(5):
        while len(got) < size:
            got += await stream.receive_some(size - len(got))
    return bytes(got)


async def test_a_pty_opened_through_pyserial_is_raw_both_ways() -> None:
    master, slave = os.openpty()
    try:
        guest = open_serial(os.ttyname(slave))
        host = trio.lowlevel.FdStream(os.dup(master))
        async with guest, host:
            await host.send_all(BINARY)
            assert await _read_exactly(guest, len(BINARY)) == BINARY
            await guest.send_all(BINARY)
            assert await _read_exactly(host, len(BINARY)) == BINARY
    finally:
        os.close(master)
        os.close(slave)


async def test_a_pty_whose_other_end_closed_reports_a_broken_stream() -> None:
    master, slave = os.openpty()
    host = trio.lowlevel.FdStream(master)
    guest = open_serial(os.ttyname(slave))
    os.close(slave)
    await guest.aclose()
    with pytest.raises(trio.BrokenResourceError), trio.fail_after(5):
        await host.receive_some(10)  # EIO on the master: "host gone", not "no data"
    await host.aclose()


async def test_a_character_device_opens_raw(tmp_path: Path) -> None:
    fifo = tmp_path / "port"
    os.mkfifo(fifo)
    stream = open_char_device(fifo)
    async with stream:
        await stream.send_all(b"\x00\x01\r\n")
        assert await _read_exactly(stream, 4) == b"\x00\x01\r\n"


def test_find_virtio_port_without_udev(tmp_path: Path) -> None:
    sys_dir = tmp_path / "sys"
    for port, name in (("vport0p1", "org.qemu.guest_agent.0"), ("vport0p2", "org.tvdnet.keys.0")):
        (sys_dir / port).mkdir(parents=True)
        (sys_dir / port / "name").write_text(name + "\n")
    dev = tmp_path / "dev"
    dev.mkdir()
    assert find_virtio_port("org.tvdnet.keys.0", dev=dev, sys_dir=sys_dir) == dev / "vport0p2"
    (dev / "virtio-ports").mkdir()
    (dev / "virtio-ports" / "org.tvdnet.keys.0").touch()
    assert find_virtio_port("org.tvdnet.keys.0", dev=dev, sys_dir=sys_dir) == (
        dev / "virtio-ports" / "org.tvdnet.keys.0"
    )
    with pytest.raises(FileNotFoundError, match="no virtio-serial port named 'nope'"):
        find_virtio_port("nope", dev=dev, sys_dir=sys_dir)


async def test_a_pty_with_nothing_to_read_is_not_end_of_file() -> None:
    master, slave = os.openpty()
    try:
        guest = open_serial(os.ttyname(slave))
        host = trio.lowlevel.FdStream(os.dup(master))
        async with guest, host:
            # Nothing is there yet: the read must wait, not return b"" (which means EOF).
            with trio.move_on_after(0.2) as waited:
                data = await guest.receive_some(10)
                raise AssertionError(f"receive_some returned {data!r} with nothing sent")
            assert waited.cancelled_caught
            await host.send_all(b"late")
            assert await _read_exactly(guest, 4) == b"late"
    finally:
        os.close(master)
        os.close(slave)

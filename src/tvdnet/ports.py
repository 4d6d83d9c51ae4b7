"""Opening the byte streams that stand in for a key channel, for trio.

- a tty or pty through pyserial, which puts it in raw mode (a pty starts in canonical
  mode with echo and CR/LF translation, which would corrupt msgpack);
- a character device that is not a tty, such as a virtio-serial port in a guest, as a
  raw non-blocking descriptor (termios calls on it fail, so not through pyserial).

Both come back as `trio.lowlevel.FdStream`, which waits for readiness instead of
blocking the event loop. Reads that fail with EIO (the other end of a pty went away)
surface as `trio.BrokenResourceError`.
"""

from __future__ import annotations

import os
import termios
from pathlib import Path

import serial
import trio

__all__ = ["VIRTIO_PORTS", "find_virtio_port", "open_char_device", "open_serial"]

VIRTIO_PORTS = Path("/dev/virtio-ports")
_SYS_VIRTIO_PORTS = Path("/sys/class/virtio-ports")


def open_serial(path: str | os.PathLike[str]) -> trio.lowlevel.FdStream:
    """A tty, pty slave or serial device in raw mode, as a trio stream."""
    port = serial.Serial(os.fspath(path), timeout=0, exclusive=False)
    try:
        # pyserial leaves VMIN = VTIME = 0, under which a read with nothing to read returns
        # 0 bytes, which FdStream takes for end of file. VMIN = 1 makes it EAGAIN instead,
        # so trio waits for data.
        attrs = termios.tcgetattr(port.fileno())
        attrs[6][termios.VMIN] = 1
        attrs[6][termios.VTIME] = 0
        termios.tcsetattr(port.fileno(), termios.TCSANOW, attrs)
        # FdStream owns its descriptor; closing `port` afterwards keeps raw mode.
        return trio.lowlevel.FdStream(os.dup(port.fileno()))
    finally:
        port.close()


def open_char_device(path: str | os.PathLike[str]) -> trio.lowlevel.FdStream:
    """A character device such as /dev/vport0p1, opened raw and non-blocking."""
    return trio.lowlevel.FdStream(
        os.open(os.fspath(path), os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
    )


def find_virtio_port(
    name: str, *, dev: Path = Path("/dev"), sys_dir: Path = _SYS_VIRTIO_PORTS
) -> Path:
    """The device of the virtio-serial port called `name`.

    udev makes /dev/virtio-ports/NAME; without udev (a busybox guest) the name is in
    /sys/class/virtio-ports/vportNpM/name and the device is /dev/vportNpM.
    """
    link = dev / "virtio-ports" / name
    if link.exists():
        return link
    if sys_dir.is_dir():
        for entry in sorted(sys_dir.iterdir()):
            try:
                if (entry / "name").read_text().strip() == name:
                    return dev / entry.name
            except OSError:
                continue
    raise FileNotFoundError(
        f"no virtio-serial port named {name!r} (looked in {link.parent} and {sys_dir})"
    )

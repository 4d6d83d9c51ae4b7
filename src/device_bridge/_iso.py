"""Approach I of the paper (SPEC §5): the update as `UPDATE.MP` on a virtual CD-ROM.

- `build_update_image(update)`: an ISO 9660 image (pycdlib, interchange level 1) holding
  the encoded `update` message as the file UPDATE.MP.
- `write_update_image(directory, name, update)`: that image written on tmpfs only (SPEC §1:
  never on persistent disk), to a temporary name and renamed into place. The caller
  deletes it once QEMU has opened it (after the swap).
- `read_update_from_iso(image)`: the guest's view, without mounting: the bytes of UPDATE.MP,
  for `tvdnet`'s `KeyAgent.apply_image(data, now)` (and for benchmarks that read back).
- `open_qmp(path)`: a small trio client of QEMU's monitor, enough for
  `blockdev-change-medium` (the medium swap).
"""

from __future__ import annotations

import io
import itertools
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

import pycdlib
import trio
from pycdlib.pycdlibexception import PyCdlibException

from tvdnet.core.constants import CHANNEL_LIMIT
from tvdnet.keyfile import write_private

from .errors import IsoError, QmpError

__all__ = [
    "DEFAULT_ISO_DIR",
    "QmpClient",
    "build_update_image",
    "check_tmpfs",
    "open_qmp",
    "read_update_from_iso",
    "write_update_image",
]

DEFAULT_ISO_DIR: Final = Path("/dev/shm/tvdnet")  # noqa: S108 (tmpfs on purpose, mode 0700)
ISO_PATH: Final = "/UPDATE.MP;1"
_MOUNTINFO: Final = Path("/proc/self/mountinfo")
_IMAGE_LIMIT: Final = 4 * CHANNEL_LIMIT
QMP_TIMEOUT: Final = 5.0
_QMP_LINE_LIMIT: Final = 1 << 20


def build_update_image(update: bytes) -> bytes:
    """An ISO 9660 image whose only file, UPDATE.MP, holds `update`."""
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=1)
    iso.add_fp(io.BytesIO(update), len(update), ISO_PATH)
    out = io.BytesIO()
    iso.write_fp(out)
    iso.close()
    return out.getvalue()


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    return field.encode().decode("unicode_escape") if "\\" in field else field


def filesystem_type(path: Path, mountinfo: Path = _MOUNTINFO) -> str:
    """The type of the filesystem that holds `path` (its nearest existing ancestor)."""
    target = Path(os.path.realpath(path))
    best, fstype = "", "unknown"
    for line in mountinfo.read_text().splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        mount_point = _unescape(fields[4])
        kind = line.split(" - ", 1)[1].split()[0]
        inside = target == Path(mount_point) or Path(mount_point) in target.parents
        if inside and len(mount_point) >= len(best):
            best, fstype = mount_point, kind
    return fstype


def check_tmpfs(directory: Path, mountinfo: Path = _MOUNTINFO) -> None:
    """SPEC §1: approach I images live on tmpfs only; refuse any other directory."""
    try:
        kind = filesystem_type(directory, mountinfo)
    except OSError as exc:
        raise IsoError(f"cannot tell which filesystem holds {directory} ({exc})") from None
    if kind != "tmpfs":
        raise IsoError(
            f"{directory} is on {kind}, not tmpfs: update images must never reach a "
            "persistent disk (SPEC §1); use a directory under /dev/shm or /run"
        )


def write_update_image(
    directory: Path, name: str, update: bytes, *, mountinfo: Path = _MOUNTINFO
) -> Path:
    """Write the image of `update` as directory/name on tmpfs: temp file, then rename."""
    check_tmpfs(directory, mountinfo)
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.stat(directory)
        # /dev/shm is world-writable: a directory someone else made there is not ours.
        if info.st_uid != os.getuid() or info.st_mode & 0o077:
            raise IsoError(f"{directory} must belong to this user with mode 0700")
        path = directory / name
        write_private(path, build_update_image(update))
    except OSError as exc:
        raise IsoError(f"cannot write {directory / name} ({exc.strerror or exc})") from None
    return path


def read_update_from_iso(image: Path | bytes) -> bytes:
    """The bytes of UPDATE.MP in an ISO image (a file or its contents), without mounting."""
    iso = pycdlib.PyCdlib()
    try:
        if isinstance(image, bytes):
            iso.open_fp(io.BytesIO(image))
        else:
            iso.open(os.fspath(image))
        try:
            record = iso.get_record(iso_path=ISO_PATH)
            if record.get_data_length() > _IMAGE_LIMIT:
                raise IsoError("UPDATE.MP is larger than any update can be")
            out = io.BytesIO()
            iso.get_file_from_iso_fp(out, iso_path=ISO_PATH)
        finally:
            iso.close()
    except PyCdlibException as exc:
        raise IsoError(f"not an update image ({exc})") from None
    except OSError as exc:
        raise IsoError(f"cannot read the image ({exc.strerror or exc})") from None
    return out.getvalue()


# --------------------------------------------------------------------------- QMP


class QmpClient:
    """QEMU Machine Protocol over a trio stream: one JSON object per line each way."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._buffer = bytearray()
        self._ids = itertools.count(1)

    async def _message(self) -> dict[str, Any]:
        while True:
            line, newline, rest = self._buffer.partition(b"\n")
            if newline:
                self._buffer = bytearray(rest)
                try:
                    message = json.loads(line)
                except (UnicodeDecodeError, json.JSONDecodeError):
                    raise QmpError("the monitor sent something that is not JSON") from None
                if not isinstance(message, dict):
                    raise QmpError("the monitor sent JSON that is not an object")
                return message
            if len(self._buffer) > _QMP_LINE_LIMIT:
                raise QmpError("the monitor sent an over-long line")
            data = await self._stream.receive_some(65536)
            if not data:
                raise QmpError("the monitor closed the connection")
            self._buffer += data

    async def greeting(self) -> dict[str, Any]:
        message = await self._message()
        if "QMP" not in message:
            raise QmpError("no QMP greeting")
        return message

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run `command`; its "return" value, or QmpError with QEMU's description."""
        request_id = f"tvdnet-{next(self._ids)}"
        request: dict[str, Any] = {"execute": command, "id": request_id}
        if arguments is not None:
            request["arguments"] = arguments
        await self._stream.send_all(json.dumps(request).encode() + b"\r\n")
        while True:
            message = await self._message()
            if "event" in message or message.get("id") != request_id:
                continue  # asynchronous events (DEVICE_TRAY_MOVED, ...) are not answers
            if "error" in message:
                error = message["error"] if isinstance(message["error"], dict) else {}
                raise QmpError(
                    f"{command}: {error.get('desc', 'failed')}", str(error.get("class", ""))
                )
            return message.get("return")

    async def change_medium(
        self, device_id: str, filename: Path, fmt: str = "raw", *, force: bool = False
    ) -> None:
        """Swap the medium of the drive with qdev id `device_id` (approach I).

        With `force`, QEMU opens the tray even when the guest has locked it (a guest
        reading the drive locks it); without, QEMU only asks the guest to eject, and a
        locked tray makes the command fail.
        """
        arguments: dict[str, object] = {
            "id": device_id,
            "filename": os.fspath(filename),
            "format": fmt,
        }
        if force:
            arguments["force"] = True
        await self.execute("blockdev-change-medium", arguments)


@asynccontextmanager
async def open_qmp(path: Path, *, timeout: float = QMP_TIMEOUT) -> AsyncIterator[QmpClient]:
    """Connect to a QMP Unix socket, read the greeting and enter command mode."""
    try:
        with trio.fail_after(timeout):
            stream = await trio.open_unix_socket(os.fspath(path))
    except (OSError, trio.TooSlowError) as exc:
        raise QmpError(f"cannot connect to {path} ({exc})") from None
    async with stream:
        client = QmpClient(stream)
        try:
            with trio.fail_after(timeout):
                await client.greeting()
                await client.execute("qmp_capabilities")
        except trio.TooSlowError:
            raise QmpError(f"{path} did not answer within {timeout} s") from None
        except (trio.BrokenResourceError, OSError) as exc:
            raise QmpError(f"{path}: {exc}") from None
        yield client

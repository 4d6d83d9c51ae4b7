"""Private key files (SPEC §6): the computer-key file of a VM, and the rules every key file obeys.

A computer-key file is JSON, mode 0600, written atomically:

    {"format": "tvdnet-computer-keys", "version": 1, "tvd": "...", "vm": "...",
     "schedule": {"epoch": 1700000000.0, "period_s": 60.0, "periods": 10000},
     "keys": {"peer-id": "<64 hex digits>", ...}}

Every problem is a `KeyFileError` that names the file (and the field), never a key.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Final

from .core.constants import KEY_LEN
from .core.errors import InvalidSchedule, KeyFileError
from .core.ids import is_valid_id
from .core.scheme import ComputerKeys, Schedule

__all__ = [
    "KeyFileError",
    "check_private",
    "load_computer_keys",
    "schedule_from_wire",
    "schedule_to_wire",
    "write_computer_keys",
    "write_private",
]

COMPUTER_KEYS_FORMAT: Final = "tvdnet-computer-keys"


def check_private(path: Path, *, sole: bool = False) -> os.stat_result:
    """Refuse a key file that is not a regular file or that group or others may read.

    With `sole`, also one that is a symlink or has other hard links: a file that is
    rewritten by rename (the bridge's keystore) would leave its older keys under the
    other name, and a lock beside one name would not stop a second writer at the other.
    """
    try:
        info = os.lstat(path) if sole else os.stat(path)
    except FileNotFoundError:
        raise KeyFileError(path, "no such file") from None
    except OSError as exc:
        raise KeyFileError(path, f"cannot stat it ({exc.strerror})") from None
    if sole and stat.S_ISLNK(info.st_mode):
        raise KeyFileError(
            path,
            f"a symlink (to {os.readlink(path)}): give the file's own path; a rewrite "
            "would replace the link and leave the older keys in its target",
        )
    if sole and stat.S_ISREG(info.st_mode) and info.st_nlink > 1:
        raise KeyFileError(
            path,
            f"{info.st_nlink} hard links to it: remove the other names (find / -samefile "
            f"{path}); each would keep an older key when this one is rewritten",
        )
    if not stat.S_ISREG(info.st_mode):
        raise KeyFileError(path, "not a regular file")
    if info.st_mode & 0o077:
        raise KeyFileError(
            path,
            f"mode {stat.S_IMODE(info.st_mode):04o} lets group or others in; "
            f"a key file must be 0600 (chmod 600 {path})",
        )
    return info


def write_private(path: Path, data: bytes, *, overwrite: bool = True) -> None:
    """Write `data` to `path` atomically with mode 0600: temp file, fsync, rename, fsync dir.

    On any failure nothing at `path` changes and the temp file is removed. With
    overwrite=False an existing file is refused (FileExistsError).
    """
    directory = path.parent
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), 0o600)
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails with FileExistsError instead of replacing
            tmp.unlink()
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def schedule_to_wire(schedule: Schedule) -> dict[str, Any]:
    return {
        "epoch": float(schedule.epoch),
        "period_s": float(schedule.period_s),
        "periods": schedule.periods,
    }


def schedule_from_wire(wire: object, where: str) -> Schedule:
    if not isinstance(wire, dict) or set(wire) != {"epoch", "period_s", "periods"}:
        raise ValueError(f"{where} must be a map of epoch, period_s and periods")
    try:
        return Schedule(wire["epoch"], wire["period_s"], wire["periods"])
    except InvalidSchedule as exc:
        raise ValueError(f"{where}: {exc}") from None


def write_computer_keys(
    path: Path, keys: ComputerKeys, schedule: Schedule, *, overwrite: bool = False
) -> None:
    document = {
        "format": COMPUTER_KEYS_FORMAT,
        "version": 1,
        "tvd": keys.tvd,
        "vm": keys.vm,
        "schedule": schedule_to_wire(schedule),
        "keys": {peer: bytes(keys.get(peer) or b"").hex() for peer in keys.peers},
    }
    write_private(path, (json.dumps(document, indent=1) + "\n").encode(), overwrite=overwrite)


def load_computer_keys(path: Path) -> tuple[ComputerKeys, Schedule]:
    """Read a VM's computer-key file; refuses loose permissions and any malformed field."""
    check_private(path)
    try:
        document = json.loads(path.read_bytes())
    except OSError as exc:
        raise KeyFileError(path, f"cannot read it ({exc.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KeyFileError(path, f"not JSON ({exc.__class__.__name__})") from None
    if not isinstance(document, dict) or document.get("format") != COMPUTER_KEYS_FORMAT:
        raise KeyFileError(path, f'not a computer-key file (no "format": "{COMPUTER_KEYS_FORMAT}")')
    if document.get("version") != 1:
        raise KeyFileError(path, "unsupported version (this tvdnet reads version 1)")
    for field in ("tvd", "vm"):
        if not is_valid_id(document.get(field)):
            raise KeyFileError(path, f'"{field}" must be a valid id')
    try:
        schedule = schedule_from_wire(document.get("schedule"), '"schedule"')
    except ValueError as exc:
        raise KeyFileError(path, str(exc)) from None
    raw_keys = document.get("keys")
    if not isinstance(raw_keys, dict):
        raise KeyFileError(path, '"keys" must be a map of peer id to hex key')
    keys: dict[str, bytes] = {}
    for peer, text in raw_keys.items():
        if not is_valid_id(peer) or peer == document["vm"]:
            raise KeyFileError(path, '"keys" has an entry that is not a valid peer id')
        try:
            key = bytes.fromhex(text) if isinstance(text, str) else b""
        except ValueError:
            key = b""
        if len(key) != KEY_LEN:
            raise KeyFileError(path, f'"keys"."{peer}" must be {KEY_LEN * 2} hex digits')
        keys[peer] = key
    return ComputerKeys(document["tvd"], document["vm"], keys), schedule

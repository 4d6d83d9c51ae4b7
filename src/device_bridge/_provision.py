"""G for a whole TVD (SPEC §1, §3, §6): the keystore and one computer-key file per VM.

The keystore gets the device keys only, evolved to the period t0 current at provisioning
(never dev_1 when t0 > 1); the export directory, kept apart from the keystore, gets each
VM's computer master keys only. Nothing is overwritten without `force`, and a refusal
changes nothing.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

from tvdnet.core.errors import NoSuchPeriod
from tvdnet.core.scheme import Schedule, generate
from tvdnet.keyfile import write_computer_keys

from ._config import TvdConfig
from ._keystore import Keystore, MemberRecord
from .constants import KEYSTORE_SCRYPT_N
from .errors import KeystoreError, ProvisionError

__all__ = ["ProvisionResult", "check_targets", "provision"]


@dataclass(frozen=True, slots=True)
class ProvisionResult:
    keystore: Path
    exports: dict[str, Path]  # vm -> its computer-key file
    schedule: Schedule
    t0: int  # the period of the device keys in the keystore
    pairs: int


def _mkdir_private(directory: Path) -> None:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)


def check_targets(
    config: TvdConfig, keystore_path: Path, export_dir: Path, *, force: bool
) -> dict[str, Path]:
    """Each VM's computer-key file; ProvisionError if anything is in the way (without force)."""
    if Path(export_dir).resolve() == Path(keystore_path).parent.resolve():
        raise ProvisionError(
            "the export directory must not be the keystore's directory: the computer keys "
            "leave this host, the device keys never do (SPEC §1)"
        )
    exports = {vm: Path(export_dir) / f"{vm}.keys" for vm in config.ids}
    in_the_way = [p for p in [Path(keystore_path), *exports.values()] if os.path.lexists(p)]
    if in_the_way and not force:
        raise ProvisionError(
            "refusing to overwrite "
            + ", ".join(str(p) for p in in_the_way)
            + " (use --force to replace them); nothing was changed"
        )
    return exports


def provision(
    config: TvdConfig,
    keystore_path: Path,
    export_dir: Path,
    *,
    passphrase: bytearray | None,
    force: bool = False,
    now: float | None = None,
    scrypt_n: int = KEYSTORE_SCRYPT_N,
) -> ProvisionResult:
    """Provision the TVD of `config`; `passphrase=None` writes a plaintext (demo) keystore."""
    now = time.time() if now is None else now
    keystore_path, export_dir = Path(keystore_path), Path(export_dir)
    schedule = config.schedule(default_epoch=now)
    if now < schedule.epoch:
        t0 = 1  # SPEC §3: t0 = 1 before the epoch
    else:
        try:
            t0 = schedule.period_at(now)
        except NoSuchPeriod:
            raise ProvisionError(
                f"the schedule's last period ({schedule.periods}) has already ended"
            ) from None
    exports = check_targets(config, keystore_path, export_dir, force=force)
    _mkdir_private(keystore_path.parent)
    _mkdir_private(export_dir)
    provisioning = generate(config.tvd, config.ids, pairs=config.pair_list())
    device_keys = provisioning.for_bridge(t0)
    keystore = Keystore(
        keystore_path,
        schedule,
        [MemberRecord(m.id, m.address, str(m.channel)) for m in config.members],
        device_keys,
        passphrase,
        scrypt_n=scrypt_n,
    )
    created: list[Path] = []
    writing = keystore_path  # the file being written, for an error without a file name
    try:
        # A bridge running on this keystore would overwrite new keys with its old ones.
        keystore.lock()
        for vm, path in exports.items():
            existed = os.path.lexists(path)
            writing = path
            computer_keys = provisioning.for_vm(vm)
            try:
                write_computer_keys(path, computer_keys, schedule, overwrite=force)
            finally:
                computer_keys.erase()
            if not existed:
                created.append(path)
        existed = os.path.lexists(keystore_path)
        writing = keystore_path
        keystore.save(overwrite=force)  # last: without it the exports are useless
        if not existed:
            created.append(keystore_path)
    except BaseException as exc:
        for path in created:  # what this run created goes; what it replaced is gone anyway
            with contextlib.suppress(OSError):
                path.unlink()
        if isinstance(exc, KeystoreError):
            raise ProvisionError(str(exc)) from None
        if isinstance(exc, OSError):
            # A full disk fails in write(2), whose error names no file: say which one.
            raise ProvisionError(
                f"cannot write {exc.filename or writing}: {exc.strerror or exc}; nothing "
                "was provisioned (the files this run created were removed)"
            ) from None
        raise
    finally:
        keystore.close()
        provisioning.erase()
        pairs = len(device_keys.pairs)
        device_keys.erase()
    return ProvisionResult(keystore_path, exports, schedule, t0, pairs)

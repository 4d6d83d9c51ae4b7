"""G for a whole TVD (SPEC §1, §3, §6): a keystore per host and one computer-key file per VM.

Each host's keystore gets the device keys of exactly the pairs with a member on that host,
evolved to the period t0 current at provisioning (never dev_1 when t0 > 1), and a random
transfer key for each other host of the TVD (for moving a member, `_moves.py`); the export
directory, kept apart from the keystores, gets each VM's computer master keys only. A pair
whose members are on two hosts has its device key in both keystores: each bridge evolves
it by the schedule, and nothing but their clocks is shared at run time. Nothing is
overwritten without `force`, and a refusal changes nothing.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tvdnet.core.constants import KEY_LEN
from tvdnet.core.errors import NoSuchPeriod
from tvdnet.core.scheme import DeviceKeys, Pair, Schedule, generate
from tvdnet.keyfile import write_computer_keys

from ._config import TvdConfig
from ._keystore import Keystore, MemberRecord
from .constants import KEYSTORE_SCRYPT_N
from .errors import KeystoreError, ProvisionError

__all__ = ["ProvisionResult", "check_targets", "keystore_paths", "provision"]


@dataclass(frozen=True, slots=True)
class ProvisionResult:
    keystores: dict[str, Path]  # host -> its keystore
    exports: dict[str, Path]  # vm -> its computer-key file
    schedule: Schedule
    t0: int  # the period of the device keys in the keystores
    pairs: int  # pairs in the TVD
    pairs_per_host: dict[str, int]

    @property
    def keystore(self) -> Path:
        """The keystore of a TVD on one host."""
        (path,) = self.keystores.values()
        return path


def keystore_paths(config: TvdConfig, out: Path) -> dict[str, Path]:
    """Where `provision --out DIR` puts each host's keystore: DIR/keystore.json for a TVD
    on one host, else DIR/keystore-HOST.json."""
    hosts = config.hosts
    if len(hosts) == 1:
        return {hosts[0]: out / "keystore.json"}
    return {host: out / f"keystore-{host}.json" for host in hosts}


def _mkdir_private(directory: Path) -> None:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)


def _by_host(config: TvdConfig, keystores: Path | Mapping[str, Path]) -> dict[str, Path]:
    if isinstance(keystores, Mapping):
        paths = {host: Path(path) for host, path in keystores.items()}
    elif len(config.hosts) == 1:
        paths = {config.hosts[0]: Path(keystores)}
    else:
        raise ProvisionError(
            f"the TVD has {len(config.hosts)} hosts ({', '.join(config.hosts)}): each gets a "
            "keystore of its own; give a directory (--out) instead of one keystore file"
        )
    missing = [host for host in config.hosts if host not in paths]
    if missing:
        raise ProvisionError(f"no keystore path for host(s) {', '.join(missing)}")
    if len(set(paths.values())) != len(paths):
        raise ProvisionError("two hosts were given the same keystore path: each needs its own")
    return paths


def check_targets(
    config: TvdConfig, keystores: Path | Mapping[str, Path], export_dir: Path, *, force: bool
) -> dict[str, Path]:
    """Each VM's computer-key file; ProvisionError if anything is in the way (without force)."""
    paths = _by_host(config, keystores)
    for path in paths.values():
        if Path(export_dir).resolve() == path.parent.resolve():
            raise ProvisionError(
                "the export directory must not be the keystore's directory: the computer keys "
                "leave this host, the device keys never do (SPEC §1)"
            )
    exports = {vm: Path(export_dir) / f"{vm}.keys" for vm in config.ids}
    in_the_way = [p for p in [*paths.values(), *exports.values()] if os.path.lexists(p)]
    if in_the_way and not force:
        raise ProvisionError(
            "refusing to overwrite "
            + ", ".join(str(p) for p in in_the_way)
            + " (use --force to replace them); nothing was changed"
        )
    return exports


def provision(
    config: TvdConfig,
    keystores: Path | Mapping[str, Path],
    export_dir: Path,
    *,
    passphrase: bytearray | None,
    force: bool = False,
    now: float | None = None,
    scrypt_n: int = KEYSTORE_SCRYPT_N,
) -> ProvisionResult:
    """Provision the TVD of `config`; `passphrase=None` writes plaintext (demo) keystores.

    `keystores`: the keystore's path for a TVD on one host, else {host: path} for each host
    (`keystore_paths`). One passphrase encrypts them all (each host's operator may change
    it later by rewriting the file with `tvdnet-bridge`'s own writer)."""
    now = time.time() if now is None else now
    export_dir = Path(export_dir)
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
    paths = _by_host(config, keystores)
    exports = check_targets(config, paths, export_dir, force=force)
    for path in paths.values():
        _mkdir_private(path.parent)
    _mkdir_private(export_dir)
    provisioning = generate(config.tvd, config.ids, pairs=config.pair_list())
    device_keys = provisioning.for_bridge(t0)
    hosts = config.hosts
    transfer = {
        Pair.of(a, b): bytearray(secrets.token_bytes(KEY_LEN))
        for i, a in enumerate(hosts)
        for b in hosts[i + 1 :]
    }
    records = [MemberRecord(m.id, m.address, str(m.channel)) for m in config.members]
    host_of = {m.id: m.host for m in config.members}
    keystores_by_host: dict[str, Keystore] = {}
    for host, path in paths.items():
        mine = {
            pair: device_keys.key_bytes(pair)
            for pair in device_keys.pairs
            if host in (host_of[pair.lo], host_of[pair.hi])
        }
        links = {pair: key for pair, key in transfer.items() if host in pair}
        keystores_by_host[host] = Keystore(
            path,
            schedule,
            records,
            DeviceKeys(config.tvd, t0, mine),
            bytearray(passphrase) if passphrase is not None else None,
            scrypt_n=scrypt_n,
            host=host,
            transfer_keys=DeviceKeys(config.tvd, t0, links),
        )
    for key in transfer.values():
        key[:] = bytes(len(key))
    created: list[Path] = []
    writing = next(iter(paths.values()))  # the file being written, for an error without a name
    try:
        # A bridge running on a keystore would overwrite new keys with its old ones.
        for keystore in keystores_by_host.values():
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
        for keystore in keystores_by_host.values():  # last: without them the exports are useless
            existed = os.path.lexists(keystore.path)
            writing = keystore.path
            keystore.save(overwrite=force)
            if not existed:
                created.append(keystore.path)
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
        per_host = {}
        for host, keystore in keystores_by_host.items():
            keystore.close()
            per_host[host] = len(keystore.device_keys.pairs)
            keystore.device_keys.erase()
            keystore.transfer_keys.erase()
        provisioning.erase()
        pairs = len(device_keys.pairs)
        device_keys.erase()
    return ProvisionResult(paths, exports, schedule, t0, pairs, per_host)

"""The bridge keystore (SPEC §6): the schedule and the current device keys dev_t, nothing else.

A JSON file, mode 0600, rewritten atomically (temp file, fsync, rename, fsync directory)
whenever the keys evolve. Encrypted at rest:

    {"format": "tvdnet-keystore", "version": 1, "encryption": "scrypt+aes-256-gcm",
     "kdf": {"name": "scrypt", "n": 32768, "r": 8, "p": 1, "salt": "<32 hex>"},
     "nonce": "<24 hex>", "ciphertext": "<hex>"}

The AES-256-GCM key is scrypt(passphrase, salt); the associated data is the canonical JSON
of format, version, encryption and kdf, so none of them can be changed unnoticed. Every
write draws a fresh salt and a fresh nonce. The plaintext is the payload:

    {"tvd": "demo", "schedule": {"epoch": ..., "period_s": ..., "periods": ...}, "t": 12,
     "members": [{"id": "vm-a", "address": "127.0.0.1:7001", "channel": "unix:..."}, ...],
     "device_keys": [{"pair": ["vm-a", "vm-b"], "dev": "<64 hex: dev_t>"}, ...],
     "host": "kvm1",
     "transfer_keys": [{"hosts": ["kvm1", "kvm2"], "key": "<64 hex: T_t>"}, ...],
     "moves_in": [{"id": "<32 hex>", "vm": "vm-c", "t": 12}, ...]}

A TVD on several hosts has one keystore per host (SPEC §6): `device_keys` holds exactly the
pairs with a member on `host`, `transfer_keys` one key per pair of hosts this host belongs
to (evolved with the device keys; a move bundle is sealed under it, `_moves.py`), and
`moves_in` the bundles this host has taken in, so that none is taken twice. A keystore
without "host" is of the one host "local".

For demos, `"encryption": "none"` keeps the payload in the clear under "payload", with a
"warning" field saying so. Errors are `KeystoreError`s naming the file, never a key; a
keystore that fails to load is left exactly as it was.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tvdnet.core.constants import KEY_LEN
from tvdnet.core.errors import TvdnetError
from tvdnet.core.ids import is_valid_id
from tvdnet.core.scheme import DeviceKeys, Pair, Schedule
from tvdnet.keyfile import (
    KeyFileError,
    check_private,
    schedule_from_wire,
    schedule_to_wire,
    write_private,
)

from ._config import DEFAULT_HOST
from ._log import emit
from .constants import (
    KEYSTORE_SCRYPT_MAXMEM,
    KEYSTORE_SCRYPT_N,
    KEYSTORE_SCRYPT_P,
    KEYSTORE_SCRYPT_R,
)
from .errors import KeystoreError

__all__ = ["ENCRYPTED", "PLAINTEXT", "Keystore", "MemberRecord", "MoveIn", "check_scrypt_n"]

FORMAT: Final = "tvdnet-keystore"
ENCRYPTED: Final = "scrypt+aes-256-gcm"
PLAINTEXT: Final = "none"
PLAINTEXT_WARNING: Final = (
    "PLAINTEXT KEYSTORE FOR DEMOS ONLY: these device keys are not encrypted at rest (SPEC §6)"
)
SALT_LEN: Final = 16
NONCE_LEN: Final = 12
_SCRYPT_N_MAX: Final = 1 << 20


@dataclass(frozen=True, slots=True)
class MemberRecord:
    """A member as the keystore remembers it (informational, apart from its id)."""

    id: str
    address: str
    channel: str


def check_scrypt_n(n: object) -> int:
    """scrypt's cost N: a power of two from 2 to 2**20."""
    if type(n) is not int or n < 2 or n > _SCRYPT_N_MAX or n & (n - 1):
        raise ValueError(f"the scrypt cost n must be a power of two from 2 to {_SCRYPT_N_MAX}")
    return n


def _aad(header: dict[str, Any]) -> bytes:
    fields = {key: header[key] for key in ("format", "version", "encryption", "kdf")}
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def _scrypt(passphrase: bytearray, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(
        passphrase, salt=salt, n=n, r=r, p=p, maxmem=KEYSTORE_SCRYPT_MAXMEM + (1 << 24), dklen=32
    )


@dataclass(frozen=True, slots=True)
class MoveIn:
    """A move bundle this host took in (its id is never taken again)."""

    id: str
    vm: str
    t: int


class Keystore:
    """A loaded (or newly provisioned) keystore: its metadata, its `DeviceKeys`, its writer.

    `snapshot()` serializes the current state (call it where the keys are not changing, in
    the event loop); `write(snapshot)` encrypts and writes it (slow: scrypt and fsync; call
    it in a worker thread). The passphrase is kept, as a bytearray, for those rewrites.
    """

    __slots__ = (
        "_lock_fd",
        "_passphrase",
        "device_keys",
        "host",
        "members",
        "moves_in",
        "path",
        "schedule",
        "scrypt_n",
        "transfer_keys",
        "tvd",
    )

    def __init__(
        self,
        path: Path,
        schedule: Schedule,
        members: Iterable[MemberRecord],
        device_keys: DeviceKeys,
        passphrase: bytearray | None,
        *,
        scrypt_n: int = KEYSTORE_SCRYPT_N,
        host: str = DEFAULT_HOST,
        transfer_keys: DeviceKeys | None = None,
        moves_in: Iterable[MoveIn] = (),
    ) -> None:
        self.path = Path(path)
        self.tvd = device_keys.tvd
        self.host = host
        # One T_t per pair of hosts (the pair's "members" are host names), at the device
        # keys' period: they evolve together (`evolve_to`).
        self.transfer_keys = (
            transfer_keys
            if transfer_keys is not None
            else DeviceKeys(self.tvd, device_keys.period, {})
        )
        self.moves_in: list[MoveIn] = list(moves_in)
        self.schedule = schedule
        self.members: dict[str, MemberRecord] = {m.id: m for m in members}
        self.device_keys = device_keys
        self.scrypt_n = check_scrypt_n(scrypt_n)
        if passphrase is not None and not passphrase:
            raise KeystoreError(self.path, "the passphrase is empty")
        self._passphrase = passphrase
        self._lock_fd: int | None = None

    def __repr__(self) -> str:
        return (
            f"<Keystore {self.path} tvd={self.tvd!r} host={self.host!r} "
            f"t={self.device_keys.period} "
            f"members={len(self.members)} {'encrypted' if self.encrypted else 'PLAINTEXT'}>"
        )

    @property
    def encrypted(self) -> bool:
        return self._passphrase is not None

    def evolve_to(self, t: int) -> None:
        """U*: the device keys and the transfer keys to period t, the old ones overwritten."""
        self.device_keys.evolve_to(t)
        self.transfer_keys.evolve_to(t)

    # ------------------------------------------------------------------ writing

    def snapshot(self) -> bytes:
        """The payload as it stands now: dev_t of every pair, and nothing older (SPEC §3)."""
        keys = self.device_keys
        payload = {
            "tvd": self.tvd,
            "schedule": schedule_to_wire(self.schedule),
            "t": keys.period,
            "members": [
                {"id": m.id, "address": m.address, "channel": m.channel}
                for m in self.members.values()
            ],
            "device_keys": [
                {"pair": [pair.lo, pair.hi], "dev": keys.key_bytes(pair).hex()}
                for pair in keys.pairs
            ],
            "host": self.host,
            "transfer_keys": [
                {"hosts": [pair.lo, pair.hi], "key": self.transfer_keys.key_bytes(pair).hex()}
                for pair in self.transfer_keys.pairs
            ],
            "moves_in": [{"id": m.id, "vm": m.vm, "t": m.t} for m in self.moves_in],
        }
        return json.dumps(payload, separators=(",", ":")).encode()

    def write(self, payload: bytes, *, overwrite: bool = True) -> None:
        """Encrypt `payload` under a fresh salt and nonce and replace the file atomically."""
        if self._passphrase is None:
            document: dict[str, Any] = {
                "format": FORMAT,
                "version": 1,
                "encryption": PLAINTEXT,
                "warning": PLAINTEXT_WARNING,
                "payload": json.loads(payload),
            }
        else:
            salt = secrets.token_bytes(SALT_LEN)
            nonce = secrets.token_bytes(NONCE_LEN)
            n, r, p = self.scrypt_n, KEYSTORE_SCRYPT_R, KEYSTORE_SCRYPT_P
            document = {
                "format": FORMAT,
                "version": 1,
                "encryption": ENCRYPTED,
                "kdf": {"name": "scrypt", "n": n, "r": r, "p": p, "salt": salt.hex()},
            }
            key = _scrypt(self._passphrase, salt, n, r, p)
            ciphertext = AESGCM(key).encrypt(nonce, payload, _aad(document))
            document["nonce"] = nonce.hex()
            document["ciphertext"] = ciphertext.hex()
        data = (json.dumps(document, indent=1) + "\n").encode()
        replaced = _open_replaced(self.path) if overwrite else None
        try:
            write_private(self.path, data, overwrite=overwrite)
        except FileExistsError:
            raise KeystoreError(self.path, "already exists") from None
        except OSError as exc:
            raise KeystoreError(
                self.path, f"cannot write it ({exc.strerror or exc}); the file on disk is unchanged"
            ) from None
        finally:
            if replaced is not None:
                _erase_if_linked(replaced, self.path)

    def save(self, *, overwrite: bool = True) -> None:
        self.write(self.snapshot(), overwrite=overwrite)

    def drop_member(self, vm: str) -> int:
        """Forget `vm` and erase the device keys of its pairs; returns how many were erased."""
        self.members.pop(vm, None)
        return self.device_keys.drop_member(vm)

    # ------------------------------------------------------------------ one bridge per keystore

    def lock(self) -> None:
        """Hold `<keystore>.lock` so that a second bridge on this keystore refuses to start."""
        if self._lock_fd is not None:
            return
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise KeystoreError(
                self.path, f"cannot open its lock {lock_path} ({exc.strerror})"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise KeystoreError(
                self.path, f"another bridge is using this keystore ({lock_path} is locked)"
            ) from None
        self._lock_fd = fd

    def close(self) -> None:
        """Release the lock and zero the passphrase (the device keys belong to the caller)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        if self._passphrase is not None:
            self._passphrase[:] = bytes(len(self._passphrase))

    # ------------------------------------------------------------------ reading

    @staticmethod
    def read_header(path: Path) -> dict[str, Any]:
        """The keystore's outer JSON, after the permission check; says whether it is encrypted."""
        path = Path(path)
        try:
            check_private(path, sole=True)
        except KeyFileError as exc:
            raise KeystoreError(path, exc.problem) from None
        try:
            document = json.loads(path.read_bytes())
        except OSError as exc:
            raise KeystoreError(path, f"cannot read it ({exc.strerror})") from None
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise KeystoreError(path, "corrupted: not JSON") from None
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise KeystoreError(path, f'not a keystore (no "format": "{FORMAT}")')
        if document.get("version") != 1:
            raise KeystoreError(path, "unsupported version (this bridge reads version 1)")
        if document.get("encryption") not in (ENCRYPTED, PLAINTEXT):
            raise KeystoreError(path, f'"encryption" must be "{ENCRYPTED}" or "{PLAINTEXT}"')
        return document

    @classmethod
    def load(
        cls, path: Path, passphrase: bytearray | None, *, scrypt_n: int = KEYSTORE_SCRYPT_N
    ) -> Keystore:
        """Read, authenticate and check a keystore. With a plaintext file, `passphrase` is
        ignored (and later writes stay plaintext)."""
        path = Path(path)
        document = cls.read_header(path)
        if document["encryption"] == PLAINTEXT:
            payload = document.get("payload")
            passphrase = None
        else:
            if passphrase is None:
                raise KeystoreError(path, "it is encrypted: a passphrase is needed")
            payload = json.loads(_open(path, document, passphrase))
        parsed = _parse_payload(path, payload)
        return cls(
            path,
            parsed.schedule,
            parsed.members,
            parsed.device_keys,
            passphrase,
            scrypt_n=scrypt_n,
            host=parsed.host,
            transfer_keys=parsed.transfer_keys,
            moves_in=parsed.moves_in,
        )


def _hex(document: dict[str, Any], key: str, size: int | None, path: Path) -> bytes:
    text = document.get(key)
    try:
        value = bytes.fromhex(text) if isinstance(text, str) else None
    except ValueError:
        value = None
    if value is None or (size is not None and len(value) != size):
        what = f"{size * 2} hex digits" if size else "hex"
        raise KeystoreError(path, f'corrupted: "{key}" must be {what}')
    return value


def _open(path: Path, document: dict[str, Any], passphrase: bytearray) -> bytes:
    kdf = document.get("kdf")
    if not isinstance(kdf, dict) or kdf.get("name") != "scrypt":
        raise KeystoreError(path, 'corrupted: "kdf" must name scrypt and its parameters')
    n, r, p = kdf.get("n"), kdf.get("r"), kdf.get("p")
    try:
        check_scrypt_n(n)
    except ValueError as exc:
        raise KeystoreError(path, f"corrupted: {exc}") from None
    assert isinstance(n, int)
    if type(r) is not int or type(p) is not int or not 1 <= r <= 32 or not 1 <= p <= 16:
        raise KeystoreError(path, "corrupted: scrypt r must be 1..32 and p 1..16")
    if 128 * n * r * p > KEYSTORE_SCRYPT_MAXMEM:
        raise KeystoreError(path, "its scrypt parameters ask for more than 1 GiB of memory")
    salt = _hex(kdf, "salt", SALT_LEN, path)
    nonce = _hex(document, "nonce", NONCE_LEN, path)
    ciphertext = _hex(document, "ciphertext", None, path)
    key = _scrypt(passphrase, salt, n, r, p)
    try:
        return AESGCM(key).decrypt(nonce, ciphertext, _aad(document))
    except InvalidTag:
        raise KeystoreError(
            path, "wrong passphrase, or the file is corrupted (it does not authenticate)"
        ) from None


@dataclass(frozen=True, slots=True)
class _Payload:
    schedule: Schedule
    members: list[MemberRecord]
    device_keys: DeviceKeys
    host: str
    transfer_keys: DeviceKeys
    moves_in: list[MoveIn]


def _key_list(
    raw: object, field: str, names: str, known: set[str] | None, path: Path
) -> dict[Pair, bytearray]:
    """`[{names: [a, b], key_field: hex}, ...]` -> {Pair: key}; the caller zeroes the keys."""
    key_field = "dev" if names == "pair" else "key"
    if not isinstance(raw, list):
        raise KeystoreError(path, f'corrupted: "{field}" must be a list')
    keys: dict[Pair, bytearray] = {}
    for i, entry in enumerate(raw):
        ids = entry.get(names) if isinstance(entry, dict) else None
        if (
            not isinstance(ids, list)
            or len(ids) != 2
            or not all(is_valid_id(m) and (known is None or m in known) for m in ids)
            or ids[0] == ids[1]
        ):
            what = "a pair of two members" if names == "pair" else "two hosts"
            raise KeystoreError(path, f'corrupted: "{field}"[{i}] must name {what}')
        pair = Pair.of(ids[0], ids[1])
        if pair in keys:
            raise KeystoreError(path, f'corrupted: "{field}"[{i}] repeats a pair')
        keys[pair] = bytearray(_hex(entry, key_field, KEY_LEN, path))
    return keys


def _parse_payload(path: Path, payload: object) -> _Payload:
    def bad(problem: str) -> KeystoreError:
        return KeystoreError(path, f"corrupted: {problem}")

    if not isinstance(payload, dict):
        raise bad("the payload is not a map")
    tvd = payload.get("tvd")
    if not is_valid_id(tvd):
        raise bad('"tvd" must be a valid id')
    assert isinstance(tvd, str)
    try:
        schedule = schedule_from_wire(payload.get("schedule"), '"schedule"')
        t = schedule.check(payload.get("t"))
    except (ValueError, TvdnetError) as exc:
        raise bad(str(exc)) from None
    raw_members = payload.get("members")
    if not isinstance(raw_members, list):
        raise bad('"members" must be a list')
    members: list[MemberRecord] = []
    for i, entry in enumerate(raw_members):
        if not isinstance(entry, dict) or not is_valid_id(entry.get("id")):
            raise bad(f'"members"[{i}] needs a valid "id"')
        address, channel = entry.get("address"), entry.get("channel")
        if not isinstance(address, str) or not isinstance(channel, str):
            raise bad(f'"members"[{i}] needs "address" and "channel" strings')
        members.append(MemberRecord(entry["id"], address, channel))
    ids = {m.id for m in members}
    if len(ids) != len(members):
        raise bad('"members" names a member twice')
    host = payload.get("host", DEFAULT_HOST)
    if not is_valid_id(host):
        raise bad('"host" must be a valid id')
    assert isinstance(host, str)
    moves_in: list[MoveIn] = []
    raw_moves = payload.get("moves_in", [])
    if not isinstance(raw_moves, list):
        raise bad('"moves_in" must be a list')
    for i, entry in enumerate(raw_moves):
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("id"), str)
            or not is_valid_id(entry.get("vm"))
            or type(entry.get("t")) is not int
        ):
            raise bad(f'"moves_in"[{i}] needs "id", "vm" and "t"')
        moves_in.append(MoveIn(entry["id"], entry["vm"], entry["t"]))
    keys: dict[Pair, bytearray] = {}
    transfer: dict[Pair, bytearray] = {}
    try:
        keys = _key_list(payload.get("device_keys"), "device_keys", "pair", ids, path)
        transfer = _key_list(payload.get("transfer_keys", []), "transfer_keys", "hosts", None, path)
        device_keys = DeviceKeys(tvd, t, keys)
        transfer_keys = DeviceKeys(tvd, t, transfer)
    finally:
        for key in (*keys.values(), *transfer.values()):
            key[:] = bytes(len(key))
    return _Payload(schedule, members, device_keys, host, transfer_keys, moves_in)


def _open_replaced(path: Path) -> int | None:
    """The keystore a rewrite is about to replace, opened to erase it afterwards if another
    name still holds it (a hard link made while the bridge ran); None if there is none."""
    try:
        return os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None  # none yet, or a symlink: the checks at load said so


def _erase_if_linked(fd: int, path: Path) -> None:
    """Zero the replaced file when another hard link keeps it: no older device key may
    survive on disk (SPEC §1). Unlinked (the usual case), it is gone with its name; not
    replaced (the write failed), it is still the keystore and is left alone."""
    try:
        info = os.fstat(fd)
        try:
            current = os.lstat(path).st_ino
        except FileNotFoundError:
            current = None
        if info.st_nlink > 0 and current != info.st_ino:
            os.pwrite(fd, bytes(info.st_size), 0)
            os.fsync(fd)
            emit(
                logging.WARNING, "keystore-link-erased", inode=info.st_ino,
                links=info.st_nlink, why="another name held the replaced keystore: now zeros",
            )  # fmt: skip
    except OSError as exc:
        emit(logging.ERROR, "keystore-link-erase-failed", error=exc.strerror)
    finally:
        os.close(fd)

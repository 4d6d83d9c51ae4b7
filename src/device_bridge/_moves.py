"""Move bundles: a member's device keys from one host's bridge to another's (SPEC §6).

When VM X moves (live migration) from host A to host B, A's bridge seals the current dev_t
of X's pairs into a bundle that only B can open, in the period t it was made:

    {"format": "tvdnet-move", "version": 1, "tvd": ..., "vm": X, "from": A, "to": B, "t": t,
     "id": "<32 hex>", "nonce": "<24 hex>", "ciphertext": "<hex>"}

    key        = HMAC-SHA256(T_t, "tvdnet.v1.move" || pc(tvd, A, B) || lp(X) || u64(t) || id)
    ciphertext = AES-256-GCM(key, nonce, {"device_keys": [{"pair": [lo, hi], "dev": hex}]},
                             associated data = the canonical JSON of every field but the
                             nonce and the ciphertext)

T_t is the pair of hosts' transfer key, random at provisioning and evolved with the device
keys every period (`Keystore.evolve_to`), so a bundle opens only in period t: one captured
and kept opens nothing once both hosts have moved on, whatever is stolen from them later
(the augmented claim of SPEC §1 holds for bundles too). B refuses a bundle it has taken in
before (its id is recorded in its keystore), one of another TVD or for another host, one
that does not authenticate, and one whose period is not B's current one. Opening changes
nothing; the bridge applies an opened bundle in one step (`Bridge.move_in`).

Sans-I/O: bytes in, bytes out; the bridge reads and writes the files.
"""

from __future__ import annotations

import hmac
import json
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tvdnet.core.constants import KEY_LEN
from tvdnet.core.ids import is_valid_id, lp, pair_context, u64
from tvdnet.core.scheme import Pair

from .errors import MoveError

__all__ = ["MOVE_FORMAT", "OpenedBundle", "open_bundle", "peek_bundle", "seal_bundle"]

MOVE_FORMAT: Final = "tvdnet-move"
_LABEL: Final = b"tvdnet.v1.move"
_ID_LEN: Final = 16
_NONCE_LEN: Final = 12
_HEADER_FIELDS: Final = ("format", "version", "tvd", "vm", "from", "to", "t", "id")
MAX_BUNDLE_BYTES: Final = 16 << 20  # 65,536 pairs and then some


@dataclass(frozen=True, slots=True)
class BundleHeader:
    tvd: str
    vm: str
    source: str
    target: str
    t: int
    id: str


@dataclass(slots=True)
class OpenedBundle:
    """An authenticated bundle: X's pairs and their dev_t. `erase()` when done."""

    header: BundleHeader
    keys: dict[Pair, bytearray]

    def __repr__(self) -> str:
        h = self.header
        return f"<OpenedBundle {h.vm} {h.source}->{h.target} t={h.t} pairs={len(self.keys)}>"

    def erase(self) -> None:
        for key in self.keys.values():
            key[:] = bytes(len(key))
        self.keys.clear()


def _bundle_key(transfer_t: bytes | bytearray, header: BundleHeader) -> bytes:
    message = (
        _LABEL
        + pair_context(header.tvd, header.source, header.target)
        + lp(header.vm)
        + u64(header.t)
        + bytes.fromhex(header.id)
    )
    return hmac.digest(transfer_t, message, "sha256")


def _aad(header: BundleHeader) -> bytes:
    fields = _header_fields(header)
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def _header_fields(header: BundleHeader) -> dict[str, Any]:
    return {
        "format": MOVE_FORMAT,
        "version": 1,
        "tvd": header.tvd,
        "vm": header.vm,
        "from": header.source,
        "to": header.target,
        "t": header.t,
        "id": header.id,
    }


def seal_bundle(
    *,
    tvd: str,
    vm: str,
    source: str,
    target: str,
    t: int,
    transfer_t: bytes | bytearray,
    keys: Mapping[Pair, bytes | bytearray],
) -> bytes:
    """The bundle of `vm`'s pairs (`keys`: dev_t of each) from host `source` to `target`."""
    header = BundleHeader(tvd, vm, source, target, t, secrets.token_bytes(_ID_LEN).hex())
    payload = json.dumps(
        {
            "device_keys": [
                {"pair": [pair.lo, pair.hi], "dev": key.hex()} for pair, key in keys.items()
            ]
        },
        separators=(",", ":"),
    ).encode()
    nonce = secrets.token_bytes(_NONCE_LEN)
    ciphertext = AESGCM(_bundle_key(transfer_t, header)).encrypt(nonce, payload, _aad(header))
    document = {**_header_fields(header), "nonce": nonce.hex(), "ciphertext": ciphertext.hex()}
    return (json.dumps(document, indent=1) + "\n").encode()


def peek_bundle(data: bytes) -> tuple[BundleHeader, bytes, bytes]:
    """The bundle's unauthenticated header, nonce and ciphertext; MoveError if malformed."""
    if len(data) > MAX_BUNDLE_BYTES:
        raise MoveError(f"not a move bundle: over {MAX_BUNDLE_BYTES} bytes")
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise MoveError("not a move bundle: not JSON") from None
    if not isinstance(document, dict) or document.get("format") != MOVE_FORMAT:
        raise MoveError(f'not a move bundle (no "format": "{MOVE_FORMAT}")')
    if document.get("version") != 1:
        raise MoveError("unsupported move bundle version (this bridge reads version 1)")
    for name in ("tvd", "vm", "from", "to"):
        if not is_valid_id(document.get(name)):
            raise MoveError(f'corrupted move bundle: "{name}" must be a valid id')
    t = document.get("t")
    if type(t) is not int or t < 1:
        raise MoveError('corrupted move bundle: "t" must be a period')
    try:
        bundle_id = bytes.fromhex(document["id"])
        nonce = bytes.fromhex(document["nonce"])
        ciphertext = bytes.fromhex(document["ciphertext"])
    except (KeyError, TypeError, ValueError):
        raise MoveError('corrupted move bundle: "id", "nonce" and "ciphertext" are hex') from None
    if len(bundle_id) != _ID_LEN or len(nonce) != _NONCE_LEN:
        raise MoveError('corrupted move bundle: "id" or "nonce" has the wrong length')
    header = BundleHeader(
        document["tvd"], document["vm"], document["from"], document["to"], t, bundle_id.hex()
    )
    return header, nonce, ciphertext


def open_bundle(data: bytes, transfer_t: bytes | bytearray, members: Iterable[str]) -> OpenedBundle:
    """Authenticate and decrypt a bundle whose header the caller has checked (`peek_bundle`);
    every pair must be the moving VM's with a member of `members`."""
    header, nonce, ciphertext = peek_bundle(data)
    try:
        payload = AESGCM(_bundle_key(transfer_t, header)).decrypt(nonce, ciphertext, _aad(header))
    except InvalidTag:
        raise MoveError(
            f"the bundle does not authenticate: not made by host {header.source!r} for this "
            "host in this period, or altered; nothing was changed"
        ) from None
    known = set(members)
    keys: dict[Pair, bytearray] = {}
    try:
        entries = json.loads(payload)["device_keys"]
        for i, entry in enumerate(entries):
            lo, hi = entry["pair"]
            if header.vm not in (lo, hi) or lo == hi or not {lo, hi} <= known:
                raise MoveError(
                    f"the bundle's pair {i} is not one of {header.vm}'s with a member of the TVD"
                )
            key = bytes.fromhex(entry["dev"])
            if len(key) != KEY_LEN:
                raise MoveError(f"the bundle's pair {i} has a key of the wrong length")
            keys[Pair.of(lo, hi)] = bytearray(key)
    except MoveError:
        OpenedBundle(header, keys).erase()
        raise
    except (KeyError, TypeError, ValueError):
        OpenedBundle(header, keys).erase()
        raise MoveError("corrupted move bundle: its contents are not a list of pairs") from None
    return OpenedBundle(header, keys)

"""SPEC §4 wire format: frame encoding and parsing, traffic keys, DATA sealing.

Nothing here keeps state between calls except `FrameReader`, which only splits a byte
stream into msgpack objects and enforces the frame size limit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import msgpack
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .constants import FRAME_LIMIT, INSTANCE_LEN, KEY_LEN, NONCE_LEN, PROTOCOL_VERSION
from .errors import FrameError
from .ids import lp, u64
from .reader import MsgpackReader, StreamDecodeError

HELLO: Final = 0
DATA: Final = 1
REJECT: Final = 2
CLOSE: Final = 3

# Inner messages [kind, seq, body] (SPEC §4); a receiver ignores a kind it does not know.
MSG: Final = 0
ACK: Final = 1
KEY: Final = 2  # [2, t, nil]: "I hold period t's key for our pair"
FIRST_EXTENSION_KIND: Final = 16

# CLOSE reasons (SPEC §4).
NOT_A_MEMBER: Final = "not-a-member"
BAD_HELLO: Final = "bad-hello"
VERSION: Final = "version"
TOO_LARGE: Final = "too-large"
BAD_FRAME: Final = "bad-frame"
TIMEOUT: Final = "timeout"

_TRAFFIC_LABEL: Final = b"tvdnet.v1.traffic"
_NONCE_PREFIX: Final = bytes(4)


@dataclass(slots=True)
class Hello:
    tvd: str
    sender: str
    receiver: str
    nonce: bytes
    instance: bytes


@dataclass(slots=True)
class Data:
    t: int
    n: int
    ciphertext: bytes


@dataclass(slots=True)
class Reject:
    t: int
    n: int
    reason: str
    current_t: int | None


@dataclass(slots=True)
class Close:
    reason: str


Frame = Hello | Data | Reject | Close


# --------------------------------------------------------------------------- encoding


def encode_hello(tvd: str, sender: str, receiver: str, nonce: bytes, instance: bytes) -> bytes:
    return msgpack.packb([HELLO, PROTOCOL_VERSION, tvd, sender, receiver, nonce, instance])


def encode_reject(t: int, n: int, reason: str, current_t: int | None) -> bytes:
    return msgpack.packb([REJECT, t, n, reason, current_t])


def encode_close(reason: str) -> bytes:
    return msgpack.packb([CLOSE, reason])


def data_nonce(n: int) -> bytes:
    """The AES-GCM nonce of DATA frame n: 00 00 00 00 || u64(n)."""
    return _NONCE_PREFIX + u64(n)


def traffic_key(
    period_key: bytes | bytearray,
    tvd: str,
    sender: str,
    receiver: str,
    t: int,
    nonce_sender: bytes,
    nonce_receiver: bytes,
    instance_sender: bytes,
    instance_receiver: bytes,
) -> bytes:
    """The key of direction sender -> receiver in period t on one connection (SPEC §4)."""
    if len(period_key) != KEY_LEN:
        raise ValueError("a period key is 32 bytes")
    info = (
        _TRAFFIC_LABEL
        + lp(tvd)
        + lp(sender)
        + lp(receiver)
        + u64(t)
        + instance_sender
        + instance_receiver
    )
    hkdf = HKDF(algorithm=SHA256(), length=KEY_LEN, salt=nonce_sender + nonce_receiver, info=info)
    return hkdf.derive(bytes(period_key))


def new_aead(key: bytes) -> AESGCM:
    return AESGCM(key)


def seal_data(aead: AESGCM, t: int, n: int, plaintext: bytes) -> bytes:
    """One DATA frame [1, t, n, ciphertext]; associated data msgpack([1, t, n])."""
    out = bytearray()
    seal_data_into(out, aead, t, n, plaintext, msgpack.Packer())
    return bytes(out)


def seal_data_into(
    out: bytearray, aead: AESGCM, t: int, n: int, plaintext: bytes, packer: msgpack.Packer
) -> None:
    """Append the DATA frame of `plaintext` to `out`."""
    ciphertext = aead.encrypt(data_nonce(n), plaintext, packer.pack([DATA, t, n]))
    out += packer.pack([DATA, t, n, ciphertext])


def open_data(
    aead: AESGCM, t: int, n: int, ciphertext: bytes, packer: msgpack.Packer | None = None
) -> bytes:
    """The plaintext of a DATA frame; raises cryptography's InvalidTag if it is not authentic."""
    pack = packer.pack if packer is not None else msgpack.packb
    return aead.decrypt(data_nonce(n), ciphertext, pack([DATA, t, n]))


# --------------------------------------------------------------------------- parsing


def _is_int(value: object) -> bool:
    # msgpack booleans arrive as bool, a subclass of int: they are not integers here.
    return type(value) is int


def parse_frame(obj: object) -> Frame:
    """Check one decoded msgpack object against SPEC §4; raise FrameError with the CLOSE reason."""
    if type(obj) is not list or not obj or not _is_int(obj[0]):
        raise FrameError(BAD_FRAME, "a frame must be an array that starts with its type")
    kind = obj[0]
    if kind == DATA:
        if (
            len(obj) != 4
            or not _is_int(obj[1])
            or not _is_int(obj[2])
            or obj[2] < 0
            or type(obj[3]) is not bytes
        ):
            raise FrameError(BAD_FRAME, "DATA must be [1, t, n >= 0, ciphertext(bin)]")
        return Data(obj[1], obj[2], obj[3])
    if kind == HELLO:
        return _parse_hello(obj)
    if kind == REJECT:
        if (
            len(obj) != 5
            or not _is_int(obj[1])
            or not _is_int(obj[2])
            or obj[2] < 0
            or type(obj[3]) is not str
            or not (obj[4] is None or _is_int(obj[4]))
        ):
            raise FrameError(BAD_FRAME, "REJECT must be [2, t, n, reason(str), current_t]")
        return Reject(obj[1], obj[2], obj[3], obj[4])
    if kind == CLOSE:
        if len(obj) != 2 or type(obj[1]) is not str:
            raise FrameError(BAD_FRAME, "CLOSE must be [3, reason(str)]")
        return Close(obj[1])
    raise FrameError(BAD_FRAME, f"unknown frame type {kind}")


def _parse_hello(obj: list[object]) -> Hello:
    if len(obj) >= 2 and _is_int(obj[1]) and obj[1] != PROTOCOL_VERSION:
        raise FrameError(VERSION, f"HELLO of protocol version {obj[1]}, this node speaks 1")
    if len(obj) != 7 or obj[1] != PROTOCOL_VERSION or not _is_int(obj[1]):
        raise FrameError(BAD_HELLO, "HELLO must be [0, 1, tvd, sender, receiver, nonce, instance]")
    _, _, tvd, sender, receiver, nonce, instance = obj
    if type(tvd) is not str or type(sender) is not str or type(receiver) is not str:
        raise FrameError(BAD_HELLO, "HELLO tvd, sender and receiver must be strings")
    if type(nonce) is not bytes or len(nonce) != NONCE_LEN:
        raise FrameError(BAD_HELLO, f"HELLO nonce must be {NONCE_LEN} bytes of bin")
    if type(instance) is not bytes or len(instance) != INSTANCE_LEN:
        raise FrameError(BAD_HELLO, f"HELLO instance must be {INSTANCE_LEN} bytes of bin")
    return Hello(tvd, sender, receiver, nonce, instance)


def printable(text: str, limit: int = 64) -> str:
    """How a string that arrived unauthenticated may be logged (SPEC §4): control
    characters escaped, at most `limit` characters, so that it cannot forge a log line."""
    escaped = "".join(
        c if c.isprintable() and c != "\\" else repr(c)[1:-1] for c in text[: limit + 1]
    )
    return escaped if len(escaped) <= limit else escaped[: limit - 1] + "…"


def new_reader() -> MsgpackReader:
    """A reader for a peer connection's byte stream: frames of at most FRAME_LIMIT bytes."""
    return MsgpackReader(FRAME_LIMIT)


def stream_error(exc: StreamDecodeError) -> FrameError:
    """The CLOSE reason for what the stream reader refused."""
    return FrameError(TOO_LARGE if exc.too_large else BAD_FRAME, exc.detail)

"""SPEC §2: ids, lp(), u64() and the pair context."""

import re
from typing import Final

from .errors import InvalidId

_ID_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")
_U64_LIMIT: Final = 1 << 64


def check_id(value: object, where: str) -> str:
    """Return `value` if it is a valid TVD or member id, else raise InvalidId naming `where`.

    The message says what is wrong and where, never the value itself: callers pass ids
    from files and the network, and a key pasted into the wrong field must not be echoed.
    """
    if not isinstance(value, str):
        raise InvalidId(f"{where}: an id must be a string, not {type(value).__name__}")
    if _ID_RE.fullmatch(value) is None:
        raise InvalidId(
            f"{where}: an id must be 1 to 64 characters from [A-Za-z0-9._-] "
            f"(this one has {len(value)} characters)"
        )
    return value


def is_valid_id(value: object) -> bool:
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None


def id_order_key(member: str) -> bytes:
    """Ids compare as UTF-8 bytes (SPEC §2)."""
    return member.encode()


def lp(s: str) -> bytes:
    """2-byte big-endian length, then the UTF-8 bytes."""
    raw = s.encode()
    return len(raw).to_bytes(2, "big") + raw


def u64(t: int) -> bytes:
    if not 0 <= t < _U64_LIMIT:
        raise ValueError(f"{t} does not fit an unsigned 64-bit integer")
    return t.to_bytes(8, "big")


def sorted_pair(a: str, b: str) -> tuple[str, str]:
    """The pair {a, b} as (lo, hi), sorted bytewise."""
    return (a, b) if a.encode() < b.encode() else (b, a)


def pair_context(tvd: str, a: str, b: str) -> bytes:
    """pc(tvd, a, b) = lp(tvd) || lp(lo) || lp(hi); the pair is unordered."""
    lo, hi = sorted_pair(a, b)
    return lp(tvd) + lp(lo) + lp(hi)

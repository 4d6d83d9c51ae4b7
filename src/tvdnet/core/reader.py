"""Splitting a byte stream of concatenated msgpack objects, with a size limit per object."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

import msgpack

from .errors import StreamDecodeError

__all__ = ["UNPACK_ERRORS", "MsgpackReader", "StreamDecodeError"]

# What msgpack raises on bad input: malformed data, invalid UTF-8, deep nesting,
# unhashable map keys, bad extension payloads.
UNPACK_ERRORS: Final = (ValueError, TypeError, msgpack.UnpackException)


class MsgpackReader:
    """Yields the msgpack objects of a byte stream, refusing any larger than `limit` bytes.

    Bytes are fed in pieces small enough that the unconsumed buffer never holds more than
    limit + 1 bytes: an object still incomplete at that size is too large, whatever its
    remaining bytes would have been, and memory stays bounded.

    A msgpack Unpacker weighs about 40 KiB (its parse stack), so a reader holds one only
    while an object is incomplete: an idle connection of a hub with a thousand peers
    costs next to nothing. Making one again costs well under a microsecond.
    """

    __slots__ = ("_fed", "_limit", "_start", "_unpacker")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._unpacker: msgpack.Unpacker | None = None
        self._fed = 0  # stream offset of the end of what the current Unpacker was fed
        self._start = 0  # stream offset where the current, incomplete object began

    def reset(self) -> None:
        """Discard whatever was partly read (SPEC §5: after EOF, HUP, EIO or garbage)."""
        self._unpacker = None
        self._fed = self._start = 0

    @property
    def buffered(self) -> int:
        """Bytes received that do not yet form a whole object."""
        # Not fed - tell(): msgpack's tell() moves into an incomplete object as it parses.
        return self._fed - self._start

    def feed(self, data: bytes | bytearray) -> Iterator[object]:
        """Yield every object completed by `data`; raise StreamDecodeError at the first bad one."""
        limit = self._limit
        unpacker = self._unpacker
        if unpacker is None:
            unpacker = self._unpacker = msgpack.Unpacker(
                raw=False,
                strict_map_key=True,
                use_list=True,
                max_buffer_size=limit + 1,
                read_size=min(limit + 1, 65536),
            )
            self._fed = self._start = 0
        view = memoryview(data)
        while view:
            room = limit + 1 - self.buffered
            piece, view = view[:room], view[room:]
            unpacker.feed(piece)
            self._fed += len(piece)
            while True:
                try:
                    obj = unpacker.unpack()
                except msgpack.OutOfData:
                    break
                except UNPACK_ERRORS as exc:
                    self.reset()
                    raise StreamDecodeError(
                        False, f"undecodable msgpack ({type(exc).__name__})"
                    ) from None
                end = unpacker.tell()
                size = end - self._start
                self._start = end
                if size > limit:
                    self.reset()
                    raise StreamDecodeError(True, f"{size} bytes, over the {limit}-byte limit")
                yield obj
            if self.buffered > limit:
                self.reset()
                raise StreamDecodeError(True, f"more than the {limit}-byte limit")
        if self._fed == self._start:
            self.reset()  # at an object boundary: nothing to keep

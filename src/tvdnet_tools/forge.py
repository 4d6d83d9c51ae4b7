"""Frames made by hand, as an attacker holding stolen keys would make them (SPEC §4).

For `tvdnet demo` (a message forged under an expired period key, refused) and the
hostile-input tests. Applications never need this module.

- `period_key_from(dev, dev_period, comp_key, tvd, a, b, t)`: SK_t of pair {a, b},
  computed from scratch the way the bridge (U*) and the node (U) would.
- `RawPeer`: a TCP connection to a node, driven frame by frame.
"""

from __future__ import annotations

import secrets
from typing import Any

import msgpack
import trio

from tvdnet.core import frames
from tvdnet.core.errors import NoSuchPeriod
from tvdnet.core.scheme import KeyBytes, computer_update, device_update, evolve_device_key

__all__ = ["RawPeer", "period_key_from"]


def period_key_from(
    dev: KeyBytes, dev_period: int, comp_key: KeyBytes, tvd: str, a: str, b: str, t: int
) -> bytes:
    """SK_t of pair {a, b} from its device key of period `dev_period` <= t and its
    computer master key: U* (evolve, then the partial key), then U."""
    if t < dev_period:
        raise NoSuchPeriod(f"a device key of period {dev_period} cannot reach period {t}", t)
    dev_t = bytes(dev)
    for period in range(dev_period, t):
        dev_t = evolve_device_key(dev_t, tvd, a, b, period)
    partial = device_update(dev_t, tvd, a, b, t)
    return computer_update(partial, comp_key, tvd, a, b, t)


class RawPeer:
    """A hand-driven TCP connection to a node, speaking SPEC §4 frames."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.unpacker = msgpack.Unpacker(raw=False)
        self.nonce = secrets.token_bytes(16)
        self.instance = secrets.token_bytes(8)
        self.n = 0  # the next DATA frame number this side sends
        self.peer_hello: list[Any] | None = None

    def __repr__(self) -> str:
        return f"<RawPeer n={self.n}>"

    @classmethod
    async def connect(cls, port: int, host: str = "127.0.0.1") -> RawPeer:
        return cls(await trio.open_tcp_stream(host, port))

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def hello(self, tvd: str, sender: str, receiver: str) -> None:
        """A HELLO claiming to come from `sender` (HELLO is not authenticated)."""
        await self.send(frames.encode_hello(tvd, sender, receiver, self.nonce, self.instance))

    async def frame(self, timeout: float = 30.0) -> list[Any] | None:
        """The next frame from the node, or None at EOF; the node's HELLO is remembered."""
        while True:
            for obj in self.unpacker:
                if obj[0] == frames.HELLO and self.peer_hello is None:
                    self.peer_hello = obj
                return list(obj)
            with trio.fail_after(timeout):
                data = await self.stream.receive_some()
            if not data:
                return None
            self.unpacker.feed(data)

    async def until(self, kind: int, timeout: float = 30.0) -> list[Any] | None:
        """The next frame of type `kind` (HELLO, DATA, REJECT, CLOSE), or None at EOF."""
        while (frame := await self.frame(timeout)) is not None:
            if frame[0] == kind:
                return frame
        return None

    def data(self, period_key: bytes, tvd: str, me: str, peer: str, t: int, inner: Any) -> bytes:
        """The next DATA frame, of period t, sealed under `period_key`, holding `inner`
        (a list of [kind, seq, body]); needs the node's HELLO (`frame()` reads it)."""
        assert self.peer_hello is not None, "read the node's HELLO first"
        key = frames.traffic_key(
            period_key, tvd, me, peer, t,
            self.nonce, self.peer_hello[5], self.instance, self.peer_hello[6],
        )  # fmt: skip
        frame = frames.seal_data(frames.new_aead(key), t, self.n, msgpack.packb(inner))
        self.n += 1
        return frame

    async def aclose(self) -> None:
        await self.stream.aclose()

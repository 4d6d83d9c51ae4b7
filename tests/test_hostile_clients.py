"""Issue 18: hostile clients speaking SPEC §4 and §5 raw at a running node and at a bridge.

Strangers with bad HELLOs, malformed, oversized and random frames, floods and slow
connections (§4); a holder of a pair's period key sending authentic frames with hostile
contents (§4); a hostile guest on a bridge's key channel and a fake bridge on a node's
(§5). Whatever they send, the node and the bridge keep serving their real peers, and no
log holds a traceback or any key (in hex, base64 or as a bytes repr).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import logging
import math
import random
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, Final
from unittest.mock import ANY

import msgpack
import pytest
import trio
import trio.testing
from bridge_fakes import (
    SCHEDULE,
    FakeGuest,
    Reference,
    clock_at,
    partials_bytes,
    start_of,
    stream_config,
)
from nodes import Harness

from device_bridge import StreamPort, VmStatus, open_bridge
from tvdnet import (
    KeyChannelSpec,
    Node,
    NodeConfig,
    SendTimeout,
    WallClock,
    channel,
    open_node,
)
from tvdnet.core import frames
from tvdnet.core.constants import CHANNEL_LIMIT, FRAME_LIMIT, HANDSHAKE_TIMEOUT, IDLE_TIMEOUT
from tvdnet.core.scheme import Pair, computer_update, device_update, evolve_device_key, generate
from tvdnet_tools import forge

A, B, C = "vm-a", "vm-b", "vm-c"
CLOSE_REASONS: Final = {
    frames.NOT_A_MEMBER,
    frames.BAD_HELLO,
    frames.VERSION,
    frames.TOO_LARGE,
    frames.BAD_FRAME,
    frames.TIMEOUT,
}
BROKEN: Final = (trio.BrokenResourceError, trio.ClosedResourceError)
U64_MAX: Final = (1 << 64) - 1
I64_MIN: Final = -(1 << 63)
# Text meant to forge log lines or the terminal: escapes, CR/LF, NUL, a fake event.
HOSTILE_TEXT: Final = "\x1b[2J\x1b[31mevil\r\nrefused cause=forged peer=vm-b\x00\u202e"


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


# --------------------------------------------------------------------------- logs and keys


def key_forms(key: bytes) -> set[str]:
    """The ways a key could reach a log line: hex (either case), base64, a bytes repr."""
    return {key.hex(), key.hex().upper(), base64.b64encode(key).decode(), repr(key)[2:-1]}


def computer_key(h: Harness, vm: str, peer: str) -> bytes:
    document = json.loads((h.tmp / f"{vm}.keys").read_text())
    return bytes.fromhex(document["keys"][peer])


def harness_secrets(h: Harness, last_period: int) -> set[str]:
    """Every computer master key of the key files and every dev_t, partial_t and SK_t of
    every pair up to `last_period`, in every form of `key_forms`."""
    keys: list[bytes] = []
    for i, a in enumerate(h.members):
        for b in h.members[i + 1 :]:
            pair = Pair.of(a, b)
            comp = computer_key(h, a, b)
            assert computer_key(h, b, a) == comp
            keys.append(comp)
            dev = h._dev_1[pair]  # nodes.Harness keeps dev_1 for tests that forge frames
            for t in range(1, last_period + 1):
                if t > 1:
                    dev = evolve_device_key(dev, h.tvd, pair.lo, pair.hi, t - 1)
                partial_t = device_update(dev, h.tvd, pair.lo, pair.hi, t)
                period_key = h.period_key(a, b, t)
                assert computer_update(partial_t, comp, h.tvd, a, b, t) == period_key
                keys += [dev, partial_t, period_key]
    return {form for key in keys for form in key_forms(key)}


def assert_clean_logs(
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str], secrets: set[str]
) -> None:
    """No traceback and no secret in any log record, nor on stdout or stderr; and no
    record that a peer's text could split into forged lines."""
    records = caplog.records
    assert [r.getMessage() for r in records if r.exc_info or r.stack_info] == []
    out, err = capfd.readouterr()
    texts = [caplog.text, out, err, *(r.getMessage() for r in records)]
    assert [text for text in texts if "Traceback" in text] == []
    assert sorted({secret for secret in secrets for text in texts if secret in text}) == []
    forged = [r.getMessage() for r in records if any(c in r.getMessage() for c in "\r\n\x1b\0")]
    assert forged == []


def stat(node: Node, name: str) -> int:
    return node.stats.get(name, 0)


async def both_ways(x: Node, y: Node, tag: str) -> None:
    """x and y still exchange a message each way."""
    with trio.fail_after(60):
        await x.send(y.vm, f"{tag}: {x.vm} to {y.vm}")
        got = await y.receive()
        assert (got.sender, got.body) == (x.vm, f"{tag}: {x.vm} to {y.vm}")
        await y.send(x.vm, f"{tag}: {y.vm} to {x.vm}")
        got = await x.receive()
        assert (got.sender, got.body) == (y.vm, f"{tag}: {y.vm} to {x.vm}")


async def send_quietly(stream: trio.abc.SendStream, data: bytes) -> None:
    """Send what the other side may hang up on before it has read it all."""
    try:
        await stream.send_all(data)
    except BROKEN:
        pass


# --------------------------------------------------------------------------- §4 strangers


def pack(*objs: object) -> bytes:
    return b"".join(msgpack.packb(obj) for obj in objs)


def hello_list(
    rng: random.Random,
    *,
    tvd: object = "t1",
    sender: object = B,
    receiver: object = A,
    version: object = 1,
    nonce: object = None,
    instance: object = None,
) -> list[object]:
    """A HELLO to vm-a as a list, valid unless a field is given."""
    nonce = rng.randbytes(16) if nonce is None else nonce
    instance = rng.randbytes(8) if instance is None else instance
    return [frames.HELLO, version, tvd, sender, receiver, nonce, instance]


@dataclasses.dataclass
class Reply:
    """What a node sent on one raw connection, and whether it hung up."""

    frames: list[list[Any]]
    eof: bool

    @property
    def said_hello(self) -> bool:
        return bool(self.frames) and self.frames[0][0] == frames.HELLO

    @property
    def verdict(self) -> list[list[Any]]:
        """The REJECT and CLOSE frames (HELLO and DATA are the node's own handshake)."""
        return [f for f in self.frames if f[0] in (frames.REJECT, frames.CLOSE)]


async def read_reply(stream: trio.SocketStream, patience: float) -> Reply:
    """Every frame until EOF, or until `patience` mock seconds passed."""
    unpacker = msgpack.Unpacker(raw=False)
    got: list[list[Any]] = []
    eof = False
    with trio.move_on_after(patience):
        while True:
            try:
                data = await stream.receive_some(1 << 16)
            except trio.BrokenResourceError:
                data = b""
            if not data:
                eof = True
                break
            unpacker.feed(data)
            for obj in unpacker:
                frames.parse_frame(obj)  # what the node sends is a valid frame (or this raises)
                got.append(obj)
    return Reply(got, eof)


async def raw_exchange(
    port: int, payload: bytes, *, patience: float = 3 * IDLE_TIMEOUT, eof: bool = False
) -> Reply:
    """One raw connection to a node: send `payload` (then EOF if asked), and read what
    the node says until it hangs up."""
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        if eof:
            await send_quietly(stream, payload)
            with contextlib.suppress(*BROKEN):
                await stream.send_eof()
            return await read_reply(stream, patience)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_quietly, stream, payload)
            return await read_reply(stream, patience)


@dataclasses.dataclass
class Case:
    name: str
    payload: bytes
    verdict: list[list[Any]]  # the REJECT and CLOSE frames the node answers with
    said_hello: bool = False  # the node's HELLO first (its output before a CLOSE is dropped)
    eof: bool = False  # the client half-closes after sending


def scripted_cases(rng: random.Random) -> list[Case]:
    good = hello_list(rng)
    bad_frame = [[frames.CLOSE, frames.BAD_FRAME]]
    bad_hello = [[frames.CLOSE, frames.BAD_HELLO]]
    not_member = [[frames.CLOSE, frames.NOT_A_MEMBER]]
    version = [[frames.CLOSE, frames.VERSION]]
    too_large = [[frames.CLOSE, frames.TOO_LARGE]]
    timeout = [[frames.CLOSE, frames.TIMEOUT]]
    long_hostile = HOSTILE_TEXT * 300

    def after_hello(*objs: object) -> bytes:
        return pack(good, *objs)

    return [
        Case("garbage", b"\xc1 this is not msgpack \xff\xfe", bad_frame),
        Case("a truncated HELLO, then silence", msgpack.packb(good)[:20], timeout),
        Case("a truncated HELLO, then EOF", msgpack.packb(hello_list(rng))[:20], [], eof=True),
        Case("a lone array header, then silence", b"\x97", timeout),
        Case("a str header claiming 4 GiB, then silence", b"\xdb\xff\xff\xff\xff", timeout),
        Case("an unknown frame type", pack([9, 1, 2]), bad_frame),
        Case("a negative frame type", pack([-1, 1]), bad_frame),
        Case("a frame type of 2**64-1", pack([U64_MAX]), bad_frame),
        Case("a boolean frame type", pack([True, 1]), bad_frame),
        Case("an empty array", pack([]), bad_frame),
        Case("a map, not an array", pack({"type": 0}), bad_frame),
        Case("a bare integer", pack(0), bad_frame),
        Case("a map with an int key", b"\x81\x01\x02", bad_frame),
        Case("HELLO: tvd an int", pack(hello_list(rng, tvd=5)), bad_hello),
        Case("HELLO: sender bin", pack(hello_list(rng, sender=b"vm-b")), bad_hello),
        Case("HELLO: receiver nil", pack(hello_list(rng, receiver=None)), bad_hello),
        Case("HELLO: nonce a str", pack(hello_list(rng, nonce="x" * 16)), bad_hello),
        Case("HELLO: nonce 15 bytes", pack(hello_list(rng, nonce=bytes(15))), bad_hello),
        Case("HELLO: nonce 17 bytes", pack(hello_list(rng, nonce=bytes(17))), bad_hello),
        Case("HELLO: instance 7 bytes", pack(hello_list(rng, instance=bytes(7))), bad_hello),
        Case("HELLO: instance empty", pack(hello_list(rng, instance=b"")), bad_hello),
        Case("HELLO: 6 fields", pack(good[:6]), bad_hello),
        Case("HELLO: 8 fields", pack([*good, 0]), bad_hello),
        Case("HELLO: 1 field", pack([0]), bad_hello),
        Case("HELLO: version 2", pack(hello_list(rng, version=2)), version),
        Case("HELLO: version 2**64-1", pack(hello_list(rng, version=U64_MAX)), version),
        Case("HELLO: version '1'", pack(hello_list(rng, version="1")), bad_hello),
        Case("HELLO: version true", pack(hello_list(rng, version=True)), bad_hello),
        Case("HELLO: unknown TVD", pack(hello_list(rng, tvd="t2")), not_member),
        Case("HELLO: unknown member", pack(hello_list(rng, sender="vm-x")), not_member),
        Case("HELLO: hostile sender", pack(hello_list(rng, sender=long_hostile)), not_member),
        Case("HELLO: hostile TVD", pack(hello_list(rng, tvd=long_hostile)), not_member),
        Case("HELLO: from vm-a itself", pack(hello_list(rng, sender=A)), bad_hello),
        Case("HELLO: to vm-b", pack(hello_list(rng, receiver=B)), bad_hello),
        Case("HELLO: to nobody", pack(hello_list(rng, receiver="")), bad_hello),
        Case("DATA before HELLO", pack([frames.DATA, 1, 0, bytes(40)]), bad_frame),
        Case("REJECT before HELLO", pack([frames.REJECT, 1, 0, "unknown", None]), bad_frame),
        Case("CLOSE with a hostile reason", pack([frames.CLOSE, long_hostile]), []),
        Case("CLOSE of a wrong shape", pack([frames.CLOSE, 1, 2]), bad_frame),
        Case("a second HELLO", after_hello(hello_list(rng)), bad_frame),
        Case("DATA: n = 5", after_hello([frames.DATA, 1, 5, bytes(40)]), bad_frame),
        Case("DATA: n = -1", after_hello([frames.DATA, 1, -1, bytes(40)]), bad_frame),
        Case("DATA: t = 0", after_hello([frames.DATA, 0, 0, bytes(40)]), bad_frame),
        Case("DATA: t = -1", after_hello([frames.DATA, -1, 0, bytes(40)]), bad_frame),
        Case("DATA: t past N", after_hello([frames.DATA, 100_001, 0, bytes(40)]), bad_frame),
        Case("DATA: t = 2**64-1", after_hello([frames.DATA, U64_MAX, 0, bytes(40)]), bad_frame),
        Case("DATA: t a float", after_hello([frames.DATA, 1.0, 0, bytes(40)]), bad_frame),
        Case("DATA: str ciphertext", after_hello([frames.DATA, 1, 0, "x" * 40]), bad_frame),
        Case("DATA: 5 fields", after_hello([frames.DATA, 1, 0, bytes(40), 0]), bad_frame),
        # Not authentic: counted and closed, no REJECT and no CLOSE (SPEC §4).
        Case("DATA: forged ciphertext", after_hello([frames.DATA, 1, 0, bytes(40)]), []),
        Case("DATA: empty ciphertext", after_hello([frames.DATA, 1, 0, b""]), []),
        # A period not begun: REJECT unknown, then the idle timeout.
        Case(
            "DATA of a future period",
            after_hello([frames.DATA, 5_000, 0, bytes(40)]),
            [[frames.REJECT, 5_000, 0, "unknown", ANY], *timeout],
            said_hello=True,
        ),
        # A stranger's REJECT touches nothing; the connection idles out.
        Case(
            "REJECT after HELLO",
            after_hello([frames.REJECT, 1, 0, long_hostile, 7]),
            timeout,
            said_hello=True,
        ),
        Case("CLOSE after HELLO", after_hello([frames.CLOSE, long_hostile]), []),
        Case("HELLO, then silence", pack(good), timeout, said_hello=True),
        Case(
            "an oversized bin before HELLO",
            b"\x94\x01\x01\x00\xc6" + (2 * FRAME_LIMIT).to_bytes(4, "big") + bytes(FRAME_LIMIT),
            too_large,
        ),
        Case(
            "an oversized str",
            b"\xdb" + (FRAME_LIMIT + 1).to_bytes(4, "big") + b"a" * (FRAME_LIMIT + 1),
            too_large,
        ),
        Case(
            "an oversized DATA frame after HELLO",
            after_hello([frames.DATA, 1, 0, bytes(FRAME_LIMIT)]),
            too_large,
            said_hello=True,
        ),
    ]


def random_text(rng: random.Random) -> str:
    top = 0x110000 if rng.random() < 0.2 else 128
    chars = (chr(rng.randrange(top)) for _ in range(rng.randrange(70)))
    return "".join(c for c in chars if not 0xD800 <= ord(c) < 0xE000)  # no lone surrogates


def random_value(rng: random.Random, depth: int = 0) -> object:
    """A random msgpack value: the odd, the huge and the nested."""
    choice = rng.randrange(14 if depth < 3 else 10)
    if choice == 0:
        return rng.choice([0, 1, -1, 7, 255, 256, 65_536, U64_MAX, I64_MIN, (1 << 32) - 1])
    if choice == 1:
        return rng.randrange(-1000, 100_000)
    if choice == 2:
        return rng.choice([None, True, False])
    if choice == 3:
        return rng.choice([0.0, -0.0, 1.5, math.inf, -math.inf, math.nan, 1e308])
    if choice == 4:
        return rng.randbytes(rng.choice([0, 1, 7, 8, 9, 15, 16, 17, 32, rng.randrange(200)]))
    if choice == 5:
        return random_text(rng)
    if choice == 6:
        return rng.choice(["t1", A, B, C, "vm-x", "", "unknown", "expired", "bad-frame"])
    if choice == 7:
        return msgpack.ExtType(rng.randrange(128), rng.randbytes(rng.randrange(20)))
    if choice in (8, 9):
        return rng.choice([frames.HELLO, frames.DATA, frames.REJECT, frames.CLOSE, 1, 100_000])
    if choice in (10, 11):
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(5))]
    keys = ["type", "t", "n", "", "\x00"]
    return {rng.choice(keys): random_value(rng, depth + 1) for _ in range(rng.randrange(4))}


def random_frame(rng: random.Random) -> bytes:
    """Random msgpack shaped like a frame: a type, then fields of any kind; sometimes a
    real HELLO with one field replaced; sometimes cut short."""
    roll = rng.random()
    obj: object
    if roll < 0.3:
        fields = hello_list(rng)
        fields[rng.randrange(len(fields))] = random_value(rng)
        obj = fields
    elif roll < 0.4:
        obj = random_value(rng)
    else:
        kind = rng.choice([0, 1, 2, 3, 1, 2, 3, rng.randrange(-5, 300), U64_MAX, True, None, "1"])
        obj = [kind, *(random_value(rng) for _ in range(rng.choice([0, 1, 2, 3, 4, 5, 8])))]
    data = msgpack.packb(obj)
    if rng.random() < 0.1:
        data = data[: rng.randrange(len(data) + 1)]
    return data


def random_case(rng: random.Random) -> tuple[bytes, bool]:
    """Bytes for one connection, and whether they open with a valid HELLO."""
    valid_hello = rng.random() < 0.5
    head = pack(hello_list(rng)) if valid_hello else b""
    return head + b"".join(random_frame(rng) for _ in range(rng.randrange(1, 4))), valid_hello


async def test_raw_strangers_at_a_node_find_no_crash_and_no_key_in_the_logs(
    tmp_path: Path,
    clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    rng = random.Random(18)
    h = Harness(tmp_path, [A, B])
    async with h.running():
        await h.wait_keys()
        a, b = h.nodes[A], h.nodes[B]
        await both_ways(a, b, "before")
        port = h.ports[A]

        # 1. Scripted hostile input, each case on its own connection, all at once (fewer
        # than the node's cap of unauthenticated connections: none displaces another).
        cases = scripted_cases(rng)
        assert len(cases) < h.max_unauthenticated
        replies: dict[str, Reply] = {}
        errors_before = stat(a, "protocol_errors")

        async def scripted(case: Case) -> None:
            replies[case.name] = await raw_exchange(port, case.payload, eof=case.eof)

        async with trio.open_nursery() as nursery:
            for case in cases:
                nursery.start_soon(scripted, case)
        for case in cases:
            reply = replies[case.name]
            assert (case.name, reply.eof, reply.said_hello, reply.verdict) == (
                case.name, True, case.said_hello, case.verdict,
            )  # fmt: skip
        closes = sum(f[0] == frames.CLOSE for r in replies.values() for f in r.verdict)
        assert stat(a, "protocol_errors") - errors_before == closes
        assert stat(a, "auth_failures") == 2
        await both_ways(a, b, "after the scripted cases")

        # 2. A flood: 200 connections that send nothing. At the cap the oldest make way;
        # the rest time out. vm-a and vm-b talk on meanwhile.
        displaced_before = stat(a, "connections_displaced")
        flood: list[Reply] = []

        async def silent() -> None:
            flood.append(await raw_exchange(port, b""))

        async with trio.open_nursery() as nursery:
            for _ in range(200):
                nursery.start_soon(silent)
            await trio.testing.wait_all_tasks_blocked()
            await both_ways(a, b, "during the flood")
        assert len(flood) == 200 and all(r.eof for r in flood)
        timed_out = [r for r in flood if r.frames == [[frames.CLOSE, frames.TIMEOUT]]]
        displaced = [r for r in flood if r.frames == []]
        assert len(timed_out) + len(displaced) == 200
        assert len(timed_out) <= h.max_unauthenticated
        assert stat(a, "connections_displaced") - displaced_before == len(displaced) >= 136

        # 3. Slow clients: a HELLO dripped one byte a (mock) second, and a valid HELLO
        # followed by a DATA frame dripped the same way.
        slow: dict[str, tuple[int, Reply]] = {}

        async def drip(name: str, head: bytes, body: bytes) -> None:
            sent = 0
            async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
                await stream.send_all(head)
                with contextlib.suppress(*BROKEN):
                    for byte in body:
                        await stream.send_all(bytes([byte]))
                        sent += 1
                        await trio.sleep(1)
                slow[name] = (sent, await read_reply(stream, 10))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(drip, "hello", b"", msgpack.packb(hello_list(rng)))
            data = msgpack.packb([frames.DATA, 1, 0, bytes(200)])
            nursery.start_soon(drip, "data", msgpack.packb(hello_list(rng)), data)
        sent, reply = slow["hello"]
        assert sent <= HANDSHAKE_TIMEOUT + 1
        assert reply.verdict == [[frames.CLOSE, frames.TIMEOUT]]
        sent, reply = slow["data"]
        assert sent <= IDLE_TIMEOUT + 1 and reply.said_hello
        assert reply.verdict == [[frames.CLOSE, frames.TIMEOUT]]
        await both_ways(a, b, "after the slow clients")

        # 4. Random frames (a fixed seed): 200 connections, at most 16 at a time.
        limiter = trio.CapacityLimiter(16)
        random_replies: list[tuple[bool, Reply]] = []
        errors_before = stat(a, "protocol_errors")

        async def random_one(payload: bytes, valid_hello: bool) -> None:
            async with limiter:
                reply = await raw_exchange(port, payload, patience=2.0)
            random_replies.append((valid_hello, reply))

        async with trio.open_nursery() as nursery:
            for _ in range(200):
                nursery.start_soon(random_one, *random_case(rng))
        assert len(random_replies) == 200
        for valid_hello, reply in random_replies:
            kinds = [f[0] for f in reply.frames]
            assert set(kinds) <= {frames.HELLO, frames.DATA, frames.REJECT, frames.CLOSE}
            # The node's HELLO answers only a valid one, and comes first if at all.
            assert kinds.count(frames.HELLO) == (1 if reply.said_hello else 0)
            assert valid_hello or not reply.said_hello
            closing = [f for f in reply.frames if f[0] == frames.CLOSE]
            assert len(closing) <= 1 and all(f[1] in CLOSE_REASONS for f in closing)
            if closing:
                assert reply.frames[-1] == closing[0] and reply.eof  # nothing after a CLOSE
        closed = [r for _, r in random_replies if r.frames and r.frames[-1][0] == frames.CLOSE]
        assert len(closed) >= 150  # nearly all random input is refused at once
        assert stat(a, "protocol_errors") - errors_before >= len(closed)

        await both_ways(a, b, "at the end")
        assert caplog.text.count("refused cause=") >= 5  # the log was captured
        last = h.schedule.period_at(h.clock.now()) + 1
    assert_clean_logs(caplog, capfd, harness_secrets(h, last))


# --------------------------------------------------------------------------- §4 authentic


@dataclasses.dataclass(eq=False)
class NestedLists:
    """Equal to `depth` lists nested one in another around nil (compared without
    recursion: the test must not hit Python's recursion limit itself)."""

    depth: int

    def __eq__(self, other: object) -> bool:
        for _ in range(self.depth):
            if type(other) is not list or len(other) != 1:
                return False
            other = other[0]
        return other is None

    __hash__ = None  # type: ignore[assignment]


def nested_msg(depth: int) -> bytes:
    """The plaintext [[0, 1, [[[...nil...]]]]] with `depth` lists around nil (msgpack's
    packer refuses such depths, so it is written by hand)."""
    return b"\x91\x93\x00\x01" + b"\x91" * depth + b"\xc0"


@dataclasses.dataclass
class Authentic:
    name: str
    plaintext: bytes
    closed: str | None = None  # the CLOSE reason, or None: the connection stays served
    delivered: list[Any] = dataclasses.field(default_factory=list)
    next_seq: int = 1  # the next message number on the connection, for the probe


def authentic_cases(t: int) -> list[Authentic]:
    bad = frames.BAD_FRAME
    odd_keys = {b"bin": 1, 7: 2, -1: 3, 1.5: 4, None: 5, False: 6, "": 7, U64_MAX: 8}
    exts = [msgpack.ExtType(5, b"x"), msgpack.ExtType(127, b""), msgpack.Timestamp(2**34, 5)]
    many = [[0, seq, seq] for seq in range(1, 20_001)]
    return [
        Authentic("900 nested lists", nested_msg(900), delivered=[NestedLists(900)], next_seq=2),
        Authentic("5000 nested lists", nested_msg(5000), bad),
        Authentic(
            "100000 nested maps", b"\x91\x93\x00\x01" + b"\x81\xa1k" * 100_000 + b"\xc0", bad
        ),
        Authentic(
            "huge ints, and a message number of 2**64-1 (a gap: not delivered)",
            pack([[0, 1, [U64_MAX, I64_MIN, -1]], [0, U64_MAX, "gap"]]),
            delivered=[[U64_MAX, I64_MIN, -1]],
            next_seq=2,
        ),
        Authentic(
            "map keys of bin, int, float, nil, bool",
            pack([[0, 1, odd_keys]]),
            delivered=[odd_keys],
            next_seq=2,
        ),
        Authentic("a map key that is an array", pack([[0, 1, {(1, 2): 3}]]), bad),
        Authentic("a map key that is a map", b"\x91\x93\x00\x01\x81\x81\x01\x02\x03", bad),
        Authentic("a NaN map key", pack([[0, 1, {math.nan: 1}]]), delivered=[ANY], next_seq=2),
        Authentic("ext types and a timestamp", pack([[0, 1, exts]]), delivered=[exts], next_seq=2),
        Authentic("a negative ext type", b"\x91\x93\x00\x01\xd4\x80\x00", bad),
        Authentic("a timestamp of 3 bytes", b"\x91\x93\x00\x01\xc7\x03\xff\x00\x00\x00", bad),
        Authentic(
            "unknown inner kinds, then a message",
            pack(
                [
                    [16, 1, "x"],
                    [255, 0, {"a": [1]}],
                    [U64_MAX, U64_MAX, None],
                    [I64_MIN, -5, b"\0"],
                    [3, 1, None],
                    [0, 1, "after unknown kinds"],
                ]
            ),
            delivered=["after unknown kinds"],
            next_seq=2,
        ),
        Authentic("10000 unknown inner messages", pack([[16, i, None] for i in range(10_000)])),
        Authentic(
            "20000 messages in one frame",
            pack(many),
            delivered=list(range(1, 20_001)),
            next_seq=20_001,
        ),
        Authentic(
            "a body of 1 MB",
            pack([[0, 1, bytes(1_000_000)]]),
            delivered=[bytes(1_000_000)],
            next_seq=2,
        ),
        Authentic("ACK of 2**64-1", pack([[1, U64_MAX, None]])),
        Authentic("ACK of -1", pack([[1, -1, None]]), bad),
        Authentic("ACK of -2**63", pack([[1, I64_MIN, None]]), bad),
        Authentic("ACK with a body", pack([[1, 0, "body"]]), bad),
        Authentic("KEY of 2**64-1", pack([[2, U64_MAX, None]]), bad),
        Authentic("KEY of 0", pack([[2, 0, None]]), bad),
        Authentic("KEY of -1", pack([[2, -1, None]]), bad),
        Authentic("KEY of N + 1", pack([[2, 100_001, None]]), bad),
        Authentic("KEY with a body", pack([[2, t, "body"]]), bad),
        Authentic("KEY of the last period N", pack([[2, 100_000, None]])),
        Authentic("MSG number 0", pack([[0, 0, "zero"]]), bad),
        Authentic("MSG number -1", pack([[0, -1, "minus"]]), bad),
        Authentic("a boolean kind", pack([[True, 1, None]]), bad),
        Authentic("a boolean seq", pack([[0, True, "x"]]), bad),
        Authentic("a float seq", pack([[0, 1.0, "x"]]), bad),
        Authentic("an inner message of two fields", pack([[0, 1]]), bad),
        Authentic("an inner message of four fields", pack([[0, 1, "x", "y"]]), bad),
        Authentic("an inner message that is an int", pack([5]), bad),
        Authentic("a plaintext that is a map", pack({"kind": 0}), bad),
        Authentic("a plaintext that is an empty array", pack([]), bad),
        Authentic("a plaintext that is a str", pack("hello"), bad),
        Authentic("a plaintext that is not msgpack", b"\xc1\xc1", bad),
        Authentic("an empty plaintext", b"", bad),
        Authentic("a plaintext with trailing bytes", pack([[0, 1, "x"]]) + b"\x00", bad),
    ]


class Impostor:
    """A raw connection to a node as a member whose pair key the test holds (vm-c, whose
    node never runs, or vm-b beside its real node): every frame it sends authenticates."""

    def __init__(self, h: Harness, raw: forge.RawPeer, me: str, node: str) -> None:
        self.h, self.raw, self.me, self.node = h, raw, me, node
        self.traffic_keys: list[bytes] = []

    @classmethod
    async def connect(
        cls, h: Harness, me: str, node: str, instance: bytes | None = None
    ) -> Impostor:
        """Connected and past both HELLOs; `instance` to come back as one seen before."""
        raw = await forge.RawPeer.connect(h.ports[node])
        if instance is not None:
            raw.instance = instance
        await raw.hello(h.tvd, me, node)
        first = await raw.frame()
        assert first is not None and first[0] == frames.HELLO
        return cls(h, raw, me, node)

    def _key(self, t: int, *, outbound: bool) -> bytes:
        raw = self.raw
        assert raw.peer_hello is not None
        theirs, their_instance = raw.peer_hello[5], raw.peer_hello[6]
        sender, receiver = (self.me, self.node) if outbound else (self.node, self.me)
        nonces = (raw.nonce, theirs) if outbound else (theirs, raw.nonce)
        instances = (raw.instance, their_instance) if outbound else (their_instance, raw.instance)
        period_key = self.h.period_key(self.me, self.node, t)
        key = frames.traffic_key(period_key, self.h.tvd, sender, receiver, t, *nonces, *instances)
        self.traffic_keys.append(key)
        return key

    async def send(self, t: int, plaintext: bytes) -> None:
        """The next DATA frame, of period t, holding `plaintext` as it is."""
        aead = frames.new_aead(self._key(t, outbound=True))
        frame = frames.seal_data(aead, t, self.raw.n, plaintext)
        self.raw.n += 1
        await send_quietly(self.raw.stream, frame)

    async def inner(self) -> list[Any]:
        """The inner messages of the node's next DATA frame."""
        frame = await self.raw.until(frames.DATA)
        assert frame is not None
        aead = frames.new_aead(self._key(frame[1], outbound=False))
        return list(msgpack.unpackb(frames.open_data(aead, frame[1], frame[2], frame[3])))

    async def message_numbered(self, body: object) -> int:
        """The number under which the node sends `body` here."""
        with trio.fail_after(10):
            while True:
                for kind, number, got in await self.inner():
                    if (kind, got) == (frames.MSG, body):
                        return int(number)


async def test_authentic_frames_with_hostile_contents_leave_the_node_serving(
    tmp_path: Path,
    clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    # vm-c's node never runs: the test plays it, with its keys, against vm-a; vm-b is
    # vm-a's legitimate peer throughout. One long period: no key change mid-case.
    h = Harness(tmp_path, [A, B, C], external=(C,), period_s=1000.0)
    traffic_keys: list[bytes] = []
    async with h.running(), trio.open_nursery() as nursery:
        await h.wait_keys()
        a, b = h.nodes[A], h.nodes[B]
        t = h.schedule.period_at(h.clock.now())
        first_frame = pack([[frames.ACK, 0, None], [frames.KEY, t, None]])
        # A message for vm-c that waits for its acknowledgement all along.
        delivered_to_c = trio.Event()

        async def send_to_c() -> None:
            await a.send(C, "for vm-c", timeout=math.inf)
            delivered_to_c.set()

        nursery.start_soon(send_to_c)
        await both_ways(a, b, "before")
        # An instance of vm-c that will come back once vm-a has had to forget it.
        returning = await Impostor.connect(h, C, A)
        await returning.send(t, first_frame)
        assert await returning.message_numbered("for vm-c") == 1
        await returning.raw.aclose()

        # 1. Hostile contents, each in the first frame of a new connection (a new
        # instance of vm-c each time).
        for case in authentic_cases(t):
            await trio.sleep(0.01)  # instances are evicted least recent first: no ties
            impostor = await Impostor.connect(h, C, A)
            errors_before = stat(a, "protocol_errors")
            await impostor.send(t, case.plaintext)
            if case.closed is not None:
                assert (case.name, await impostor.raw.until(frames.CLOSE)) == (
                    case.name, [frames.CLOSE, case.closed],
                )  # fmt: skip
                assert stat(a, "protocol_errors") - errors_before == 1
            else:
                # Still served: a message sent after the hostile frame is delivered.
                await impostor.send(t, pack([[0, case.next_seq, f"probe {case.name}"]]))
                with trio.fail_after(10):
                    for expected in [*case.delivered, f"probe {case.name}"]:
                        message = await a.receive()
                        assert (case.name, message.sender) == (case.name, C)
                        assert expected == message.body
            assert a.waiting == 0
            assert delivered_to_c.is_set() is False and a.unacknowledged(C) == 1
            await both_ways(a, b, case.name)
            traffic_keys += impostor.traffic_keys
            await impostor.raw.aclose()

        # 2. ACKs of absurd numbers acknowledge nothing (SPEC §4: counted as protocol
        # errors).
        impostor = await Impostor.connect(h, C, A)
        await impostor.send(t, first_frame)
        seq = await impostor.message_numbered("for vm-c")
        errors_before = stat(a, "protocol_errors")
        for absurd in (U64_MAX, 1 << 63, seq + 1):
            await impostor.send(t, pack([[frames.ACK, absurd, None]]))
        await trio.sleep(0.5)
        assert stat(a, "protocol_errors") - errors_before == 3
        assert a.unacknowledged(C) == 1 and not delivered_to_c.is_set()
        traffic_keys += impostor.traffic_keys
        await impostor.raw.aclose()

        # 3. The first instance comes back after dozens of others made vm-a forget its
        # numbering, and says it delivered up to 2**62 - 1: vm-a numbers on from there
        # (SPEC §4), and the right ACK acknowledges the message.
        assert stat(a, "numberings_resumed") == 0
        back = await Impostor.connect(h, C, A, instance=returning.raw.instance)
        await back.send(t, pack([[frames.ACK, (1 << 62) - 1, None], [frames.KEY, t, None]]))
        assert await back.message_numbered("for vm-c") == 1 << 62
        assert stat(a, "numberings_resumed") == 1
        await back.send(t, pack([[frames.ACK, 1 << 62, None]]))
        with trio.fail_after(10):
            await delivered_to_c.wait()
        assert a.unacknowledged(C) == 0
        traffic_keys += returning.traffic_keys + back.traffic_keys
        await back.raw.aclose()

        # 4. A holder of the pair key of vm-a and vm-b poses as new instances of vm-b
        # while the real ones talk: fewer than SPEC §4's 8 kept instances, so every
        # message still arrives exactly once and in order, both ways.
        async def talk(x: Node, y: Node) -> None:
            async with trio.open_nursery() as senders:
                for i in range(30):
                    senders.start_soon(partial(x.send, y.vm, [x.vm, i], timeout=math.inf))
                    await trio.sleep(0.05)

        async def impostors_of_b() -> None:
            for _ in range(6):
                impostor = await Impostor.connect(h, B, A)
                await impostor.send(t, first_frame)
                await trio.sleep(0.2)
                traffic_keys.extend(impostor.traffic_keys)
                await impostor.raw.aclose()

        restarts = stat(a, "peer_restarts")
        with trio.fail_after(120):
            async with trio.open_nursery() as storm:
                storm.start_soon(talk, a, b)
                storm.start_soon(talk, b, a)
                storm.start_soon(impostors_of_b)
        assert stat(a, "peer_restarts") - restarts >= 6
        for x, y in ((a, b), (b, a)):
            got = [(await x.receive()) for _ in range(30)]
            assert [(m.sender, m.body) for m in got] == [(y.vm, [y.vm, i]) for i in range(30)]
        await trio.sleep(2)
        assert (a.waiting, b.waiting) == (0, 0)  # and nothing twice

        await both_ways(a, b, "at the end")
        assert "event=peer-restarted peer=vm-c" in caplog.text  # the log was captured
        nursery.cancel_scope.cancel()
    secrets = harness_secrets(h, t + 1) | {f for k in traffic_keys for f in key_forms(k)}
    assert_clean_logs(caplog, capfd, secrets)


# --------------------------------------------------------------------------- §5 at a bridge


async def guest_once(port: StreamPort, payload: bytes, *, eof: bool = False) -> list[object]:
    """One connection to a bridge's port: send `payload`, read until the bridge hangs up."""
    reader = channel.ChannelReader()
    got: list[object] = []
    async with await port.connect() as stream, trio.open_nursery() as nursery:
        nursery.start_soon(send_quietly, stream, payload)
        if eof:
            await trio.testing.wait_all_tasks_blocked()
            with contextlib.suppress(*BROKEN):
                await stream.send_eof()
        with trio.fail_after(30):
            while data := await receive_or_eof(stream):
                got += reader.feed(data)
    return got


async def receive_or_eof(stream: trio.abc.ReceiveStream) -> bytes:
    try:
        return bytes(await stream.receive_some(1 << 16))
    except trio.BrokenResourceError:
        return b""


def wire(**fields: object) -> bytes:
    return msgpack.packb(fields)


def nested_field(depth: int) -> bytes:
    """A hello map {"type": "hello", "v": 1, "vm": "vm-a", "have": 0, "x": [[[...]]]}."""
    head = b"\x85" + b"".join(
        msgpack.packb(k) + msgpack.packb(v)
        for k, v in (("type", "hello"), ("v", 1), ("vm", A), ("have", 0))
    )
    return head + msgpack.packb("x") + b"\x91" * depth + b"\xc0"


async def test_a_hostile_guest_at_a_bridge_leaves_it_serving_the_other_vms(
    clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    ids = (A, B, C)
    provisioning = generate("test-tvd", ids)
    reference = Reference(provisioning)
    config, ports = stream_config(ids)
    wall = clock_at(start_of(2) + 1)
    bad = channel.Error(channel.BAD_MESSAGE)
    async with (
        open_bridge(config, provisioning.for_bridge(1), clock=wall) as bridge,
        trio.open_nursery() as nursery,
    ):
        provisioning.erase()

        def wall_period() -> int:
            return SCHEDULE.period_at(wall.now())

        def status(vm: str) -> VmStatus:
            (found,) = [s for s in bridge.status().vms if s.vm == vm]
            return found

        def acked(vm: str) -> int:
            return status(vm).acked

        good = {vm: FakeGuest(vm, await ports[vm].connect(), wall) for vm in (B, C)}
        for guest in good.values():
            nursery.start_soon(guest.run)
            await guest.hello()
        # 1. Each refused on its own connection: error, then the bridge hangs up.
        hello = channel.encode(channel.Hello(A))
        one_shots: list[tuple[str, bytes, list[object]]] = [
            ("garbage", b"\xc1\xc1 not msgpack", [bad]),
            ("an array", pack([1, 2, 3]), [bad]),
            ("a map with int keys", b"\x81\x01\x02", [bad]),
            ("an unknown type", wire(type="welcome-me"), [bad]),
            ("a type that is an int", wire(type=1), [bad]),
            ("a hello for vm-b", channel.encode(channel.Hello(B)), [channel.Error("wrong-vm")]),
            ("a hello of version 2", wire(type="hello", v=2, vm=A, have=0),
             [channel.Error("version")]),
            ("a hello of version '1'", wire(type="hello", v="1", vm=A, have=0),
             [channel.Error("version")]),
            ("a hello with a path for a vm", wire(type="hello", v=1, vm="../a", have=0), [bad]),
            ("a hello with a hostile vm", wire(type="hello", v=1, vm=HOSTILE_TEXT, have=0),
             [bad]),
            ("a hello with an ext vm", wire(type="hello", v=1, vm=msgpack.ExtType(1, b"a"),
                                            have=0), [bad]),
            ("a hello without have", wire(type="hello", v=1, vm=A), [bad]),
            ("a hello with have -1", wire(type="hello", v=1, vm=A, have=-1), [bad]),
            ("a hello with have 1.5", wire(type="hello", v=1, vm=A, have=1.5), [bad]),
            ("a hello nesting 5000 lists", nested_field(5000), [bad]),
            ("an update from a guest", channel.encode(channel.Update(2, {})), [bad]),
            ("a welcome from a guest", wire(type="welcome", v=1), [bad]),
            ("a members message from a guest", wire(type="members", members=[]), [bad]),
            ("an ack with a missing -1", wire(type="ack", t=2, applied=1, missing=[-1]), [bad]),
            ("an oversized message", wire(type="hello", v=1, vm=A, have=0,
                                          x=bytes(2 * CHANNEL_LIMIT)), [bad]),
            ("a str header of 4 GiB", b"\xdb\xff\xff\xff\xff" + bytes(CHANNEL_LIMIT + 10), [bad]),
            ("half a hello, then EOF", hello[:7], []),
        ]  # fmt: skip
        for name, payload, expected in one_shots:
            got = await guest_once(ports[A], payload, eof=name.endswith("EOF"))
            assert (name, got) == (name, expected)
        assert acked(A) == 0

        # 2. A guest that stays: a hello with odd contents gets welcomed; acks of periods
        # that are not the current one count for nothing; its hostile error is logged
        # escaped; a flood of hellos gets one answer, not thousands.
        hostile = FakeGuest(A, await ports[A].connect(), wall, ack=False)
        nursery.start_soon(hostile.run)
        await hostile.send_bytes(nested_field(900))  # deep, but a valid hello
        await hostile.wait_for(channel.Welcome)
        (update,) = await hostile.wait_for(channel.Update)
        assert update.t == 2
        await hostile.send_bytes(wire(type="hello", v=1, vm=A, have=U64_MAX))
        for t, applied in ((U64_MAX, U64_MAX), (0, 0), (1, 1), (3, 2), (999, 0)):
            await hostile.send(channel.Ack(t, applied, ()))
        missing = [f"m{i:063d}" for i in range(300)]
        await hostile.send_bytes(wire(type="ack", t=1, applied=0, missing=missing))
        await hostile.send_bytes(wire(type="error", reason=HOSTILE_TEXT * 3))
        await hostile.send_bytes(wire(type="error", reason="\n" * 200))
        await trio.sleep(2)
        assert acked(A) == 0  # and the update is re-sent, unacknowledged
        assert len([u for u in hostile.updates() if u.message.t == 2]) >= 3
        hostile.received.clear()
        await hostile.send_bytes(hello * 5000)
        await trio.sleep(0.5)
        welcomes = len(hostile.of(channel.Welcome))
        assert 1 <= welcomes <= 20 and len(hostile.of(channel.Update)) <= welcomes + 1
        # A hello dripped one byte a second is still a hello (it takes periods).
        hostile.received.clear()
        for byte in hello:
            await hostile.send_bytes(bytes([byte]))
            await trio.sleep(1)
        await hostile.wait_for(channel.Welcome)
        await trio.sleep(0.1)
        update = hostile.updates()[-1].message
        assert update.t == wall_period() > 2
        await hostile.send(channel.Ack(update.t, 2, ()))
        with trio.fail_after(5):
            await bridge.wait_acked(A, update.t)

        # 3. A flood of connections on vm-a's port, each replacing the one before.
        connections = status(A).connections
        flood = [await ports[A].connect() for _ in range(100)]
        for stream in flood:
            await send_quietly(stream, hello)
        await trio.sleep(0.5)
        for stream in flood:
            await stream.aclose()
        assert status(A).connections - connections == 100
        assert status(B).connections == status(C).connections == 1

        # 4. Then vm-a behaves; the three VMs get every period's update.
        guest = FakeGuest(A, await ports[A].connect(), wall)
        nursery.start_soon(guest.run)
        await guest.hello_until_welcome()
        joined = wall_period()
        last = joined + 2
        await trio.sleep_until(wall.trio_time(start_of(last) + 0.5))
        with trio.fail_after(5):
            for vm in ids:
                await bridge.wait_acked(vm, last)
        for vm, fake in [(A, guest), *good.items()]:
            for received in fake.updates():
                update = received.message
                assert partials_bytes(update) == reference.partials(vm, update.t)
        assert [r.message.t for r in guest.updates()] == list(range(joined, last + 1))
        for fake in good.values():  # the hostile guest cost them nothing: once each
            assert [r.message.t for r in fake.updates()] == list(range(2, last + 1))
        assert bridge.period == last
        assert "event=refused vm=vm-a reason=wrong-vm" in caplog.text  # the log was captured
        nursery.cancel_scope.cancel()
    secrets = {form for key in reference.all_key_hex(last) for form in (key, key.upper())}
    assert_clean_logs(caplog, capfd, secrets)


# --------------------------------------------------------------------------- §5 a fake bridge


class FakeBridge:
    """The bridge's end of vm-b's key channel, played by the test; vm-a has the real one."""

    def __init__(self, h: Harness, stream: trio.SocketStream) -> None:
        self.h = h
        self.stream = stream
        self.reader = channel.ChannelReader()
        self.t = h.schedule.period_at(h.clock.now())
        self.members = tuple(channel.Member(vm, f"127.0.0.1:{h.ports[vm]}") for vm in (A, B))
        self.welcome = channel.Welcome(h.tvd, B, h.schedule, self.members)
        # SK_t XOR the computer half (U is an XOR): vm-b's real partial key of period t.
        comp = computer_key(h, B, A)
        self.partial = computer_update(h.period_key(A, B, self.t), comp, h.tvd, A, B, self.t)

    async def says(self, data: bytes, patience: float = 0.3) -> list[object]:
        """Send `data`; what the node answers within `patience` mock seconds."""
        await send_quietly(self.stream, data)
        got: list[object] = []
        with trio.move_on_after(patience):
            while True:
                chunk = await self.stream.receive_some(1 << 16)
                assert chunk, "the node closed its key channel"
                got += self.reader.feed(chunk)
        return got

    def update(self, t: int, partials: dict[str, Any]) -> bytes:
        return wire(type="update", t=t, partials=partials)

    async def behave(self) -> None:
        """The right welcome and vm-b's real partial key of period t."""
        assert await self.says(channel.encode(self.welcome)) == []
        got = await self.says(self.update(self.t, {A: self.partial}))
        assert got == [channel.Ack(self.t, 1, ())]


async def run_node(
    config: NodeConfig, clock: WallClock, task_status: trio.TaskStatus[Node]
) -> None:
    async with open_node(config, clock=clock) as node:
        task_status.started(node)
        await trio.sleep_forever()


@asynccontextmanager
async def vm_b_behind_a_fake_bridge(h: Harness) -> AsyncIterator[tuple[Node, Node, FakeBridge]]:
    """vm-a's node and the real bridge run (`h`); vm-b's node runs with its key channel
    on a Unix socket where the test plays the bridge. Yields vm-a, vm-b and the fake."""
    path = h.tmp / "fake.channel"
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(str(path))
    sock.listen(1)
    config = dataclasses.replace(h.config(B), key_channel=KeyChannelSpec("unix", str(path)))
    async with trio.SocketListener(sock) as listener, h.running(), trio.open_nursery() as nursery:
        await h.wait_keys()
        b: Node = await nursery.start(run_node, config, h.clock)
        async with await listener.accept() as stream:
            fake = FakeBridge(h, stream)
            assert await fake.says(b"") == [channel.Hello(B, 0)]
            yield h.nodes[A], b, fake
        nursery.cancel_scope.cancel()


async def test_a_fake_bridge_finds_no_crash_and_the_node_serves_once_it_gets_real_keys(
    tmp_path: Path,
    clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    rng = random.Random(5)
    h = Harness(tmp_path, [A, B], external=(B,), period_s=1000.0)
    async with vm_b_behind_a_fake_bridge(h) as (a, b, fake):
        t, update = fake.t, fake.update
        hello_b = channel.Hello(B, 0)
        bad = channel.Error(channel.BAD_MESSAGE)

        def welcome_with(**fields: object) -> bytes:
            document = msgpack.unpackb(channel.encode(fake.welcome))
            document.update(fields)
            return msgpack.packb(document)

        def only_refusals(got: list[object]) -> bool:
            return bad in got and all(m in (bad, hello_b) for m in got)

        exchanges: list[tuple[str, bytes, Callable[[list[object]], bool] | list[object]]] = [
            ("garbage", b"\xc1\xc1", [bad, hello_b]),
            ("an array", pack([1, 2, 3]), [bad, hello_b]),
            ("nesting 5000 lists", b"\x91" * 5000 + b"\xc0", [bad, hello_b]),
            ("an oversized update", update(t, {A: bytes(2 * CHANNEL_LIMIT)}), only_refusals),
            ("an update before any welcome", update(t, {A: rng.randbytes(32)}), []),
            ("a welcome for vm-a", welcome_with(vm=A), [bad]),
            ("a welcome with an ext TVD", welcome_with(tvd=msgpack.ExtType(3, b"t1")),
             [bad, hello_b]),
            ("a welcome with a NaN epoch", welcome_with(epoch=math.nan), [bad, hello_b]),
            ("a welcome with period_s 0", welcome_with(period_s=0.0), [bad, hello_b]),
            ("a welcome with periods 2**64-1", welcome_with(periods=U64_MAX),
             [channel.Error("schedule")]),
            ("a welcome of another TVD", welcome_with(tvd="t2"), [channel.Error("schedule")]),
            ("an update while refused", update(t, {A: rng.randbytes(32)}), []),
            ("a welcome with a hostile member address",
             welcome_with(members=[{"id": A, "addr": "127.0.0.1:1"},
                                   {"id": "vm-zz", "addr": "[::1]:1"}]), []),
            ("an update for period 2**64-1", update(U64_MAX, {A: rng.randbytes(32)}), [bad]),
            ("an update for period N", update(100_000, {A: rng.randbytes(32)}),
             [channel.Error("early")]),
            ("an update for the next period", update(t + 1, {A: rng.randbytes(32)}),
             [channel.Error("early")]),
            ("an update for period 0", update(0, {A: rng.randbytes(32)}), [bad, hello_b]),
            ("a partial of 31 bytes", update(t, {A: rng.randbytes(31)}), [bad, hello_b]),
            ("a partial that is a str", update(t, {A: "x" * 32}), [bad, hello_b]),
            ("a partial for a bad id", update(t, {"../etc": rng.randbytes(32)}), [bad, hello_b]),
            # vm-zz is a member since the welcome above, but vm-b has no key for it.
            ("partials for strangers only",
             update(t, {"vm-zz": rng.randbytes(32), "vm-yy": rng.randbytes(32)}),
             [channel.Ack(t, 0, ("vm-zz",))]),
            ("members: 300 strangers", wire(type="members", members=[
                {"id": f"m{i}", "addr": f"127.0.0.{i % 200 + 1}:9"} for i in range(300)]), []),
            ("members: a bad address", wire(type="members", members=[{"id": A, "addr": "x"}]),
             [bad, hello_b]),
            ("an error with a hostile reason", wire(type="error", reason=HOSTILE_TEXT * 3), []),
            ("a hello from the bridge", channel.encode(channel.Hello(B)), [bad]),
            ("an ack from the bridge", channel.encode(channel.Ack(1, 1, ())), [bad]),
        ]  # fmt: skip
        mismatch_after = {
            "a welcome with periods 2**64-1": True,
            "an update while refused": True,
            "a welcome with a hostile member address": False,
        }
        for name, data, expected in exchanges:
            got = await fake.says(data)
            if not callable(expected) and hello_b not in expected:
                # A welcomed node whose update is 1 s overdue says hello again every second
                # (it may sit behind a migrated port): at most one in these 0.3 s, and not
                # an answer to this exchange.
                assert (name, got.count(hello_b) <= 1) == (name, True), got
                got = [m for m in got if m != hello_b]
            if callable(expected):
                assert (name, expected(got)) == (name, True), got
            else:
                assert (name, got) == (name, expected)
            if name in mismatch_after:
                assert (name, b.status()["schedule_mismatch"]) == (name, mismatch_after[name])
        assert b.period is None and a.period == t

        # Then it behaves: vm-b gets its real key, and the pair talks.
        await fake.behave()
        assert b.period == t
        await both_ways(a, b, "after the fake bridge")
        # It cannot take back a key it gave: another partial of period t is ignored.
        got = await fake.says(update(t, {A: rng.randbytes(32)}))
        assert [type(m) for m in got] == [channel.Ack] and b.period == t
        await both_ways(b, a, "after another partial of period t")
        assert "event=schedule-mismatch" in caplog.text  # the log was captured
    assert_clean_logs(caplog, capfd, harness_secrets(h, t + 1))


async def test_a_peer_removed_and_added_back_by_the_bridge_still_gets_every_message(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    """A bridge's `members` message drops vm-a, a later one adds it back, both node
    processes running (SPEC §5). Found by this file: vm-b dropped its whole delivery state
    for vm-a (numberings and delivered counts) while vm-a kept its own, so vm-b's next
    numbers restarted at 1 for vm-a's unchanged instance: vm-a took vm-b's new messages
    for duplicates and acknowledged them (send() returned, vm-a's application never got
    b0..b2), and vm-a's own next numbers were a gap at vm-b (a0 never delivered).
    Before the fix this test ended with ({b0..b3: acknowledged, a0: timed out}, ["b3"], [])."""
    h = Harness(tmp_path, [A, B], external=(B,), period_s=1000.0)
    async with vm_b_behind_a_fake_bridge(h) as (a, b, fake):
        await fake.behave()
        for i in range(3):
            await both_ways(a, b, f"before {i}")
        # vm-a leaves the TVD and comes back, as the bridge tells vm-b (SPEC §5).
        only_b = wire(type="members", members=[{"id": B, "addr": fake.members[1].addr}])
        assert await fake.says(only_b) == []
        assert b.peers == [] and b.period is None
        assert await fake.says(channel.encode(channel.Members(fake.members))) == []
        got = await fake.says(fake.update(fake.t, {A: fake.partial}))
        assert got == [channel.Ack(fake.t, 1, ())] and b.period == fake.t
        # Four messages from vm-b, one from vm-a.
        outcomes: dict[str, str] = {}

        async def send(x: Node, y: Node, body: str) -> None:
            try:
                await x.send(y.vm, body, timeout=20)
                outcomes[body] = "acknowledged"
            except SendTimeout:
                outcomes[body] = "timed out"

        async with trio.open_nursery() as senders:
            for i in range(4):
                senders.start_soon(send, b, a, f"b{i}")
                await trio.sleep(0.1)
            senders.start_soon(send, a, b, "a0")
        await trio.sleep(1)
        received_by_a = [(await a.receive()).body for _ in range(a.waiting)]
        received_by_b = [(await b.receive()).body for _ in range(b.waiting)]
        assert (outcomes, received_by_a, received_by_b) == (
            {"b0": "acknowledged", "b1": "acknowledged", "b2": "acknowledged",
             "b3": "acknowledged", "a0": "acknowledged"},
            ["b0", "b1", "b2", "b3"],
            ["a0"],
        )  # fmt: skip

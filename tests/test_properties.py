"""Hypothesis properties of the peer protocol and every decoder."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import Link, Tvd, events, frames_in, mid
from tvdnet import ConnectionState, Message, MessagesAcknowledged, Session, channel
from tvdnet.core import frames
from tvdnet.core.errors import ChannelError, FrameError
from tvdnet.core.reader import StreamDecodeError

# Any msgpack value that msgpack-python gives back equal: no NaN (NaN != NaN), map keys
# of the hashable kinds, and ints within 64 bits.
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=40)
    | st.binary(max_size=40)
)
bodies = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8) | st.integers(-5, 5), inner, max_size=4)
    ),
    max_leaves=10,
)

quick = settings(max_examples=100)

FRAME_TYPES = (frames.Hello, frames.Data, frames.Reject, frames.Close)  # by frame type number
CLOSE_REASONS = {
    frames.NOT_A_MEMBER, frames.BAD_HELLO, frames.VERSION, frames.TOO_LARGE, frames.BAD_FRAME,
    frames.TIMEOUT,
}  # fmt: skip
CHANNEL_TYPES = (
    channel.Hello, channel.Welcome, channel.Update, channel.Ack, channel.Members, channel.Error,
)  # fmt: skip


def _pair() -> tuple[Session, Session, Link]:
    tvd = Tvd(["vm-a", "vm-b"])
    a, b = tvd.session("vm-a"), tvd.session("vm-b")
    tvd.update_all(1, mid(1))
    link = Link(a, b, mid(1))
    link.pump(mid(1))
    events(a)
    events(b)
    return a, b, link


PAIR = _pair()


@quick
@given(body=bodies)
def test_any_msgpack_body_round_trips(body: Any) -> None:
    a, b, link = PAIR
    a.send("vm-b", body, mid(1))
    link.pump(mid(1))
    got = [e for e in events(b) if isinstance(e, Message)]
    assert len(got) == 1
    assert got[0].body == body
    assert type(got[0].body) is type(body)
    events(a)


@quick
@given(data=st.data())
def test_any_one_bit_change_of_a_data_frame_is_refused(data: st.DataObject) -> None:
    a, b, link = _pair()
    a.send("vm-b", {"secret": "payload"}, mid(1))
    frame = a.data_to_send(link.conn_a, mid(1))
    bit = data.draw(st.integers(0, len(frame) * 8 - 1))
    tampered = bytearray(frame)
    tampered[bit // 8] ^= 1 << (bit % 8)
    b.receive_data(link.conn_b, bytes(tampered), mid(1))
    assert not [e for e in events(b) if isinstance(e, Message)]
    # Refused one way or another: closed, rejected, or still waiting for more bytes.
    out = b.data_to_send(link.conn_b, mid(1))
    assert b.is_finished(link.conn_b) or out.startswith(b"\x95\x02") or out == b""


class _SpyAead:
    calls = 0

    def __init__(self, key: bytes) -> None:
        self._real = AESGCM(key)

    def encrypt(self, nonce: bytes, data: bytes, ad: bytes) -> bytes:
        return self._real.encrypt(nonce, data, ad)

    def decrypt(self, nonce: bytes, data: bytes, ad: bytes) -> bytes:
        type(self).calls += 1
        return self._real.decrypt(nonce, data, ad)


@quick
@given(t=st.integers(1, 1000).filter(lambda t: t != 5))
def test_a_frame_of_another_period_is_refused_without_decryption(t: int) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(frames, "new_aead", _SpyAead)
        _refuse_without_decryption(t)


def _refuse_without_decryption(t: int) -> None:
    tvd = Tvd(["vm-a", "vm-b"])
    a, b = tvd.session("vm-a"), tvd.session("vm-b")
    tvd.update_all(5, mid(5))
    link = Link(a, b, mid(5))
    link.pump(mid(5))
    conn = b._conns[link.conn_b]
    _SpyAead.calls = 0
    forged = frames.seal_data(AESGCM(bytes(32)), t, conn.recv_n, b"\x91\x93\x00\x01\xc0")
    b.receive_data(link.conn_b, forged, mid(5))
    assert _SpyAead.calls == 0
    reply = msgpack.unpackb(b.data_to_send(link.conn_b, mid(5)))
    assert reply[0] == frames.REJECT
    assert reply[3] == ("expired" if t < 5 else "unknown")


@quick
@given(blob=st.binary(max_size=300))
def test_random_bytes_into_the_frame_reader_raise_only_frame_errors(blob: bytes) -> None:
    reader = frames.new_reader()
    try:
        for obj in reader.feed(blob):
            assert isinstance(frames.parse_frame(obj), FRAME_TYPES)
    except StreamDecodeError as exc:
        assert frames.stream_error(exc).reason in {"bad-frame", "too-large"}
    except FrameError as exc:
        assert exc.reason in CLOSE_REASONS


@quick
@given(
    obj=st.lists(
        st.integers(-1, 4) | _scalars | st.lists(_scalars, max_size=3), min_size=0, max_size=8
    )
    | _scalars
)
def test_any_decoded_object_parses_or_raises_a_frame_error(obj: Any) -> None:
    try:
        frame = frames.parse_frame(obj)
    except FrameError as exc:
        assert exc.reason in CLOSE_REASONS
    else:
        assert isinstance(frame, FRAME_TYPES)
        assert isinstance(obj, list) and obj[0] == FRAME_TYPES.index(type(frame))


@quick
@given(blob=st.binary(max_size=300))
def test_random_bytes_into_a_session_never_escape(blob: bytes) -> None:
    tvd = Tvd(["vm-a", "vm-b"])
    b = tvd.session("vm-b")
    conn = b.accept(0.0)
    b.receive_data(conn, blob, 0.0)
    _refused_or_waiting(b, conn, 0.0)


@quick
@given(blob=st.binary(max_size=300))
def test_random_bytes_after_the_handshake_never_escape(blob: bytes) -> None:
    a, b, link = _pair()
    b.receive_data(link.conn_b, blob, mid(1))
    _refused_or_waiting(b, link.conn_b, mid(1))


def _refused_or_waiting(session: Session, conn: int, now: float) -> None:
    """Garbage from an unauthenticated sender takes no effect: nothing is delivered or
    acknowledged, and the session answers at most a CLOSE (and then ends the
    connection) or a REJECT, or waits for more bytes."""
    happened = events(session)
    assert not [e for e in happened if isinstance(e, Message | MessagesAcknowledged)]
    answers = frames_in([session.data_to_send(conn, now)])
    assert {frame[0] for frame in answers} <= {frames.REJECT, frames.CLOSE}
    closed = session.connection_state(conn) in (ConnectionState.CLOSING, ConnectionState.CLOSED)
    if any(frame[0] == frames.CLOSE for frame in answers):
        assert closed and answers[-1][1] in CLOSE_REASONS
    if closed:
        assert session.is_finished(conn)


@quick
@given(blob=st.binary(max_size=300))
def test_random_bytes_into_the_channel_reader_raise_only_channel_errors(blob: bytes) -> None:
    reader = channel.ChannelReader()
    try:
        assert all(isinstance(m, CHANNEL_TYPES) for m in reader.feed(blob))
    except ChannelError as exc:
        assert exc.reason in channel.ERROR_REASONS
    try:
        assert isinstance(channel.decode(blob), CHANNEL_TYPES)
    except ChannelError as exc:
        assert exc.reason in channel.ERROR_REASONS


_VALID_WIRE: list[dict[str, Any]] = [
    {"type": "hello", "v": 1, "vm": "vm-a", "have": 3},
    {"type": "welcome", "v": 1, "tvd": "t", "vm": "vm-a", "epoch": 0.0, "period_s": 5.0,
     "periods": 10, "members": [{"id": "vm-a", "addr": "127.0.0.1:7001"}]},
    {"type": "update", "t": 4, "partials": {"vm-b": b"k" * 32}},
    {"type": "ack", "t": 4, "applied": 1, "missing": ["vm-c"]},
    {"type": "members", "members": [{"id": "vm-b", "addr": "[::1]:7002"}]},
    {"type": "error", "reason": "early"},
]  # fmt: skip


@quick
@given(
    index=st.integers(0, len(_VALID_WIRE) - 1),
    key=st.sampled_from(["type", "v", "vm", "have", "tvd", "epoch", "period_s", "periods",
                         "members", "t", "partials", "applied", "missing", "reason"]),
    value=st.none() | _scalars | st.lists(_scalars, max_size=3)
    | st.dictionaries(st.text(max_size=5), _scalars, max_size=3),
    delete=st.booleans(),
)  # fmt: skip
def test_any_mutated_channel_message_parses_or_raises_a_channel_error(
    index: int, key: str, value: Any, delete: bool
) -> None:
    wire = dict(_VALID_WIRE[index])
    assert channel.parse_message(dict(wire)) is not None
    if delete:
        wire.pop(key, None)
    else:
        wire[key] = value
    try:
        message = channel.parse_message(wire)
    except ChannelError as exc:
        assert exc.reason in channel.ERROR_REASONS
    else:
        # What parses re-encodes to something that parses the same way (updates too).
        assert channel.decode(channel.encode(message)) == message

"""The sans-I/O peer protocol (SPEC §4): handshake, period rules, delivery, closing."""

from __future__ import annotations

import itertools
from typing import Any

import msgpack
import pytest

from helpers import Link, Tvd, connection, events, frames_in, mid, open_frame_as
from tvdnet import (
    ConnectionAuthenticated,
    ConnectionState,
    Dial,
    KeyErased,
    Message,
    MessagesAcknowledged,
    MessageTooLarge,
    PeerRestarted,
    Refused,
    SendFailed,
    Session,
    UnknownPeer,
    UnserializableBody,
    WindowFull,
)
from tvdnet.core import frames
from tvdnet.core.constants import FRAME_LIMIT, MESSAGE_LIMIT
from tvdnet.core.scheme import Schedule


def received(session: Session, evs: list[Any] | None = None) -> list[tuple[str, int, Any]]:
    evs = events(session) if evs is None else evs
    return [(e.sender, e.period, e.body) for e in evs if isinstance(e, Message)]


def refusals(evs: list[Any]) -> list[str]:
    return [e.cause for e in evs if isinstance(e, Refused)]


@pytest.fixture
def tvd() -> Tvd:
    t = Tvd(["vm-a", "vm-b"])
    t.session("vm-a")
    t.session("vm-b")
    return t


def opened(tvd: Tvd, t: int = 1) -> tuple[Session, Session, Link]:
    """A and B with keys of period t and an authenticated connection A -> B."""
    now = mid(t)
    tvd.update_all(t, now)
    a, b = tvd.sessions["vm-a"], tvd.sessions["vm-b"]
    link = Link(a, b, now)
    link.pump(now)
    events(a)
    events(b)
    return a, b, link


# --------------------------------------------------------------------------- handshake


def test_handshake_then_messages_both_ways(tvd: Tvd) -> None:
    a, b, link = opened(tvd)
    now = mid(1)
    ha = a.send("vm-b", {"x": 1}, now)
    hb = b.send("vm-a", "pong", now)
    link.pump(now)
    eva, evb = events(a), events(b)
    assert received(b, evb) == [("vm-a", 1, {"x": 1})]
    assert received(a, eva) == [("vm-b", 1, "pong")]
    assert MessagesAcknowledged("vm-b", [ha]) in eva
    assert MessagesAcknowledged("vm-a", [hb]) in evb
    assert a.unacknowledged("vm-b") == 0


def test_nothing_but_acks_before_the_peer_authenticates(tvd: Tvd) -> None:
    now = mid(1)
    tvd.update("vm-a", 1, now)  # only A holds a key: B cannot authenticate A's frames
    a, b = tvd.sessions["vm-a"], tvd.sessions["vm-b"]
    a.send("vm-b", "early", now)
    link = Link(a, b, now)
    link.pump(now)
    sent = [f for f in frames_in(link.sent_by_a) if f[0] == frames.DATA]
    assert sent, "A sends an ACK-only frame as soon as both HELLOs are exchanged"
    # B has no key: it refuses the frame without decrypting it.
    assert [f[0] for f in frames_in(link.sent_by_b)] == [frames.HELLO, frames.REJECT]
    tvd.update("vm-b", 1, now)
    link.pump(now)
    data_frames = [f for f in frames_in(link.sent_by_a) if f[0] == frames.DATA]
    first = open_frame_as(b, link.conn_b, data_frames[0])
    # Only ACK and KEY before B authenticated (SPEC §4).
    assert first == [[frames.ACK, 0, None], [frames.KEY, 1, None]]
    assert received(b) == [("vm-a", 1, "early")]


def test_hello_takes_no_effect_until_data_authenticates(tvd: Tvd) -> None:
    a, b, link = opened(tvd)
    now = mid(1)
    # An attacker opens a second connection to B, claiming a new instance of A.
    conn = b.accept(now)
    forged = frames.encode_hello(tvd.tvd, "vm-a", "vm-b", b"n" * 16, b"newinst!")
    b.receive_data(conn, forged, now)
    b.data_to_send(conn, now)
    # Nothing changed: the real connection still carries messages.
    a.send("vm-b", "still here", now)
    link.pump(now)
    assert received(b) == [("vm-a", 1, "still here")]
    assert b._peers["vm-a"].active is connection(b, link.conn_b)
    # Garbage under that HELLO fails authentication and closes only that connection.
    b.receive_data(
        conn, frames.seal_data(frames.new_aead(bytes(32)), 1, 0, b"\x91\x93\x01\x00\xc0"), now
    )
    assert b.connection_state(conn) is ConnectionState.CLOSING
    assert b.stats["auth_failures"] == 1
    assert b.connection_state(link.conn_b) is ConnectionState.OPEN


# --------------------------------------------------------------------------- CLOSE reasons


def _hello(tvd: str = "test-tvd", sender: str = "vm-a", receiver: str = "vm-b") -> list[Any]:
    return [frames.HELLO, 1, tvd, sender, receiver, b"n" * 16, b"i" * 8]


def _responder_gets(tvd: Tvd, *objs: Any, raw: bytes = b"") -> tuple[Session, int, list[Any]]:
    b = tvd.sessions["vm-b"]
    now = mid(1)
    conn = b.accept(now)
    data = b"".join(msgpack.packb(o) for o in objs) + raw
    b.receive_data(conn, data, now)
    return b, conn, frames_in([b.data_to_send(conn, now)])


@pytest.mark.parametrize(
    ("objs", "reason"),
    [
        ([_hello(tvd="other-tvd")], "not-a-member"),
        ([_hello(sender="vm-x")], "not-a-member"),
        ([_hello(sender="vm-b")], "bad-hello"),  # the sender is the node itself
        ([_hello(receiver="vm-c")], "bad-hello"),
        ([[frames.HELLO, 1, "test-tvd", "vm-a", "vm-b", b"short", b"i" * 8]], "bad-hello"),
        ([[frames.HELLO, 1, "test-tvd", "vm-a", "vm-b", b"n" * 16, b"i" * 9]], "bad-hello"),
        ([[frames.HELLO, 1, "test-tvd", "vm-a", "vm-b", "n" * 16, b"i" * 8]], "bad-hello"),
        ([[frames.HELLO, 1, "test-tvd", "vm-a"]], "bad-hello"),
        ([[frames.HELLO, 1, "test-tvd", 5, "vm-b", b"n" * 16, b"i" * 8]], "bad-hello"),
        ([[frames.HELLO, 2, "test-tvd", "vm-a", "vm-b", b"n" * 16, b"i" * 8]], "version"),
        ([[frames.HELLO, 2]], "version"),
        ([[frames.DATA, 1, 0, b"x" * 20]], "bad-frame"),  # DATA before both HELLOs
        ([[frames.REJECT, 1, 0, "expired", None]], "bad-frame"),
        ([_hello(), _hello()], "bad-frame"),  # a second HELLO
        ([[9, 1]], "bad-frame"),  # unknown frame type
        ([[]], "bad-frame"),
        (["not an array"], "bad-frame"),
        ([[True, 1]], "bad-frame"),
        ([_hello(), [frames.DATA, 1, 0]], "bad-frame"),
        ([_hello(), [frames.DATA, 1, -1, b"x"]], "bad-frame"),
        ([_hello(), [frames.DATA, 0, 0, b"x" * 20]], "bad-frame"),  # t outside 1..N
        ([_hello(), [frames.DATA, 1001, 0, b"x" * 20]], "bad-frame"),
        ([_hello(), [frames.DATA, 1, 1, b"x" * 20]], "bad-frame"),  # counter must start at 0
        ([_hello(), [frames.REJECT, 1, 0, 5, None]], "bad-frame"),
        ([_hello(), [frames.CLOSE]], "bad-frame"),
    ],
)
def test_close_reasons(tvd: Tvd, objs: list[Any], reason: str) -> None:
    b, conn, sent = _responder_gets(tvd, *objs)
    assert sent[-1] == [frames.CLOSE, reason]
    assert b.is_finished(conn)
    assert reason in refusals(events(b))


def test_close_bad_frame_on_undecodable_bytes(tvd: Tvd) -> None:
    _, _, sent = _responder_gets(tvd, raw=b"\xc1")
    assert sent == [[frames.CLOSE, "bad-frame"]]


def test_close_too_large_on_a_frame_over_the_limit(tvd: Tvd) -> None:
    big = [frames.HELLO, 1, "t", "a", "b", b"x" * FRAME_LIMIT, b"i"]
    _, _, sent = _responder_gets(tvd, big)
    assert sent == [[frames.CLOSE, "too-large"]]


def test_close_too_large_before_the_frame_is_complete(tvd: Tvd) -> None:
    # A bin header announcing 4 MiB: refused once 1 MiB + 1 bytes are buffered, not at the end.
    header = b"\x94\x01\x01\x00\xc6" + (4 << 20).to_bytes(4, "big")
    b = tvd.sessions["vm-b"]
    conn = b.accept(mid(1))
    b.receive_data(conn, msgpack.packb(_hello()), mid(1))
    b.data_to_send(conn, mid(1))
    b.receive_data(conn, header + bytes(FRAME_LIMIT - 100), mid(1))
    assert b.connection_state(conn) is ConnectionState.OPEN
    b.receive_data(conn, bytes(200), mid(1))
    assert frames_in([b.data_to_send(conn, mid(1))]) == [[frames.CLOSE, "too-large"]]


def test_a_frame_of_exactly_the_limit_is_accepted(tvd: Tvd) -> None:
    a, b, link = opened(tvd)
    body = b"x" * (MESSAGE_LIMIT - 20)
    a.send("vm-b", body, mid(1))
    link.pump(mid(1))
    assert received(b) == [("vm-a", 1, body)]


def test_initiator_closes_when_the_responder_is_not_who_it_dialed(tvd: Tvd) -> None:
    now = mid(1)
    a = tvd.sessions["vm-a"]
    conn = a.connect("vm-b", now)
    a.data_to_send(conn, now)
    a.receive_data(conn, msgpack.packb(_hello(sender="vm-c", receiver="vm-a")), now)
    assert frames_in([a.data_to_send(conn, now)]) == [[frames.CLOSE, "bad-hello"]]


def test_close_timeout_without_hello(tvd: Tvd) -> None:
    b = tvd.sessions["vm-b"]
    conn = b.accept(0.0)
    b.receive_data(conn, b"\x97\x00", 0.0)  # a HELLO that never completes
    b.handle_timeout(b.next_deadline())
    assert frames_in([b.data_to_send(conn, 10.0)]) == [[frames.CLOSE, "timeout"]]


def test_close_timeout_when_idle(tvd: Tvd) -> None:
    a, b, link = opened(tvd)
    start = mid(1)
    # B's side alone: A goes silent (sends nothing, not even keepalives).
    b.handle_timeout(start + 20.0)
    b.data_to_send(link.conn_b, start + 20.0)
    b.handle_timeout(start + 40.0)
    assert frames_in([b.data_to_send(link.conn_b, start + 40.0)])[-1] == [frames.CLOSE, "timeout"]


def test_keepalives_keep_an_idle_connection_open(tvd: Tvd) -> None:
    a, b, link = opened(tvd)
    now = mid(1)
    for _ in range(10):  # 100 s, periods of 10 s: keys renewed as time goes
        now += 10.0
        tvd.update_all(tvd.schedule.period_at(now), now)
        for s in (a, b):
            s.handle_timeout(now)
        link.pump(now)
    assert a.connection_state(link.conn_a) is ConnectionState.OPEN
    assert b.connection_state(link.conn_b) is ConnectionState.OPEN


def test_a_peer_close_ends_the_connection_only(tvd: Tvd) -> None:
    a, b, link = opened(tvd)
    a.send("vm-b", "one", mid(1))
    b.receive_data(link.conn_b, frames.encode_close("bad-frame"), mid(1))
    assert b.is_finished(link.conn_b)
    assert "closed-by-peer" in refusals(events(b))


# --------------------------------------------------------------------------- REJECT reasons


def _data_frame_to(
    sender: Session, link: Link, t: int, items: list[Any], period_key: bytes
) -> bytes:
    """A DATA frame from `sender` on `link`, sealed under `period_key` as period t."""
    conn = connection(sender, link.side(sender))
    assert conn.peer is not None
    key = frames.traffic_key(
        period_key, sender.tvd, sender.me, conn.peer, t,
        conn.local_nonce, conn.peer_nonce, sender.instance, conn.peer_instance,
    )  # fmt: skip
    frame = frames.seal_data(frames.new_aead(key), t, conn.send_n, msgpack.packb(items))
    conn.send_n += 1
    return frame


def test_reject_expired_for_an_older_period(tvd: Tvd) -> None:
    a, b, link = opened(tvd, t=1)
    old_key = bytes(a.key_state("vm-b").open_key())
    tvd.update_all(2, mid(2))
    link.pump(mid(2))
    events(b)
    frame = _data_frame_to(a, link, 1, [[frames.MSG, 1, "replayed"]], old_key)
    b.receive_data(link.conn_b, frame, mid(2))
    reply = frames_in([b.data_to_send(link.conn_b, mid(2))])
    n = msgpack.unpackb(frame)[2]
    assert reply == [[frames.REJECT, 1, n, "expired", 2]]
    assert b.stats["rejected_expired"] == 1
    assert received(b) == []


def test_reject_expired_past_the_end_plus_allowance(tvd: Tvd) -> None:
    a, b, link = opened(tvd, t=1)
    key = bytes(a.key_state("vm-b").open_key())
    late = tvd.schedule.end(1) + 2.0  # period 1 plus the 2 s allowance has ended
    frame = _data_frame_to(a, link, 1, [[frames.MSG, 1, "late"]], key)
    b.receive_data(link.conn_b, frame, late)
    assert frames_in([b.data_to_send(link.conn_b, late)])[-1][3] == "expired"
    assert b.stats["rejected_expired"] == 1


def test_reject_unknown_for_a_newer_period(tvd: Tvd) -> None:
    a, b, link = opened(tvd, t=1)
    now = tvd.schedule.start(2) + 0.5
    tvd.update("vm-a", 2, now)  # A moved on, B did not yet
    link.pump(now)
    assert b.stats["rejected_unknown"] == 0  # the open connection rides on SK_1 (SPEC §4)
    # A new connection starts under the key of the period current by A's clock: B, which
    # does not hold it, refuses it as unknown and names the newest period it holds.
    a.connection_lost(link.conn_a, now)
    b.connection_lost(link.conn_b, now)
    fresh = Link(a, b, now)
    fresh.pump(now)
    reply = [f for f in frames_in(fresh.sent_by_b) if f[0] == frames.REJECT]
    assert reply and reply[-1][3:] == ["unknown", 1]
    assert b.stats["rejected_unknown"] >= 1


def test_reject_unknown_without_any_key(tvd: Tvd) -> None:
    now = mid(1)
    tvd.update("vm-a", 1, now)
    a, b = tvd.sessions["vm-a"], tvd.sessions["vm-b"]
    link = Link(a, b, now)
    link.pump(now)
    rejects = [f for f in frames_in(link.sent_by_b) if f[0] == frames.REJECT]
    assert rejects == [[frames.REJECT, 1, 0, "unknown", None]]


def test_the_counter_is_checked_before_the_period_rules(tvd: Tvd) -> None:
    a, b, link = opened(tvd, t=1)
    conn = connection(b, link.conn_b)
    # A frame of an unknown period with the wrong counter: CLOSE, not REJECT.
    bogus = frames.seal_data(frames.new_aead(bytes(32)), 7, conn.recv_n + 5, b"\x90")
    b.receive_data(link.conn_b, bogus, mid(1))
    assert frames_in([b.data_to_send(link.conn_b, mid(1))]) == [[frames.CLOSE, "bad-frame"]]


def test_a_rejected_frame_still_consumes_its_counter(tvd: Tvd) -> None:
    a, b, link = opened(tvd, t=1)
    conn = connection(b, link.conn_b)
    expected = conn.recv_n
    frame = frames.seal_data(frames.new_aead(bytes(32)), 9, expected, b"\x90")  # unknown period
    b.receive_data(link.conn_b, frame, mid(1))
    assert frames_in([b.data_to_send(link.conn_b, mid(1))])[0][3] == "unknown"
    assert conn.recv_n == expected + 1
    # Reusing the rejected number is a protocol error now.
    b.receive_data(link.conn_b, frame, mid(1))
    assert frames_in([b.data_to_send(link.conn_b, mid(1))]) == [[frames.CLOSE, "bad-frame"]]


def test_authentication_failure_closes_without_reject(tvd: Tvd) -> None:
    a, b, link = opened(tvd, t=1)
    conn = connection(b, link.conn_b)
    forged = frames.seal_data(frames.new_aead(bytes(32)), 1, conn.recv_n, b"\x90")
    b.receive_data(link.conn_b, forged, mid(1))
    assert b.data_to_send(link.conn_b, mid(1)) == b""  # no REJECT, no CLOSE
    assert b.is_finished(link.conn_b)
    assert b.stats["auth_failures"] == 1
    assert "auth-failure" in refusals(events(b))


def test_a_replayed_frame_is_refused(tvd: Tvd) -> None:
    a, b, link = opened(tvd, t=1)
    a.send("vm-b", "once", mid(1))
    link.pump(mid(1))
    captured = link.sent_by_a[-1]
    assert received(b) == [("vm-a", 1, "once")]
    b.receive_data(link.conn_b, captured, mid(1))  # counter already used
    assert frames_in([b.data_to_send(link.conn_b, mid(1))]) == [[frames.CLOSE, "bad-frame"]]
    assert received(b) == []


# --------------------------------------------------------------------------- the sender's side


def test_reject_only_restarts_the_timer_and_never_makes_the_sender_use_an_older_key(
    tvd: Tvd,
) -> None:
    a, b, link = opened(tvd, t=1)
    tvd.update("vm-a", 2, mid(2))  # A is at period 2, B still at 1
    link.pump(mid(2))
    events(a)
    a.send("vm-b", "m1", mid(2))
    link.pump(mid(2))
    data = [f for f in frames_in(link.sent_by_a) if f[0] == frames.DATA]
    assert {f[1] for f in data[-2:]} == {2}  # A never falls back to period 1
    assert received(b) == []
    assert a.stats["rejects_received"] >= 1
    # B gets its key: its ACK-only frame under period 2 authenticates, A re-sends at once.
    before = len(link.sent_by_a)
    tvd.update("vm-b", 2, mid(2))
    link.pump(mid(2))
    assert received(b) == [("vm-a", 2, "m1")]
    resent = [f for f in frames_in(link.sent_by_a[before:]) if f[0] == frames.DATA]
    # The message went out in a new frame with a new number: no sealed frame is sent twice.
    numbers = [f[2] for f in frames_in(link.sent_by_a) if f[0] == frames.DATA]
    assert len(numbers) == len(set(numbers))
    assert resent


def test_retries_back_off_while_the_peer_refuses() -> None:
    tvd = Tvd(["vm-a", "vm-b"], schedule=Schedule(0.0, 100.0, 10))  # long enough to watch
    tvd.session("vm-a")
    tvd.session("vm-b")
    now = 1.0
    tvd.update("vm-a", 1, now)  # B has no key: it refuses every frame of A as unknown
    a, b = tvd.sessions["vm-a"], tvd.sessions["vm-b"]
    a.send("vm-b", "waiting", now)
    link = Link(a, b, now)
    link.pump(now)
    tries = [now]
    while len(tries) < 4:  # some deadlines only reschedule: count the frames actually sent
        now = a.next_deadline()
        a.handle_timeout(now)
        before = len(link.sent_by_a)
        link.pump(now)
        if len(link.sent_by_a) > before:
            tries.append(now)
    gaps = [round(y - x, 6) for x, y in itertools.pairwise(tries)]
    assert gaps == [1.0, 2.0, 4.0]  # SPEC §4: 1 s, backing off
    assert b.stats["rejected_unknown"] == 4
    assert received(b) == []
    tvd.update("vm-b", 1, now)  # B's ACK-only frame authenticates: A re-sends at once
    link.pump(now)
    assert received(b) == [("vm-a", 1, "waiting")]


def test_messages_survive_a_broken_connection(tvd: Tvd) -> None:
    a, b, link = opened(tvd, t=1)
    now = mid(1)
    for i in range(3):
        a.send("vm-b", i, now)
    a.data_to_send(link.conn_a, now)  # sealed, then lost with the connection
    a.connection_lost(link.conn_a, now)
    b.connection_lost(link.conn_b, now)
    assert Dial("vm-b") in events(a)
    link2 = Link(a, b, now)
    link2.pump(now)
    assert [body for _, _, body in received(b)] == [0, 1, 2]
    assert a.unacknowledged("vm-b") == 0
    assert a.stats["resends"] == 3


def test_duplicates_after_a_slow_ack_are_delivered_once(tvd: Tvd) -> None:
    a, b, link = opened(tvd, t=1)
    now = mid(1)
    for i in range(3):
        a.send("vm-b", i, now)
    b.receive_data(link.conn_b, a.data_to_send(link.conn_a, now), now)
    slow_ack = b.data_to_send(link.conn_b, now)  # held back for over a second
    a.handle_timeout(now + 1.0)  # the oldest waited 1 s: A re-sends in a new frame
    b.receive_data(link.conn_b, a.data_to_send(link.conn_a, now + 1.0), now + 1.0)
    a.receive_data(link.conn_a, slow_ack, now + 1.0)
    link.pump(now + 1.0)
    assert [body for _, _, body in received(b)] == [0, 1, 2]
    assert b.stats["duplicates"] == 3
    assert a.stats["resends"] == 3
    assert a.unacknowledged("vm-b") == 0


def test_coalescing_many_messages_into_one_frame(tvd: Tvd) -> None:
    a, b, link = opened(tvd, t=1)
    before = a.stats["frames_sent"]
    for i in range(500):
        a.send("vm-b", i, mid(1))
    data = a.data_to_send(link.conn_a, mid(1))
    assert a.stats["frames_sent"] == before + 1
    b.receive_data(link.conn_b, data, mid(1))
    assert [body for _, _, body in received(b)] == list(range(500))


def test_large_queues_split_into_frames_under_the_limit(tvd: Tvd) -> None:
    a, b, link = opened(tvd, t=1)
    body = b"y" * 300_000
    for _ in range(7):
        a.send("vm-b", body, mid(1))
    data = a.data_to_send(link.conn_a, mid(1))
    sent = frames_in([data])
    assert len(sent) >= 3
    assert all(len(msgpack.packb(f)) <= FRAME_LIMIT for f in sent)
    b.receive_data(link.conn_b, data, mid(1))
    assert len(received(b)) == 7


def test_messages_arrive_in_order_across_a_period_change(tvd: Tvd) -> None:
    a, b, link = opened(tvd, t=1)
    sent = []
    now = mid(1)
    for t in range(1, 6):
        now = mid(t) - 4.0
        tvd.update("vm-a", t, now) if t > 1 else None
        for i in range(5):
            a.send("vm-b", (t, i), now)
            sent.append((t, i))
        link.pump(now)  # B is one step behind: these are rejected as unknown
        if t > 1:
            tvd.update("vm-b", t, now + 0.01)
        link.pump(now + 0.01)
    for _ in range(5):
        now = max(now, a.next_deadline())
        a.handle_timeout(now)
        b.handle_timeout(now)
        link.pump(now)
    got = [body for _, _, body in received(b)]
    assert got == [list(x) for x in sent]


def test_send_refuses_bad_input(tvd: Tvd) -> None:
    a = tvd.sessions["vm-a"]
    with pytest.raises(UnknownPeer, match="not a member"):
        a.send("vm-z", "x", 0.0)
    with pytest.raises(UnknownPeer):
        a.send("vm-a", "x", 0.0)
    with pytest.raises(UnserializableBody):
        a.send("vm-b", object(), 0.0)
    with pytest.raises(MessageTooLarge):
        a.send("vm-b", b"x" * MESSAGE_LIMIT, 0.0)
    assert a.unacknowledged("vm-b") == 0


def test_send_window_is_bounded() -> None:
    t = Tvd(["vm-a", "vm-b"])
    a = t.session("vm-a", window_messages=3)
    for i in range(3):
        a.send("vm-b", i, 0.0)
    with pytest.raises(WindowFull):
        a.send("vm-b", 3, 0.0)
    assert not a.window_open("vm-b")


# --------------------------------------------------------------------------- dialing


def test_a_session_asks_to_dial_when_messages_wait(tvd: Tvd) -> None:
    now = mid(1)
    a = tvd.sessions["vm-a"]
    a.send("vm-b", "x", now)
    assert events(a) == []  # no key yet: no point dialing
    tvd.update("vm-a", 1, now)
    assert Dial("vm-b") in events(a)
    a.dial_failed("vm-b", now)
    assert events(a) == []
    a.handle_timeout(a.next_deadline())
    assert Dial("vm-b") in events(a)


# --------------------------------------------------------------------------- restarts and races


def test_peer_restart_renumbers_and_delivers_everything_once(tvd: Tvd) -> None:
    a, b, link = opened(tvd, t=1)
    now = mid(1)
    for i in range(3):
        a.send("vm-b", i, now)
    link.pump(now)
    assert [x for _, _, x in received(b)] == [0, 1, 2]
    a.send("vm-b", 3, now)
    a.send("vm-b", 4, now)
    a.data_to_send(link.conn_a, now)  # in flight when B dies
    a.connection_lost(link.conn_a, now)
    # B restarts: a new process, a new instance, the same keys.
    b2 = tvd.session("vm-b")
    tvd.update("vm-b", 1, now)
    link2 = Link(a, b2, now)
    link2.pump(now)
    assert PeerRestarted("vm-b") in events(a)
    assert [x for _, _, x in received(b2)] == [3, 4]
    a.send("vm-b", 5, now)
    link2.pump(now)
    assert [x for _, _, x in received(b2)] == [5]
    assert a.unacknowledged("vm-b") == 0


def test_simultaneous_dials_keep_the_connection_initiated_by_the_lower_id(tvd: Tvd) -> None:
    now = mid(1)
    tvd.update_all(1, now)
    a, b = tvd.sessions["vm-a"], tvd.sessions["vm-b"]
    a_to_b = Link(a, b, now)  # initiated by vm-a, the lower id
    b_to_a = Link(b, a, now)
    for _ in range(3):
        b_to_a.pump(now)
        a_to_b.pump(now)
    assert a._peers["vm-b"].active is connection(a, a_to_b.conn_a)
    assert b._peers["vm-a"].active is connection(b, a_to_b.conn_b)
    assert b_to_a.closed
    a.send("vm-b", "x", now)
    b.send("vm-a", "y", now)
    a_to_b.pump(now)
    assert received(b) == [("vm-a", 1, "x")]
    assert received(a) == [("vm-b", 1, "y")]


def test_a_replacing_connection_takes_over_after_it_authenticates(tvd: Tvd) -> None:
    a, b, link = opened(tvd, t=1)
    now = mid(1)
    a.send("vm-b", "in flight", now)
    a.data_to_send(link.conn_a, now)  # lost with the old connection, which A forgets
    a.connection_lost(link.conn_a, now)
    link2 = Link(a, b, now)  # B still believes in the old one
    link2.pump(now)
    evb = events(b)
    assert ConnectionAuthenticated(link2.conn_b, "vm-a", True) in evb
    assert b.is_finished(link.conn_b)
    assert received(b, evb) == [("vm-a", 1, "in flight")]


# --------------------------------------------------------------------------- keys and erasure


def test_a_new_key_drops_traffic_keys_and_zeroes_the_old_period_key(tvd: Tvd) -> None:
    a, b, link = opened(tvd, t=1)
    a.send("vm-b", "x", mid(1))
    link.pump(mid(1))
    conn = connection(a, link.conn_a)
    assert 1 in conn.send_aead and 1 in conn.recv_aead
    old = a.key_state("vm-b").open_key()
    tvd.update("vm-a", 2, mid(2))  # past period 1's overlap: SK_1 goes at once
    assert old == bytearray(32)
    assert conn.send_aead == {} and conn.recv_aead == {}


def test_keys_end_without_an_update_and_the_node_then_neither_sends_nor_accepts(tvd: Tvd) -> None:
    a, b, link = opened(tvd, t=1)
    end = tvd.schedule.end(1) + 2.0
    key = a.key_state("vm-b").open_key()
    a.handle_timeout(end)
    b.handle_timeout(end)
    assert KeyErased("vm-b", 1) in events(a)
    assert key == bytearray(32)
    assert a.key_state("vm-b").period == 1  # only the number is kept
    handle = a.send("vm-b", "queued while cut off", end)
    assert a.data_to_send(link.conn_a, end) == b""  # nothing sealed without a key
    # Keys return: the queued message goes out and is acknowledged.
    now = mid(3)
    tvd.update_all(3, now)
    link.pump(now)
    assert received(b) == [("vm-a", 3, "queued while cut off")]
    assert MessagesAcknowledged("vm-b", [handle]) in events(a)


def test_members_message_forgets_a_removed_peer(tvd: Tvd) -> None:
    a, b, link = opened(tvd, t=1)
    handle = a.send("vm-b", "never", mid(1))
    a.set_members(["vm-a"], mid(1))
    assert SendFailed("vm-b", handle, "the peer left the TVD") in events(a)
    assert frames_in([a.data_to_send(link.conn_a, mid(1))]) == [[frames.CLOSE, "not-a-member"]]
    assert a.peers == [] and not a.has_peer("vm-b")
    missing = a.set_members(["vm-a", "vm-b", "vm-c"], mid(1))
    assert a.has_peer("vm-b") and not a.has_peer("vm-c")  # no computer key for vm-c
    assert missing == ["vm-c"]
    assert a.key_state("vm-b").period == 0  # re-added: starts afresh


def test_apply_update_reports_missing_and_ignores_non_members(tvd: Tvd) -> None:
    a = tvd.sessions["vm-a"]
    a.set_members(["vm-a", "vm-b", "vm-c"], 0.0)
    partials = tvd.partials("vm-a", 1)
    stray = bytearray(b"s" * 32)
    partials["vm-c"] = bytearray(b"c" * 32)
    partials["vm-q"] = stray
    applied, missing = a.apply_update(1, partials, mid(1))
    assert (applied, missing) == (1, ["vm-c"])
    assert stray == bytearray(32)


def test_session_repr_and_stats_hold_no_key_material(tvd: Tvd) -> None:
    a, b, link = opened(tvd, t=1)
    key = a.key_state("vm-b").open_key().hex()
    assert key not in repr(a)
    assert key not in repr(a.stats)
    assert key not in repr(a.peer_status("vm-b"))


def test_keys_that_disagree_are_named_on_both_sides() -> None:
    """Issue 18: a computer key with one flipped digit gave `auth-failure` on one side and
    nothing on the other. Now the refusing side says the keys may disagree and what to
    check, and the side that was hung up on says so too."""
    tvd = Tvd(["vm-a", "vm-b"])
    a = tvd.session("vm-a")
    b = tvd.session("vm-b")
    key = b._computer_keys.get("vm-a")
    assert key is not None
    key[0] ^= 0x01  # one flipped bit in vm-b's computer key of the pair
    tvd.update_all(1, mid(1))
    link = Link(a, b, mid(1))
    link.pump(mid(1))
    refused = [e for s in (a, b) for e in events(s) if isinstance(e, Refused)]
    failure = next(e for e in refused if e.cause == "auth-failure")
    assert "keys that disagree" in failure.detail
    assert "same provisioning" in failure.detail
    # The side that was hung up on learns it when its connection ends (EOF here).
    (closed,) = [e for e in refused if e.cause == "closed-unauthenticated"]
    assert closed.peer != failure.peer
    assert "the pair's keys disagree" in closed.detail
    assert key.hex() not in failure.detail + closed.detail


def test_a_peer_removed_and_added_back_resumes_its_numberings(tvd: Tvd) -> None:
    """A `members` message removes vm-b, a later one adds it back, while both processes
    run (vm-b was never told: its bridge closed its channel). vm-a forgot vm-b's keys,
    connections and queue, not how far each side had delivered: nothing new is taken for
    a duplicate, nothing waits for a number never sent (found by a hostile-client test)."""
    a, b, link = opened(tvd, t=1)
    now = mid(1)
    for i in range(3):
        a.send("vm-b", f"a{i}", now)
        b.send("vm-a", f"b{i}", now)
    link.pump(now)
    assert len(received(b)) == 3 and len(received(a)) == 3
    a.set_members(["vm-a"], now)
    link.pump(now)
    a.set_members(["vm-a", "vm-b"], now)
    tvd.update("vm-a", 1, now)
    events(a)
    back = Link(a, b, now)
    a.send("vm-b", "a-after", now)
    b.send("vm-a", "b-after", now)
    back.pump(now)
    assert [body for _, _, body in received(b)] == ["a-after"]
    assert [body for _, _, body in received(a)] == ["b-after"]
    assert a.unacknowledged("vm-b") == b.unacknowledged("vm-a") == 0
    assert b.stats["duplicates"] == 0


def test_the_message_limit_counts_the_whole_packed_message() -> None:
    """MESSAGE_LIMIT bounds the packed [0, seq, body] exactly: its number counts too."""
    a = Tvd(["vm-a", "vm-b"]).session("vm-a")
    near = MESSAGE_LIMIT - 16
    fits = near + MESSAGE_LIMIT - len(msgpack.packb([frames.MSG, 1, b"x" * near]))
    assert len(msgpack.packb([frames.MSG, 1, b"x" * fits])) == MESSAGE_LIMIT
    with pytest.raises(MessageTooLarge):
        a.send("vm-b", b"x" * (fits + 1), 0.0)
    a.send("vm-b", b"x" * fits, 0.0)
    assert a.unacknowledged("vm-b") == 1

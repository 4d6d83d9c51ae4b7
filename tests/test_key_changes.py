"""SPEC §4 revision 2 at the Session level: two keys across a period change, KEY, the
period rules through P, acknowledgement as a set, numbering per instance, and strangers.

Periods of 10 s, allowance 2 s (tests/helpers.py): the overlap of SK_{t-1} ends 2 s
into period t at the latest.
"""

from __future__ import annotations

from typing import Any

import msgpack
from cryptography.exceptions import InvalidTag

from helpers import KEY_DUE, Link, Tvd, connection, events, frames_in, mid
from tvdnet import (
    ConnectionState,
    Dial,
    KeyErased,
    Message,
    MessagesAcknowledged,
    Refused,
    Session,
)
from tvdnet.core import frames
from tvdnet.core.constants import KEY_CHANGE_SPREAD, KEY_DELAY, KEY_SLOTS, KEY_WORK_CHUNK

START_2 = 10.0  # the start of period 2


def received(session: Session, evs: list[Any] | None = None) -> list[tuple[int, Any]]:
    evs = events(session) if evs is None else evs
    return [(e.period, e.body) for e in evs if isinstance(e, Message)]


def data_periods(chunks: list[bytearray]) -> list[int]:
    return [f[1] for f in frames_in(chunks) if f[0] == frames.DATA]


def opened(tvd: Tvd, now: float, **settings: Any) -> tuple[Session, Session, Link]:
    a, b = tvd.session("vm-a", **settings), tvd.session("vm-b", **settings)
    tvd.update_all(1, now)
    link = Link(a, b, now)
    link.pump(now)
    events(a)
    events(b)
    return a, b, link


# --------------------------------------------------------------------------- the overlap


def test_an_open_connection_rides_the_period_change_on_the_older_key() -> None:
    """B's update comes 1.5 s after A's: no REJECT, nothing waits, and A erases SK_1 at
    B's first authenticated frame under period 2."""
    tvd = Tvd()
    a, b, link = opened(tvd, mid(1))
    now = START_2 + 0.1
    tvd.update("vm-a", 2, now)
    link.pump(now)
    assert [e for e in events(a) if isinstance(e, KeyErased)] == []
    for i in range(5):  # traffic both ways while B still holds only SK_1
        a.send("vm-b", f"a{i}", now)
        b.send("vm-a", f"b{i}", now)
        link.pump(now)
        now += 0.3
    assert received(b) == [(1, f"a{i}") for i in range(5)]  # A sealed under SK_1 for B
    assert received(a) == [(1, f"b{i}") for i in range(5)]
    assert a.unacknowledged("vm-b") == b.unacknowledged("vm-a") == 0
    assert a.key_state("vm-b").older is not None  # SK_1 still accepted on this connection
    tvd.update("vm-b", 2, now)  # KEY 2 from B, A answers: from here on both seal under 2
    link.pump(now)
    evs = events(a)
    assert KeyErased("vm-b", 1) in evs  # at B's first authenticated frame under period 2
    a.send("vm-b", "after", now)
    link.pump(now)
    assert received(b) == [(2, "after")]
    assert a.stats["rejected_expired"] + a.stats["rejected_unknown"] == 0
    assert b.stats["rejected_expired"] + b.stats["rejected_unknown"] == 0


def test_an_older_key_erased_early_leaves_no_timer_at_its_old_deadline() -> None:
    """Once both sides use SK_2, SK_1 is erased and the pair's key timer moves to SK_2's
    own deadline: nothing wakes at the end of the overlap (12 s) for a key that is gone."""
    tvd = Tvd()
    a, b, link = opened(tvd, mid(1))
    now = START_2 + 0.1
    tvd.update_all(2, now)
    for side in (a, b):
        side.handle_timeout(now + KEY_DUE)
    link.pump(now + KEY_DUE)
    a.send("vm-b", "under 2", now + KEY_DUE)
    b.send("vm-a", "under 2", now + KEY_DUE)
    link.pump(now + KEY_DUE)
    for side in (a, b):
        assert side.key_state(side.peers[0]).older is None
        key_timer = side._timers.get(("key", side.peers[0]))
        assert key_timer == a.key_state("vm-b").lifetime(2)  # the end of period 2 + 2 s


def test_an_early_update_keeps_the_current_key_in_use() -> None:
    """An update 1.5 s early (within the allowance): the node goes on sealing under the
    period that is current by its clock, and first frames on a new connection too."""
    tvd = Tvd()
    a, b, link = opened(tvd, mid(1))
    now = START_2 - 1.5
    tvd.update("vm-a", 2, now)
    a.send("vm-b", "still period 1", now)
    link.pump(now)
    assert received(b) == [(1, "still period 1")]
    fresh = Link(a, b, now)  # a second connection (it replaces the first when it authenticates)
    fresh.pump(now)
    assert set(data_periods(fresh.sent_by_a)) == {1}


def test_a_late_node_is_cut_off_after_the_overlap_and_catches_up() -> None:
    """B's update 3 s late, past the 2 s allowance: after the overlap A seals under 2,
    B refuses it as unknown; once B's key comes, everything arrives exactly once."""
    tvd = Tvd()
    a, b, link = opened(tvd, mid(1))
    now = START_2 + 0.1
    tvd.update("vm-a", 2, now)
    link.pump(now)
    sent = 0
    while now < START_2 + 3.0:
        a.send("vm-b", sent, now)
        sent += 1
        now += 0.25
        a.handle_timeout(now)
        b.handle_timeout(now)
        link.pump(now)
    assert b.stats["rejected_unknown"] > 0  # cut off once SK_1 was erased at 12 s
    assert a.key_state("vm-b").get(1) is None and b.key_state("vm-a").get(1) is None
    tvd.update("vm-b", 2, now)
    link.pump(now)
    got = [body for _, body in received(b)]
    assert got == list(range(sent))  # nothing lost, nothing twice, in order
    assert a.unacknowledged("vm-b") == 0


def test_crossed_first_frames_at_the_boundary_do_not_leave_the_connection_silent() -> None:
    """A reconnect right at the boundary: A (in period 2) seals its first frames under 2,
    B (still in 1) under 1: each refuses the other's. Both re-send KEY+ACK on the timer,
    so the connection authenticates as soon as B holds SK_2 and is in period 2."""
    tvd = Tvd()
    a, b, link = opened(tvd, mid(1))
    a.connection_lost(link.conn_a, START_2 - 0.05)
    b.connection_lost(link.conn_b, START_2 - 0.05)
    tvd.update("vm-a", 2, START_2 - 0.05)
    fresh = Link(a, b, START_2 - 0.05)
    # A's clock is 0.1 s ahead of B's: it is in period 2 when it seals its first frame.
    b.receive_data(fresh.conn_b, a.data_to_send(fresh.conn_a, START_2 + 0.05), START_2 - 0.05)
    a.receive_data(fresh.conn_a, b.data_to_send(fresh.conn_b, START_2 - 0.05), START_2 + 0.05)
    fresh.pump(START_2 + 0.05)
    assert a.stats["rejected_expired"] >= 1  # B's first frame under 1, on a new connection
    assert b.stats["rejected_unknown"] >= 1  # A's under 2, which B does not hold yet
    now = START_2 + 0.3
    tvd.update("vm-b", 2, now)
    fresh.pump(now)
    for _ in range(8):  # the first-frame timers, backing off from 1 s
        now = min(a.next_deadline(), b.next_deadline())
        a.handle_timeout(now)
        b.handle_timeout(now)
        fresh.pump(now)
        if connection(a, fresh.conn_a).authenticated and connection(b, fresh.conn_b).authenticated:
            break
    assert now < START_2 + 2.0
    a.send("vm-b", "through", now)
    fresh.pump(now)
    assert received(b)[-1] == (2, "through")


# --------------------------------------------------------------------------- a stolen SK_{t-1}


def forger(tvd: Tvd, t: int, now: float, instance: bytes = b"forged!!") -> Session:
    """A holder of vm-a's computer keys and SK_t only (malware that read vm-a in t)."""
    session = Session(tvd.computer_keys("vm-a"), tvd.schedule, instance=instance)
    partials = {peer: bytearray(k) for peer, k in tvd.updates_of("vm-a", t).items()}
    session.apply_update(t, partials, now)
    return session


def test_a_stolen_older_key_opens_no_connection_in_the_next_period() -> None:
    tvd = Tvd()
    a, b, link = opened(tvd, mid(1))
    thief = forger(tvd, 1, mid(1))
    now = START_2 + 0.5
    tvd.update("vm-b", 2, now)
    b.handle_timeout(now)
    attack = Link(thief, b, now)
    # The thief's clock says period 2 but it holds no SK_2: it cannot even say anything.
    attack.pump(now)
    assert data_periods(attack.sent_by_a) == []
    # Sealing under SK_1 by hand does not help: B refuses it before decrypting.
    key = frames.traffic_key(
        bytes(thief.key_state("vm-b").open_key(1)), tvd.tvd, "vm-a", "vm-b", 1,
        connection(thief, attack.conn_a).local_nonce, connection(thief, attack.conn_a).peer_nonce,
        thief.instance, b.instance,
    )  # fmt: skip
    frame = frames.seal_data(frames.new_aead(key), 1, 0, msgpack.packb([[0, 1, "forged"]]))
    b.receive_data(attack.conn_b, frame, now)
    reply = frames_in([b.data_to_send(attack.conn_b, now)])
    assert reply == [[frames.REJECT, 1, 0, "expired", 2]]
    assert received(b) == []
    assert not connection(b, attack.conn_b).authenticated


def test_a_message_first_sealed_under_t_never_goes_into_an_older_frame() -> None:
    """Sealed once under period 2, a message waits rather than go out under SK_1, even on
    a connection that still accepts SK_1 and whose peer has not shown SK_2."""
    tvd = Tvd()
    a, b, link = opened(tvd, mid(1))
    now = START_2 + 0.1
    tvd.update("vm-a", 2, now)
    link.pump(now)
    a.send("vm-b", "sealed under 2 elsewhere", now)
    # As if it had gone out under period 2 on a connection since lost.
    numbering = a._peers["vm-b"].delivery.numberings[b.instance]
    numbering.entries[0].message.first_period = 2
    link.pump(now)
    assert received(b) == []  # A sealed only ACK/KEY frames under 1
    assert set(data_periods(link.sent_by_a[-1:])) <= {1}
    tvd.update("vm-b", 2, now + 0.2)  # B shows SK_2 (KEY 2): now it goes, under 2
    link.pump(now + 0.2)
    assert received(b) == [(2, "sealed under 2 elsewhere")]


def test_what_is_sealed_under_t_stays_closed_to_a_holder_of_sk_t_minus_1() -> None:
    tvd = Tvd()
    a, b, link = opened(tvd, mid(1))
    stolen = bytes(a.key_state("vm-b").open_key(1))
    now = START_2 + 0.1
    tvd.update_all(2, now)
    link.pump(now)
    before = len(link.sent_by_a)
    a.send("vm-b", "period 2 secret", now)
    link.pump(now)
    conn = connection(a, link.conn_a)
    for frame in [f for f in frames_in(link.sent_by_a[before:]) if f[0] == frames.DATA]:
        assert frame[1] == 2
        key = frames.traffic_key(
            stolen, tvd.tvd, "vm-a", "vm-b", 2, conn.local_nonce, conn.peer_nonce,
            a.instance, conn.peer_instance,
        )  # fmt: skip
        try:
            frames.open_data(frames.new_aead(key), 2, frame[2], frame[3])
        except InvalidTag:
            continue
        raise AssertionError("a frame under period 2 opened with SK_1")
    assert received(b) == [(2, "period 2 secret")]


def test_a_forged_instance_in_t_minus_1_then_the_real_one_in_t_loses_and_repeats_nothing() -> None:
    """A thief with SK_1 poses as a new instance of vm-a in period 1 and acknowledges what
    B sends it; the real vm-a comes back in period 2 and still gets every message,
    exactly once, in order (its numbering was kept and resumes)."""
    tvd = Tvd()
    a, b, link = opened(tvd, mid(1))
    now = mid(1)
    for i in range(3):
        b.send("vm-a", i, now)
    link.pump(now)
    assert [body for _, body in received(a)] == [0, 1, 2]
    events(b)
    thief = forger(tvd, 1, now)
    attack = Link(thief, b, now)
    attack.pump(now)
    assert link.closed or b.is_finished(link.conn_b)  # the "new instance" took over
    handles = [b.send("vm-a", i, now) for i in range(3, 6)]
    attack.pump(now)
    evb = events(b)
    acked = [h for e in evb if isinstance(e, MessagesAcknowledged) for h in e.handles]
    assert acked == handles  # the thief acknowledged them: B's sends returned
    assert [body for _, body in received(thief)] == [3, 4, 5]
    # Period 2: the real vm-a (the same instance as before) reconnects under SK_2.
    now = START_2 + 0.5
    tvd.update("vm-a", 2, now)
    tvd.update("vm-b", 2, now)
    a.connection_lost(link.conn_a, now)
    back = Link(a, b, now)
    back.pump(now)
    assert [body for _, body in received(a)] == [3, 4, 5]  # nothing lost, nothing twice
    b.send("vm-a", 6, now)
    back.pump(now)
    assert [body for _, body in received(a)] == [6]
    assert b.unacknowledged("vm-a") == 0


def test_an_ack_under_an_older_period_does_not_cover_a_message_sealed_under_a_newer() -> None:
    """Acknowledgement is a set (SPEC §4): a forged ACK under SK_1 cannot clear a message
    first sealed under period 2."""
    tvd = Tvd()
    a, b, link = opened(tvd, mid(1))
    now = START_2 + 0.1
    tvd.update_all(2, now)
    link.pump(now)
    a.send("vm-b", "only under 2", now)
    a.data_to_send(link.conn_a, now)  # sealed under 2, never delivered
    numbering = a._peers["vm-b"].delivery.numberings[b.instance]
    acked = numbering.acknowledge(upto=1, period=1)  # what an ACK in a frame under 1 does
    assert acked == [] and a.unacknowledged("vm-b") == 1
    assert [m.first_period for m in (e.message for e in numbering.entries)] == [2]


def test_an_ack_of_a_number_never_sent_acknowledges_nothing() -> None:
    tvd = Tvd()
    a, b, link = opened(tvd, mid(1))
    a.send("vm-b", "one", mid(1))
    a.data_to_send(link.conn_a, mid(1))
    conn_b = connection(b, link.conn_b)
    key = frames.traffic_key(
        bytes(b.key_state("vm-a").open_key(1)), tvd.tvd, "vm-b", "vm-a", 1,
        conn_b.local_nonce, conn_b.peer_nonce, b.instance, a.instance,
    )  # fmt: skip
    frame = frames.seal_data(
        frames.new_aead(key), 1, conn_b.send_n, msgpack.packb([[frames.ACK, 5, None]])
    )
    conn_b.send_n += 1
    a.receive_data(link.conn_a, frame, mid(1))
    assert a.unacknowledged("vm-b") == 1
    assert a.stats["protocol_errors"] == 1


# --------------------------------------------------------------------------- KEY


def test_key_and_ack_go_out_on_a_new_key_and_when_the_peer_shows_one() -> None:
    tvd = Tvd()
    a, b, link = opened(tvd, mid(1))
    now = START_2 + 0.1
    tvd.update("vm-a", 2, now)
    out = frames_in([a.data_to_send(link.conn_a, now)])
    (frame,) = out
    inner = _open(b, link.conn_b, frame)
    assert [frames.KEY, 2, None] in inner and inner[0][0] == frames.ACK
    b.receive_data(link.conn_b, msgpack.packb(frame), now)
    # B learns that A holds 2 (B does not yet): B answers KEY 1 with an ACK at once.
    (answer,) = frames_in([b.data_to_send(link.conn_b, now)])
    assert [frames.KEY, 1, None] in _open(a, link.conn_a, answer)


def test_a_new_key_s_key_leaves_within_100_ms_spread_over_connections() -> None:
    """A hub's new keys: every connection is due to carry its KEY within KEY_DUE (under
    the spec's 100 ms), not all at the same instant, and not before KEY_DELAY."""
    members = ["hub"] + [f"vm-{i}" for i in range(20)]
    tvd = Tvd(members)
    hub = tvd.session("hub")
    spokes = [tvd.session(m) for m in members[1:]]
    tvd.update_all(1, mid(1))
    links = [Link(hub, s, mid(1)) for s in spokes]
    for link in links:
        link.pump(mid(1))
    hub.handle_timeout(mid(1) + KEY_DUE)  # the handshakes' timers
    for link in links:
        link.pump(mid(1) + KEY_DUE)
    hub.ready_connections()  # what they left, written by the pumps
    now = START_2 + 0.1
    tvd.update("hub", 2, now)
    assert hub.ready_connections() == set()  # held back: a frame sent meanwhile carries it
    due: dict[int, float] = {}
    while len(due) < len(links):
        deadline = hub.next_deadline()
        assert deadline <= now + KEY_DUE < now + 0.1
        hub.handle_timeout(deadline)
        for conn in hub.ready_connections():
            due[conn] = deadline
            hub.data_to_send(conn, deadline)
    assert min(due.values()) >= now + KEY_DELAY
    assert len(set(due.values())) == KEY_SLOTS  # spread, not one burst


def test_a_frame_sent_meanwhile_carries_the_key_and_the_timer_sends_nothing_more() -> None:
    tvd = Tvd()
    a, b, link = opened(tvd, mid(1))
    now = START_2 + 0.1
    tvd.update("vm-a", 2, now)
    a.send("vm-b", "carries KEY 2", now)
    (frame,) = frames_in([a.data_to_send(link.conn_a, now)])
    assert [frames.KEY, 2, None] in _open(b, link.conn_b, frame)
    assert a.ready_connections() == {link.conn_a}  # the send's, written above
    a.handle_timeout(now + KEY_DUE)
    assert a.ready_connections() == set()


def test_an_update_for_many_peers_is_acknowledged_before_its_key_work() -> None:
    """apply_update derives and erases only; the KEYs and timers of each key change are
    due at once in handle_timeout, KEY_WORK_CHUNK peers per call."""
    members = ["hub"] + [f"vm-{i}" for i in range(2 * KEY_WORK_CHUNK + 5)]
    tvd = Tvd(members)
    hub = tvd.session("hub")
    now = mid(1)
    applied, missing = hub.apply_update(1, tvd.partials("hub", 1), now)
    assert (applied, missing) == (len(members) - 1, [])
    assert all(hub.key_state(m).get(1) is not None for m in members[1:])
    assert hub.next_deadline() == now  # the key work, due now
    calls = 0
    while hub.next_deadline() <= now:
        hub.handle_timeout(now)
        calls += 1
    assert calls == 3  # 128 + 128 + 5 peers
    assert hub.next_deadline() > now
    small = Tvd(["vm-a", "vm-b", "vm-c"])
    few = small.session("vm-a")
    few.apply_update(1, small.partials("vm-a", 1), now)
    assert few.next_deadline() > now  # a few pairs: done in apply_update


def test_a_new_key_re_sends_nothing_still_on_its_way() -> None:
    """Without a REJECT, what was sent under the older key is on a stream that keeps it:
    the new key brings no duplicate, and the message is acknowledged once."""
    tvd = Tvd()
    a, b, link = opened(tvd, mid(1))
    now = START_2 + 0.1
    a.send("vm-b", "in flight", now)
    in_flight = a.data_to_send(link.conn_a, now)
    tvd.update("vm-a", 2, now)
    assert a.stats["resends"] == 0
    b.receive_data(link.conn_b, in_flight, now)
    link.pump(now)
    assert received(b) == [(1, "in flight")] and b.stats["duplicates"] == 0
    assert a.unacknowledged("vm-b") == 0


def test_a_sender_backing_off_re_sends_at_once_on_a_new_key() -> None:
    """SPEC §4: a sender that was refused resets its back-off and re-sends at once when
    its new key comes (REJECT is unauthenticated: here B's REJECT of A's frame)."""
    tvd = Tvd()
    a, b, link = opened(tvd, mid(1))
    now = START_2 + 0.1
    a.send("vm-b", "refused", now)
    b._peers["vm-a"].keys.forget()  # as if B's SK_1 had lapsed: B refuses A's frame
    link.pump(now)
    assert a.stats["rejects_received"] == 1 and received(b) == []
    resends = a.stats["resends"]
    now += 0.2  # before A's 1 s re-send timer
    tvd.update("vm-a", 2, now)
    assert a.stats["resends"] == resends + 1
    tvd.update("vm-b", 2, now)
    link.pump(now + KEY_DUE)
    assert received(b) == [(2, "refused")]
    assert a.unacknowledged("vm-b") == 0


def _open(receiver: Session, conn_id: int, frame: list[Any]) -> list[Any]:
    conn = connection(receiver, conn_id)
    peer = receiver._peers[str(conn.peer)]
    key = frames.traffic_key(
        bytes(peer.keys.open_key(frame[1])), receiver.tvd, peer.id, receiver.me, frame[1],
        conn.peer_nonce, conn.local_nonce, conn.peer_instance, receiver.instance,
    )  # fmt: skip
    inner: list[Any] = msgpack.unpackb(frames.open_data(frames.new_aead(key), *frame[1:]))
    return inner


def test_an_unknown_inner_kind_is_ignored() -> None:
    tvd = Tvd()
    a, b, link = opened(tvd, mid(1))
    conn = connection(a, link.conn_a)
    key = frames.traffic_key(
        bytes(a.key_state("vm-b").open_key(1)), tvd.tvd, "vm-a", "vm-b", 1,
        conn.local_nonce, conn.peer_nonce, a.instance, b.instance,
    )  # fmt: skip
    items = [[7, 1, "a kind this node does not know"], [0, 1, "hello"], [40, 0, None]]
    frame = frames.seal_data(frames.new_aead(key), 1, conn.send_n, msgpack.packb(items))
    conn.send_n += 1
    b.receive_data(link.conn_b, frame, mid(1))
    assert received(b) == [(1, "hello")]
    assert b.connection_state(link.conn_b) is ConnectionState.OPEN


def test_the_older_key_ends_at_the_overlap_even_if_a_connection_still_accepts_it() -> None:
    tvd = Tvd()
    a, b, link = opened(tvd, mid(1))
    tvd.update("vm-a", 2, START_2 + 0.1)
    link.pump(START_2 + 0.1)
    older = a.key_state("vm-b").open_key(1)
    a.handle_timeout(START_2 + 1.9)
    assert bytes(older) != bytes(32)
    a.handle_timeout(START_2 + 2.0)  # min(allowance, period) after period 1
    assert older == bytearray(32)
    assert 1 not in connection(a, link.conn_a).send_aead


# --------------------------------------------------------------------------- strangers


def hello_from(session: Session, conn: int, sender: str, receiver: str, now: float) -> None:
    hello = frames.encode_hello("test-tvd", sender, receiver, b"n" * 16, b"stranger")
    session.receive_data(conn, hello, now)


def test_a_silent_connection_naming_a_member_delays_nothing() -> None:
    tvd = Tvd()
    a, b = tvd.session("vm-a"), tvd.session("vm-b")
    now = mid(1)
    tvd.update_all(1, now)
    stranger = b.accept(now, "10.9.9.9")
    hello_from(b, stranger, "vm-a", "vm-b", now)  # names vm-a, then says nothing
    b.data_to_send(stranger, now)
    b.send("vm-a", "not delayed", now)
    assert Dial("vm-a") in events(b)  # B dials vm-a at once, whatever the stranger claims
    link = Link(b, a, now)
    link.pump(now)
    assert received(a) == [(1, "not delayed")]
    # vm-a dialing B while the stranger sits there works as well.
    a.send("vm-b", "and back", now)
    link.pump(now)
    assert received(b) == [(1, "and back")]
    assert b.connection_state(stranger) is ConnectionState.OPEN  # harmless, still open
    b.handle_timeout(now + 36.0)  # no authenticated DATA: it is closed in the end
    assert b.connection_state(stranger) in (ConnectionState.CLOSING, ConnectionState.CLOSED)


def test_a_connection_without_hello_is_closed_after_the_handshake_timeout() -> None:
    tvd = Tvd()
    b = tvd.session("vm-b")
    conn = b.accept(mid(1), "10.9.9.9")
    b.handle_timeout(mid(1) + 9.9)
    assert b.connection_state(conn) is ConnectionState.AWAIT_HELLO
    b.handle_timeout(mid(1) + 10.0)
    assert frames_in([b.data_to_send(conn, mid(1) + 10.0)]) == [[frames.CLOSE, "timeout"]]


def test_a_flood_from_one_address_does_not_keep_a_member_at_another_out() -> None:
    tvd = Tvd()
    a = tvd.session("vm-a")
    b = tvd.session("vm-b", max_unauthenticated=4)
    now = mid(1)
    tvd.update_all(1, now)
    flood = [b.accept(now, "10.6.6.6") for _ in range(10)]
    assert b.unauthenticated_connections() == 4  # the cap held: the flood displaced itself
    link = Link(a, b, now, source="10.1.1.1")  # vm-a, from another address
    more = [b.accept(now, "10.6.6.6") for _ in range(10)]  # the flood goes on
    assert b.connection_state(link.conn_b) is ConnectionState.AWAIT_HELLO  # never displaced
    link.pump(now)
    assert connection(b, link.conn_b).authenticated
    # 6 of the first ten, the oldest of the flood when vm-a came, and one per newcomer.
    assert b.stats["connections_displaced"] == 6 + 1 + 10
    waiting = [c for c in flood + more if b.connection_state(c) is ConnectionState.AWAIT_HELLO]
    assert len(waiting) == 3


def test_unauthenticated_strings_are_logged_escaped_and_short() -> None:
    tvd = Tvd()
    a, b, link = opened(tvd, mid(1))
    forged_line = "bye\n2026-12-07 INFO event=keys-restored vm=vm-b" + "x" * 200
    b.receive_data(link.conn_b, msgpack.packb([frames.CLOSE, forged_line]), mid(1))
    (refused,) = [e for e in events(b) if isinstance(e, Refused)]
    assert "\n" not in refused.detail and len(refused.detail) <= 64
    assert refused.detail.startswith("bye\\n2026")


# --------------------------------------------------------------------------- review findings


def _authenticated_frame(
    sender: Session, conn_id: int, receiver: Session, t: int, items: list[Any]
) -> bytes:
    """A DATA frame from `sender` on its connection `conn_id`, sealed as it would be."""
    conn = connection(sender, conn_id)
    key = frames.traffic_key(
        bytes(sender.key_state(str(conn.peer)).open_key(t)), sender.tvd, sender.me,
        str(conn.peer), t, conn.local_nonce, conn.peer_nonce, sender.instance,
        conn.peer_instance,
    )  # fmt: skip
    frame = frames.seal_data(frames.new_aead(key), t, conn.send_n, msgpack.packb(items))
    conn.send_n += 1
    return frame


def test_a_forged_instance_cannot_renumber_or_crash_with_a_huge_ack() -> None:
    """A holder of SK_1 poses as a new instance of vm-a whose first frame acknowledges
    2**64-1: it acknowledges nothing, renumbers nothing, and B goes on."""
    tvd = Tvd()
    a, b, link = opened(tvd, mid(1))
    now = mid(1)
    thief = forger(tvd, 1, now)
    attack = Link(thief, b, now)
    attack.pump(now)  # HELLOs and first frames: the thief's instance authenticates at B
    b.send("vm-a", "pending", now)
    forged = _authenticated_frame(thief, attack.conn_a, b, 1, [[frames.ACK, 2**64 - 1, None]])
    b.receive_data(attack.conn_b, forged, now)
    b.data_to_send(attack.conn_b, now)  # no OverflowError: nothing was renumbered
    assert b.unacknowledged("vm-a") == 1
    assert b.stats["numberings_resumed"] == 0
    b.send("vm-a", "later", now)  # sending still works


def test_a_forged_ack_during_the_overlap_renumbers_nothing() -> None:
    """An on-path holder of SK_1 injects ACK 1000 under SK_1 during the overlap, on the
    pair's open connection: it is a protocol error and nothing else (no stall after)."""
    tvd = Tvd()
    a, b, link = opened(tvd, mid(1))
    now = START_2 + 0.2
    tvd.update_all(2, START_2 + 0.1)
    forged = _authenticated_frame(a, link.conn_a, b, 1, [[frames.ACK, 1000, None]])
    for i in range(3):
        b.send("vm-a", i, now)
    b.receive_data(link.conn_b, forged, now)
    link.pump(now)
    assert [body for _, body in received(a)] == [0, 1, 2]
    assert b.unacknowledged("vm-a") == 0
    assert b.stats["numberings_resumed"] == 0


def test_a_flood_of_key_items_keeps_no_state_beyond_the_newest() -> None:
    tvd = Tvd()
    a, b, link = opened(tvd, mid(1))
    items: list[Any] = [[frames.KEY, 1 + i % 900, None] for i in range(20_000)]
    frame = _authenticated_frame(a, link.conn_a, b, 1, items)
    b.receive_data(link.conn_b, frame, mid(1))
    conn = connection(b, link.conn_b)
    assert conn.key_seen == 900 and not hasattr(conn, "__dict__")
    a.send("vm-b", "still fine", mid(1))
    link.pump(mid(1))
    assert received(b) == [(1, "still fine")]


def test_a_reject_on_a_strangers_connection_touches_nothing() -> None:
    """SPEC §4: a stranger's REJECT cannot make the sender re-send its window."""
    tvd = Tvd()
    a, b, link = opened(tvd, mid(1))
    now = mid(1)
    for i in range(50):
        a.send("vm-b", i, now)
    in_flight = a.data_to_send(link.conn_a, now)  # sealed, not yet arrived
    stranger = a.accept(now, "203.0.113.9")
    a.receive_data(
        stranger, frames.encode_hello("test-tvd", "vm-b", "vm-a", b"n" * 16, b"stranger"), now
    )
    a.data_to_send(stranger, now)
    for n in range(10):
        a.receive_data(stranger, frames.encode_reject(1, n, "expired", 1), now)
    resends = a.stats["resends"]
    b.receive_data(link.conn_b, in_flight, now)
    link.pump(now)  # B's ACK is an authenticated frame: after a real REJECT, a re-send
    assert a.stats["resends"] == resends
    assert a.unacknowledged("vm-b") == 0


def test_an_early_key_without_the_previous_one_dials_when_its_period_starts() -> None:
    """A node that held no key gets period 2's 1 s early: a message sent then goes out
    at the start of period 2, not a period later."""
    tvd = Tvd()
    a = tvd.session("vm-a")
    tvd.update("vm-a", 2, START_2 - 1.0)
    a.send("vm-b", "hello", START_2 - 0.5)
    assert not [e for e in events(a) if isinstance(e, Dial)]  # no key of period 1
    assert a.next_deadline() == START_2
    a.handle_timeout(START_2)
    assert Dial("vm-b") in events(a)


def test_the_older_key_goes_when_its_last_connection_fails_authentication() -> None:
    tvd = Tvd()
    a, b, link = opened(tvd, mid(1))
    tvd.update("vm-a", 2, START_2 + 0.1)
    older = a.key_state("vm-b").open_key(1)
    garbage = frames.seal_data(
        frames.new_aead(bytes(32)), 1, connection(a, link.conn_a).recv_n, b"\x90"
    )
    a.receive_data(link.conn_a, garbage, START_2 + 0.3)
    assert a.stats["auth_failures"] == 1
    assert older == bytearray(32) and a.key_state("vm-b").older is None


def test_a_backslash_from_a_stranger_is_escaped_too() -> None:
    assert frames.printable("a\\nb\n") == "a\\\\nb\\n"


# ---------------------------------------------------------------- key changes spread out


def spread_pair(tvd: Tvd, now: float) -> tuple[Session, Session, Link]:
    """Two sessions that spread their key changes (KEY_CHANGE_SPREAD), connected in
    period 1."""
    return opened(tvd, now, key_change_spread=KEY_CHANGE_SPREAD)


def test_a_pair_that_can_go_on_derives_its_new_key_at_its_own_offset() -> None:
    """The first key is derived at once; a later one, while SK_{t-1} serves, at an
    offset both ends compute alike, within a quarter of min(allowance, period)."""
    tvd = Tvd()
    a, b, link = spread_pair(tvd, mid(1))
    assert a.key_state("vm-b").period == 1  # no previous key to go on with: at once
    now = START_2 + 0.05
    assert tvd.update("vm-a", 2, now) == (1, [])  # taken (acknowledged as applied) ...
    tvd.update("vm-b", 2, now)
    assert a.key_state("vm-b").period == b.key_state("vm-a").period == 1  # ... not derived
    due = a.next_deadline()
    assert now < due <= now + min(2.0, 10.0) / 4
    assert b.next_deadline() == due  # the same offset at both ends
    a.send("vm-b", "meanwhile", now)
    link.pump(now)
    assert received(b) == [(1, "meanwhile")]  # the pair talks on under SK_1
    a.handle_timeout(due)
    b.handle_timeout(due)
    link.pump(due + KEY_DUE)
    a.handle_timeout(due + KEY_DUE)
    b.handle_timeout(due + KEY_DUE)
    link.pump(due + KEY_DUE)
    assert a.key_state("vm-b").period == b.key_state("vm-a").period == 2
    a.send("vm-b", "after", due + 0.2)
    link.pump(due + 0.2)
    assert received(b) == [(2, "after")]


def test_an_update_in_the_second_half_of_the_overlap_is_derived_at_once() -> None:
    """A node whose update comes late (a busy bridge or host) keeps half the overlap of
    SK_1 (min(allowance, period)/2 = 1 s here) to use SK_2 before its peer erases SK_1:
    from the middle of the overlap on, nothing waits for an offset."""
    tvd = Tvd()
    a, b, link = spread_pair(tvd, mid(1))
    late = START_2 + min(2.0, 10.0) / 2
    tvd.update("vm-a", 2, late)
    assert a.key_state("vm-b").period == 2
    tvd.update("vm-b", 2, late - 0.9)  # on time: it waits for its offset
    assert b.key_state("vm-a").period == 1


def test_a_frame_under_the_new_period_derives_the_key_at_once() -> None:
    """vm-b derived period 2 already (no spread) and seals under it: vm-a, holding the
    partial, derives it when that frame comes rather than refuse it as `unknown`."""
    tvd = Tvd()
    a = tvd.session("vm-a", key_change_spread=KEY_CHANGE_SPREAD)
    b = tvd.session("vm-b")
    tvd.update_all(1, mid(1))
    link = Link(a, b, mid(1))
    link.pump(mid(1))
    now = START_2 + 0.05
    tvd.update("vm-a", 2, now)
    assert a.key_state("vm-b").period == 1
    tvd.update("vm-b", 2, now)  # KEY 2 to vm-a, under SK_1: vm-a derives on learning it
    link.pump(now + KEY_DUE)
    b.handle_timeout(now + KEY_DUE)
    link.pump(now + KEY_DUE)
    assert a.key_state("vm-b").period == 2
    assert a.stats["rejected_unknown"] == 0
    # And a new connection whose first frame is under period 2 finds the key there.
    c = tvd.session("vm-a", key_change_spread=KEY_CHANGE_SPREAD, instance=b"\x07" * 8)
    c.apply_update(1, tvd.partials("vm-a", 1), mid(1))
    c.apply_update(2, tvd.partials("vm-a", 2), now)
    assert c.key_state("vm-b").period == 1
    second = Link(b, c, now + 0.1)
    second.pump(now + 0.1)
    assert c.key_state("vm-b").period == 2 and c.stats["rejected_unknown"] == 0


def test_a_partial_waiting_for_its_time_is_erased_with_the_peer() -> None:
    tvd = Tvd(("vm-a", "vm-b", "vm-c"))
    a = tvd.session("vm-a", key_change_spread=KEY_CHANGE_SPREAD)
    tvd.update("vm-a", 1, mid(1))
    partials = tvd.partials("vm-a", 2)
    a.apply_update(2, partials, START_2 + 0.01)
    assert all(p == bytes(32) for p in partials.values())  # the caller's copies zeroed
    assert set(a._pending) == {"vm-b", "vm-c"}
    waiting = a._pending["vm-c"][1]
    a.set_members(["vm-a", "vm-b"], START_2 + 0.02)
    assert waiting == bytes(32) and set(a._pending) == {"vm-b"}
    waiting = a._pending["vm-b"][1]
    a.erase_all_keys()
    assert waiting == bytes(32) and a._pending == {}


def test_a_connection_the_node_may_not_send_on_yet_does_not_spin_its_timer() -> None:
    """Found with the spread key changes: an open connection whose peer had not
    authenticated, on a node that may send nothing there yet (no key for the current
    period), re-armed its keepalive timer at a time already past, and the node's timer
    task spun. Here vm-a holds no key for period 5 (cut off) when vm-b connects."""
    tvd = Tvd()
    a, b = tvd.session("vm-a"), tvd.session("vm-b")
    tvd.update("vm-a", 1, mid(1))
    tvd.update("vm-b", 5, mid(5))
    now = mid(5)
    link = Link(b, a, now)
    link.pump(now)
    assert a.connection_state(link.conn_b) is ConnectionState.OPEN
    later = now + 11.0  # past the keepalive interval; nothing was sent since the HELLO
    a.handle_timeout(later)
    assert a.next_deadline() > later

"""The sans-I/O peer protocol of one node (SPEC §4, revision 2): bytes and `now` in,
events and bytes out.

`Session` holds everything a node knows about its TVD peers: their period keys (at most
two per pair, `scheme.PairKeys`), the delivery state (`delivery.PeerDelivery`: the
keep-until-acked messages and one numbering per peer instance) and the state of every
connection. It never touches a socket or a clock; whoever drives it passes the time into
every call and moves bytes between it and the network:

    conn = session.connect("vm-b", now)          # or session.accept(now, source)
    stream.send_all(session.data_to_send(conn, now))
    session.receive_data(conn, data, now)        # b"" at EOF
    while (event := session.next_event()) is not None: ...
    session.handle_timeout(now)                  # at session.next_deadline()

Where the rules live:
- HELLO checks, the counter, the period rules: `_on_hello`, `_on_data`, `_usable`.
- Which key seals what, KEY and ACK: `data_to_send`, `_seal_period`, `_seal_pending`.
- What happens at a period change (two keys, the overlap, erasure): `apply_update` (derive
  and erase only), then `_do_key_work` -> `_key_changed` from `handle_timeout`, `_key_soon`
  (KEY within KEY_DELAY + KEY_SPREAD, under the spec's 100 ms), `_usable`, `_retire_older`,
  `_on_key_timer`.
- Acknowledgement as a set, numbering per instance, restarts and forgeries:
  `_on_ack`, `_on_authenticated` (with `delivery.py`).
- One connection per pair and the tie-breaks: `_on_authenticated`, `_tie_break`.
- Strangers: `accept` (the cap and who is displaced), `_maybe_dial` (whom they never stop).
- Re-sending, back-off, dialing, keepalive and timeouts: `handle_timeout` and `_on_*_timer`.
"""

from __future__ import annotations

import enum
import hashlib
import itertools
import math
import secrets
from collections import Counter, OrderedDict, defaultdict, deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, cast

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from . import frames
from .constants import (
    DEPARTED_PEERS,
    DIAL_BACKOFF_INITIAL,
    DIAL_BACKOFF_MAX,
    FORGOTTEN_INSTANCES,
    HANDSHAKE_TIMEOUT,
    IDLE_TIMEOUT,
    INSTANCE_LEN,
    KEEPALIVE_INTERVAL,
    KEPT_INSTANCES,
    KEY_CHANGE_SPREAD,
    KEY_DELAY,
    KEY_SLOTS,
    KEY_SPREAD,
    KEY_WORK_CHUNK,
    MAX_UNAUTHENTICATED,
    MESSAGE_LIMIT,
    NONCE_LEN,
    PLAINTEXT_LIMIT,
    RESEND_INITIAL,
    RESEND_MAX,
    SEND_WINDOW_BYTES,
    SEND_WINDOW_MESSAGES,
    SKEW_ALLOWANCE,
)
from .delivery import Numbering, OutMessage, PeerDelivery
from .errors import FrameError, MessageTooLarge, UnknownPeer, UnserializableBody, WindowFull
from .events import (
    ConnectionAuthenticated,
    Dial,
    Event,
    KeyErased,
    Message,
    MessagesAcknowledged,
    PeerRestarted,
    Refused,
    SendFailed,
)
from .ids import id_order_key
from .reader import UNPACK_ERRORS, StreamDecodeError
from .scheme import ComputerKeys, PairKeys, Schedule, UpdateResult
from .timers import Timers

__all__ = ["ConnectionState", "Session"]

_AUTH_FAILURE: Final = "auth-failure"
_CLOSED_UNAUTHENTICATED: Final = "closed-unauthenticated"
_MSG_HEADER: Final = msgpack.packb([frames.MSG, 0, None])[:2]  # fixarray(3), kind 0
_EXPIRED: Final = "expired"
_UNKNOWN: Final = "unknown"


class ConnectionState(enum.Enum):
    AWAIT_HELLO = "await-hello"  # responder, waiting for the initiator's HELLO
    HELLO_SENT = "hello-sent"  # initiator, waiting for the responder's HELLO
    OPEN = "open"  # both HELLOs exchanged
    CLOSING = "closing"  # a CLOSE is queued; nothing more is read or sealed
    CLOSED = "closed"


class _Connection:
    __slots__ = (
        "ack_wanted",
        "authenticated_at",
        "first_backoff",
        "frame_max",
        "id",
        "initiator",
        "key_seen",
        "key_wanted",
        "last_auth_recv",
        "last_send",
        "local_nonce",
        "opened_at",
        "out",
        "peer",
        "peer_instance",
        "peer_nonce",
        "reader",
        "recv_aead",
        "recv_n",
        "send_aead",
        "send_n",
        "sent_upto",
        "shown",
        "source",
        "state",
    )

    def __init__(
        self, conn_id: int, initiator: bool, peer: str | None, now: float, source: str | None
    ) -> None:
        self.id = conn_id
        self.initiator = initiator
        self.peer = peer
        self.source = source  # the address an accepted connection came from
        self.state = ConnectionState.HELLO_SENT if initiator else ConnectionState.AWAIT_HELLO
        self.local_nonce = b""
        self.peer_nonce = b""
        self.peer_instance = b""
        self.send_n = 0  # SPEC §4: counts DATA frames per direction, across periods
        self.recv_n = 0
        self.authenticated_at: float | None = None  # the peer's first DATA frame here
        self.frame_max = 0  # the newest period of an authenticated frame from the peer here
        self.key_seen = 0  # the newest KEY the peer sent here
        self.reader = frames.new_reader()
        self.out = bytearray()
        # Traffic keys as AEAD objects, by period, per direction (SPEC §4: dropped with
        # the period key they come from).
        self.send_aead: dict[int, AESGCM] = {}
        self.recv_aead: dict[int, AESGCM] = {}
        self.sent_upto = 0  # the highest message number sealed here, in its numbering
        self.ack_wanted = False
        self.key_wanted = False
        self.first_backoff = RESEND_INITIAL  # KEY+ACK again until the peer authenticates
        self.opened_at = now
        self.last_send = now
        self.last_auth_recv = now

    @property
    def authenticated(self) -> bool:
        return self.authenticated_at is not None

    def peer_holds(self, t: int) -> bool:
        """SPEC §4: the peer is known to hold period t's key (on this connection): its
        newest KEY here was t or t+1, or its newest authenticated frame here was under t.
        (Only the newest of each are kept: a hostile peer cannot grow this state.)"""
        return t == self.key_seen or t + 1 == self.key_seen or t == self.frame_max

    def drop_traffic_keys(self, period: int | None = None) -> None:
        if period is None:
            self.send_aead.clear()
            self.recv_aead.clear()
        else:
            self.send_aead.pop(period, None)
            self.recv_aead.pop(period, None)


class _Peer:
    __slots__ = (
        "active",
        "conns",
        "delivery",
        "dial_backoff",
        "dialing",
        "id",
        "keys",
        "pair_label",
        "refused_expired",
        "refused_unknown",
        "rejected",
        "resend_backoff",
    )

    def __init__(self, peer: str, keys: PairKeys, pair_label: bytes) -> None:
        self.id = peer
        self.pair_label = pair_label  # the pair's ids in order, for `_pair_fraction`
        self.keys = keys
        self.delivery = PeerDelivery()
        self.conns: set[_Connection] = set()
        self.active: _Connection | None = None  # the authenticated connection we keep
        self.rejected = False  # a REJECT came since the last re-send
        self.refused_expired = 0  # the REJECTs this node sent it, by reason
        self.refused_unknown = 0
        self.resend_backoff = RESEND_INITIAL
        self.dialing = False
        self.dial_backoff = DIAL_BACKOFF_INITIAL


def _timer(kind: str, name: str | int) -> tuple[str, str | int]:
    return (kind, name)


_KEY_WORK: Final = _timer("key-work", 0)
_GOLDEN: Final = (math.sqrt(5) - 1) / 2


def _pair_label(me: str, peer: str) -> bytes:
    """The pair's two ids in their order (the same at both ends), for `_pair_fraction`."""
    lo, hi = sorted((me, peer), key=id_order_key)
    return f"{lo}\x00{hi}\x00".encode()


def _pair_fraction(pair_label: bytes, t: int) -> float:
    """A number in [0, 1) that both nodes of a pair compute alike for period t."""
    digest = hashlib.blake2s(pair_label + str(t).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def _key_delay(conn_id: int) -> float:
    """How long after a KEY event this connection's KEY leaves: KEY_DELAY plus one of
    KEY_SLOTS steps across KEY_SPREAD, picked by a low-discrepancy sequence of the
    connection id (a thousand connections spread evenly over the slots, and the same
    ones every time); a few slots rather than one time per connection, so a hub's timer
    wakes a few times for its thousand KEYs, not a thousand times."""
    slot = int((conn_id * _GOLDEN) % 1.0 * KEY_SLOTS)
    return KEY_DELAY + slot * KEY_SPREAD / (KEY_SLOTS - 1)


class Session:
    """The peer protocol state of one node toward every member of its TVD (SPEC §4).

    `keys` are the node's computer master keys; `members` the current TVD members (by
    default the peers `keys` names, plus the node itself). `max_unauthenticated` caps
    the accepted connections that have not authenticated yet. `instance` and `randbytes`
    exist for test vectors; leave them alone otherwise.
    """

    def __init__(
        self,
        keys: ComputerKeys,
        schedule: Schedule,
        *,
        members: Iterable[str] | None = None,
        instance: bytes | None = None,
        randbytes: Callable[[int], bytes] = secrets.token_bytes,
        allowance: float = SKEW_ALLOWANCE,
        window_messages: int = SEND_WINDOW_MESSAGES,
        window_bytes: int = SEND_WINDOW_BYTES,
        max_unauthenticated: int = MAX_UNAUTHENTICATED,
        key_change_spread: float = KEY_CHANGE_SPREAD,
    ) -> None:
        self.tvd = keys.tvd
        self.me = keys.vm
        self.schedule = schedule
        self.allowance = allowance
        self._computer_keys = keys
        self._randbytes = randbytes
        self.instance = instance if instance is not None else randbytes(INSTANCE_LEN)
        if len(self.instance) != INSTANCE_LEN:
            raise ValueError(f"an instance is {INSTANCE_LEN} bytes")
        self._window_messages = window_messages
        self._window_bytes = window_bytes
        self._max_unauthenticated = max_unauthenticated
        self._packer = msgpack.Packer()
        self._peers: dict[str, _Peer] = {}
        self._members: set[str] = set()
        self._conns: dict[int, _Connection] = {}
        self._strangers: dict[int, _Connection] = {}  # accepted, not yet authenticated
        self._conn_ids = itertools.count(1)
        self._handles = itertools.count(1)
        self._events: deque[Event] = deque()
        self._timers = Timers()
        self._ready: set[int] = set()
        self._key_work: dict[str, _Peer] = {}  # new keys whose key change is still to do
        self._departed: OrderedDict[str, PeerDelivery] = OrderedDict()  # removed peers
        self._delivering = True
        # Partials taken and not yet derived (see KEY_CHANGE_SPREAD): peer -> (t, partial).
        self._pending: dict[str, tuple[int, bytearray]] = {}
        self._spread = min(key_change_spread, min(allowance, schedule.period_s) / 4)
        # Counters (a defaultdict: a Counter's += costs twice as much, on every message).
        self.stats: defaultdict[str, int] = defaultdict(int)
        self.set_members(keys.peers if members is None else members, now=-math.inf)

    def __repr__(self) -> str:
        return (
            f"<Session tvd={self.tvd!r} me={self.me!r} peers={len(self._peers)} "
            f"connections={len(self._conns)}>"
        )

    # ------------------------------------------------------------------ membership and keys

    @property
    def peers(self) -> list[str]:
        """Members this node can talk to: it holds a computer key for each."""
        return list(self._peers)

    def has_peer(self, peer_id: str) -> bool:
        """Whether `peer_id` is in `peers` (without building the list)."""
        return peer_id in self._peers

    @property
    def members(self) -> frozenset[str]:
        return frozenset(self._members)

    def key_state(self, peer: str) -> PairKeys:
        return self._peer(peer).keys

    def set_members(self, members: Iterable[str], now: float) -> list[str]:
        """Replace the member list (SPEC §5 `members`); returns the members without a key.

        Removed peers lose their period keys and the number, their connections and their
        queued messages (each reported as SendFailed); the key file is never touched. How
        far each of their instances had delivered is remembered (DEPARTED_PEERS peers at
        most), so that one added back resumes its numbering rather than restart it.
        """
        new = set(members)
        new.add(self.me)
        for peer in [p for p in self._peers if p not in new]:
            self._remove_peer(self._peers.pop(peer), now)
        missing = []
        for member in sorted(new - {self.me}, key=id_order_key):
            if member in self._peers:
                continue
            if member not in self._computer_keys:
                missing.append(member)
                continue
            keys = PairKeys(self.tvd, self.me, member, self.schedule, self.allowance)
            label = _pair_label(self.me, member)
            returning = self._peers[member] = _Peer(member, keys, label)
            departed = self._departed.pop(member, None)
            if departed is not None:
                # Back while both processes run: its instances resume their numberings.
                returning.delivery = departed
        self._members = new
        return missing

    def _remove_peer(self, peer: _Peer, now: float) -> None:
        peer.keys.forget()
        self._key_work.pop(peer.id, None)
        self._drop_pending(peer.id)
        for conn in list(peer.conns):
            self._close(conn, frames.NOT_A_MEMBER, "the peer left the TVD", now)
        for message in peer.delivery.forget(FORGOTTEN_INSTANCES):
            self._events.append(SendFailed(peer.id, message.handle, "the peer left the TVD"))
        # Kept (bounded) in case it is added back while both processes run.
        self._departed[peer.id] = peer.delivery
        self._departed.move_to_end(peer.id)
        while len(self._departed) > DEPARTED_PEERS:
            self._departed.popitem(last=False)
        for kind in ("resend", "dial", "key"):
            self._timers.cancel(_timer(kind, peer.id))

    def apply_update(
        self, t: int, partials: Mapping[str, bytearray], now: float
    ) -> tuple[int, list[str]]:
        """U for every pair in a key-channel `update` of period t (SPEC §5).

        Returns (how many of its partials this node now holds period t for, the peers it
        has no computer key for). Partials of non-members are ignored. Every partial is
        zeroed. Whether the whole update is early is the caller's decision (it answers
        `early` instead of calling this).

        For more than KEY_WORK_CHUNK new keys, only the keys are derived (and the ones
        they replace erased) here, so that the update can be acknowledged at once; the
        rest of each key change (KEY to the peer, erasure timers, dialing) is due now in
        `handle_timeout`, KEY_WORK_CHUNK peers per call, so that a hub's 1,200 key
        changes do not hold up its traffic. Fewer are done here.
        """
        self.schedule.check(t)
        applied = 0
        missing: list[str] = []
        latest = self._latest_derivation(t, now)
        for peer_id, partial in partials.items():
            peer = self._peers.get(peer_id)
            if peer is None:
                partial[:] = bytes(len(partial))
                if peer_id in self._members and peer_id != self.me:
                    missing.append(peer_id)
                continue
            keys = peer.keys
            # KEY_CHANGE_SPREAD: a pair that holds SK_{t-1} derives SK_t at its offset,
            # unless that comes too late for the overlap (a first key, a lost one, or an
            # update that is early, old or repeated, is derived or refused at once).
            if latest is not None and keys.period == t - 1 and keys.has_key:
                due = now + self._spread * _pair_fraction(peer.pair_label, t)
                if due < latest:
                    self._defer(peer_id, t, partial, due)
                    applied += 1
                    continue
            waiting = self._pending.get(peer_id)
            if waiting is not None and waiting[0] <= t:
                self._drop_pending(peer_id)  # overtaken by this update
            comp_key = self._computer_keys.get(peer_id)
            assert comp_key is not None  # a _Peer exists only with a computer key
            result, erased = peer.keys.apply(t, partial, comp_key, now)
            if erased:
                self._erased(peer, erased)
            if result is UpdateResult.APPLIED:
                self._key_work[peer_id] = peer
            if peer.keys.period == t and peer.keys.has_key:
                applied += 1
        if len(self._key_work) > KEY_WORK_CHUNK:
            self._timers.set_earliest(_KEY_WORK, now)
        elif self._key_work:
            self._do_key_work(now)  # a few pairs: no reason to wake again for them
        return applied, missing

    def _latest_derivation(self, t: int, now: float) -> float | None:
        """Until when a pair may wait to derive period t's key (KEY_CHANGE_SPREAD), or
        None when none waits for an update of period t arriving now: spreading is off,
        t is the first period, or the update is early or stale (refused at once)."""
        if not self._spread or t < 2:
            return None
        schedule, allowance = self.schedule, self.allowance
        if not schedule.start(t) - allowance <= now < schedule.end(t) + allowance:
            return None  # what PairKeys.classify calls EARLY or STALE
        # The peer drops SK_{t-1} at the latest when the overlap ends (SPEC §4): a node
        # derives by the middle of the overlap, so that a late update (a busy bridge or
        # host) keeps half the overlap to use the new key before the old one goes.
        return schedule.start(t) + min(allowance, schedule.period_s) / 2

    def _defer(self, peer_id: str, t: int, partial: bytearray, due: float) -> None:
        """Keep a copy of the partial to derive period t's key at `due`; zero `partial`."""
        waiting = self._pending.get(peer_id)
        if waiting is None or waiting[0] != t:  # sent again: the first copy stays
            if waiting is not None:
                self._drop_pending(peer_id)
            self._pending[peer_id] = (t, bytearray(partial))
            self._timers.set(("derive", peer_id), due)  # _timer(), inline: 1,200 a period
        partial[:] = bytes(len(partial))

    def _derive_pending(self, peer_id: str, now: float) -> None:
        """Derive the key a pair was waiting to derive (its time came, or it is needed)."""
        waiting = self._pending.pop(peer_id, None)
        if waiting is None:
            return
        self._timers.cancel(_timer("derive", peer_id))
        t, partial = waiting
        peer = self._peers[peer_id]
        comp_key = self._computer_keys.get(peer_id)
        assert comp_key is not None
        result, erased = peer.keys.apply(t, partial, comp_key, now)
        if erased:
            self._erased(peer, erased)
        if result is UpdateResult.APPLIED:
            self._key_changed(peer, now)

    def _drop_pending(self, peer_id: str) -> None:
        waiting = self._pending.pop(peer_id, None)
        if waiting is not None:
            waiting[1][:] = bytes(len(waiting[1]))
            self._timers.cancel(_timer("derive", peer_id))

    def stop_delivering(self) -> None:
        """From now on no new message is delivered, so none is acknowledged: the node is
        closing and its application takes only what was already delivered.

        A MSG that arrives after this is counted (`undelivered_closing`) and left to its
        sender, which keeps it until another instance of this node acknowledges it. ACKs
        still go out (they say what was delivered, which no longer grows), and everything
        else (KEY, the peer's ACKs, this node's own sends) goes on."""
        self._delivering = False

    @property
    def delivering(self) -> bool:
        """False once `stop_delivering` was called."""
        return self._delivering

    def erase_all_keys(self) -> None:
        """Forget every period key and its number (a welcome with another schedule, SPEC §5)."""
        self._key_work.clear()
        for peer_id in list(self._pending):
            self._drop_pending(peer_id)
        for peer in self._peers.values():
            peer.keys.forget()
            self._timers.cancel(_timer("key", peer.id))
            for conn in peer.conns:
                conn.drop_traffic_keys()

    def _do_key_work(self, now: float) -> None:
        """The key changes `apply_update` left, KEY_WORK_CHUNK at a time."""
        work = self._key_work
        for _ in range(min(KEY_WORK_CHUNK, len(work))):
            peer_id = next(iter(work))
            self._key_changed(work.pop(peer_id), now)
        if work:
            self._timers.set(_KEY_WORK, now)

    def _key_soon(self, conn: _Connection, now: float) -> None:
        """SPEC §4: KEY+ACK within 100 ms of a new key or of learning the peer's. It
        leaves after `_key_delay` (a frame sent meanwhile carries it instead), so that one
        frame answers both when they come close together; it says the newest period
        when it leaves."""
        conn.key_wanted = conn.ack_wanted = True
        self._timers.set_earliest(_timer("key-send", conn.id), now + _key_delay(conn.id))

    def _key_changed(self, peer: _Peer, now: float) -> None:
        """A new period key for `peer` (SPEC §4 Key changes): KEY+ACK on every open
        connection within 100 ms, the back-off reset with a re-send at once if it was
        backing off, and the older key retired when no connection accepts it any more.

        Only a sender that was backing off re-sends: without a REJECT, what it sent is
        still on its way over a stream that keeps it, and a re-send of every message in
        flight at each period change is a burst of duplicates (as for an authenticated
        DATA frame, `_on_data`)."""
        for conn in peer.conns:
            if conn.state is ConnectionState.OPEN:
                self._key_soon(conn, now)
        backing_off = peer.rejected or peer.resend_backoff > RESEND_INITIAL
        peer.rejected = False
        peer.resend_backoff = RESEND_INITIAL
        if backing_off and peer.active is not None and peer.delivery.unacknowledged():
            self._resend_all(peer, peer.active, now)
        self._retire_older(peer, now)
        self._schedule_key_timer(peer, now)
        self._maybe_dial(peer, now)

    def _schedule_key_timer(self, peer: _Peer, now: float) -> None:
        """Wake at the next erasure deadline, or at the start of the newest key's period
        while the older key is still held (from then on fewer connections accept it)."""
        keys = peer.keys
        when = keys.deadline()
        if keys.has_key:
            # At the start of the newest key's period (it may have come early): fewer
            # connections accept the older key, and a new connection can open now.
            start = self.schedule.start(keys.period)
            if start > now:
                when = min(when, start)
        key = _timer("key", peer.id)
        if when == math.inf:
            self._timers.cancel(key)
        else:
            self._timers.set(key, when)

    def _erased(self, peer: _Peer, periods: Iterable[int]) -> None:
        """SPEC §4 Erasure: every traffic key and AEAD object from these keys is dropped."""
        for period in periods:
            for conn in peer.conns:
                conn.drop_traffic_keys(period)
            self.stats["keys_erased"] += 1
            self._events.append(KeyErased(peer.id, period))

    def _retire_older(self, peer: _Peer, now: float) -> None:
        """Erase SK_{P-1} once this node holds SK_P, its clock is in period P, and no open
        connection of the pair still accepts SK_{P-1} (SPEC §4 Key changes)."""
        keys = peer.keys
        older = keys.older
        if older is None or not older.held or not keys.has_key:
            return
        if now < self.schedule.start(keys.period):
            return
        if any(self._usable(conn, older.period, now) for conn in peer.conns):
            return
        erased = keys.erase_older()
        if erased is not None:
            self._erased(peer, [erased])
            # Its erasure deadline is gone: a key timer left there would wake for
            # nothing (a hub's thousand at once, `allowance` after every period change).
            self._schedule_key_timer(peer, now)

    # ------------------------------------------------------------------ the period rules

    def _ended(self, t: int, now: float) -> float | None:
        """When period t ended by this node's clock (the start of t+1), or None if not yet."""
        end = self.schedule.end(t)
        return end if now >= end else None

    def _usable(self, conn: _Connection, t: int, now: float) -> bool:
        """Whether period t's key may seal or open frames on `conn` now (SPEC §4).

        It must be held and not past its lifetime; a connection stops accepting a period
        at its first authenticated frame under a newer one; and once period t has ended
        by this node's clock, only connections authenticated before then may use it.
        """
        keys = self._peers[cast(str, conn.peer)].keys
        if keys.get(t) is None or now >= keys.lifetime(t) or t < conn.frame_max:
            return False
        ended = self._ended(t, now)
        if ended is None:
            return True
        return conn.authenticated_at is not None and conn.authenticated_at < ended

    def _status(self, conn: _Connection, peer: _Peer, t: int, now: float) -> str | None:
        """SPEC §4 period rules for a DATA frame of period t: None (decrypt it), or the
        REJECT reason."""
        newest = peer.keys.period
        if newest == 0 or t > newest:
            return _UNKNOWN
        if t < newest - 1 or not self._usable(conn, t, now):
            return _EXPIRED
        return None

    def _seal_period(self, conn: _Connection, peer: _Peer, now: float) -> int | None:
        """The period whose key seals on `conn` now, or None (send nothing yet).

        Before the peer authenticates here: only the key of the period current by this
        node's clock. After: the newest key the peer is known to hold; without that
        knowledge the older key while it is usable here, then the newest (SPEC §4).
        """
        keys = peer.keys
        if not conn.authenticated:
            try:
                current = self.schedule.period_at(now)
            except Exception:  # before the epoch or after the last period
                return None
            return current if self._usable(conn, current, now) else None
        newest = keys.period
        if self._usable(conn, newest, now) and conn.peer_holds(newest):
            return newest
        if newest > 1 and self._usable(conn, newest - 1, now):
            return newest - 1
        if self._usable(conn, newest, now):
            return newest
        return None

    # ------------------------------------------------------------------ application side

    def send(self, peer_id: str, body: Any, now: float) -> int:
        """Queue `body` for `peer_id`; returns the handle that MessagesAcknowledged will name."""
        peer = self._peers.get(peer_id)
        if peer is None:
            why = (
                "not a member of the TVD"
                if peer_id not in self._members or peer_id == self.me
                else "no computer key for this peer"
            )
            raise UnknownPeer(peer_id, why)
        delivery = peer.delivery
        if (
            delivery.pending_count >= self._window_messages
            or delivery.pending_bytes >= self._window_bytes
        ):
            raise WindowFull(
                f"{delivery.unacknowledged()} messages to {peer_id!r} await acknowledgement"
            )
        try:
            body_packed = self._packer.pack(body)
        except (TypeError, ValueError, OverflowError) as exc:
            raise UnserializableBody(f"msgpack cannot encode the body: {exc}") from None
        # SPEC §4: the packed [0, seq, body], seq the number it takes in the numbering
        # that uses the most digits (a copy goes into each). This is every message's
        # path: calls are inlined where one per message would cost (benchmarks/steps.py).
        numberings = delivery.numberings
        if len(numberings) == 1:
            (numbering,) = numberings.values()
            seq = numbering.next_seq
        else:
            seq = max((n.next_seq for n in numberings.values()), default=1)
        pack = self._packer.pack
        header = _MSG_HEADER + pack(seq)
        size = len(header) + len(body_packed)
        if size > MESSAGE_LIMIT:
            raise MessageTooLarge(
                f"the packed message is {size} bytes; the limit is {MESSAGE_LIMIT}"
            )
        message = OutMessage(next(self._handles), body_packed, size)
        delivery.add(message)
        for numbering in numberings.values():
            if numbering.next_seq != seq:
                numbering.add(message, self._msg_header(numbering.next_seq) + body_packed)
            else:
                numbering.add(message, header + body_packed)
        self.stats["sent"] += 1
        if peer.active is not None:
            self._ready.add(peer.active.id)
        else:
            self._maybe_dial(peer, now)
        return message.handle

    def _msg_header(self, seq: int) -> bytes:
        """The packed [0, seq, ...] up to the body."""
        return _MSG_HEADER + self._packer.pack(seq)

    def window_open(self, peer_id: str) -> bool:
        """Whether `send` to this peer would be accepted now (the send window has room)."""
        delivery = self._peer(peer_id).delivery
        return (
            delivery.unacknowledged() < self._window_messages
            and delivery.pending_bytes < self._window_bytes
        )

    def unacknowledged(self, peer_id: str) -> int:
        """Messages sent to `peer_id` that no instance of it has acknowledged."""
        return self._peer(peer_id).delivery.unacknowledged()

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def take_events(self) -> deque[Event]:
        """Every event so far, in order, at once (a node's loop: one call, not one per
        event); the session starts a new queue when there were any."""
        events = self._events
        if events:
            self._events = deque()
        return events

    def _peer(self, peer_id: str) -> _Peer:
        peer = self._peers.get(peer_id)
        if peer is None:
            raise UnknownPeer(peer_id, "not a member this node holds a key for")
        return peer

    # ------------------------------------------------------------------ connections

    def connect(self, peer_id: str, now: float) -> int:
        """A new outgoing connection to `peer_id`; its HELLO is ready to send."""
        peer = self._peer(peer_id)
        conn = self._new_connection(True, peer_id, now, None)
        peer.conns.add(conn)
        peer.dialing = False
        conn.local_nonce = self._randbytes(NONCE_LEN)
        conn.out += frames.encode_hello(self.tvd, self.me, peer_id, conn.local_nonce, self.instance)
        self._ready.add(conn.id)
        return conn.id

    def accept(self, now: float, source: str | None = None) -> int:
        """A new incoming connection from `source` (its address); it waits for the
        initiator's HELLO.

        SPEC §4: at the cap of accepted connections that have not authenticated, the
        oldest one of the source address that holds the most of them makes way, so that
        a flood from some addresses cannot keep a member at another one out.
        """
        if len(self._strangers) >= self._max_unauthenticated:
            by_source = Counter(c.source for c in self._strangers.values())
            crowded = max(by_source, key=lambda s: by_source[s])
            oldest = min(
                (c for c in self._strangers.values() if c.source == crowded),
                key=lambda c: c.opened_at,
            )
            self.stats["connections_displaced"] += 1
            self._events.append(
                Refused(oldest.id, oldest.peer, "displaced", "not authenticated; at the cap")
            )
            self._abort(oldest, now)
        conn = self._new_connection(False, None, now, source)
        self._strangers[conn.id] = conn
        return conn.id

    def dial_failed(self, peer_id: str, now: float) -> None:
        peer = self._peers.get(peer_id)
        if peer is None:
            return
        peer.dialing = False
        self._timers.set(_timer("dial", peer_id), now + peer.dial_backoff)
        peer.dial_backoff = min(peer.dial_backoff * 2, DIAL_BACKOFF_MAX)

    def _new_connection(
        self, initiator: bool, peer: str | None, now: float, source: str | None
    ) -> _Connection:
        conn = _Connection(next(self._conn_ids), initiator, peer, now, source)
        self._conns[conn.id] = conn
        self._timers.set(_timer("conn", conn.id), now + HANDSHAKE_TIMEOUT)
        self.stats["connections"] += 1
        return conn

    def connection_peer(self, conn_id: int) -> str | None:
        conn = self._conns.get(conn_id)
        return conn.peer if conn is not None else None

    def connection_state(self, conn_id: int) -> ConnectionState:
        conn = self._conns.get(conn_id)
        return conn.state if conn is not None else ConnectionState.CLOSED

    def is_finished(self, conn_id: int) -> bool:
        """True once the connection has nothing more to send and should be closed."""
        conn = self._conns.get(conn_id)
        if conn is None:
            return True
        if conn.state is ConnectionState.CLOSING and not conn.out:
            self._forget_connection(conn)
            return True
        return False

    def connection_lost(self, conn_id: int, now: float) -> None:
        """The byte stream ended or broke; the session forgets the connection."""
        conn = self._conns.get(conn_id)
        if conn is not None:
            if (
                conn.state is ConnectionState.OPEN
                and not conn.authenticated
                and conn.send_n > 0
                and conn.peer is not None
            ):
                # The peer hung up on our first frames without sending one that
                # authenticates: what it does on an authentication failure (SPEC §4: no
                # REJECT), so the only sign on this side of keys that disagree.
                self.stats["closed_unauthenticated"] += 1
                self._events.append(
                    Refused(
                        conn.id, conn.peer, _CLOSED_UNAUTHENTICATED,
                        f"{conn.peer} closed the connection before any of its frames "
                        f"authenticated; if it repeats, {conn.peer} likely refused ours "
                        "(auth-failure in its log): the pair's keys disagree",
                    )
                )  # fmt: skip
            if conn.state is not ConnectionState.CLOSING:
                self._detach(conn, now)
            self._forget_connection(conn)

    def unauthenticated_connections(self) -> int:
        """Accepted connections whose peer has not authenticated yet (capped, SPEC §4)."""
        return len(self._strangers)

    def ready_connections(self) -> set[int]:
        """Connections that have bytes to send since the last call (and forget them)."""
        ready, self._ready = self._ready, set()
        return ready

    # ------------------------------------------------------------------ bytes in

    def receive_data(self, conn_id: int, data: bytes | bytearray, now: float) -> None:
        """Bytes received on `conn_id`; b"" means the peer closed its side."""
        conn = self._conns.get(conn_id)
        if conn is None or conn.state in (ConnectionState.CLOSING, ConnectionState.CLOSED):
            return
        if not data:
            self.connection_lost(conn_id, now)
            return
        try:
            for obj in conn.reader.feed(data):
                self.stats["frames_received"] += 1
                self._on_frame(conn, obj, now)
                if conn.state in (ConnectionState.CLOSING, ConnectionState.CLOSED):
                    break
        except FrameError as exc:
            self._close(conn, exc.reason, exc.detail, now)
        except StreamDecodeError as exc:
            error = frames.stream_error(exc)
            self._close(conn, error.reason, error.detail, now)

    def _on_frame(self, conn: _Connection, obj: object, now: float) -> None:
        frame = frames.parse_frame(obj)
        if type(frame) is frames.Data:
            self._on_data(conn, frame, now)
        elif type(frame) is frames.Hello:
            self._on_hello(conn, frame, now)
        elif type(frame) is frames.Reject:
            self._on_reject(conn, frame, now)
        elif type(frame) is frames.Close:
            self._on_close(conn, frame, now)

    def _on_hello(self, conn: _Connection, hello: frames.Hello, now: float) -> None:
        if conn.state is ConnectionState.OPEN:
            raise FrameError(frames.BAD_FRAME, "a second HELLO")
        if hello.tvd != self.tvd:
            raise FrameError(frames.NOT_A_MEMBER, "HELLO names another TVD")
        if hello.receiver != self.me:
            raise FrameError(frames.BAD_HELLO, "HELLO is addressed to another member")
        if conn.initiator:
            if hello.sender != conn.peer:
                raise FrameError(frames.BAD_HELLO, "the responder is not the member dialed")
        else:
            if hello.sender == self.me:
                raise FrameError(frames.BAD_HELLO, "HELLO claims to come from this node")
            if hello.sender not in self._peers:
                raise FrameError(frames.NOT_A_MEMBER, "HELLO from a non-member")
            conn.peer = hello.sender
            self._peers[hello.sender].conns.add(conn)
            conn.local_nonce = self._randbytes(NONCE_LEN)
            conn.out += frames.encode_hello(
                self.tvd, self.me, hello.sender, conn.local_nonce, self.instance
            )
            self._ready.add(conn.id)
        conn.peer_nonce = hello.nonce
        conn.peer_instance = hello.instance
        conn.state = ConnectionState.OPEN
        conn.last_auth_recv = now
        # SPEC §4: a DATA frame (ACK and KEY) as soon as both HELLOs are exchanged, and
        # again on the re-send timer until the peer's first frame authenticates.
        conn.ack_wanted = conn.key_wanted = True
        self._ready.add(conn.id)
        self._timers.set(_timer("conn", conn.id), now + KEEPALIVE_INTERVAL)
        self._timers.set(_timer("first", conn.id), now + conn.first_backoff)

    def _on_data(self, conn: _Connection, data: frames.Data, now: float) -> None:
        if conn.state is not ConnectionState.OPEN:
            raise FrameError(frames.BAD_FRAME, "DATA before both HELLOs")
        t, n = data.t, data.n
        if not 1 <= t <= self.schedule.periods:
            raise FrameError(frames.BAD_FRAME, f"DATA of period {t}, outside 1..N")
        if n != conn.recv_n:
            raise FrameError(frames.BAD_FRAME, f"DATA frame {n}, expected {conn.recv_n}")
        conn.recv_n += 1
        peer = self._peers[cast(str, conn.peer)]
        waiting = self._pending.get(peer.id)
        if waiting is not None and peer.keys.period < t <= waiting[0]:
            self._derive_pending(peer.id, now)  # the peer uses it already
        reason = self._status(conn, peer, t, now)
        if reason is not None:
            # SPEC §4: refused before any decryption; the REJECT only restarts a timer there.
            self.stats[f"rejected_{reason}"] += 1
            if reason == _EXPIRED:
                peer.refused_expired += 1
            else:
                peer.refused_unknown += 1
            conn.out += frames.encode_reject(t, n, reason, peer.keys.period or None)
            self._ready.add(conn.id)
            self._events.append(Refused(conn.id, peer.id, reason, f"DATA of period {t}"))
            return
        try:
            plaintext = frames.open_data(
                self._aead(conn, peer, t, sending=False), t, n, data.ciphertext, self._packer
            )
        except InvalidTag:
            self.stats["auth_failures"] += 1
            self._events.append(
                Refused(
                    conn.id, peer.id, _AUTH_FAILURE,
                    f"DATA frame {n} under period {t} did not authenticate: a sender without "
                    f"the pair's key, or keys that disagree. If it repeats with the real "
                    f"{peer.id}: the computer-key files of {self.me} and {peer.id} and the "
                    "bridge's keystore must come from the same provisioning",
                )
            )  # fmt: skip
            self._abort(conn, now)
            return
        conn.last_auth_recv = now
        first = not conn.authenticated
        newer = t > conn.frame_max
        learned = newer and t > conn.key_seen
        if newer:
            conn.frame_max = t  # SPEC §4: older keys stop on this connection here
        if not conn.authenticated:
            conn.authenticated_at = now
            self._on_authenticated(conn, peer, now)
        elif peer.rejected and conn is peer.active:
            # SPEC §4: an authenticated DATA frame resets the back-off and re-sends at once.
            peer.rejected = False
            peer.resend_backoff = RESEND_INITIAL
            if peer.delivery.unacknowledged():
                self._resend_all(peer, conn, now)
        if learned:
            self._key_soon(conn, now)
        if newer:
            self._retire_older(peer, now)
        if conn.state is ConnectionState.OPEN:
            self._on_plaintext(conn, peer, t, plaintext, now, first=first)

    def _on_plaintext(
        self, conn: _Connection, peer: _Peer, t: int, plaintext: bytes, now: float, *, first: bool
    ) -> None:
        try:
            items = msgpack.unpackb(plaintext, raw=False, strict_map_key=False)
        except UNPACK_ERRORS:
            raise FrameError(frames.BAD_FRAME, "undecodable DATA plaintext") from None
        if type(items) is not list or not items:
            raise FrameError(frames.BAD_FRAME, "DATA plaintext must be a non-empty array")
        numbering = peer.delivery.numberings.get(conn.peer_instance)
        if numbering is None:  # its instance lost a tie-break and is gone: nothing counts
            return
        numbering.last_auth = now
        got_message = False
        for item in items:
            if type(item) is not list or len(item) != 3:
                raise FrameError(frames.BAD_FRAME, "an inner message must be [kind, seq, body]")
            kind, seq, body = item
            if type(kind) is not int or type(seq) is not int:
                raise FrameError(frames.BAD_FRAME, "inner kind and seq must be integers")
            if kind == frames.MSG:
                if seq < 1:
                    raise FrameError(frames.BAD_FRAME, "message numbers start at 1")
                got_message = True
                if seq == numbering.delivered + 1 and self._delivering:
                    numbering.delivered = seq
                    self.stats["delivered"] += 1
                    self._events.append(Message(peer.id, t, body))
                elif seq <= numbering.delivered:
                    self.stats["duplicates"] += 1
                elif not self._delivering:
                    self.stats["undelivered_closing"] += 1
                # else: a gap (an earlier frame was refused); the sender re-sends in order.
            elif kind == frames.ACK:
                if seq < 0 or body is not None:
                    raise FrameError(frames.BAD_FRAME, "ACK must be [1, seq >= 0, nil]")
                self._on_ack(peer, numbering, seq, t, now, first=first)
            elif kind == frames.KEY:
                if not 1 <= seq <= self.schedule.periods or body is not None:
                    raise FrameError(frames.BAD_FRAME, "KEY must be [2, t in 1..N, nil]")
                waiting = self._pending.get(peer.id)
                if waiting is not None and seq >= waiting[0]:
                    self._derive_pending(peer.id, now)  # the peer has it: no reason to wait
                if seq > conn.key_seen and seq > conn.frame_max:
                    # SPEC §4: first learning that the peer holds a newer key: KEY+ACK.
                    self._key_soon(conn, now)
                conn.key_seen = max(conn.key_seen, seq)
            # any other kind: an extension this node does not know, ignored (SPEC §4)
        if got_message:
            # SPEC §4: ACK within 100 ms of any MSG, duplicates included; we ACK at once.
            conn.ack_wanted = True
            self._ready.add(conn.id)

    def _on_ack(
        self, peer: _Peer, numbering: Numbering, upto: int, period: int, now: float, *, first: bool
    ) -> None:
        """An ACK of `upto` in a frame under `period`, in `numbering` (SPEC §4 Delivery).

        `first`: the frame is the first authenticated one of its connection."""
        if upto == 0:
            return
        if upto > numbering.highest_sent:
            self.stats["protocol_errors"] += 1  # acknowledges nothing (SPEC §4)
            if first and numbering.resumed and not numbering.acknowledged_any and upto < 1 << 62:
                # This node had to forget the instance's numbering (SPEC §4 keeps only so
                # many) and the instance, back, says where it stands: go on from there
                # rather than stall. Nothing else ever renumbers (a forged ACK cannot).
                self.stats["numberings_resumed"] += 1
                numbering.continue_after(upto, self._msg_header)
                for conn in peer.conns:
                    if conn.peer_instance == numbering.instance:
                        conn.sent_upto = 0
                        conn.ack_wanted = True
                        self._ready.add(conn.id)
            return
        acked = numbering.acknowledge(upto, period)
        if not acked:
            return
        delivery = peer.delivery
        handles = delivery.done(acked)
        if not handles:
            return
        self._events.append(MessagesAcknowledged(peer.id, handles))
        self.stats["acknowledged"] += len(handles)
        peer.resend_backoff = RESEND_INITIAL
        if delivery.unacknowledged():
            self._timers.set(_timer("resend", peer.id), now + RESEND_INITIAL)
        else:
            self._timers.cancel(_timer("resend", peer.id))

    def _on_authenticated(self, conn: _Connection, peer: _Peer, now: float) -> None:
        """The first authenticated DATA frame on `conn`: now its HELLO counts (SPEC §4)."""
        self._strangers.pop(conn.id, None)
        self._timers.cancel(_timer("first", conn.id))
        conn.key_wanted = conn.ack_wanted = True  # SPEC §4: KEY+ACK within 100 ms
        self._ready.add(conn.id)
        delivery = peer.delivery
        instance = conn.peer_instance
        numbering = delivery.numbering(instance, now)
        numbering.last_auth = now
        if delivery.current != instance:
            # A new instance (a restart, or a forgery by a holder of this period's key):
            # the messages no instance has acknowledged are copied into its numbering.
            if delivery.current is not None:
                self.stats["peer_restarts"] += 1
                self._events.append(PeerRestarted(peer.id))
            for message in delivery.waiting():
                if message.handle not in numbering.handles:
                    numbering.add(message, self._msg_header(numbering.next_seq) + message.body)
            delivery.current = instance
            for other in list(peer.conns):
                if other is not conn and other.authenticated and other.peer_instance != instance:
                    self._abort(other, now)
        kept = conn
        for other in list(peer.conns):
            if other is not conn and other.authenticated and other.state is ConnectionState.OPEN:
                kept = self._tie_break(other, conn, now)
                self._abort(other if kept is conn else conn, now)
                break
        self._evict(peer, now)
        if kept is conn:
            peer.active = conn
            peer.dial_backoff = DIAL_BACKOFF_INITIAL
            self._timers.cancel(_timer("dial", peer.id))
            peer.rejected = False
            peer.resend_backoff = RESEND_INITIAL
            self._resend_all(peer, conn, now)  # SPEC §4: on each new authenticated connection
        self._events.append(ConnectionAuthenticated(conn.id, peer.id, kept is conn))

    def _tie_break(self, old: _Connection, new: _Connection, now: float) -> _Connection:
        """SPEC §4: of two authenticated connections with the same peer instance, the
        newer wins, except for crossed dials (the older authenticated less than the
        handshake timeout ago): then the one initiated by the lower id."""
        assert old.authenticated_at is not None
        if now - old.authenticated_at >= HANDSHAKE_TIMEOUT:
            return new
        lower_is_me = id_order_key(self.me) < id_order_key(cast(str, new.peer))
        old_by_lower = old.initiator == lower_is_me
        new_by_lower = new.initiator == lower_is_me
        if old_by_lower and not new_by_lower:
            return old
        return new  # initiated by the lower member, or both by the same one: the newer wins

    def _evict(self, peer: _Peer, now: float) -> None:
        """SPEC §4: keep the newest instance's numbering and those with an open
        authenticated connection; of the others, those with an authenticated frame in
        the last two periods, at most KEPT_INSTANCES."""
        delivery = peer.delivery
        keep = {c.peer_instance for c in peer.conns if c.authenticated}
        if delivery.current is not None:
            keep.add(delivery.current)
        delivery.evict(keep, now - 2 * self.schedule.period_s, KEPT_INSTANCES, FORGOTTEN_INSTANCES)

    def _on_reject(self, conn: _Connection, reject: frames.Reject, now: float) -> None:
        if conn.state is not ConnectionState.OPEN:
            raise FrameError(frames.BAD_FRAME, "REJECT before both HELLOs")
        peer = self._peers[cast(str, conn.peer)]
        self.stats["rejects_received"] += 1
        if not conn.authenticated:
            return  # a stranger's connection: nothing it says touches the peer's state
        # SPEC §4: unauthenticated, so it only restarts the re-send timer; never an
        # older key, never the KEY+ACK timer of a connection not yet authenticated.
        peer.rejected = True
        if peer.delivery.unacknowledged():
            self._timers.set(_timer("resend", peer.id), now + peer.resend_backoff)

    def _on_close(self, conn: _Connection, close: frames.Close, now: float) -> None:
        self.stats["closes_received"] += 1
        self._events.append(
            Refused(conn.id, conn.peer, "closed-by-peer", frames.printable(close.reason))
        )
        self.connection_lost(conn.id, now)

    # ------------------------------------------------------------------ bytes out

    def data_to_send(self, conn_id: int, now: float) -> bytearray:
        """Everything to write on `conn_id` now (a buffer the caller keeps).

        Queued messages are sealed here, as few frames as fit: what piles up while the
        caller is busy writing goes out coalesced.
        """
        conn = self._conns.get(conn_id)
        if conn is None:
            return bytearray()
        if conn.state is ConnectionState.OPEN:
            self._seal_pending(conn, now)
        data, conn.out = conn.out, bytearray()
        return data

    def _seal_pending(self, conn: _Connection, now: float) -> None:
        peer = self._peers[cast(str, conn.peer)]
        numbering = None
        if conn is peer.active:
            numbering = peer.delivery.numberings.get(conn.peer_instance)
            if numbering is not None and numbering.next_seq - 1 <= conn.sent_upto:
                numbering = None  # nothing new to send here
        if not conn.ack_wanted and not conn.key_wanted and numbering is None:
            return
        t = self._seal_period(conn, peer, now)
        if t is None:
            return  # SPEC §4: nothing under a key the peer may not hold; wait for one
        # SPEC §4: a message once sealed under period t never goes into an older frame;
        # it waits, and so do the ones behind it (they would only arrive out of order).
        ready = []
        if numbering is not None:
            for entry in numbering.unsent(conn.sent_upto):
                first = entry.message.first_period
                if first is not None and first > t:
                    break
                ready.append(entry)
        if not conn.ack_wanted and not conn.key_wanted and not ready:
            return
        aead = self._aead(conn, peer, t, sending=True)
        pack = self._packer.pack
        # SPEC §4: the ACK counts in the numbering of the two instances bound into this
        # frame's key (the HELLOs'), before the peer authenticates too: a returning
        # instance learns where this node stands at once.
        delivered = peer.delivery.delivered_from(conn.peer_instance)
        header = [pack([frames.ACK, delivered, None])]
        if conn.key_wanted or not conn.authenticated:
            header.append(pack([frames.KEY, peer.keys.period, None]))
        items = list(header)
        size = sum(map(len, items))
        for entry in ready:
            if size + len(entry.packed) > PLAINTEXT_LIMIT - 5 and len(items) > len(header):
                self._seal(conn, aead, t, items)
                items = list(header)
                size = sum(map(len, items))
            if entry.message.first_period is None:
                entry.message.first_period = t
            items.append(entry.packed)
            size += len(entry.packed)
        if ready:
            assert numbering is not None
            conn.sent_upto = ready[-1].seq
            numbering.highest_sent = max(numbering.highest_sent, conn.sent_upto)
            resend = _timer("resend", peer.id)
            if resend not in self._timers:
                self._timers.set(resend, now + peer.resend_backoff)
        self._seal(conn, aead, t, items)
        conn.ack_wanted = conn.key_wanted = False
        conn.last_send = now

    def _seal(self, conn: _Connection, aead: AESGCM, t: int, items: list[bytes]) -> None:
        plaintext = self._packer.pack_array_header(len(items)) + b"".join(items)
        n = conn.send_n
        conn.send_n = n + 1  # SPEC §4: never reused, whatever becomes of the frame
        frames.seal_data_into(conn.out, aead, t, n, plaintext, self._packer)
        self.stats["frames_sent"] += 1

    def _aead(self, conn: _Connection, peer: _Peer, t: int, *, sending: bool) -> AESGCM:
        """The AEAD of period t's traffic key on `conn`, one way (SPEC §4)."""
        cache = conn.send_aead if sending else conn.recv_aead
        aead = cache.get(t)
        if aead is None:
            if sending:
                ids = (self.me, peer.id, conn.local_nonce, conn.peer_nonce)
                instances = (self.instance, conn.peer_instance)
            else:
                ids = (peer.id, self.me, conn.peer_nonce, conn.local_nonce)
                instances = (conn.peer_instance, self.instance)
            key = frames.traffic_key(
                peer.keys.open_key(t), self.tvd, ids[0], ids[1], t, ids[2], ids[3], *instances
            )
            aead = cache[t] = frames.new_aead(key)
        return aead

    def _resend_all(self, peer: _Peer, conn: _Connection, now: float) -> None:
        """Seal every unacknowledged copy anew on `conn` (a sealed frame is never re-sent)."""
        numbering = peer.delivery.numberings.get(conn.peer_instance)
        if numbering is not None and numbering.entries:
            resent = sum(1 for e in numbering.entries if e.seq <= numbering.highest_sent)
            if resent:
                self.stats["resends"] += resent
        conn.sent_upto = 0
        conn.ack_wanted = True
        self._ready.add(conn.id)
        if peer.delivery.unacknowledged():
            self._timers.set(_timer("resend", peer.id), now + peer.resend_backoff)

    # ------------------------------------------------------------------ closing

    def _close(self, conn: _Connection, reason: str, detail: str, now: float) -> None:
        """Queue CLOSE `reason` and stop reading and sealing on `conn` (SPEC §4)."""
        if conn.state in (ConnectionState.CLOSING, ConnectionState.CLOSED):
            return
        self.stats["protocol_errors"] += 1
        self._events.append(Refused(conn.id, conn.peer, reason, detail))
        conn.out.clear()
        conn.out += frames.encode_close(reason)
        self._detach(conn, now)
        conn.state = ConnectionState.CLOSING
        self._ready.add(conn.id)

    def _abort(self, conn: _Connection, now: float) -> None:
        """Close without a CLOSE frame (authentication failure, a replaced connection)."""
        conn.out.clear()
        self._detach(conn, None)
        conn.state = ConnectionState.CLOSING
        self._ready.add(conn.id)
        peer = self._peers.get(conn.peer) if conn.peer is not None else None
        if peer is not None:
            self._retire_older(peer, now)  # it may have been the last to accept it

    def _detach(self, conn: _Connection, now: float | None) -> None:
        """Unhook `conn` from its peer; with `now`, dial again if messages still wait."""
        conn.drop_traffic_keys()
        self._strangers.pop(conn.id, None)
        self._timers.cancel(_timer("conn", conn.id))
        self._timers.cancel(_timer("first", conn.id))
        self._timers.cancel(_timer("key-send", conn.id))
        peer = self._peers.get(conn.peer) if conn.peer is not None else None
        if peer is None:
            return
        peer.conns.discard(conn)
        if peer.active is conn:
            peer.active = None
        if now is None:
            return
        self._retire_older(peer, now)
        if conn.initiator and not conn.authenticated:
            # Our dial never authenticated (refused, or a key missing at either end):
            # back off, so that a peer that keeps refusing us is not dialed in a loop.
            self._timers.set_earliest(_timer("dial", peer.id), now + peer.dial_backoff)
            peer.dial_backoff = min(peer.dial_backoff * 2, DIAL_BACKOFF_MAX)
        self._maybe_dial(peer, now)

    def _forget_connection(self, conn: _Connection) -> None:
        if conn.state is not ConnectionState.CLOSING:
            self._detach(conn, None)
        conn.state = ConnectionState.CLOSED
        conn.out.clear()
        self._conns.pop(conn.id, None)
        self._ready.discard(conn.id)

    # ------------------------------------------------------------------ time

    def next_deadline(self) -> float:
        """When `handle_timeout` must run next (math.inf when nothing is pending)."""
        return self._timers.next()

    def handle_timeout(self, now: float) -> None:
        """Run every timer that is due at `now`."""
        for key in self._timers.pop_due(now):
            kind, name = cast(tuple[str, Any], key)
            if kind in ("conn", "first", "key-send"):
                conn = self._conns.get(name)
                if conn is not None:
                    if kind == "conn":
                        self._on_conn_timer(conn, now)
                    elif kind == "first":
                        self._on_first_timer(conn, now)
                    elif conn.key_wanted and conn.state is ConnectionState.OPEN:
                        self._ready.add(conn.id)  # no frame carried the KEY meanwhile
                continue
            if kind == "key-work":
                self._do_key_work(now)
                continue
            peer = self._peers.get(name)
            if peer is None:
                continue
            if kind == "derive":
                self._derive_pending(peer.id, now)
            elif kind == "resend":
                self._on_resend_timer(peer, now)
            elif kind == "dial":
                self._maybe_dial(peer, now)
            elif kind == "key":
                self._on_key_timer(peer, now)

    def _on_conn_timer(self, conn: _Connection, now: float) -> None:
        key = _timer("conn", conn.id)
        if conn.state in (ConnectionState.AWAIT_HELLO, ConnectionState.HELLO_SENT):
            self._close(conn, frames.TIMEOUT, "no HELLO in time", now)
            return
        if conn.state is not ConnectionState.OPEN:
            return
        if now >= conn.last_auth_recv + IDLE_TIMEOUT:
            self._close(conn, frames.TIMEOUT, "no authenticated DATA in time", now)
            return
        wake = conn.last_auth_recv + IDLE_TIMEOUT
        if conn.authenticated:
            if now >= conn.last_send + KEEPALIVE_INTERVAL:
                conn.ack_wanted = True  # a keepalive: an ACK-only frame
                self._ready.add(conn.id)
                conn.last_send = now
            wake = min(wake, conn.last_send + KEEPALIVE_INTERVAL)
        # Before the peer authenticates there is no keepalive (the first-frame timer
        # re-sends), and a node that may not send yet (no key for the current period)
        # has not sent since: waking at that past keepalive time again would spin.
        self._timers.set(key, wake)

    def _on_first_timer(self, conn: _Connection, now: float) -> None:
        """SPEC §4: KEY+ACK again, backing off, until the peer's first frame authenticates,
        so that crossed first frames near a period boundary cannot leave it silent."""
        if conn.state is not ConnectionState.OPEN or conn.authenticated:
            return
        conn.key_wanted = conn.ack_wanted = True
        self._ready.add(conn.id)
        conn.first_backoff = min(conn.first_backoff * 2, RESEND_MAX)
        self._timers.set(_timer("first", conn.id), now + conn.first_backoff)

    def _on_resend_timer(self, peer: _Peer, now: float) -> None:
        """The oldest message waited a back-off: re-send everything unacknowledged (SPEC §4)."""
        if not peer.delivery.unacknowledged():
            return
        peer.resend_backoff = min(peer.resend_backoff * 2, RESEND_MAX)
        if peer.active is not None:
            self._resend_all(peer, peer.active, now)
        else:
            self._timers.set(_timer("resend", peer.id), now + peer.resend_backoff)
            self._maybe_dial(peer, now)

    def _on_key_timer(self, peer: _Peer, now: float) -> None:
        self._erased(peer, peer.keys.expire(now))
        self._retire_older(peer, now)
        for conn in peer.conns:
            if conn.state is ConnectionState.OPEN and not conn.authenticated:
                # A new period by this node's clock: first frames go under its key now.
                conn.ack_wanted = conn.key_wanted = True
                self._ready.add(conn.id)
        self._evict(peer, now)
        self._schedule_key_timer(peer, now)
        self._maybe_dial(peer, now)

    def _maybe_dial(self, peer: _Peer, now: float) -> None:
        """Ask for a connection when messages wait, no authenticated connection exists,
        no dial of ours is under way, and a key can open a new connection now.

        SPEC §4: connections that strangers opened toward us (not authenticated) never
        count: a silent one naming this peer delays nothing.
        """
        if (
            not peer.delivery.unacknowledged()
            or peer.active is not None
            or peer.dialing
            or peer.id not in self._peers
            or any(c.initiator for c in peer.conns)
            or not self._can_open(peer, now)
        ):
            return
        dial = _timer("dial", peer.id)
        when = self._timers.get(dial)
        if when is not None and when > now:
            return
        self._timers.cancel(dial)
        peer.dialing = True
        self._events.append(Dial(peer.id))

    def _can_open(self, peer: _Peer, now: float) -> bool:
        """Whether a new connection could carry frames now: this node holds the key of
        the period current by its clock (SPEC §4)."""
        try:
            current = self.schedule.period_at(now)
        except Exception:  # before the epoch or after the last period
            return False
        key = peer.keys.get(current)
        return key is not None and now < peer.keys.lifetime(current)

    # ------------------------------------------------------------------ introspection

    def peer_status(self, peer_id: str) -> dict[str, Any]:
        """A snapshot for status displays (no key material)."""
        peer = self._peer(peer_id)
        keys = peer.keys
        numbering = (
            peer.delivery.numberings.get(peer.delivery.current)
            if peer.delivery.current is not None
            else None
        )
        return {
            "period": keys.period,
            "has_key": keys.has_key,
            "older_key": keys.older.period if keys.older is not None and keys.older.held else None,
            "connected": peer.active is not None,
            "connections": len(peer.conns),
            "unacknowledged": peer.delivery.unacknowledged(),
            "delivered": numbering.delivered if numbering is not None else 0,
            "instances": len(peer.delivery.numberings),
            "rejected_expired": peer.refused_expired,
            "rejected_unknown": peer.refused_unknown,
        }

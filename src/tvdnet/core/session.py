"""The sans-I/O peer protocol of one node (SPEC §4): bytes and `now` in, events and bytes out.

`Session` holds everything a node knows about its TVD peers: their period keys, the
per-pair delivery state (message numbers, the keep-until-acked queue, de-duplication)
and the state of every connection. It never touches a socket or a clock; whoever drives
it passes the time into every call and moves bytes between it and the network:

    conn = session.connect("vm-b", now)          # or session.accept(now) for an inbound one
    stream.send_all(session.data_to_send(conn, now))
    session.receive_data(conn, data, now)        # b"" at EOF
    while (event := session.next_event()) is not None: ...
    session.handle_timeout(now)                  # at session.next_deadline()

Where the rules live:
- HELLO checks, the frame counter and the period rules: `_on_hello`, `_on_data`.
- What is sealed, and when: `data_to_send`, `_seal_pending`.
- Re-sending, back-off, dialing, keepalive and idle timeouts: `handle_timeout` and `_on_*_timer`.
- What happens when a period key is replaced or ends: `_key_changed`.
- Peer restarts and the one-connection-per-pair rule: `_on_authenticated`.
"""

from __future__ import annotations

import enum
import itertools
import math
import secrets
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from itertools import islice
from typing import Any, Final, cast

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from . import frames
from .constants import (
    DIAL_BACKOFF_INITIAL,
    DIAL_BACKOFF_MAX,
    HANDSHAKE_TIMEOUT,
    IDLE_TIMEOUT,
    INSTANCE_LEN,
    KEEPALIVE_INTERVAL,
    MESSAGE_LIMIT,
    NONCE_LEN,
    PLAINTEXT_LIMIT,
    RESEND_INITIAL,
    RESEND_MAX,
    SEND_WINDOW_BYTES,
    SEND_WINDOW_MESSAGES,
    SKEW_ALLOWANCE,
)
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
from .scheme import ComputerKeys, KeyStatus, PeriodKey, Schedule, UpdateResult
from .timers import Timers

__all__ = ["ConnectionState", "Session"]

_AUTH_FAILURE: Final = "auth-failure"
_MSG_HEADER: Final = msgpack.packb([frames.MSG, 0, None])[:2]  # fixarray(3), kind 0


class ConnectionState(enum.Enum):
    AWAIT_HELLO = "await-hello"  # responder, waiting for the initiator's HELLO
    HELLO_SENT = "hello-sent"  # initiator, waiting for the responder's HELLO
    OPEN = "open"  # both HELLOs exchanged
    CLOSING = "closing"  # a CLOSE is queued; nothing more is read or sealed
    CLOSED = "closed"


class _OutMessage:
    __slots__ = ("body", "handle", "packed", "seq")

    def __init__(self, handle: int, seq: int, body: bytes, packed: bytes) -> None:
        self.handle = handle
        self.seq = seq
        self.body = body  # the packed body
        self.packed = packed  # the packed inner message [0, seq, body]


class _Connection:
    __slots__ = (
        "ack_wanted",
        "authenticated",
        "id",
        "initiator",
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
        "state",
    )

    def __init__(self, conn_id: int, initiator: bool, peer: str | None, now: float) -> None:
        self.id = conn_id
        self.initiator = initiator
        self.peer = peer
        self.state = ConnectionState.HELLO_SENT if initiator else ConnectionState.AWAIT_HELLO
        self.local_nonce = b""
        self.peer_nonce = b""
        self.peer_instance = b""
        self.send_n = 0  # SPEC §4: counts DATA frames per direction, across periods
        self.recv_n = 0
        self.authenticated = False  # the peer's first DATA frame here has authenticated
        self.reader = frames.new_reader()
        self.out = bytearray()
        # Cached (key generation, AESGCM) per direction; dropped when the period key changes.
        self.send_aead: tuple[int, AESGCM] | None = None
        self.recv_aead: tuple[int, AESGCM] | None = None
        self.sent_upto = 0  # highest message number sealed on this connection
        self.ack_wanted = False
        self.opened_at = now
        self.last_send = now
        self.last_auth_recv = now

    def drop_traffic_keys(self) -> None:
        self.send_aead = None
        self.recv_aead = None


class _Peer:
    __slots__ = (
        "acked",
        "active",
        "conns",
        "delivered",
        "dial_backoff",
        "dialing",
        "highest_sent",
        "id",
        "instance",
        "key",
        "next_seq",
        "queue",
        "queued_bytes",
        "rejected",
        "resend_backoff",
    )

    def __init__(self, peer: str, key: PeriodKey) -> None:
        self.id = peer
        self.key = key
        self.instance: bytes | None = None  # the peer instance our numbering is bound to
        self.queue: deque[_OutMessage] = deque()  # unacknowledged, in message-number order
        self.queued_bytes = 0
        self.next_seq = 1
        self.acked = 0
        self.highest_sent = 0  # highest message number ever sealed, on any connection
        self.delivered = 0  # highest contiguous message number delivered from the peer
        self.conns: set[_Connection] = set()
        self.active: _Connection | None = None  # the authenticated connection we keep
        self.rejected = False  # a REJECT came since the last re-send
        self.resend_backoff = RESEND_INITIAL
        self.dialing = False
        self.dial_backoff = DIAL_BACKOFF_INITIAL


def _timer(kind: str, name: str | int) -> tuple[str, str | int]:
    return (kind, name)


class Session:
    """The peer protocol state of one node toward every member of its TVD (SPEC §4).

    `keys` are the node's computer master keys; `members` the current TVD members (by
    default the peers `keys` names, plus the node itself). `instance` and `randbytes`
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
        self._packer = msgpack.Packer()
        self._peers: dict[str, _Peer] = {}
        self._members: set[str] = set()
        self._conns: dict[int, _Connection] = {}
        self._conn_ids = itertools.count(1)
        self._handles = itertools.count(1)
        self._events: deque[Event] = deque()
        self._timers = Timers()
        self._ready: set[int] = set()
        self.stats: Counter[str] = Counter()
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

    @property
    def members(self) -> frozenset[str]:
        return frozenset(self._members)

    def key_state(self, peer: str) -> PeriodKey:
        return self._peer(peer).key

    def set_members(self, members: Iterable[str], now: float) -> list[str]:
        """Replace the member list (SPEC §5 `members`); returns the members without a key.

        Removed peers lose their period key and its number, their connections and their
        queued messages (each reported as SendFailed); the key file is never touched.
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
            key = PeriodKey(self.tvd, self.me, member, self.schedule, self.allowance)
            self._peers[member] = _Peer(member, key)
        self._members = new
        return missing

    def _remove_peer(self, peer: _Peer, now: float) -> None:
        peer.key.forget()
        for conn in list(peer.conns):
            self._close(conn, frames.NOT_A_MEMBER, "the peer left the TVD", now)
        for message in peer.queue:
            self._events.append(SendFailed(peer.id, message.handle, "the peer left the TVD"))
        peer.queue.clear()
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
        """
        self.schedule.check(t)
        applied = 0
        missing: list[str] = []
        for peer_id, partial in partials.items():
            peer = self._peers.get(peer_id)
            if peer is None:
                partial[:] = bytes(len(partial))
                if peer_id in self._members and peer_id != self.me:
                    missing.append(peer_id)
                continue
            comp_key = self._computer_keys.get(peer_id)
            assert comp_key is not None  # a _Peer exists only with a computer key
            result = peer.key.apply(t, partial, comp_key, now)
            if result is UpdateResult.APPLIED:
                self._key_changed(peer, now)
            if peer.key.period == t and peer.key.has_key:
                applied += 1
        return applied, missing

    def erase_all_keys(self) -> None:
        """Forget every period key and its number (a welcome with another schedule, SPEC §5)."""
        for peer in self._peers.values():
            peer.key.forget()
            self._timers.cancel(_timer("key", peer.id))
            for conn in peer.conns:
                conn.drop_traffic_keys()

    def _key_changed(self, peer: _Peer, now: float) -> None:
        """A new period key for `peer`: drop what the old one gave, and use the new one at once."""
        for conn in peer.conns:
            conn.drop_traffic_keys()
            if conn.state is ConnectionState.OPEN:
                conn.ack_wanted = True  # SPEC §4: an ACK-only frame again on each new key
                self._ready.add(conn.id)
        deadline = peer.key.deadline()
        if deadline is not None:
            self._timers.set(_timer("key", peer.id), deadline)
        peer.rejected = False
        peer.resend_backoff = RESEND_INITIAL
        if peer.active is not None and peer.queue:
            self._resend_all(peer, peer.active, now)
        self._maybe_dial(peer, now)

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
        if len(peer.queue) >= self._window_messages or peer.queued_bytes >= self._window_bytes:
            raise WindowFull(f"{len(peer.queue)} messages to {peer_id!r} await acknowledgement")
        try:
            body_packed = self._packer.pack(body)
        except (TypeError, ValueError, OverflowError) as exc:
            raise UnserializableBody(f"msgpack cannot encode the body: {exc}") from None
        message = self._message(next(self._handles), peer.next_seq, body_packed)
        if len(message.packed) > MESSAGE_LIMIT:
            raise MessageTooLarge(
                f"the packed message is {len(message.packed)} bytes; the limit is {MESSAGE_LIMIT}"
            )
        peer.next_seq += 1
        peer.queue.append(message)
        peer.queued_bytes += len(message.packed)
        self.stats["sent"] += 1
        if peer.active is not None:
            self._ready.add(peer.active.id)
        else:
            self._maybe_dial(peer, now)
        return message.handle

    def _message(self, handle: int, seq: int, body: bytes) -> _OutMessage:
        return _OutMessage(handle, seq, body, _MSG_HEADER + self._packer.pack(seq) + body)

    def window_open(self, peer_id: str) -> bool:
        """Whether `send` to this peer would be accepted now (the send window has room)."""
        peer = self._peer(peer_id)
        return len(peer.queue) < self._window_messages and peer.queued_bytes < self._window_bytes

    def unacknowledged(self, peer_id: str) -> int:
        return len(self._peer(peer_id).queue)

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def _peer(self, peer_id: str) -> _Peer:
        peer = self._peers.get(peer_id)
        if peer is None:
            raise UnknownPeer(peer_id, "not a member this node holds a key for")
        return peer

    # ------------------------------------------------------------------ connections

    def connect(self, peer_id: str, now: float) -> int:
        """A new outgoing connection to `peer_id`; its HELLO is ready to send."""
        peer = self._peer(peer_id)
        conn = self._new_connection(True, peer_id, now)
        peer.conns.add(conn)
        peer.dialing = False
        conn.local_nonce = self._randbytes(NONCE_LEN)
        conn.out += frames.encode_hello(self.tvd, self.me, peer_id, conn.local_nonce, self.instance)
        self._ready.add(conn.id)
        return conn.id

    def accept(self, now: float) -> int:
        """A new incoming connection; it waits for the initiator's HELLO."""
        return self._new_connection(False, None, now).id

    def dial_failed(self, peer_id: str, now: float) -> None:
        peer = self._peers.get(peer_id)
        if peer is None:
            return
        peer.dialing = False
        self._timers.set(_timer("dial", peer_id), now + peer.dial_backoff)
        peer.dial_backoff = min(peer.dial_backoff * 2, DIAL_BACKOFF_MAX)

    def _new_connection(self, initiator: bool, peer: str | None, now: float) -> _Connection:
        conn = _Connection(next(self._conn_ids), initiator, peer, now)
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
            if conn.state is not ConnectionState.CLOSING:
                self._detach(conn, now)
            self._forget_connection(conn)

    def unauthenticated_connections(self) -> int:
        """Open connections whose peer has not yet authenticated (a node caps these)."""
        return sum(
            1
            for conn in self._conns.values()
            if not conn.authenticated and conn.state is not ConnectionState.CLOSED
        )

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
        conn.ack_wanted = True  # SPEC §4: a DATA frame as soon as both HELLOs are exchanged
        self._ready.add(conn.id)
        self._timers.set(_timer("conn", conn.id), now + KEEPALIVE_INTERVAL)

    def _on_data(self, conn: _Connection, data: frames.Data, now: float) -> None:
        if conn.state is not ConnectionState.OPEN:
            raise FrameError(frames.BAD_FRAME, "DATA before both HELLOs")
        t, n = data.t, data.n
        if not 1 <= t <= self.schedule.periods:
            raise FrameError(frames.BAD_FRAME, f"DATA of period {t}, outside 1..N")
        if n != conn.recv_n:
            raise FrameError(frames.BAD_FRAME, f"DATA frame {n}, expected {conn.recv_n}")
        conn.recv_n += 1
        assert conn.peer is not None
        peer = self._peers[conn.peer]
        status = peer.key.status(t, now)
        if status is not KeyStatus.USABLE:
            # SPEC §4: refused before any decryption; the REJECT only restarts a timer there.
            reason = status.value
            self.stats[f"rejected_{reason}"] += 1
            conn.out += frames.encode_reject(t, n, reason, peer.key.period or None)
            self._ready.add(conn.id)
            self._events.append(Refused(conn.id, peer.id, reason, f"DATA of period {t}"))
            return
        aead = self._recv_aead(conn, peer)
        try:
            plaintext = frames.open_data(aead, t, n, data.ciphertext, self._packer)
        except InvalidTag:
            self.stats["auth_failures"] += 1
            self._events.append(Refused(conn.id, peer.id, _AUTH_FAILURE, f"DATA frame {n}"))
            self._abort(conn)
            return
        conn.last_auth_recv = now
        if not conn.authenticated:
            conn.authenticated = True
            self._on_authenticated(conn, peer, now)
        elif peer.rejected and conn is peer.active:
            # SPEC §4: an authenticated DATA frame resets the back-off and re-sends at once.
            peer.rejected = False
            peer.resend_backoff = RESEND_INITIAL
            if peer.queue:
                self._resend_all(peer, conn, now)
        self._on_plaintext(conn, peer, t, plaintext, now)

    def _on_plaintext(
        self, conn: _Connection, peer: _Peer, t: int, plaintext: bytes, now: float
    ) -> None:
        try:
            items = msgpack.unpackb(plaintext, raw=False, strict_map_key=False)
        except UNPACK_ERRORS:
            raise FrameError(frames.BAD_FRAME, "undecodable DATA plaintext") from None
        if type(items) is not list or not items:
            raise FrameError(frames.BAD_FRAME, "DATA plaintext must be a non-empty array")
        got_message = False
        bound = conn.peer_instance == peer.instance
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
                if not bound:
                    continue  # lost a tie-break to a newer instance: never delivered
                if seq == peer.delivered + 1:
                    peer.delivered = seq
                    self.stats["delivered"] += 1
                    self._events.append(Message(peer.id, t, body))
                elif seq <= peer.delivered:
                    self.stats["duplicates"] += 1
                # else: a gap (an earlier frame was refused); the sender re-sends in order.
            elif kind == frames.ACK:
                if seq < 0 or body is not None:
                    raise FrameError(frames.BAD_FRAME, "ACK must be [1, seq >= 0, nil]")
                if bound:
                    self._on_ack(peer, seq, now)
            elif kind < frames.FIRST_EXTENSION_KIND or kind < 0:
                raise FrameError(frames.BAD_FRAME, f"unknown inner message kind {kind}")
        if got_message:
            # SPEC §4: ACK within 100 ms of any MSG, duplicates included; we ACK at once.
            target = peer.active if peer.active is not None else conn
            target.ack_wanted = True
            self._ready.add(target.id)

    def _on_ack(self, peer: _Peer, seq: int, now: float) -> None:
        if seq <= peer.acked:
            return
        if seq >= peer.next_seq:
            self.stats["protocol_errors"] += 1  # ACK of a number never sent: ignore it
            return
        queue = peer.queue
        handles = []
        while queue and queue[0].seq <= seq:
            message = queue.popleft()
            peer.queued_bytes -= len(message.packed)
            handles.append(message.handle)
        self._events.append(MessagesAcknowledged(peer.id, handles))
        self.stats["acknowledged"] += seq - peer.acked
        peer.acked = seq
        peer.resend_backoff = RESEND_INITIAL
        if queue:
            self._timers.set(_timer("resend", peer.id), now + RESEND_INITIAL)
        else:
            self._timers.cancel(_timer("resend", peer.id))

    def _on_authenticated(self, conn: _Connection, peer: _Peer, now: float) -> None:
        """The first authenticated DATA frame on `conn`: now its HELLO counts (SPEC §4)."""
        if peer.instance is not None and conn.peer_instance != peer.instance:
            self._peer_restarted(peer, conn, now)
        peer.instance = conn.peer_instance
        kept = conn
        if peer.active is not None and peer.active is not conn:
            kept = self._tie_break(peer.active, conn)
            loser = conn if kept is peer.active else peer.active
            self._abort(loser)
        peer.active = kept
        peer.dial_backoff = DIAL_BACKOFF_INITIAL
        self._timers.cancel(_timer("dial", peer.id))
        self._events.append(ConnectionAuthenticated(conn.id, peer.id, kept is conn))
        if kept is conn:
            peer.rejected = False
            peer.resend_backoff = RESEND_INITIAL
            self._resend_all(peer, conn, now)  # SPEC §4: on each new authenticated connection

    def _tie_break(self, old: _Connection, new: _Connection) -> _Connection:
        """SPEC §4: keep the connection initiated by the member whose id is lower bytewise."""
        assert new.peer is not None
        lower_is_me = id_order_key(self.me) < id_order_key(new.peer)
        old_by_lower = old.initiator == lower_is_me
        new_by_lower = new.initiator == lower_is_me
        if old_by_lower and not new_by_lower:
            return old
        return new  # initiated by the lower member, or both by the same one: the newer wins

    def _peer_restarted(self, peer: _Peer, conn: _Connection, now: float) -> None:
        """A new instance of the peer: renumber what it has not acknowledged, from 1."""
        for other in list(peer.conns):
            if other is not conn and other.peer_instance != conn.peer_instance:
                self._abort(other)
        peer.active = None
        peer.queue = deque(
            self._message(message.handle, seq, message.body)
            for seq, message in enumerate(peer.queue, start=1)
        )
        peer.queued_bytes = sum(len(message.packed) for message in peer.queue)
        peer.next_seq = len(peer.queue) + 1
        peer.acked = peer.highest_sent = 0
        peer.delivered = 0
        self.stats["peer_restarts"] += 1
        self._events.append(PeerRestarted(peer.id))

    def _on_reject(self, conn: _Connection, reject: frames.Reject, now: float) -> None:
        if conn.state is not ConnectionState.OPEN:
            raise FrameError(frames.BAD_FRAME, "REJECT before both HELLOs")
        assert conn.peer is not None
        peer = self._peers[conn.peer]
        self.stats["rejects_received"] += 1
        # SPEC §4: unauthenticated, so it only restarts the re-send timer.
        peer.rejected = True
        self._timers.set(_timer("resend", peer.id), now + peer.resend_backoff)

    def _on_close(self, conn: _Connection, close: frames.Close, now: float) -> None:
        self.stats["closes_received"] += 1
        self._events.append(Refused(conn.id, conn.peer, "closed-by-peer", close.reason[:64]))
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
        assert conn.peer is not None
        peer = self._peers[conn.peer]
        sending = conn is peer.active and conn.authenticated
        # An ACK may overtake what this connection sent (it acknowledges an earlier one).
        unsent = min(peer.next_seq - 1 - conn.sent_upto, len(peer.queue)) if sending else 0
        if not conn.ack_wanted and unsent <= 0:
            return
        period_key = peer.key.seal_key(now)
        if period_key is None:
            conn.ack_wanted = False  # SPEC §4: never seal under an erased or ended key
            return
        aead = self._send_aead(conn, peer)
        t = peer.key.period
        pack = self._packer.pack
        acked = peer.delivered if conn.peer_instance == peer.instance else 0
        ack = pack([frames.ACK, acked, None])
        items = [ack]
        size = len(ack)
        if unsent > 0:
            start = len(peer.queue) - unsent
            for message in islice(peer.queue, start, None):
                if size + len(message.packed) > PLAINTEXT_LIMIT - 5:
                    self._seal(conn, aead, t, items)
                    items = [ack]
                    size = len(ack)
                items.append(message.packed)
                size += len(message.packed)
            conn.sent_upto = peer.highest_sent = peer.next_seq - 1
            resend = _timer("resend", peer.id)
            if resend not in self._timers:
                self._timers.set(resend, now + peer.resend_backoff)
        self._seal(conn, aead, t, items)
        conn.ack_wanted = False
        conn.last_send = now

    def _seal(self, conn: _Connection, aead: AESGCM, t: int, items: list[bytes]) -> None:
        plaintext = self._packer.pack_array_header(len(items)) + b"".join(items)
        n = conn.send_n
        conn.send_n = n + 1  # SPEC §4: never reused, whatever becomes of the frame
        frames.seal_data_into(conn.out, aead, t, n, plaintext, self._packer)
        self.stats["frames_sent"] += 1

    def _send_aead(self, conn: _Connection, peer: _Peer) -> AESGCM:
        cached = conn.send_aead
        if cached is not None and cached[0] == peer.key.generation:
            return cached[1]
        key = frames.traffic_key(
            peer.key.open_key(), self.tvd, self.me, peer.id, peer.key.period,
            conn.local_nonce, conn.peer_nonce, self.instance, conn.peer_instance,
        )  # fmt: skip
        aead = frames.new_aead(key)
        conn.send_aead = (peer.key.generation, aead)
        return aead

    def _recv_aead(self, conn: _Connection, peer: _Peer) -> AESGCM:
        cached = conn.recv_aead
        if cached is not None and cached[0] == peer.key.generation:
            return cached[1]
        key = frames.traffic_key(
            peer.key.open_key(), self.tvd, peer.id, self.me, peer.key.period,
            conn.peer_nonce, conn.local_nonce, conn.peer_instance, self.instance,
        )  # fmt: skip
        aead = frames.new_aead(key)
        conn.recv_aead = (peer.key.generation, aead)
        return aead

    def _resend_all(self, peer: _Peer, conn: _Connection, now: float) -> None:
        """Seal every unacknowledged message anew on `conn` (a sealed frame is never re-sent)."""
        resent = peer.highest_sent - peer.acked
        if resent > 0:
            self.stats["resends"] += resent
        conn.sent_upto = peer.acked
        conn.ack_wanted = True
        self._ready.add(conn.id)
        if peer.queue:
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

    def _abort(self, conn: _Connection) -> None:
        """Close without a CLOSE frame (authentication failure, a replaced connection)."""
        conn.out.clear()
        self._detach(conn, None)
        conn.state = ConnectionState.CLOSING
        self._ready.add(conn.id)

    def _detach(self, conn: _Connection, now: float | None) -> None:
        """Unhook `conn` from its peer; with `now`, dial again if messages still wait."""
        conn.drop_traffic_keys()
        self._timers.cancel(_timer("conn", conn.id))
        peer = self._peers.get(conn.peer) if conn.peer is not None else None
        if peer is None:
            return
        peer.conns.discard(conn)
        if peer.active is conn:
            peer.active = None
        if now is None:
            return
        if not conn.authenticated:
            # Never authenticated (refused, or a key missing at either end): back off, so
            # that a peer that keeps refusing us is not dialed in a loop.
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
            if kind == "conn":
                conn = self._conns.get(name)
                if conn is not None:
                    self._on_conn_timer(conn, now)
                continue
            peer = self._peers.get(name)
            if peer is None:
                continue
            if kind == "resend":
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
        if now >= conn.last_send + KEEPALIVE_INTERVAL:
            conn.ack_wanted = True  # a keepalive: an ACK-only frame
            self._ready.add(conn.id)
            conn.last_send = now
        self._timers.set(
            key, min(conn.last_auth_recv + IDLE_TIMEOUT, conn.last_send + KEEPALIVE_INTERVAL)
        )

    def _on_resend_timer(self, peer: _Peer, now: float) -> None:
        """The oldest message waited a back-off: re-send everything unacknowledged (SPEC §4)."""
        again = False
        if peer.active is not None and peer.queue:
            self._resend_all(peer, peer.active, now)
            again = True
        for conn in peer.conns:
            if conn.state is ConnectionState.OPEN and not conn.authenticated:
                conn.ack_wanted = True  # SPEC §4: ACK-only again after each REJECT
                self._ready.add(conn.id)
                again = True
        peer.resend_backoff = min(peer.resend_backoff * 2, RESEND_MAX)
        if again and peer.key.seal_key(now) is not None:
            self._timers.set(_timer("resend", peer.id), now + peer.resend_backoff)
        self._maybe_dial(peer, now)

    def _on_key_timer(self, peer: _Peer, now: float) -> None:
        period = peer.key.period
        if peer.key.expire(now):
            for conn in peer.conns:
                conn.drop_traffic_keys()
            self.stats["keys_erased"] += 1
            self._events.append(KeyErased(peer.id, period))
        elif (deadline := peer.key.deadline()) is not None:
            self._timers.set(_timer("key", peer.id), deadline)

    def _maybe_dial(self, peer: _Peer, now: float) -> None:
        """Ask for a connection when messages wait, none exists, and a key can seal them."""
        if (
            not peer.queue
            or peer.conns
            or peer.dialing
            or peer.id not in self._peers
            or peer.key.seal_key(now) is None
        ):
            return
        dial = _timer("dial", peer.id)
        when = self._timers.get(dial)
        if when is not None and when > now:
            return
        self._timers.cancel(dial)
        peer.dialing = True
        self._events.append(Dial(peer.id))

    # ------------------------------------------------------------------ introspection

    def peer_status(self, peer_id: str) -> dict[str, Any]:
        """A snapshot for status displays (no key material)."""
        peer = self._peer(peer_id)
        return {
            "period": peer.key.period,
            "has_key": peer.key.has_key,
            "connected": peer.active is not None,
            "connections": len(peer.conns),
            "unacknowledged": len(peer.queue),
            "delivered": peer.delivered,
        }

"""The core's promise, as a stateful model (SPEC §4 Delivery).

Three Sessions (an all-pairs TVD) talk over a simulated network that moves bytes in
pieces, delays them, cuts connections, and refuses dials to a node that is down. Nodes
restart (a new instance, its own queue lost with the process), periods change, and the
bridge's updates reach the nodes at different times. Hypothesis drives the steps; after
each, and after a final period of calm, the checks are:

- no message is delivered twice to one receiver instance, and each sender instance's
  messages reach a receiver instance in the order they were sent;
- a message that its sender saw acknowledged was delivered (to some instance of the
  receiver);
- once the network is calm and every node holds its keys, every message that a running
  sender sent has been acknowledged: delivered exactly once to the receiver's current
  instance or, before that, to one of its earlier instances. Nothing is lost while both
  ends run; only a killed process loses what it alone held (its own queue).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from helpers import Tvd
from tvdnet import Dial, Message, MessagesAcknowledged, SendFailed, Session
from tvdnet.core.scheme import Schedule

MEMBERS = ("vm-a", "vm-b", "vm-c")
PAIRS = list(itertools.permutations(MEMBERS, 2))
# Short periods and a short allowance, so that a few steps cross period changes.
SCHEDULE = Schedule(epoch=0.0, period_s=3.0, periods=100_000)
ALLOWANCE = 1.0
START = SCHEDULE.start(3) + 1.0


@dataclass
class End:
    """One side of a simulated connection: a session (a real node's instance, or a
    forger's) and its connection id there."""

    node: str
    session: Session
    conn: int


@dataclass
class Wire:
    """A byte stream between two sessions: each direction's bytes in flight, in order."""

    ends: tuple[End, End]
    in_flight: list[bytearray] = field(default_factory=lambda: [bytearray(), bytearray()])
    eof_after: list[bool] = field(default_factory=lambda: [False, False])  # writer closed
    dead: bool = False


@dataclass
class Sent:
    node: str
    instance: bytes
    peer: str
    number: int  # the sender instance's own count toward this peer: the order to keep
    owed_to: bytes | None  # the receiver's instance the sender had authenticated, if any


class DeliveryModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tvd = Tvd(MEMBERS, schedule=SCHEDULE)
        self.now = START
        self.sessions: dict[str, Session] = {}
        self.up: dict[str, bool] = {}
        self.keys_at: dict[str, int] = {}  # the newest period the bridge gave each node
        self.updates: dict[int, dict[str, dict[str, bytes]]] = {}  # t -> vm -> partials
        self.wires: list[Wire] = []
        self.message_ids = itertools.count(1)
        self.sent: dict[int, Sent] = {}  # message id -> who sent it
        self.handles: dict[tuple[bytes, int], int] = {}  # (sender instance, handle) -> id
        self.acked: set[int] = set()
        self.delivered: dict[bytes, list[int]] = {}  # receiver instance -> ids, in order
        self.counts: dict[tuple[bytes, str], int] = {}
        self.forgers: list[Session] = []
        self.forged = itertools.count(1)
        # SPEC §4 keeps the numbering of a peer instance that is neither the newest nor
        # connected for two periods only: a forgery that makes a running instance such
        # an old one can make it lose or re-receive messages (SPEC §1 says so). The pairs
        # of instances whose numbering a node forgot that way are exempt from the checks.
        self.known: set[tuple[bytes, bytes]] = set()  # (node instance, peer instance)
        self.forgotten: set[frozenset[bytes]] = set()
        for vm in MEMBERS:
            self._start(vm)

    # ------------------------------------------------------------------ the world

    def _start(self, vm: str) -> None:
        session = self.tvd.session(vm, allowance=ALLOWANCE)
        self.sessions[vm] = session
        self.up[vm] = True
        self.keys_at[vm] = 0
        self.delivered[session.instance] = []

    def _live(self, session: Session) -> bool:
        """A real node's running instance, or a forger still at work."""
        if session in self.forgers:
            return True
        return self.up[session.me] and self.sessions[session.me] is session

    def _ends_of(self, session: Session) -> list[Wire]:
        return [
            wire
            for wire in self.wires
            if not wire.dead and any(end.session is session for end in wire.ends)
        ]

    def _drain_events(self) -> None:
        live = [s for vm, s in self.sessions.items() if self.up[vm]] + self.forgers
        happened = []
        for session in live:
            while (event := session.next_event()) is not None:
                happened.append((session, event))
        # Deliveries first: a receiver's ACK may reach its sender in the same step.
        happened.sort(key=lambda item: not isinstance(item[1], Message))
        for session, event in happened:
            self._on_event(session.me, session, event)
        self._note_forgotten()

    def _note_forgotten(self) -> None:
        for vm, session in self.sessions.items():
            if not self.up[vm]:
                continue
            for peer in session.peers:
                other = self.sessions[peer]
                if not self.up[peer]:
                    continue
                pair = (session.instance, other.instance)
                kept = other.instance in session._peers[peer].delivery.numberings
                if kept:
                    self.known.add(pair)
                elif pair in self.known:
                    self.forgotten.add(frozenset(pair))

    def _exempt(self, sender: bytes, receiver: bytes) -> bool:
        return frozenset((sender, receiver)) in self.forgotten

    def _on_event(self, vm: str, session: Session, event: Any) -> None:
        if isinstance(event, Message):
            message_id = event.body["id"]
            sent = self.sent[message_id]
            assert sent.peer == vm, f"{vm} got a message meant for {sent.peer}"
            got = self.delivered[session.instance]
            if not self._exempt(sent.instance, session.instance):
                assert message_id not in got, f"message {message_id} delivered twice to {vm}"
                earlier = [self.sent[m] for m in got if self.sent[m].instance == sent.instance]
                assert all(e.number < sent.number for e in earlier), (
                    f"{vm} got message {sent.number} of its sender after a later one"
                )
            got.append(message_id)
        elif isinstance(event, MessagesAcknowledged):
            for handle in event.handles:
                message_id = self.handles[session.instance, handle]
                peer = self.sessions[event.peer].instance
                assert self._exempt(session.instance, peer) or any(
                    message_id in ids for ids in self.delivered.values()
                ), f"message {message_id} acknowledged to {vm} but never delivered"
                self.acked.add(message_id)
        elif isinstance(event, Dial):
            assert session not in self.forgers, "a forger has nothing to send"
            self._dial(vm, event.peer)
        elif isinstance(event, SendFailed):
            raise AssertionError(f"no member leaves in this model: {event}")

    def _dial(self, vm: str, peer: str) -> None:
        session = self.sessions[vm]
        if not self.up[peer]:
            session.dial_failed(peer, self.now)
            return
        self._connect(session, self.sessions[peer])

    def _connect(self, initiator: Session, responder: Session) -> None:
        wire = Wire(
            (
                End(initiator.me, initiator, initiator.connect(responder.me, self.now)),
                End(responder.me, responder, responder.accept(self.now)),
            )
        )
        self.wires.append(wire)

    def _collect(self, wire: Wire) -> None:
        """What each end has to send goes into flight; a finished end closes its side."""
        for side in (0, 1):
            end = wire.ends[side]
            session = end.session
            if not self._live(session) or wire.eof_after[side]:
                continue
            wire.in_flight[side] += session.data_to_send(end.conn, self.now)
            if session.is_finished(end.conn):
                wire.eof_after[side] = True

    def _deliver(self, wire: Wire, side: int, size: int | None) -> None:
        """Bytes from `side` reach the other end; after the last, EOF if its writer closed."""
        if wire.dead:
            return
        data = wire.in_flight[side]
        piece = bytes(data if size is None else data[:size])
        del data[: len(piece)]
        other = wire.ends[1 - side]
        session = other.session
        if not self._live(session):
            return
        if piece:
            session.receive_data(other.conn, piece, self.now)
        if not data and wire.eof_after[side]:
            session.receive_data(other.conn, b"", self.now)
            session.is_finished(other.conn)
            if wire.eof_after[1 - side] or session.is_finished(other.conn):
                wire.dead = True

    def _cut(self, wire: Wire) -> None:
        wire.dead = True
        for end in wire.ends:
            if self._live(end.session):
                end.session.connection_lost(end.conn, self.now)

    def _timers(self) -> None:
        for session in [s for vm, s in self.sessions.items() if self.up[vm]] + self.forgers:
            if session.next_deadline() <= self.now:
                session.handle_timeout(self.now)

    def _pump(self, rounds: int = 30) -> None:
        for _ in range(rounds):
            self._drain_events()
            moved = False
            for wire in list(self.wires):
                if wire.dead:
                    continue
                self._collect(wire)
                for side in (0, 1):
                    if wire.in_flight[side] or wire.eof_after[side]:
                        before = len(wire.in_flight[side])
                        self._deliver(wire, side, None)
                        moved = moved or before > 0
            self._drain_events()
            if not moved:
                return
        self.wires = [w for w in self.wires if not w.dead]

    def _partials(self, vm: str, t: int) -> dict[str, bytearray]:
        device = self.tvd.device
        for period in range(device.period, t + 1):  # the bridge only moves forward
            device.evolve_to(period)
            self.updates.setdefault(period, {m: device.partials_for(m) for m in MEMBERS})
        return {p: bytearray(k) for p, k in self.updates[t][vm].items()}

    def _update(self, vm: str, t: int | None = None) -> None:
        t = SCHEDULE.period_at(self.now) if t is None else t
        if self.up[vm] and self.keys_at[vm] < t:
            self.sessions[vm].apply_update(t, self._partials(vm, t), self.now)
            self.keys_at[vm] = t

    # ------------------------------------------------------------------ rules

    @initialize()
    def a_running_tvd_with_messages_in_flight(self) -> None:
        for vm in MEMBERS:
            self._update(vm)
        for pair in PAIRS:
            self.send(pair, 1)
        self._pump()
        for pair in PAIRS:
            self.send(pair, 2)

    @rule(pair=st.sampled_from(PAIRS), n=st.integers(1, 4))
    def send(self, pair: tuple[str, str], n: int) -> None:
        sender, peer = pair
        session = self.sessions[sender]
        if not self.up[sender]:
            return
        for _ in range(n):
            if not session.window_open(peer):
                return
            message_id = next(self.message_ids)
            count = self.counts[session.instance, peer] = (
                self.counts.get((session.instance, peer), 0) + 1
            )
            receiver = self.sessions[peer]
            known = session._peers[peer].delivery.numberings
            owed_to = receiver.instance if self.up[peer] and receiver.instance in known else None
            handle = session.send(peer, {"id": message_id}, self.now)
            self.sent[message_id] = Sent(sender, session.instance, peer, count, owed_to)
            self.handles[session.instance, handle] = message_id
        self._drain_events()

    @rule(vm=st.sampled_from(MEMBERS))
    def bridge_update(self, vm: str) -> None:
        """The bridge's update of the current period reaches one node (others later)."""
        self._update(vm)
        self._drain_events()

    @rule(first=st.sampled_from(MEMBERS), early=st.booleans())
    def next_period(self, first: str, early: bool) -> None:
        """Time reaches the next period (or just before it, within the allowance) and
        its update reaches one node: the others hold the older key for a while."""
        t = SCHEDULE.period_at(self.now) + 1
        self.now = SCHEDULE.start(t) - (ALLOWANCE / 2 if early else -0.01)
        self._timers()
        self._update(first, t)
        self._drain_events()

    @rule(index=st.integers(0, 20), side=st.integers(0, 1), size=st.integers(1, 200))
    def move_bytes(self, index: int, side: int, size: int) -> None:
        live = [w for w in self.wires if not w.dead]
        if live:
            wire = live[index % len(live)]
            self._collect(wire)
            self._deliver(wire, side, size)
            self._drain_events()

    @rule(index=st.integers(0, 20), side=st.integers(0, 1))
    def arrive_then_cut(self, index: int, side: int) -> None:
        """One side's frames arrive, then the connection breaks before any answer: the
        receiver delivered what the sender still holds unacknowledged."""
        live = [w for w in self.wires if not w.dead]
        if live:
            wire = live[index % len(live)]
            self._collect(wire)
            self._deliver(wire, side, None)
            self._drain_events()
            self._cut(wire)
            self._drain_events()

    @rule()
    def pump(self) -> None:
        self._pump()

    @rule(index=st.integers(0, 20))
    def cut(self, index: int) -> None:
        live = [w for w in self.wires if not w.dead]
        if live:
            self._cut(live[index % len(live)])
            self._drain_events()

    @rule(seconds=st.sampled_from([0.05, 0.3, 0.9, 1.6, 3.0, 7.0]))
    def wait(self, seconds: float) -> None:
        self.now += seconds
        self._timers()
        self._drain_events()

    @rule(vm=st.sampled_from(MEMBERS), stay_down=st.booleans())
    def crash(self, vm: str, stay_down: bool) -> None:
        """The node process dies, its queue with it (its unacknowledged messages are owed
        by no one any more); a new instance starts at once or later (`start`)."""
        if not self.up[vm]:
            return
        for wire in self._ends_of(self.sessions[vm]):
            self._cut(wire)
        self.up[vm] = False
        if not stay_down:
            self._start(vm)
        self._drain_events()

    @rule(pair=st.sampled_from(PAIRS))
    def forged_instance(self, pair: tuple[str, str]) -> None:
        """Malware that read `victim`'s keys this period poses as a new instance of it to
        `target`, takes what `target` sends it (acknowledging it), and goes away. The
        real instance must lose nothing by it (SPEC §4: numbering per instance)."""
        victim, target = pair
        t = SCHEDULE.period_at(self.now)
        if not self.up[target] or self.keys_at[target] < t:
            return
        forger = Session(
            self.tvd.computer_keys(victim),
            SCHEDULE,
            allowance=ALLOWANCE,
            instance=b"forger%02d" % (next(self.forged) % 100),
        )
        forger.apply_update(t, self._partials(victim, t), self.now)
        self.forgers.append(forger)
        self.delivered[forger.instance] = []
        self._connect(forger, self.sessions[target])
        self._pump()
        for wire in self._ends_of(forger):
            self._cut(wire)
        self.forgers.remove(forger)
        self._drain_events()

    @rule(vm=st.sampled_from(MEMBERS))
    def start(self, vm: str) -> None:
        if not self.up[vm]:
            self._start(vm)

    # ------------------------------------------------------------------ checks

    @invariant()
    def acknowledged_means_delivered(self) -> None:
        for message_id in self.acked:
            sent = self.sent[message_id]
            assert self._exempt(sent.instance, self.sessions[sent.peer].instance) or any(
                message_id in ids for ids in self.delivered.values()
            )

    def teardown(self) -> None:
        """Calm: every node runs with current keys, the network delivers everything.
        Then every message a running sender sent must be acknowledged."""
        for vm in MEMBERS:
            if not self.up[vm]:
                self._start(vm)
        for pair in PAIRS:  # every instance now running says something to every peer
            self.send(pair, 1)
        for _ in range(600):
            for vm in MEMBERS:
                self._update(vm)
            self._pump()
            if self._settled():
                break
            self.now += 0.5
            self._timers()
        running = {session.instance for session in self.sessions.values()}
        owed = sorted(
            message_id
            for message_id, sent in self.sent.items()
            if sent.instance in running and message_id not in self.acked
        )
        assert owed == [], f"messages never acknowledged after the calm: {owed}"
        # What a running sender sent to a receiver instance it knew, which still runs,
        # reached that very instance: a forger's acknowledgement took nothing from it.
        missed = sorted(
            message_id
            for message_id, sent in self.sent.items()
            if sent.instance in running
            and sent.owed_to in running
            and not self._exempt(sent.instance, sent.owed_to)
            and message_id not in self.delivered[sent.owed_to]
        )
        assert missed == [], f"messages a running receiver instance never got: {missed}"

    def _settled(self) -> bool:
        return all(
            session.unacknowledged(peer) == 0
            for session in self.sessions.values()
            for peer in session.peers
        )


DeliveryModel.TestCase.settings = settings(
    max_examples=500,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestDelivery = DeliveryModel.TestCase

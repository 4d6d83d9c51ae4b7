"""What a node keeps to deliver messages exactly once and in order (SPEC §4 Delivery).

Per peer, `PeerDelivery` holds the messages the application sent that no instance of
the peer has acknowledged yet (`pending`, which the send window bounds), and one
`Numbering` per peer instance the node knows: the message numbers between this node's
instance and that one, in both directions. A numbering never restarts; an instance that
returns resumes it.

A message goes into the numbering of every instance the node keeps (a copy each), so
that a forged instance cannot take a message away from the real one: each copy leaves
its numbering only when acknowledged in it, and the message counts as delivered (its
`send()` returns) once acknowledged in any. Acknowledgement is a set: an ACK of `a` in a
frame under period u acknowledges the copies numbered <= a whose message was first
sealed under u or older.

Sans-I/O like the Session that drives it: no clock, no sockets.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator

__all__ = ["Entry", "Numbering", "OutMessage", "PeerDelivery"]


class OutMessage:
    """One `Session.send`: its handle, packed body, and first sealing period (SPEC §4)."""

    __slots__ = ("body", "done", "first_period", "handle", "size")

    def __init__(self, handle: int, body: bytes, size: int) -> None:
        self.handle = handle
        self.body = body  # the packed body
        self.size = size  # counted against the send window
        self.first_period: int | None = None  # a message sealed under t never goes older
        self.done = False  # acknowledged in some numbering: its send() has returned


class Entry:
    """A copy of a message in one numbering: its number there and the packed MSG."""

    __slots__ = ("message", "packed", "seq")

    def __init__(self, message: OutMessage, seq: int, packed: bytes) -> None:
        self.message = message
        self.seq = seq
        self.packed = packed  # [0, seq, body], ready to go into a plaintext


class Numbering:
    """Message numbers between this node's instance and one instance of the peer."""

    __slots__ = (
        "acknowledged_any",
        "delivered",
        "entries",
        "handles",
        "highest_sent",
        "instance",
        "last_auth",
        "next_seq",
        "resumed",
    )

    def __init__(self, instance: bytes, now: float) -> None:
        self.instance = instance
        self.entries: deque[Entry] = deque()  # copies not yet acknowledged here, by number
        self.handles: set[int] = set()  # the messages these entries carry
        self.next_seq = 1
        self.highest_sent = 0  # the highest number ever sealed in this numbering
        self.acknowledged_any = False  # whether any ACK acknowledged a copy here
        self.resumed = False  # made again for an instance whose numbering was evicted
        self.delivered = 0  # receiving: the highest contiguous number delivered from it
        self.last_auth = now  # its last authenticated frame, for eviction

    def __repr__(self) -> str:
        return (
            f"<Numbering instance={self.instance.hex()} unacknowledged={len(self.entries)} "
            f"next={self.next_seq} delivered={self.delivered}>"
        )

    def add(self, message: OutMessage, packed: bytes) -> Entry:
        """Append a copy of `message` under the next number; `packed` is [0, seq, body]."""
        entry = Entry(message, self.next_seq, packed)
        self.next_seq += 1
        self.entries.append(entry)
        self.handles.add(message.handle)
        return entry

    def acknowledge(self, upto: int, period: int) -> list[OutMessage]:
        """The copies numbered <= `upto` first sealed under `period` or older leave; the
        others stay to be sent again. Returns their messages."""
        entries = self.entries
        acked: list[OutMessage] = []
        kept: list[Entry] = []
        while entries and entries[0].seq <= upto:
            entry = entries.popleft()
            first = entry.message.first_period
            if first is not None and first <= period:
                acked.append(entry.message)
                self.handles.discard(entry.message.handle)
            else:
                kept.append(entry)
        entries.extendleft(reversed(kept))
        if acked:
            self.acknowledged_any = True
        return acked

    def continue_after(self, number: int, pack_header: Callable[[int], bytes]) -> None:
        """This numbering was made again for a returning instance after its old one was
        evicted, nothing was acknowledged in it yet, and the instance says (in the first
        frame of a connection) it has delivered up to `number`: number the copies from
        number + 1 on, so that they are not taken for duplicates and nothing waits for a
        number that this node will never send."""
        assert self.resumed
        assert not self.acknowledged_any
        self.highest_sent = 0
        self.next_seq = number + 1
        for entry in self.entries:
            entry.seq = self.next_seq
            entry.packed = pack_header(entry.seq) + entry.message.body
            self.next_seq += 1

    def unsent(self, after: int) -> list[Entry]:
        """The copies numbered above `after`, in order."""
        return [entry for entry in self.entries if entry.seq > after]


class PeerDelivery:
    """Everything a node keeps to deliver to one peer and from it."""

    __slots__ = (
        "current",
        "forgotten",
        "numberings",
        "pending",
        "pending_bytes",
        "pending_count",
    )

    def __init__(self) -> None:
        self.pending: deque[OutMessage] = deque()  # not yet acknowledged anywhere, in order
        self.pending_count = 0  # of those, the ones not done (done ones leave from the front)
        self.pending_bytes = 0
        self.numberings: dict[bytes, Numbering] = {}
        self.current: bytes | None = None  # the instance authenticated most recently
        # Of instances whose numbering was evicted, how far each had delivered (bounded):
        # one that returns resumes receiving where it stopped instead of at 1.
        self.forgotten: OrderedDict[bytes, int] = OrderedDict()

    def __repr__(self) -> str:
        return f"<PeerDelivery pending={len(self.pending)} numberings={len(self.numberings)}>"

    def unacknowledged(self) -> int:
        return self.pending_count

    def add(self, message: OutMessage) -> None:
        self.pending.append(message)
        self.pending_count += 1
        self.pending_bytes += message.size

    def waiting(self) -> Iterator[OutMessage]:
        """The messages not yet acknowledged anywhere, in the order they were sent."""
        return (m for m in self.pending if not m.done)

    def done(self, messages: Iterable[OutMessage]) -> list[int]:
        """Mark `messages` delivered; the handles of those that were not already."""
        handles = []
        for message in messages:
            if not message.done:
                message.done = True
                self.pending_count -= 1
                self.pending_bytes -= message.size
                handles.append(message.handle)
        pending = self.pending
        while pending and pending[0].done:
            pending.popleft()
        return handles

    def delivered_from(self, instance: bytes) -> int:
        """How far this node delivered from `instance` (0 if it never did, as far as it
        remembers), without creating its numbering."""
        numbering = self.numberings.get(instance)
        return numbering.delivered if numbering is not None else self.forgotten.get(instance, 0)

    def numbering(self, instance: bytes, now: float) -> Numbering:
        """The numbering of `instance`, resumed or new."""
        numbering = self.numberings.get(instance)
        if numbering is None:
            numbering = self.numberings[instance] = Numbering(instance, now)
            if instance in self.forgotten:
                numbering.resumed = True
                numbering.delivered = self.forgotten.pop(instance)
        return numbering

    def evict(self, keep: set[bytes], since: float, at_most: int, remember: int) -> list[bytes]:
        """Forget the numberings that are neither in `keep` nor had an authenticated frame
        since `since`, and beyond those, all but the `at_most` most recent; of the
        forgotten, remember how far they delivered (the `remember` most recent)."""
        others = sorted(
            (n for n in self.numberings.values() if n.instance not in keep),
            key=lambda n: n.last_auth,
            reverse=True,
        )
        gone = [n for i, n in enumerate(others) if i >= at_most or n.last_auth < since]
        for numbering in gone:
            del self.numberings[numbering.instance]
        self._remember(gone, remember)
        return [n.instance for n in gone]

    def _remember(self, numberings: Iterable[Numbering], remember: int) -> None:
        """Keep how far each of `numberings` delivered, filed in the order given (the
        last counts as the most recent), and of all that are remembered, the `remember`
        filed last."""
        for numbering in numberings:
            self.forgotten[numbering.instance] = numbering.delivered
            self.forgotten.move_to_end(numbering.instance)
        while len(self.forgotten) > remember:
            self.forgotten.popitem(last=False)

    def forget(self, remember: int) -> list[OutMessage]:
        """Drop the messages and numberings (the peer left the TVD); returns the
        undelivered messages. How far each instance had delivered is kept in `forgotten`
        (the `remember` most recent), as for an evicted numbering: if the peer comes back
        while both processes still run, each numbering resumes instead of restarting at 1
        (which would make the peer take new messages for duplicates, SPEC §4)."""
        lost = list(self.waiting())
        self.pending.clear()
        self.pending_count = self.pending_bytes = 0
        self._remember(sorted(self.numberings.values(), key=lambda n: n.last_auth), remember)
        self.numberings.clear()
        self.current = None
        return lost

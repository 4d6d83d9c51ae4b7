"""Shared test helpers: the spec's vectors, and two or more Sessions wired in memory."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import msgpack

from tvdnet import Session
from tvdnet.core import frames
from tvdnet.core.constants import KEY_DELAY, KEY_SPREAD
from tvdnet.core.scheme import ComputerKeys, Schedule, generate
from tvdnet.core.session import _Connection

REPO = Path(__file__).resolve().parent.parent
VECTORS_PATH = REPO / "spec" / "vectors.json"
SHARED_SPEC = REPO.parent / "shared" / "spec"


def load_vectors() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(VECTORS_PATH.read_text())
    return data


# The longest a KEY is held back after the event that asks for it (SPEC §4: within 100 ms).
KEY_DUE = KEY_DELAY + KEY_SPREAD

# Periods of 10 s from t=0; tests pick `now` inside the period they want.
SCHEDULE = Schedule(epoch=0.0, period_s=10.0, periods=1000)


def mid(t: int, schedule: Schedule = SCHEDULE) -> float:
    """A time in the middle of period t."""
    return schedule.start(t) + schedule.period_s / 2


class Tvd:
    """A provisioned TVD: the device keys, each member's computer keys, and their Sessions."""

    def __init__(
        self,
        members: Iterable[str] = ("vm-a", "vm-b"),
        schedule: Schedule = SCHEDULE,
        tvd: str = "test-tvd",
    ) -> None:
        self.tvd = tvd
        self.members = tuple(members)
        self.schedule = schedule
        self.provisioning = generate(tvd, self.members)
        self.device = self.provisioning.for_bridge()
        self.sessions: dict[str, Session] = {}
        self._updates: dict[int, dict[str, dict[str, bytes]]] = {}

    def computer_keys(self, vm: str) -> ComputerKeys:
        return self.provisioning.for_vm(vm)

    def session(self, vm: str, **kwargs: Any) -> Session:
        """A Session of `vm`. Its keys are derived as each update is applied (no spread of
        key changes, `key_change_spread=0`) unless the test says otherwise: the SPEC §4
        rules these tests check are stated from the moment a key is derived."""
        kwargs.setdefault("key_change_spread", 0.0)
        session = Session(self.computer_keys(vm), self.schedule, **kwargs)
        self.sessions[vm] = session
        return session

    def updates_of(self, vm: str, t: int) -> dict[str, bytes]:
        """The partial keys of `vm`'s pairs for period t, as the bridge computed them
        (the device keys only move forward; each period's partials are kept)."""
        for period in range(self.device.period, t + 1):
            self.device.evolve_to(period)
            self._updates.setdefault(period, {m: self.device.partials_for(m) for m in self.members})
        return self._updates[t][vm]

    def partials(self, vm: str, t: int) -> dict[str, bytearray]:
        """The bridge's update for `vm` in period t, ready to apply (and be zeroed)."""
        return {peer: bytearray(p) for peer, p in self.updates_of(vm, t).items()}

    def update(self, vm: str, t: int, now: float) -> tuple[int, list[str]]:
        """Apply vm's update for period t at `now`, and the key work it leaves due at
        `now` (Session.apply_update only derives; the rest is a timer at once)."""
        session = self.sessions[vm]
        result = session.apply_update(t, self.partials(vm, t), now)
        session.handle_timeout(now)
        return result

    def update_all(self, t: int, now: float) -> None:
        for vm in self.sessions:
            self.update(vm, t, now)


class Link:
    """One connection between two sessions, carried in memory."""

    def __init__(self, a: Session, b: Session, now: float, source: str | None = None) -> None:
        self.a, self.b = a, b
        self.conn_a = a.connect(b.me, now)
        self.conn_b = b.accept(now, source)
        self.sent_by_a: list[bytearray] = []  # raw chunks, for tests that inspect frames
        self.sent_by_b: list[bytearray] = []
        self.closed = False

    def side(self, session: Session) -> int:
        return self.conn_a if session is self.a else self.conn_b

    def pump(self, now: float, rounds: int = 50) -> None:
        """Move bytes both ways until neither side has anything more to say."""
        for _ in range(rounds):
            moved = False
            for src, dst, c_src, c_dst, log in (
                (self.a, self.b, self.conn_a, self.conn_b, self.sent_by_a),
                (self.b, self.a, self.conn_b, self.conn_a, self.sent_by_b),
            ):
                data = src.data_to_send(c_src, now)
                if data:
                    moved = True
                    log.append(data)
                    dst.receive_data(c_dst, data, now)
                if src.is_finished(c_src) and not self.closed:
                    # The writer closes the socket: the other side sees EOF.
                    self.closed = True
                    dst.receive_data(c_dst, b"", now)
                    dst.is_finished(c_dst)
            if not moved:
                return


def events(session: Session) -> list[Any]:
    out = []
    while (event := session.next_event()) is not None:
        out.append(event)
    return out


def frames_in(chunks: Iterable[bytes | bytearray]) -> list[Any]:
    unpacker = msgpack.Unpacker(raw=False)
    for chunk in chunks:
        unpacker.feed(chunk)
    return list(unpacker)


def connection(session: Session, conn_id: int) -> _Connection:
    return session._conns[conn_id]


def open_frame_as(receiver: Session, conn_id: int, frame: list[Any]) -> list[Any]:
    """Decrypt a DATA frame sent to `receiver` on `conn_id`, the way receiver would."""
    conn = connection(receiver, conn_id)
    assert conn.peer is not None
    peer = receiver._peers[conn.peer]
    key = frames.traffic_key(
        peer.keys.open_key(frame[1]), receiver.tvd, conn.peer, receiver.me, frame[1],
        conn.peer_nonce, conn.local_nonce, conn.peer_instance, receiver.instance,
    )  # fmt: skip
    plaintext = frames.open_data(frames.new_aead(key), frame[1], frame[2], frame[3])
    inner: list[Any] = msgpack.unpackb(plaintext, raw=False, strict_map_key=False)
    return inner

"""The bridge daemon: U* at every period start, and one worker per VM (SPEC §3, §5, §6).

What happens when (the one place to read it):

- Start (`open_bridge`): evolve every device key to the current period and rewrite the
  keystore *before anything else* (SPEC §1), drop members the TVD file no longer lists,
  then start one worker per VM, the period task and the keystore writer.
- Period start (`_begin_period`): evolve dev_{t-1} to dev_t in place (U*; dev_{t-1} is
  overwritten, SPEC §3), hand every worker its update (never waiting for any VM), and
  have the keystore rewritten with dev_t. The push does not wait for the keystore write:
  the file on disk holds dev_{t-1} until the atomic rename lands either way, so waiting
  would only delay the updates by scrypt and fsync (seconds on a busy disk) without
  shortening that window; see docs/bridge.md.
- After the last period: no more updates; the bridge says so and keeps serving welcomes.
- Reload: members the TVD file no longer lists are removed (their device keys erased,
  the keystore rewritten), their channels closed, and every VM whose member list changed
  gets `members` and the current update. A new member is refused: it needs `provision`.
"""

from __future__ import annotations

import functools
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import trio

from tvdnet import WallClock, channel
from tvdnet.control import answers
from tvdnet.core.channel import Member
from tvdnet.core.errors import NoSuchPeriod
from tvdnet.core.scheme import DeviceKeys, Pair, Schedule

from ._config import MemberConfig, TvdConfig, load_config
from ._iso import DEFAULT_ISO_DIR
from ._keystore import Keystore, MemberRecord, MoveIn
from ._log import emit, logger
from ._moves import open_bundle, peek_bundle, seal_bundle
from ._retry import Backoff
from ._rollout import KeyUpdate, RolloutLog
from ._signal import Signal
from ._transports import CdromSwap, UnixListen, development_reason
from ._watchdog import WriteWatchdog
from ._worker import CdromWorker, ChannelWorker, VmStatus, Worker
from .constants import (
    BRIDGE_KEYSTORE_RETRY,
    BRIDGE_KEYSTORE_RETRY_MAX,
    BRIDGE_RECONNECT_MAX,
    BRIDGE_SHUTDOWN_WRITE_TIMEOUT,
    BRIDGE_WRITE_TIMEOUT,
    MOVES_IN_KEPT,
)
from .errors import KeystoreError, MoveError, ReloadError, TransportRefused

__all__ = ["Bridge", "BridgeStatus", "ReloadResult", "open_bridge"]


@dataclass(frozen=True, slots=True)
class BridgeStatus:
    tvd: str
    host: str
    # vm -> {other host: [its peers there]}: pairs whose device key the other host holds too
    pairs_elsewhere: dict[str, dict[str, list[str]]]
    period: int | None  # the period whose updates are out (None before the epoch or after N)
    schedule: Schedule
    keystore: str | None
    keystore_period: int | None  # the period of the device keys on disk
    keystore_errors: int
    vms: tuple[VmStatus, ...]
    key_updates: tuple[KeyUpdate, ...] = ()  # recent periods: start to the last VM's ack
    suspended: tuple[str, ...] = ()  # members of this host not served now (keys kept)

    def to_json(self) -> dict[str, object]:
        return {
            "tvd": self.tvd,
            "host": self.host,
            "suspended": list(self.suspended),
            "pairs_elsewhere": {
                vm: {host: sorted(peers) for host, peers in hosts.items()}
                for vm, hosts in self.pairs_elsewhere.items()
            },
            "period": self.period,
            "epoch": self.schedule.epoch,
            "period_s": self.schedule.period_s,
            "periods": self.schedule.periods,
            "keystore": self.keystore,
            "keystore_period": self.keystore_period,
            "keystore_errors": self.keystore_errors,
            "vms": [vm.to_json() for vm in self.vms],
            "key_updates": [update.to_json() for update in self.key_updates],
        }


@dataclass(frozen=True, slots=True)
class MoveResult:
    vm: str
    source: str
    target: str
    t: int
    pairs: int  # pairs in the bundle
    adopted: int = 0  # move-in: pairs this host did not hold before

    def to_json(self) -> dict[str, object]:
        return {
            "vm": self.vm,
            "from": self.source,
            "to": self.target,
            "t": self.t,
            "pairs": self.pairs,
            "adopted": self.adopted,
        }


@dataclass(frozen=True, slots=True)
class ReloadResult:
    removed: tuple[str, ...] = ()
    told: tuple[str, ...] = ()  # VMs that were sent `members` and the current update
    moved: tuple[str, ...] = ()  # VMs whose channel changed
    # (vm, what, before, after) for each address, channel or host that changed
    changes: tuple[tuple[str, str, str, str], ...] = ()
    moved_away: tuple[str, ...] = ()  # members now served by another host: keys erased here
    suspended: tuple[str, ...] = ()  # members of this host no longer served (keys kept)
    resumed: tuple[str, ...] = ()  # suspended members of this host served again

    def to_json(self) -> dict[str, object]:
        return {
            "removed": list(self.removed),
            "suspended": list(self.suspended),
            "resumed": list(self.resumed),
            "told": list(self.told),
            "moved": list(self.moved),
            "moved_away": list(self.moved_away),
            "changes": [
                {"vm": vm, "what": what, "before": before, "after": after}
                for vm, what, before, after in self.changes
            ],
        }


@dataclass(slots=True)
class _Running:
    worker: Worker
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


def _check_transports(config: TvdConfig, allow_dev: bool, host: str) -> None:
    if allow_dev:
        return
    for member in config.members_on(host):
        why = development_reason(member.channel)
        if why is not None:
            raise TransportRefused(member.id, why)


_Change = TypeVar("_Change", bound=Callable[..., Awaitable[Any]])


def _one_change_at_a_time(method: _Change) -> _Change:
    """Reloads and moves each read the TVD file in a thread and then apply it: one at a
    time, so that a slower read of an older file is never applied after a newer one."""

    @functools.wraps(method)
    async def serialised(self: Bridge, *args: Any, **kwargs: Any) -> Any:
        async with self._changes:
            return await method(self, *args, **kwargs)

    return cast(_Change, serialised)


class Bridge:
    """A running bridge. Get one from `open_bridge`; its methods are for the event loop."""

    def __init__(
        self,
        config: TvdConfig,
        device_keys: DeviceKeys,
        schedule: Schedule,
        keystore: Keystore | None,
        clock: WallClock,
        allow_dev: bool,
        iso_dir: Path,
        host: str,
    ) -> None:
        self.config = config
        self.host = host  # the members of this host are the ones this bridge serves
        self._moved_out: dict[str, str] = {}  # vm -> the host its bundle was made for
        # Members taken in by a bundle while running, and the host each came from: it may
        # go back there (a move undone) without a bundle, as that host still serves it.
        self._moved_in: dict[str, str] = {}
        self.schedule = schedule
        self._keys = device_keys
        self._keystore = keystore
        self._clock = clock
        self._allow_dev = allow_dev
        self._iso_dir = iso_dir
        self._running: dict[str, _Running] = {}
        self._nursery: trio.Nursery | None = None
        self.period: int | None = None  # the period whose updates are out
        self._members: dict[str, tuple[Member, ...]] = {}  # each VM's welcome member list
        self._rollouts = RolloutLog()
        self._watchdog = WriteWatchdog(BRIDGE_WRITE_TIMEOUT)
        self._keystore_dirty = False
        self._keystore_busy = False
        self._keystore_wake = Signal()
        self._keystore_idle = Signal()
        self.keystore_period: int | None = device_keys.period if keystore is not None else None
        self._changes = trio.Lock()  # reloads and moves, one at a time
        self.keystore_errors = 0
        self.keystore_writes = 0
        self.last_keystore_write_s: float | None = None

    def __repr__(self) -> str:
        return (
            f"<Bridge tvd={self.tvd!r} host={self.host!r} period={self.period} "
            f"vms={len(self._running)}>"
        )

    @property
    def tvd(self) -> str:
        return self._keys.tvd

    @property
    def vms(self) -> tuple[str, ...]:
        return tuple(self._running)

    # ------------------------------------------------------------------ what callers see

    def status(self) -> BridgeStatus:
        elsewhere: dict[str, dict[str, list[str]]] = {}
        host_of = {m.id: m.host for m in self.config.members}
        for pair in self._keys.pairs:
            for vm in pair:
                other = pair.other(vm)
                if vm in self._running and host_of.get(other, self.host) != self.host:
                    peers = elsewhere.setdefault(vm, {}).setdefault(host_of[other], [])
                    peers.append(other)
        return BridgeStatus(
            tvd=self.tvd,
            host=self.host,
            pairs_elsewhere=elsewhere,
            period=self.period,
            schedule=self.schedule,
            keystore=str(self._keystore.path) if self._keystore is not None else None,
            keystore_period=self.keystore_period,
            keystore_errors=self.keystore_errors,
            vms=tuple(r.worker.status(self.period) for r in self._running.values()),
            key_updates=self._rollouts.snapshot(),
            suspended=tuple(m.id for m in self.config.members_on(self.host) if m.suspended),
        )

    def worker(self, vm: str) -> Worker:
        return self._running[vm].worker

    async def wait_acked(self, vm: str, t: int) -> None:
        """Return once `vm` acknowledged period t (approach I: once t was swapped in)."""
        await self._running[vm].worker.wait_acked(t)

    async def wait_keystore(self) -> None:
        """Return once every change so far is on disk (the keystore writer is idle)."""
        while self._keystore is not None and (self._keystore_dirty or self._keystore_busy):
            await self._keystore_idle.wait()

    # ------------------------------------------------------------------ start

    def _provisioned(self) -> set[str]:
        if self._keystore is not None:
            return set(self._keystore.members)
        return self._keys.members()

    def _records(self) -> None:
        """The keystore remembers each member as the TVD file now describes it."""
        if self._keystore is not None:
            self._keystore.members = {
                m.id: MemberRecord(m.id, m.address, str(m.channel)) for m in self.config.members
            }

    def _period_now(self) -> int | None:
        """The current period; None before the epoch, N+1 after the last period."""
        now = self._clock.now()
        if now < self.schedule.epoch:
            return None
        try:
            return self.schedule.period_at(now)
        except NoSuchPeriod:
            return self.schedule.periods + 1

    async def _start(self) -> None:
        """SPEC §1: evolve to the current period and rewrite the keystore before anything."""
        provisioned = self._provisioned()
        for i, member in enumerate(self.config.members):
            if member.id not in provisioned:
                raise self.config.error(
                    f"members[{i}].id",
                    f"{member.id!r} is not in the keystore: a new member needs device keys and "
                    "a computer-key file; run `tvdnet-bridge provision` (SPEC §6)",
                )
        for i, member in enumerate(self.config.members):
            channel = member.channel
            if member.host != self.host or member.suspended:
                continue
            if isinstance(channel, UnixListen) and await answers(channel.path):
                # Issue 18: a second bridge on the same TVD file (another keystore) would
                # otherwise run beside the first, serving nothing.
                raise self.config.error(
                    f"members[{i}].channel",
                    f"another process answers on {channel.path}: is a bridge already "
                    "serving this TVD? Stop it first, or give this one other channel paths",
                )
        self._check_pairs_held(self.config)
        keys = self._keys
        before = keys.period
        target = min(self._period_now() or 1, self.schedule.periods)
        if target > keys.period:
            self._evolve_to(target)
        removed = sorted(provisioned - set(self.config.ids))
        for vm in removed:
            dropped = self._drop_keys(vm)
            emit(logging.WARNING, "member-removed", vm=vm, pairs=dropped, at="start")
        self._erase_pairs_not_needed(self.config, "start")
        self._records()
        if self._keystore is not None:
            started = time.perf_counter()
            await trio.to_thread.run_sync(self._keystore.write, self._keystore.snapshot())
            self.keystore_period = keys.period
            self.keystore_writes += 1
            self.last_keystore_write_s = time.perf_counter() - started
        emit(
            logging.INFO,
            "started",
            tvd=self.tvd,
            host=self.host,
            vms=len(self.config.served_on(self.host)),
            pairs=len(keys.pairs),
            keys_from=before,
            keys_at=keys.period,
            keystore_ms=(self.last_keystore_write_s or 0) * 1000 if self._keystore else None,
        )
        self._members = self._member_lists()

    def _check_pairs_held(self, config: TvdConfig, skip: str | None = None) -> None:
        """Every member this host serves needs the device key of each of its pairs: a TVD
        file that puts a member here before its keys came (`move-in`) is refused."""
        expected = config.pair_list()
        held = set(self._keys.pairs)
        ids = config.ids
        for i, member in enumerate(config.members):
            if member.host != self.host or member.id == skip:
                continue
            if expected is None:
                peers = [other for other in ids if other != member.id]
            else:
                peers = [b if a == member.id else a for a, b in expected if member.id in (a, b)]
            missing = [peer for peer in peers if Pair.of(member.id, peer) not in held]
            if missing:
                raise config.error(
                    f"members[{i}].host",
                    f"puts {member.id} on this host ({self.host}), but its keys for "
                    f"{', '.join(missing)} are not in this host's keystore: take it in with "
                    "`tvdnet-bridge move-in`, or give its host as before",
                )

    def _erase_pairs_not_needed(self, config: TvdConfig, at: str) -> int:
        """SPEC §1: a host holds exactly the pairs with a member on it. Erase the others
        (a member that moved away; the file edited while the bridge was down): each is
        still held by the host of each of its members."""
        host_of = {m.id: m.host for m in config.members}
        gone = [
            pair
            for pair in self._keys.pairs
            if self.host not in (host_of.get(pair.lo), host_of.get(pair.hi))
        ]
        erased = self._keys.drop_pairs(gone)
        if erased:
            emit(logging.WARNING, "pairs-erased", pairs=erased, at=at,
                 why="no member of theirs is on this host")  # fmt: skip
        return erased

    def _evolve_to(self, t: int) -> None:
        if self._keystore is not None:
            self._keystore.evolve_to(t)  # the transfer keys with the device keys
        else:
            self._keys.evolve_to(t)

    def _drop_keys(self, vm: str) -> int:
        if self._keystore is not None:
            return self._keystore.drop_member(vm)
        return self._keys.drop_member(vm)

    def _member_lists(self) -> dict[str, tuple[Member, ...]]:
        """Each VM's welcome list: itself and the members it shares a pair with, but for
        suspended members (they are no members while suspended, SPEC §5)."""
        peers: dict[str, set[str]] = {vm: set() for vm in self.config.ids}
        for pair in self._keys.pairs:
            peers.setdefault(pair.lo, set()).add(pair.hi)
            peers.setdefault(pair.hi, set()).add(pair.lo)
        active = [m for m in self.config.members if not m.suspended]
        return {
            m.id: tuple(
                Member(other.id, other.address)
                for other in active
                if other.id == m.id or other.id in peers[m.id]
            )
            for m in active
        }

    def _welcome(self, vm: str) -> channel.Welcome:
        return channel.Welcome(self.tvd, vm, self.schedule, self._members[vm])

    def _new_worker(self, member: MemberConfig) -> Worker:
        if isinstance(member.channel, CdromSwap):
            return CdromWorker(
                member.id,
                member.channel,
                self._clock,
                self._iso_dir,
                allow_dev=self._allow_dev,
                on_acked=self._rollouts.acked,
            )
        return ChannelWorker(
            member.id,
            member.channel,
            self._welcome(member.id),
            self._clock,
            allow_dev=self._allow_dev,
            on_acked=self._rollouts.acked,
            on_written=self._rollouts.written,
            watchdog=self._watchdog,
        )

    def _launch(self, running: _Running) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(self._supervise, running, name=f"vm:{running.worker.vm}")

    async def _supervise(self, running: _Running) -> None:
        """Run one VM's worker; a bug in one VM's handling must not stop the others."""
        backoff = Backoff(1.0, BRIDGE_RECONNECT_MAX)
        with running.scope:
            while True:
                try:
                    await running.worker.run()
                    return
                except Exception:
                    logger.exception("event=worker-crashed vm=%s", running.worker.vm)
                    await trio.sleep(backoff.failed())

    # ------------------------------------------------------------------ periods (U*)

    async def _run_periods(
        self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Begin each period at its start; `started` once the current update is out."""
        schedule, clock = self.schedule, self._clock
        started = False
        t = self._period_now()
        if t is None:
            task_status.started()
            started = True
            emit(logging.INFO, "waiting-for-epoch", epoch=schedule.epoch)
            await clock.sleep_until(schedule.epoch)
            t = 1
        while True:
            if t > schedule.periods:
                self._schedule_over()
                if not started:
                    task_status.started()
                return
            if t < self._keys.period:
                emit(logging.ERROR, "clock-behind-keystore", now_t=t, keys_t=self._keys.period)
                if not started:
                    task_status.started()
                    started = True
                await clock.sleep_until(schedule.start(self._keys.period))
                t = self._keys.period
                continue
            self._begin_period(t)
            if not started:
                task_status.started()
                started = True
            await clock.sleep_until(schedule.end(t))
            # Woken at the end of t: t+1 has begun even if float rounding says a hair
            # earlier; after a suspend, a later period may be current already.
            t = max(t + 1, self._period_now() or t + 1)

    def _begin_period(self, t: int) -> None:
        started = time.perf_counter()
        if t > self._keys.period:
            self._evolve_to(t)  # U*: dev_{t-1} overwritten in place (SPEC §3)
            self._mark_keystore_dirty()
        self.period = t
        # Opened before the push: an ack can only come after it, but never miss one.
        connected = [vm for vm, r in self._running.items() if r.worker.connected]
        self._rollouts.begin(t, self.schedule.start(t), self._clock.now(), connected)
        self._push(t)
        emit(
            logging.INFO,
            "period",
            t=t,
            vms=len(self._running),
            push_ms=(time.perf_counter() - started) * 1000,
        )

    def _push(self, t: int, only: set[str] | None = None, *, members: bool = False) -> None:
        """Hand period t's update to every worker (or to `only`); no VM is waited for."""
        now = self._clock.now()
        start, end = self.schedule.start(t), self.schedule.end(t)
        partials = self._keys.all_partials()
        suspended = self.config.suspended
        try:
            for vm, running in self._running.items():
                if only is not None and vm not in only:
                    continue
                mine = partials.get(vm, {})
                if suspended:
                    mine = {peer: k for peer, k in mine.items() if peer not in suspended}
                update = channel.Update(t, mine)
                data = channel.encode(update)
                running.worker.new_update(
                    t, data, start, end, now, members=self._members[vm] if members else None
                )
        finally:
            for mine in partials.values():
                for partial in mine.values():
                    partial[:] = bytes(len(partial))

    def _schedule_over(self) -> None:
        self.period = None
        for running in self._running.values():
            running.worker.drop_update()
        emit(
            logging.ERROR,
            "schedule-ended",
            periods=self.schedule.periods,
            action="provision the TVD again",
        )

    # ------------------------------------------------------------------ the keystore

    def _mark_keystore_dirty(self) -> None:
        if self._keystore is not None:
            self._keystore_dirty = True
            self._keystore_wake.fire()

    async def _write_keystore(self) -> None:
        """Keep the file in step with memory: one write at a time, the newest state each time."""
        keystore = self._keystore
        assert keystore is not None
        backoff = Backoff(BRIDGE_KEYSTORE_RETRY, BRIDGE_KEYSTORE_RETRY_MAX)
        while True:
            if not self._keystore_dirty:
                self._keystore_idle.fire()
                await self._keystore_wake.wait()
                continue
            self._keystore_dirty = False
            self._keystore_busy = True
            period = self._keys.period
            started = time.perf_counter()
            try:
                # scrypt, AES-GCM and fsync run in a thread: the event loop keeps serving.
                await trio.to_thread.run_sync(keystore.write, keystore.snapshot())
            except KeystoreError as exc:
                self.keystore_errors += 1
                self._keystore_dirty = True
                delay = backoff.failed()
                emit(logging.ERROR, "keystore-write-failed", why=exc.problem, retry_s=delay)
                await trio.sleep(delay)
                continue
            finally:
                self._keystore_busy = False
            backoff.succeeded()
            self.keystore_period = period
            self.keystore_writes += 1
            self.last_keystore_write_s = time.perf_counter() - started
            emit(logging.DEBUG, "keystore-written", t=period, ms=self.last_keystore_write_s * 1000)

    async def _final_write(self) -> None:
        if self._keystore is None or not self._keystore_dirty:
            return
        with trio.move_on_after(BRIDGE_SHUTDOWN_WRITE_TIMEOUT) as scope:
            scope.shield = True
            try:
                await trio.to_thread.run_sync(self._keystore.write, self._keystore.snapshot())
                self._keystore_dirty = False
                self.keystore_period = self._keys.period
            except KeystoreError as exc:
                emit(logging.ERROR, "keystore-write-failed", why=exc.problem, at="shutdown")

    # ------------------------------------------------------------------ membership

    # ------------------------------------------------------------------ moves (SPEC §6)

    @_one_change_at_a_time
    async def move_out(
        self, vm: str, target: str, write: Callable[[bytes], Awaitable[None]]
    ) -> MoveResult:
        """Seal the current device keys of `vm`'s pairs held here into a bundle for host
        `target` and hand it to `write` (which stores it); only then is the move recorded.
        A member served here keeps being served until a reload names its new host. One
        that is not (it left already) can still be sealed: its pairs with this host's
        members are here, and its new host may need them (SPEC §6)."""
        keystore = self._keystore
        if keystore is None:
            raise MoveError("this bridge runs without a keystore: it has no transfer keys")
        if not any(vm in pair for pair in self._keys.pairs):
            raise MoveError(f"this host ({self.host}) holds no pair of {vm!r}")
        if target == self.host:
            raise MoveError(f"{vm!r} is already on host {target!r}")
        link = Pair.of(self.host, target) if target != self.host else None
        if link is None or link not in keystore.transfer_keys.pairs:
            raise MoveError(
                f"this host has no transfer key with {target!r}: a move goes only between "
                "hosts the TVD was provisioned with (its `hosts`)"
            )
        t = self._keys.period
        keys = {pair: self._keys.key_bytes(pair) for pair in self._keys.pairs if vm in pair}
        bundle = seal_bundle(
            tvd=self.tvd,
            vm=vm,
            source=self.host,
            target=target,
            t=t,
            transfer_t=keystore.transfer_keys.key_bytes(link),
            keys=keys,
        )
        result = MoveResult(vm, self.host, target, t, len(keys))
        await write(bundle)  # a bundle that was not stored is no move
        self._moved_out[vm] = target
        emit(logging.INFO, "move-out", vm=vm, to=target, t=t, pairs=len(keys))
        return result

    @_one_change_at_a_time
    async def move_in(self, data: bytes, config: TvdConfig | None = None) -> MoveResult:
        """Take in a bundle made for this host: re-read the TVD file (which must now put the
        VM on this host), check everything, then hold the keys, serve the VM and push it
        the current update, in one step. Any refusal changes nothing."""
        keystore = self._keystore
        if keystore is None:
            raise MoveError("this bridge runs without a keystore: it cannot take a member in")
        header, _, _ = peek_bundle(data)
        if header.tvd != self.tvd:
            raise MoveError(f"the bundle is of TVD {header.tvd!r}; this bridge serves {self.tvd!r}")
        if header.target != self.host:
            raise MoveError(f"the bundle is for host {header.target!r}; this is host {self.host!r}")
        link = Pair.of(self.host, header.source) if header.source != self.host else None
        if link is None or link not in keystore.transfer_keys.pairs:
            raise MoveError(f"this host has no transfer key with {header.source!r}")
        if any(m.id == header.id for m in keystore.moves_in):
            raise MoveError("this bundle was taken in already: a bundle is usable once")
        newer = [m.t for m in keystore.moves_in if m.vm == header.vm and m.t > header.t]
        if newer:
            raise MoveError(
                f"the bundle (period {header.t}) is older than the move of {header.vm} taken "
                f"in at period {max(newer)}"
            )
        if header.t != self._keys.period:
            raise MoveError(
                f"the bundle was made in period {header.t} and this host is in period "
                f"{self._keys.period}: a bundle opens only in its own period (check both "
                "hosts' clocks); make a new one"
            )
        if config is None and self.config.path is not None:
            config = await trio.to_thread.run_sync(load_config, self.config.path)
        elif config is None:
            config = self.config
        if header.vm not in config.ids or config.host_of(header.vm) != self.host:
            raise MoveError(
                f"the TVD file does not put {header.vm!r} on this host ({self.host}): set its "
                "`host` (and its `channel` here) first"
            )
        if config.tvd != self.tvd:
            raise config.error("tvd", f"is {config.tvd!r}, but this bridge serves {self.tvd!r}")
        config.check_schedule(self.schedule)
        others = [m for m in config.members if m.id != header.vm]
        if (
            others != [m for m in self.config.members if m.id != header.vm]
            or config.ids != self.config.ids
            or config.pairs != self.config.pairs
            or set(config.hosts) != set(self.config.hosts)
        ):
            raise MoveError(
                f"the TVD file changed more than {header.vm}'s entry: `tvdnet-bridge reload` "
                "the other changes first, then take the bundle in"
            )
        _check_transports(config, self._allow_dev, self.host)
        if header.t != self._keys.period:  # a period began while the file was read
            raise MoveError(f"period {self._keys.period} began meanwhile: make a new bundle")
        if any(m.id == header.id for m in keystore.moves_in):  # taken in meanwhile
            raise MoveError("this bundle was taken in already: a bundle is usable once")
        opened = open_bundle(data, keystore.transfer_keys.key_bytes(link), config.ids)
        count = len(opened.keys)
        try:
            held = set(self._keys.pairs)
            for pair, key in opened.keys.items():
                if pair in held and not hmac.compare_digest(self._keys.key_bytes(pair), key):
                    raise MoveError(
                        f"pair {{{pair.lo}, {pair.hi}}}: the bundle's key and this host's "
                        "disagree (provisioned apart?); nothing was changed"
                    )
            # From here on nothing awaits and nothing fails: one step.
            for pair, key in opened.keys.items():
                self._keys.adopt(pair, key)
            adopted = len(set(opened.keys) - held)
        finally:
            opened.erase()
        keystore.moves_in = [*keystore.moves_in, MoveIn(header.id, header.vm, header.t)][
            -MOVES_IN_KEPT:
        ]
        self.config = config
        self._members = self._member_lists()
        self._records()
        self._mark_keystore_dirty()
        member = config.member(header.vm)
        if member.id not in self._running:
            self._moved_in.setdefault(member.id, header.source)
            if not member.suspended:  # else a reload that resumes it serves it
                self._running[member.id] = running = _Running(self._new_worker(member))
                self._launch(running)
        if self.period is not None and member.id in self._running:
            # Served already (a second bundle, from another peer's host): the update it
            # gets now carries the pairs just taken in.
            self._push(self.period, only={member.id})
        self._mark_keystore_dirty()
        emit(
            logging.INFO, "move-in", vm=header.vm, source=header.source, t=header.t,
            pairs=count, adopted=adopted,
        )  # fmt: skip
        return MoveResult(header.vm, header.source, self.host, header.t, count, adopted)

    @_one_change_at_a_time
    async def reload(self, config: TvdConfig | None = None) -> ReloadResult:
        """Re-read the TVD file (or take `config`): remove members, move channels, re-address.

        Checks everything first; on any error (ConfigError, ReloadError, TransportRefused)
        nothing has changed.
        """
        if config is None:
            if self.config.path is None:
                raise ReloadError("this bridge was not started from a TVD file")
            config = await trio.to_thread.run_sync(load_config, self.config.path)
        if config.tvd != self.tvd:
            raise config.error("tvd", f"is {config.tvd!r}, but this bridge serves {self.tvd!r}")
        config.check_schedule(self.schedule)
        before = {member.id: member for member in self.config.members}
        added = [vm for vm in config.ids if vm not in before]
        if added:
            raise ReloadError(
                f"new member(s) {', '.join(added)}: a reload only removes, suspends and resumes "
                "members or changes their addresses, channels and hosts; a new member needs "
                "device keys and a computer-key file: run `tvdnet-bridge provision` (SPEC §6). "
                "A member that is to come back is suspended (`suspended = true`), not removed"
            )
        # Served here again after a suspension: its keys never left this host.
        resumed = tuple(
            m.id
            for m in config.served_on(self.host)
            if m.id not in self._running
            and m.id in before
            and before[m.id].suspended
            and before[m.id].host == self.host
        )
        arrived = [
            m.id
            for m in config.members_on(self.host)
            if m.id not in self._running
            and m.id not in resumed
            and (m.id not in before or before[m.id].host != self.host)
        ]
        if arrived:
            raise ReloadError(
                f"{', '.join(arrived)} is now on this host ({self.host}) in the TVD file, but "
                "its device keys are not here: take its bundle in with `tvdnet-bridge move-in`"
            )
        leaving = [
            vm
            for vm, member in before.items()
            if member.host == self.host and vm in config.ids and config.host_of(vm) != self.host
        ]
        suspending = tuple(
            vm for vm in self._running if vm in config.ids and config.member(vm).suspended
        )
        for vm in leaving:
            # Its keys go from here only once a bundle was made for its new host, or when
            # a move in is undone: back to the host it came from (SPEC §6).
            target = config.host_of(vm)
            if self._moved_out.get(vm) != target and self._moved_in.get(vm) != target:
                raise ReloadError(
                    f"{vm} is on host {target} in the TVD file, but no bundle of its keys was "
                    f"made for that host: run `tvdnet-bridge move-out {vm} --to {target}` "
                    "first (else that host could not serve it)"
                )
        _check_transports(config, self._allow_dev, self.host)
        self._check_pairs_held(config)
        # From here on nothing awaits: the change is applied as one step.
        # Removed from the TVD, whichever host served it: its pairs go everywhere.
        removed = tuple(vm for vm in before if vm not in config.ids)
        for vm in removed:
            running = self._running.pop(vm, None)
            if running is not None:
                running.scope.cancel()  # closes its connection
            dropped = self._drop_keys(vm)
            self._rollouts.forget(vm)
            self._moved_out.pop(vm, None)
            self._moved_in.pop(vm, None)
            emit(logging.WARNING, "member-removed", vm=vm, pairs=dropped, at="reload")
        for vm in leaving:
            running = self._running.pop(vm, None)
            if running is not None:
                running.scope.cancel()
            self._rollouts.forget(vm)
            self._moved_out.pop(vm, None)
            self._moved_in.pop(vm, None)
            emit(logging.WARNING, "member-moved-away", vm=vm, to=config.host_of(vm))
        for vm in suspending:
            if vm in self._running:  # not if it also moved away just now
                self._running.pop(vm).scope.cancel()  # closes its connection
                self._rollouts.forget(vm)
                emit(logging.WARNING, "member-suspended", vm=vm, at="reload")
        self._erase_pairs_not_needed(config, "reload")
        changes = tuple(
            (member.id, what, str(old), str(new))
            for member in config.members
            for what, old, new in (
                ("address", before[member.id].address, member.address),
                ("channel", before[member.id].channel, member.channel),
                ("host", before[member.id].host, member.host),
            )
            if old != new and (what != "channel" or member.host == self.host)
        )
        old_members, self.config = self._members, config
        self._members = self._member_lists()
        self._records()
        moved = []
        for member in config.served_on(self.host):
            if member.id in resumed:
                self._running[member.id] = back = _Running(self._new_worker(member))
                self._launch(back)
                emit(logging.WARNING, "member-resumed", vm=member.id, at="reload")
                continue
            running = self._running[member.id]
            if running.worker.spec != member.channel:
                running.scope.cancel()
                self._running[member.id] = replacement = _Running(self._new_worker(member))
                old, new = running.worker, replacement.worker
                if isinstance(old, ChannelWorker) and isinstance(new, ChannelWorker):
                    # The counters carry over; the new port starts with a hello anyway.
                    new.channel.acked, new.channel.resends = old.channel.acked, old.channel.resends
                self._launch(replacement)
                moved.append(member.id)
                emit(logging.INFO, "channel-moved", vm=member.id, port=member.channel)
        told = {
            vm
            for vm, members in self._members.items()
            if vm in self._running and old_members.get(vm) != members
        }
        if self.period is not None:
            # SPEC §5: `members`, followed at once by the current update.
            self._push(self.period, only=told, members=True)
            # A moved port's worker, or a resumed member's, is new: it needs the current
            # update for its first hello.
            self._push(self.period, only=(set(moved) | set(resumed)) - told)
        else:
            for vm in told:
                worker = self._running[vm].worker
                if isinstance(worker, ChannelWorker):
                    worker.channel.set_welcome(self._welcome(vm))
        self._mark_keystore_dirty()
        result = ReloadResult(
            removed,
            tuple(sorted(told)),
            tuple(moved),
            changes,
            tuple(leaving),
            tuple(vm for vm in suspending if vm not in leaving),
            resumed,
        )
        emit(
            logging.INFO,
            "reloaded",
            removed=",".join(removed) or None,
            suspended=",".join(result.suspended) or None,
            resumed=",".join(resumed) or None,
            told=len(told),
            moved=",".join(moved) or None,
        )
        return result


def _host_to_serve(config: TvdConfig, keystore: Keystore | None, host: str | None) -> str:
    if keystore is not None:
        if host is not None and host != keystore.host:
            raise KeystoreError(
                keystore.path, f"is the keystore of host {keystore.host!r}, not of {host!r}"
            )
        host = keystore.host
    elif host is None:
        if len(config.hosts) != 1:
            raise config.error("hosts", "the TVD has several hosts: name the one to serve")
        host = config.hosts[0]
    if host not in config.hosts:
        raise config.error(
            "hosts", f"{host!r} is not a host of this TVD (its hosts: {', '.join(config.hosts)})"
        )
    return host


@asynccontextmanager
async def open_bridge(
    config: TvdConfig,
    device_keys: DeviceKeys,
    *,
    keystore: Keystore | None = None,
    schedule: Schedule | None = None,
    clock: WallClock | None = None,
    allow_dev_transports: bool = False,
    iso_dir: Path = DEFAULT_ISO_DIR,
    host: str | None = None,
) -> AsyncIterator[Bridge]:
    """Run a bridge for the TVD of `config` with `device_keys` until the block exits.

    - `keystore`: the loaded keystore holding `device_keys`; it is rewritten at start and at
      every period. Without one, the keys evolve in memory only (tests, in-process nodes).
    - `schedule`: defaults to the keystore's, else the TVD file's (which then needs an epoch).
    - `clock`: a `WallClock`; give `WallClock(offset=...)` under `trio.testing.MockClock`.
    - `allow_dev_transports`: permit TCP and Unix sockets that others can reach (SPEC §5).
    - `host`: the host whose members this bridge serves; default the keystore's, else the
      TVD file's only host.

    The keys are evolved to the current period and the keystore rewritten before any
    channel is served (SPEC §1). On exit every connection is closed and the last state is
    on disk.
    """
    if keystore is not None and keystore.device_keys is not device_keys:
        raise ValueError("device_keys must be the keystore's own device_keys")
    if schedule is None:
        schedule = keystore.schedule if keystore is not None else config.schedule()
    if device_keys.tvd != config.tvd:
        raise config.error(
            "tvd", f"is {config.tvd!r}, but the device keys are of {device_keys.tvd!r}"
        )
    config.check_schedule(schedule)
    host = _host_to_serve(config, keystore, host)
    _check_transports(config, allow_dev_transports, host)
    bridge = Bridge(
        config,
        device_keys,
        schedule,
        keystore,
        clock or WallClock(),
        allow_dev_transports,
        iso_dir,
        host,
    )
    await bridge._start()
    try:
        async with trio.open_nursery() as nursery:
            bridge._nursery = nursery
            nursery.start_soon(bridge._watchdog.run, name="write-watchdog")
            for member in config.served_on(host):
                bridge._running[member.id] = _Running(bridge._new_worker(member))
            # The current update is handed to every worker before any port is opened.
            await nursery.start(bridge._run_periods, name="periods")
            for running in bridge._running.values():
                bridge._launch(running)
            if keystore is not None:
                nursery.start_soon(bridge._write_keystore, name="keystore")
            try:
                yield bridge
            finally:
                nursery.cancel_scope.cancel()
    finally:
        bridge._nursery = None
        await bridge._final_write()
        emit(logging.INFO, "stopped", tvd=bridge.tvd, keys_at=device_keys.period)

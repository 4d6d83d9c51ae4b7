"""The key-insulated symmetric scheme of Dodis, Luo, Xu and Yung (SPEC §1-§3).

The paper's algorithms map to this module as follows:

- G  (key generation):       `generate(tvd, members)` -> `Provisioning`
- U* (device key-update):     `evolve_device_key` (dev_t -> dev_{t+1}) and `device_update`
                              (dev_t -> partial key); `DeviceKeys` applies both for a bridge
- U  (computer key-update):   `computer_update` (partial + computer master key -> SK_t);
                              `PairKeys` applies it at a node: at most two keys per pair

E and D (encryption under SK_t) are the DATA frames of the peer protocol (SPEC §4).

Key bytes that live longer than a call are kept in `bytearray`s and overwritten when they
are replaced. CPython cannot promise more than that: the `bytes` that hmac and
cryptography return are freed, not zeroed.
"""

from __future__ import annotations

import enum
import functools
import hmac
import math
import secrets
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from itertools import combinations
from typing import Final, NamedTuple

from .constants import KEY_LEN, SKEW_ALLOWANCE
from .errors import InvalidId, InvalidKey, InvalidSchedule, NoSuchPeriod
from .ids import check_id, pair_context, sorted_pair, u64

__all__ = [
    "ComputerKeys",
    "DeviceKeys",
    "Pair",
    "PairKeys",
    "PeriodKey",
    "Provisioning",
    "Schedule",
    "UpdateResult",
    "computer_update",
    "device_update",
    "evolve_device_key",
    "generate",
]

_EVOLVE_LABEL: Final = b"tvdnet.v1.evolve"
_DEVICE_LABEL: Final = b"tvdnet.v1.device"
_COMPUTER_LABEL: Final = b"tvdnet.v1.computer"

KeyBytes = bytes | bytearray | memoryview


def _check_key(key: object, what: str) -> None:
    if not isinstance(key, bytes | bytearray | memoryview) or len(key) != KEY_LEN:
        size = len(key) if isinstance(key, bytes | bytearray | memoryview) else None
        got = f"{size} bytes" if size is not None else type(key).__name__
        raise InvalidKey(f"{what} must be exactly {KEY_LEN} bytes (got {got})")


def _check_period(t: object, what: str = "period") -> int:
    if type(t) is not int or t < 1 or t >= 1 << 64:
        raise NoSuchPeriod(f"{what} must be an integer from 1 to 2**64-1 (got {t!r})")
    return t


@functools.lru_cache(maxsize=1 << 16)
def _context(tvd: str, a: str, b: str) -> bytes:
    # Cached: a bridge evolves and derives every pair's key each period, and re-checking
    # the ids and re-encoding the context made that 1.4 times slower
    # (benchmarks/period_start.py). Ids and TVD names are public; no key passes here.
    check_id(tvd, "tvd")
    check_id(a, "member a")
    check_id(b, "member b")
    if a == b:
        raise InvalidId("a pair needs two different members (a == b)")
    return pair_context(tvd, a, b)


def _hmac(key: KeyBytes, message: bytes) -> bytes:
    return hmac.digest(key, message, "sha256")


def evolve_device_key(dev_t: KeyBytes, tvd: str, a: str, b: str, t: int) -> bytes:
    """U*, first half: dev_{t+1} = HMAC-SHA256(dev_t, "tvdnet.v1.evolve" || pc || u64(t+1))."""
    _check_key(dev_t, "the device key")
    _check_period(t)
    return _evolved(dev_t, _context(tvd, a, b), t)


def device_update(dev_t: KeyBytes, tvd: str, a: str, b: str, t: int) -> bytes:
    """U*: the partial key of period t, HMAC-SHA256(dev_t, "tvdnet.v1.device" || pc || u64(t))."""
    _check_key(dev_t, "the device key")
    _check_period(t)
    return _partial(dev_t, _context(tvd, a, b), t)


# Unchecked: DeviceKeys runs these for every pair at every period start, over keys and
# ids it checked when they came in (a 1,200-pair bridge, benchmarks/period_start.py).
def _evolved(dev_t: KeyBytes, context: bytes, t: int) -> bytes:
    return _hmac(dev_t, _EVOLVE_LABEL + context + u64(t + 1))


def _partial(dev_t: KeyBytes, context: bytes, t: int) -> bytes:
    return _hmac(dev_t, _DEVICE_LABEL + context + u64(t))


def computer_update(
    partial: KeyBytes, comp_key: KeyBytes, tvd: str, a: str, b: str, t: int
) -> bytes:
    """U: SK_t = partial XOR HMAC-SHA256(comp, "tvdnet.v1.computer" || pc || u64(t))."""
    _check_key(partial, "the partial key")
    _check_key(comp_key, "the computer master key")
    _check_period(t)
    mask = _hmac(comp_key, _COMPUTER_LABEL + _context(tvd, a, b) + u64(t))
    return (int.from_bytes(partial, "big") ^ int.from_bytes(mask, "big")).to_bytes(KEY_LEN, "big")


def _zero(buf: bytearray) -> None:
    buf[:] = bytes(len(buf))


# --------------------------------------------------------------------------- schedule


@dataclass(frozen=True, slots=True)
class Schedule:
    """Periods t = 1..N; period t covers [epoch + (t-1)*period_s, epoch + t*period_s) (SPEC §3)."""

    epoch: float
    period_s: float
    periods: int

    def __post_init__(self) -> None:
        for name in ("epoch", "period_s"):
            value = getattr(self, name)
            if type(value) not in (int, float) or not math.isfinite(value):
                raise InvalidSchedule(f"{name} must be a finite number (got {value!r})")
        if self.period_s <= 0:
            raise InvalidSchedule(f"period_s must be > 0 (got {self.period_s!r})")
        if type(self.periods) is not int or not 1 <= self.periods < 1 << 64:
            raise InvalidSchedule(f"periods must be an integer >= 1 (got {self.periods!r})")

    def period_at(self, now: float) -> int:
        """The period that contains `now`; NoSuchPeriod before the epoch or after period N."""
        if now < self.epoch:
            raise NoSuchPeriod(f"{now} is before the schedule's epoch {self.epoch}")
        t = math.floor((now - self.epoch) / self.period_s) + 1
        # Float division can land one period off right at a boundary: settle it with the
        # same arithmetic that start() and end() use, so the three always agree.
        if t > 1 and now < self.epoch + (t - 1) * self.period_s:
            t -= 1
        elif now >= self.epoch + t * self.period_s:
            t += 1
        if t > self.periods:
            raise NoSuchPeriod(f"{now} is after the last period {self.periods}", t)
        return t

    def start(self, t: int) -> float:
        self.check(t)
        return self.epoch + (t - 1) * self.period_s

    def end(self, t: int) -> float:
        self.check(t)
        return self.epoch + t * self.period_s

    def check(self, t: object) -> int:
        """Return t if it names a period of this schedule, else raise NoSuchPeriod."""
        if type(t) is not int or not 1 <= t <= self.periods:
            raise NoSuchPeriod(f"period {t!r} is outside 1..{self.periods}", None)
        return t


# --------------------------------------------------------------------------- G


class Pair(NamedTuple):
    """An unordered pair of different members, stored sorted bytewise."""

    lo: str
    hi: str

    @classmethod
    def of(cls, a: str, b: str) -> Pair:
        if a == b:
            raise InvalidId("a pair needs two different members (a == b)")
        lo, hi = sorted_pair(a, b)
        return cls(lo, hi)

    def other(self, member: str) -> str:
        if member == self.lo:
            return self.hi
        if member == self.hi:
            return self.lo
        raise InvalidId("the member is not part of this pair")


class DeviceKeys:
    """What a bridge holds (SPEC §1, §3): the current device key dev_t of each pair.

    It only moves forward: `evolve_to` overwrites every dev_t in place, so no earlier
    device key survives in this object.
    """

    __slots__ = ("_keys", "period", "tvd")

    def __init__(self, tvd: str, period: int, keys: Mapping[Pair, KeyBytes]) -> None:
        check_id(tvd, "tvd")
        self.tvd = tvd
        self.period = _check_period(period)
        self._keys: dict[Pair, bytearray] = {}
        for i, (pair, key) in enumerate(keys.items()):
            check_id(pair.lo, f"pair {i} member")
            check_id(pair.hi, f"pair {i} member")
            _check_key(key, f"the device key of pair {i}")
            self._keys[Pair.of(pair.lo, pair.hi)] = bytearray(key)

    def __repr__(self) -> str:
        return f"<DeviceKeys tvd={self.tvd!r} period={self.period} pairs={len(self._keys)}>"

    @property
    def pairs(self) -> list[Pair]:
        return list(self._keys)

    def members(self) -> set[str]:
        return {m for pair in self._keys for m in pair}

    def peers_of(self, vm: str) -> list[str]:
        return [pair.other(vm) for pair in self._keys if vm in pair]

    def evolve_to(self, t: int) -> None:
        """Evolve every dev to period t (U*, SPEC §3), overwriting the old keys."""
        _check_period(t)
        if t < self.period:
            raise NoSuchPeriod(
                f"device keys are at period {self.period} and cannot go back to {t}", t
            )
        tvd = self.tvd
        for pair, key in self._keys.items():
            context = _context(tvd, pair.lo, pair.hi)
            for period in range(self.period, t):
                key[:] = _evolved(key, context, period)
        self.period = t

    def partial(self, a: str, b: str) -> bytes:
        """The partial key of pair {a, b} for the current period (U*)."""
        return device_update(self._keys[Pair.of(a, b)], self.tvd, a, b, self.period)

    def partials_for(self, vm: str) -> dict[str, bytes]:
        """Every partial key of `vm`'s pairs for the current period, by peer id."""
        return {
            pair.other(vm): device_update(key, self.tvd, pair.lo, pair.hi, self.period)
            for pair, key in self._keys.items()
            if vm in pair
        }

    def all_partials(self) -> dict[str, dict[str, bytearray]]:
        """`partials_for` of every member at once, each pair's partial computed once.

        A bridge pushing every VM's update calls this: one pass over the pairs instead of
        one per member. Each member gets its own bytearray, so each can be zeroed alone.
        """
        out: defaultdict[str, dict[str, bytearray]] = defaultdict(dict)
        for pair, key in self._keys.items():
            partial = _partial(key, _context(self.tvd, pair.lo, pair.hi), self.period)
            out[pair.lo][pair.hi] = bytearray(partial)
            out[pair.hi][pair.lo] = bytearray(partial)
        return dict(out)

    def key_bytes(self, pair: Pair) -> bytearray:
        """The stored dev_t of `pair`, for the keystore writer only."""
        return self._keys[pair]

    def drop_member(self, vm: str) -> int:
        """Erase and forget every pair of `vm`; returns how many were dropped."""
        return self.drop_pairs([pair for pair in self._keys if vm in pair])

    def drop_pairs(self, pairs: Iterable[Pair]) -> int:
        """Erase and forget these pairs (a member that moved to another host); how many."""
        gone = [pair for pair in pairs if pair in self._keys]
        for pair in gone:
            _zero(self._keys.pop(pair))
        return len(gone)

    def adopt(self, pair: Pair, dev_t: KeyBytes) -> None:
        """Hold `pair`'s dev_t of the current period, copied (a member moving in from
        another host); the caller zeroes its own copy. A pair held already must agree."""
        _check_key(dev_t, "the device key")
        pair = Pair.of(pair.lo, pair.hi)
        check_id(pair.lo, "pair member")
        check_id(pair.hi, "pair member")
        held = self._keys.get(pair)
        if held is None:
            self._keys[pair] = bytearray(dev_t)
        elif not hmac.compare_digest(held, dev_t):
            raise InvalidKey(f"pair {{{pair.lo}, {pair.hi}}}: the device keys disagree")

    def erase(self) -> None:
        for key in self._keys.values():
            _zero(key)
        self._keys.clear()


class ComputerKeys:
    """What one VM holds (SPEC §1, §6): the computer master key of each of its pairs."""

    __slots__ = ("_keys", "tvd", "vm")

    def __init__(self, tvd: str, vm: str, keys: Mapping[str, KeyBytes]) -> None:
        self.tvd = check_id(tvd, "tvd")
        self.vm = check_id(vm, "vm")
        self._keys: dict[str, bytearray] = {}
        for peer, key in keys.items():
            check_id(peer, "peer id")
            if peer == vm:
                raise InvalidId("a VM holds no computer key for a pair with itself")
            _check_key(key, f"the computer master key for peer {peer!r}")
            self._keys[peer] = bytearray(key)

    def __repr__(self) -> str:
        return f"<ComputerKeys tvd={self.tvd!r} vm={self.vm!r} peers={len(self._keys)}>"

    @property
    def peers(self) -> list[str]:
        return list(self._keys)

    def __contains__(self, peer: object) -> bool:
        return peer in self._keys

    def get(self, peer: str) -> bytearray | None:
        return self._keys.get(peer)

    def erase(self) -> None:
        for key in self._keys.values():
            _zero(key)
        self._keys.clear()


class Provisioning:
    """The output of G: fresh device and computer master keys for every pair of a TVD.

    Split it with `for_bridge()` (device keys only) and `for_vm(vm)` (that VM's computer
    keys only), then `erase()` it.
    """

    __slots__ = ("_computer", "_device", "members", "tvd")

    def __init__(
        self,
        tvd: str,
        members: tuple[str, ...],
        device: dict[Pair, bytearray],
        computer: dict[Pair, bytearray],
    ) -> None:
        self.tvd = tvd
        self.members = members
        self._device = device
        self._computer = computer

    def __repr__(self) -> str:
        return (
            f"<Provisioning tvd={self.tvd!r} members={len(self.members)} pairs={len(self._device)}>"
        )

    @property
    def pairs(self) -> list[Pair]:
        return list(self._device)

    def for_bridge(self, period: int = 1) -> DeviceKeys:
        """The device keys dev_1, evolved to `period` (SPEC §3: store dev_t0)."""
        keys = DeviceKeys(self.tvd, 1, self._device)
        keys.evolve_to(period)
        return keys

    def for_vm(self, vm: str) -> ComputerKeys:
        if vm not in self.members:
            raise InvalidId(f"vm {vm!r} is not a member of TVD {self.tvd!r}")
        return ComputerKeys(
            self.tvd,
            vm,
            {pair.other(vm): key for pair, key in self._computer.items() if vm in pair},
        )

    def erase(self) -> None:
        for key in (*self._device.values(), *self._computer.values()):
            _zero(key)
        self._device.clear()
        self._computer.clear()


def generate(
    tvd: str, members: Iterable[str], *, pairs: Iterable[tuple[str, str]] | None = None
) -> Provisioning:
    """G: a random device master key dev_1 and computer master key for every pair.

    `pairs` limits the TVD to the listed pairs (a star around one hub, say); by default
    every two different members form a pair, as in SPEC §1.
    """
    check_id(tvd, "tvd")
    ids = tuple(members)
    seen: set[str] = set()
    for i, member in enumerate(ids):
        check_id(member, f"members[{i}]")
        if member in seen:
            raise InvalidId(f"members[{i}]: this id appears twice")
        seen.add(member)
    if len(ids) < 2:
        raise InvalidId(f"a TVD needs at least two members (got {len(ids)})")
    if pairs is None:
        chosen = [Pair.of(a, b) for a, b in combinations(ids, 2)]
    else:
        chosen = []
        for i, (a, b) in enumerate(pairs):
            for member in (a, b):
                if member not in seen:
                    raise InvalidId(f"pairs[{i}]: names a VM that is not a member")
            chosen.append(Pair.of(a, b))
        if len(set(chosen)) != len(chosen):
            raise InvalidId("pairs: a pair appears twice")
    device = {pair: bytearray(secrets.token_bytes(KEY_LEN)) for pair in chosen}
    computer = {pair: bytearray(secrets.token_bytes(KEY_LEN)) for pair in chosen}
    return Provisioning(tvd, ids, device, computer)


# --------------------------------------------------------------------------- U at a node


class UpdateResult(enum.Enum):
    """What a node did with one partial key (SPEC §5)."""

    APPLIED = "applied"
    EARLY = "early"  # its period starts later than now + allowance: not applied, not acked
    STALE = "stale"  # its period ended before now - allowance: acked and ignored
    OLD = "old"  # not newer than the period held: acked and ignored


class PeriodKey:
    """One period key SK_t a node holds for a pair, kept in a bytearray until erased."""

    __slots__ = ("key", "period")

    def __init__(self, period: int, key: bytearray) -> None:
        self.period = period
        self.key: bytearray | None = key

    def __repr__(self) -> str:
        return f"<PeriodKey period={self.period} {'held' if self.key is not None else 'erased'}>"

    @property
    def held(self) -> bool:
        return self.key is not None

    def erase(self) -> None:
        if self.key is not None:
            _zero(self.key)
            self.key = None


class PairKeys:
    """A node's key state for one pair: at most two period keys (SPEC §4 Key changes).

    `newest` is SK_P for P = `period`, the newest period ever derived (the number
    survives the key's erasure, so that the period rules go on refusing older frames);
    `older` is SK_{P-1} while the overlap lasts. Deriving SK_t erases every key older
    than t-1. The erasure deadlines are here (`deadline`, `expire`): SK_P at the end of
    period P plus the allowance, SK_{P-1} at the end of period P-1 plus min(allowance,
    period length). Whether a key is usable on a given connection, and erasing SK_{P-1}
    earlier once no connection accepts it, is the Session's business.
    """

    __slots__ = ("_allowance", "_context_ids", "_overlap", "_schedule", "newest", "older", "period")

    def __init__(
        self,
        tvd: str,
        me: str,
        peer: str,
        schedule: Schedule,
        allowance: float = SKEW_ALLOWANCE,
    ) -> None:
        _context(tvd, me, peer)
        self._context_ids = (tvd, me, peer)
        self._schedule = schedule
        self._allowance = allowance
        self._overlap = min(allowance, schedule.period_s)
        self.newest: PeriodKey | None = None
        self.older: PeriodKey | None = None
        self.period = 0

    def __repr__(self) -> str:
        held = [k.period for k in (self.older, self.newest) if k is not None and k.held]
        return f"<PairKeys peer={self._context_ids[2]!r} period={self.period} held={held}>"

    @property
    def has_key(self) -> bool:
        """Whether SK_P, the newest key, is held."""
        return self.newest is not None and self.newest.held

    def get(self, t: int) -> PeriodKey | None:
        """The held key of period t, if any."""
        for key in (self.newest, self.older):
            if key is not None and key.period == t and key.held:
                return key
        return None

    def open_key(self, t: int | None = None) -> bytearray:
        """SK_t (SK_P by default); LookupError when it is not held."""
        key = self.get(self.period if t is None else t)
        if key is None or key.key is None:
            raise LookupError(
                f"no period key held for period {t if t is not None else self.period}"
            )
        return key.key

    def lifetime(self, t: int) -> float:
        """When SK_t must be erased at the latest (SPEC §4 Erasure)."""
        if t == self.period:
            return self._schedule.end(t) + self._allowance
        return self._schedule.end(t) + self._overlap

    def classify(self, t: int, now: float) -> UpdateResult | None:
        """What `apply` would do with a partial of period t now; None means apply it."""
        if t <= self.period:
            return UpdateResult.OLD
        if self._schedule.start(t) - self._allowance > now:
            return UpdateResult.EARLY
        if self._schedule.end(t) + self._allowance <= now:
            return UpdateResult.STALE
        return None

    def apply(
        self, t: int, partial: bytearray, comp_key: KeyBytes, now: float
    ) -> tuple[UpdateResult, list[int]]:
        """U: derive SK_t from the partial; erase every key older than t-1 (SPEC §4).

        Returns what was done and the periods whose keys were erased; the partial is
        zeroed whatever happens.
        """
        try:
            self._schedule.check(t)
            verdict = self.classify(t, now)
            if verdict is not None:
                return verdict, []
            tvd, me, peer = self._context_ids
            period_key = bytearray(computer_update(partial, comp_key, tvd, me, peer, t))
            erased = []
            keep = self.newest if self.newest is not None and self.newest.period == t - 1 else None
            for key in (self.older, self.newest):
                if key is not None and key is not keep and key.held:
                    key.erase()
                    erased.append(key.period)
            self.older = keep if keep is not None and keep.held else None
            self.newest = PeriodKey(t, period_key)
            self.period = t
            return UpdateResult.APPLIED, erased + self.expire(now)
        finally:
            _zero(partial)

    def deadline(self) -> float:
        """When `expire` has something to erase next (inf: nothing held)."""
        return min(
            (
                self.lifetime(k.period)
                for k in (self.newest, self.older)
                if k is not None and k.held
            ),
            default=math.inf,
        )

    def expire(self, now: float) -> list[int]:
        """Erase the keys whose lifetime has ended; returns their periods."""
        erased = []
        for key in (self.older, self.newest):
            if key is not None and key.held and now >= self.lifetime(key.period):
                key.erase()
                erased.append(key.period)
        return erased

    def erase_older(self) -> int | None:
        """Erase SK_{P-1} now (no connection accepts it any more); returns its period."""
        older = self.older
        self.older = None
        if older is not None and older.held:
            older.erase()
            return older.period
        return None

    def erase(self) -> None:
        """Zero and drop both keys, keeping the period number (SPEC §4 Erasure)."""
        for key in (self.newest, self.older):
            if key is not None:
                key.erase()
        self.older = None

    def forget(self) -> None:
        """Erase the keys and the period number: a removed peer starts afresh (SPEC §5)."""
        self.erase()
        self.newest = None
        self.period = 0

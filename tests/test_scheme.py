"""G, U*, U, the schedule and the per-pair key state (SPEC §1-§4)."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tvdnet import InvalidId, InvalidKey, InvalidSchedule, NoSuchPeriod
from tvdnet.core.scheme import (
    ComputerKeys,
    DeviceKeys,
    KeyStatus,
    Pair,
    PeriodKey,
    Schedule,
    UpdateResult,
    computer_update,
    device_update,
    evolve_device_key,
    generate,
)

KEY = bytes(range(32))


# --------------------------------------------------------------------------- G


def test_generate_splits_device_keys_from_computer_keys() -> None:
    prov = generate("tvd", ["a", "b", "c"])
    assert sorted(prov.pairs) == [Pair("a", "b"), Pair("a", "c"), Pair("b", "c")]
    bridge = prov.for_bridge()
    vm_a = prov.for_vm("a")
    assert bridge.period == 1
    assert sorted(bridge.pairs) == sorted(prov.pairs)
    assert sorted(vm_a.peers) == ["b", "c"]
    assert "a" not in vm_a
    # Device and computer master keys are independent draws, so no key appears twice.
    device = {bytes(bridge.key_bytes(p)) for p in bridge.pairs}
    computer = {bytes(prov.for_vm(p.lo).get(p.hi) or b"") for p in prov.pairs}
    assert len(device | computer) == 6


def test_both_vms_of_a_pair_derive_the_same_period_key() -> None:
    prov = generate("tvd", ["a", "b"])
    bridge = prov.for_bridge(period=5)
    partial = bridge.partial("a", "b")
    sk_a = computer_update(partial, prov.for_vm("a").get("b") or b"", "tvd", "a", "b", 5)
    sk_b = computer_update(partial, prov.for_vm("b").get("a") or b"", "tvd", "b", "a", 5)
    assert sk_a == sk_b
    assert sk_a != partial


def test_the_bridge_alone_cannot_derive_the_period_key() -> None:
    prov = generate("tvd", ["a", "b"])
    bridge = prov.for_bridge()
    partial = bridge.partial("a", "b")
    sk = computer_update(partial, prov.for_vm("a").get("b") or b"", "tvd", "a", "b", 1)
    # What the bridge holds (dev_t, the partial) is not SK_t, and neither is their mix.
    assert sk not in {partial, bytes(bridge.key_bytes(Pair("a", "b")))}


def test_generate_with_a_star_of_pairs() -> None:
    prov = generate("tvd", ["hub", "p1", "p2"], pairs=[("hub", "p1"), ("p2", "hub")])
    assert sorted(prov.pairs) == [Pair("hub", "p1"), Pair("hub", "p2")]
    assert prov.for_vm("p1").peers == ["hub"]


@pytest.mark.parametrize(
    ("members", "message"),
    [
        (["a"], "at least two members"),
        (["a", "a"], "members[1]: this id appears twice"),
        (["a", "b c"], "members[1]: an id must be 1 to 64 characters"),
        (["a", "x" * 65], "members[1]: an id must be 1 to 64 characters"),
        (["a", ""], "members[1]"),
        (["a", 7], "members[1]: an id must be a string, not int"),
        (["a", "é"], "members[1]"),
    ],
)
def test_generate_names_the_position_of_a_bad_id(members: list[object], message: str) -> None:
    with pytest.raises(InvalidId, match=message.replace("[", r"\[").replace("]", r"\]")):
        generate("tvd", members)  # type: ignore[arg-type]


def test_a_bad_id_error_does_not_echo_the_value() -> None:
    secret_looking = "k" * 80
    with pytest.raises(InvalidId) as caught:
        generate("tvd", ["a", secret_looking])
    assert secret_looking not in str(caught.value)


def test_reprs_hold_no_key_material() -> None:
    prov = generate("tvd", ["a", "b"])
    bridge = prov.for_bridge()
    vm = prov.for_vm("a")
    texts = [repr(prov), repr(bridge), repr(vm)]
    for key in [bridge.key_bytes(Pair("a", "b")), vm.get("b") or b""]:
        for text in texts:
            assert bytes(key).hex() not in text
            assert repr(bytes(key)) not in text


# --------------------------------------------------------------------------- U*, U


@pytest.mark.parametrize("fn", [evolve_device_key, device_update])
def test_device_functions_refuse_bad_inputs(
    fn: Callable[[bytes, str, str, str, int], bytes],
) -> None:
    call = fn
    with pytest.raises(InvalidKey, match="exactly 32 bytes"):
        call(b"short", "tvd", "a", "b", 1)
    with pytest.raises(NoSuchPeriod):
        call(KEY, "tvd", "a", "b", 0)
    with pytest.raises(InvalidId, match="two different members"):
        call(KEY, "tvd", "a", "a", 1)
    with pytest.raises(InvalidId, match="member b"):
        call(KEY, "tvd", "a", "b/c", 1)


def test_computer_update_refuses_a_short_partial_without_echoing_it() -> None:
    with pytest.raises(InvalidKey) as caught:
        computer_update(KEY[:31], KEY, "tvd", "a", "b", 1)
    assert KEY[:31].hex() not in str(caught.value)


def test_device_keys_evolve_forward_only_and_overwrite_in_place() -> None:
    keys = DeviceKeys("tvd", 1, {Pair("a", "b"): KEY})
    buffer = keys.key_bytes(Pair("a", "b"))
    keys.evolve_to(3)
    assert bytes(buffer) == evolve_device_key(
        evolve_device_key(KEY, "tvd", "a", "b", 1), "tvd", "a", "b", 2
    )
    assert keys.key_bytes(Pair("a", "b")) is buffer  # the old value was overwritten, not copied
    with pytest.raises(NoSuchPeriod, match="cannot go back"):
        keys.evolve_to(2)


def test_device_keys_drop_a_member() -> None:
    keys = DeviceKeys("tvd", 1, {Pair("a", "b"): KEY, Pair("a", "c"): KEY, Pair("b", "c"): KEY})
    buffer = keys.key_bytes(Pair("a", "c"))
    assert keys.drop_member("c") == 2
    assert keys.pairs == [Pair("a", "b")]
    assert buffer == bytearray(32)


def test_computer_keys_refuse_a_pair_with_itself() -> None:
    with pytest.raises(InvalidId):
        ComputerKeys("tvd", "a", {"a": KEY})


# --------------------------------------------------------------------------- schedule


def test_schedule_periods() -> None:
    s = Schedule(epoch=100.0, period_s=10.0, periods=3)
    assert s.period_at(100.0) == 1
    assert s.period_at(109.999) == 1
    assert s.period_at(110.0) == 2
    assert s.period_at(129.9) == 3
    assert (s.start(2), s.end(2)) == (110.0, 120.0)
    with pytest.raises(NoSuchPeriod):
        s.period_at(99.9)
    with pytest.raises(NoSuchPeriod):
        s.period_at(130.0)
    for t in (0, 4, -1, True, 1.0):
        with pytest.raises(NoSuchPeriod):
            s.start(t)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("epoch", "period_s", "periods"),
    [(0.0, 0.0, 1), (0.0, -1.0, 1), (math.nan, 1.0, 1), (0.0, math.inf, 1), (0.0, 1.0, 0),
     (0.0, 1.0, True), ("0", 1.0, 1)],
)  # fmt: skip
def test_schedule_refuses_nonsense(epoch: object, period_s: object, periods: object) -> None:
    with pytest.raises(InvalidSchedule):
        Schedule(epoch, period_s, periods)  # type: ignore[arg-type]


@given(
    epoch=st.floats(-1e9, 1e9),
    period_s=st.floats(1e-3, 1e6),
    offset=st.floats(0, 1e9),
)
def test_period_at_agrees_with_start_and_end(epoch: float, period_s: float, offset: float) -> None:
    s = Schedule(epoch, period_s, 1 << 40)
    now = epoch + offset
    try:
        t = s.period_at(now)
    except NoSuchPeriod:
        return
    assert s.start(t) <= now < s.end(t)


# --------------------------------------------------------------------------- PeriodKey

S = Schedule(epoch=0.0, period_s=10.0, periods=100)


def partial_for(t: int) -> bytearray:
    return bytearray(device_update(KEY, "tvd", "a", "b", t))


def test_period_key_applies_only_newer_periods_and_zeroes_what_it_replaces() -> None:
    state = PeriodKey("tvd", "a", "b", S)
    partial = partial_for(2)
    assert state.apply(2, partial, KEY, now=15.0) is UpdateResult.APPLIED
    assert partial == bytearray(32)  # the partial is erased
    old = state.open_key()
    assert bytes(old) == computer_update(partial_for(2), KEY, "tvd", "a", "b", 2)
    assert state.apply(2, partial_for(2), KEY, now=15.0) is UpdateResult.OLD
    assert state.apply(1, partial_for(1), KEY, now=15.0) is UpdateResult.OLD
    assert state.apply(3, partial_for(3), KEY, now=25.0) is UpdateResult.APPLIED
    assert old == bytearray(32)  # SK_{t-1} was overwritten with zeros
    assert state.period == 3


def test_period_key_early_and_stale_updates_are_not_applied() -> None:
    state = PeriodKey("tvd", "a", "b", S)
    partial = partial_for(5)
    assert state.apply(5, partial, KEY, now=37.9) is UpdateResult.EARLY  # starts at 40 > 37.9 + 2
    assert partial == bytearray(32)
    assert state.apply(5, partial_for(5), KEY, now=38.0) is UpdateResult.APPLIED  # within allowance
    assert state.apply(6, partial_for(6), KEY, now=62.0) is UpdateResult.STALE  # ended at 60 + 2
    assert state.period == 5


def test_period_key_status_follows_the_spec_rules() -> None:
    state = PeriodKey("tvd", "a", "b", S)
    assert state.status(1, 5.0) is KeyStatus.UNKNOWN  # no key at all
    state.apply(3, partial_for(3), KEY, now=25.0)
    assert state.status(3, 25.0) is KeyStatus.USABLE
    assert state.status(2, 25.0) is KeyStatus.EXPIRED  # older than the newest
    assert state.status(4, 25.0) is KeyStatus.UNKNOWN  # newer than the newest
    assert state.status(3, 31.9) is KeyStatus.USABLE  # within the allowance after the end
    assert state.status(3, 32.0) is KeyStatus.EXPIRED  # past end + allowance
    assert state.seal_key(31.9) is not None
    assert state.seal_key(32.0) is None


def test_period_key_expires_and_keeps_only_the_number() -> None:
    state = PeriodKey("tvd", "a", "b", S)
    state.apply(3, partial_for(3), KEY, now=25.0)
    key = state.open_key()
    assert state.deadline() == 32.0
    assert not state.expire(31.0)
    assert state.expire(32.0)
    assert key == bytearray(32)
    assert not state.has_key
    assert state.period == 3
    assert state.status(3, 32.5) is KeyStatus.EXPIRED
    assert state.status(4, 32.5) is KeyStatus.UNKNOWN
    generation = state.generation
    state.forget()
    assert state.period == 0 and state.generation > generation
    assert state.status(3, 32.5) is KeyStatus.UNKNOWN


def test_period_key_repr_holds_no_key() -> None:
    state = PeriodKey("tvd", "a", "b", S)
    state.apply(3, partial_for(3), KEY, now=25.0)
    assert state.open_key().hex() not in repr(state)

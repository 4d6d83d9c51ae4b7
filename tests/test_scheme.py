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
    Pair,
    PairKeys,
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


# --------------------------------------------------------------------------- PairKeys

S = Schedule(epoch=0.0, period_s=10.0, periods=100)


def partial_for(t: int) -> bytearray:
    return bytearray(device_update(KEY, "tvd", "a", "b", t))


def sk(t: int) -> bytes:
    return computer_update(partial_for(t), KEY, "tvd", "a", "b", t)


def test_pair_keys_apply_only_newer_periods_and_keep_the_previous_one() -> None:
    state = PairKeys("tvd", "a", "b", S)
    partial = partial_for(2)
    assert state.apply(2, partial, KEY, now=15.0) == (UpdateResult.APPLIED, [])
    assert partial == bytearray(32)  # the partial is erased
    two = state.open_key()
    assert bytes(two) == sk(2)
    assert state.apply(2, partial_for(2), KEY, now=15.0)[0] is UpdateResult.OLD
    assert state.apply(1, partial_for(1), KEY, now=15.0)[0] is UpdateResult.OLD
    # SK_3 early (within the allowance before period 3): SK_2 stays, for the overlap.
    assert state.apply(3, partial_for(3), KEY, now=19.0) == (UpdateResult.APPLIED, [])
    assert state.period == 3 and state.open_key(2) is two and bytes(two) == sk(2)
    # SK_5 (periods skipped): every key older than 4 goes, SK_3 and SK_2 zeroed.
    three = state.open_key(3)
    result, erased = state.apply(5, partial_for(5), KEY, now=41.0)
    assert (result, sorted(erased)) == (UpdateResult.APPLIED, [2, 3])
    assert two == bytearray(32) and three == bytearray(32)
    assert state.get(3) is None and state.get(2) is None and state.older is None


def test_pair_keys_early_and_stale_updates_are_not_applied() -> None:
    state = PairKeys("tvd", "a", "b", S)
    partial = partial_for(5)
    assert state.apply(5, partial, KEY, now=37.9)[0] is UpdateResult.EARLY  # 40 > 37.9 + 2
    assert partial == bytearray(32)
    assert state.apply(5, partial_for(5), KEY, now=38.0)[0] is UpdateResult.APPLIED
    assert state.apply(6, partial_for(6), KEY, now=62.0)[0] is UpdateResult.STALE  # 60 + 2
    assert state.period == 5


def test_the_older_key_lives_at_most_min_allowance_period_past_its_period() -> None:
    """SPEC §1, §4: SK_{t-1} is erased at the latest min(allowance, period) after period
    t-1 ends; the newest at the end of its period plus the allowance."""
    state = PairKeys("tvd", "a", "b", S, allowance=2.0)
    state.apply(3, partial_for(3), KEY, now=25.0)
    state.apply(4, partial_for(4), KEY, now=29.0)
    older = state.open_key(3)
    assert state.lifetime(3) == 32.0 and state.lifetime(4) == 42.0
    assert state.deadline() == 32.0
    assert state.expire(31.9) == []
    assert state.expire(32.0) == [3] and older == bytearray(32)
    assert state.deadline() == 42.0
    short = PairKeys("tvd", "a", "b", Schedule(0.0, 1.0, 100), allowance=2.0)
    short.apply(3, bytearray(device_update(KEY, "tvd", "a", "b", 3)), KEY, now=2.5)
    short.apply(4, bytearray(device_update(KEY, "tvd", "a", "b", 4)), KEY, now=3.1)
    assert short.lifetime(3) == 4.0  # the period (1 s) bounds the overlap, not the allowance


def test_pair_keys_expire_and_keep_only_the_number() -> None:
    state = PairKeys("tvd", "a", "b", S)
    state.apply(3, partial_for(3), KEY, now=25.0)
    key = state.open_key()
    assert state.deadline() == 32.0
    assert state.expire(31.0) == []
    assert state.expire(32.0) == [3]
    assert key == bytearray(32)
    assert not state.has_key and state.deadline() == math.inf
    assert state.period == 3
    with pytest.raises(LookupError):
        state.open_key()
    state.forget()
    assert state.period == 0


def test_erase_older_zeroes_the_previous_key_only() -> None:
    state = PairKeys("tvd", "a", "b", S)
    state.apply(3, partial_for(3), KEY, now=25.0)
    state.apply(4, partial_for(4), KEY, now=30.5)
    older, newest = state.open_key(3), state.open_key(4)
    assert state.erase_older() == 3
    assert older == bytearray(32) and bytes(newest) == sk(4)
    assert state.erase_older() is None


def test_pair_keys_repr_holds_no_key() -> None:
    state = PairKeys("tvd", "a", "b", S)
    state.apply(3, partial_for(3), KEY, now=25.0)
    assert state.open_key().hex() not in repr(state)
    assert "[3]" in repr(state)

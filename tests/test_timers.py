"""Named deadlines (`tvdnet.core.timers.Timers`) against a plain dict of the same deadlines."""

from __future__ import annotations

import math
from typing import cast

from hypothesis import given
from hypothesis import strategies as st

from tvdnet.core.timers import Timers

KEYS = st.sampled_from(["key", "conn", "resend", "dial"])
TIMES = st.integers(0, 40).map(float)
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("set"), KEYS, TIMES),
        st.tuples(st.just("set_earliest"), KEYS, TIMES),
        st.tuples(st.just("cancel"), KEYS, st.just(0.0)),
        st.tuples(st.just("pop_due"), st.just(""), TIMES),
    ),
    max_size=60,
)


@given(OPS)
def test_timers_behave_like_a_dict_of_deadlines(ops: list[tuple[str, str, float]]) -> None:
    timers, model = Timers(), dict[str, float]()
    for op, key, when in ops:
        if op == "set":
            timers.set(key, when)
            model[key] = when
        elif op == "set_earliest":
            timers.set_earliest(key, when)
            model[key] = min(model.get(key, math.inf), when)
        elif op == "cancel":
            timers.cancel(key)
            model.pop(key, None)
        else:
            due = cast("list[str]", timers.pop_due(when))  # the keys set above: all str
            expected = {k for k, w in model.items() if w <= when}
            assert sorted(due) == sorted(expected)  # each due key once, nothing else
            assert [model[k] for k in due] == sorted(model[k] for k in due)  # earliest first
            for k in due:
                del model[k]
        # The next deadline is a real one, never the stale time of a deadline that moved
        # later or was cancelled: a driver sleeping until then has work to do.
        assert timers.next() == min(model.values(), default=math.inf)
        assert len(timers) == len(model)
        assert all(timers.get(k) == w for k, w in model.items())


def test_a_deadline_moved_later_is_not_named_at_its_old_time() -> None:
    timers = Timers()
    timers.set("key", 10.0)
    timers.set("conn", 12.0)
    timers.set("key", 20.0)  # a new period key: the old deadline no longer matters
    assert timers.next() == 12.0
    assert timers.pop_due(12.0) == ["conn"]
    assert timers.next() == 20.0
    assert timers.pop_due(19.9) == []
    assert timers.pop_due(20.0) == ["key"]
    assert timers.next() == math.inf

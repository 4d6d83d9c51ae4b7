"""What `tvdnet node` prints for every message (issue 18): any msgpack value a member may
send, without loss, and an error line (never an exit) for a body it cannot print."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st
from nodes import Harness

from tvdnet._cli import _run_node
from tvdnet.core.jsonform import MAX_DEPTH, from_json, to_json

keys = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.text(max_size=8),
    st.binary(max_size=8), st.floats(allow_nan=False),
)  # fmt: skip
scalars = st.one_of(
    keys,
    st.floats(allow_nan=True, allow_infinity=True),
    st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8)),
    st.builds(msgpack.Timestamp, st.integers(0, 2**33), st.integers(0, 999_999_999)),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=20,
)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


@given(values)
def test_every_msgpack_value_survives_the_json_form(value: Any) -> None:
    # As a member's body arrives: packed by the sender, unpacked as the session does.
    body = msgpack.unpackb(msgpack.packb(value), raw=False, strict_map_key=False)
    text = json.dumps(to_json(body), allow_nan=False)
    assert _same(from_json(json.loads(text)), body)


def test_keys_that_look_like_the_forms_are_kept_apart() -> None:
    tricky = {"$bytes": "aGk="}  # a member's own map, not bytes
    assert to_json(tricky) == {"$map": [["$bytes", "aGk="]]}
    assert from_json(to_json(tricky)) == tricky
    assert to_json({b"k": 1}) == {"$map": [[{"$bytes": "aw=="}, 1]]}


def test_a_body_nested_too_deep_is_an_error_not_a_crash() -> None:
    body: list[Any] = []
    for _ in range(MAX_DEPTH + 5):
        body = [body]
    with pytest.raises(ValueError, match=f"nested deeper than {MAX_DEPTH} levels"):
        to_json(body)


async def test_the_node_command_prints_any_legal_body_and_goes_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], clock: trio.testing.MockClock
) -> None:
    """A bytes map key and a body ~1,000 deep killed `tvdnet node` after it had
    acknowledged them (json.dumps): now one line each, and the next message too."""
    deep: list[Any] = []
    for _ in range(1000):
        deep = [deep]
    h = Harness(tmp_path, ["vm-a", "vm-b"], external=("vm-b",))
    async with h.running(), trio.open_nursery() as nursery:
        nursery.start_soon(_run_node, h.external_config("vm-b"), h.clock)
        a = h.nodes["vm-a"]
        for body in ({b"k": 1}, deep, {"after": [1.5, float("nan")]}):
            await a.send("vm-b", body)
        for _ in range(100):  # the CLI prints after the ACK: give it its turn
            await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["event"] for line in lines] == ["received", "received-unprintable", "received"]
    assert from_json(lines[0]["body"]) == {b"k": 1}
    assert lines[1]["error"] == f"the body cannot be printed: nested deeper than {MAX_DEPTH} levels"
    assert lines[1]["from"] == "vm-a" and "body" not in lines[1]
    after = from_json(lines[2]["body"])
    assert after["after"][0] == 1.5 and math.isnan(after["after"][1])


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)

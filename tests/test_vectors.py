"""Every test vector of spec/vectors.json (SPEC §3, §4), byte for byte."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from helpers import SHARED_SPEC, VECTORS_PATH, events, load_vectors
from tvdnet import Message, Session
from tvdnet.core import frames
from tvdnet.core.scheme import (
    ComputerKeys,
    Schedule,
    computer_update,
    device_update,
    evolve_device_key,
)

VECTORS = load_vectors()


def test_the_copy_matches_the_shared_spec() -> None:
    shared = SHARED_SPEC / "vectors.json"
    if not shared.exists():
        pytest.skip("no ../shared/spec beside this checkout")
    assert VECTORS_PATH.read_bytes() == shared.read_bytes()
    assert (VECTORS_PATH.parent / "SPEC.md").read_bytes() == (SHARED_SPEC / "SPEC.md").read_bytes()


@pytest.mark.parametrize("v", VECTORS["evolution"], ids=lambda v: v["tvd"])
def test_evolution(v: dict[str, Any]) -> None:
    dev = bytes.fromhex(v["dev_1"])
    for t in range(1, 1000):
        dev = evolve_device_key(dev, v["tvd"], v["a"], v["b"], t)
        if f"dev_{t + 1}" in v:
            assert dev.hex() == v[f"dev_{t + 1}"], t + 1
    assert dev.hex() == v["dev_1000"]


def test_evolution_does_not_depend_on_the_order_of_the_pair() -> None:
    v = VECTORS["evolution"][0]
    dev_1 = bytes.fromhex(v["dev_1"])
    assert evolve_device_key(dev_1, v["tvd"], v["b"], v["a"], 1).hex() == v["dev_2"]


@pytest.mark.parametrize(
    "v", VECTORS["key_schedule"], ids=lambda v: f"{v['tvd']}-{v['a']}-{v['b']}-{v['t']}"
)
def test_key_schedule(v: dict[str, Any]) -> None:
    dev_t = bytes.fromhex(v["dev_t"])
    comp = bytes.fromhex(v["comp_key"])
    partial = device_update(dev_t, v["tvd"], v["a"], v["b"], v["t"])
    assert partial.hex() == v["partial"]
    period_key = computer_update(partial, comp, v["tvd"], v["a"], v["b"], v["t"])
    assert period_key.hex() == v["period_key"]


def _session_for(v: dict[str, Any], me: str, peer: str, role: str) -> Session:
    t = v["t"]
    schedule = Schedule(epoch=0.0, period_s=1.0, periods=t + 10)
    nonce = bytes.fromhex(v[f"nonce_{role}"])
    keys = ComputerKeys(v["tvd"], me, {peer: bytes.fromhex(v["comp_key"])})
    return Session(
        keys,
        schedule,
        instance=bytes.fromhex(v[f"instance_{role}"]),
        randbytes=lambda size: nonce[:size],
    )


@pytest.mark.parametrize("v", VECTORS["sessions"], ids=lambda v: v["tvd"])
def test_session(v: dict[str, Any]) -> None:
    tvd, ini, res, t = v["tvd"], v["initiator"], v["responder"], v["t"]
    now = t - 0.5  # inside period t of the 1-second schedule

    # The period key: dev_1 evolved to dev_t, then U* and U.
    dev = bytes.fromhex(v["dev_1"])
    for period in range(1, t):
        dev = evolve_device_key(dev, tvd, ini, res, period)
    assert dev.hex() == v["dev_t"]
    partial = device_update(dev, tvd, ini, res, t)
    assert (
        computer_update(partial, bytes.fromhex(v["comp_key"]), tvd, ini, res, t).hex()
        == (v["period_key"])
    )

    # Both HELLOs, from the Session class itself.
    initiator = _session_for(v, ini, res, "initiator")
    responder = _session_for(v, res, ini, "responder")
    conn_i = initiator.connect(res, now)
    assert initiator.data_to_send(conn_i, now).hex() == v["hello_initiator"]
    conn_r = responder.accept(now)
    responder.receive_data(conn_r, bytes.fromhex(v["hello_initiator"]), now)
    assert responder.data_to_send(conn_r, now).hex() == v["hello_responder"]
    initiator.receive_data(conn_i, bytes.fromhex(v["hello_responder"]), now)

    # U at both nodes, from the partial a bridge would send.
    for session, peer in ((initiator, res), (responder, ini)):
        applied, missing = session.apply_update(t, {peer: bytearray(partial)}, now)
        assert (applied, missing) == (1, [])
        assert session.key_state(peer).open_key().hex() == v["period_key"]

    # Both traffic keys; the sender's nonce and instance come first.
    period_key = bytes.fromhex(v["period_key"])
    nonce_i, nonce_r = bytes.fromhex(v["nonce_initiator"]), bytes.fromhex(v["nonce_responder"])
    inst_i, inst_r = bytes.fromhex(v["instance_initiator"]), bytes.fromhex(v["instance_responder"])
    key_i2r = frames.traffic_key(period_key, tvd, ini, res, t, nonce_i, nonce_r, inst_i, inst_r)
    key_r2i = frames.traffic_key(period_key, tvd, res, ini, t, nonce_r, nonce_i, inst_r, inst_i)
    assert key_i2r.hex() == v["key_initiator_to_responder"]
    assert key_r2i.hex() == v["key_responder_to_initiator"]

    # Both DATA frames, sealed by the function the Session seals with.
    for direction, key in (
        ("data_initiator_to_responder", key_i2r),
        ("data_responder_to_initiator", key_r2i),
    ):
        d = v[direction]
        plaintext = msgpack.packb(d["inner"])
        frame = frames.seal_data(frames.new_aead(key), t, d["n"], plaintext)
        assert frame.hex() == d["frame"]
        opened = frames.open_data(frames.new_aead(key), t, d["n"], frame[-len(plaintext) - 16 :])
        assert msgpack.unpackb(opened, raw=False) == d["inner"]

    # Frames numbered 0 are what a fresh connection reads next: the Session opens them.
    if v["data_initiator_to_responder"]["n"] == 0:
        responder.receive_data(
            conn_r, bytes.fromhex(v["data_initiator_to_responder"]["frame"]), now
        )
        received = [e for e in events(responder) if isinstance(e, Message)]
        assert received == [Message(ini, t, {"text": f"hello, {res}", "n": 1})]
        initiator.receive_data(
            conn_i, bytes.fromhex(v["data_responder_to_initiator"]["frame"]), now
        )
        received = [e for e in events(initiator) if isinstance(e, Message)]
        assert received == [Message(res, t, f"hi {ini}")]

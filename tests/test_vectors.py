"""Every test vector of spec/vectors.json (SPEC §3, §4), byte for byte."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from helpers import SHARED_SPEC, VECTORS_PATH, connection, events, frames_in, load_vectors
from tvdnet import ConnectionState, Message, Session
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
    ours = (VECTORS_PATH.parent / "SPEC.md").read_text()
    rules = project_rules(ours)
    # The project adds host and file rules in §1 and §6 only, each a bullet of its own.
    assert rules and all(section in ("1", "6") for section, _ in rules), rules
    assert without_project_rules(ours) == (SHARED_SPEC / "SPEC.md").read_text()


PROJECT_RULE = "(a project rule"


def _split_rules(text: str) -> tuple[str, list[tuple[str, str]]]:
    """The text without the bullets marked as project rules, and (section, bullet) of each."""
    kept: list[str] = []
    rules: list[tuple[str, str]] = []
    section = ""
    lines = text.splitlines(keepends=True)
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section = line[3:].split(".", 1)[0]
        if line.startswith("- ") and PROJECT_RULE in line:
            bullet = [line]
            i += 1
            while i < len(lines) and lines[i].startswith("  "):
                bullet.append(lines[i])
                i += 1
            rules.append((section, "".join(bullet)))
            continue
        kept.append(line)
        i += 1
    return "".join(kept), rules


def without_project_rules(text: str) -> str:
    return _split_rules(text)[0]


def project_rules(text: str) -> list[tuple[str, str]]:
    return _split_rules(text)[1]


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


def _connected(v: dict[str, Any]) -> tuple[Session, Session, int, int, float]:
    """The vector's two Sessions, HELLOs exchanged and period t's key applied at both."""
    tvd, ini, res, t = v["tvd"], v["initiator"], v["responder"], v["t"]
    now = t - 0.5
    initiator = _session_for(v, ini, res, "initiator")
    responder = _session_for(v, res, ini, "responder")
    conn_i = initiator.connect(res, now)
    conn_r = responder.accept(now)
    responder.receive_data(conn_r, initiator.data_to_send(conn_i, now), now)
    initiator.receive_data(conn_i, responder.data_to_send(conn_r, now), now)
    dev = bytes.fromhex(v["dev_t"])
    for session, peer in ((initiator, res), (responder, ini)):
        partial = bytearray(device_update(dev, tvd, ini, res, t))
        session.apply_update(t, {peer: partial}, now)
    return initiator, responder, conn_i, conn_r, now


@pytest.mark.parametrize("v", VECTORS["sessions"], ids=lambda v: v["tvd"])
def test_the_session_receives_each_vector_frame(v: dict[str, Any]) -> None:
    """Each vector DATA frame, fed to the receiving Session at its counter, is opened and
    its message delivered (a connection that has carried n frames already reads frame n)."""
    ini, res, t = v["initiator"], v["responder"], v["t"]
    initiator, responder, conn_i, conn_r, now = _connected(v)
    for receiver, conn, direction, sender in (
        (responder, conn_r, "data_initiator_to_responder", ini),
        (initiator, conn_i, "data_responder_to_initiator", res),
    ):
        d = v[direction]
        events(receiver)
        connection(receiver, conn).recv_n = d["n"]  # the frames before it were read
        receiver.receive_data(conn, bytes.fromhex(d["frame"]), now)
        bodies = [body for kind, _seq, body in d["inner"] if kind == frames.MSG]
        got = [e for e in events(receiver) if isinstance(e, Message)]
        assert got == [Message(sender, t, body) for body in bodies]
        assert receiver.connection_state(conn) is ConnectionState.OPEN


@pytest.mark.parametrize("v", VECTORS["sessions"], ids=lambda v: v["tvd"])
def test_the_session_seals_under_the_vector_traffic_keys(v: dict[str, Any]) -> None:
    """The DATA frames a Session produces open under the vector's traffic key of their
    direction, with the nonce and associated data of SPEC §4, and carry its message."""
    ini, res, t = v["initiator"], v["responder"], v["t"]
    initiator, responder, conn_i, conn_r, now = _connected(v)
    opened: dict[str, list[Any]] = {
        "key_initiator_to_responder": [],
        "key_responder_to_initiator": [],
    }
    initiator.send(res, {"text": f"hello, {res}", "n": 1}, now)
    responder.send(ini, f"hi {ini}", now)
    for _ in range(4):  # both sides speak until the messages went out
        for sender, conn, receiver, other, direction in (
            (initiator, conn_i, responder, conn_r, "key_initiator_to_responder"),
            (responder, conn_r, initiator, conn_i, "key_responder_to_initiator"),
        ):
            data = sender.data_to_send(conn, now)
            for frame in frames_in([data]):
                if frame[0] != frames.DATA:
                    continue
                _, frame_t, n, ciphertext = frame
                assert frame_t == t
                aead = frames.new_aead(bytes.fromhex(v[direction]))
                inner = msgpack.unpackb(
                    frames.open_data(aead, t, n, ciphertext), raw=False, strict_map_key=False
                )
                opened[direction].extend(item for item in inner if item[0] == frames.MSG)
            receiver.receive_data(other, data, now)
    assert opened["key_initiator_to_responder"] == [[0, 1, {"text": f"hello, {res}", "n": 1}]]
    assert opened["key_responder_to_initiator"] == [[0, 1, f"hi {ini}"]]

"""`provision` (G, SPEC §1, §3, §6): the keystore and the computer-key files, kept apart."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from bridge_fakes import Reference

from device_bridge import _provision
from device_bridge._config import MemberConfig, TvdConfig
from device_bridge._keystore import Keystore
from device_bridge._provision import provision
from device_bridge._transports import UnixConnect
from device_bridge.errors import KeystoreError, ProvisionError
from tvdnet.core.scheme import Pair, Provisioning, computer_update, device_update, generate
from tvdnet.keyfile import load_computer_keys

PASSPHRASE = b"provisioning passphrase"
IDS = ("vm-a", "vm-b", "vm-c")


def config(*, epoch: float | None = 1000.0, pairs: str = "all", periods: int = 500) -> TvdConfig:
    members = [
        MemberConfig(vm, f"127.0.0.1:{7001 + i}", UnixConnect(Path(f"/run/tvdnet/{vm}.sock")))
        for i, vm in enumerate(IDS)
    ]
    return TvdConfig("demo", tuple(members), 10.0, periods, epoch, pairs)


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[Reference]:
    """An independent copy of every dev_1 that provision draws (it keeps none itself)."""
    references: list[Reference] = []

    def generate_and_keep(*args: Any, **kwargs: Any) -> Provisioning:
        provisioning = generate(*args, **kwargs)
        references.append(Reference(provisioning))
        return provisioning

    monkeypatch.setattr(_provision, "generate", generate_and_keep)
    return references


def run(tmp_path: Path, cfg: TvdConfig | None = None, **kwargs: Any) -> _provision.ProvisionResult:
    kwargs.setdefault("passphrase", bytearray(PASSPHRASE))
    kwargs.setdefault("now", 1000.0 + 10.0 * 6 + 3.0)  # inside period 7
    kwargs.setdefault("scrypt_n", 16)
    return provision(
        cfg or config(), tmp_path / "ks" / "keystore.json", tmp_path / "export", **kwargs
    )


def files(tmp_path: Path) -> dict[Path, tuple[bytes, int, int]]:
    return {
        p: (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_mode)
        for p in sorted(tmp_path.rglob("*"))
        if p.is_file()
    }


def test_provision_splits_device_and_computer_keys(
    tmp_path: Path, captured: list[Reference]
) -> None:
    result = run(tmp_path)
    assert result.t0 == 7 and result.pairs == 3
    for path in [result.keystore, *result.exports.values()]:
        assert os.stat(path).st_mode & 0o777 == 0o600
    assert os.stat(tmp_path / "export").st_mode & 0o777 == 0o700
    keystore = Keystore.load(result.keystore, bytearray(PASSPHRASE))
    reference = captured[0]
    # SPEC §3: the keystore holds dev_t0, evolved to the period current at provisioning.
    assert keystore.device_keys.period == 7
    for pair in keystore.device_keys.pairs:
        stored = bytes(keystore.device_keys.key_bytes(pair))
        assert stored == reference.dev(pair, 7)
        assert stored != reference.dev(pair, 1)
    # Each VM got exactly its own computer keys; both ends of a pair derive the same SK_t.
    computer = {vm: load_computer_keys(path) for vm, path in result.exports.items()}
    for vm, (keys, schedule) in computer.items():
        assert keys.vm == vm and keys.tvd == "demo" and schedule == result.schedule
        assert sorted(keys.peers) == sorted(set(IDS) - {vm})
    for pair in keystore.device_keys.pairs:
        partial = device_update(keystore.device_keys.key_bytes(pair), "demo", pair.lo, pair.hi, 7)
        sk_lo = computer_update(
            partial, computer[pair.lo][0].get(pair.hi) or b"", "demo", pair.lo, pair.hi, 7
        )
        sk_hi = computer_update(
            partial, computer[pair.hi][0].get(pair.lo) or b"", "demo", pair.hi, pair.lo, 7
        )
        assert sk_lo == sk_hi
    # The keystore holds no computer key, an export no device key.
    keystore_text = result.keystore.read_text()
    for keys, _ in computer.values():
        for peer in keys.peers:
            assert bytes(keys.get(peer) or b"").hex() not in keystore_text
    export_text = "".join(p.read_text() for p in result.exports.values())
    for pair in keystore.device_keys.pairs:
        for t in range(1, 8):
            assert reference.dev(pair, t).hex() not in export_text


def test_without_an_epoch_period_one_starts_at_provisioning(tmp_path: Path) -> None:
    result = run(tmp_path, config(epoch=None), now=5000.0)
    assert result.schedule.epoch == 5000.0 and result.t0 == 1


def test_before_the_epoch_t0_is_one(tmp_path: Path) -> None:
    assert run(tmp_path, now=10.0).t0 == 1


def test_after_the_last_period_provisioning_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ProvisionError, match="already ended"):
        run(tmp_path, config(periods=5), now=1000.0 + 60.0)
    assert not (tmp_path / "ks").exists()


def test_star_pairs(tmp_path: Path) -> None:
    result = run(tmp_path, config(pairs="star:vm-b"))
    keystore = Keystore.load(result.keystore, bytearray(PASSPHRASE))
    assert sorted(keystore.device_keys.pairs) == [Pair("vm-a", "vm-b"), Pair("vm-b", "vm-c")]
    keys, _ = load_computer_keys(result.exports["vm-a"])
    assert keys.peers == ["vm-b"]


def test_it_refuses_to_overwrite_and_changes_nothing(tmp_path: Path) -> None:
    run(tmp_path)
    before = files(tmp_path)
    with pytest.raises(ProvisionError, match=r"refusing to overwrite.*nothing was changed"):
        run(tmp_path)
    assert files(tmp_path) == before


def test_one_file_in_the_way_is_enough_to_refuse(tmp_path: Path) -> None:
    (tmp_path / "export").mkdir()
    in_the_way = tmp_path / "export" / "vm-b.keys"
    in_the_way.write_text("not mine")
    before = files(tmp_path)
    with pytest.raises(ProvisionError, match=r"vm-b\.keys"):
        run(tmp_path)
    assert files(tmp_path) == before
    assert not (tmp_path / "ks").exists()


def test_force_replaces_everything(tmp_path: Path) -> None:
    first = run(tmp_path)
    before = files(tmp_path)
    run(tmp_path, force=True)
    after = files(tmp_path)
    for path in [first.keystore, *first.exports.values()]:
        assert after[path][0] != before[path][0]


def test_the_export_directory_must_be_apart_from_the_keystore(tmp_path: Path) -> None:
    with pytest.raises(ProvisionError, match="must not be the keystore's directory"):
        provision(config(), tmp_path / "keystore.json", tmp_path, passphrase=None, now=1000.0)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_keystore_write_leaves_no_export_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(self: Keystore, payload: bytes, *, overwrite: bool = True) -> None:
        raise KeystoreError(self.path, "cannot write it (No space left on device)")

    monkeypatch.setattr(Keystore, "write", fail)
    with pytest.raises(ProvisionError, match="No space left"):
        run(tmp_path)
    assert [p for p in tmp_path.rglob("*") if p.is_file() and not p.name.endswith(".lock")] == []


def test_a_full_disk_names_the_file_it_could_not_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 18: provision onto a full disk said `cannot write None` (write(2)'s error
    names no file)."""
    written: list[Path] = []

    def full_after_one(path: Path, *args: Any, **kwargs: Any) -> None:
        if written:
            raise OSError(28, "No space left on device")
        written.append(path)
        real(path, *args, **kwargs)

    real = getattr(_provision, "write_computer_keys")  # noqa: B009 -- its name there
    monkeypatch.setattr(_provision, "write_computer_keys", full_after_one)
    with pytest.raises(ProvisionError) as caught:
        run(tmp_path)
    message = str(caught.value)
    assert "None" not in message
    assert message.startswith(f"cannot write {tmp_path}/") and ".keys: No space left" in message
    assert "nothing was provisioned" in message
    assert [p for p in tmp_path.rglob("*") if p.is_file() and not p.name.endswith(".lock")] == []


def test_a_running_bridge_keeps_its_keystore(tmp_path: Path) -> None:
    result = run(tmp_path)
    keystore = Keystore.load(result.keystore, bytearray(PASSPHRASE))
    keystore.lock()
    before = files(tmp_path)
    try:
        with pytest.raises(ProvisionError, match="another bridge"):
            run(tmp_path, force=True)
    finally:
        keystore.close()
    assert files(tmp_path) == before


def test_plaintext_keystore_for_demos(tmp_path: Path) -> None:
    result = run(tmp_path, passphrase=None)
    text = result.keystore.read_text()
    assert '"encryption": "none"' in text and "DEMOS ONLY" in text
    assert Keystore.load(result.keystore, None).device_keys.period == 7

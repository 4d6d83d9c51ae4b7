"""The bridge keystore (SPEC §6): encrypted at rest, atomic, fresh salt and nonce, strict."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from bridge_fakes import SCHEDULE, Reference

from device_bridge._keystore import Keystore, MemberRecord
from device_bridge._passphrase import PASSPHRASE_ENV, read_passphrase
from device_bridge.errors import BridgeError, KeystoreError
from tvdnet.core.scheme import generate

PASSPHRASE = b"correct horse battery staple"
MEMBERS = [
    MemberRecord("vm-a", "127.0.0.1:7001", "unix:/run/a.sock"),
    MemberRecord("vm-b", "127.0.0.1:7002", "unix:/run/b.sock"),
    MemberRecord("vm-c", "127.0.0.1:7003", "pty:/dev/pts/4"),
]
FAST_N = 16  # tests only; the file records it


def make(
    tmp_path: Path, *, passphrase: bytes | None = PASSPHRASE, t: int = 3
) -> tuple[Keystore, Reference]:
    provisioning = generate("test-tvd", [m.id for m in MEMBERS])
    reference = Reference(provisioning)
    keys = provisioning.for_bridge(t)
    provisioning.erase()
    secret = bytearray(passphrase) if passphrase is not None else None
    keystore = Keystore(
        tmp_path / "keystore.json", SCHEDULE, MEMBERS, keys, secret, scrypt_n=FAST_N
    )
    keystore.save()
    return keystore, reference


def document(path: Path) -> dict[str, object]:
    data: dict[str, object] = json.loads(path.read_text())
    return data


def test_an_encrypted_keystore_round_trips(tmp_path: Path) -> None:
    keystore, reference = make(tmp_path)
    path = keystore.path
    assert os.stat(path).st_mode & 0o777 == 0o600
    outer = document(path)
    assert outer["encryption"] == "scrypt+aes-256-gcm"
    kdf = outer["kdf"]
    assert isinstance(kdf, dict)
    assert kdf == {
        "name": "scrypt",
        "n": FAST_N,
        "r": 8,
        "p": 1,
        "salt": kdf["salt"],
    }
    text = path.read_text()
    for pair in keystore.device_keys.pairs:  # nothing of a key is readable in the file
        assert reference.dev(pair, 3).hex() not in text
    loaded = Keystore.load(path, bytearray(PASSPHRASE))
    assert loaded.encrypted and loaded.tvd == "test-tvd" and loaded.schedule == SCHEDULE
    assert list(loaded.members.values()) == MEMBERS
    assert loaded.device_keys.period == 3
    for pair in keystore.device_keys.pairs:
        assert bytes(loaded.device_keys.key_bytes(pair)) == reference.dev(pair, 3)


def test_every_write_has_a_fresh_salt_and_nonce(tmp_path: Path) -> None:
    keystore, _ = make(tmp_path)
    first = document(keystore.path)
    keystore.save()
    second = document(keystore.path)
    assert first["kdf"]["salt"] != second["kdf"]["salt"]  # type: ignore[index]
    assert first["nonce"] != second["nonce"]
    assert first["ciphertext"] != second["ciphertext"]
    assert len(bytes.fromhex(second["kdf"]["salt"])) == 16  # type: ignore[index]
    assert len(bytes.fromhex(second["nonce"])) == 12  # type: ignore[arg-type]


def test_a_wrong_passphrase_is_a_clear_error_and_changes_nothing(tmp_path: Path) -> None:
    keystore, _ = make(tmp_path)
    before = keystore.path.read_bytes()
    with pytest.raises(KeystoreError) as caught:
        Keystore.load(keystore.path, bytearray(b"wrong"))
    assert str(caught.value) == (
        f"{keystore.path}: wrong passphrase, or the file is corrupted (it does not authenticate)"
    )
    assert keystore.path.read_bytes() == before
    with pytest.raises(KeystoreError, match="a passphrase is needed"):
        Keystore.load(keystore.path, None)


def edit(path: Path, change: object) -> None:
    data = document(path)
    change(data)  # type: ignore[operator]
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda d: d.update(ciphertext="00" + d["ciphertext"][2:]), "does not authenticate"),
        (lambda d: d["kdf"].update(extra=1), "does not authenticate"),  # the header is bound
        (lambda d: d.update(nonce="00" * 12), "does not authenticate"),
        (lambda d: d.update(nonce="abc"), '"nonce" must be 24 hex digits'),
        (lambda d: d["kdf"].update(n=1000), "power of two"),
        (lambda d: d["kdf"].update(n=1 << 20, r=32), "more than 1 GiB"),
        (lambda d: d.update(version=2), "unsupported version"),
        (lambda d: d.update(format="other"), "not a keystore"),
        (lambda d: d.update(encryption="rot13"), '"encryption" must be'),
    ],
)
def test_a_corrupted_keystore_is_refused_and_left_alone(
    tmp_path: Path, change: object, words: str
) -> None:
    keystore, _ = make(tmp_path)
    edit(keystore.path, change)
    before = keystore.path.read_bytes()
    with pytest.raises(KeystoreError) as caught:
        Keystore.load(keystore.path, bytearray(PASSPHRASE))
    assert words in str(caught.value) and str(keystore.path) in str(caught.value)
    assert keystore.path.read_bytes() == before


def test_garbage_and_truncation_are_refused(tmp_path: Path) -> None:
    keystore, _ = make(tmp_path)
    data = keystore.path.read_bytes()
    keystore.path.write_bytes(data[: len(data) // 2])
    with pytest.raises(KeystoreError, match="not JSON"):
        Keystore.load(keystore.path, bytearray(PASSPHRASE))
    keystore.path.write_bytes(b"\xff\xfe")
    with pytest.raises(KeystoreError, match="not JSON"):
        Keystore.load(keystore.path, bytearray(PASSPHRASE))


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_a_keystore_others_can_read_is_refused(tmp_path: Path, mode: int) -> None:
    keystore, _ = make(tmp_path)
    os.chmod(keystore.path, mode)
    with pytest.raises(KeystoreError, match="lets group or others in"):
        Keystore.load(keystore.path, bytearray(PASSPHRASE))


def test_a_failed_write_leaves_the_old_file_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keystore, _ = make(tmp_path)
    before = keystore.path.read_bytes()
    keystore.device_keys.evolve_to(4)

    def no_rename(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(KeystoreError, match=r"No space left on device.*unchanged"):
        keystore.save()
    monkeypatch.undo()
    assert keystore.path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keystore.json"]  # no temp file left
    assert Keystore.load(keystore.path, bytearray(PASSPHRASE)).device_keys.period == 3


def test_after_evolving_only_the_current_device_key_is_stored(tmp_path: Path) -> None:
    keystore, reference = make(tmp_path, t=3)
    keystore.device_keys.evolve_to(4)
    keystore.save()
    payload = keystore.snapshot().decode()
    loaded = Keystore.load(keystore.path, bytearray(PASSPHRASE))
    assert loaded.device_keys.period == 4
    for pair in keystore.device_keys.pairs:
        assert reference.dev(pair, 4).hex() in payload
        for old in (1, 2, 3):
            assert reference.dev(pair, old).hex() not in payload


def test_a_plaintext_keystore_says_so(tmp_path: Path) -> None:
    keystore, reference = make(tmp_path, passphrase=None)
    outer = document(keystore.path)
    assert outer["encryption"] == "none"
    assert "demo" in str(outer["warning"]).lower()
    loaded = Keystore.load(keystore.path, None)
    assert not loaded.encrypted and "PLAINTEXT" in repr(loaded)
    pair = loaded.device_keys.pairs[0]
    assert bytes(loaded.device_keys.key_bytes(pair)) == reference.dev(pair, 3)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda p: p.update(t=0), "period"),
        (lambda p: p["device_keys"][0].update(dev="zz"), '"dev" must be 64 hex digits'),
        (lambda p: p["device_keys"][0].update(pair=["vm-a", "vm-a"]), "pair of two members"),
        (lambda p: p["device_keys"][0].update(pair=["vm-a", "vm-x"]), "pair of two members"),
        (lambda p: p["device_keys"].append(dict(p["device_keys"][0])), "repeats a pair"),
        (lambda p: p["members"].append(dict(p["members"][0])), "names a member twice"),
        (lambda p: p.update(tvd="no good"), '"tvd"'),
    ],
)
def test_a_bad_payload_is_refused(tmp_path: Path, change: object, words: str) -> None:
    keystore, _ = make(tmp_path, passphrase=None)
    edit(keystore.path, lambda d: change(d["payload"]))  # type: ignore[operator]
    with pytest.raises(KeystoreError, match="corrupted") as caught:
        Keystore.load(keystore.path, None)
    assert words in str(caught.value)


def test_errors_and_reprs_carry_no_key_material(tmp_path: Path) -> None:
    keystore, reference = make(tmp_path)
    secrets = reference.all_key_hex(3) | {PASSPHRASE.decode()}
    texts = [repr(keystore), repr(keystore.device_keys)]
    edit(keystore.path, lambda d: d["kdf"].update(extra=1))
    with pytest.raises(KeystoreError) as caught:
        Keystore.load(keystore.path, bytearray(PASSPHRASE))
    texts.append(str(caught.value))
    assert not any(secret in text for secret in secrets for text in texts)


def test_one_bridge_per_keystore(tmp_path: Path) -> None:
    keystore, _ = make(tmp_path)
    keystore.lock()
    other = Keystore.load(keystore.path, bytearray(PASSPHRASE))
    with pytest.raises(KeystoreError, match="another bridge"):
        other.lock()
    keystore.close()
    other.lock()
    other.close()


def test_a_symlink_to_the_keystore_is_refused(tmp_path: Path) -> None:
    """Issue 18: a second bridge ran through a symlink (its lock was the link's), and its
    first rewrite replaced the link with a file holding its own, older, device keys."""
    keystore, _ = make(tmp_path)
    keystore.lock()
    link = tmp_path / "other.json"
    link.symlink_to(keystore.path)
    with pytest.raises(KeystoreError, match=r"other\.json: a symlink \(to .*keystore\.json\)"):
        Keystore.load(link, bytearray(PASSPHRASE))
    keystore.close()


def test_a_keystore_with_another_hard_link_is_refused(tmp_path: Path) -> None:
    keystore, _ = make(tmp_path)
    os.link(keystore.path, tmp_path / "copy.json")
    with pytest.raises(KeystoreError, match="2 hard links to it: remove the other names"):
        Keystore.load(keystore.path, bytearray(PASSPHRASE))


def test_a_hard_link_made_while_running_keeps_no_older_key(tmp_path: Path) -> None:
    """A link made after the bridge loaded its keystore: the rewrite replaces the name the
    bridge uses and zeroes the old file, so the other name holds no older device key."""
    keystore, reference = make(tmp_path, passphrase=None, t=3)
    other = tmp_path / "copy.json"
    os.link(keystore.path, other)
    keystore.device_keys.evolve_to(4)
    keystore.save()
    assert set(other.read_bytes()) == {0}
    text = keystore.path.read_text()
    for pair in keystore.device_keys.pairs:
        assert reference.dev(pair, 4).hex() in text


def test_the_lock_beside_the_keystore_is_not_followed_through_a_symlink(tmp_path: Path) -> None:
    keystore, _ = make(tmp_path)
    (tmp_path / "keystore.json.lock").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(KeystoreError, match=r"cannot open its lock .*keystore\.json\.lock"):
        keystore.lock()
    assert not (tmp_path / "elsewhere").exists()


def test_close_zeroes_the_passphrase(tmp_path: Path) -> None:
    secret = bytearray(PASSPHRASE)
    keystore, _ = make(tmp_path)
    loaded = Keystore.load(keystore.path, secret)
    loaded.close()
    assert secret == bytearray(len(PASSPHRASE))


def test_the_passphrase_comes_from_a_file_the_environment_or_a_prompt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret_file = tmp_path / "passphrase"
    secret_file.write_bytes(b"from a file\n")
    os.chmod(secret_file, 0o600)
    assert read_passphrase(confirm=False, file=secret_file) == bytearray(b"from a file")
    os.chmod(secret_file, 0o644)
    with pytest.raises(BridgeError, match="lets group or others in"):
        read_passphrase(confirm=False, file=secret_file)
    monkeypatch.setenv(PASSPHRASE_ENV, "from the environment")
    assert read_passphrase(confirm=False) == bytearray(b"from the environment")
    assert PASSPHRASE_ENV not in os.environ  # children do not inherit it
    answers = iter(["typed", "typed"])
    assert read_passphrase(confirm=True, prompt=lambda _: next(answers), interactive=True) == (
        bytearray(b"typed")
    )
    answers = iter(["typed", "other"])
    with pytest.raises(BridgeError, match="differ"):
        read_passphrase(confirm=True, prompt=lambda _: next(answers), interactive=True)
    with pytest.raises(BridgeError, match="no passphrase"):
        read_passphrase(confirm=False, interactive=False)

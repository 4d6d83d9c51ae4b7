"""A TVD across hosts (issue 19, SPEC §1, §6): a keystore per host, and a member's move.

vm-a and vm-b start on host h1, vm-c on h2; h3 is a host of the TVD with no member yet.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing
from bridge_fakes import SCHEDULE, Reference, clock_at, start_of

from device_bridge import _daemon, _provision
from device_bridge._config import MemberConfig, TvdConfig, load_config
from device_bridge._control import _read_bundle, _write_bundle
from device_bridge._daemon import Bridge, MoveResult, open_bridge
from device_bridge._keystore import Keystore
from device_bridge._moves import open_bundle, peek_bundle, seal_bundle
from device_bridge._provision import keystore_paths, provision
from device_bridge._transports import StreamPort
from device_bridge.errors import ConfigError, KeystoreError, MoveError, ProvisionError, ReloadError
from tvdnet.core.scheme import Pair, Provisioning, generate

IDS = ("vm-a", "vm-b", "vm-c")
START_HOSTS = {"vm-a": "h1", "vm-b": "h1", "vm-c": "h2"}
NOW = start_of(5) + 1.0  # provisioning happens in period 5


PORTS: dict[str, StreamPort] = {}  # one port object per VM and host, as a file names one


def port(vm: str, host: str) -> StreamPort:
    return PORTS.setdefault(f"{vm}@{host}", StreamPort(f"{vm}@{host}"))


def config(hosts: dict[str, str] = START_HOSTS, tvd: str = "test-tvd") -> TvdConfig:
    members = [
        MemberConfig(vm, f"127.0.0.1:{7000 + i}", port(vm, hosts[vm]), hosts[vm])
        for i, vm in enumerate(IDS)
    ]
    return TvdConfig.for_schedule(tvd, SCHEDULE, members, hosts=("h1", "h2", "h3"))


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[Reference]:
    references: list[Reference] = []

    def generate_and_keep(*args: object, **kwargs: object) -> Provisioning:
        provisioning = generate(*args, **kwargs)  # type: ignore[arg-type]
        references.append(Reference(provisioning))
        return provisioning

    monkeypatch.setattr(_provision, "generate", generate_and_keep)
    return references


def provisioned(tmp_path: Path, cfg: TvdConfig | None = None) -> dict[str, Path]:
    cfg = cfg or config()
    paths = keystore_paths(cfg, tmp_path / "out")
    provision(cfg, paths, tmp_path / "out" / "export", passphrase=None, now=NOW)
    return paths


def pairs(*names: tuple[str, str]) -> set[Pair]:
    return {Pair.of(a, b) for a, b in names}


# ------------------------------------------------------------------ the TVD file


def write_tvd(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "tvd.toml"
    path.write_text('tvd = "t"\nperiod_seconds = 10\nperiods = 100\n' + body)
    return path


def member(vm: str, port: int, host: str | None = None, channel: str | None = None) -> str:
    host_line = f'host = "{host}"\n' if host else ""
    return (
        f'[[members]]\nid = "{vm}"\naddress = "127.0.0.1:{port}"\n'
        f'channel = "{channel or f"unix:/run/{vm}.sock"}"\n{host_line}'
    )


def test_a_tvd_file_names_each_members_host(tmp_path: Path) -> None:
    path = write_tvd(
        tmp_path,
        'hosts = ["kvm1", "kvm2", "kvm3"]\n'
        + member("vm-a", 1, "kvm1", "unix:/run/x.sock")
        + member("vm-b", 2, "kvm2", "unix:/run/x.sock")  # the same path on another host
        + member("vm-c", 3),
    )
    with pytest.raises(ConfigError, match=r"hosts: misses 'local'"):
        load_config(path)
    path = write_tvd(
        tmp_path,
        'hosts = ["kvm1", "kvm2", "kvm3"]\n'
        + member("vm-a", 1, "kvm1", "unix:/run/x.sock")
        + member("vm-b", 2, "kvm2", "unix:/run/x.sock"),
    )
    cfg = load_config(path)
    assert cfg.hosts == ("kvm1", "kvm2", "kvm3")
    assert [m.id for m in cfg.members_on("kvm2")] == ["vm-b"]
    assert load_config(write_tvd(tmp_path, member("vm-a", 1) + member("vm-b", 2))).hosts == (
        "local",
    )


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (
            member("vm-a", 1, "kvm1") + member("vm-b", 2, "kv m"),
            r"tvd.toml:13: members\[1\]\.host: an id must be",
        ),
        (
            member("vm-a", 1, "kvm1", "unix:/run/x.sock")
            + member("vm-b", 2, "kvm1", "unix:/run/x.sock"),
            r"members\[1\]\.channel: already the channel of members\[0\]",
        ),
        ('hosts = ["a", "a"]\n' + member("vm-a", 1, "a") + member("vm-b", 2, "a"), "'a' twice"),
        ('hosts = "a"\n' + member("vm-a", 1, "a") + member("vm-b", 2, "a"), "list of host names"),
        (member("vm-a", 1, "kvm1") + member("vm-b", 2).replace('"vm-b"\n', '"vm-b"\nhost = 7\n'),
         r"members\[1\]\.host: must be a string"),
    ],
)  # fmt: skip
def test_a_bad_host_is_named_with_its_line(tmp_path: Path, body: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        load_config(write_tvd(tmp_path, body))


# ------------------------------------------------------------------ provisioning


def test_each_host_gets_the_pairs_with_a_member_on_it(
    tmp_path: Path, captured: list[Reference]
) -> None:
    paths = provisioned(tmp_path)
    assert {h: p.name for h, p in paths.items()} == {
        "h1": "keystore-h1.json",
        "h2": "keystore-h2.json",
        "h3": "keystore-h3.json",
    }
    (reference,) = captured
    stores = {h: Keystore.load(p, None) for h, p in paths.items()}
    assert {h: set(s.device_keys.pairs) for h, s in stores.items()} == {
        "h1": pairs(("vm-a", "vm-b"), ("vm-a", "vm-c"), ("vm-b", "vm-c")),
        "h2": pairs(("vm-a", "vm-c"), ("vm-b", "vm-c")),
        "h3": set(),
    }
    for host, store in stores.items():
        assert store.host == host and store.device_keys.period == 5
        for pair in store.device_keys.pairs:  # each host evolves the same dev_t
            assert bytes(store.device_keys.key_bytes(pair)) == reference.dev(pair, 5)
        # A transfer key with every other host, the same at both ends, and random.
        assert set(store.transfer_keys.pairs) == {
            Pair.of(host, other) for other in ("h1", "h2", "h3") if other != host
        }
    link = Pair.of("h1", "h2")
    assert stores["h1"].transfer_keys.key_bytes(link) == stores["h2"].transfer_keys.key_bytes(link)
    assert stores["h1"].transfer_keys.key_bytes(link) != stores["h1"].transfer_keys.key_bytes(
        Pair.of("h1", "h3")
    )


def test_one_keystore_file_is_refused_for_several_hosts(tmp_path: Path) -> None:
    with pytest.raises(ProvisionError, match=r"3 hosts .*give a directory"):
        provision(config(), tmp_path / "k.json", tmp_path / "export", passphrase=None, now=NOW)
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------ moving a member


class Hosts:
    """h1's and h2's keystores, and their bridges once `running_hosts` runs them."""

    def __init__(self, paths: dict[str, Path]) -> None:
        self.stores = {h: Keystore.load(paths[h], None) for h in ("h1", "h2")}
        self.bridges: dict[str, Bridge] = {}

    def payload(self, host: str) -> str:
        return json.dumps(json.loads(self.stores[host].path.read_text())["payload"])


@asynccontextmanager
async def running_hosts(tmp_path: Path) -> AsyncIterator[Hosts]:
    """A TVD provisioned in period 5, and h1's and h2's bridges running in period 6."""
    hosts = Hosts(provisioned(tmp_path))
    async with AsyncExitStack() as stack:
        for store in hosts.stores.values():
            bridge = open_bridge(
                config(), store.device_keys, keystore=store, clock=clock_at(start_of(6) + 1.0)
            )
            hosts.bridges[store.host] = await stack.enter_async_context(bridge)
        yield hosts


MOVED = {**START_HOSTS, "vm-b": "h2"}


async def move_out(bridge: Bridge, vm: str, target: str) -> tuple[MoveResult, bytes]:
    """`Bridge.move_out`, the bundle kept in memory instead of a file."""
    written: list[bytes] = []

    async def write(bundle: bytes) -> None:
        written.append(bundle)

    result = await bridge.move_out(vm, target, write)
    return result, written[0]


async def test_a_member_moves_and_the_old_host_keeps_no_pair_without_a_member(
    tmp_path: Path, captured: list[Reference], mock_clock: trio.testing.MockClock
) -> None:
    async with running_hosts(tmp_path) as hosts:
        (reference,) = captured
        a, b = hosts.bridges["h1"], hosts.bridges["h2"]
        assert a.status().pairs_elsewhere == {
            "vm-a": {"h2": ["vm-c"]},
            "vm-b": {"h2": ["vm-c"]},
        }
        # Releasing vm-b before a bundle was made would lose {vm-a, vm-b}: refused.
        with pytest.raises(ReloadError, match="no bundle of its keys was made for that host"):
            await a.reload(config(MOVED))
        assert a.vms == ("vm-a", "vm-b")

        moved, bundle = await move_out(a, "vm-b", "h2")
        assert (moved.t, moved.pairs) == (6, 2)
        assert (
            b"dev" not in bundle
            and reference.dev(Pair.of("vm-a", "vm-b"), 6).hex().encode() not in bundle
        )
        taken = await b.move_in(bundle, config(MOVED))
        assert (taken.vm, taken.source, taken.pairs, taken.adopted) == ("vm-b", "h1", 2, 1)
        assert b.vms == ("vm-c", "vm-b")
        assert set(b._keys.pairs) == pairs(("vm-a", "vm-b"), ("vm-a", "vm-c"), ("vm-b", "vm-c"))

        # Usable once, even though everything else about it still holds.
        with pytest.raises(MoveError, match="taken in already"):
            await b.move_in(bundle, config(MOVED))

        result = await a.reload(config(MOVED))
        assert result.moved_away == ("vm-b",)
        assert list(a.vms) == ["vm-a"]
        # {vm-b, vm-c} has no member on h1 any more; {vm-a, vm-b} keeps vm-a's.
        assert set(a._keys.pairs) == pairs(("vm-a", "vm-b"), ("vm-a", "vm-c"))
        await a.wait_keystore()
        await b.wait_keystore()
        gone = reference.dev(Pair.of("vm-b", "vm-c"), 6).hex()
        assert gone not in hosts.payload("h1")
        assert gone in hosts.payload("h2")
        assert json.loads(hosts.payload("h2"))["moves_in"][0]["vm"] == "vm-b"
        # The keys that moved keep evolving at h2 by the schedule.
        mock_clock.jump(start_of(7) - start_of(6))
        await trio.testing.wait_all_tasks_blocked()
        assert b._keys.period == 7
        assert bytes(b._keys.key_bytes(Pair.of("vm-a", "vm-b"))) == reference.dev(
            Pair.of("vm-a", "vm-b"), 7
        )


def tampered(bundle: bytes, **changes: object) -> bytes:
    document = json.loads(bundle)
    document.update(changes)
    return json.dumps(document).encode()


async def test_a_bundle_that_is_not_for_this_host_now_changes_nothing(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    async with running_hosts(tmp_path) as hosts:
        a, b = hosts.bridges["h1"], hosts.bridges["h2"]
        _, bundle = await move_out(a, "vm-b", "h2")
        _, for_h3 = await move_out(a, "vm-b", "h3")
        before = (hosts.payload("h2"), set(b._keys.pairs), b.vms)
        document = json.loads(bundle)
        flipped = document["ciphertext"][:-2] + format(
            int(document["ciphertext"][-2:], 16) ^ 1, "02x"
        )
        refusals = {
            "for host 'h3'": for_h3,
            "of TVD 'other'": tampered(bundle, tvd="other"),
            "does not authenticate": tampered(bundle, ciphertext=flipped),
            # The header is bound into the key and the associated data: a changed one fails.
            "not made by host 'h3'": tampered(bundle, **{"from": "h3"}),
            "not JSON": b"\x00garbage",
            "not a move bundle": json.dumps({"format": "x"}).encode(),
            "has the wrong length": tampered(bundle, id="00"),
        }
        for problem, data in refusals.items():
            with pytest.raises(MoveError, match=problem):
                await b.move_in(data, config(MOVED))
        # The TVD file must put the VM here first.
        with pytest.raises(MoveError, match="does not put 'vm-b' on this host"):
            await b.move_in(bundle, config())
        # A bundle opens only in its own period: one kept past it is refused.
        mock_clock.jump(start_of(7) - start_of(6))
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(MoveError, match="made in period 6 and this host is in period 7"):
            await b.move_in(bundle, config(MOVED))
        await b.wait_keystore()
        assert (set(b._keys.pairs), b.vms) == before[1:]
        # Nothing was written either: the file holds what it held, at the new period.
        after = json.loads(hosts.payload("h2"))
        assert after["moves_in"] == [] and after["members"] == json.loads(before[0])["members"]
        assert [e["pair"] for e in after["device_keys"]] == [
            e["pair"] for e in json.loads(before[0])["device_keys"]
        ]


async def test_a_move_undone_before_the_migration_leaves_one_host_serving(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    async with running_hosts(tmp_path) as hosts:
        a, b = hosts.bridges["h1"], hosts.bridges["h2"]
        _, bundle = await move_out(a, "vm-b", "h2")
        await b.move_in(bundle, config(MOVED))
        # The migration failed: h2 lets vm-b go again; h1 never stopped serving it.
        result = await b.reload(config())
        assert result.moved_away == ("vm-b",)
        assert b.vms == ("vm-c",)
        assert set(b._keys.pairs) == pairs(("vm-a", "vm-c"), ("vm-b", "vm-c"))
        assert a.vms == ("vm-a", "vm-b")
        assert len(a._keys.pairs) == 3


def test_a_bundle_file_is_private_and_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "vm-b.move"
    _write_bundle(path, b"{}")
    assert path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(MoveError, match="exists: a bundle is never written over another"):
        _write_bundle(path, b"{}")
    path.chmod(0o644)
    with pytest.raises(MoveError, match="group or others"):
        _read_bundle(path)
    with pytest.raises(MoveError, match="no such file"):
        _read_bundle(tmp_path / "missing")


def test_a_bundle_holds_no_key_in_the_clear() -> None:
    key = bytes(range(32))
    bundle = seal_bundle(
        tvd="t", vm="vm-b", source="h1", target="h2", t=3, transfer_t=bytes(32),
        keys={Pair.of("vm-a", "vm-b"): key},
    )  # fmt: skip
    assert key.hex().encode() not in bundle
    header, _, _ = peek_bundle(bundle)
    assert (header.vm, header.source, header.target, header.t) == ("vm-b", "h1", "h2", 3)
    opened = open_bundle(bundle, bytes(32), ["vm-a", "vm-b"])
    assert bytes(opened.keys[Pair.of("vm-a", "vm-b")]) == key
    assert key.hex() not in repr(opened)
    opened.erase()
    assert not opened.keys


async def test_a_bridge_serves_only_its_hosts_members(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    paths = provisioned(tmp_path)
    store = Keystore.load(paths["h2"], None)
    with pytest.raises(KeystoreError, match="keystore of host 'h2', not of 'h1'"):
        async with open_bridge(
            config(), store.device_keys, keystore=store, clock=clock_at(start_of(6)), host="h1"
        ):
            pass  # pragma: no cover
    async with open_bridge(
        config(), store.device_keys, keystore=store, clock=clock_at(start_of(6))
    ) as bridge:
        assert bridge.vms == ("vm-c",)
        status = bridge.status().to_json()
        assert status["host"] == "h2"
        assert status["pairs_elsewhere"] == {"vm-c": {"h1": ["vm-a", "vm-b"]}}


async def test_a_tvd_file_that_puts_a_member_here_before_its_keys_is_refused(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    paths = provisioned(tmp_path)
    store = Keystore.load(paths["h2"], None)
    with pytest.raises(ConfigError, match=r"members\[1\]\.host: puts vm-b on this host \(h2\), "
                       r"but its keys for vm-a are not in this host's keystore"):  # fmt: skip
        async with open_bridge(
            config(MOVED), store.device_keys, keystore=store, clock=clock_at(start_of(6))
        ):
            pass  # pragma: no cover
    assert Keystore.load(paths["h2"], None).device_keys.period == 5  # nothing was written


async def test_a_move_in_with_other_changes_in_the_file_is_refused(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    async with running_hosts(tmp_path) as hosts:
        a, b = hosts.bridges["h1"], hosts.bridges["h2"]
        _, bundle = await move_out(a, "vm-b", "h2")
        edited = config(MOVED)
        members = list(edited.members)
        members[2] = dataclasses.replace(members[2], address="127.0.0.1:9999")
        edited = dataclasses.replace(edited, members=tuple(members))
        with pytest.raises(MoveError, match="changed more than vm-b's entry"):
            await b.move_in(bundle, edited)
        assert b.vms == ("vm-c",)
        # The same bundle still goes in once the file says only the move.
        await b.move_in(bundle, config(MOVED))
        assert list(b.vms) == ["vm-c", "vm-b"]


async def test_a_member_removed_from_the_tvd_on_another_host_leaves_no_pair_here(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    async with running_hosts(tmp_path) as hosts:
        a = hosts.bridges["h1"]
        without_c = dataclasses.replace(config(), members=config().members[:2])
        result = await a.reload(without_c)
        assert result.removed == ("vm-c",)
        assert set(a._keys.pairs) == pairs(("vm-a", "vm-b"))
        await a.wait_keystore()
        # The keystore stays loadable: no pair names a member it no longer lists.
        assert set(Keystore.load(hosts.stores["h1"].path, None).device_keys.pairs) == pairs(
            ("vm-a", "vm-b")
        )


async def test_one_reload_lets_a_member_go_and_removes_another(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    async with running_hosts(tmp_path) as hosts:
        a = hosts.bridges["h1"]
        await move_out(a, "vm-b", "h2")
        moved_without_c = dataclasses.replace(config(MOVED), members=config(MOVED).members[:2])
        result = await a.reload(moved_without_c)
        assert (result.removed, result.moved_away) == (("vm-c",), ("vm-b",))
        assert list(a.vms) == ["vm-a"]
        assert set(a._keys.pairs) == pairs(("vm-a", "vm-b"))


async def test_a_host_that_let_a_member_go_can_still_seal_its_pairs_for_the_new_host(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """h1 was started on a file that already put vm-b on h2 (edited while it was down),
    and h2 never took vm-b in: h1 erased {vm-b, vm-c} (h2 holds it: vm-c is there) and
    keeps {vm-a, vm-b}, which it seals for h2 although it no longer serves vm-b."""
    paths = provisioned(tmp_path)
    h1 = Keystore.load(paths["h1"], None)
    async with open_bridge(
        config(MOVED), h1.device_keys, keystore=h1, clock=clock_at(start_of(6) + 1.0)
    ) as a:
        assert list(a.vms) == ["vm-a"]
        assert set(a._keys.pairs) == pairs(("vm-a", "vm-b"), ("vm-a", "vm-c"))
        result, bundle = await move_out(a, "vm-b", "h2")
        assert result.pairs == 1
    h2 = Keystore.load(paths["h2"], None)
    async with open_bridge(
        config(), h2.device_keys, keystore=h2, clock=clock_at(start_of(6) + 2.0)
    ) as b:
        await b.move_in(bundle, config(MOVED))
        assert set(b._keys.pairs) == pairs(("vm-a", "vm-b"), ("vm-a", "vm-c"), ("vm-b", "vm-c"))
        assert list(b.vms) == ["vm-c", "vm-b"]


async def test_a_bundle_that_was_not_stored_is_no_move(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    async with running_hosts(tmp_path) as hosts:
        a = hosts.bridges["h1"]

        async def fail(bundle: bytes) -> None:
            raise MoveError("disk full")

        with pytest.raises(MoveError, match="disk full"):
            await a.move_out("vm-b", "h2", fail)
        with pytest.raises(ReloadError, match="no bundle of its keys was made"):
            await a.reload(config(MOVED))


async def test_the_same_bundle_taken_in_twice_at_once_goes_in_once(
    tmp_path: Path, mock_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_hosts(tmp_path) as hosts:
        a, b = hosts.bridges["h1"], hosts.bridges["h2"]
        _, bundle = await move_out(a, "vm-b", "h2")
        outcomes: list[str] = []

        async def take() -> None:
            try:
                await b.move_in(bundle)  # b's file has no path: its own config, in a thread
                outcomes.append("in")
            except MoveError as exc:
                outcomes.append(str(exc))

        # h2's file, edited by the operator, read in a worker thread by each call: both
        # calls pass the first checks before either applies the bundle.
        moved = config(MOVED)
        monkeypatch.setattr(_daemon, "load_config", lambda path: moved)
        b.config = dataclasses.replace(b.config, path=tmp_path / "h2.toml")
        async with trio.open_nursery() as both:
            both.start_soon(take)
            both.start_soon(take)
        assert sorted(outcomes)[0] == "in" and "usable once" in sorted(outcomes)[1]
        assert len(hosts.stores["h2"].moves_in) == 1


def suspending(cfg: TvdConfig, vm: str) -> TvdConfig:
    members = tuple(dataclasses.replace(m, suspended=m.id == vm) for m in cfg.members)
    return dataclasses.replace(cfg, members=members)


async def test_a_suspended_member_is_not_let_onto_a_host_without_its_keys(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """Review of issue 20: a suspended member put on h2 in h2's file (no bundle) was taken,
    and resumed there without the keys of its pairs; h2 could not start again."""
    async with running_hosts(tmp_path) as hosts:
        b = hosts.bridges["h2"]
        with pytest.raises(ReloadError, match="vm-b is now on this host"):
            await b.reload(suspending(config(MOVED), "vm-b"))
        assert b.vms == ("vm-c",) and b.config == config()


async def test_a_suspended_member_moved_in_is_served_once_resumed(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """Review of issue 20: move-in of a member suspended in the file raised KeyError
    halfway, with its keys adopted and the bundle spent."""
    async with running_hosts(tmp_path) as hosts:
        a, b = hosts.bridges["h1"], hosts.bridges["h2"]
        await a.reload(suspending(config(), "vm-b"))
        _, bundle = await move_out(a, "vm-b", "h2")
        result = await b.move_in(bundle, suspending(config(MOVED), "vm-b"))
        assert result.pairs == 2 and b.vms == ("vm-c",)  # held here, not served yet
        assert set(b._keys.pairs) == pairs(("vm-a", "vm-b"), ("vm-a", "vm-c"), ("vm-b", "vm-c"))
        assert b.status().suspended == ("vm-b",)
        back = await b.reload(config(MOVED))
        assert back.resumed == ("vm-b",) and list(b.vms) == ["vm-c", "vm-b"]

"""`tvdnet-bridge`: provision, status and reload through `main`, and a real `run` process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
import trio.testing
from bridge_fakes import Reference, clock_at, short_tmp, start_of, stream_config

from device_bridge import _provision
from device_bridge._cli import main
from device_bridge._control import serve_control
from device_bridge._daemon import open_bridge
from device_bridge._keystore import Keystore
from tvdnet.core.scheme import Provisioning, generate
from tvdnet_tools.local import Stopped, stop_process

TVD = """\
tvd = "cli-tvd"
period_seconds = {period}
periods = 100000
[[members]]
id = "vm-a"
address = "127.0.0.1:7001"
channel = "unix-listen:a.sock"
[[members]]
id = "vm-b"
address = "127.0.0.1:7002"
channel = "unix-listen:b.sock"
"""
PASSPHRASE = "cli passphrase"


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TVDNET_KEYSTORE_PASSPHRASE", PASSPHRASE)
    monkeypatch.setenv("TVDNET_KEYSTORE_SCRYPT_N", "16")


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[Reference]:
    references: list[Reference] = []

    def generate_and_keep(*args: Any, **kwargs: Any) -> Provisioning:
        provisioning = generate(*args, **kwargs)
        references.append(Reference(provisioning))
        return provisioning

    monkeypatch.setattr(_provision, "generate", generate_and_keep)
    return references


def tree(directory: Path) -> dict[Path, tuple[bytes, int]]:
    return {
        p: (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_provision_writes_the_keystore_and_the_exports(
    tmp_path: Path, env: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "tvd.toml").write_text(TVD.format(period=30.0))
    assert main(["provision", str(tmp_path / "tvd.toml"), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "move into VM 'vm-a'" in out and "delete them from this host" in out
    keystore = Keystore.load(tmp_path / "out" / "keystore.json", bytearray(PASSPHRASE.encode()))
    assert keystore.encrypted and keystore.tvd == "cli-tvd"
    for vm in ("vm-a", "vm-b"):
        assert os.stat(tmp_path / "out" / "export" / f"{vm}.keys").st_mode & 0o777 == 0o600
    before = tree(tmp_path)
    assert main(["provision", str(tmp_path / "tvd.toml"), "--out", str(tmp_path / "out")]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert tree(tmp_path) == before
    monkeypatch.setenv("TVDNET_KEYSTORE_PASSPHRASE", PASSPHRASE)  # read once, then removed
    assert (
        main(["provision", str(tmp_path / "tvd.toml"), "--out", str(tmp_path / "out"), "--force"])
        == 0
    )
    assert tree(tmp_path) != before


def test_provision_plaintext_warns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "tvd.toml").write_text(TVD.format(period=30.0))
    args = ["provision", str(tmp_path / "tvd.toml"), "--out", str(tmp_path / "out"), "--plaintext"]
    assert main(args) == 0
    assert "UNENCRYPTED" in capsys.readouterr().err
    assert '"encryption": "none"' in (tmp_path / "out" / "keystore.json").read_text()


def test_a_malformed_tvd_file_is_named(
    tmp_path: Path, env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "tvd.toml"
    path.write_text(TVD.format(period=30.0).replace('id = "vm-b"', 'id = "vm/b"'))
    assert main(["provision", str(path), "--out", str(tmp_path / "out")]) == 2
    assert f"{path}:9: members[1].id:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_run_refuses_a_keystore_others_can_read(
    tmp_path: Path, env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "tvd.toml").write_text(TVD.format(period=30.0))
    assert main(["provision", str(tmp_path / "tvd.toml"), "--out", str(tmp_path / "out")]) == 0
    keystore = tmp_path / "out" / "keystore.json"
    os.chmod(keystore, 0o644)
    code = main(["run", "--config", str(tmp_path / "tvd.toml"), "--keystore", str(keystore)])
    assert code == 2 and "lets group or others in" in capsys.readouterr().err


def test_run_refuses_a_wrong_passphrase_and_changes_nothing(
    tmp_path: Path, env: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "tvd.toml").write_text(TVD.format(period=30.0))
    assert main(["provision", str(tmp_path / "tvd.toml"), "--out", str(tmp_path / "out")]) == 0
    before = tree(tmp_path / "out")
    monkeypatch.setenv("TVDNET_KEYSTORE_PASSPHRASE", "not it")
    keystore = tmp_path / "out" / "keystore.json"
    code = main(["run", "--config", str(tmp_path / "tvd.toml"), "--keystore", str(keystore)])
    assert code == 2 and "wrong passphrase" in capsys.readouterr().err
    assert tree(tmp_path / "out") == before


async def test_status_prints_a_table(
    capsys: pytest.CaptureFixture[str], mock_clock: trio.testing.MockClock
) -> None:
    config, _ = stream_config(("vm-a", "vm-b"))
    provisioning = generate("test-tvd", ("vm-a", "vm-b"))
    with short_tmp() as tmp:
        control = tmp / "ctl" / "control.sock"
        async with (
            open_bridge(
                config, provisioning.for_bridge(1), clock=clock_at(start_of(6) + 1)
            ) as bridge,
            trio.open_nursery() as nursery,
        ):
            await nursery.start(serve_control, bridge, control)
            code = await trio.to_thread.run_sync(main, ["status", "--control", str(control)])
            json_code = await trio.to_thread.run_sync(
                main, ["status", "--json", "--control", str(control)]
            )
            nursery.cancel_scope.cancel()
    assert code == 0 and json_code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "TVD test-tvd on host local: period 6 of 1000 (10 s); keystore at period -"
    assert lines[1].split() == [
        "VM", "CONNECTED", "STATE", "ACKED", "LAG", "RESENDS", "STUCK", "LATENCY_MS", "CHANNEL"
    ]  # fmt: skip
    assert lines[2].split() == [
        "vm-a",
        "no",
        "disconnected",
        "-",
        "6",
        "0",
        "0",
        "-",
        "stream:vm-a",
    ]
    # Period 6 went out when the bridge started, 1 s into it, with no VM connected.
    assert lines[4] == (
        "Update of period 6: acked by 0 of the 0 VMs connected at its start; "
        "all 1000.0 ms after the start"
    )
    status = json.loads("\n".join(lines[5:]))
    assert status["vms"][1]["vm"] == "vm-b"
    assert status["key_updates"][-1]["t"] == 6


def test_status_without_a_bridge(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--control", str(tmp_path / "nothing.sock")]) == 2
    assert "nothing answers on" in capsys.readouterr().err


# --------------------------------------------------------------------------- the real daemon


def _connect(path: Path, process: subprocess.Popen[str]) -> socket.socket:
    deadline = time.monotonic() + 60  # a loaded machine may take long to start Python
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            return sock
        except OSError:
            sock.close()
            if process.poll() is not None:
                raise AssertionError(f"the bridge exited: {process.communicate()[1]}") from None
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_the_real_daemon_serves_a_guest_and_stops_cleanly_on_sigterm(
    env: None, captured: list[Reference], capsys: pytest.CaptureFixture[str]
) -> None:
    with short_tmp() as tmp:
        (tmp / "tvd.toml").write_text(TVD.format(period=0.5))
        assert main(["provision", str(tmp / "tvd.toml"), "--out", str(tmp / "out")]) == 0
        reference = captured[0]
        keystore_path = tmp / "out" / "keystore.json"
        schedule = Keystore.load(keystore_path, bytearray(PASSPHRASE.encode())).schedule
        command = [
            str(Path(sys.executable).parent / "tvdnet-bridge"),
            "run",
            "--config", str(tmp / "tvd.toml"),
            "--keystore", str(keystore_path),
            "--control", str(tmp / "ctl" / "control.sock"),
            "--log-level", "DEBUG",
        ]  # fmt: skip
        # The in-process provision took the passphrase out of this environment.
        environment = dict(os.environ, TVDNET_KEYSTORE_PASSPHRASE=PASSPHRASE)
        process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=environment)
        try:
            guest = _connect(tmp / "a.sock", process)
            guest.settimeout(60)
            guest.sendall(msgpack.packb({"type": "hello", "v": 1, "vm": "vm-a", "have": 0}))
            unpacker = msgpack.Unpacker(raw=False)
            updates: dict[int, dict[str, bytes]] = {}
            kinds = []
            arrivals: list[int] = []
            while len(updates) < 4:
                unpacker.feed(guest.recv(1 << 16))
                for message in unpacker:
                    kinds.append(message["type"])
                    if message["type"] == "update":
                        updates[message["t"]] = message["partials"]
                        arrivals.append(message["t"])
                        ack = {"type": "ack", "t": message["t"], "applied": 1, "missing": []}
                        guest.sendall(msgpack.packb(ack))
            assert kinds[0] == "welcome"
            # Periods only move forward (a loaded machine may delay an ack past the 1 s
            # re-send, or wake the bridge a period late: it then skips to the current one).
            assert arrivals == sorted(arrivals)
            for t, partials in updates.items():
                assert partials == {"vm-b": reference.partials("vm-a", t)["vm-b"]}
            assert main(["status", "--control", str(tmp / "ctl" / "control.sock")]) == 0
            assert "vm-a  yes" in capsys.readouterr().out
            guest.close()
            assert stop_process(process, timeout=60) == Stopped(0, killed=False)
        finally:
            stop_process(process, timeout=5)
        log = process.stderr.read() if process.stderr else ""
        if process.stderr:
            process.stderr.close()
        assert "event=stopping signal=SIGTERM" in log and "event=stopped" in log
        assert "Traceback" not in log
        keystore = Keystore.load(keystore_path, bytearray(PASSPHRASE.encode()))
        assert keystore.device_keys.period >= max(updates)
        assert schedule.period_at(time.time()) >= keystore.device_keys.period
        assert not (tmp / "ctl" / "control.sock").exists()


def test_status_that_never_comes_says_so(tmp_path: Path) -> None:
    """A bridge too busy to answer is told apart from one that refused to answer."""
    from device_bridge.errors import ControlError
    from tvdnet.control import control_request

    path = tmp_path / "slow.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(os.fspath(path))
        server.listen(1)  # accepts (the kernel does) and never answers
        with pytest.raises(ControlError, match=r"no answer within 0\.2 s \(got 0 bytes\)"):
            trio.run(lambda: control_request(path, {"command": "status"}, timeout=0.2))


class _BigStatus:
    """Stands in for a bridge whose status is as large as a thousand VMs' (about 1 MB)."""

    def __init__(self) -> None:
        self.vms = [{"vm": f"vm-{i:04d}", "padding": "x" * 900} for i in range(1000)]

    def status(self) -> _BigStatus:
        return self

    def to_json(self) -> dict[str, Any]:
        return {"vms": self.vms}


async def test_a_large_status_reaches_a_client_that_reads_slowly(
    io_clock: trio.testing.MockClock,
) -> None:
    """The 5 s write limit is per piece: a client that keeps reading, however slowly,
    gets the whole answer; the bridge only gives up on one that stops reading."""
    bridge = _BigStatus()
    with short_tmp() as tmp:
        path = tmp / "ctl" / "control.sock"
        await _read_slowly(bridge, path)


async def _read_slowly(bridge: _BigStatus, path: Path) -> None:
    reply = bytearray()
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, bridge, path)
        stream = await trio.open_unix_socket(os.fspath(path))
        await stream.send_all(b'{"command": "status"}\n')
        while not reply.endswith(b"\n"):
            # Slower than the whole answer may take, but never idle 5 s. It takes all
            # that is queued: a Unix socket is writable again only once that is drained.
            await trio.sleep(3)
            data = await stream.receive_some(1 << 22)
            assert data, f"the bridge hung up after {len(reply)} bytes"
            reply += data
        await stream.aclose()
        nursery.cancel_scope.cancel()
    answer = json.loads(reply)
    assert answer["ok"] and answer["status"]["vms"] == bridge.vms


def _live_unix_socket(path: Path) -> socket.socket:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(os.fspath(path))
    server.listen()
    return server


@pytest.mark.parametrize("taken", ["channel", "control"])
def test_a_second_bridge_on_a_live_tvd_refuses_to_start_and_leaves_its_sockets(
    env: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, taken: str
) -> None:
    """Issue 18: a second `run` with the same TVD file and another keystore re-bound the
    first bridge's key-channel sockets (and deleted them on exit); with the same control
    socket it ended in a traceback. Now: one line naming the socket, exit 2, and the
    live sockets untouched."""
    with short_tmp() as tmp:
        (tmp / "tvd.toml").write_text(TVD.format(period=30.0))
        assert main(["provision", str(tmp / "tvd.toml"), "--out", str(tmp / "two")]) == 0
        monkeypatch.setenv("TVDNET_KEYSTORE_PASSPHRASE", PASSPHRASE)  # provision took it
        live = tmp / ("a.sock" if taken == "channel" else "control.sock")
        with _live_unix_socket(live):
            before = os.stat(live).st_ino
            code = main([
                "run", "--config", str(tmp / "tvd.toml"),
                "--keystore", str(tmp / "two" / "keystore.json"),
                "--control", str(tmp / "control.sock"),
            ])  # fmt: skip
            err = capsys.readouterr().err
            assert code == 2 and "Traceback" not in err
            assert f"another process answers on {live}" in err.strip().splitlines()[-1]
            assert "event=started" not in err  # refused before it served or rewrote anything
            assert os.stat(live).st_ino == before  # the first one's socket is still there


# --------------------------------------------------------------------------- two hosts

TWO_HOSTS = """\
tvd = "cli-tvd"
period_seconds = 60.0
periods = 1000
epoch = {epoch}
hosts = ["h1", "h2"]
[[members]]
id = "vm-a"
address = "127.0.0.1:7001"
channel = "unix-listen:a.sock"
host = "h1"
[[members]]
id = "vm-b"
address = "127.0.0.1:7002"
channel = "unix-listen:b.sock"
host = "{b_host}"
[[members]]
id = "vm-c"
address = "127.0.0.1:7003"
channel = "unix-listen:c.sock"
host = "h2"
"""


def _guest_update(path: Path, process: subprocess.Popen[str], vm: str) -> dict[str, Any]:
    """Say hello on `vm`'s port as its node would; the first update the bridge sends."""
    guest = _connect(path, process)
    guest.settimeout(60)
    try:
        guest.sendall(msgpack.packb({"type": "hello", "v": 1, "vm": vm, "have": 0}))
        unpacker = msgpack.Unpacker(raw=False)
        while True:
            unpacker.feed(guest.recv(1 << 16))
            for message in unpacker:
                if message["type"] == "update":
                    ack = {"type": "ack", "t": message["t"], "applied": 2, "missing": []}
                    guest.sendall(msgpack.packb(ack))
                    return dict(message)
    finally:
        guest.close()


def test_a_member_moves_between_two_real_bridges(
    env: None, captured: list[Reference], capsys: pytest.CaptureFixture[str]
) -> None:
    with short_tmp() as tmp:
        epoch = time.time() - 1.0  # period 1 has 59 s left: the move fits in it
        for host in ("h1", "h2"):
            (tmp / host).mkdir()
            (tmp / host / "tvd.toml").write_text(TWO_HOSTS.format(epoch=epoch, b_host="h1"))
        out = tmp / "out"
        assert main(["provision", str(tmp / "h1" / "tvd.toml"), "--out", str(out)]) == 0
        assert "keystore-h2.json  -> host 'h2': 2 pairs" in capsys.readouterr().out
        (reference,) = captured
        environment = dict(os.environ, TVDNET_KEYSTORE_PASSPHRASE=PASSPHRASE)
        processes = {
            host: subprocess.Popen(
                [
                    str(Path(sys.executable).parent / "tvdnet-bridge"),
                    "run",
                    "--config",
                    str(tmp / host / "tvd.toml"),
                    "--keystore",
                    str(out / f"keystore-{host}.json"),
                    "--host",
                    host,
                    "--control",
                    str(tmp / host / "ctl" / "control.sock"),
                ],
                stderr=subprocess.PIPE,
                text=True,
                env=environment,
            )
            for host in ("h1", "h2")
        }
        control = {host: str(tmp / host / "ctl" / "control.sock") for host in ("h1", "h2")}
        try:
            for host, process in processes.items():  # both bridges up and answering
                _connect(Path(control[host]), process).close()
            update = _guest_update(tmp / "h1" / "b.sock", processes["h1"], "vm-b")
            assert update["partials"] == reference.partials("vm-b", update["t"])
            bundle = tmp / "vm-b.move"
            move_out = ["move-out", "vm-b", "--to", "h2", "--bundle", str(bundle)]
            assert main([*move_out, "--control", control["h1"]]) == 0
            assert "2 pairs sealed for host h2" in capsys.readouterr().out
            # kvm2's operator puts vm-b on h2 in h2's TVD file, then takes the bundle in.
            (tmp / "h2" / "tvd.toml").write_text(TWO_HOSTS.format(epoch=epoch, b_host="h2"))
            assert main(["move-in", str(bundle), "--control", control["h2"]]) == 0
            assert "taken in from host h1" in capsys.readouterr().out
            assert main(["move-in", str(bundle), "--control", control["h2"]]) == 2
            assert "usable once" in capsys.readouterr().err
            # vm-b's port now reaches h2's bridge: the same partials, from the other host.
            update = _guest_update(tmp / "h2" / "b.sock", processes["h2"], "vm-b")
            assert update["partials"] == reference.partials("vm-b", update["t"])
            (tmp / "h1" / "tvd.toml").write_text(TWO_HOSTS.format(epoch=epoch, b_host="h2"))
            assert main(["reload", "--control", control["h1"]]) == 0
            assert "moved away (keys erased here): vm-b" in capsys.readouterr().out
            assert main(["status", "--control", control["h1"]]) == 0
            assert "vm-a: pairs with vm-b, vm-c on h2" in capsys.readouterr().out
            for process in processes.values():
                assert stop_process(process, timeout=60) == Stopped(0, killed=False)
        finally:
            for process in processes.values():
                stop_process(process, timeout=5)
        logs = ""
        for process in processes.values():
            if process.stderr:
                logs += process.stderr.read()
                process.stderr.close()
        assert "Traceback" not in logs and "event=move-in vm=vm-b" in logs
        for key in reference.all_key_hex(5):
            assert key not in logs
        stores = {
            host: Keystore.load(out / f"keystore-{host}.json", bytearray(PASSPHRASE.encode()))
            for host in ("h1", "h2")
        }
        names = {host: {tuple(p) for p in s.device_keys.pairs} for host, s in stores.items()}
        assert names == {
            "h1": {("vm-a", "vm-b"), ("vm-a", "vm-c")},
            "h2": {("vm-a", "vm-b"), ("vm-a", "vm-c"), ("vm-b", "vm-c")},
        }

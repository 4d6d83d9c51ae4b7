"""A running bridge: its keystore across periods, its logs, its control socket, SIGHUP and
metrics (SPEC §1, §3, §6)."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from bridge_fakes import (
    SCHEDULE,
    FakeGuest,
    Reference,
    clock_at,
    short_tmp,
    start_of,
    stream_config,
)

import tvdnet.control
from device_bridge import _worker
from device_bridge._cli import _handle_signals
from device_bridge._config import load_config
from device_bridge._control import serve_control
from device_bridge._daemon import open_bridge
from device_bridge._keystore import Keystore, MemberRecord, _open
from device_bridge._metrics import start_metrics
from device_bridge.errors import ControlError
from tvdnet import WallClock, channel
from tvdnet.control import control_request
from tvdnet.core.scheme import generate

IDS = ("vm-a", "vm-b", "vm-c")
PASSPHRASE = b"run-time passphrase"


def keystore_for(path: Path, t: int) -> tuple[Keystore, Reference]:
    provisioning = generate("test-tvd", IDS)
    reference = Reference(provisioning)
    records = [
        MemberRecord(vm, f"127.0.0.1:{7000 + i}", f"stream:{vm}") for i, vm in enumerate(IDS)
    ]
    keystore = Keystore(
        path, SCHEDULE, records, provisioning.for_bridge(t), bytearray(PASSPHRASE), scrypt_n=16
    )
    keystore.save()
    provisioning.erase()
    return keystore, reference


def decrypted_payload(path: Path) -> str:
    document = json.loads(path.read_text())
    return _open(path, document, bytearray(PASSPHRASE)).decode()


async def jump_to(mock_clock: trio.testing.MockClock, clock: WallClock, wall: float) -> None:
    """Move mock time to `wall` and let every task react (no autojump: the keystore writer's
    thread must not let time run on by itself)."""
    mock_clock.jump(clock.trio_time(wall) - trio.current_time())
    await trio.testing.wait_all_tasks_blocked()


async def test_the_keystore_holds_only_the_current_device_key_after_each_period(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    keystore, reference = keystore_for(tmp_path / "keystore.json", 2)
    config, _ = stream_config(IDS)
    clock = clock_at(start_of(2) + 1.0)
    async with open_bridge(config, keystore.device_keys, keystore=keystore, clock=clock) as bridge:
        for t in (3, 4, 5):
            await jump_to(mock_clock, clock, start_of(t))
            await bridge.wait_keystore()
            assert bridge.period == t and bridge.keystore_period == t
            payload = decrypted_payload(keystore.path)
            assert json.loads(payload)["t"] == t
            for pair in keystore.device_keys.pairs:
                assert reference.dev(pair, t).hex() in payload
                for older in range(1, t):  # SPEC §3: no earlier device key survives
                    assert reference.dev(pair, older).hex() not in payload
            assert sorted(p.name for p in tmp_path.iterdir()) == [
                "keystore.json"
            ]  # no temp file either
    assert bridge.keystore_errors == 0


async def test_after_downtime_the_bridge_evolves_forward_before_anything_else(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    keystore, reference = keystore_for(tmp_path / "keystore.json", 3)
    events: list[tuple[str, object]] = []
    real_write, real_run = Keystore.write, _worker.ChannelWorker.run

    def recording_write(self: Keystore, payload: bytes, *, overwrite: bool = True) -> None:
        events.append(("keystore", json.loads(payload)["t"]))
        real_write(self, payload, overwrite=overwrite)

    async def recording_run(self: _worker.ChannelWorker) -> None:
        events.append(("serve", self.vm))
        await real_run(self)

    monkeypatch.setattr(Keystore, "write", recording_write)
    monkeypatch.setattr(_worker.ChannelWorker, "run", recording_run)
    config, ports = stream_config(IDS)
    clock = clock_at(start_of(9) + 4.0)  # the bridge was down during periods 4 to 8
    guest_stream = None
    async with open_bridge(config, keystore.device_keys, keystore=keystore, clock=clock) as bridge:
        # SPEC §1: the keystore holds dev_9 before any channel is served.
        assert events[0] == ("keystore", 9)
        assert {e[0] for e in events[1:]} <= {"serve"}
        payload = decrypted_payload(keystore.path)
        for pair in keystore.device_keys.pairs:
            assert reference.dev(pair, 9).hex() in payload
            assert reference.dev(pair, 3).hex() not in payload
        guest_stream = await ports["vm-a"].connect()
        guest = FakeGuest("vm-a", guest_stream, clock)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(guest.run)
            await guest.hello()
            (update,) = await guest.wait_for(channel.Update)
            assert update.t == 9
            assert {p: bytes(k) for p, k in update.partials.items()} == reference.partials(
                "vm-a", 9
            )
            nursery.cancel_scope.cancel()
        assert bridge.period == 9


async def test_logs_never_carry_key_material(
    tmp_path: Path, mock_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    keystore, reference = keystore_for(tmp_path / "keystore.json", 2)
    config, ports = stream_config(IDS)
    clock = clock_at(start_of(2) + 1.0)
    async with open_bridge(config, keystore.device_keys, keystore=keystore, clock=clock) as bridge:
        guests = [FakeGuest(vm, await ports[vm].connect(), clock) for vm in IDS]
        async with trio.open_nursery() as nursery:
            for guest in guests:
                nursery.start_soon(guest.run)
                await guest.hello()
            await guests[0].hello("vm-b")  # wrong-vm
            await guests[1].send_bytes(b"\xc1 garbage")  # bad-message
            for t in (3, 4):
                await jump_to(mock_clock, clock, start_of(t))
                await bridge.wait_keystore()
            await bridge.reload(type(config).for_schedule("test-tvd", SCHEDULE, config.members[:2]))
            await jump_to(mock_clock, clock, start_of(5))
            await bridge.wait_keystore()
            texts = [caplog.text, repr(bridge), repr(bridge.status()), repr(keystore)]
            nursery.cancel_scope.cancel()
    assert "event=acked vm=vm-c t=2" in caplog.text and "event=refused vm=vm-a" in caplog.text
    assert "event=member-removed vm=vm-c" in caplog.text
    secrets = reference.all_key_hex(5) | {PASSPHRASE.decode(), PASSPHRASE.hex()}
    leaked = [secret for secret in secrets for text in texts if secret in text]
    assert leaked == []


# --------------------------------------------------------------------------- control socket

TVD_FILE = """\
tvd = "test-tvd"
period_seconds = 10.0
periods = 1000
epoch = {epoch}
[[members]]
id = "vm-a"
address = "127.0.0.1:7000"
channel = "unix-listen:a.sock"
[[members]]
id = "vm-b"
address = "127.0.0.1:7001"
channel = "unix-listen:b.sock"
[[members]]
id = "vm-c"
address = "127.0.0.1:7002"
channel = "unix-listen:c.sock"
"""


def without_vm_c(text: str) -> str:
    return text.split('[[members]]\nid = "vm-c"')[0]


async def ask(path: Path, command: str) -> dict[str, Any]:
    return await control_request(path, {"command": command})


async def test_status_and_reload_over_the_control_socket(
    mock_clock: trio.testing.MockClock,
) -> None:
    # Mock time stands still (no autojump): the status must be read in period 3, not
    # after time jumped ahead while the loop was idle.
    with short_tmp() as tmp:
        tvd_file = tmp / "tvd.toml"
        tvd_file.write_text(TVD_FILE.format(epoch=SCHEDULE.epoch))
        config = load_config(tvd_file)
        provisioning = generate("test-tvd", IDS)
        clock = clock_at(start_of(3) + 1.0)
        control = tmp / "ctl" / "control.sock"
        async with (
            open_bridge(config, provisioning.for_bridge(1), clock=clock) as bridge,
            trio.open_nursery() as nursery,
        ):
            await nursery.start(serve_control, bridge, control)
            await trio.testing.wait_all_tasks_blocked()  # the VMs' ports are listening
            assert os.stat(control).st_mode & 0o777 == 0o600
            assert os.stat(control.parent).st_mode & 0o777 == 0o700
            stream = await trio.open_unix_socket(str(tmp / "a.sock"))
            guest = FakeGuest("vm-a", stream, clock)
            nursery.start_soon(guest.run)
            await guest.hello()
            await bridge.wait_acked("vm-a", 3)

            answer = await ask(control, "status")
            assert answer["ok"] is True
            status = answer["status"]
            assert (status["tvd"], status["period"], status["periods"]) == ("test-tvd", 3, 1000)
            rows = {vm["vm"]: vm for vm in status["vms"]}
            assert rows["vm-a"]["connected"] is True and rows["vm-a"]["acked"] == 3
            assert rows["vm-a"]["lag"] == 0 and rows["vm-a"]["last_latency"] == 0.0
            assert rows["vm-b"]["connected"] is False and rows["vm-b"]["lag"] == 3
            # Period 3 went out at the start, 1 s into it, before any VM was connected.
            assert status["key_updates"] == [
                {"t": 3, "vms": 0, "acked": 0, "pushed_ms": 1000.0, "written_ms": 1000.0,
                 "last_ack_ms": None,
                 "all_acked_ms": 1000.0}
            ]  # fmt: skip

            tvd_file.write_text(without_vm_c(tvd_file.read_text()))
            answer = await ask(control, "reload")
            assert answer == {
                "ok": True,
                "reload": {
                    "removed": ["vm-c"],
                    "suspended": [],
                    "resumed": [],
                    "told": ["vm-a", "vm-b"],
                    "moved": [],
                    "moved_away": [],
                    "changes": [],
                },
            }
            assert bridge.vms == ("vm-a", "vm-b")
            await trio.testing.wait_all_tasks_blocked()
            assert not (tmp / "c.sock").exists()  # its port is closed
            (members,) = await guest.wait_for(channel.Members)
            assert [m.id for m in members.members] == ["vm-a", "vm-b"]

            tvd_file.write_text(TVD_FILE.format(epoch=SCHEDULE.epoch))  # vm-c again: new
            answer = await ask(control, "reload")
            assert answer["ok"] is False and "provision" in answer["error"]
            assert bridge.vms == ("vm-a", "vm-b")
            assert (await ask(control, "nonsense"))["ok"] is False
            nursery.cancel_scope.cancel()
        assert not control.exists()


async def test_the_control_socket_is_owner_only(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    config, _ = stream_config(IDS)
    provisioning = generate("test-tvd", IDS)
    with short_tmp() as tmp:
        async with open_bridge(
            config, provisioning.for_bridge(1), clock=clock_at(start_of(2))
        ) as bridge:
            shared = tmp / "shared"
            shared.mkdir()
            os.chmod(shared, 0o777)
            with pytest.raises(ControlError, match="written by others"):
                await serve_control(bridge, shared / "control.sock")
            monkeypatch.setattr(tvdnet.control, "_peer_uid", lambda sock: os.getuid() + 4242)
            async with trio.open_nursery() as nursery:
                await nursery.start(serve_control, bridge, tmp / "ctl" / "control.sock")
                with pytest.raises(ControlError, match="without an answer"):
                    await ask(tmp / "ctl" / "control.sock", "status")
                with pytest.raises(ControlError, match="another process answers"):
                    await serve_control(bridge, tmp / "ctl" / "control.sock")
                nursery.cancel_scope.cancel()
            os.rmdir(tmp / "ctl")
            os.rmdir(shared)


async def test_sighup_reloads_and_sigterm_stops(autojump_clock: trio.testing.MockClock) -> None:
    with short_tmp() as tmp:
        tvd_file = tmp / "tvd.toml"
        tvd_file.write_text(TVD_FILE.format(epoch=SCHEDULE.epoch))
        provisioning = generate("test-tvd", IDS)
        keys = provisioning.for_bridge(1)
        clock = clock_at(start_of(3) + 1.0)
        async with open_bridge(load_config(tvd_file), keys, clock=clock) as bridge:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_handle_signals, bridge, nursery.cancel_scope)
                await trio.testing.wait_all_tasks_blocked()  # the handlers are installed
                tvd_file.write_text(without_vm_c(tvd_file.read_text()))
                os.kill(os.getpid(), signal.SIGHUP)
                # The signal and the reload's file read (a thread) take real time, during
                # which an autojump clock would race ahead: wait by yielding, not sleeping,
                # and bound the wait in real seconds.
                give_up = time.monotonic() + 30
                while "vm-c" in bridge.vms:
                    assert time.monotonic() < give_up, "SIGHUP did not reload in 30 s"
                    await trio.sleep(0)
                assert all("vm-c" not in pair for pair in keys.pairs)
                os.kill(os.getpid(), signal.SIGTERM)
            assert nursery.cancel_scope.cancel_called


async def test_metrics_on_loopback(mock_clock: trio.testing.MockClock) -> None:
    config, ports = stream_config(IDS)
    provisioning = generate("test-tvd", IDS)
    clock = clock_at(start_of(4) + 1.0)
    async with open_bridge(config, provisioning.for_bridge(1), clock=clock) as bridge:
        guest = FakeGuest("vm-a", await ports["vm-a"].connect(), clock)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(guest.run)
            await guest.hello()
            await bridge.wait_acked("vm-a", 4)
            # Period 5 begins with vm-a connected: the one VM it waits for acks at once.
            mock_clock.jump(clock.trio_time(start_of(5)) - trio.current_time())
            await bridge.wait_acked("vm-a", 5)
            metrics = start_metrics(bridge, 0)
            try:
                assert metrics.server.server_address[0] == "127.0.0.1"
                url = f"http://127.0.0.1:{metrics.port}/metrics"
                text = await trio.to_thread.run_sync(fetch, url)
            finally:
                await trio.to_thread.run_sync(metrics.close)
            nursery.cancel_scope.cancel()
    for line in (
        "tvdnet_bridge_period 5.0",
        "tvdnet_bridge_key_update_seconds 0.0",
        'tvdnet_bridge_vm_connected{vm="vm-a"} 1.0',
        'tvdnet_bridge_vm_connected{vm="vm-b"} 0.0',
        'tvdnet_bridge_vm_acked_period{vm="vm-a"} 5.0',
        'tvdnet_bridge_vm_lag_periods{vm="vm-b"} 5.0',
        'tvdnet_bridge_vm_resends_total{vm="vm-a"} 0.0',
        'tvdnet_bridge_vm_ack_latency_seconds{vm="vm-a"} 0.0',
    ):
        assert line in text.splitlines()


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as response:
        return str(response.read().decode())


def test_an_answer_cut_short_is_named_as_such() -> None:
    # A bridge that gives up writing a long status (it is overloaded) leaves half a line.
    with short_tmp() as tmp:
        path = tmp / "control.sock"
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(path))
        server.listen(1)

        def answer_half() -> None:
            conn, _ = server.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(b'{"ok": true, "status": {"vms": [')

        thread = threading.Thread(target=answer_half)
        thread.start()
        try:
            with pytest.raises(ControlError, match=r"cut short after 32 bytes.*overloaded"):
                trio.run(lambda: control_request(path, {"command": "status"}, timeout=30))
        finally:
            thread.join()
            server.close()

"""Approach I (SPEC §5): UPDATE.MP in an ISO 9660 image on tmpfs, swapped in over QMP."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from bridge_fakes import SCHEDULE, Reference, clock_at, short_tmp, start_of, stream_config

from device_bridge._config import MemberConfig, TvdConfig
from device_bridge._daemon import open_bridge
from device_bridge._iso import (
    build_update_image,
    check_tmpfs,
    open_qmp,
    read_update_from_iso,
    write_update_image,
)
from device_bridge._transports import CdromSwap
from device_bridge.errors import IsoError, QmpError
from tvdnet import Session, channel
from tvdnet.core.agent import KeyAgent
from tvdnet.core.scheme import generate

UPDATE = channel.encode(channel.Update(7, {"vm-b": bytearray(range(32))}))


@pytest.fixture
def shm() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="tvdnet-test-", dir="/dev/shm"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory)


def test_an_image_holds_update_mp_and_reads_back() -> None:
    image = build_update_image(UPDATE)
    assert len(image) % 2048 == 0  # ISO 9660 sectors
    assert read_update_from_iso(image) == UPDATE
    assert channel.decode(read_update_from_iso(image)) == channel.decode(UPDATE)


def test_images_are_written_on_tmpfs_only(shm: Path, tmp_path: Path) -> None:
    path = write_update_image(shm / "images", "vm-a.7.iso", UPDATE)
    assert path == shm / "images" / "vm-a.7.iso"
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert os.stat(shm / "images").st_mode & 0o777 == 0o700
    assert read_update_from_iso(path) == UPDATE
    assert sorted(p.name for p in (shm / "images").iterdir()) == ["vm-a.7.iso"]  # no temp left
    with pytest.raises(IsoError, match="not tmpfs"):
        write_update_image(tmp_path, "vm-a.7.iso", UPDATE)  # /tmp here is a disk
    assert list(tmp_path.iterdir()) == []


def test_the_tmpfs_check_reads_the_mount_table(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "22 1 0:21 / / rw - ext4 /dev/vda rw\n"
        "25 22 0:23 / /dev/shm rw - tmpfs tmpfs rw\n"
        "26 22 0:24 / /run/my\\040dir rw - tmpfs tmpfs rw\n"
        "27 25 0:25 / /dev/shm/disk rw - ext4 /dev/vdb rw\n"
    )
    check_tmpfs(Path("/dev/shm/tvdnet"), mountinfo)
    check_tmpfs(Path("/run/my dir/images"), mountinfo)
    with pytest.raises(IsoError, match="on ext4, not tmpfs"):
        check_tmpfs(Path("/var/lib/tvdnet"), mountinfo)
    with pytest.raises(IsoError, match="on ext4, not tmpfs"):
        check_tmpfs(Path("/dev/shm/disk/images"), mountinfo)  # a disk mounted inside tmpfs


def test_a_directory_others_can_enter_is_refused(shm: Path) -> None:
    loose = shm / "loose"
    loose.mkdir()
    os.chmod(loose, 0o755)
    with pytest.raises(IsoError, match="mode 0700"):
        write_update_image(loose, "x.iso", UPDATE)


@pytest.mark.parametrize("data", [b"", b"not an image at all" * 200, bytes(2048 * 20)])
def test_anything_else_is_not_an_update_image(data: bytes) -> None:
    with pytest.raises(IsoError, match="not an update image"):
        read_update_from_iso(data)


# --------------------------------------------------------------------------- QMP


@dataclass
class FakeQemu:
    """A QMP server on a Unix socket, enough to swap a CD-ROM medium."""

    path: Path
    swaps: list[dict[str, Any]] = field(default_factory=list)
    images: list[bytes] = field(default_factory=list)  # UPDATE.MP of each swapped image
    fail_with: str | None = None

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(str(self.path))
        sock.listen(4)
        async with trio.SocketListener(sock) as listener:
            task_status.started()
            async with trio.open_nursery() as nursery:
                while True:
                    nursery.start_soon(self._session, await listener.accept())

    async def _session(self, stream: trio.SocketStream) -> None:
        async with stream:
            greeting = {"QMP": {"version": {"qemu": {"major": 7}}, "capabilities": []}}
            await stream.send_all(json.dumps(greeting).encode() + b"\r\n")
            buffer = b""
            negotiated = False
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buffer += data
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    request = json.loads(line)
                    reply: dict[str, Any] = {"return": {}, "id": request.get("id")}
                    if request["execute"] == "qmp_capabilities":
                        negotiated = True
                    elif not negotiated:
                        reply = {"error": {"class": "CommandNotFound", "desc": "no caps"}}
                    elif request["execute"] == "blockdev-change-medium":
                        arguments = request["arguments"]
                        self.swaps.append(arguments)
                        if self.fail_with:
                            reply = {"error": {"class": "GenericError", "desc": self.fail_with}}
                        else:
                            # QEMU opens the file during the command: read it now.
                            self.images.append(read_update_from_iso(Path(arguments["filename"])))
                        event = {"event": "DEVICE_TRAY_MOVED", "data": {"tray-open": True}}
                        await stream.send_all(json.dumps(event).encode() + b"\r\n")
                    reply["id"] = request.get("id")
                    await stream.send_all(json.dumps(reply).encode() + b"\r\n")


async def test_the_qmp_client_swaps_a_medium(shm: Path) -> None:
    with short_tmp() as tmp:
        qemu = FakeQemu(tmp / "qmp.sock")
        image = write_update_image(shm, "a.iso", UPDATE)
        async with trio.open_nursery() as nursery:
            await nursery.start(qemu.serve)
            async with open_qmp(qemu.path) as qmp:
                await qmp.change_medium("cdrom0", image)
                await qmp.change_medium("cdrom0", image, force=True)
                qemu.fail_with = "Device 'cdrom9' not found"
                with pytest.raises(QmpError, match=r"cdrom9' not found.*GenericError"):
                    await qmp.change_medium("cdrom9", image)
            nursery.cancel_scope.cancel()
        assert qemu.swaps[0] == {"id": "cdrom0", "filename": str(image), "format": "raw"}
        assert qemu.swaps[1] == {**qemu.swaps[0], "force": True}
        assert qemu.images == [UPDATE, UPDATE]
    with pytest.raises(QmpError, match="cannot connect"):
        async with open_qmp(shm / "nothing.sock"):
            pass


async def test_a_monitor_that_does_not_speak_qmp_is_refused() -> None:
    with short_tmp() as tmp:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(str(tmp / "qmp.sock"))
        sock.listen(1)

        async def answer_nonsense(listener: trio.SocketListener) -> None:
            stream = await listener.accept()
            await stream.send_all(b"220 smtp.example ESMTP\r\n")
            await stream.aclose()

        async with trio.SocketListener(sock) as listener, trio.open_nursery() as nursery:
            nursery.start_soon(answer_nonsense, listener)
            with pytest.raises(QmpError, match="not JSON"):
                async with open_qmp(tmp / "qmp.sock"):
                    pass


async def test_the_bridge_swaps_each_periods_image_and_deletes_it(
    shm: Path, autojump_clock: trio.testing.MockClock
) -> None:
    ids = ("vm-a", "vm-b", "vm-c")
    provisioning = generate("test-tvd", ids)
    reference = Reference(provisioning)
    session = Session(provisioning.for_vm("vm-a"), SCHEDULE)
    agent = KeyAgent(session, SCHEDULE)
    with short_tmp() as tmp:
        qemu = FakeQemu(tmp / "qmp.sock")
        config, _ = stream_config(ids)
        members = (
            MemberConfig("vm-a", "127.0.0.1:7000", CdromSwap(qemu.path)),
            *config.members[1:],
        )
        config = TvdConfig.for_schedule("test-tvd", SCHEDULE, members)
        clock = clock_at(start_of(3) + 1.0)
        async with trio.open_nursery() as nursery:
            await nursery.start(qemu.serve)
            async with open_bridge(
                config, provisioning.for_bridge(1), clock=clock, iso_dir=shm
            ) as bridge:
                await bridge.wait_acked("vm-a", 3)
                await trio.sleep_until(clock.trio_time(start_of(4) + 1.0))
                await bridge.wait_acked("vm-a", 4)
                status = bridge.status().vms[0]
                assert (status.acked, status.state, status.connected) == (4, "cdrom", True)
                # A swap counts as the ack of approach I: period 4 waited for vm-a only
                # (the stream ports are not connected) and was complete once swapped in.
                rollout = bridge.status().key_updates[-1]
                assert (rollout.t, rollout.vms, rollout.acked) == (4, 1, 1)
                assert rollout.all_acked_after is not None
            nursery.cancel_scope.cancel()
        # Forced: a guest reading the drive locks its tray, and must not hold updates up.
        assert [(swap["id"], swap.get("force")) for swap in qemu.swaps] == [("cdrom0", True)] * 2
        assert list(shm.iterdir()) == []  # SPEC §5: deleted after the swap
        for t, data in zip((3, 4), qemu.images, strict=True):
            update = channel.decode(data)
            assert isinstance(update, channel.Update) and update.t == t
            assert {p: bytes(k) for p, k in update.partials.items()} == reference.partials(
                "vm-a", t
            )
            agent.apply_image(data, start_of(t) + 1.5)  # what the guest does with it
            assert session.key_state("vm-b").period == t and session.key_state("vm-c").has_key


async def test_a_failed_swap_is_retried_until_its_period_ends(
    shm: Path, autojump_clock: trio.testing.MockClock
) -> None:
    provisioning = generate("test-tvd", ("vm-a", "vm-b"))
    with short_tmp() as tmp:
        qemu = FakeQemu(tmp / "qmp.sock", fail_with="Tray of device 'cdrom0' is locked")
        config, _ = stream_config(("vm-a", "vm-b"))
        members = (MemberConfig("vm-a", "127.0.0.1:7000", CdromSwap(qemu.path)), config.members[1])
        config = TvdConfig.for_schedule("test-tvd", SCHEDULE, members)
        clock = clock_at(start_of(3))
        async with trio.open_nursery() as nursery:
            await nursery.start(qemu.serve)
            async with open_bridge(
                config, provisioning.for_bridge(1), clock=clock, iso_dir=shm
            ) as bridge:
                await trio.sleep_until(clock.trio_time(start_of(4) - 0.01))
                status = bridge.status().vms[0]
                assert status.acked == 0 and not status.connected
            nursery.cancel_scope.cancel()
        # At 0, 1, 3, 7 s; the next (15 s) would be after the end of period 3.
        assert len(qemu.swaps) == 4 and status.resends == 4
        assert list(shm.iterdir()) == []  # failed images are deleted too

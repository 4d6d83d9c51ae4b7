"""The bridge daemon against fake guests over every transport, in mock time (SPEC §3, §5).

Every expected partial is recomputed from the provisioning output with the SPEC §3
formulas (`bridge_fakes.Reference`), never taken from the bridge.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import socket
import tty
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trio.testing
from bridge_fakes import (
    SCHEDULE,
    FakeGuest,
    Reference,
    clock_at,
    partials_bytes,
    short_tmp,
    start_of,
    stream_config,
)

from device_bridge import _transports, _worker
from device_bridge._config import MemberConfig, TvdConfig
from device_bridge._daemon import Bridge, open_bridge
from device_bridge._transports import (
    ChannelSpec,
    SerialLine,
    StreamPort,
    TcpConnect,
    TcpListen,
    UnixConnect,
    UnixListen,
)
from device_bridge.errors import ReloadError, TransportRefused
from tvdnet import WallClock, channel
from tvdnet.core.scheme import Pair, Schedule, generate
from tvdnet.ports import open_serial
from tvdnet_tools.local import free_port

IDS = ("vm-a", "vm-b", "vm-c")


@dataclass
class Link:
    """How a fake guest reaches vm-a's port over one transport."""

    spec: ChannelSpec
    connect: Callable[[], Awaitable[trio.abc.Stream]]
    hangs_up: bool  # False for a pty: the bridge resets the channel instead of closing


async def _retry(opener: Callable[[], Awaitable[trio.abc.Stream]]) -> trio.abc.Stream:
    while True:  # the bridge may not be listening yet
        try:
            return await opener()
        except OSError:
            await trio.sleep(0.05)


def raw_pty() -> tuple[int, int]:
    """A pty in raw mode from the start, as QEMU's `-chardev pty` makes it: bytes that the
    guest writes before the bridge opens the pty must not be echoed or translated."""
    master, slave = os.openpty()
    tty.setraw(slave)
    return master, slave


@asynccontextmanager
async def link(kind: str) -> AsyncIterator[Link]:
    with short_tmp() as tmp:
        if kind == "stream":
            port = StreamPort("vm-a")
            yield Link(port, port.connect, True)
        elif kind == "memory":
            port = StreamPort("vm-a")

            async def attach() -> trio.abc.Stream:
                bridge_end, guest_end = trio.testing.memory_stream_pair()
                await port.attach(bridge_end)
                return guest_end

            yield Link(port, attach, True)
        elif kind == "unix":  # QEMU server=on: the guest side listens, the bridge connects
            sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            await sock.bind(str(tmp / "a.sock"))
            sock.listen(1)
            async with trio.SocketListener(sock) as listener:
                yield Link(UnixConnect(tmp / "a.sock"), listener.accept, True)
        elif kind == "unix-listen":
            path = tmp / "a.sock"
            yield Link(
                UnixListen(path), lambda: _retry(lambda: trio.open_unix_socket(str(path))), True
            )
        elif kind == "tcp":
            port_number = free_port()
            yield Link(
                TcpListen("127.0.0.1", port_number),
                lambda: _retry(lambda: trio.open_tcp_stream("127.0.0.1", port_number)),
                True,
            )
        elif kind == "tcp-connect":
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            async with listeners[0] as listener:
                port_number = listener.socket.getsockname()[1]
                yield Link(TcpConnect("127.0.0.1", port_number), listener.accept, True)
        elif kind == "pty":
            master, slave = raw_pty()
            try:

                async def guest_end() -> trio.abc.Stream:
                    return trio.lowlevel.FdStream(os.dup(master))

                yield Link(SerialLine("pty", Path(os.ttyname(slave))), guest_end, False)
            finally:
                os.close(master)
                os.close(slave)
        else:
            raise AssertionError(kind)


def tvd_with(
    spec: ChannelSpec, ids: tuple[str, ...] = IDS
) -> tuple[TvdConfig, dict[str, StreamPort]]:
    """vm-a on `spec`, the others on stream ports."""
    config, ports = stream_config(ids)
    members = (MemberConfig("vm-a", config.members[0].address, spec), *config.members[1:])
    return TvdConfig.for_schedule(config.tvd, SCHEDULE, members), ports


KINDS = ["stream", "memory", "unix", "unix-listen", "tcp", "tcp-connect", "pty"]


@pytest.mark.parametrize("kind", KINDS)
async def test_updates_every_period_over_every_transport(
    kind: str, io_clock: trio.testing.MockClock
) -> None:
    provisioning = generate("test-tvd", IDS)
    reference = Reference(provisioning)
    clock = clock_at(start_of(3) + 2.5)
    async with link(kind) as guest_link:
        config, _ = tvd_with(guest_link.spec)
        async with (
            open_bridge(
                config, provisioning.for_bridge(1), clock=clock, allow_dev_transports=True
            ) as bridge,
            trio.open_nursery() as nursery,
        ):
            guest = FakeGuest("vm-a", await guest_link.connect(), clock)
            nursery.start_soon(guest.run)
            await guest.hello_until_welcome()
            (welcome,) = guest.of(channel.Welcome)
            assert welcome == channel.Welcome(
                "test-tvd",
                "vm-a",
                SCHEDULE,
                tuple(channel.Member(m.id, m.address) for m in config.members),
            )
            updates = await guest.wait_for(channel.Update, 3)
            assert [u.t for u in updates] == [3, 4, 5]
            for update in updates:
                assert partials_bytes(update) == reference.partials("vm-a", update.t)
            arrivals = [r.at for r in guest.updates()]
            assert arrivals[1:] == [start_of(4), start_of(5)]  # at the period start exactly
            await bridge.wait_acked("vm-a", 5)
            status = bridge.status().vms[0]
            assert (status.vm, status.connected, status.acked, status.lag) == ("vm-a", True, 5, 0)
            assert status.resends == 0 and status.last_latency == 0.0

            # The VM goes away and comes back (reboot, QEMU restart): welcome and the
            # current update again, though it was acknowledged.
            if guest_link.hangs_up:
                await guest.stream.aclose()
                guest = FakeGuest("vm-a", await guest_link.connect(), clock)
                nursery.start_soon(guest.run)
            else:
                guest.received.clear()
                await guest.stream.send_all(b"\xc1")  # a pty cannot hang up: garbage resets it
                assert await guest.wait_for(channel.Error) == [channel.Error("bad-message")]
            await guest.hello(have=5)
            await guest.wait_for(channel.Welcome)
            (again,) = await guest.wait_for(channel.Update)
            assert again.t == 5 and partials_bytes(again) == reference.partials("vm-a", 5)
            assert bridge.status().vms[0].connections == (2 if guest_link.hangs_up else 1)
            nursery.cancel_scope.cancel()


async def test_an_unacknowledged_update_is_resent_with_backoff_until_its_period_ends(
    autojump_clock: trio.testing.MockClock,
) -> None:
    provisioning = generate("test-tvd", IDS)
    config, ports = stream_config(IDS)
    clock = clock_at(start_of(2) - 0.5)
    async with open_bridge(config, provisioning.for_bridge(1), clock=clock) as bridge:
        guest = FakeGuest("vm-a", await ports["vm-a"].connect(), clock, ack=False)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(guest.run)
            await guest.hello()
            await trio.sleep_until(clock.trio_time(start_of(3) + 0.5))
            sent = [(r.message.t, round(r.at - start_of(2), 6)) for r in guest.updates()]
            # t=1 at hello; its period ends before a re-send is due. Then t=2 at its start
            # and 1, 2, 4 s later; the next would fall after the end of period 2 (10 s).
            assert sent == [(1, -0.5), (2, 0.0), (2, 1.0), (2, 3.0), (2, 7.0), (3, 10.0)]
            assert bridge.status().vms[0].resends == 3
            # An ack stops the re-sends of period 3.
            await guest.send(channel.Ack(3, 2, ()))
            await trio.sleep_until(clock.trio_time(start_of(4) - 0.1))
            assert [r.message.t for r in guest.updates()][-1] == 3
            assert len([r for r in guest.updates() if r.message.t == 3]) == 1
            nursery.cancel_scope.cancel()


async def test_an_update_written_at_once_is_still_resent_when_not_acknowledged(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The period start's update goes straight to the port's descriptor (no writer task
    # step); its re-send deadline must still wake the writer, which sat idle with none.
    provisioning = generate("test-tvd", IDS)
    config, ports = stream_config(IDS)
    clock = clock_at(start_of(2) - 0.5)
    async with open_bridge(config, provisioning.for_bridge(1), clock=clock) as bridge:
        guest = FakeGuest("vm-a", await ports["vm-a"].connect(), clock)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(guest.run)
            await guest.hello()
            await bridge.wait_acked("vm-a", 1)  # nothing pending: the writer waits for ever
            guest.ack = False
            await trio.sleep_until(clock.trio_time(start_of(2) + 7.5))
            sent = [(r.message.t, round(r.at - start_of(2), 6)) for r in guest.updates()]
            assert sent == [(1, -0.5), (2, 0.0), (2, 1.0), (2, 3.0), (2, 7.0)]
            nursery.cancel_scope.cancel()


async def test_each_period_records_its_start_to_the_last_connected_vms_ack(
    autojump_clock: trio.testing.MockClock,
) -> None:
    provisioning = generate("test-tvd", IDS)
    config, ports = stream_config(IDS)
    clock = clock_at(start_of(2) - 1.0)
    async with (
        open_bridge(config, provisioning.for_bridge(1), clock=clock) as bridge,
        trio.open_nursery() as nursery,
    ):
        guests = {
            vm: FakeGuest(vm, await ports[vm].connect(), clock, ack=vm != "vm-c") for vm in IDS
        }
        for guest in guests.values():
            nursery.start_soon(guest.run)
            await guest.hello()
        # Period 2: vm-a and vm-b ack at once, vm-c 250 ms after the period start.
        await trio.sleep_until(clock.trio_time(start_of(2) + 0.25))
        await guests["vm-c"].send(channel.Ack(2, 2, ()))
        await bridge.wait_acked("vm-c", 2)
        # Period 3: vm-c goes away before acking it: the period never completes.
        await trio.sleep_until(clock.trio_time(start_of(3) + 0.5))
        await guests["vm-c"].stream.aclose()
        # Period 4: only the two connected VMs are waited for.
        await trio.sleep_until(clock.trio_time(start_of(4) + 1.0))
        records = [r.to_json() for r in bridge.status().key_updates]
        assert records == [
            # Period 1 went out at the bridge's start, 9 s into it, to nobody yet.
            {"t": 1, "vms": 0, "acked": 0, "pushed_ms": 9000.0, "written_ms": 9000.0,
             "last_ack_ms": None, "all_acked_ms": 9000.0},
            {"t": 2, "vms": 3, "acked": 3, "pushed_ms": 0.0, "written_ms": 0.0,
             "last_ack_ms": 250.0, "all_acked_ms": 250.0},
            {"t": 3, "vms": 3, "acked": 2, "pushed_ms": 0.0, "written_ms": 0.0,
             "last_ack_ms": 0.0, "all_acked_ms": None},
            {"t": 4, "vms": 2, "acked": 2, "pushed_ms": 0.0, "written_ms": 0.0,
             "last_ack_ms": 0.0, "all_acked_ms": 0.0},
        ]  # fmt: skip
        assert bridge.status().to_json()["key_updates"] == records
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("kind", ["stream", "unix-listen", "pty"])
async def test_a_hello_naming_another_vm_gets_wrong_vm_and_nothing_else(
    kind: str, io_clock: trio.testing.MockClock
) -> None:
    provisioning = generate("test-tvd", IDS)
    clock = clock_at(start_of(2) + 1)
    async with link(kind) as guest_link:
        config, _ = tvd_with(guest_link.spec)
        async with open_bridge(config, provisioning.for_bridge(1), clock=clock) as bridge:
            stream = await guest_link.connect()
            guest = FakeGuest("vm-a", stream, clock)
            while not bridge.status().vms[0].connected:  # a pty drops what comes before
                await trio.sleep(0.1)
            await guest.hello("vm-b")
            if guest_link.hangs_up:
                with trio.fail_after(5):
                    await guest.run()  # returns at EOF: the bridge hung up
                assert [r.message for r in guest.received] == [channel.Error("wrong-vm")]
                stream = await guest_link.connect()  # the VM may try again
                guest = FakeGuest("vm-a", stream, clock)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(guest.run)
                if not guest_link.hangs_up:
                    assert await guest.wait_for(channel.Error) == [channel.Error("wrong-vm")]
                    await trio.sleep(0.5)
                    assert guest.of(channel.Welcome) == []  # nothing else
                await guest.hello()
                await guest.wait_for(channel.Update)
                await bridge.wait_acked("vm-a", 2)
                nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    "garbage",
    [
        b"\xc1\xc1\xc1",  # never valid msgpack
        channel.encode(channel.Update(2, {})),  # a message only a bridge may send
        b"\x81\xa4type\xa5hello",  # a hello without its fields
        b"\xc6" + (2 << 20).to_bytes(4, "big") + bytes(1 << 20) + bytes(64 << 10),  # oversized
    ],
    ids=["undecodable", "wrong-direction", "incomplete-hello", "oversized"],
)
async def test_garbage_or_an_oversized_message_is_bad_message_and_a_disconnect(
    garbage: bytes, autojump_clock: trio.testing.MockClock
) -> None:
    provisioning = generate("test-tvd", IDS)
    config, ports = stream_config(IDS)
    clock = clock_at(start_of(2) + 1)
    async with open_bridge(config, provisioning.for_bridge(1), clock=clock) as bridge:
        guest = FakeGuest("vm-a", await ports["vm-a"].connect(), clock)

        async def send_garbage() -> None:
            try:
                await guest.stream.send_all(garbage)
            except trio.BrokenResourceError:
                pass  # the bridge hung up before reading all of it

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_garbage)
            with trio.fail_after(5):
                await guest.run()  # until EOF
        assert [r.message for r in guest.received] == [channel.Error("bad-message")]
        # The VM may reconnect and is served as if nothing had happened.
        guest = FakeGuest("vm-a", await ports["vm-a"].connect(), clock)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(guest.run)
            await guest.hello()
            await guest.wait_for(channel.Update)
            await bridge.wait_acked("vm-a", 2)
            nursery.cancel_scope.cancel()


async def test_200_vms_at_once_while_one_never_reads(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A star around vm-001, the paper's 1 : N case: vm-001 gets 199 partials, the others one.
    ids = tuple(f"vm-{i:03d}" for i in range(200))
    pairs = [("vm-001", vm) for vm in ids if vm != "vm-001"]
    provisioning = generate("big", ids, pairs=pairs)
    reference = Reference(provisioning)
    config, ports = stream_config(ids, tvd="big", pairs="star:vm-001")
    clock = clock_at(start_of(2) - 1.0)
    async with open_bridge(config, provisioning.for_bridge(1), clock=clock) as bridge:
        async with trio.open_nursery() as nursery:
            # vm-000 asks and asks and never reads. Hellos read together get one answer
            # (they supersede what is unsent), so it asks a thousand times a second; the
            # answers fill the socket and the bridge's writes to it block.
            stuck = await ports["vm-000"].connect()
            nursery.start_soon(_ask_and_never_read, stuck, "vm-000")
            guests = []
            for vm in ids[1:]:
                guest = FakeGuest(vm, await ports[vm].connect(), clock)
                guests.append(guest)
                nursery.start_soon(guest.run)
                await guest.hello()
            await trio.sleep_until(clock.trio_time(start_of(4) + 1.0))
            for guest in guests:
                updates = guest.updates()
                assert [u.message.t for u in updates] == [1, 2, 3, 4]
                for update in updates[1:]:  # every period start: within 100 ms
                    assert update.at - start_of(update.message.t) < 0.1
                    assert partials_bytes(update.message) == reference.partials(
                        guest.vm, update.message.t
                    )
            assert len(guests[0].updates()[-1].message.partials) == 199  # the hub
            stuck_status = next(s for s in bridge.status().vms if s.vm == "vm-000")
            assert stuck_status.stuck >= 1 and not stuck_status.connected
            assert all(s.acked == 4 for s in bridge.status().vms if s.vm != "vm-000")
            # Periods 3 and 4 went to the 199 VMs still connected (vm-000 was dropped as
            # stuck during period 2, which therefore never completed).
            rollouts = {r.t: r for r in bridge.status().key_updates}
            assert (rollouts[2].vms, rollouts[2].acked, rollouts[2].all_acked_after) == (
                200,
                199,
                None,
            )
            for t in (3, 4):
                assert (rollouts[t].vms, rollouts[t].acked) == (199, 199)
                all_acked_after = rollouts[t].all_acked_after
                assert all_acked_after is not None
                assert all_acked_after < 0.1
            nursery.cancel_scope.cancel()
        await stuck.aclose()


async def _ask_and_never_read(stream: trio.SocketStream, vm: str) -> None:
    hello = channel.encode(channel.Hello(vm, 0))
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        while True:
            await stream.send_all(hello)
            await trio.sleep(0.001)


async def test_before_the_epoch_and_after_the_last_period(
    autojump_clock: trio.testing.MockClock,
) -> None:
    schedule = Schedule(SCHEDULE.epoch, 10.0, 2)
    provisioning = generate("test-tvd", IDS)
    config, ports = stream_config(IDS, schedule=schedule)
    clock = clock_at(schedule.epoch - 5.0)
    async with open_bridge(config, provisioning.for_bridge(1), clock=clock) as bridge:
        guest = FakeGuest("vm-a", await ports["vm-a"].connect(), clock)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(guest.run)
            await guest.hello()
            await guest.wait_for(channel.Welcome)
            assert bridge.period is None and guest.updates() == []  # no period before the epoch
            await trio.sleep_until(clock.trio_time(schedule.epoch + 25.0))
            assert [(u.message.t, u.at) for u in guest.updates()] == [
                (1, schedule.epoch),
                (2, schedule.start(2)),
            ]
            assert bridge.period is None  # the schedule is over: no period 3
            await guest.hello()
            await guest.wait_for(channel.Welcome, 2)
            await trio.sleep(1)
            assert len(guest.updates()) == 2
            nursery.cancel_scope.cancel()


async def test_a_pty_whose_guest_went_away_is_reopened_without_a_busy_loop(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[float] = []
    real_open = open_serial  # what _transports imports (monkeypatched below)

    def counting_open(path: str | os.PathLike[str]) -> trio.lowlevel.FdStream:
        opened.append(trio.current_time())
        return real_open(path)

    monkeypatch.setattr(_transports, "open_serial", counting_open)
    provisioning = generate("test-tvd", IDS)
    clock = clock_at(start_of(2) + 1)
    master, slave = raw_pty()
    path = Path(os.ttyname(slave))
    config, _ = tvd_with(SerialLine("pty", path))
    os.close(slave)
    async with open_bridge(config, provisioning.for_bridge(1), clock=clock):
        await trio.sleep(1)
        assert len(opened) == 1
        os.close(master)  # the guest end is gone: EIO on the bridge's side, and no such pty
        await trio.sleep(60)
    assert 4 <= len(opened) <= 20  # 0.5 s, doubling to 5 s: about one attempt per 5 s
    gaps = [b - a for a, b in itertools.pairwise(opened)]
    assert min(gaps) >= 0.5


async def test_development_transports_need_the_option() -> None:
    provisioning = generate("test-tvd", IDS)
    config, _ = tvd_with(TcpListen("127.0.0.1", free_port()))
    with pytest.raises(TransportRefused, match=r"member 'vm-a': TCP on loopback"):
        async with open_bridge(config, provisioning.for_bridge(1), clock=clock_at(start_of(2))):
            pass


async def test_a_member_the_keys_do_not_know_is_refused() -> None:
    provisioning = generate("test-tvd", IDS[:2])
    config, _ = stream_config(IDS)
    with pytest.raises(Exception, match=r"'vm-c' is not in the keystore.*provision"):
        async with open_bridge(config, provisioning.for_bridge(1), clock=clock_at(start_of(2))):
            pass


async def keyed_guests(
    bridge: Bridge, ports: dict[str, StreamPort], clock: WallClock, nursery: trio.Nursery, t: int
) -> dict[str, FakeGuest]:
    """A fake guest on every port, each said hello and acknowledged period t."""
    guests = {vm: FakeGuest(vm, await ports[vm].connect(), clock) for vm in IDS}
    for guest in guests.values():
        nursery.start_soon(guest.run)
        await guest.hello()
    for vm in IDS:
        await bridge.wait_acked(vm, t)
    return guests


async def test_reload_removes_a_member_and_tells_the_others(
    autojump_clock: trio.testing.MockClock,
) -> None:
    provisioning = generate("test-tvd", IDS)
    reference = Reference(provisioning)
    keys = provisioning.for_bridge(1)
    config, ports = stream_config(IDS)
    clock = clock_at(start_of(3) + 1)
    async with open_bridge(config, keys, clock=clock) as bridge, trio.open_nursery() as nursery:
        guests = await keyed_guests(bridge, ports, clock, nursery, 3)
        smaller = TvdConfig.for_schedule("test-tvd", SCHEDULE, config.members[:2])
        result = await bridge.reload(smaller)
        assert result.removed == ("vm-c",) and result.told == ("vm-a", "vm-b")
        assert keys.pairs == [Pair("vm-a", "vm-b")]  # vm-c's device keys are erased
        for vm in ("vm-a", "vm-b"):
            guest = guests[vm]
            (members,) = await guest.wait_for(channel.Members)
            assert [m.id for m in members.members] == ["vm-a", "vm-b"]
            # SPEC §5: `members`, followed at once by the current update, without vm-c.
            last_two = [r.message for r in guest.received[-2:]]
            assert last_two[0] == members and isinstance(last_two[1], channel.Update)
            assert last_two[1].t == 3
            peer = "vm-b" if vm == "vm-a" else "vm-a"
            assert partials_bytes(last_two[1]) == {peer: reference.partials(vm, 3)[peer]}
        with trio.fail_after(5):
            await guests["vm-c"].eof.wait()  # its channel was closed
        assert bridge.vms == ("vm-a", "vm-b")
        # Adding a member is refused and changes nothing.
        with pytest.raises(ReloadError, match="provision"):
            await bridge.reload(config)
        assert bridge.vms == ("vm-a", "vm-b")
        await trio.sleep_until(clock.trio_time(start_of(4) + 1))
        update = guests["vm-a"].updates()[-1].message
        assert update.t == 4 and list(update.partials) == ["vm-b"]
        nursery.cancel_scope.cancel()


async def test_a_suspended_member_leaves_and_comes_back_without_provisioning(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Issue 20: membership changes by reload, a member leaving and coming back. While
    suspended it is served no more and is in no member list, as if removed (SPEC §5), but
    its pairs' device keys stay and evolve, so that a reload brings it back with the
    partials of the current period."""
    provisioning = generate("test-tvd", IDS)
    reference = Reference(provisioning)
    keys = provisioning.for_bridge(1)
    config, ports = stream_config(IDS)
    clock = clock_at(start_of(3) + 1)
    suspended = TvdConfig.for_schedule(
        "test-tvd",
        SCHEDULE,
        [dataclasses.replace(m, suspended=m.id == "vm-c") for m in config.members],
    )
    async with open_bridge(config, keys, clock=clock) as bridge, trio.open_nursery() as nursery:
        guests = await keyed_guests(bridge, ports, clock, nursery, 3)
        result = await bridge.reload(suspended)
        assert (result.suspended, result.removed, result.told) == (
            ("vm-c",),
            (),
            ("vm-a", "vm-b"),
        )
        assert len(keys.pairs) == 3  # kept
        for vm in ("vm-a", "vm-b"):
            (members,) = await guests[vm].wait_for(channel.Members)
            assert [m.id for m in members.members] == ["vm-a", "vm-b"]
            assert guests[vm].updates()[-1].message.t == 3
        with trio.fail_after(5):
            await guests["vm-c"].eof.wait()
        assert bridge.vms == ("vm-a", "vm-b") and bridge.status().suspended == ("vm-c",)
        await trio.sleep_until(clock.trio_time(start_of(4) + 1))
        update = guests["vm-a"].updates()[-1].message
        assert update.t == 4 and list(update.partials) == ["vm-b"]
        assert keys.period == 4  # vm-c's pairs evolved with the others

        result = await bridge.reload(config)
        assert (result.resumed, result.suspended) == (("vm-c",), ())
        assert set(result.told) >= {"vm-a", "vm-b"}
        back = FakeGuest("vm-c", await ports["vm-c"].connect(), clock)
        nursery.start_soon(back.run)
        await back.hello()
        (welcome,) = await back.wait_for(channel.Welcome)
        assert [m.id for m in welcome.members] == list(IDS)
        await bridge.wait_acked("vm-c", 4)
        update = back.updates()[-1].message
        assert update.t == 4 and partials_bytes(update) == reference.partials("vm-c", 4)
        for vm in ("vm-a", "vm-b"):
            members_messages = [
                r.message for r in guests[vm].received if isinstance(r.message, channel.Members)
            ]
            assert [m.id for m in members_messages[-1].members] == list(IDS)
            assert partials_bytes(guests[vm].updates()[-1].message) == reference.partials(vm, 4)
        nursery.cancel_scope.cancel()


async def test_a_reload_names_each_address_it_changed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Issue 18: a reload after an address change printed "moved none" and did not name
    the change."""
    provisioning = generate("test-tvd", IDS)
    keys = provisioning.for_bridge(1)
    config, _ports = stream_config(IDS)
    async with open_bridge(config, keys, clock=clock_at(start_of(3) + 1)) as bridge:
        members = [
            dataclasses.replace(m, address="127.0.0.1:7999") if m.id == "vm-b" else m
            for m in config.members
        ]
        old = next(m.address for m in config.members if m.id == "vm-b")
        result = await bridge.reload(TvdConfig.for_schedule("test-tvd", SCHEDULE, members))
        assert result.changes == (("vm-b", "address", old, "127.0.0.1:7999"),)
        assert result.to_json()["changes"] == [
            {"vm": "vm-b", "what": "address", "before": old, "after": "127.0.0.1:7999"}
        ]
        assert result.moved == () and set(result.told) == set(IDS)


def test_all_partials_is_partials_for_of_every_member() -> None:
    provisioning = generate("test-tvd", ("a", "b", "c", "d"), pairs=[("a", "b"), ("a", "c")])
    keys = provisioning.for_bridge(4)
    everything = keys.all_partials()
    assert set(everything) == {"a", "b", "c"}  # d has no pair
    for vm, mine in everything.items():
        assert {peer: bytes(p) for peer, p in mine.items()} == keys.partials_for(vm)
    everything["b"]["a"][:] = bytes(32)  # each member's copy is its own to zero
    assert bytes(everything["a"]["b"]) == keys.partials_for("a")["b"]


async def test_reading_pauses_while_too_much_waits_to_be_written(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each hello queues a welcome and the update (about 200 bytes here); with the bound
    # below one answer, an answer the VM has not read yet stops the bridge reading its
    # port, so a VM that asks and never reads cannot make the bridge queue more.
    monkeypatch.setattr(_worker, "BRIDGE_OUTPUT_LIMIT", 64)
    provisioning = generate("test-tvd", IDS)
    config, ports = stream_config(IDS)
    clock = clock_at(start_of(2) + 1)
    # A lockstep pair: a write completes only when the other side reads it, so the
    # guest sees when the bridge stops reading, and the bridge when the guest does.
    bridge_end, guest_end = trio.testing.lockstep_stream_pair()
    hello = channel.encode(channel.Hello("vm-a", 0))
    async with open_bridge(config, provisioning.for_bridge(1), clock=clock) as bridge:
        await ports["vm-a"].attach(bridge_end)
        # 1: answered, and the bridge's write of the answer now waits for the guest.
        # 2: read; its answer is queued behind the first one: more than the bound.
        # 3: read from the port but not fed to the channel.
        for _ in range(3):
            with trio.fail_after(1):
                await guest_end.send_all(hello)
        fourth_sent = trio.Event()

        async def send_fourth() -> None:
            await guest_end.send_all(hello)
            fourth_sent.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_fourth)
            await trio.sleep(1.0)  # below BRIDGE_WRITE_TIMEOUT: the connection stays up
            assert not fourth_sent.is_set()  # the bridge stopped reading
            # The guest reads: the bridge's queue drains and it reads again.
            reader = channel.ChannelReader()
            received: list[channel.ChannelMessage] = []
            with trio.fail_after(1):
                while not fourth_sent.is_set() or len(received) < 4:
                    received += reader.feed(await guest_end.receive_some(1 << 16))
        assert [type(m) for m in received[:4]] == [
            channel.Welcome,
            channel.Update,
            channel.Welcome,
            channel.Update,
        ]
        status = next(s for s in bridge.status().vms if s.vm == "vm-a")
        assert status.connected and status.stuck == 0

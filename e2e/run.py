"""`make e2e`: three real QEMU guests, a real virtio-serial key channel each, the real bridge.

Scenario (issue 7): provision a TVD of vm-a, vm-b, vm-c; boot three TCG guests (busybox
initramfs, the host's Python over a read-only 9p share) linked by virtio-net on a bridge
inside a network namespace this harness creates (link-local 169.254.10.0/24: nothing
leaves it); `tvdnet-bridge run` serves each guest's `org.tvdnet.keys.0` port through the
QEMU chardev's Unix socket. Every guest messages every other across several period
changes; the bridge is killed and restarted midway; vm-c replays a stolen period key after
it expired and vm-a must refuse it. Then vm-a acknowledges key updates of k partial keys by
approach II (a virtio-serial port) and approach I (a CD-ROM medium swapped over QMP), timed
here from the send (or the image write) to the acknowledgement.

Guests report on their serial consoles ("E2E {json}" lines); this harness asserts on those
reports and prints a summary; a failing guest's console log is printed whole.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import trio

from tvdnet_tools.local import LocalMember, LocalTvd, stop_process

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import initramfs  # noqa: E402

VMS = ("vm-a", "vm-b", "vm-c")
IPS = {vm: f"169.254.10.{i + 1}" for i, vm in enumerate(VMS)}
NODE_PORT = 7000
KEY_PORT = "virtio:org.tvdnet.keys.0"
MEASURE_K = (1, 100, 1200)
# Patterns of key material that must never reach a log: 32 key bytes as hex or base64.
SECRET_PATTERNS = [re.compile(r"\b[0-9a-f]{64}\b"), re.compile(r"[A-Za-z0-9+/]{43}=")]


class Failure(Exception):
    pass


# ------------------------------------------------------------------ host preparation


def ensure_tools() -> None:
    """QEMU, a kernel with modules, busybox and cpio; installed with apt when missing."""
    missing = [
        package
        for tool, package in (
            ("qemu-system-x86_64", "qemu-system-x86"),
            ("busybox", "busybox-static"),
            ("cpio", "cpio"),
            ("modinfo", "kmod"),
            ("ip", "iproute2"),
        )
        if shutil.which(tool) is None
    ]
    if not list(Path("/boot").glob("vmlinuz-*")) or not Path("/lib/modules").is_dir():
        missing.append("linux-image-amd64")
    if missing:
        print(f"e2e: installing {' '.join(missing)} with apt", flush=True)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for command in (
            ["apt-get", "update", "-qq"],
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
        ):
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stdout + done.stderr, file=sys.stderr)
                raise Failure(
                    f"`{' '.join(command)}` exited {done.returncode}: the host tools are "
                    "missing (its output is above)"
                )


class Netns:
    """A network namespace holding one Linux bridge and a tap device per guest."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> Netns:
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        self.ip("link", "add", "br0", "type", "bridge")
        self.ip("link", "set", "br0", "up")
        for i, _ in enumerate(VMS):
            self.ip("tuntap", "add", f"tap{i}", "mode", "tap")
            self.ip("link", "set", f"tap{i}", "master", "br0")
            self.ip("link", "set", f"tap{i}", "up")
        return self

    def ip(self, *args: str) -> None:
        subprocess.run(["ip", "-n", self.name, *args], check=True)

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["ip", "netns", "del", self.name], check=False)


def write_tvd(run: Path, period_s: float, epoch: float) -> Path:
    members = [
        LocalMember(
            vm, f"{IPS[vm]}:{NODE_PORT}", f"unix:{vm}.keys.sock", "virtio:org.tvdnet.keys.0"
        )
        for vm in VMS
    ]
    tvd = LocalTvd(run, "e2e", members, period_s=period_s, periods=100_000, epoch=epoch)
    return tvd.write()


async def inside_a_period(
    epoch: float, period_s: float, lead: float = 2.0, room: float = 5.0
) -> None:
    """Wait for a moment `lead` seconds or more into a period with `room` seconds of it
    left, for the guests' first connections: a handshake that straddles a period change
    has its first frame, sealed under the period that ended, refused `expired` (SPEC §4:
    the older key serves only connections authenticated before the change), and these
    runs count every REJECT as a failure. `lead` leaves time for the period's updates."""
    into = (time.time() - epoch) % period_s
    if into < lead:
        await trio.sleep(lead - into)
    elif into > period_s - room:
        await trio.sleep(period_s - into + lead)


# ------------------------------------------------------------------ guests


class Guest:
    def __init__(self, vm: str, index: int, run: Path, netns: str, kernel: Path) -> None:
        self.vm = vm
        self.index = index
        self.run = run
        self.netns = netns
        self.kernel = kernel
        self.ip = IPS[vm]  # its address on the guests' link
        self.console = run / f"{vm}.console"
        self.reports: list[dict[str, Any]] = []
        self.process: trio.Process | None = None
        self.control: trio.SocketStream | None = None
        self.events: dict[str, trio.Event] = defaultdict(trio.Event)

    def sock(self, name: str) -> Path:
        return self.run / f"{self.vm}.{name}.sock"

    def command(self) -> list[str]:
        append = " ".join(
            [
                "console=ttyS0 quiet random.trust_cpu=on",
                f"tvdnet.vm={self.vm} tvdnet.ip={self.ip} tvdnet.run={self.run}",
            ]
        )
        chardevs = []
        for i, (name, port) in enumerate(
            (("keys", "org.tvdnet.keys.0"), ("e2e", "org.tvdnet.e2e.0"),
             ("measure", "org.tvdnet.measure.0"))
        ):  # fmt: skip
            chardevs += [
                "-chardev", f"socket,id=ch{i},path={self.sock(name)},server=on,wait=off",
                "-device", f"virtserialport,chardev=ch{i},name={port}",
            ]  # fmt: skip
        return [
            "ip", "netns", "exec", self.netns,
            "qemu-system-x86_64", "-m", "768", "-cpu", "max", "-nographic", "-no-reboot",
            "-kernel", str(self.kernel), "-initrd", str(self.run / "initramfs.cpio"),
            "-append", append,
            "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,"
                       "multidevs=remap",
            "-device", "virtio-rng-pci",
            "-netdev", f"tap,id=n0,ifname=tap{self.index},script=no,downscript=no",
            "-device", f"virtio-net-pci,netdev=n0,mac=52:54:00:10:00:{self.index + 1:02x},romfile=",
            "-device", "virtio-serial-pci", *chardevs,
            "-drive", "if=none,id=cd0,media=cdrom",
            "-device", "ide-cd,drive=cd0,id=cdrom0",
            "-qmp", f"unix:{self.sock('qmp')},server=on,wait=off",
        ]  # fmt: skip

    async def start(self, nursery: trio.Nursery) -> None:
        self.process = await trio.lowlevel.open_process(
            self.command(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        nursery.start_soon(self._read_console)

    async def _read_console(self) -> None:
        assert self.process is not None
        assert self.process.stdout is not None
        buffer = b""
        with self.console.open("wb") as log:
            async for chunk in self.process.stdout:
                log.write(chunk)
                log.flush()
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for raw in lines:
                    line = raw.decode(errors="replace").strip()
                    if line.startswith("E2E {"):
                        report = json.loads(line[4:])
                        self.reports.append(report)
                        self.events[report["type"]].set()
                        if report["type"] == "crash":
                            self.events["final"].set()  # nobody waits for a dead guest
        self.events["exited"].set()

    async def connect_control(self, plan: dict[str, Any]) -> None:
        with trio.fail_after(60):
            while not self.sock("e2e").exists():
                await trio.sleep(0.1)
        self.control = await trio.open_unix_socket(str(self.sock("e2e")))
        await self.say(json.dumps(plan))

    async def say(self, line: str) -> None:
        assert self.control is not None
        await self.control.send_all(line.encode() + b"\n")

    async def wait(self, kind: str, timeout: float) -> dict[str, Any]:
        """The guest's last `kind` report; Failure if it crashed, exited or timed out first."""
        with trio.move_on_after(timeout):
            async with trio.open_nursery() as nursery:

                async def until(event: str) -> None:
                    await self.events[event].wait()
                    nursery.cancel_scope.cancel()

                for event in (kind, "crash", "exited"):
                    nursery.start_soon(until, event)
        found = [r for r in self.reports if r["type"] == kind]
        if not found:
            crash = [r for r in self.reports if r["type"] == "crash"]
            raise Failure(f"{self.vm}: no {kind!r} report within {timeout:.0f} s {crash}")
        return found[-1]

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.reports if r["type"] == kind]


# ------------------------------------------------------------------ the bridge


class BridgeProcess:
    def __init__(self, run: Path) -> None:
        self.run = run
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        log = (self.run / f"bridge.{self.starts}.log").open("wb")
        self.process = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "tvdnet-bridge"),
                "run",
                "--config",
                str(self.run / "tvd.toml"),
                "--keystore",
                str(self.run / "out" / "keystore.json"),
                "--control",
                str(self.run / "bridge.ctl"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def kill(self) -> None:
        """SIGKILL: the crash case; the keystore on disk must carry the bridge on."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def stop(self) -> int:
        assert self.process is not None
        return stop_process(self.process, timeout=60).returncode

    def logs(self) -> str:
        return "".join(p.read_text() for p in sorted(self.run.glob("bridge.*.log")))


# ------------------------------------------------------------------ measurement


async def measure(guest: Guest, reps: int) -> list[dict[str, Any]]:
    """Time k-partial updates to vm-a by approach II (port) and approach I (CD-ROM)."""
    from device_bridge import open_qmp, write_update_image
    from tvdnet import channel

    iso_dir = Path("/dev/shm") / f"tvdnet-e2e-{os.getpid()}"
    await guest.wait("measure-ready", 300)
    port = await trio.open_unix_socket(str(guest.sock("measure")))
    reader = channel.ChannelReader()
    rows: list[dict[str, Any]] = []
    t = 1000

    async def acked(want: int) -> None:
        while True:
            data = await port.receive_some()
            if not data:
                raise Failure("vm-a closed the measure port")
            for message in reader.feed(data):
                if isinstance(message, channel.Ack) and message.t == want:
                    return

    async with port, open_qmp(guest.sock("qmp")) as qmp:
        for _ in range(reps):
            for k in MEASURE_K:
                for approach in ("II", "I"):
                    t += 1
                    update = channel.encode(
                        channel.Update(t, {f"p{i:04d}": os.urandom(32) for i in range(k)})
                    )
                    start = time.perf_counter()
                    with trio.fail_after(120):
                        if approach == "II":
                            await port.send_all(update)
                        else:
                            image = write_update_image(iso_dir, f"{t}.iso", update)
                            await qmp.change_medium("cdrom0", image, force=True)
                        await acked(t)
                    elapsed = time.perf_counter() - start
                    rows.append({"approach": approach, "k": k, "ms": elapsed * 1000})
                    if approach == "I":
                        image.unlink()
        await port.send_all(channel.encode(channel.Error("done")))
    shutil.rmtree(iso_dir, ignore_errors=True)
    return rows


# ------------------------------------------------------------------ the scenario


async def scenario(args: argparse.Namespace, run: Path) -> dict[str, Any]:
    kernel = initramfs.kernel_image()
    initramfs.build(run / "initramfs.cpio", sys.executable)
    epoch = time.time()
    tvd = write_tvd(run, args.period, epoch)
    env = dict(os.environ)
    bin_dir = Path(sys.executable).parent
    subprocess.run(
        [bin_dir / "tvdnet-bridge", "provision", tvd, "--out", run / "out", "--plaintext"],
        check=True, env=env, capture_output=True,
    )  # fmt: skip
    plan = {
        "members": list(VMS),
        "tvd": "e2e",
        "addresses": {vm: f"{IPS[vm]}:{NODE_PORT}" for vm in VMS},
        "duration": args.duration,
        "interval": 1.0,
        "min_messages": 8,
        "send_timeout": 120.0,
        "ready_timeout": 600.0,
        "attack": {"attacker": "vm-c", "victim": "vm-a"},
        "measure": "vm-a" if args.measure_reps else None,
    }
    bridge = BridgeProcess(run)
    guests = [Guest(vm, i, run, f"tvdnet-e2e-{os.getpid()}", kernel) for i, vm in enumerate(VMS)]
    summary: dict[str, Any] = {}
    started = time.monotonic()
    stage = Stage()
    with Netns(f"tvdnet-e2e-{os.getpid()}"), trio.move_on_after(args.limit) as limit:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_sigterm, nursery.cancel_scope)
            try:
                stage.enter("starting QEMU")
                for guest in guests:
                    await guest.start(nursery)
                for guest in guests:
                    await guest.connect_control(plan)
                stage.enter("booting the guests")
                bridge.start()
                for guest in guests:
                    ready = await guest.wait("ready", args.boot_timeout)
                    print(f"e2e: {guest.vm} ready in period {ready['period']} "
                          f"({time.monotonic() - started:.0f} s)", flush=True)  # fmt: skip
                summary["boot_s"] = round(time.monotonic() - started, 1)
                stage.enter("messaging (bridge killed and restarted midway)")
                await inside_a_period(epoch, args.period)
                for guest in guests:
                    await guest.say("go")
                # The bridge dies midway (SIGKILL) and comes back 2 s later.
                await trio.sleep(args.duration / 2)
                bridge.kill()
                print("e2e: bridge killed", flush=True)
                await trio.sleep(2)
                bridge.start()
                print("e2e: bridge restarted", flush=True)
                for guest in guests:
                    await guest.wait("sent", args.duration + 300)
                stage.enter("collecting the final reports")
                for guest in guests:
                    await guest.say("all-sent")
                for guest in guests:
                    await guest.wait("final", 300)
                stage.enter("measuring Fig. 3(a) in vm-a")
                if args.measure_reps:
                    summary["measure"] = await measure(guests[0], args.measure_reps)
                stage.enter("stopping the guests and the bridge")
                for guest in guests:
                    with trio.move_on_after(120):
                        await guest.events["exited"].wait()
                summary["bridge_exit"] = bridge.stop()
            except BaseException:
                kill_everything(guests, [bridge])
                raise
            finally:
                nursery.cancel_scope.deadline = trio.current_time() + 5
    if limit.cancelled_caught:
        raise Failure(
            f"the whole run passed its limit of {args.limit:.0f} s while {stage.name} "
            f"(for {stage.elapsed():.0f} s); the consoles and bridge logs follow"
        )
    summary["total_s"] = round(time.monotonic() - started, 1)
    check(guests, bridge, summary)
    return summary


def kill_everything(guests: list[Guest], bridges: list[BridgeProcess]) -> None:
    """A run that fails or is cancelled leaves no QEMU and no bridge behind."""
    for guest in guests:
        if guest.process is not None and guest.process.returncode is None:
            guest.process.kill()
    for bridge in bridges:
        if bridge.process is not None and bridge.process.poll() is None:
            bridge.kill()


class Stage:
    """What the run is doing now, so that a run stopped by its limit says where it was."""

    def __init__(self) -> None:
        self.name = "preparing"
        self.since = time.monotonic()

    def enter(self, name: str) -> None:
        print(f"e2e: {name}", flush=True)
        self.name = name
        self.since = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.since


async def _stop_on_sigterm(scope: trio.CancelScope) -> None:
    """SIGTERM (a timeout, an operator) cancels the run, so that cleanup still happens."""
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async for _ in signals:
            print("e2e: SIGTERM: stopping", file=sys.stderr, flush=True)
            scope.cancel()
            return


def check(guests: list[Guest], bridge: BridgeProcess, summary: dict[str, Any]) -> None:
    problems: list[str] = []
    by_vm = {g.vm: g for g in guests}
    periods: set[int] = set()
    for guest in guests:
        (sent,) = guest.of("sent")
        for peer, count in sent["acked"].items():
            got = [r["seq"] for r in by_vm[peer].of("received") if r["sender"] == guest.vm]
            periods.update(
                r["period"] for r in by_vm[peer].of("received") if r["sender"] == guest.vm
            )
            if got != list(range(count)):
                problems.append(f"{guest.vm} -> {peer}: acked {count}, received {got}")
    if len(periods) < 4:
        problems.append(f"messages spanned periods {sorted(periods)}: fewer than 3 changes")
    (attack,) = by_vm["vm-c"].of("attack")
    if attack["reply"] is None or attack["reply"][0] != 2 or attack["reply"][3] != "expired":
        problems.append(f"the stolen key's frame was not refused as expired: {attack}")
    victim_stats = by_vm["vm-a"].of("final")[0]["stats"]
    if victim_stats.get("rejected_expired", 0) < 1:
        problems.append(f"vm-a counted no expired frame: {victim_stats}")
    texts = {g.vm: g.console.read_text(errors="replace") for g in guests}
    texts["bridge"] = bridge.logs()
    for name, text in texts.items():
        for pattern in SECRET_PATTERNS:
            if pattern.search(text):
                problems.append(f"{name}'s log holds something shaped like key material")
    if "event=period" not in texts["bridge"]:
        problems.append("the bridge never rotated a period")
    summary["periods"] = sorted(periods)
    summary["messages"] = sum(count for g in guests for count in g.of("sent")[0]["acked"].values())
    summary["attack"] = attack["reply"]
    if problems:
        raise Failure("; ".join(problems))  # main() prints every console and the bridge log


def print_logs(run: Path) -> None:
    """Every guest's console and the bridge's log, whole: what a failure is read from."""
    for path in [*sorted(run.glob("*.console")), *sorted(run.glob("bridge.*.log"))]:
        print(f"===== {path.name} =====")
        print(path.read_text(errors="replace"))


def print_summary(summary: dict[str, Any]) -> None:
    print(f"e2e: guests ready after {summary['boot_s']} s; whole run {summary['total_s']} s")
    print(f"e2e: {summary['messages']} messages, each received once and in order, across "
          f"periods {summary['periods']} (the bridge killed and restarted midway)")  # fmt: skip
    print(f"e2e: vm-c's frame under an expired key: {summary['attack']}")
    rows = summary.get("measure")
    if rows:
        print("e2e: key-update delivery to vm-a (ms, median of repetitions)")
        print("       k   approach II (virtio-serial)   approach I (CD-ROM over QMP)")
        for k in MEASURE_K:
            two = statistics.median(r["ms"] for r in rows if r["k"] == k and r["approach"] == "II")
            one = statistics.median(r["ms"] for r in rows if r["k"] == k and r["approach"] == "I")
            print(f"  {k:6d}   {two:26.1f}   {one:28.1f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--period", type=float, default=15.0, help="period length, seconds")
    parser.add_argument("--duration", type=float, default=60.0, help="messaging, seconds")
    parser.add_argument("--measure-reps", type=int, default=3, help="0: skip the measurement")
    parser.add_argument(
        "--boot-timeout", type=float, default=900.0, help="for all three guests to be ready"
    )
    parser.add_argument(
        "--limit", type=float, default=2700.0, help="the whole run, seconds (a quiet machine: 90)"
    )
    parser.add_argument("--json", type=Path, help="write the summary here")
    parser.add_argument("--keep", action="store_true", help="keep the run directory")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("e2e: needs root (network namespace, tap devices)", file=sys.stderr)
        return 2
    try:
        ensure_tools()
    except Failure as failure:
        print(f"e2e: FAILED: {failure}", file=sys.stderr)
        return 1
    # Not under /tmp: the guests mount a tmpfs there, hiding the host's /tmp.
    base = Path("/var/tmp")
    run = Path(tempfile_dir(base))
    failures: list[Exception] = []
    try:
        summary = trio.run(scenario, args, run)
    except* Failure as group:
        failures.extend(group.exceptions)
        print_logs(run)  # a guest that never booted fails before check() too
    finally:
        if not args.keep:
            shutil.rmtree(run, ignore_errors=True)
        else:
            print(f"e2e: run directory kept: {run}")
    for failure in failures:
        print(f"e2e: FAILED: {failure}", file=sys.stderr)
    if failures:
        return 1
    print_summary(summary)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


def tempfile_dir(base: Path) -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="tvdnet-e2e-", dir=base)


if __name__ == "__main__":
    sys.exit(main())

"""`make e2e`, second scenario: a TVD on two hosts, and a member live-migrated between them.

Issue 19. Two hosts are two network namespaces, each with a Linux bridge; a veth pair
joins the bridges, so the guests' virtio-net links cross the hosts (link-local addresses,
nothing leaves the namespaces). Host h1 runs vm-a and vm-b, host h2 runs vm-c; each host
has its own `tvdnet-bridge run --host`, keystore and copy of the TVD file. Every pair
messages the whole time. Midway, vm-b moves to h2 the way docs/bridge.md tells an
operator to: `move-out` on h1, vm-b's host set in h2's TVD file, `move-in` on h2, QMP
`migrate` from the source QEMU to a destination QEMU started with `-incoming` in h2's
namespace (vm-b let go of its 9p share after boot: QEMU refuses to migrate with it
mounted), the source quit, vm-b's host set in h1's TVD file and `reload` on h1.

Checked afterwards: every message acknowledged was received exactly once and in order,
in both directions of every pair, across the move; no REJECT anywhere; h1's keystore
holds no pair without a member on h1; no console or bridge log holds key material.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import initramfs  # noqa: E402
import run as single  # noqa: E402

from tvdnet_tools.local import LocalMember, LocalTvd  # noqa: E402

VMS = ("vm-a", "vm-b", "vm-c")
START = {"vm-a": "h1", "vm-b": "h1", "vm-c": "h2"}
MOVED = {**START, "vm-b": "h2"}
IPS = {vm: f"169.254.11.{i + 1}" for i, vm in enumerate(VMS)}
MOVER = "vm-b"
Failure = single.Failure


class Hosts:
    """Two namespaces with a bridge each, joined by a veth pair; a tap per guest."""

    def __init__(self, tag: str) -> None:
        self.names = {host: f"tvdnet-{host}-{tag}" for host in ("h1", "h2")}

    def ip(self, host: str, *args: str) -> None:
        subprocess.run(["ip", "-n", self.names[host], *args], check=True)

    def __enter__(self) -> Hosts:
        for host, name in self.names.items():
            subprocess.run(["ip", "netns", "add", name], check=True)
            self.ip(host, "link", "set", "lo", "up")
            self.ip(host, "link", "add", "br0", "type", "bridge")
            self.ip(host, "link", "set", "br0", "up")
            for i, _ in enumerate(VMS):  # a tap for every guest on both: vm-b lands on h2
                self.ip(host, "tuntap", "add", f"tap{i}", "mode", "tap")
                self.ip(host, "link", "set", f"tap{i}", "master", "br0")
                self.ip(host, "link", "set", f"tap{i}", "up")
        self.ip("h1", "link", "add", "veth-h1", "type", "veth", "peer", "name", "veth-h2",
                "netns", self.names["h2"])  # fmt: skip
        for host in ("h1", "h2"):
            self.ip(host, "link", "set", f"veth-{host}", "master", "br0")
            self.ip(host, "link", "set", f"veth-{host}", "up")
        return self

    def __exit__(self, *exc: object) -> None:
        for name in self.names.values():
            subprocess.run(["ip", "netns", "del", name], check=False)


class Guest(single.Guest):
    """A guest of one host; the mover unmounts its 9p share; a destination is `-incoming`."""

    def __init__(
        self, vm: str, run: Path, netns: str, kernel: Path, *, incoming: Path | None = None
    ) -> None:
        super().__init__(vm, VMS.index(vm), run, netns, kernel)
        self.ip = IPS[vm]
        self.incoming = incoming

    def command(self) -> list[str]:
        command = super().command()
        append = command.index("-append") + 1
        if self.vm == MOVER:
            command[append] += " tvdnet.nohost=1"
        command += ["-machine", "pc-i440fx-7.2"]  # the same machine on both ends
        if self.incoming is not None:
            command += ["-incoming", f"unix:{self.incoming}"]
        return command

    async def attach_control(self) -> None:
        """The harness's port on a migrated guest: the plan was read before the move."""
        with trio.fail_after(60):
            while not self.sock("e2e").exists():
                await trio.sleep(0.1)
        self.control = await trio.open_unix_socket(str(self.sock("e2e")))


class HostBridge(single.BridgeProcess):
    """`tvdnet-bridge run --host H` inside H's namespace, on H's keystore and TVD file."""

    def __init__(self, run: Path, host: str, netns: str, keystore: Path) -> None:
        super().__init__(run)
        self.host = host
        self.netns = netns
        self.keystore = keystore

    def start(self) -> None:
        self.starts += 1
        log = (self.run / f"bridge.{self.starts}.log").open("wb")
        self.process = subprocess.Popen(
            [
                "ip", "netns", "exec", self.netns,
                str(Path(sys.executable).parent / "tvdnet-bridge"), "run",
                "--config", str(self.run / "tvd.toml"),
                "--keystore", str(self.keystore),
                "--host", self.host,
                "--control", str(self.control),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip

    @property
    def control(self) -> Path:
        return self.run / "bridge.ctl"

    def command(self, *args: str) -> str:
        done = subprocess.run(
            [str(Path(sys.executable).parent / "tvdnet-bridge"), *args,
             "--control", str(self.control)],
            capture_output=True, text=True,
        )  # fmt: skip
        if done.returncode != 0:
            raise Failure(f"{self.host}: tvdnet-bridge {args[0]}: {done.stderr.strip()}")
        return done.stdout.strip()


def write_tvd(directory: Path, hosts: dict[str, str], period_s: float, epoch: float) -> None:
    members = [
        LocalMember(
            vm,
            f"{IPS[vm]}:{single.NODE_PORT}",
            f"unix:{vm}.keys.sock",
            "virtio:org.tvdnet.keys.0",
            host=hosts[vm],
        )
        for vm in VMS
    ]
    LocalTvd(
        directory, "e2e-hosts", members, period_s=period_s, periods=100_000, epoch=epoch
    ).write()


async def qmp_migrate(source: Guest, incoming: Path) -> dict[str, Any]:
    """QMP `migrate` to the destination's `-incoming` socket; the figures QEMU reports."""
    from device_bridge import open_qmp
    from device_bridge.errors import QmpError

    async with open_qmp(source.sock("qmp")) as qmp:
        await qmp.execute(
            "migrate-set-parameters", {"max-bandwidth": 1 << 30, "downtime-limit": 300}
        )
        await qmp.execute("migrate", {"uri": f"unix:{incoming}"})
        with trio.fail_after(300):
            while True:
                status = await qmp.execute("query-migrate")
                if status.get("status") in ("completed", "failed", "cancelled"):
                    break
                await trio.sleep(0.05)
        if status.get("status") != "completed":
            raise Failure(f"the migration of {MOVER} ended {status}")
        await trio.sleep(0.3)  # the first "completed" answer may carry no figures yet
        status = await qmp.execute("query-migrate")
        with contextlib.suppress(QmpError, trio.BrokenResourceError, trio.ClosedResourceError):
            await qmp.execute("quit")  # QEMU may close the socket before it answers
    return {k: status.get(k) for k in ("total-time", "downtime")}


async def scenario(args: argparse.Namespace, run: Path) -> dict[str, Any]:
    kernel = initramfs.kernel_image()
    initramfs.build(run / "initramfs.cpio", sys.executable)
    dirs = {host: run / host for host in ("h1", "h2")}
    epoch = time.time()
    for directory in dirs.values():
        directory.mkdir()
        write_tvd(directory, START, args.period, epoch)
    bin_dir = Path(sys.executable).parent
    subprocess.run(
        [bin_dir / "tvdnet-bridge", "provision", dirs["h1"] / "tvd.toml", "--out", run / "out",
         "--plaintext"],
        check=True, capture_output=True,
    )  # fmt: skip
    for directory in dirs.values():  # each guest's init reads its key file from RUN/out
        # Relative: the guests follow the link through their 9p view of the host.
        (directory / "out").symlink_to("../out")
        (directory / "initramfs.cpio").symlink_to("../initramfs.cpio")
    tag = str(os.getpid())
    plan = {
        "members": list(VMS),
        "tvd": "e2e-hosts",
        "addresses": {vm: f"{IPS[vm]}:{single.NODE_PORT}" for vm in VMS},
        "duration": args.duration,
        "interval": 1.0,
        "min_messages": 8,
        "send_timeout": 120.0,
        "ready_timeout": 600.0,
        "attack": {},
        "measure": None,
    }
    summary: dict[str, Any] = {}
    started = time.monotonic()
    stage = single.Stage()
    with Hosts(tag) as hosts, trio.move_on_after(args.limit) as limit:
        keystores = {host: run / "out" / f"keystore-{host}.json" for host in dirs}
        bridges = {
            host: HostBridge(dirs[host], host, hosts.names[host], keystores[host]) for host in dirs
        }
        guests = {vm: Guest(vm, dirs[START[vm]], hosts.names[START[vm]], kernel) for vm in VMS}
        incoming = run / "migrate.sock"
        landed = Guest(MOVER, dirs["h2"], hosts.names["h2"], kernel, incoming=incoming)
        everyone = [*guests.values(), landed]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(single._stop_on_sigterm, nursery.cancel_scope)
            try:
                stage.enter("starting QEMU on two hosts")
                for guest in guests.values():
                    await guest.start(nursery)
                for guest in guests.values():
                    await guest.connect_control(plan)
                stage.enter("booting the guests")
                for bridge in bridges.values():
                    bridge.start()
                for guest in guests.values():
                    ready = await guest.wait("ready", args.boot_timeout)
                    elapsed = time.monotonic() - started
                    print(f"e2e: {guest.vm} ready on {START[guest.vm]} in period "
                          f"{ready['period']} ({elapsed:.0f} s)", flush=True)  # fmt: skip
                summary["boot_s"] = round(time.monotonic() - started, 1)
                stage.enter(f"messaging; {MOVER} moves from h1 to h2 midway")
                await single.inside_a_period(epoch, args.period)
                for guest in guests.values():
                    await guest.say("go")
                await trio.sleep(args.duration / 3)
                # The destination waits for the migration stream, its ports on h2.
                await landed.start(nursery)
                bundle = str(run / "vm-b.move")
                said = bridges["h1"].command("move-out", MOVER, "--to", "h2", "--bundle", bundle)
                print(f"e2e: h1: {said}", flush=True)
                write_tvd(dirs["h2"], MOVED, args.period, epoch)
                print(f"e2e: h2: {bridges['h2'].command('move-in', bundle)}", flush=True)
                (run / "vm-b.move").unlink()
                moved_at = time.monotonic()
                summary["migration"] = await qmp_migrate(guests[MOVER], incoming)
                summary["move_s"] = round(time.monotonic() - moved_at, 2)
                print(f"e2e: {MOVER} migrated to h2: {summary['migration']} "
                      f"(move-in to resumed: {summary['move_s']} s)", flush=True)  # fmt: skip
                await landed.attach_control()
                write_tvd(dirs["h1"], MOVED, args.period, epoch)
                print(f"e2e: h1: {bridges['h1'].command('reload')}", flush=True)
                summary["h1_status"] = bridges["h1"].command("status", "--json")
                senders = [guests["vm-a"], guests["vm-c"], landed]
                for guest in senders:
                    await guest.wait("sent", args.duration + 300)
                stage.enter("collecting the final reports")
                for guest in senders:
                    await guest.say("all-sent")
                for guest in senders:
                    await guest.wait("final", 300)
                stage.enter("stopping the guests and the bridges")
                for guest in senders:
                    with trio.move_on_after(120):
                        await guest.events["exited"].wait()
                summary["bridge_exits"] = [bridge.stop() for bridge in bridges.values()]
            except BaseException:
                single.kill_everything(everyone, list(bridges.values()))
                raise
            finally:
                nursery.cancel_scope.deadline = trio.current_time() + 5
    if limit.cancelled_caught:
        raise Failure(
            f"the run passed its limit of {args.limit:.0f} s while {stage.name} "
            f"(for {stage.elapsed():.0f} s); the consoles and bridge logs follow"
        )
    summary["total_s"] = round(time.monotonic() - started, 1)
    check(guests, landed, bridges, run, summary)
    return summary


def check(
    guests: dict[str, Guest],
    landed: Guest,
    bridges: dict[str, HostBridge],
    run: Path,
    summary: dict[str, Any],
) -> None:
    problems: list[str] = []
    # vm-b's reports come from two QEMU processes: before the move and after it.
    reports = {vm: list(g.reports) for vm, g in guests.items()}
    reports[MOVER] += landed.reports

    def of(vm: str, kind: str) -> list[dict[str, Any]]:
        return [r for r in reports[vm] if r["type"] == kind]

    periods: set[int] = set()
    messages = 0
    for vm in VMS:
        sent = of(vm, "sent")
        if len(sent) != 1:
            problems.append(f"{vm}: {len(sent)} 'sent' reports")
            continue
        for peer, count in sent[0]["acked"].items():
            got = [r["seq"] for r in of(peer, "received") if r["sender"] == vm]
            periods.update(r["period"] for r in of(peer, "received") if r["sender"] == vm)
            messages += count
            if got != list(range(count)):
                problems.append(f"{vm} -> {peer}: acked {count}, received {got}")
        for final in of(vm, "final"):
            refused = {k: v for k, v in final["stats"].items() if k.startswith("rejected") and v}
            if refused:
                problems.append(f"{vm} refused frames: {refused}")
    if len(periods) < 3:
        problems.append(f"messages spanned periods {sorted(periods)}: fewer than 2 changes")
    keystore = json.loads((run / "out" / "keystore-h1.json").read_text())["payload"]
    left = [pair for pair in (e["pair"] for e in keystore["device_keys"]) if "vm-a" not in pair]
    if left:
        problems.append(f"h1's keystore still holds pairs without a member on h1: {left}")
    status = json.loads(summary.pop("h1_status"))
    if [vm["vm"] for vm in status["vms"]] != ["vm-a"]:
        problems.append(f"h1 still serves {[vm['vm'] for vm in status['vms']]}")
    texts = {f"{g.vm}@{g.run.name}": g.console.read_text(errors="replace")
             for g in [*guests.values(), landed]}  # fmt: skip
    for host, bridge in bridges.items():
        texts[f"bridge {host}"] = bridge.logs()
    for name, text in texts.items():
        for pattern in single.SECRET_PATTERNS:
            if pattern.search(text):
                problems.append(f"{name}'s log holds something shaped like key material")
        if "Traceback" in text:
            problems.append(f"{name}'s log holds a traceback")
    if "event=move-in vm=vm-b" not in texts["bridge h2"]:
        problems.append("h2's bridge logged no move-in")
    summary["periods"] = sorted(periods)
    summary["messages"] = messages
    if problems:
        raise Failure("; ".join(problems))


def print_logs(run: Path) -> None:
    for path in [*sorted(run.glob("h?/*.console")), *sorted(run.glob("h?/bridge.*.log"))]:
        print(f"===== {path.parent.name}/{path.name} =====")
        print(path.read_text(errors="replace"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--period", type=float, default=10.0, help="period length, seconds")
    parser.add_argument("--duration", type=float, default=45.0, help="messaging, seconds")
    parser.add_argument("--boot-timeout", type=float, default=900.0)
    parser.add_argument("--limit", type=float, default=2700.0, help="the whole run, seconds")
    parser.add_argument("--json", type=Path, help="write the summary here")
    parser.add_argument("--keep", action="store_true", help="keep the run directory")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("e2e: needs root (network namespaces, tap devices)", file=sys.stderr)
        return 2
    try:
        single.ensure_tools()
    except Failure as failure:
        print(f"e2e: FAILED: {failure}", file=sys.stderr)
        return 1
    run = Path(single.tempfile_dir(Path("/var/tmp")))
    failures: list[Exception] = []
    try:
        summary = trio.run(scenario, args, run)
    except* Failure as group:
        failures.extend(group.exceptions)
        print_logs(run)
    finally:
        if not args.keep:
            shutil.rmtree(run, ignore_errors=True)
        else:
            print(f"e2e: run directory kept: {run}")
    for failure in failures:
        print(f"e2e: FAILED: {failure}", file=sys.stderr)
    if failures:
        return 1
    migration = summary["migration"]
    print(f"e2e: two hosts: guests ready after {summary['boot_s']} s; whole run "
          f"{summary['total_s']} s")  # fmt: skip
    print(f"e2e: {MOVER} live-migrated h1 -> h2 in {migration['total-time']} ms "
          f"(downtime {migration['downtime']} ms); {summary['messages']} messages, each "
          f"received once and in order, across periods {summary['periods']}, no REJECT; "
          "h1 keeps no pair without a member on h1")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

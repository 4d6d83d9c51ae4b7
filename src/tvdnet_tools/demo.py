"""`tvdnet demo`: a whole TVD on this machine, a scripted chat through period changes.

A bridge (`tvdnet-bridge run`) and three VMs (`tvdnet node`) run as separate OS
processes. Each VM's key channel is a pty pair standing in for its virtio-serial port:
the bridge opens the slave (`pty:/dev/pts/N` in the TVD file, as it would open a QEMU
`-chardev pty`) and the node inherits the master (`key_channel = "fd:N"`).

The demo drives the nodes through their control sockets (`send`, `broadcast`, `status`),
reads what each receives from its stdout, and watches the periods change. It also plays
an attacker who copied a VM's period key while that period was current: once the period
has passed, a message forged under that key must be refused (REJECT `expired`, SPEC §4).
To make that key, the demo keeps its own copy of the provisioning output (the keystore's
first device keys and the computer-key files), which a real deployment never keeps.

It ends with a summary and exits 0 only if every message arrived exactly once (and in
order per pair), every forged one was refused, and the chat saw at least three period
changes.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import subprocess
import tempfile
import time
import tty
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import trio
from rich.console import Console
from rich.markup import escape
from rich.rule import Rule
from rich.table import Table

from tvdnet import ControlError
from tvdnet.control import control_request
from tvdnet.core import frames
from tvdnet.core.scheme import ComputerKeys, Pair, Schedule
from tvdnet.keyfile import load_computer_keys

from .forge import RawPeer, period_key_from
from .local import LocalMember, LocalTvd, console_command, free_port, stop_processes

__all__ = ["register", "run_demo"]

TVD: Final = "demo"
MEMBERS: Final = ("vm-a", "vm-b", "vm-c")
STYLES: Final = {"vm-a": "bold cyan", "vm-b": "bold magenta", "vm-c": "bold green"}
EVERYONE: Final = "*"
MIN_ROTATIONS: Final = 3
# Generous: the machines this runs on may be slow to start four Python processes.
STARTUP_TIMEOUT: Final = 90.0
SEND_TIMEOUT: Final = 30.0
STOP_TIMEOUT: Final = 15.0


@dataclass(frozen=True, slots=True)
class Pace:
    period_s: float
    gap_s: float  # between two chat lines
    burst: int  # messages per ordered pair in the burst across a period change
    poll_s: float  # how often the demo asks each node its period


NORMAL: Final = Pace(period_s=5.0, gap_s=0.7, burst=4, poll_s=0.2)
FAST: Final = Pace(period_s=1.5, gap_s=0.05, burst=3, poll_s=0.1)


def register(commands: Any) -> None:
    """`tvdnet demo` (the entry point `tvdnet.commands`: demo)."""
    demo = commands.add_parser("demo", help="a whole TVD on this machine, with a scripted chat")
    demo.set_defaults(handler=run_demo)
    demo.add_argument(
        "--fast", action="store_true", help=f"periods of {FAST.period_s:g} s, done in under 30 s"
    )
    demo.add_argument("--keep", type=Path, metavar="DIR",
                      help="keep the TVD files and logs in DIR (it must not exist)")  # fmt: skip


def run_demo(args: argparse.Namespace) -> int:
    console = Console(highlight=False)
    pace = FAST if args.fast else NORMAL
    workdir: contextlib.AbstractContextManager[str]
    if args.keep is not None:
        args.keep.mkdir(mode=0o700, parents=True)
        workdir = contextlib.nullcontext(str(args.keep))
    else:
        workdir = tempfile.TemporaryDirectory(prefix="tvdnet-demo-")
    with workdir as directory:
        demo = Demo(Path(directory), pace, console)
        try:
            trio.run(demo.main)
        except KeyboardInterrupt:
            console.print("[red]interrupted[/]")
            return 130
        finally:
            demo.cleanup()
        return 0 if demo.report() else 1


# --------------------------------------------------------------------------- helpers


@dataclass(slots=True)
class Forgery:
    as_vm: str  # the member whose stolen key signs it
    target: str
    period: int  # the expired period it claims
    current: int  # the target's newest period with as_vm when it was sent
    reject: list[Any] | None = None
    counted: bool = False  # the target's rejected_expired went up

    @property
    def refused(self) -> bool:
        return (
            self.reject is not None
            and self.reject[0] == frames.REJECT
            and self.reject[3] == "expired"
            and self.counted
        )


@dataclass(slots=True)
class Vm:
    id: str
    port: int
    master: int  # the pty master: the node's end of its key channel
    pty: str
    config: Path
    control: Path
    log: Path
    process: trio.Process | None = None
    period: int | None = None  # as last reported by the node
    status: dict[str, Any] = field(default_factory=dict)


class Demo:
    def __init__(self, directory: Path, pace: Pace, console: Console) -> None:
        self.dir = directory
        self.pace = pace
        self.console = console
        self.vms: dict[str, Vm] = {}
        self.bridge: trio.Process | None = None
        self.bridge_control = directory / "bridge" / "control.sock"
        self.local: LocalTvd  # written by prepare()
        self.schedule: Schedule | None = None
        # The attacker's material (see the module docstring).
        self.dev_period = 0
        self.dev_keys: dict[Pair, bytearray] = {}
        self.computer: dict[str, ComputerKeys] = {}
        # What happened.
        self.started = time.monotonic()
        self.expected: dict[str, set[str]] = {}  # message id -> its recipients
        self.received: Counter[tuple[str, str]] = Counter()  # (message id, recipient)
        self.received_in: Counter[int] = Counter()  # burst messages by period of arrival
        self.order: dict[tuple[str, str], list[int]] = defaultdict(list)  # burst numbers
        self.forgeries: list[Forgery] = []
        self.failures: list[str] = []
        self.tvd_period: int | None = None  # the newest period every node holds
        self.rotations = 0
        self.changed = trio.Event()
        self.final: dict[str, dict[str, Any]] = {}
        self.exit_codes: dict[str, int | None] = {}
        self.elapsed = 0.0
        self._ids = itertools.count(1)

    # ------------------------------------------------------------------ output

    def _now(self) -> str:
        return f"[dim]{time.monotonic() - self.started:6.1f}s[/]"

    def _p(self, period: int | None) -> str:
        return f"[bold]p{period}[/]" if period is not None else "[bold]p-[/]"

    def say(self, text: str) -> None:
        self.console.print(f"{self._now()} {text}")

    def fail(self, why: str) -> None:
        self.failures.append(why)
        self.say(f"[bold red]✗ {escape(why)}[/]")

    @staticmethod
    def vm(vm: str) -> str:
        return f"[{STYLES.get(vm, 'bold')}]{vm}[/]"

    # ------------------------------------------------------------------ setup

    def prepare(self) -> None:
        """ptys, ports, the TVD file, provisioning (G), the nodes' configuration files."""
        for vm in MEMBERS:
            master, slave = os.openpty()
            # Raw before anyone writes: a pty starts with echo and CR/LF translation, which
            # would corrupt msgpack; the bridge's pyserial sets raw mode again when it opens.
            # The kernel keeps the mode while the master is open. The slave is then closed:
            # while the bridge does not hold it, the node reads EIO, as a guest sees its
            # port's host side gone, and says hello again every second until welcomed.
            tty.setraw(slave)
            pty = os.ttyname(slave)
            os.close(slave)
            self.vms[vm] = Vm(
                id=vm,
                port=free_port(),
                master=master,
                pty=pty,
                config=self.dir / f"{vm}.toml",
                control=self.dir / f"{vm}.control",
                log=self.dir / f"{vm}.log",
            )
        self.local = LocalTvd(
            self.dir,
            TVD,
            [
                LocalMember(v.id, f"127.0.0.1:{v.port}", f"pty:{v.pty}", f"fd:{v.master}")
                for v in self.vms.values()
            ],
            period_s=self.pace.period_s,
            periods=100_000,
        )
        self.local.write()

    def provision(self) -> None:
        """G, as `tvdnet-bridge provision TVD --plaintext` does, in this process (one
        Python start fewer); then each node's configuration."""
        from device_bridge import Keystore  # the host side: only the demo needs it here

        self.local.provision()
        keystore = Keystore.load(self.local.keystore, None)
        try:
            self.schedule = keystore.schedule
            device = keystore.device_keys
            self.dev_period = device.period
            self.dev_keys = {pair: bytearray(device.key_bytes(pair)) for pair in device.pairs}
        finally:
            keystore.device_keys.erase()
            keystore.close()
        for vm, v in self.vms.items():
            self.computer[vm], _ = load_computer_keys(self.local.key_file(vm))
            self.local.write_node_config(
                vm, control_socket=str(v.control), send_timeout=SEND_TIMEOUT
            )
        self.say(
            f"provisioned TVD [bold]{TVD}[/] with [bold]tvdnet-bridge provision --plaintext[/]: "
            f"{len(MEMBERS)} VMs, {len(self.dev_keys)} pairs, periods of "
            f"{self.pace.period_s:g} s"
        )

    def cleanup(self) -> None:
        """Erase the attacker's copies of keys; close the pty masters no node took."""
        for key in self.dev_keys.values():
            key[:] = bytes(len(key))
        self.dev_keys.clear()
        for keys in self.computer.values():
            keys.erase()
        self.computer.clear()
        for v in self.vms.values():
            with contextlib.suppress(OSError):
                os.close(v.master)

    async def start(self, nursery: trio.Nursery) -> None:
        command = [*console_command("tvdnet-bridge", "device_bridge"), "run"]
        command += ["--config", str(self.local.tvd_file)]
        command += ["--keystore", str(self.local.keystore)]
        command += ["--control", str(self.bridge_control)]
        with (self.dir / "bridge.log").open("wb") as log:
            self.bridge = await trio.lowlevel.open_process(
                command, stdout=subprocess.DEVNULL, stderr=log
            )
        ptys = ", ".join(f"{v.id} {v.pty}" for v in self.vms.values())
        self.say(f"bridge started (pid {self.bridge.pid}): key channels on ptys: {ptys}")
        for v in self.vms.values():
            node = [*console_command("tvdnet", "tvdnet"), "node", "--config", str(v.config)]
            with v.log.open("wb") as log:
                v.process = await trio.lowlevel.open_process(
                    node, stdout=subprocess.PIPE, stderr=log, pass_fds=(v.master,)
                )
            os.close(v.master)  # the node has it now
            v.master = -1
            nursery.start_soon(self.read_node, v)
            self.say(
                f"{self.vm(v.id)} node started (pid {v.process.pid}): peers reach it on "
                f"127.0.0.1:{v.port}; its key channel is the master side of {v.pty}"
            )

    async def wait_for_keys(self) -> None:
        with trio.fail_after(STARTUP_TIMEOUT):
            while True:
                ready = 0
                for v in self.vms.values():
                    with contextlib.suppress(ControlError):
                        reply = await control_request(v.control, {"command": "status"})
                        status = reply.get("status", {})
                        if status.get("period") is not None and all(
                            peer["has_key"] for peer in status["peers"].values()
                        ):
                            ready += 1
                if ready == len(self.vms):
                    return
                self._check_alive()
                await trio.sleep(0.1)

    def _check_alive(self) -> None:
        for name, process in self._processes():
            if process.returncode is not None:
                raise RuntimeError(f"{name} exited early (code {process.returncode})")

    def _processes(self) -> list[tuple[str, trio.Process]]:
        out = [(v.id, v.process) for v in self.vms.values() if v.process is not None]
        if self.bridge is not None:
            out.append(("bridge", self.bridge))
        return out

    # ------------------------------------------------------------------ watching

    async def read_node(self, v: Vm) -> None:
        """What the node prints: one JSON line per received message."""
        assert v.process is not None
        assert v.process.stdout is not None
        buffer = b""
        async for chunk in v.process.stdout:
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                with contextlib.suppress(ValueError):
                    self.on_received(v.id, json.loads(line))

    def on_received(self, vm: str, line: dict[str, Any]) -> None:
        body = line.get("body")
        if line.get("event") != "received" or not isinstance(body, dict):
            return
        message_id = str(body.get("id"))
        sender = str(line.get("from"))
        self.received[message_id, vm] += 1
        if self.received[message_id, vm] > 1:
            self.fail(f"{vm} got message {message_id} a second time")
        if message_id not in self.expected:
            self.fail(f"{vm} delivered a message nobody sent: {body.get('text')!r}")
            return
        if "burst" in body:
            self.received_in[line["period"]] += 1
            self.order[sender, vm].append(int(body["burst"]))
            return
        self.say(
            f"{self._p(line.get('period'))}     {self.vm(vm)} [dim]←[/] {self.vm(sender)}  "
            f"“{escape(str(body.get('text')))}”"
        )

    async def watch_periods(self) -> None:
        """Tell each period change once every node holds its keys (U* then U)."""
        while True:
            for v in self.vms.values():
                with contextlib.suppress(ControlError):
                    reply = await control_request(v.control, {"command": "status"})
                    v.status = reply.get("status", v.status)
                    v.period = v.status.get("period")
            periods = [v.period for v in self.vms.values()]
            if all(p is not None for p in periods):
                newest = min(p for p in periods if p is not None)
                if self.tvd_period is None or newest > self.tvd_period:
                    if self.tvd_period is not None:
                        self.rotations += newest - self.tvd_period
                    self.tvd_period = newest
                    await self._announce(newest)
                    self.changed.set()
                    self.changed = trio.Event()
            await trio.sleep(self.pace.poll_s)

    async def _announce(self, period: int) -> None:
        acked = ""
        with contextlib.suppress(ControlError, KeyError, TypeError):
            reply = await control_request(self.bridge_control, {"command": "status"}, timeout=5.0)
            times = [
                vm["last_latency"] * 1000
                for vm in reply["status"]["vms"]
                if vm["acked"] >= period and vm["last_latency"] is not None
            ]
            if times:
                acked = f" (acked ≤ {max(times):.1f} ms)"
        self.console.print(
            Rule(
                f"[bold yellow]period {period}[/]: new pair keys in every VM, old ones "
                f"erased{acked}",
                style="yellow",
            )
        )

    async def until_period(self, period: int) -> None:
        while self.tvd_period is None or self.tvd_period < period:
            await self.changed.wait()

    # ------------------------------------------------------------------ acting

    async def send(self, sender: str, to: str, text: str, *, quiet: bool = False,
                   extra: dict[str, Any] | None = None) -> None:  # fmt: skip
        message_id = f"m{next(self._ids)}"
        recipients = [vm for vm in MEMBERS if vm != sender] if to == EVERYONE else [to]
        self.expected[message_id] = set(recipients)
        body = {"id": message_id, "text": text, **(extra or {})}
        if to == EVERYONE:
            request: dict[str, Any] = {"command": "broadcast", "body": body}
        else:
            request = {"command": "send", "peer": to, "body": body}
        request["timeout"] = SEND_TIMEOUT
        if not quiet:
            target = "[bold]everyone[/]" if to == EVERYONE else self.vm(to)
            self.say(
                f"{self._p(self.vms[sender].period)} {self.vm(sender)} → {target}  “{escape(text)}”"
            )
        try:
            reply = await control_request(self.vms[sender].control, request)
        except ControlError as exc:
            self.fail(f"{sender}'s control socket: {exc}")
            return
        if not reply.get("ok"):
            self.fail(f"{sender} could not send {message_id}: {reply.get('error')}")

    async def chat(self, lines: list[tuple[str, str, str]]) -> None:
        for sender, to, text in lines:
            await self.send(sender, to, text)
            await trio.sleep(self.pace.gap_s)

    async def forge(self, as_vm: str, target: str) -> None:
        """A message to `target` sealed under as_vm's key of a period that has passed."""
        assert self.schedule is not None
        reply = await control_request(self.vms[target].control, {"command": "status"})
        status = reply["status"]
        current = int(status["peers"][as_vm]["period"])
        before = int(status["stats"].get("rejected_expired", 0))
        old = current - 1
        forgery = Forgery(as_vm, target, old, current)
        self.forgeries.append(forgery)
        text = f"transfer everything to mallory (sealed under {as_vm}'s period-{old} key)"
        message_id = f"forged-{len(self.forgeries)}"
        self.say(
            f"{self._p(current)} [bold red]⚠ forgery[/]: an attacker who copied "
            f"{self.vm(as_vm)}'s period-{old} key while it was current sends "
            f"{self.vm(target)} “{escape(text)}”"
        )
        if old < self.dev_period:
            self.fail(f"no device key old enough to forge period {old}")
            return
        pair = Pair.of(as_vm, target)
        comp = self.computer[as_vm].get(target)
        assert comp is not None
        key = period_key_from(self.dev_keys[pair], self.dev_period, comp, TVD, as_vm, target, old)
        raw = await RawPeer.connect(self.vms[target].port)
        try:
            await raw.hello(TVD, as_vm, target)
            if await raw.until(frames.HELLO) is None:
                self.fail(f"{target} closed the forger's connection before its HELLO")
                return
            inner = [[frames.MSG, 1, {"id": message_id, "text": text}]]
            await raw.send(raw.data(key, TVD, as_vm, target, old, inner))
            forgery.reject = await raw.until(frames.REJECT)
        except (OSError, trio.BrokenResourceError, trio.TooSlowError) as exc:
            self.fail(f"forging to {target}: {type(exc).__name__}")
            return
        finally:
            await raw.aclose()
        reply = await control_request(self.vms[target].control, {"command": "status"})
        after = int(reply["status"]["stats"].get("rejected_expired", 0))
        forgery.counted = after > before
        if forgery.refused:
            assert forgery.reject is not None
            self.say(
                f"{self._p(current)} [bold green]✓ {self.vm(target)} refused it[/] before "
                f"decrypting: REJECT {forgery.reject[3]} (frame of period {forgery.reject[1]}, "
                f"it holds period {forgery.reject[4]}); rejected_expired {before} → {after}"
            )
        else:
            self.fail(f"{target} did not refuse the forged message: {forgery.reject!r}")

    async def burst(self) -> None:
        """Every VM sends numbered messages to each peer while the period changes."""
        assert self.schedule is not None
        now = time.time()
        end = self.schedule.end(self.schedule.period_at(now))
        await trio.sleep(max(0.0, end - self.pace.period_s * 0.3 - now))
        pairs = [(a, b) for a in MEMBERS for b in MEMBERS if a != b]
        total = len(pairs) * self.pace.burst
        self.say(
            f"{self._p(self.tvd_period)} burst: each VM sends {self.pace.burst} numbered "
            f"messages to each peer ({total} in all) while the period changes"
        )

        async def one_pair(sender: str, receiver: str) -> None:
            for k in range(1, self.pace.burst + 1):
                await self.send(sender, receiver, f"burst {k}", quiet=True, extra={"burst": k})

        before = sum(self.received_in.values())
        async with trio.open_nursery() as nursery:
            for sender, receiver in pairs:
                nursery.start_soon(one_pair, sender, receiver)
        got = sum(self.received_in.values()) - before
        periods = ", ".join(f"p{t}: {n}" for t, n in sorted(self.received_in.items()))
        self.say(f"{self._p(self.tvd_period)} burst acknowledged: {got}/{total} arrived "
                 f"so far; by period of arrival: {periods}")  # fmt: skip

    async def script(self) -> None:
        assert self.tvd_period is not None
        p = self.tvd_period
        await self.chat(
            [
                ("vm-a", EVERYONE, "Morning, everyone. My keys for this period just came in."),
                (
                    "vm-b",
                    "vm-a",
                    "Mine too. The bridge sent partial keys; I derived the pair keys.",
                ),
                ("vm-c", EVERYONE, "Same here. The bridge itself never sees a period key."),
            ]
        )
        await self.until_period(p + 1)
        await self.forge("vm-a", "vm-b")
        await self.chat(
            [
                ("vm-b", EVERYONE, "Someone just tried last period's vm-a key on me. Refused."),
                ("vm-a", "vm-b", "Not me: I erased that key the moment the new one arrived."),
            ]
        )
        await self.burst()
        await self.until_period(p + 2)
        await self.forge("vm-c", "vm-a")
        await self.chat(
            [
                ("vm-a", "vm-c", "Another forgery, under your old key this time. Also refused."),
                ("vm-c", "vm-a", "Whoever copied it can read that period's traffic, no more."),
            ]
        )
        await self.until_period(p + 3)
        await self.chat(
            [
                ("vm-b", EVERYONE, "Keys rotated three times while we talked. Signing off."),
                ("vm-c", EVERYONE, "Bye!"),
            ]
        )

    async def settle(self) -> None:
        """Wait until every acknowledged message has been printed by its receiver."""
        with trio.move_on_after(SEND_TIMEOUT):
            while any(
                self.received[message_id, vm] == 0
                for message_id, recipients in self.expected.items()
                for vm in recipients
            ):
                await trio.sleep(0.05)
        for v in self.vms.values():
            with contextlib.suppress(ControlError):
                reply = await control_request(v.control, {"command": "status"})
                self.final[v.id] = reply["status"]

    async def stop(self) -> None:
        stopped = await stop_processes(dict(self._processes()), timeout=STOP_TIMEOUT)
        for name, how in stopped.items():
            if how.killed:
                self.fail(f"{name} did not stop on SIGTERM; killed")
            self.exit_codes[name] = how.returncode

    async def main(self) -> None:
        self.console.print(
            Rule(f"[bold]tvdnet demo[/]: a TVD of {len(MEMBERS)} VMs on this machine")
        )
        self.prepare()
        watcher = trio.CancelScope()

        async def watch() -> None:
            with watcher:
                await self.watch_periods()

        try:
            async with trio.open_nursery() as nursery:
                try:
                    self.provision()
                    await self.start(nursery)
                    await self.wait_for_keys()
                    self.say("every VM holds its pair keys; the chat begins")
                    nursery.start_soon(watch)
                    await self.until_period(1)
                    await self.script()
                    await self.settle()
                except (RuntimeError, OSError, KeyError, ValueError, trio.TooSlowError) as exc:
                    self.fail(f"the demo could not run: {type(exc).__name__}: {exc}")
                finally:
                    watcher.cancel()
                    with trio.CancelScope(shield=True):
                        await self.stop()
                    # The readers end at EOF: everything the nodes printed has been seen.
                    nursery.cancel_scope.deadline = trio.current_time() + STOP_TIMEOUT
        finally:
            self.elapsed = time.monotonic() - self.started

    # ------------------------------------------------------------------ the verdict

    def report(self) -> bool:
        expected = [(m, vm) for m, recipients in self.expected.items() for vm in recipients]
        once = sum(1 for key in expected if self.received[key] == 1)
        missing = sum(1 for key in expected if self.received[key] == 0)
        duplicated = sum(1 for key in expected if self.received[key] > 1)
        strangers = sum(n for (m, _), n in self.received.items() if m not in self.expected)
        out_of_order = [pair for pair, seen in self.order.items() if seen != sorted(seen)]
        refused = sum(1 for f in self.forgeries if f.refused)

        per_vm = Table(title="nodes (their own counters)")
        for column in ("VM", "sent", "delivered", "resends", "refused expired", "key updates"):
            per_vm.add_column(column, justify="left" if column == "VM" else "right")
        for vm in MEMBERS:
            stats = self.final.get(vm, {}).get("stats")
            keys = ("sent", "delivered", "resends", "rejected_expired", "key_updates")
            per_vm.add_row(vm, *(str(stats.get(k, 0)) if stats else "?" for k in keys))
        totals = Table(title="summary")
        totals.add_column("what")
        totals.add_column("count", justify="right")
        for label, value in (
            ("sent", len(expected)),
            ("delivered", once),
            ("missing", missing),
            ("duplicated", duplicated),
            ("forged", len(self.forgeries)),
            ("refused", refused),
            ("rotations", self.rotations),
        ):
            totals.add_row(label, str(value))
        self.console.print()
        self.console.print(per_vm)
        self.console.print(totals)
        self.console.print(
            f"(sent and delivered count one per recipient; the demo ran {self.elapsed:.1f} s)"
        )

        problems = list(self.failures)
        if missing or duplicated or strangers:
            problems.append(f"{missing} missing, {duplicated} duplicated, {strangers} never sent")
        if out_of_order:
            problems.append(f"out of order: {out_of_order}")
        if not self.forgeries or refused != len(self.forgeries):
            problems.append(f"{refused} of {len(self.forgeries)} forged messages refused")
        if self.rotations < MIN_ROTATIONS:
            problems.append(
                f"only {self.rotations} period changes (the chat needs {MIN_ROTATIONS})"
            )
        bad_exits = {name: code for name, code in self.exit_codes.items() if code != 0}
        if bad_exits:
            problems.append(f"processes exited with errors: {bad_exits}")
        if problems:
            self.console.print("[bold red]FAILED[/]: " + escape("; ".join(dict.fromkeys(problems))))
            self._show_logs()
            return False
        self.console.print(
            "[bold green]OK[/]: every message arrived exactly once and in order, every forged "
            f"one was refused, across {self.rotations} period changes."
        )
        return True

    def _show_logs(self) -> None:
        for path in [self.dir / "bridge.log", *(v.log for v in self.vms.values())]:
            with contextlib.suppress(OSError):
                tail = path.read_text(errors="replace").splitlines()[-8:]
                if tail:
                    self.console.print(f"[dim]--- {path.name} (last lines)[/]")
                    for line in tail:
                        self.console.print(escape(line), style="dim")

"""The real thing in OS processes: `tvdnet-bridge run` and three `tvdnet node` processes on
loopback, in real time, with sub-second periods; messages between every pair keep flowing
across period changes and each arrives once, in order."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from itertools import permutations
from pathlib import Path
from typing import Any

import trio
from bridge_fakes import short_tmp

from tvdnet import ControlError
from tvdnet.control import control_request
from tvdnet_tools.local import LocalMember, LocalTvd, free_port, stop_processes

VMS = ("vm-a", "vm-b", "vm-c")
PERIOD_S = 0.8
# Three period changes at least: received messages name four periods or more.
PERIODS_SEEN = 4
BIN = Path(sys.executable).parent


def local_tvd(tmp: Path) -> LocalTvd:
    members = [
        LocalMember(vm, f"127.0.0.1:{free_port()}", f"unix-listen:{vm}.sock", f"unix:{vm}.sock")
        for vm in VMS
    ]
    return LocalTvd(tmp, "proc", members, period_s=PERIOD_S, periods=100_000)


class Processes:
    def __init__(self) -> None:
        self.procs: dict[str, trio.Process] = {}
        self.stderr: dict[str, list[str]] = defaultdict(list)
        self.received: dict[str, list[dict[str, Any]]] = defaultdict(list)

    async def start(self, nursery: trio.Nursery, name: str, command: list[str]) -> None:
        proc = await trio.lowlevel.open_process(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self.procs[name] = proc
        assert proc.stdout is not None and proc.stderr is not None
        nursery.start_soon(self._lines, proc.stdout, self._on_stdout, name)
        nursery.start_soon(self._lines, proc.stderr, self.stderr[name].append, name)

    def _on_stdout(self, line: str) -> None:
        event = json.loads(line)
        assert event["event"] == "received"
        self.received[event["vm"]].append(event)

    @staticmethod
    async def _lines(stream: trio.abc.ReceiveStream, sink: Any, name: str) -> None:
        buffer = b""
        async for chunk in stream:
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                sink(line.decode())

    async def stop(self) -> dict[str, int]:
        stopped = await stop_processes(self.procs, timeout=60)
        return {name: how.returncode for name, how in stopped.items()}

    def logs(self) -> str:
        return "\n".join(f"--- {n}\n" + "\n".join(lines) for n, lines in self.stderr.items())


async def test_a_bridge_and_three_node_processes_across_period_changes() -> None:
    with short_tmp() as tmp:
        tvd = local_tvd(tmp)
        tvd.write()
        provision = subprocess.run(
            [BIN / "tvdnet-bridge", "provision", tvd.tvd_file, "--out", tmp / "keys",
             "--plaintext"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert provision.returncode == 0, provision.stderr
        for vm in VMS:
            # Relative paths in a node's file are relative to it (the sockets beside it).
            tvd.write_node_config(vm, skew_allowance=0.2, control_socket=f"{vm}.ctl")
        procs = Processes()
        sent: dict[tuple[str, str], int] = defaultdict(int)
        try:
            async with trio.open_nursery() as nursery:
                await procs.start(nursery, "bridge", [
                    os.fspath(BIN / "tvdnet-bridge"), "run",
                    "--config", os.fspath(tvd.tvd_file),
                    "--keystore", os.fspath(tvd.keystore),
                    "--control", os.fspath(tmp / "bridge.ctl"),
                ])  # fmt: skip
                for vm in VMS:
                    await procs.start(nursery, vm, [
                        os.fspath(BIN / "tvdnet"), "node",
                        "--config", os.fspath(tmp / f"{vm}.toml"),
                    ])  # fmt: skip

                def periods_seen() -> set[int]:
                    return {e["period"] for events in procs.received.values() for e in events}

                def periods_of(a: str, b: str) -> set[int]:
                    return {e["period"] for e in procs.received[b] if e["from"] == a}

                async def talk(a: str, b: str) -> None:
                    # One message at a time per ordered pair: send() returns on the ACK.
                    # Until the TVD has seen PERIODS_SEEN periods and this pair's own
                    # messages crossed a period change: on a busy machine one pair may
                    # connect only after the others have seen all their periods.
                    while len(periods_seen()) < PERIODS_SEEN or len(periods_of(a, b)) < 2:
                        body = {"from": a, "n": sent[a, b]}
                        try:
                            reply = await control_request(
                                tmp / f"{a}.ctl",
                                {"command": "send", "peer": b, "body": body, "timeout": 60},
                            )
                        except ControlError:  # the node has not opened its control socket yet
                            await trio.sleep(0.2)
                            continue
                        assert reply == {"ok": True}, reply
                        sent[a, b] += 1

                with trio.fail_after(240):
                    async with trio.open_nursery() as talkers:
                        for a, b in permutations(VMS, 2):
                            talkers.start_soon(talk, a, b)
                    # Every send was acknowledged, so the receiver holds the message; wait
                    # for its process to print it.
                    while any(
                        len([e for e in procs.received[b] if e["from"] == a]) < sent[a, b]
                        for a, b in permutations(VMS, 2)
                    ):
                        await trio.sleep(0.1)
                codes = await procs.stop()
        except BaseException:
            print(procs.logs())
            raise
        assert codes == dict.fromkeys(["bridge", *VMS], 0), procs.logs()

    for a, b in permutations(VMS, 2):
        bodies = [e["body"] for e in procs.received[b] if e["from"] == a]
        assert sent[a, b] > 0
        # Exactly once and in order: the n-th message received is message n.
        assert bodies == [{"from": a, "n": n} for n in range(sent[a, b])], (a, b)
    assert len(periods_seen()) >= PERIODS_SEEN
    log = procs.logs()
    assert "Traceback" not in log
    assert "event=period" in log  # the bridge rotated

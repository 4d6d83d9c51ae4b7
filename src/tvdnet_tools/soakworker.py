"""One node of `tvdnet soak`: a real node process and the application whose record the
checker reads.

    python -m tvdnet_tools.soakworker NODE.toml --incarnation K --peers a,b,c
                                      --record FILE [--interval S] [--send-timeout S]
                                      [--clock-offset S]

To each peer it sends `[incarnation, n]` every `interval` seconds, n counting from 0 per
peer in each incarnation (a process start), and it records every event as one JSON line,
appended and flushed at once (a SIGKILL loses at most the line being written):

    {"e": "start", "inc": K, "t": T}
    {"e": "sent", "to": PEER, "inc": K, "n": N, "ok": true, "lat": S, "t": T}   acknowledged
    {"e": "sent", "to": PEER, "inc": K, "n": N, "ok": false, "t": T}   SendTimeout: queued
    {"e": "sent", ..., "ok": false, "failed": true, "t": T}   SendFailedError: the peer left
    {"e": "recv", "from": PEER, "inc": K2, "n": N, "t": T}                delivered
    {"e": "reject", "to": PEER, "reason": R, "count": C, "t": T}   REJECTs it sent PEER
    {"e": "final", "inc": K, "stats": {...}, "t": T}                     after SIGTERM

SIGUSR1 stops the senders (the node keeps delivering what is queued and receiving);
SIGTERM (or SIGINT) stops them too, then the node stops receiving (`stop_receiving()`:
nothing more is acknowledged), the application takes what is left in the inbox, records
the node's counters and closes the node cleanly.
`T` is CLOCK_MONOTONIC, which every process on the machine shares.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from typing import IO, Any

import trio

from tvdnet import Node, NodeConfig, SendFailedError, SendTimeout, UnknownPeer, WallClock, open_node


class Record:
    def __init__(self, path: Path) -> None:
        self._file: IO[str] = path.open("a", buffering=1)

    def write(self, **event: Any) -> None:
        event["t"] = round(time.monotonic(), 4)
        self._file.write(json.dumps(event, separators=(",", ":")) + "\n")

    def close(self) -> None:
        self._file.close()


async def _send_to(
    node: Node, peer: str, incarnation: int, args: argparse.Namespace, record: Record
) -> None:
    n = 0
    while True:
        began = time.monotonic()
        try:
            await node.send(peer, [incarnation, n], timeout=args.send_timeout)
        except UnknownPeer:  # suspended from the TVD: not taken; the same n again later
            await trio.sleep(args.interval)
            continue
        except SendTimeout:
            record.write(e="sent", to=peer, inc=incarnation, n=n, ok=False)
        except SendFailedError:  # the peer left the TVD: dropped, delivered at most once
            record.write(e="sent", to=peer, inc=incarnation, n=n, ok=False, failed=True)
        else:
            lat = round(time.monotonic() - began, 4)
            record.write(e="sent", to=peer, inc=incarnation, n=n, ok=True, lat=lat)
        n += 1
        await trio.sleep(args.interval)


async def _receive(node: Node, record: Record) -> None:
    async for message in node:
        incarnation, n = message.body
        record.write(e="recv", **{"from": message.sender}, inc=incarnation, n=n)


async def _watch_rejects(node: Node, record: Record) -> None:
    """Every REJECT this node sends, by peer and reason, within 0.25 s of it: the checker
    holds each against the faults that could have made it inevitable."""
    seen: dict[tuple[str, str], int] = {}
    while True:
        peers = node.status()["peers"]
        # A peer that left is counted afresh when it comes back.
        seen = {key: count for key, count in seen.items() if key[0] in peers}
        for peer, state in peers.items():
            for reason in ("expired", "unknown"):
                count, before = state[f"rejected_{reason}"], seen.get((peer, reason), 0)
                new = count - before if count >= before else count
                if new:
                    record.write(e="reject", to=peer, reason=reason, count=new)
                seen[peer, reason] = count
        await trio.sleep(0.25)


async def main(args: argparse.Namespace) -> None:
    record = Record(args.record)
    config = NodeConfig.load(args.config)
    # Tests only: this node's clock runs `clock_offset` seconds off the machine's.
    clock = WallClock(time.time() - trio.current_time() + args.clock_offset)
    try:
        async with open_node(config, clock=clock) as node:
            record.write(e="start", inc=args.incarnation)
            async with trio.open_nursery() as nursery:
                # Ends once the node stopped receiving and its inbox is empty.
                nursery.start_soon(_receive, node, record)
                watcher = trio.CancelScope()

                async def watch() -> None:
                    with watcher:
                        await _watch_rejects(node, record)

                nursery.start_soon(watch)
                stops = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
                with trio.open_signal_receiver(*stops) as signals:
                    async with trio.open_nursery() as senders:
                        for peer in args.peers:
                            senders.start_soon(_send_to, node, peer, args.incarnation, args, record)
                        signum = await signals.__anext__()  # any of them stops the senders
                        senders.cancel_scope.cancel()
                    while signum == signal.SIGUSR1:  # keep receiving until SIGTERM or SIGINT
                        signum = await signals.__anext__()
                # What the node acknowledged is the application's to take; what comes
                # after this is left to its senders for this VM's next incarnation.
                node.stop_receiving()
                watcher.cancel()
            record.write(e="final", inc=args.incarnation, stats=dict(node.stats))
    finally:
        record.close()


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tvdnet_tools.soakworker")
    parser.add_argument("config", type=Path)
    parser.add_argument("--incarnation", type=int, required=True)
    parser.add_argument("--peers", type=lambda s: [p for p in s.split(",") if p], required=True)
    parser.add_argument("--record", type=Path, required=True)
    parser.add_argument("--interval", type=float, default=0.2)
    parser.add_argument("--send-timeout", type=float, default=30.0)
    parser.add_argument("--clock-offset", type=float, default=0.0, help="seconds (tests only)")
    trio.run(main, parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(cli())

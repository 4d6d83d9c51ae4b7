"""A terminal chat for one VM of a TVD: a small, complete application of tvdnet.

    python examples/chat.py --config examples/vm-a.toml          # inside VM vm-a
    python examples/chat.py --config examples/local/vm-a.toml    # on one machine (README)

It embeds a node (`tvdnet.open_node`). Type a line to send it to every member, or:

    /msg PEER TEXT   to one member only
    /who             the members, and whether this node holds a key and a connection for each
    /period          the period this node holds keys for, and its key channel
    /quit            leave (Ctrl-D too)

Each message shows who sent it and under which period's key it arrived. Sends are
confirmed per recipient once it acknowledged (SPEC §4: delivered exactly once, in order),
or reported as failed; frames the node refused (an expired or unknown period, a failed
authentication) and period changes are shown as they happen.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import trio
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import tvdnet

# Node counters that mean "refused something"; shown when they move.
REFUSALS = {
    "rejected_expired": "a frame under an expired period key",
    "rejected_unknown": "a frame of a period it holds no key for",
    "auth_failures": "a frame that failed authentication",
    "protocol_errors": "a protocol error",
    "connections_displaced": "a connection over the cap on unauthenticated ones",
}
WATCH_INTERVAL = 0.5  # seconds between looks at the node's period and counters


def text_of(body: Any) -> tuple[str, bool]:
    """(text, private) from a message body: this chat sends maps; `tvdnet send` strings."""
    if isinstance(body, Mapping) and "text" in body:
        return str(body["text"]), bool(body.get("private"))
    return str(body), False


class Chat:
    def __init__(self, node: tvdnet.Node, console: Console, timeout: float) -> None:
        self.node = node
        self.console = console
        self.timeout = timeout

    def show(self, text: str) -> None:
        self.console.print(text, highlight=False)

    # ------------------------------------------------------------------ incoming

    async def show_incoming(self) -> None:
        async for message in self.node:
            text, private = text_of(message.body)
            where = " [dim](to you only)[/]" if private else ""
            self.show(
                f"[dim]p{message.period}[/] [bold]{escape(message.sender)}[/]{where}: "
                f"{escape(text)}"
            )

    async def watch(self) -> None:
        """Period changes, being cut off from the bridge, and refusals, as they happen."""
        node = self.node
        period: int | None = None
        ready = False
        cut_off = False
        seen = {name: node.stats.get(name, 0) for name in REFUSALS}
        while True:
            if node.period != period:
                period = node.period
                if period is not None and not ready:
                    ready = True
                    peers = ", ".join(node.peers) or "none"
                    self.show(
                        f"[green]keys for period {period}: you can chat[/] (members: {peers}; "
                        "/who, /period, /msg PEER TEXT, /quit)"
                    )
                elif period is not None:
                    self.show(f"[yellow]-- period {period}: new pair keys, the old ones erased[/]")
            status = node.status()
            if status["cut_off"] and not cut_off:
                self.show(
                    "[red]cut off: the period ended without new keys from the bridge; "
                    "messages wait until keys arrive[/]"
                )
            cut_off = bool(status["cut_off"])
            stats = node.stats
            for name, what in REFUSALS.items():
                now = stats.get(name, 0)
                if now > seen[name]:
                    self.show(
                        f"[red]refused {now - seen[name]} x {what}[/] [dim]({name} = {now})[/]"
                    )
                    seen[name] = now
            await trio.sleep(WATCH_INTERVAL)

    # ------------------------------------------------------------------ outgoing

    async def send_one(self, peer: str, body: Any) -> None:
        try:
            await self.node.send(peer, body, timeout=self.timeout)
        except tvdnet.TvdnetError as exc:
            self.show(f"[red]x not delivered to {escape(peer)}[/]: {escape(str(exc))}")
        else:
            self.show(f"[dim]  ✓ {escape(peer)} has it[/]")

    async def send_everyone(self, text: str, nursery: trio.Nursery) -> None:
        if not self.node.peers:
            self.show("[red]x no member to send to yet[/]")
            return
        for peer in self.node.peers:
            nursery.start_soon(self.send_one, peer, {"text": text})

    def who(self) -> None:
        status = self.node.status()
        table = Table(title=f"{status['vm']} in TVD {status['tvd']}")
        for column in ("member", "key period", "key held", "connected", "waiting for ack"):
            table.add_column(column)
        for peer, state in sorted(status["peers"].items()):
            table.add_row(
                peer,
                str(state["period"] or "-"),
                "yes" if state["has_key"] else "no",
                "yes" if state["connected"] else "no",
                str(state["unacknowledged"]),
            )
        self.console.print(table)

    def period(self) -> None:
        status = self.node.status()
        held = status["period"]
        self.show(
            f"period by the clock: {status['schedule_period'] or '-'}; keys held for period: "
            f"{held if held is not None else 'none'}; key channel: {status['key_channel']}"
            + ("; [red]cut off[/]" if status["cut_off"] else "")
        )

    async def commands(self, nursery: trio.Nursery) -> None:
        while True:
            line = await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
            if not line:
                return  # end of input
            line = line.strip()
            if not line:
                continue
            if line in ("/quit", "/exit"):
                return
            if line == "/who":
                self.who()
            elif line == "/period":
                self.period()
            elif line.startswith("/msg"):
                words = line.split(maxsplit=2)
                if len(words) < 3 or words[0] != "/msg":
                    self.show("usage: /msg PEER TEXT")
                else:
                    body = {"text": words[2], "private": True}
                    nursery.start_soon(self.send_one, words[1], body)
            elif line.startswith("/"):
                self.show("commands: /msg PEER TEXT, /who, /period, /quit; anything else: to all")
            else:
                await self.send_everyone(line, nursery)


async def main(config: tvdnet.NodeConfig, console: Console, timeout: float) -> None:
    async with tvdnet.open_node(config) as node, trio.open_nursery() as nursery:
        console.print(
            f"[bold]{node.vm}[/] of TVD [bold]{node.tvd}[/]: waiting for keys from the bridge "
            f"(key channel {config.key_channel})",
            highlight=False,
        )
        chat = Chat(node, console, timeout)
        nursery.start_soon(chat.show_incoming)
        nursery.start_soon(chat.watch)
        await chat.commands(nursery)
        console.print("bye")
        nursery.cancel_scope.cancel()


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A terminal chat for one VM of a TVD.")
    parser.add_argument("--config", type=Path, required=True, help="the node's TOML file")
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="seconds to wait for each recipient's acknowledgement")  # fmt: skip
    parser.add_argument("--log-level", default="error",
                        choices=["debug", "info", "warning", "error"])  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")  # fmt: skip
    console = Console()
    try:
        config = tvdnet.NodeConfig.load(args.config)
        trio.run(main, config, console, args.timeout)
    except tvdnet.TvdnetError as exc:
        console.print(f"[red]chat: {escape(str(exc))}[/]")
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(run())

"""The `tvdnet` command: run a node, ask it for its status, send through it.

Tools above the library (`tvdnet demo`, `tvdnet loadtest`) are plugins: each is an entry
point of the group `tvdnet.commands` (a function that adds its subparser and sets its
`handler`), loaded only when its command is the one asked for. The guest library never
imports them; where the tools are not installed (a VM), the command says so.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import signal
import sys
from collections.abc import Callable, Sequence
from functools import partial
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import trio

from . import __version__
from ._clock import WallClock
from ._node import open_node
from .config import NodeConfig
from .control import control_request
from .core.errors import ControlError, TvdnetError, single_error
from .core.events import Message
from .core.jsonform import to_json

logger = logging.getLogger("tvdnet")


PLUGIN_GROUP = "tvdnet.commands"


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tvdnet", description="Key-insulated secure messaging between the VMs of a TVD."
    )
    parser.add_argument("--version", action="version", version=f"tvdnet {__version__}")
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    node = commands.add_parser(
        "node",
        help="run a node: print each received message as a JSON line, serve the control socket",
    )
    node.add_argument("--config", type=Path, required=True, help="the node's TOML file")
    node.add_argument("--control", type=Path, help="control socket (overrides control_socket)")

    status = commands.add_parser("status", help="print a running node's status (JSON)")
    status.add_argument("--control", type=Path, required=True, help="the node's control socket")

    send = commands.add_parser("send", help="send a message through a running node")
    send.add_argument("--control", type=Path, required=True, help="the node's control socket")
    send.add_argument("peer", help="the member to send to")
    send.add_argument("text", help="the message (sent as a msgpack string)")
    send.add_argument(
        "--timeout",
        type=_seconds,
        help="seconds to wait for the peer's acknowledgement (default: the node's "
        "send_timeout); the message stays queued in the node after a timeout",
    )

    node.set_defaults(handler=_node_command)
    status.set_defaults(handler=_status_command)
    send.set_defaults(handler=_send_command)
    _add_plugins(commands, argv)
    return parser


def _add_plugins(commands: Any, argv: Sequence[str]) -> None:
    """The tools' subcommands: the one named in `argv` is loaded, the others only listed."""
    for entry in entry_points(group=PLUGIN_GROUP):
        if entry.name not in argv:
            commands.add_parser(entry.name, help=f"a tool (`tvdnet {entry.name} --help`)")
            continue
        try:
            register = entry.load()
        except ImportError as exc:
            missing = exc.name or "a module"
            parser = commands.add_parser(entry.name)
            parser.set_defaults(handler=partial(_not_installed, entry.name, missing))
            continue
        register(commands)


def _not_installed(name: str, missing: str, args: argparse.Namespace) -> int:
    print(
        f"tvdnet {name}: a tool that is not installed here ({missing} is missing); "
        "install it with: pip install 'tvdnet[tools]'",
        file=sys.stderr,
    )
    return 2


async def _run_node(config: NodeConfig, clock: WallClock | None = None) -> None:
    async with open_node(config, clock=clock) as node, trio.open_nursery() as nursery:

        async def on_signals() -> None:
            # The first signal stops receiving: what the node acknowledged is printed and
            # the loop below ends; a second one stops at once.
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                stopping = False
                async for signum in signals:
                    logger.info(
                        "event=stopping vm=%s signal=%s", node.vm, signal.Signals(signum).name
                    )
                    if stopping:
                        nursery.cancel_scope.cancel()
                        return
                    stopping = True
                    node.stop_receiving()

        nursery.start_soon(on_signals)
        async for message in node:
            print(received_line(node.vm, message), flush=True)
        nursery.cancel_scope.cancel()


def received_line(vm: str, message: Message) -> str:
    """One JSON line per message received: the body without loss (`tvdnet.core.jsonform`),
    or, for a body too deeply nested to print, an error in its place: any value a member
    may send is acknowledged already, so the node prints what it can and goes on."""
    line: dict[str, Any] = {
        "event": "received",
        "vm": vm,
        "from": message.sender,
        "period": message.period,
    }
    try:
        line["body"] = to_json(message.body)
    except ValueError as exc:
        line["event"] = "received-unprintable"
        line["error"] = f"the body cannot be printed: {exc}"
    return json.dumps(line, allow_nan=False)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds >= 0")
    return value


def _control(path: Path, request: dict[str, Any], *, wait: float = 60.0) -> dict[str, Any]:
    """One request to the node's control socket; ControlError (printed by `main` as one
    line, exit 2) when nothing answers, the answer is late, cut short or not JSON."""
    try:
        return trio.run(functools.partial(control_request, path, request, timeout=wait))
    except OSError as exc:
        raise ControlError(f"{path}: cannot reach the node ({exc.strerror or exc})") from None


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(arguments).parse_args(arguments)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except (TvdnetError, BaseExceptionGroup) as exc:
        error = single_error(exc)
        if error is None:
            raise
        # A node's errors name its file, which says which command it was.
        prefix = "tvdnet" if args.command == "node" else f"tvdnet {args.command}"
        print(f"{prefix}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _node_command(args: argparse.Namespace) -> int:
    config = NodeConfig.load(args.config)
    if args.control is not None:
        config = NodeConfig(**{**_fields(config), "control_socket": args.control})
    trio.run(_run_node, config)
    return 0


def _status_command(args: argparse.Namespace) -> int:
    print(json.dumps(_control(args.control, {"command": "status"}), indent=2))
    return 0


def _send_command(args: argparse.Namespace) -> int:
    request: dict[str, Any] = {"command": "send", "peer": args.peer, "body": args.text}
    if args.timeout is not None:
        request["timeout"] = args.timeout
    # The node answers when the peer acknowledges or its send timeout ends: wait for that
    # (its own send_timeout is not known here when --timeout is not given).
    wait = args.timeout + 30.0 if args.timeout is not None else math.inf
    reply = _control(args.control, request, wait=wait)
    if not reply.get("ok"):
        print(f"tvdnet send: {reply.get('type')}: {reply.get('error')}", file=sys.stderr)
        return 2
    print(f"sent to {args.peer}: acknowledged")
    return 0


def _fields(config: NodeConfig) -> dict[str, Any]:
    return {name: getattr(config, name) for name in config.__dataclass_fields__}


if __name__ == "__main__":
    sys.exit(main())

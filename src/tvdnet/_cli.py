"""The `tvdnet` command: run a node, ask it for its status, send through it."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from . import __version__
from ._config import ConfigError, NodeConfig
from ._control import control_request
from ._errors import TvdnetError
from ._node import open_node

logger = logging.getLogger("tvdnet")


def build_parser() -> argparse.ArgumentParser:
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
    send.add_argument("--timeout", type=float, default=30.0)

    from ._demo import add_demo_parser

    add_demo_parser(commands)
    from ._loadtest import add_loadtest_parser

    add_loadtest_parser(commands)
    return parser


async def _run_node(config: NodeConfig) -> None:
    async with open_node(config) as node, trio.open_nursery() as nursery:

        async def on_signals() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    logger.info(
                        "event=stopping vm=%s signal=%s", node.vm, signal.Signals(signum).name
                    )
                    nursery.cancel_scope.cancel()
                    return

        nursery.start_soon(on_signals)
        async for message in node:
            line = {
                "event": "received",
                "vm": node.vm,
                "from": message.sender,
                "period": message.period,
                "body": message.body,
            }
            print(json.dumps(line, default=repr), flush=True)


def _control(path: Path, request: dict[str, Any]) -> dict[str, Any]:
    try:
        return trio.run(control_request, path, request)
    except OSError as exc:
        raise SystemExit(f"tvdnet: {path}: cannot reach the node ({exc.strerror or exc})") from None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    if args.command == "node":
        try:
            config = NodeConfig.load(args.config)
            if args.control is not None:
                config = NodeConfig(**{**_fields(config), "control_socket": args.control})
            trio.run(_run_node, config)
        except (ConfigError, TvdnetError) as exc:
            print(f"tvdnet: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.command == "status":
        print(json.dumps(_control(args.control, {"cmd": "status"}), indent=2))
        return 0
    if args.command == "send":
        reply = _control(
            args.control,
            {"cmd": "send", "peer": args.peer, "body": args.text, "timeout": args.timeout},
        )
        if not reply.get("ok"):
            print(f"tvdnet: {reply.get('type')}: {reply.get('error')}", file=sys.stderr)
            return 1
        return 0
    if args.command == "demo":
        from ._demo import run_demo

        return run_demo(args)
    if args.command == "loadtest":
        from ._loadtest import run_loadtest

        return run_loadtest(args)
    raise AssertionError(f"unhandled command {args.command}")


def _fields(config: NodeConfig) -> dict[str, Any]:
    return {name: getattr(config, name) for name in config.__dataclass_fields__}


if __name__ == "__main__":
    sys.exit(main())

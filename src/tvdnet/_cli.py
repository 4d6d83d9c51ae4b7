"""The `tvdnet` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import __version__


def _not_yet(name: str) -> int:
    print(f"tvdnet {name}: not implemented yet", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tvdnet", description="Key-insulated secure messaging between the VMs of a TVD."
    )
    parser.add_argument("--version", action="version", version=f"tvdnet {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("node", help="run a node (not implemented yet)")
    commands.add_parser("demo", help="a whole TVD on this machine (not implemented yet)")
    commands.add_parser("loadtest", help="many peers on loopback (not implemented yet)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return _not_yet(args.command)


if __name__ == "__main__":
    sys.exit(main())

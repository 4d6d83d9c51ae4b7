"""The `tvdnet-bridge` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tvdnet-bridge", description="The device key-update daemon of a TVD."
    )
    parser.add_argument("--version", action="version", version=f"tvdnet-bridge {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in [
        ("provision", "create the keys of a TVD"),
        ("run", "serve every VM's key channel"),
        ("status", "show each VM's key-update state"),
        ("reload", "re-read the membership"),
    ]:
        commands.add_parser(name, help=f"{text} (not implemented yet)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print(f"tvdnet-bridge {args.command}: not implemented yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

"""`tvdnet demo`: a whole TVD on this machine (not implemented yet)."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_demo_parser(commands: Any) -> None:
    demo = commands.add_parser("demo", help="a whole TVD on this machine, with a scripted chat")
    demo.add_argument("--fast", action="store_true", help="short periods, done in under 30 s")


def run_demo(args: argparse.Namespace) -> int:
    print("tvdnet demo: coming (the demo issue has not landed yet)", file=sys.stderr)
    return 0

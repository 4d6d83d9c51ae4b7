"""The bridge's key delivery: period start to one VM's ack, by transport and peer count.

For a VM with 1, 10, 100 and 1,200 peers (partial keys per update), in one run: over a
Unix socket, a pty and TCP on loopback (approach II), and as an ISO image written on
tmpfs, swapped in over QMP and read back (approach I). How it is measured is in
benchmarks/_keydelivery.py (shared with fig3a.py). Two figures per variant:

- start -> ack: the period's scheduled start to the bridge reading the VM's ack (the
  issue's definition); it includes how late the bridge's timer fired;
- push -> ack: from the bridge beginning the period (U*, the k partials) to the ack.

Target (issue 3): 1,200 partials delivered and acked over a Unix socket in under 20 ms.
Variants run interleaved, `--repetitions` times; the table shows medians and the ratio
to the Unix socket at the same k; everything else is in the JSON.

    python benchmarks/bridge.py [--repetitions 5] [--periods 3] [--period 1.0] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _keydelivery import APPROACHES, Variant, machine, run_interleaved, summarize
from rich.console import Console
from rich.table import Table

TRANSPORTS = ("unix", "pty", "tcp", "iso")
KS = (1, 10, 100, 1200)
TARGET_MS = 20.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--periods", type=int, default=3, help="measured periods per run")
    parser.add_argument("--period", type=float, default=1.0, help="period length, seconds")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()

    variants = [Variant(transport, k) for transport in TRANSPORTS for k in KS]
    samples, missed = run_interleaved(
        variants, args.repetitions, periods=args.periods, period_s=args.period, quiet=args.quiet
    )
    push = summarize(samples, "push_to_ack_ms")
    start = summarize(samples, "start_to_ack_ms")

    table = Table(title="bridge: one VM's update, median ms (start -> ack / push -> ack)")
    table.add_column("peers", justify="right")
    for transport in TRANSPORTS:
        table.add_column(APPROACHES[transport], justify="right")
    for k in KS:
        base = push.get(("unix", k))
        cells = []
        for transport in TRANSPORTS:
            p, s = push.get((transport, k)), start.get((transport, k))
            if p is None or s is None:
                cells.append("-")
                continue
            ratio = ""
            if base is not None and transport != "unix":
                ratio = f" [{p.median_ms / base.median_ms:.1f}x]"
            cells.append(f"{s.median_ms:.2f} / {p.median_ms:.2f}{ratio}")
        table.add_row(f"{k:,}", *cells)
    console = Console()
    console.print(table)
    console.print("[x]: push -> ack relative to the Unix socket at the same k (same run)")
    target = push.get(("unix", 1200))
    target_start = start.get(("unix", 1200))
    if target is not None and target_start is not None:
        verdict = "met" if target_start.median_ms < TARGET_MS else "MISSED"
        console.print(
            f"target: 1,200 partials over a Unix socket, start -> ack under {TARGET_MS:g} ms: "
            f"median {target_start.median_ms:.2f} ms, best {target_start.best_ms:.2f} ms "
            f"(push -> ack median {target.median_ms:.2f}, best {target.best_ms:.2f}): {verdict}"
        )
    if any(missed.values()):
        console.print(f"periods without a sample (stalls longer than a period): {missed}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": machine(),
                    "repetitions": args.repetitions,
                    "periods_per_run": args.periods,
                    "period_s": args.period,
                    "missed": missed,
                    "start_to_ack_ms": [s.to_json() for s in start.values()],
                    "push_to_ack_ms": [s.to_json() for s in push.values()],
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()

"""The paper's Fig. 3(a): time to deliver k key updates to one VM, approach I against II.

For k = 1 ... 1,200 partial keys per update (the VM's peers), in one run, the time from
the bridge beginning a period (U*: evolving dev_t and deriving the k partials) to the
VM holding the k new period keys:

- approach I:  the update as UPDATE.MP in an ISO 9660 image written on tmpfs, swapped in
               over QMP, read back and applied on the guest side (no real drive: a lower
               bound of what the paper timed);
- approach II: virtio-serial stand-ins, a pty and a Unix socket: bridge -> the node's
               key-channel driver and KeyAgent -> ack back to the bridge.

How it is measured is in benchmarks/_keydelivery.py. Every repetition runs every (approach,
k) once, in a shuffled order; the plot shows medians with the interquartile range as error
bars, on log scales; the table gives each approach's median and its ratio to the Unix
socket's at the same k, which is what survives the noise of a shared machine.

    python benchmarks/fig3a.py [--repetitions 5] [--periods 3] [--period 1.0]
                               [--k 1,10,100,300,600,1200] [--csv fig3a.csv] [--png fig3a.png]
                               [--json fig3a.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _keydelivery import (
    APPROACHES,
    Sample,
    Summary,
    Variant,
    machine,
    run_interleaved,
    summarize,
)
from rich.console import Console
from rich.table import Table

FIG3A_APPROACHES = ("iso", "pty", "unix")
BASELINE = "unix"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", default="1,10,100,300,600,1200", help="partials per update")
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--periods", type=int, default=3, help="measured periods per run")
    parser.add_argument("--period", type=float, default=1.0, help="period length, seconds")
    parser.add_argument("--csv", type=Path, default=Path("fig3a.csv"))
    parser.add_argument("--png", type=Path, default=Path("fig3a.png"))
    parser.add_argument("--json", type=Path, help="summaries and the machine, as JSON")
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args()


def write_csv(samples: list[Sample], path: Path) -> None:
    with path.open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(asdict(samples[0])))
        writer.writeheader()
        for sample in samples:
            writer.writerow(asdict(sample))


def plot(summaries: dict[tuple[str, int], Summary], path: Path, subtitle: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(8, 5))
    for approach, marker in zip(FIG3A_APPROACHES, ("s", "o", "^"), strict=True):
        rows = sorted((s for s in summaries.values() if s.approach == approach), key=lambda s: s.k)
        if not rows:
            continue
        axis.errorbar(
            [s.k for s in rows],
            [s.median_ms for s in rows],
            yerr=[
                [s.median_ms - s.p25_ms for s in rows],
                [s.p75_ms - s.median_ms for s in rows],
            ],
            marker=marker,
            capsize=3,
            label=APPROACHES[approach],
        )
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("k: partial keys delivered to one VM (its peers)")
    axis.set_ylabel("bridge begins the period -> VM holds the keys, ms")
    axis.set_title(f"Fig. 3(a) on this machine: medians, bars = quartiles\n{subtitle}", fontsize=10)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(summaries: dict[tuple[str, int], Summary], ks: list[int]) -> Table:
    out = Table(title="Fig. 3(a): bridge begins the period -> VM holds k keys (median ms)")
    out.add_column("k", justify="right")
    for approach in FIG3A_APPROACHES:
        out.add_column(APPROACHES[approach], justify="right")
    out.add_column("I / II (unix)", justify="right")
    for k in ks:
        base = summaries.get((BASELINE, k))
        cells = []
        for approach in FIG3A_APPROACHES:
            summary = summaries.get((approach, k))
            if summary is None:
                cells.append("-")
                continue
            cell = f"{summary.median_ms:.2f} ({summary.p25_ms:.2f}-{summary.p75_ms:.2f})"
            cells.append(cell)
        iso = summaries.get(("iso", k))
        ratio = f"{iso.median_ms / base.median_ms:.1f}x" if iso and base else "-"
        out.add_row(str(k), *cells, ratio)
    return out


def main() -> None:
    args = parse_args()
    ks = [int(k) for k in args.k.split(",")]
    variants = [Variant(approach, k) for approach in FIG3A_APPROACHES for k in ks]
    samples, missed = run_interleaved(
        variants, args.repetitions, periods=args.periods, period_s=args.period, quiet=args.quiet
    )
    if not samples:
        raise SystemExit("no samples: every period was missed")
    write_csv(samples, args.csv)
    summaries = summarize(samples, "push_to_ack_ms")
    where = machine()
    plot(
        summaries,
        args.png,
        f"{where['cpus']} CPUs, load {where['loadavg'][0]:.1f}, {args.repetitions} repetitions "
        f"x {args.periods} periods",
    )
    console = Console()
    console.print(table(summaries, ks))
    if any(missed.values()):
        console.print(f"periods without a sample (stalls longer than a period): {missed}")
    console.print(f"CSV: {args.csv}  PNG: {args.png}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": where,
                    "repetitions": args.repetitions,
                    "periods_per_run": args.periods,
                    "period_s": args.period,
                    "missed": missed,
                    "push_to_ack_ms": [s.to_json() for s in summaries.values()],
                    "start_to_ack_ms": [
                        s.to_json() for s in summarize(samples, "start_to_ack_ms").values()
                    ],
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()

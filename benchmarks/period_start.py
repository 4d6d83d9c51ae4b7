"""The key work at a period start, for a hub with N peers, against the raw HMAC floor.

At each period start the bridge evolves every pair's device key and derives every
partial (U*, SPEC §3), and the hub node applies one partial per peer (U). Each of those
is one HMAC-SHA256 over a label, the pair context and the period. Three figures per N
(CPU milliseconds per period, median of --repeat runs):

- hmac:     2N bare `hmac.digest` calls over a fixed message (the floor);
- bridge:   `DeviceKeys.evolve_to(t + 1)` and `all_partials()` for the N pairs;
- uncached: the same with the pair context rebuilt and its ids re-checked at every call
            (`scheme._context.__wrapped__`, how it was before the cache).

Machines here are shared and noisy: compare the ratios, which come from the same run.

    python benchmarks/period_start.py [--peers 100 1200] [--repeat 7]
"""

from __future__ import annotations

import argparse
import hmac
import statistics
import time
from collections.abc import Callable

from tvdnet import scheme


def _cpu_ms(work: Callable[[], None], repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        began = time.process_time()
        work()
        samples.append((time.process_time() - began) * 1000)
    return statistics.median(samples)


def measure(peers: int, repeat: int) -> dict[str, float]:
    ids = ["hub", *(f"p{i:04d}" for i in range(1, peers + 1))]
    keys = scheme.generate("bench", ids, pairs=[("hub", p) for p in ids[1:]]).for_bridge(1)
    key, message = bytes(32), bytes(64)

    def floor() -> None:
        for _ in range(2 * peers):
            hmac.digest(key, message, "sha256")

    def period() -> None:
        keys.evolve_to(keys.period + 1)
        for mine in keys.all_partials().values():
            for partial in mine.values():
                partial[:] = bytes(len(partial))

    cached = scheme._context
    figures = {"hmac": _cpu_ms(floor, repeat), "bridge": _cpu_ms(period, repeat)}
    scheme._context = cached.__wrapped__  # type: ignore[assignment]
    try:
        figures["uncached"] = _cpu_ms(period, repeat)
    finally:
        scheme._context = cached
    keys.erase()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, nargs="+", default=[100, 1200])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    print(f"{'peers':>6} {'hmac ms':>9} {'bridge ms':>10} {'uncached ms':>12} "
          f"{'bridge/hmac':>12} {'uncached/bridge':>16}")  # fmt: skip
    for peers in args.peers:
        f = measure(peers, args.repeat)
        print(
            f"{peers:>6} {f['hmac']:>9.2f} {f['bridge']:>10.2f} {f['uncached']:>12.2f} "
            f"{f['bridge'] / f['hmac']:>12.2f} {f['uncached'] / f['bridge']:>16.2f}"
        )


if __name__ == "__main__":
    main()

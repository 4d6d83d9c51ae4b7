"""`tvdnet loadtest` end to end: a real bridge, a hub and 50 peers in worker processes.

Real processes, real time, loopback only. Nothing here asserts a timing: the machine is
shared and noisy. What must hold whatever the load: no message lost or duplicated across
the period changes, and a report with every figure the issue asks for.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REQUIRED = {
    "lost",
    "duplicates",
    "messages_per_s",
    "latency_ms",
    "key_update_ms",
    "resends",
    "key_channel_resends",
    "rejects",
    "rotations",
    "peak_rss_mb",
    "hub_per_peer_kib",
    "timeline",
    "gc_s",
    "cpu_s",
    "allowance_s",
    "machine_stall_ms",
}


def test_50_peers_for_10_seconds_lose_nothing(tmp_path: Path) -> None:
    report_path, plot_path = tmp_path / "report.json", tmp_path / "plot.png"
    command = [sys.executable, "-m", "tvdnet._cli", "loadtest", "--quiet"]
    command += ["--peers", "50", "--duration", "10", "--period", "3", "--rate", "2"]
    command += ["--processes", "2", "--json", str(report_path), "--plot", str(plot_path)]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=1800,  # minutes of start-up on a busy 2-core machine are normal
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report.keys() >= REQUIRED
    assert report["lost"] == 0 and report["duplicates"] == 0
    assert report["peers"] == 50 and report["processes"] == 2
    # Every peer sent to the hub and the hub to every peer (message 0 at least).
    assert report["messages"] > 0 and report["messages_per_s"] > 0
    assert set(report["latency_ms"]) == {"p50", "p99", "p999"}
    assert report["key_update_ms"].keys() >= {"p50", "max"}
    assert set(report["rejects"]) == {"expired", "unknown", "auth"}
    assert report["rejects"]["auth"] == 0  # no frame may fail to authenticate on loopback
    assert report["rotations"] >= 2  # 10 s of periods of 3 s
    assert report["peak_rss_mb"].keys() >= {"bridge", "hub", "worker-1", "worker-2"}
    assert report["hub_per_peer_kib"] > 0
    assert report["gc_s"].keys() == {"hub", "worker-1", "worker-2"}
    assert all(seconds >= 0 for seconds in report["gc_s"].values())
    # Every process worked, and none spent more CPU collecting garbage than in all.
    cpu = report["cpu_s"]
    assert cpu.keys() == {"bridge", "hub", "worker-1", "worker-2"}
    assert all(seconds > 0 for seconds in cpu.values())
    assert all(report["gc_s"][name] <= cpu[name] for name in report["gc_s"])
    assert report["allowance_s"] == 2.0  # the spec's default unless --allowance
    assert report["key_update_ms"]["missing"] is None  # the bridge answered its status
    # The stall probe woke at least once in 10 s, and never before its time.
    stall = report["machine_stall_ms"]
    assert 0 <= stall["p50"] <= stall["p99"] <= stall["max"]
    assert stall["stalled_fraction"] >= 0
    assert report["machine_mcalls_per_cpu_s"] > 0
    assert plot_path.read_bytes().startswith(b"\x89PNG")

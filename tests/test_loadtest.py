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

import pytest

from tvdnet._cli import main

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
    "rotation_p99_ms",
    "steady_p99_ms",
    "period_changes_s",
    "bridge_push_ms",
    "hub_apply_ms",
    "cpu_ms_per_node_period",
    "rejects_connecting",
}


def test_50_peers_for_10_seconds_lose_nothing(tmp_path: Path) -> None:
    report_path, plot_path = tmp_path / "report.json", tmp_path / "plot.png"
    command = [sys.executable, "-m", "tvdnet", "loadtest", "--quiet"]
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
    connecting = report["rejects_connecting"]
    assert set(connecting) == {"expired", "unknown"}
    assert all(0 <= connecting[k] <= report["rejects"][k] for k in connecting)
    assert report["rotations"] >= 2  # 10 s of periods of 3 s
    assert len(report["period_changes_s"]) == report["rotations"]
    # Messages sent within 1 s of a change are reported apart (figures, not asserted).
    assert report["rotation_messages"] > 0 and report["rotation_p99_ms"] > 0
    assert report["steady_p99_ms"] > 0
    assert report["bridge_push_ms"]["max"] >= report["bridge_push_ms"]["p50"] >= 0
    assert report["hub_apply_ms"]["max"] >= report["hub_apply_ms"]["p50"] > 0
    assert report["cpu_ms_per_node_period"] > 0
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


BASE = ["loadtest", "--peers", "1", "--duration", "1", "--period", "1"]


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        (["--peers", "0"], "argument --peers: must be 1 or more, not 0"),
        (["--peers", "1.5"], "argument --peers: '1.5' is not a whole number"),
        (["--period", "-5"], "argument --period: must be a finite number > 0, not -5"),
        (["--duration", "inf"], "argument --duration: must be a finite number > 0, not inf"),
        (["--rate", "0"], "argument --rate: must be a finite number > 0, not 0"),
        (["--allowance", "-1"], "argument --allowance: must be a finite number >= 0, not -1"),
        (["--size", "-1"], "argument --size: must be 0 or more, not -1"),
        (["--processes", "0"], "argument --processes: must be 1 or more, not 0"),
    ],
)
def test_a_bad_number_is_refused_before_anything_starts(
    extra: list[str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([*BASE, *extra])
    assert exit_.value.code == 2
    assert said in capsys.readouterr().err


def test_an_output_that_could_not_be_written_is_refused_before_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A long run must not end by losing its report: --json, --plot and --keep are checked
    # before any process starts (nothing is left behind in the temporary directory).
    cases = [
        (["--json", str(tmp_path / "no" / "r.json")], f"the directory {tmp_path / 'no'} does"),
        (["--plot", str(tmp_path)], f"--plot {tmp_path}: is a directory"),
        (["--keep", str(tmp_path / "file")], "exists and is not a directory"),
    ]
    (tmp_path / "file").write_text("")
    for extra, said in cases:
        assert main([*BASE, *extra]) == 2
        assert said in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]

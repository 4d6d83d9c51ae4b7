"""`tvdnet demo`: the whole TVD as OS processes, and the verdict it prints."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from tvdnet_tools.demo import FAST, Demo, Forgery

SUMMARY_ROW = re.compile(
    r"^\W*(sent|delivered|missing|duplicated|forged|refused|rotations)\W+(\d+)\W*$"
)


def summary(output: str) -> dict[str, int]:
    return {m.group(1): int(m.group(2)) for m in map(SUMMARY_ROW.match, output.splitlines()) if m}


def test_the_fast_demo_delivers_everything_once_and_refuses_every_forgery() -> None:
    command = [str(Path(sys.executable).parent / "tvdnet"), "demo", "--fast"]
    # Generous: on a loaded 2-core machine, four Python processes take long to start.
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    counts = summary(result.stdout)
    assert counts["sent"] > 0
    assert counts["delivered"] == counts["sent"]
    assert counts["missing"] == counts["duplicated"] == 0
    assert counts["forged"] >= 2
    assert counts["refused"] == counts["forged"]
    assert counts["rotations"] >= 3
    assert "OK: every message arrived exactly once" in result.stdout
    assert "REJECT expired" in result.stdout
    assert "Traceback" not in result.stderr


def _judged(tmp_path: Path, setup: Callable[[Demo], object]) -> tuple[bool, str]:
    console = Console(record=True, width=120)
    demo = Demo(tmp_path, FAST, console)
    demo.expected = {"m1": {"vm-b", "vm-c"}}
    demo.received.update({("m1", "vm-b"): 1, ("m1", "vm-c"): 1})
    demo.forgeries = [Forgery("vm-a", "vm-b", 4, 5, [2, 4, 0, "expired", 5], counted=True)]
    demo.rotations = 3
    demo.exit_codes = {"bridge": 0, "vm-a": 0}
    setup(demo)
    verdict = demo.report()
    return verdict, console.export_text()


def test_the_verdict_passes_a_clean_run(tmp_path: Path) -> None:
    ok, text = _judged(tmp_path, lambda demo: None)
    assert ok
    assert "OK:" in text
    assert summary(text) == {
        "sent": 2, "delivered": 2, "missing": 0, "duplicated": 0,
        "forged": 1, "refused": 1, "rotations": 3,
    }  # fmt: skip


def test_the_verdict_fails_a_duplicate(tmp_path: Path) -> None:
    ok, text = _judged(tmp_path, lambda demo: demo.received.update({("m1", "vm-c"): 1}))
    assert not ok
    assert summary(text)["duplicated"] == 1
    assert "FAILED" in text


def test_the_verdict_fails_a_missing_message(tmp_path: Path) -> None:
    ok, text = _judged(tmp_path, lambda demo: demo.received.pop(("m1", "vm-b")))
    assert not ok
    assert summary(text)["missing"] == 1


def test_the_verdict_fails_a_forgery_that_was_not_refused(tmp_path: Path) -> None:
    def accepted(demo: Demo) -> None:
        demo.forgeries[0].reject = None

    ok, text = _judged(tmp_path, accepted)
    assert not ok
    assert summary(text)["refused"] == 0
    assert "0 of 1 forged messages refused" in text


def test_the_verdict_fails_a_forgery_the_node_did_not_count(tmp_path: Path) -> None:
    def uncounted(demo: Demo) -> None:
        demo.forgeries[0].counted = False

    ok, _ = _judged(tmp_path, uncounted)
    assert not ok


def test_the_verdict_fails_too_few_rotations_and_a_crashed_process(tmp_path: Path) -> None:
    def short(demo: Demo) -> None:
        demo.rotations = 2
        demo.exit_codes["vm-a"] = 1

    ok, text = _judged(tmp_path, short)
    assert not ok
    assert "2 period changes" in text
    assert "processes exited with errors" in text

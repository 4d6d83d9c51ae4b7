"""examples/chat.py: two terminals on one machine chat through a real local bridge.

The example TVD of examples/local (the bridge listens on a Unix socket per VM), copied
to a temporary directory with free ports; `tvdnet-bridge run` and two chats as real
processes, the chats driven through ptys by pexpect as a person at a terminal would.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pexpect
import pytest

from device_bridge._cli import main as bridge_main
from tvdnet_tools.local import free_port, stop_process

REPO = Path(__file__).resolve().parent.parent
LOCAL = REPO / "examples" / "local"
CHAT = REPO / "examples" / "chat.py"
# Generous: a loaded 2-core machine may take long to start Python and a node.
TIMEOUT = 240
PERIOD_S = 1.5


@pytest.fixture
def local_tvd(tmp_path: Path) -> Iterator[Path]:
    """examples/local with free ports, provisioned, its bridge running."""
    directory = tmp_path / "tvd"
    directory.mkdir(mode=0o700)
    ports = {n: free_port() for n in (1, 2, 3)}
    for name in ("tvd.toml", "vm-a.toml", "vm-b.toml", "vm-c.toml"):
        text = (LOCAL / name).read_text()
        for n, port in ports.items():
            text = text.replace(f"127.0.0.1:710{n}", f"127.0.0.1:{port}")
        # Periods of 1.5 s, so that the conversation crosses period changes.
        text = text.replace("period_seconds = 10.0", f"period_seconds = {PERIOD_S}")
        (directory / name).write_text(text)
    command = ["provision", str(directory / "tvd.toml"), "--out", str(directory / "keys")]
    assert bridge_main([*command, "--plaintext"]) == 0
    run = [
        str(Path(sys.executable).parent / "tvdnet-bridge"), "run",
        "--config", str(directory / "tvd.toml"),
        "--keystore", str(directory / "keys" / "keystore.json"),
        "--control", str(directory / "ctl" / "control.sock"),
    ]  # fmt: skip
    with (directory / "bridge.log").open("wb") as log:
        bridge = subprocess.Popen(run, stderr=log)
    try:
        yield directory
    finally:
        stop_process(bridge, timeout=60)


def _chat(config: Path) -> pexpect.spawn[str]:
    # TERM=dumb: rich writes plain text, so the patterns below see no escape codes.
    environment = {**os.environ, "TERM": "dumb", "NO_COLOR": "1"}
    chat = pexpect.spawn(
        sys.executable,
        [str(CHAT), "--config", str(config), "--timeout", "5"],
        env=environment,
        encoding="utf-8",
        timeout=TIMEOUT,
        dimensions=(50, 200),
    )
    chat.logfile_read = io.StringIO()  # everything the person at this terminal saw
    return chat


def test_a_line_typed_in_one_chat_appears_in_the_other(local_tvd: Path) -> None:
    a = _chat(local_tvd / "vm-a.toml")
    b = _chat(local_tvd / "vm-b.toml")
    try:
        a.expect("you can chat")
        b.expect("you can chat")

        a.sendline("hello from vm-a")
        b.expect(r"p\d+ vm-a: hello from vm-a")
        a.expect("✓ vm-b has it")
        a.expect("x not delivered to vm-c")  # no chat runs for vm-c: no acknowledgement

        b.sendline("/msg vm-a just for you")
        a.expect(r"vm-b \(to you only\): just for you")
        b.expect("✓ vm-a has it")

        a.sendline("/who")
        a.expect(r"vm-b\s+│?\s*\d+\s+│?\s*yes\s+│?\s*yes")  # key period, key held, connected
        a.sendline("/period")
        a.expect(r"keys held for period: \d+; key channel: welcomed")
        a.sendline("/msg vm-q anyone?")
        a.expect("x not delivered to vm-q")

        # Across period changes in a quiet TVD (no attacker), nothing is refused.
        for i in range(4):
            b.sendline(f"/msg vm-a after change {i}")
            a.expect(rf"vm-b \(to you only\): after change {i}")
            time.sleep(PERIOD_S)

        for chat in (a, b):
            chat.sendline("/quit")
            chat.expect("bye")
            chat.expect(pexpect.EOF)
            chat.close()
            assert chat.exitstatus == 0
            seen = cast(io.StringIO, chat.logfile_read).getvalue()
            assert "refused" not in seen, seen
    finally:
        for chat in (a, b):
            chat.close(force=True)

"""What a VM installs: `pip install tvdnet` brings the guest library and its four
dependencies, nothing of the bridge or the tools, and a node runs from it.

The wheel is built from this checkout and installed without extras into a fresh virtual
environment; a bridge and a second node from the test's own environment (which has every
extra) talk to the node that runs there.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import trio
from bridge_fakes import short_tmp

from tvdnet import ControlError
from tvdnet.control import control_request
from tvdnet_tools.local import LocalMember, LocalTvd, free_port, stop_processes

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
VMS = ("vm-a", "vm-b")
GUEST_DEPENDENCIES = {"trio", "cryptography", "msgpack", "pyserial"}
NOT_IN_A_VM = ("device_bridge", "tvdnet_tools", "rich", "pycdlib", "prometheus_client",
               "matplotlib", "tomli_w")  # fmt: skip


@pytest.fixture(scope="module")
def guest_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding `pip install tvdnet` (the wheel of this checkout, no extras)."""
    where = tmp_path_factory.mktemp("guest")
    built = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", where / "dist", ROOT],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (where / "dist").glob("tvdnet-*.whl")
    venv.create(where / "venv", with_pip=True)
    python = where / "venv" / "bin" / "python"
    installed = subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", wheel],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return where / "venv"


def _python(venv_dir: Path, code: str) -> str:
    done = subprocess.run(
        [venv_dir / "bin" / "python", "-c", code], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_guest_install_has_the_four_dependencies_and_nothing_of_the_host(
    guest_venv: Path,
) -> None:
    listed = json.loads(
        _python(
            guest_venv,
            "import importlib.metadata as m, json;print(json.dumps(m.requires('tvdnet')))",
        )
    )
    required = {re.split(r"[<>=;\s]", r)[0] for r in listed if "extra ==" not in r}
    assert required == GUEST_DEPENDENCIES
    found = json.loads(
        _python(
            guest_venv,
            "import importlib.util, json;"
            f"print(json.dumps([n for n in {list(NOT_IN_A_VM)!r}"
            " if n not in ('device_bridge', 'tvdnet_tools') and importlib.util.find_spec(n)]))",
        )
    )
    assert found == []  # none of rich, pycdlib, prometheus-client, matplotlib, tomli-w


def test_importing_tvdnet_loads_no_bridge_or_tool_module(guest_venv: Path) -> None:
    loaded = json.loads(
        _python(
            guest_venv, "import json, sys, tvdnet, tvdnet.aio; print(json.dumps(list(sys.modules)))"
        )
    )
    assert "tvdnet.core.session" in loaded
    assert [m for m in loaded if m.split(".")[0] in NOT_IN_A_VM] == []


def test_a_tool_command_in_a_vm_says_what_to_install(guest_venv: Path) -> None:
    done = subprocess.run(
        [guest_venv / "bin" / "tvdnet", "demo"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 2
    assert "pip install 'tvdnet[tools]'" in done.stderr and "Traceback" not in done.stderr


async def test_a_node_runs_from_the_guest_install(guest_venv: Path) -> None:
    with short_tmp() as tmp:
        tvd = LocalTvd(
            tmp,
            "install",
            [
                LocalMember(
                    vm, f"127.0.0.1:{free_port()}", f"unix-listen:{vm}.sock", f"unix:{vm}.sock"
                )
                for vm in VMS
            ],
            period_s=2.0,
        )
        tvd.write()
        tvd.provision()
        configs = {vm: tvd.write_node_config(vm, control_socket=f"{vm}.ctl") for vm in VMS}
        bridge_command = [
            os.fspath(BIN / "tvdnet-bridge"), "run", "--config", os.fspath(tvd.tvd_file),
            "--keystore", os.fspath(tvd.keystore), "--control", os.fspath(tmp / "ctl" / "b.sock"),
        ]  # fmt: skip
        log = (tmp / "stderr.log").open("wb")
        processes = {
            "bridge": await trio.lowlevel.open_process(bridge_command, stderr=log),
            # vm-a from the guest install, vm-b from this environment.
            "vm-a": await trio.lowlevel.open_process(
                [guest_venv / "bin" / "tvdnet", "node", "--config", configs["vm-a"]],
                stdout=subprocess.PIPE,
                stderr=log,
            ),
            "vm-b": await trio.lowlevel.open_process(
                [BIN / "tvdnet", "node", "--config", configs["vm-b"]], stderr=log
            ),
        }
        try:
            with trio.fail_after(60):
                while True:
                    try:
                        reply = await control_request(
                            tmp / "vm-b.ctl",
                            {"command": "send", "peer": "vm-a", "body": {"hi": "from vm-b"}},
                        )
                        break
                    except ControlError:  # not listening yet
                        await trio.sleep(0.1)
                assert reply == {"ok": True}, reply
                stdout = processes["vm-a"].stdout
                assert stdout is not None
                line = b""
                while not line.endswith(b"\n"):
                    line += await stdout.receive_some()
            received = json.loads(line)
            assert (received["vm"], received["from"], received["body"]) == (
                "vm-a", "vm-b", {"hi": "from vm-b"},
            )  # fmt: skip
        finally:
            stopped = await stop_processes(processes, timeout=30)
            log.close()
        assert b"Traceback" not in (tmp / "stderr.log").read_bytes()
        assert {name: how.returncode for name, how in stopped.items()} == {
            "bridge": 0, "vm-a": 0, "vm-b": 0,
        }  # fmt: skip

"""`tvdnet node` on an operator's mistake found only when it starts (issue 18): one line
naming the file, the key and the cause, exit 2, no traceback."""

from __future__ import annotations

import errno
import socket
from pathlib import Path
from typing import Any

import pytest
import trio

from tvdnet._cli import main
from tvdnet.core.scheme import Schedule, generate
from tvdnet.keyfile import write_computer_keys


def node_file(tmp_path: Path, **fields: str) -> Path:
    provisioning = generate("t1", ["vm-a", "vm-b"])
    write_computer_keys(tmp_path / "vm-a.keys", provisioning.for_vm("vm-a"), Schedule(0.0, 10, 10))
    settings = {"key_file": "vm-a.keys", "listen": "127.0.0.1:0", "key_channel": "unix:a.sock"}
    settings.update(fields)
    path = tmp_path / "vm-a.toml"
    path.write_text("".join(f'{k} = "{v}"\n' for k, v in settings.items()))
    return path


def run_node(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["node", "--config", str(path)])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err.strip().splitlines()[-1]


def test_a_port_in_use(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = node_file(tmp_path, listen=f"127.0.0.1:{port}")
        code, line = run_node(path, capsys)
    assert code == 2
    assert line == (
        f"tvdnet: {path}: listen: 127.0.0.1:{port}: the port is in use "
        "(another process listens there)"
    )


@pytest.mark.parametrize(
    ("failure", "cause"),
    [
        (socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
         "cannot resolve the host '999.1.1.1' (Name or service not known)"),
        (OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address"),
         "999.1.1.1 is not an address of this machine"),
        (OSError(errno.EACCES, "Permission denied"), "cannot listen there (Permission denied)"),
    ],
)  # fmt: skip
def test_an_address_it_cannot_listen_on(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    failure: OSError,
    cause: str,
) -> None:
    # What the resolver and bind(2) answer, without asking a resolver (no network here).
    async def refuse(*args: Any, **kwargs: Any) -> None:
        raise failure

    monkeypatch.setattr(trio, "open_tcp_listeners", refuse)
    path = node_file(tmp_path, listen="999.1.1.1:7001")
    code, line = run_node(path, capsys)
    assert (code, line) == (2, f"tvdnet: {path}: listen: 999.1.1.1:7001: {cause}")


def test_a_key_channel_descriptor_it_does_not_hold(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = node_file(tmp_path, key_channel="fd:999")
    code, line = run_node(path, capsys)
    assert code == 2
    assert line == (
        f"tvdnet: {path}: key_channel: fd:999: not an open descriptor of this process "
        "(Bad file descriptor)"
    )

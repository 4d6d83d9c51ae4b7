"""`tvdnet status` and `tvdnet send` (issue 18): the node's send_timeout by default, a
line on success, one line and exit 2 on every error, and a request too large for the
control socket answered with an error instead of a broken pipe."""

from __future__ import annotations

import functools
import json
import socket
import threading
from pathlib import Path
from typing import Any

import pytest
import trio

from tvdnet import ControlError
from tvdnet._cli import main
from tvdnet.control import REQUEST_LIMIT, control_request, serve_control


class FakeNode:
    """A control socket in a thread that answers like a node and records the requests."""

    def __init__(self, path: Path, reply: dict[str, Any]) -> None:
        self.path, self.reply = path, reply
        self.requests: list[dict[str, Any]] = []
        self._ready = threading.Event()
        self._stop: trio.CancelScope | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._thread = threading.Thread(target=trio.run, args=(self._serve,), daemon=True)

    async def _handle(self, request: dict[str, Any]) -> dict[str, Any]:
        self.requests.append(request)
        return self.reply

    async def _serve(self) -> None:
        with trio.CancelScope() as self._stop:
            self._token = trio.lowlevel.current_trio_token()
            async with trio.open_nursery() as nursery:
                await nursery.start(functools.partial(serve_control, self.path, self._handle))
                self._ready.set()

    def __enter__(self) -> FakeNode:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._token is not None and self._stop is not None
        self._token.run_sync_soon(self._stop.cancel)
        self._thread.join(10)


def test_send_leaves_the_timeout_to_the_node_and_says_it_was_acknowledged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with FakeNode(tmp_path / "ctl", {"ok": True}) as node:
        assert main(["send", "--control", str(node.path), "vm-b", "hello"]) == 0
        assert main(["send", "--control", str(node.path), "--timeout", "2.5", "vm-b", "x"]) == 0
    assert node.requests[0] == {"command": "send", "peer": "vm-b", "body": "hello"}
    assert node.requests[1]["timeout"] == 2.5
    assert capsys.readouterr().out.splitlines() == ["sent to vm-b: acknowledged"] * 2


def test_a_send_the_node_refuses_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    refusal = {"ok": False, "type": "SendTimeout", "error": "vm-b: no acknowledgement in 30 s"}
    with FakeNode(tmp_path / "ctl", refusal) as node:
        assert main(["send", "--control", str(node.path), "vm-b", "hello"]) == 2
    assert capsys.readouterr().err == "tvdnet send: SendTimeout: vm-b: no acknowledgement in 30 s\n"


@pytest.mark.parametrize("command", [["status"], ["send", "vm-b", "hi"]])
def test_no_node_behind_the_socket_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    path = tmp_path / "nothing.sock"
    assert main([command[0], "--control", str(path), *command[1:]]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tvdnet {command[0]}: nothing answers on {path}")
    assert "Traceback" not in err and err.count("\n") == 1


async def test_a_request_over_the_limit_gets_an_error_reply(tmp_path: Path) -> None:
    """A raw client (not control_request, which refuses it before sending) that sends
    more than REQUEST_LIMIT gets the refusal, not a reset connection."""
    path = tmp_path / "ctl"

    async def handle(request: dict[str, Any]) -> dict[str, Any]:
        raise AssertionError("never reached")

    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(serve_control, path, handle))

        def raw_client() -> bytes:
            with socket.socket(socket.AF_UNIX) as client:
                client.connect(str(path))
                client.sendall(b'{"command": "send", "body": "' + b"x" * (3 * REQUEST_LIMIT))
                client.shutdown(socket.SHUT_WR)
                reply = b""
                while chunk := client.recv(1 << 16):
                    reply += chunk
                return reply

        reply = await trio.to_thread.run_sync(raw_client)
        nursery.cancel_scope.cancel()
    assert json.loads(reply) == {
        "ok": False,
        "error": f"a request over {REQUEST_LIMIT} bytes",
        "type": "ValueError",
    }


async def test_control_request_refuses_a_request_over_the_limit_before_sending() -> None:
    with pytest.raises(ControlError, match=f"over the {REQUEST_LIMIT}-byte limit"):
        await control_request("/nonexistent.sock", {"command": "send", "body": "x" * REQUEST_LIMIT})

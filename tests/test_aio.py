"""The asyncio adapter: a node embedded in an asyncio program (trio in guest mode)."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
import trio
from nodes import Harness

import tvdnet.aio
from tvdnet import UnknownPeer, WallClock


def test_an_asyncio_program_sends_and_receives(tmp_path: Path) -> None:
    # vm-b and the bridge run in a trio thread in real time; vm-a lives in asyncio.
    h = Harness(
        tmp_path,
        ["vm-a", "vm-b"],
        period_s=3.0,
        epoch=time.time() - 0.5,
        clock=WallClock(),
        external=("vm-a",),
    )
    stop = threading.Event()
    echoed: list[object] = []

    async def trio_side() -> None:
        async with h.running():
            b = h.nodes["vm-b"]
            with trio.move_on_after(180):
                message = await b.receive()
                echoed.append(message.body)
                await b.send("vm-a", {"echo": message.body})
                while not stop.is_set():
                    await trio.sleep(0.05)

    thread = threading.Thread(target=trio.run, args=(trio_side,))
    thread.start()

    async def asyncio_side() -> tuple[object, int | None]:
        async with tvdnet.aio.open_node(h.external_config("vm-a")) as node:
            assert node.vm == "vm-a"
            await node.send("vm-b", "hello from asyncio", timeout=120)
            with pytest.raises(UnknownPeer):
                await node.send("vm-z", "nobody")
            reply = await asyncio.wait_for(node.receive(), 120)
            # Cancelling an asyncio task cancels the trio call behind it.
            pending = asyncio.create_task(node.receive())
            await asyncio.sleep(0.1)
            pending.cancel()
            with pytest.raises(asyncio.CancelledError):
                await pending
            # A graceful stop: what is left in the inbox (nothing here), then the end.
            node.stop_receiving()
            assert [m async for m in node] == []
            return reply.body, reply.period

    try:
        body, period = asyncio.run(asyncio_side())
    finally:
        stop.set()
        thread.join(60)
    assert echoed == ["hello from asyncio"]
    assert body == {"echo": "hello from asyncio"}
    assert period is not None

"""Embedding a node in an asyncio application.

trio runs as a guest on the asyncio event loop (`trio.lowlevel.start_guest_run`): one
thread, one loop, and the node's trio code unchanged. Every coroutine of
`AsyncioNode` runs the matching `Node` coroutine in trio and awaits its result as an
asyncio future; cancelling the asyncio task cancels the trio one.

    import asyncio, tvdnet, tvdnet.aio

    async def main() -> None:
        config = tvdnet.NodeConfig.load("vm-a.toml")
        async with tvdnet.aio.open_node(config) as node:
            await node.send("vm-b", {"text": "hello from asyncio"})
            message = await node.receive()

    asyncio.run(main())
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

import outcome
import trio

from ._node import Node
from ._node import open_node as open_trio_node
from .config import NodeConfig
from .core.events import Message

__all__ = ["AsyncioNode", "open_node"]

T = TypeVar("T")


class AsyncioNode:
    """The asyncio face of a running `Node` (same methods, same errors)."""

    def __init__(
        self,
        node: Node,
        nursery: trio.Nursery,
        token: trio.lowlevel.TrioToken,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._node = node
        self._nursery = nursery
        self._token = token
        self._loop = loop
        self._stop = trio.Event()

    def __repr__(self) -> str:
        return f"<AsyncioNode {self._node!r}>"

    @property
    def vm(self) -> str:
        return self._node.vm

    @property
    def peers(self) -> list[str]:
        return self._node.peers

    @property
    def period(self) -> int | None:
        return self._node.period

    @property
    def stats(self) -> Mapping[str, int]:
        return self._node.stats

    def status(self) -> dict[str, Any]:
        return self._node.status()

    async def send(self, peer: str, body: Any, *, timeout: float | None = None) -> None:
        await self._call(lambda: self._node.send(peer, body, timeout=timeout))

    async def broadcast(self, body: Any, *, timeout: float | None = None) -> None:
        await self._call(lambda: self._node.broadcast(body, timeout=timeout))

    def stop_receiving(self) -> None:
        """See `tvdnet.Node.stop_receiving`; `receive()` then raises `trio.EndOfChannel`
        once the inbox is empty (an `async for` ends). Calls made after it run after it."""
        self._token.run_sync_soon(self._node.stop_receiving)

    async def receive(self) -> Message:
        # A message taken from the inbox for a caller cancelled meanwhile goes back first
        # in line: it was acknowledged, so losing it would break exactly once.
        return await self._call(self._node.receive, orphan=self._node._put_back)

    def __aiter__(self) -> AsyncioNode:
        return self

    async def __anext__(self) -> Message:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    async def _call(
        self, make: Callable[[], Awaitable[T]], orphan: Callable[[T], None] | None = None
    ) -> T:
        future: asyncio.Future[T] = self._loop.create_future()
        scope = trio.CancelScope()

        async def run_in_trio() -> None:
            with scope:
                try:
                    result = await make()
                except trio.Cancelled:
                    raise
                except BaseException as exc:  # handed to the asyncio caller as is
                    if not future.done():
                        future.set_exception(exc)
                    return
                if not future.done():
                    future.set_result(result)
                elif orphan is not None:
                    orphan(result)
            if not future.done():
                future.cancel()

        self._token.run_sync_soon(self._nursery.start_soon, run_in_trio)
        try:
            return await future
        except asyncio.CancelledError:
            self._token.run_sync_soon(scope.cancel)
            raise


@contextlib.asynccontextmanager
async def open_node(config: NodeConfig, **kwargs: Any) -> AsyncIterator[AsyncioNode]:
    """`tvdnet.open_node` for asyncio: the node runs for as long as the block lasts."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[AsyncioNode] = loop.create_future()
    finished: asyncio.Future[outcome.Outcome[None]] = loop.create_future()

    async def trio_main() -> None:
        async with open_trio_node(config, **kwargs) as node, trio.open_nursery() as nursery:
            adapter = AsyncioNode(node, nursery, trio.lowlevel.current_trio_token(), loop)
            ready.set_result(adapter)
            await adapter._stop.wait()
            nursery.cancel_scope.cancel()

    def done(result: outcome.Outcome[None]) -> None:
        if not finished.done():
            finished.set_result(result)

    trio.lowlevel.start_guest_run(
        trio_main,
        run_sync_soon_threadsafe=loop.call_soon_threadsafe,
        done_callback=done,
        host_uses_signal_set_wakeup_fd=True,
    )
    either: list[asyncio.Future[Any]] = [ready, finished]
    await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
    if not ready.done():
        finished.result().unwrap()  # the node failed to start: raise why
        raise RuntimeError("the trio guest run ended before the node started")
    adapter = ready.result()
    try:
        yield adapter
    finally:
        adapter._token.run_sync_soon(adapter._stop.set)
        (await finished).unwrap()

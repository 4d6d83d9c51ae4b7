"""The trio node: a key agent, a listener, a timer, a flusher and one task per connection.

All protocol decisions are made by the sans-I/O `Session` (peers, SPEC §4) and
`KeyAgent` (key channel, SPEC §5). This module only moves bytes and time between them
and the outside world:

- `_after()` runs after every call into the session: it hands events on (messages to
  the inbox, acknowledgements to waiting `send()`s, dial requests to dial tasks), writes
  what the session has for each connection at once (`_flush`: one non-blocking write),
  and moves the timer task's deadline when something earlier comes.
- `send()` queues its message in the session and only wakes the flusher task, which runs
  `_after()` once for all the messages sent meanwhile: they go out together in one frame.
- per connection: one task that reads (bytes -> `Session.receive_data`); a drain task
  only while a socket does not take what is written; the timer's watchdog drops a
  connection whose peer takes nothing.
- the timer task: the session's and the agent's deadlines, `send()` timeouts, the write
  watchdog.
- the key channel: `keychannel.run_key_channel` opens it, says hello, and reopens it
  after EOF, HUP or EIO, once a second at most.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import ipaddress
import logging
import math
import os
import socket
from collections import Counter, deque
from collections.abc import AsyncIterator, Mapping
from typing import Any

import trio

from ._clock import WallClock
from ._logs import RateLimitedLog
from .config import NodeConfig
from .control import serve_control
from .core import events as ev
from .core.agent import (
    AgentState,
    BridgeSaid,
    ChannelRefused,
    KeyAgent,
    KeysUpdated,
    ScheduleMismatch,
    Welcomed,
)
from .core.channel import parse_address
from .core.errors import (
    BroadcastFailed,
    ConfigError,
    SendFailedError,
    SendTimeout,
    TvdnetError,
    UnknownPeer,
    WindowFull,
)
from .core.frames import printable
from .core.session import Session
from .keychannel import KeyChannelOutput, run_key_channel
from .keyfile import load_computer_keys
from .streams import fileno_of, receive_some, write_now

__all__ = ["Node", "open_node"]

logger = logging.getLogger("tvdnet.node")

_READ_SIZE = 65536
_WRITE_TIMEOUT = 10.0  # a peer that takes longer to accept our bytes is dropped
_DIAL_TIMEOUT = 5.0


class _Waiter:
    """A `send()` waiting for its ACK: finished when acknowledged, failed or timed out.

    It parks its task directly (trio.lowlevel), cheaper than a trio.Event per message.
    """

    __slots__ = ("deadline", "done", "error", "peer", "task", "timeout")

    def __init__(self, peer: str, timeout: float, deadline: float) -> None:
        self.peer = peer
        self.timeout = timeout
        self.deadline = deadline  # wall time
        self.done = False
        self.error: Exception | None = None
        self.task: trio.lowlevel.Task | None = None

    def finish(self, error: Exception | None = None) -> None:
        if self.done:
            return
        self.done = True
        self.error = error
        task, self.task = self.task, None
        if task is not None:
            trio.lowlevel.reschedule(task)

    def abort(self, _: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
        """The waiting `send()` was cancelled (`wait_task_rescheduled`'s abort_func)."""
        self.task = None
        return trio.lowlevel.Abort.SUCCEEDED


class _SendDeadlines:
    """The deadlines of the `send()`s that wait, without a cancel scope each: one queue
    per timeout value, so that each is in deadline order (appended as time goes on)."""

    __slots__ = ("_queues",)

    def __init__(self) -> None:
        self._queues: dict[float, deque[_Waiter]] = {}

    def __bool__(self) -> bool:
        return any(not w.done for q in self._queues.values() for w in q)

    def new(self, peer: str, timeout: float, deadline: float) -> tuple[_Waiter, bool]:
        """A waiter, filed; and whether it is the earliest of its queue (arm the timer)."""
        waiter = _Waiter(peer, timeout, deadline)
        queue = self._queues.get(timeout)
        if queue is None:
            queue = self._queues[timeout] = deque()
        while queue and queue[0].done:
            queue.popleft()  # acknowledged ones leave from the front, as they go
        queue.append(waiter)
        return waiter, len(queue) == 1

    def expire(self, now: float) -> list[_Waiter]:
        due = []
        for queue in self._queues.values():
            while queue and (queue[0].done or queue[0].deadline <= now):
                waiter = queue.popleft()
                if not waiter.done:
                    due.append(waiter)
        return due

    def next(self) -> float:
        earliest = math.inf
        for queue in self._queues.values():
            while queue and queue[0].done:
                queue.popleft()
            if queue:
                earliest = min(earliest, queue[0].deadline)
        return earliest


class _Wakeup:
    """A level-triggered wake-up for one task; `set()` is cheap when already set (every
    `send()` calls it)."""

    __slots__ = ("_task", "is_set")

    def __init__(self) -> None:
        self.is_set = False
        self._task: trio.lowlevel.Task | None = None

    def set(self) -> None:
        if not self.is_set:
            self.is_set = True
            task, self._task = self._task, None
            if task is not None:
                trio.lowlevel.reschedule(task)

    async def wait(self) -> None:
        if self.is_set:
            await trio.lowlevel.checkpoint()
        else:
            self._task = trio.lowlevel.current_task()
            await trio.lowlevel.wait_task_rescheduled(self._abort)
        self.is_set = False

    def _abort(self, _: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
        self._task = None
        return trio.lowlevel.Abort.SUCCEEDED


class Node:
    """A TVD member: send to and receive from the other members under period keys.

    Create it with `open_node(config)`. See the README for the API.
    """

    def __init__(self, config: NodeConfig, session: Session, agent: KeyAgent, clock: WallClock):
        self.config = config
        self._session = session
        self._agent = agent
        self._clock = clock
        self._nursery: trio.Nursery | None = None
        self._flusher = _Wakeup()  # send() queued messages: the flusher task seals them
        self._draining: set[int] = set()  # connections whose drain task is writing
        self._ending: set[int] = set()  # ended before their task started
        self._streams: dict[int, trio.abc.Stream] = {}
        self._waiters: dict[int, _Waiter] = {}
        self._window_waiters: dict[str, trio.Event] = {}
        self._inbox: deque[ev.Message] = deque()
        self._inbox_ready = trio.Event()
        self._inbox_space: trio.Event | None = None  # readers wait for the application
        self._timer_scope: trio.CancelScope | None = None
        self._timer_at = math.inf  # trio time the timer task sleeps until
        self._send_deadlines = _SendDeadlines()
        self._window_scopes: dict[_Waiter, trio.CancelScope] = {}
        self._writes: dict[int, float] = {}  # connection -> trio time its write started
        self._connection_scopes: dict[int, trio.CancelScope] = {}
        self._fds: dict[int, int] = {}  # a connection's socket, for `_flush`
        self._leftover: dict[int, bytearray] = {}  # what a direct write left to a drain
        self._agent_wakeup = _Wakeup()
        self._key_output = KeyChannelOutput(agent, clock, self._agent_wakeup)
        self._stats: Counter[str] = Counter()
        self._log = RateLimitedLog(logger)
        self._cut_off = False
        self._keys_erased = False
        self._last_erased = 0
        self.listen_port: int | None = None

    def __repr__(self) -> str:
        return f"<Node vm={self.vm!r} peers={len(self._session.peers)} period={self.period}>"

    # ------------------------------------------------------------------ public API

    @property
    def vm(self) -> str:
        return self._session.me

    @property
    def tvd(self) -> str:
        return self._session.tvd

    @property
    def peers(self) -> list[str]:
        """Members this node can talk to (it holds a computer key for each)."""
        return self._session.peers

    @property
    def period(self) -> int | None:
        """The newest period this node holds a usable key for, or None when it holds none."""
        now = self._clock.now()
        held = [
            keys.period
            for keys in (self._session.key_state(p) for p in self._session.peers)
            if keys.has_key and now < keys.lifetime(keys.period)
        ]
        return max(held, default=None)

    @property
    def key_updates(self) -> int:
        """Update messages taken from the bridge since the node opened, applied or (when
        older than what the node holds) acknowledged and ignored; cheap to poll."""
        return self._stats["key_updates"]

    @property
    def key_apply_ms(self) -> list[float]:
        """For the last updates (64 at most): milliseconds from an update's arrival on the
        key channel to its acknowledgement written back, all of U in between."""
        return [s * 1000 for s in self._agent.apply_seconds]

    def unacknowledged(self, peer: str | None = None) -> int:
        """Messages sent to `peer` (to any peer when None) that it has not acknowledged."""
        if peer is not None:
            return self._session.unacknowledged(peer)
        return sum(self._session.unacknowledged(p) for p in self._session.peers)

    @property
    def waiting(self) -> int:
        """Messages received and not yet taken by `receive()`."""
        return len(self._inbox)

    @property
    def stats(self) -> Mapping[str, int]:
        """Counters: sent, delivered, resends, rejected_expired, rejected_unknown,
        auth_failures, protocol_errors, duplicates, connections, ... (a snapshot)."""
        merged = Counter(self._session.stats)
        merged.update(self._stats)
        return dict(merged)

    async def send(self, peer: str, body: Any, *, timeout: float | None = None) -> None:
        """Send `body` to `peer` and return once the peer acknowledged it.

        Raises UnknownPeer (not a member, or no key for it), MessageTooLarge,
        UnserializableBody, SendTimeout (no ACK within `timeout`, default the config's
        send_timeout; the message stays queued) or SendFailedError (the peer left).
        """
        limit = self.config.send_timeout if timeout is None else timeout
        session = self._session
        now = self._clock.now()
        # The deadline is the timer task's business (no cancel scope per message): it
        # finishes the waiter with SendTimeout; the message stays queued.
        waiter, earliest = self._send_deadlines.new(peer, limit, now + limit)
        if earliest:
            self._arm(waiter.deadline)
        handle: int | None = None
        try:
            try:
                handle = session.send(peer, body, now)
            except WindowFull:
                await self._wait_for_window(peer, waiter)
                handle = session.send(peer, body, self._clock.now())
            self._waiters[handle] = waiter
            # The flusher task seals and writes it with whatever else is sent meanwhile
            # (one frame for many), and hands on what the session has to say.
            if not self._flusher.is_set:
                self._flusher.set()
            if waiter.done:
                await trio.lowlevel.checkpoint()
            else:
                waiter.task = trio.lowlevel.current_task()
                await trio.lowlevel.wait_task_rescheduled(waiter.abort)
        finally:
            waiter.done = True  # whatever ended it: its deadline is moot
            if handle is not None:
                self._waiters.pop(handle, None)
        if waiter.error is not None:
            raise waiter.error

    async def _wait_for_window(self, peer: str, waiter: _Waiter) -> None:
        """Backpressure: until the peer's send window has room (or the send times out)."""
        while not self._session.window_open(peer):
            if waiter.done:
                assert waiter.error is not None
                raise waiter.error
            window = self._window_waiters.setdefault(peer, trio.Event())
            try:
                with trio.CancelScope() as scope:
                    self._window_scopes[waiter] = scope
                    await window.wait()
            finally:  # a cancelled caller too: nothing else would remove its scope
                self._window_scopes.pop(waiter, None)

    async def broadcast(self, body: Any, *, timeout: float | None = None) -> None:
        """Send `body` to every peer at once; raises BroadcastFailed naming who did not ACK."""
        failures: dict[str, Exception] = {}

        async def one(peer: str) -> None:
            try:
                await self.send(peer, body, timeout=timeout)
            except TvdnetError as exc:
                failures[peer] = exc

        async with trio.open_nursery() as nursery:
            for peer in self.peers:
                nursery.start_soon(one, peer)
        if failures:
            raise BroadcastFailed(failures)

    def stop_receiving(self) -> None:
        """Begin a graceful stop: from now on the node delivers, and so acknowledges, no new
        message; `receive()` hands out what it already acknowledged and then raises
        `trio.EndOfChannel` (an `async for` over the node ends).

        Call it before leaving `open_node`'s block and take what is left, so that no
        acknowledged message dies with the process: the senders keep everything else and
        deliver it to this VM's next instance. Sending goes on meanwhile.
        """
        self._session.stop_delivering()
        self._inbox_ready.set()

    async def receive(self) -> ev.Message:
        """The next message from any peer (in order and exactly once per peer).

        After `stop_receiving()`, raises `trio.EndOfChannel` once the inbox is empty."""
        inbox = self._inbox
        while not inbox:
            if not self._session.delivering:
                raise trio.EndOfChannel("the node stopped receiving and its inbox is empty")
            await self._inbox_ready.wait()
        message = inbox.popleft()
        if not inbox:
            self._inbox_ready = trio.Event()
        if self._inbox_space is not None:  # a reader waits for room
            self._inbox_space.set()
            self._inbox_space = None
        return message

    def _put_back(self, message: ev.Message) -> None:
        """A message `receive()` took for a caller that went away: first in line again."""
        self._inbox.appendleft(message)
        self._inbox_ready.set()

    def __aiter__(self) -> Node:
        return self

    async def __anext__(self) -> ev.Message:
        inbox = self._inbox
        if inbox and self._inbox_space is None:
            # `receive()` inline, for the common case of `async for`: a message waits and
            # no reader waits for room.
            message = inbox.popleft()
            if not inbox:
                self._inbox_ready = trio.Event()
            return message
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    def status(self) -> dict[str, Any]:
        """What the status socket answers: no key material, only states and counters."""
        session = self._session
        return {
            "vm": self.vm,
            "tvd": self.tvd,
            "period": self.period,
            "schedule_period": self._schedule_period(),
            "key_channel": self._agent.state.value,
            "cut_off": self._cut_off,
            "schedule_mismatch": self._agent.state is AgentState.REFUSED,
            "listen": self.config.listen,
            "peers": {peer: session.peer_status(peer) for peer in session.peers},
            "stats": self.stats,
        }

    async def handle_control(self, request: dict[str, Any]) -> dict[str, Any]:
        """One control-socket request (tvdnet.control): status, send, broadcast.

        `send` and `broadcast` take an optional "timeout" in seconds (default: the node's
        send_timeout) and answer once acknowledged.
        """
        command = request["command"]
        timeout = request.get("timeout")
        if timeout is not None and (type(timeout) not in (int, float) or not timeout >= 0):
            raise ValueError('"timeout" must be a number of seconds >= 0')
        if command == "status":
            return {"ok": True, "status": self.status()}
        if command == "send":
            if not isinstance(request.get("peer"), str):
                raise ValueError('"send" needs "peer", a member id')
            await self.send(request["peer"], request.get("body"), timeout=timeout)
            return {"ok": True}
        if command == "broadcast":
            await self.broadcast(request.get("body"), timeout=timeout)
            return {"ok": True}
        raise ValueError(f"unknown command {command!r} (known: status, send, broadcast)")

    def _schedule_period(self) -> int | None:
        try:
            return self._agent.schedule.period_at(self._clock.now())
        except TvdnetError:
            return None

    # ------------------------------------------------------------------ driving the session

    def _after(self) -> None:
        """After any call into the session: dispatch its events and write what it has."""
        session = self._session
        events = session.take_events()
        if events:
            inbox = self._inbox
            for event in events:
                if type(event) is ev.Message:  # most events: inline
                    inbox.append(event)
                else:
                    self._dispatch(event)
            if inbox:
                self._inbox_ready.set()
        for conn in session.ready_connections():
            self._flush(conn)
        if self._keys_erased:
            self._keys_erased = False
            self._check_cut_off()
        deadline = session.next_deadline()
        if self._clock.trio_time(deadline) < self._timer_at:  # inline: every call comes here
            self._arm(deadline)

    def _flush(self, conn: int) -> None:
        """Write what the session has for `conn` now, from the task that made it (an ACK
        after a read, KEY after a new key, a timer's frame, the flusher's batch): one
        non-blocking write that the socket nearly always takes whole. What it does not
        take goes to a drain task, which waits until the socket takes it; a connection the
        session has finished with is ended."""
        if conn not in self._streams or conn in self._draining:
            return  # gone, or its drain task takes what comes next
        data = self._session.data_to_send(conn, self._clock.now())
        if data:
            written = write_now(self._fds.get(conn), data)
            if written < len(data):
                self._drain_soon(conn, data[written:])
                return
        if self._session.is_finished(conn):
            self._end(conn)

    def _drain_soon(self, conn: int, data: bytearray) -> None:
        assert self._nursery is not None
        self._draining.add(conn)
        self._leftover[conn] = data
        self._nursery.start_soon(self._drain, conn)

    async def _drain(self, conn: int) -> None:
        """Write what a connection's socket did not take at once, and what comes after
        it meanwhile, then leave writing to `_flush` again. The write watchdog
        (`_watch_writes`) ends a connection whose peer takes nothing."""
        session = self._session
        try:
            while (stream := self._streams.get(conn)) is not None:
                data = self._leftover.pop(conn, None) or session.data_to_send(
                    conn, self._clock.now()
                )
                if not data:
                    break
                started = trio.current_time()
                if not self._writes:
                    self._arm_trio(started + _WRITE_TIMEOUT)
                self._writes[conn] = started
                try:
                    await stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    self._end(conn)
                    return
                finally:
                    self._writes.pop(conn, None)
        finally:
            self._draining.discard(conn)
            self._leftover.pop(conn, None)
        if conn in self._streams and session.is_finished(conn):
            self._end(conn)

    def _end(self, conn: int) -> None:
        """Close the connection: its task stops reading and closes the stream."""
        scope = self._connection_scopes.get(conn)
        if scope is not None:
            scope.cancel()
        else:
            self._ending.add(conn)  # its task has not started yet

    async def _flush_sent(self) -> None:
        """What `send()` queued, sealed and written once per wake-up: the messages sent
        meanwhile go out coalesced, a frame for many."""
        while True:
            await self._flusher.wait()
            self._after()

    def _arm_trio(self, when: float) -> None:
        """Wake the timer task by `when` (trio time): moved only when earlier."""
        if when < self._timer_at:
            self._timer_at = when
            if self._timer_scope is not None:
                self._timer_scope.deadline = when

    def _arm(self, deadline: float) -> None:
        """Wake the timer task by `deadline` (wall time): moved only when earlier."""
        self._arm_trio(self._clock.trio_time(deadline))

    def _dispatch(self, event: ev.Event) -> None:
        if type(event) is ev.MessagesAcknowledged:
            waiters = self._waiters
            for handle in event.handles:  # the whole window's, at 64 in flight: inline
                waiter = waiters.get(handle)
                if waiter is not None and not waiter.done:
                    waiter.done = True
                    task, waiter.task = waiter.task, None
                    if task is not None:
                        trio.lowlevel.reschedule(task)
            window = self._window_waiters.pop(event.peer, None)
            if window is not None:
                window.set()
        elif type(event) is ev.Dial:
            assert self._nursery is not None
            self._nursery.start_soon(self._dial, event.peer)
        elif type(event) is ev.SendFailed:
            waiter = self._waiters.get(event.handle)
            if waiter is not None:
                waiter.finish(SendFailedError(event.peer, event.reason))
        elif type(event) is ev.Refused:
            self._log.warning(
                f"refused:{event.cause}",
                "refused cause=%s peer=%s detail=%s",
                event.cause,
                event.peer or "-",
                event.detail,
            )
        elif type(event) is ev.KeyErased:
            # Only the end of a pair's newest key can leave the node without any key; the
            # previous key going at a period change (every pair, every period) cannot.
            if self._session.has_peer(event.peer) and (
                event.period == self._session.key_state(event.peer).period
            ):
                self._keys_erased = True
                self._last_erased = event.period
        elif type(event) is ev.PeerRestarted:
            logger.info("event=peer-restarted peer=%s", event.peer)
        elif type(event) is ev.ConnectionAuthenticated:
            logger.debug(
                "event=authenticated peer=%s conn=%d kept=%s", event.peer, event.conn, event.active
            )

    def _check_cut_off(self) -> None:
        if self.period is None and not self._cut_off:
            self._cut_off = True
            logger.warning(
                "event=cut-off vm=%s period=%d: period keys ended without an update from "
                "the bridge; refusing traffic until new keys arrive",
                self.vm,
                self._last_erased,
            )

    def _after_agent(self) -> None:
        agent = self._agent
        while (event := agent.next_event()) is not None:
            if isinstance(event, KeysUpdated):
                if self._cut_off and self.period is not None:
                    self._cut_off = False
                    logger.warning("event=keys-restored vm=%s period=%d", self.vm, event.t)
                self._stats["key_updates"] += 1
                if event.missing:
                    self._log.warning(
                        "missing-keys",
                        "event=missing-keys t=%d peers=%s",
                        event.t,
                        ",".join(event.missing),
                    )
            elif isinstance(event, Welcomed):
                logger.info("event=welcomed members=%d", len(event.members))
            elif isinstance(event, ScheduleMismatch):
                logger.error("event=schedule-mismatch %s", event.detail)
            elif isinstance(event, ChannelRefused):
                self._stats[f"channel_refused_{event.reason}"] += 1
                self._log.warning(
                    f"channel:{event.reason}",
                    "event=channel-refused reason=%s detail=%s",
                    event.reason,
                    event.detail,
                )
            elif isinstance(event, BridgeSaid):
                reason = printable(event.reason)
                self._log.warning(f"bridge:{reason}", "event=bridge-error reason=%s", reason)
        if agent.output_size():
            self._key_output.flush()
        self._arm(agent.next_deadline())
        self._after()

    async def _timers(self) -> None:
        """The node's one timer: the session's and the agent's deadlines, `send()`
        deadlines, and the write watchdog. It sleeps until the earliest of them; callers
        only ever move that earlier (`_arm`), so most events move nothing."""
        while True:
            with trio.CancelScope(deadline=self._timer_at) as scope:
                self._timer_scope = scope
                await trio.sleep_forever()
            self._timer_scope = None
            self._timer_at = math.inf
            now = self._clock.now()
            self._session.handle_timeout(now)
            self._agent.handle_timeout(now)
            for waiter in self._send_deadlines.expire(now):
                waiter.finish(SendTimeout(waiter.peer, waiter.timeout))
                window = self._window_scopes.pop(waiter, None)
                if window is not None:
                    window.cancel()
            self._watch_writes()
            self._after_agent()
            self._arm(min(self._session.next_deadline(), self._send_deadlines.next()))

    def _watch_writes(self) -> None:
        """Drop the connections whose write has not completed within _WRITE_TIMEOUT (the
        peer takes nothing): a watchdog, not a cancel scope per write."""
        now = trio.current_time()
        for conn, started in list(self._writes.items()):
            if now < started + _WRITE_TIMEOUT:
                # Writes are filed in the order they started: the rest are younger.
                self._arm_trio(started + _WRITE_TIMEOUT)
                break
            del self._writes[conn]
            self._log.warning("write-timeout", "event=write-timeout conn=%d", conn)
            connection = self._connection_scopes.get(conn)
            if connection is not None:
                connection.cancel()

    # ------------------------------------------------------------------ connections

    async def _serve(
        self,
        listeners: list[trio.SocketListener],
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        self.listen_port = listeners[0].socket.getsockname()[1]
        task_status.started()
        async with contextlib.AsyncExitStack() as stack:
            for listener in listeners:
                await stack.enter_async_context(listener)
            async with trio.open_nursery() as nursery:
                for listener in listeners:
                    nursery.start_soon(self._accept_loop, listener)

    async def _accept_loop(self, listener: trio.SocketListener) -> None:
        while True:
            stream = await listener.accept()
            # The session caps connections that have not authenticated and decides who
            # makes way at the cap (SPEC §4): the busiest source address.
            conn = self._session.accept(self._clock.now(), _source_of(stream))
            self._start_connection(conn, stream)

    async def _dial(self, peer: str) -> None:
        member = self._agent.members.get(peer)
        now = self._clock.now()
        if member is None:
            self._log.warning(
                f"no-address:{peer}", "event=dial-failed peer=%s reason=no-address", peer
            )
            self._session.dial_failed(peer, now)
            self._after()
            return
        host, port = member.host_port()
        try:
            with trio.fail_after(_DIAL_TIMEOUT):
                stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
        except (OSError, trio.TooSlowError) as exc:
            self._log.info(
                f"dial:{peer}", "event=dial-failed peer=%s reason=%s", peer, type(exc).__name__
            )
            self._session.dial_failed(peer, self._clock.now())
            self._after()
            return
        try:
            conn = self._session.connect(peer, self._clock.now())
        except UnknownPeer:
            await stream.aclose()  # left the TVD while we dialed
            return
        self._start_connection(conn, stream)

    def _start_connection(self, conn: int, stream: trio.abc.Stream) -> None:
        assert self._nursery is not None
        self._streams[conn] = stream
        fd = fileno_of(stream)
        if fd is not None:
            self._fds[conn] = fd
        self._nursery.start_soon(self._run_connection, conn, stream)
        self._after()

    async def _run_connection(self, conn: int, stream: trio.abc.Stream) -> None:
        """One task per connection: it reads. Writing is `_flush`'s (and a drain task's
        when the socket is full); ending the connection cancels this task's scope."""
        try:
            async with stream:
                with trio.CancelScope() as scope:
                    self._connection_scopes[conn] = scope
                    if conn in self._ending:
                        return
                    await self._reader(conn, stream)
        finally:
            self._connection_scopes.pop(conn, None)
            self._ending.discard(conn)
            self._fds.pop(conn, None)
            self._leftover.pop(conn, None)
            self._writes.pop(conn, None)
            self._streams.pop(conn, None)
            self._session.connection_lost(conn, self._clock.now())
            self._after()

    async def _reader(self, conn: int, stream: trio.abc.Stream) -> None:
        session = self._session
        fd = self._fds.get(conn)
        try:
            while True:
                while len(self._inbox) >= self.config.inbox_size:
                    # Backpressure: stop reading while the application lags behind.
                    space = self._inbox_space
                    if space is None:
                        space = self._inbox_space = trio.Event()
                    await space.wait()
                data = await receive_some(stream, fd, _READ_SIZE)
                session.receive_data(conn, data, self._clock.now())
                self._after()
                if not data or session.is_finished(conn):
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            session.connection_lost(conn, self._clock.now())
            self._after()


def _source_of(stream: trio.SocketStream) -> str:
    """The source address a connection counts against (SPEC §4 strangers): the IPv4
    address, or the /64 of an IPv6 one (a single host holds a whole /64)."""
    try:
        address = stream.socket.getpeername()
    except OSError:
        return "?"
    host = str(address[0]) if isinstance(address, tuple) else str(address)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def _log_unacknowledged(node: Node) -> None:
    """A node stopping with messages its peers have not acknowledged says how many and to
    whom: they are lost with the process (SPEC §4: the sender keeps them, in memory)."""
    waiting = {peer: n for peer in node.peers if (n := node.unacknowledged(peer))}
    if waiting:
        logger.warning(
            "event=stopped-with-unacknowledged vm=%s messages=%d peers=%s",
            node.vm,
            sum(waiting.values()),
            ",".join(f"{peer}:{n}" for peer, n in sorted(waiting.items())),
        )
    else:
        logger.info("event=stopped vm=%s unacknowledged=0", node.vm)
    if node.waiting:
        # Acknowledged to their senders, never taken: `stop_receiving()` first avoids it.
        logger.warning(
            "event=stopped-with-inbox vm=%s messages=%d (acknowledged, not taken by the "
            "application; call stop_receiving() and empty the inbox before closing)",
            node.vm,
            node.waiting,
        )


async def _listen(config: NodeConfig) -> list[trio.SocketListener]:
    """The node's listening sockets; an address it cannot listen on is the operator's
    mistake, said in one line that names the file and the key (ConfigError)."""
    host, port = parse_address(config.listen, any_port=True)

    def mistake(problem: str) -> ConfigError:
        return ConfigError(config.source, None, "listen", f"{config.listen}: {problem}")

    try:
        return await trio.open_tcp_listeners(port, host=host)
    except socket.gaierror as exc:
        raise mistake(f"cannot resolve the host {host!r} ({exc.strerror})") from None
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise mistake("the port is in use (another process listens there)") from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise mistake(f"{host} is not an address of this machine") from None
        raise mistake(f"cannot listen there ({exc.strerror or exc})") from None


def _check_key_channel(config: NodeConfig) -> None:
    """`fd:N` must name a descriptor this process holds (the others are opened, and
    retried, as the node runs)."""
    spec = config.key_channel
    if spec.kind != "fd":
        return
    try:
        os.fstat(int(spec.target))
    except OSError as exc:
        raise ConfigError(
            config.source, None, "key_channel",
            f"{spec}: not an open descriptor of this process ({exc.strerror})",
        ) from None  # fmt: skip


@contextlib.asynccontextmanager
async def open_node(
    config: NodeConfig, *, clock: WallClock | None = None, instance: bytes | None = None
) -> AsyncIterator[Node]:
    """Run a node for as long as the `async with` block lasts.

    It loads the computer-key file, listens for peers, opens the key channel and says
    hello to the bridge. Leaving the block closes every connection.
    """
    keys, schedule = load_computer_keys(config.key_file)
    session = Session(
        keys,
        schedule,
        allowance=config.skew_allowance,
        instance=instance,
        max_unauthenticated=config.max_unauthenticated,
    )
    agent = KeyAgent(session, schedule)
    node = Node(config, session, agent, clock or WallClock())
    _check_key_channel(config)
    listeners = await _listen(config)
    async with trio.open_nursery() as nursery:
        node._nursery = nursery
        await nursery.start(node._serve, listeners)
        nursery.start_soon(node._timers)
        nursery.start_soon(node._flush_sent)
        nursery.start_soon(
            run_key_channel,
            config.key_channel,
            agent,
            node._after_agent,
            node._agent_wakeup,
            node._clock,
            node._key_output,
        )
        if config.control_socket is not None:
            await nursery.start(
                functools.partial(serve_control, config.control_socket, node.handle_control)
            )
        logger.info(
            "event=started vm=%s listen=%s key_channel=%s",
            node.vm,
            config.listen,
            config.key_channel,
        )
        try:
            yield node
        finally:
            nursery.cancel_scope.cancel()
            _log_unacknowledged(node)
            keys.erase()
            session.erase_all_keys()

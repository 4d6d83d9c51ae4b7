"""Every error the guest library raises on purpose, in one hierarchy under `TvdnetError`.

`device_bridge.errors` adds the bridge's own beneath it (`BridgeError`); its `ConfigError`
for TVD files is a subclass of the one here. None of them ever carries key material: they
name the file, line, key, member or period, and what is wrong.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for annotations only: the core touches no file system
    from pathlib import PurePath


class TvdnetError(Exception):
    """Base class of every error raised by tvdnet and device_bridge on purpose."""


class InvalidId(TvdnetError, ValueError):
    """A TVD or member id breaks SPEC §2; the message names where it was found."""


class InvalidKey(TvdnetError, ValueError):
    """A key input is not exactly 32 bytes (SPEC §3)."""


class NoSuchPeriod(TvdnetError, ValueError):
    """A time or period number outside the schedule's periods 1..N (SPEC §3)."""

    def __init__(self, message: str, period: int | None = None) -> None:
        super().__init__(message)
        self.period = period


class InvalidSchedule(TvdnetError, ValueError):
    """A schedule whose epoch, period length or period count is unusable."""


class FrameError(TvdnetError):
    """A peer-protocol frame that breaks SPEC §4; `reason` is the CLOSE reason to send."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class StreamDecodeError(TvdnetError):
    """A byte stream that is not concatenated msgpack objects under the size limit;
    `too_large` tells an oversized object from garbage. Raised by `reader.MsgpackReader`
    and turned by its users into a FrameError or ChannelError with the reason to send."""

    def __init__(self, too_large: bool, detail: str) -> None:
        super().__init__(detail)
        self.too_large = too_large
        self.detail = detail


class ChannelError(TvdnetError):
    """A key-channel message that breaks SPEC §5; `reason` is the error reason to send."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class UnknownPeer(TvdnetError, LookupError):
    """The peer is not a member of the TVD, or this node holds no computer key for it."""

    def __init__(self, peer: str, why: str) -> None:
        super().__init__(f"peer {peer!r}: {why}")
        self.peer = peer


class MessageTooLarge(TvdnetError, ValueError):
    """The packed [0, seq, body] would exceed the SPEC §4 message limit."""


class UnserializableBody(TvdnetError, TypeError):
    """The message body is not a value msgpack can encode."""


class WindowFull(TvdnetError):
    """The per-peer send window is full; wait for acknowledgements."""


class ConfigError(TvdnetError):
    """A configuration (a node's file, a TVD file) that cannot be used.

    Names the file, the line when known, and the key: `vm-a.toml:3: listen: ...`.
    """

    def __init__(self, path: PurePath | str | None, line: int | None, key: str, problem: str):
        where = str(path) if path is not None else "<config>"
        if line is not None:
            where += f":{line}"
        super().__init__(f"{where}: {key}: {problem}" if key else f"{where}: {problem}")
        self.path = path
        self.line = line
        self.key = key
        self.problem = problem


class KeyFileError(TvdnetError):
    """A key file that is missing, unreadable, too open, or malformed (SPEC §6)."""

    def __init__(self, path: PurePath | str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class ControlError(TvdnetError):
    """A control socket that cannot be served or asked: in the way, not ours, silent,
    or answering nonsense."""


class SendTimeout(TvdnetError):
    """The peer did not acknowledge in time. The message stays queued and is still
    delivered at most once if the peer comes back; it is never lost silently."""

    def __init__(self, peer: str, timeout: float) -> None:
        super().__init__(f"peer {peer!r} did not acknowledge within {timeout:g} s")
        self.peer = peer
        self.timeout = timeout


class SendFailedError(TvdnetError):
    """The message can never be delivered (the peer left the TVD)."""

    def __init__(self, peer: str, reason: str) -> None:
        super().__init__(f"peer {peer!r}: {reason}")
        self.peer = peer
        self.reason = reason


class BroadcastFailed(TvdnetError):
    """Some peers did not acknowledge a broadcast; `failures` maps each to its error."""

    def __init__(self, failures: dict[str, Exception]) -> None:
        names = ", ".join(sorted(failures))
        super().__init__(f"{len(failures)} peer(s) did not acknowledge: {names}")
        self.failures = failures


def single_error(exc: BaseException) -> TvdnetError | None:
    """The TvdnetError that `exc` is or, for an exception group (what a trio nursery
    raises), the first of its leaves when every leaf is one; None otherwise. A command
    line tool prints it as one line instead of a traceback."""
    if isinstance(exc, TvdnetError):
        return exc
    if not isinstance(exc, BaseExceptionGroup):
        return None
    matched, rest = exc.split(TvdnetError)
    if rest is not None or matched is None:
        return None
    leaf: BaseException = matched
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    assert isinstance(leaf, TvdnetError)  # split() kept only those
    return leaf

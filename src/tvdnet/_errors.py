"""Every error tvdnet raises on purpose. None of them ever carries key material."""


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

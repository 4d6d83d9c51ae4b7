"""tvdnet: key-insulated symmetric messaging between the VMs of a Trusted Virtual Domain.

The guest side (the paper's "computer"). Public API:

- `tvdnet.core`: the sans-I/O core (no trio, no sockets, no clock): `core.scheme` (G,
  U*, U, the schedule, a node's keys per pair), `core.channel` (the key-channel messages,
  SPEC §5), `core.session` (the peer protocol, SPEC §4), ...; `tvdnet.scheme` and
  `tvdnet.channel` name the first two.
- `tvdnet.control`: the owner-only control socket of a node and of a bridge.
- `tvdnet.keyfile`: the computer-key file of a VM (SPEC §6).
- `open_node(NodeConfig)`: a running node (`send`, `broadcast`, `receive`, `async for`).
- `Session` and its events: the sans-I/O peer protocol (SPEC §4).
- Every error: a `TvdnetError` (`tvdnet.core.errors`).
"""

from . import keyfile
from ._clock import WallClock
from ._node import Node, open_node
from .config import KeyChannelSpec, NodeConfig
from .core import channel, scheme
from .core.constants import FRAME_LIMIT, MESSAGE_LIMIT, PROTOCOL_VERSION, SKEW_ALLOWANCE
from .core.errors import (
    BroadcastFailed,
    ChannelError,
    ConfigError,
    ControlError,
    FrameError,
    InvalidId,
    InvalidKey,
    InvalidSchedule,
    KeyFileError,
    MessageTooLarge,
    NoSuchPeriod,
    SendFailedError,
    SendTimeout,
    TvdnetError,
    UnknownPeer,
    UnserializableBody,
    WindowFull,
)
from .core.events import (
    ConnectionAuthenticated,
    Dial,
    Event,
    KeyErased,
    Message,
    MessagesAcknowledged,
    PeerRestarted,
    Refused,
    SendFailed,
)
from .core.session import ConnectionState, Session

__version__ = "0.1.0"

__all__ = [
    "FRAME_LIMIT",
    "MESSAGE_LIMIT",
    "PROTOCOL_VERSION",
    "SKEW_ALLOWANCE",
    "BroadcastFailed",
    "ChannelError",
    "ConfigError",
    "ConnectionAuthenticated",
    "ConnectionState",
    "ControlError",
    "Dial",
    "Event",
    "FrameError",
    "InvalidId",
    "InvalidKey",
    "InvalidSchedule",
    "KeyChannelSpec",
    "KeyErased",
    "KeyFileError",
    "Message",
    "MessageTooLarge",
    "MessagesAcknowledged",
    "NoSuchPeriod",
    "Node",
    "NodeConfig",
    "PeerRestarted",
    "Refused",
    "SendFailed",
    "SendFailedError",
    "SendTimeout",
    "Session",
    "TvdnetError",
    "UnknownPeer",
    "UnserializableBody",
    "WallClock",
    "WindowFull",
    "channel",
    "keyfile",
    "open_node",
    "scheme",
]

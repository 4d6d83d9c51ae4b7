"""tvdnet: key-insulated symmetric messaging between the VMs of a Trusted Virtual Domain.

The guest side (the paper's "computer"). Public API:

- `tvdnet.scheme`: the key-insulated scheme (G, U*, U) and the period schedule.
- `tvdnet.channel`: the bridge <-> node key-channel messages (SPEC §5).
- `tvdnet.keyfile`: the computer-key file of a VM (SPEC §6).
- `open_node(NodeConfig)`: a running node (`send`, `broadcast`, `receive`, `async for`).
- `Session` and its events: the sans-I/O peer protocol (SPEC §4).
"""

from . import channel, keyfile, scheme
from ._clock import WallClock
from ._config import ConfigError, KeyChannelSpec, NodeConfig
from ._constants import FRAME_LIMIT, MESSAGE_LIMIT, PROTOCOL_VERSION, SKEW_ALLOWANCE
from ._errors import (
    ChannelError,
    FrameError,
    InvalidId,
    InvalidKey,
    InvalidSchedule,
    MessageTooLarge,
    NoSuchPeriod,
    TvdnetError,
    UnknownPeer,
    UnserializableBody,
    WindowFull,
)
from ._events import (
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
from ._node import BroadcastFailed, Node, SendFailedError, SendTimeout, open_node
from ._session import ConnectionState, Session

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
    "Dial",
    "Event",
    "FrameError",
    "InvalidId",
    "InvalidKey",
    "InvalidSchedule",
    "KeyChannelSpec",
    "KeyErased",
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

"""The sans-I/O core of tvdnet: the scheme and both protocols, with no trio, no sockets,
no clock and no operating system.

Everything here takes bytes and the current time and returns bytes, events and
decisions; whoever drives it (the trio node in `tvdnet`, the host's `device_bridge`, a
test) moves the bytes and reads the clock. Its modules, each public:

- `scheme`: the key-insulated scheme (G, U*, U), the period schedule, a node's
  per-pair key state (SPEC §1-§3).
- `frames`: the peer protocol's frames and inner messages, traffic keys (SPEC §4).
- `session`: `Session`, one node's peer protocol toward its whole TVD (SPEC §4).
- `channel`: the key-channel messages between bridge and node (SPEC §5).
- `agent`: `KeyAgent`, the node's end of the key channel (SPEC §5).
- `events`: what a `Session` reports; `timers`: named deadlines; `reader`: incremental
  msgpack decoding with a size limit; `ids`: SPEC §2 ids and encodings.
- `constants`: every number, from the spec or policy; `errors`: every error tvdnet raises.
"""

from . import (
    agent,
    channel,
    constants,
    errors,
    events,
    frames,
    ids,
    reader,
    scheme,
    session,
    timers,
)
from .agent import KeyAgent
from .errors import TvdnetError
from .scheme import ComputerKeys, DeviceKeys, Pair, PairKeys, PeriodKey, Schedule
from .session import Session

__all__ = [
    "ComputerKeys",
    "DeviceKeys",
    "KeyAgent",
    "Pair",
    "PairKeys",
    "PeriodKey",
    "Schedule",
    "Session",
    "TvdnetError",
    "agent",
    "channel",
    "constants",
    "errors",
    "events",
    "frames",
    "ids",
    "reader",
    "scheme",
    "session",
    "timers",
]

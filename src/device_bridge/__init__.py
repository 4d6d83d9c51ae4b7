"""device_bridge: the host-side daemon (the paper's "device") that pushes partial keys.

It holds the current device key dev_t of every pair of a TVD (SPEC §3), evolves them at
each period start, keeps them in an encrypted keystore (SPEC §6) and serves each VM's key
channel (SPEC §5). The command is `tvdnet-bridge` (docs/bridge.md).

Running a bridge in-process (node tests, benchmarks):

    from device_bridge import MemberConfig, StreamPort, TvdConfig, open_bridge
    from tvdnet import WallClock
    from tvdnet.core.scheme import generate

    ports = {vm: StreamPort(vm) for vm in ("vm-a", "vm-b")}
    config = TvdConfig.for_schedule(
        "demo", schedule, [MemberConfig(vm, f"127.0.0.1:{7001 + i}", port)
                           for i, (vm, port) in enumerate(ports.items())])
    device_keys = generate("demo", ports).for_bridge(1)
    async with open_bridge(config, device_keys, clock=WallClock(offset=...)) as bridge:
        stream = await ports["vm-a"].connect()  # the guest's end of vm-a's key channel
        ...                                     # say hello on it; welcome and updates follow
        await bridge.wait_acked("vm-a", 3)
        print(bridge.status().to_json())

Public API:

- `open_bridge(config, device_keys, *, keystore=None, schedule=None, clock=None,
  allow_dev_transports=False, iso_dir=DEFAULT_ISO_DIR)`: async context manager -> `Bridge`
  (`status()`, `reload(config=None)`, `wait_acked(vm, t)`, `wait_keystore()`, `period`).
  `status().key_updates`: for each recent period, a `KeyUpdate` (period start to the ack
  of the last VM that was connected at its start).
- `TvdConfig`, `MemberConfig`, `load_config(path)`: the TVD file.
- Transports: `StreamPort` (hand the bridge streams in code), `parse_channel(text)` and the
  specs it returns (`UnixConnect`, `UnixListen`, `SerialLine`, `TcpListen`, `TcpConnect`,
  `CdromSwap`).
- `Keystore`: load (`Keystore.load(path, passphrase)`), write, lock; `provision(...)` (G).
- Approach I: `build_update_image`, `write_update_image`, `read_update_from_iso`, `open_qmp`.
- Errors: `BridgeError` and its subclasses.
"""

from ._config import MemberConfig, TvdConfig, load_config
from ._daemon import Bridge, BridgeStatus, ReloadResult, open_bridge
from ._iso import (
    DEFAULT_ISO_DIR,
    QmpClient,
    build_update_image,
    open_qmp,
    read_update_from_iso,
    write_update_image,
)
from ._keystore import Keystore, MemberRecord
from ._provision import ProvisionResult, provision
from ._rollout import KeyUpdate
from ._transports import (
    CdromSwap,
    ChannelSpec,
    SerialLine,
    StreamPort,
    TcpConnect,
    TcpListen,
    UnixConnect,
    UnixListen,
    parse_channel,
)
from ._worker import VmStatus
from .errors import (
    BridgeError,
    ConfigError,
    ControlError,
    IsoError,
    KeystoreError,
    ProvisionError,
    QmpError,
    ReloadError,
    TransportRefused,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_ISO_DIR",
    "Bridge",
    "BridgeError",
    "BridgeStatus",
    "CdromSwap",
    "ChannelSpec",
    "ConfigError",
    "ControlError",
    "IsoError",
    "KeyUpdate",
    "Keystore",
    "KeystoreError",
    "MemberConfig",
    "MemberRecord",
    "ProvisionError",
    "ProvisionResult",
    "QmpClient",
    "QmpError",
    "ReloadError",
    "ReloadResult",
    "SerialLine",
    "StreamPort",
    "TcpConnect",
    "TcpListen",
    "TransportRefused",
    "TvdConfig",
    "UnixConnect",
    "UnixListen",
    "VmStatus",
    "build_update_image",
    "load_config",
    "open_bridge",
    "open_qmp",
    "parse_channel",
    "provision",
    "read_update_from_iso",
    "write_update_image",
]

"""Every error the bridge raises on purpose. They carry facts (file, line, key, member),
never key material, passphrases or partial keys.

They sit in tvdnet's one hierarchy: `BridgeError` is a `TvdnetError`, and a TVD file that
cannot be used raises tvdnet's `ConfigError` (file, line, key), as a node's file does; a
control socket in the way or silent raises tvdnet's `ControlError`. Both are re-exported
here, so that this module names every error a bridge command can end with.
"""

from __future__ import annotations

from pathlib import Path

from tvdnet.core.errors import ConfigError, ControlError, KeyFileError, TvdnetError

__all__ = [
    "BridgeError",
    "ConfigError",
    "ControlError",
    "IsoError",
    "KeyFileError",
    "KeystoreError",
    "MoveError",
    "ProvisionError",
    "QmpError",
    "ReloadError",
    "TransportRefused",
    "TvdnetError",
]


class BridgeError(TvdnetError):
    """Base class of the bridge's own errors."""


class KeystoreError(BridgeError):
    """A keystore that is missing, too open, unauthentic, malformed or unwritable (SPEC §6)."""

    def __init__(self, path: Path | str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = Path(path)
        self.problem = problem


class ProvisionError(BridgeError):
    """Provisioning refused to run (files in the way, no passphrase, the schedule is over)."""


class TransportRefused(BridgeError):
    """A key-channel transport that other local processes can reach, without the dev option."""

    def __init__(self, vm: str, why: str) -> None:
        super().__init__(
            f"member {vm!r}: {why}; such a transport is for development only "
            "(run with --allow-dev-transports to use it anyway)"
        )
        self.vm = vm
        self.why = why


class ReloadError(BridgeError):
    """A membership reload that cannot be applied; nothing was changed."""


class MoveError(BridgeError):
    """A member's move between hosts that cannot be done; nothing was changed."""


class IsoError(BridgeError):
    """An approach-I image that cannot be written or read."""


class QmpError(BridgeError):
    """QEMU's monitor refused a command or could not be reached."""

    def __init__(self, what: str, error_class: str | None = None) -> None:
        super().__init__(f"QMP: {what}" + (f" ({error_class})" if error_class else ""))
        self.what = what
        self.error_class = error_class

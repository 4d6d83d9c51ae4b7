"""Every error the bridge raises on purpose. They carry facts (file, line, key, member),
never key material, passphrases or partial keys."""

from __future__ import annotations

from pathlib import Path

from tvdnet._errors import TvdnetError

__all__ = [
    "BridgeError",
    "ConfigError",
    "ControlError",
    "IsoError",
    "KeystoreError",
    "ProvisionError",
    "QmpError",
    "ReloadError",
    "TransportRefused",
]


class BridgeError(TvdnetError):
    """Base class of the bridge's own errors."""


class ConfigError(BridgeError):
    """A TVD file that cannot be used: names the file, the line (when known) and the key."""

    def __init__(self, path: Path | str | None, line: int | None, key: str, problem: str) -> None:
        where = str(path) if path is not None else "<config>"
        if line is not None:
            where += f":{line}"
        super().__init__(f"{where}: {key}: {problem}" if key else f"{where}: {problem}")
        self.path = Path(path) if path is not None else None
        self.line = line
        self.key = key
        self.problem = problem


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


class IsoError(BridgeError):
    """An approach-I image that cannot be written or read."""


class QmpError(BridgeError):
    """QEMU's monitor refused a command or could not be reached."""

    def __init__(self, what: str, error_class: str | None = None) -> None:
        super().__init__(f"QMP: {what}" + (f" ({error_class})" if error_class else ""))
        self.what = what
        self.error_class = error_class


class ControlError(BridgeError):
    """The control socket is missing, not ours, or answered nonsense."""

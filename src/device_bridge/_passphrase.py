"""Where the keystore passphrase comes from: a file, the environment, or the terminal.

It is kept in a bytearray so that its owner can zero it (`Keystore.close`).
"""

from __future__ import annotations

import getpass
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Final

from tvdnet.keyfile import KeyFileError, check_private

from .errors import BridgeError

__all__ = ["PASSPHRASE_ENV", "read_passphrase"]

PASSPHRASE_ENV: Final = "TVDNET_KEYSTORE_PASSPHRASE"  # noqa: S105 (a variable name)


def read_passphrase(
    *,
    confirm: bool,
    file: Path | None = None,
    prompt: Callable[[str], str] = getpass.getpass,
    interactive: bool | None = None,
) -> bytearray:
    """From `file` (mode 0600, one line), else $TVDNET_KEYSTORE_PASSPHRASE (removed from the
    environment so that children do not inherit it), else a prompt on the terminal."""
    if file is not None:
        try:
            check_private(file)
            raw = bytearray(file.read_bytes())
        except KeyFileError as exc:
            raise BridgeError(f"passphrase file {exc}") from None
        except OSError as exc:
            raise BridgeError(f"passphrase file {file}: {exc.strerror}") from None
        while raw.endswith((b"\n", b"\r")):
            raw.pop()
        if not raw:
            raise BridgeError(f"passphrase file {file} is empty")
        return raw
    from_env = os.environ.pop(PASSPHRASE_ENV, None)
    if from_env is not None:
        if not from_env:
            raise BridgeError(f"${PASSPHRASE_ENV} is empty")
        return bytearray(from_env.encode())
    if interactive is None:
        interactive = sys.stdin.isatty()
    if not interactive:
        raise BridgeError(
            f"no passphrase: set ${PASSPHRASE_ENV}, give --passphrase-file, or run on a terminal"
        )
    first = prompt("Keystore passphrase: ")
    if not first:
        raise BridgeError("the passphrase is empty")
    if confirm and prompt("Again: ") != first:
        raise BridgeError("the two passphrases differ")
    return bytearray(first.encode())

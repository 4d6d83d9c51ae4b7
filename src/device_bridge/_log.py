"""Structured logs: one `event=NAME key=value ...` line per event, on the `device_bridge` logger.

Callers pass facts (ids, periods, counts, durations, reasons), never key material: no
partial key, device key or passphrase is ever handed to `emit`.
"""

from __future__ import annotations

import json
import logging

__all__ = ["emit", "logger"]

logger = logging.getLogger("device_bridge")


def _value(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    text = str(value)
    if not text or any(c.isspace() or c in '="' for c in text):
        return json.dumps(text)
    return text


def emit(level: int, event: str, **fields: object) -> None:
    if logger.isEnabledFor(level):
        parts = [f"event={event}"]
        parts += [f"{key}={_value(value)}" for key, value in fields.items() if value is not None]
        logger.log(level, " ".join(parts))

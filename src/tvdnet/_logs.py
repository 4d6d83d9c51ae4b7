"""Logging that a hostile peer cannot turn into a flood: one line per cause per interval."""

from __future__ import annotations

import logging
import time
from collections import Counter

__all__ = ["RateLimitedLog"]


class RateLimitedLog:
    """Logs the first event of each cause, then at most one per `interval` seconds,
    saying how many were suppressed in between."""

    def __init__(self, logger: logging.Logger, interval: float = 60.0) -> None:
        self._logger = logger
        self._interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()

    def warning(self, cause: str, message: str, *args: object) -> None:
        self._emit(logging.WARNING, cause, message, args)

    def info(self, cause: str, message: str, *args: object) -> None:
        self._emit(logging.INFO, cause, message, args)

    def _emit(self, level: int, cause: str, message: str, args: tuple[object, ...]) -> None:
        now = time.monotonic()
        last = self._last.get(cause)
        if last is not None and now - last < self._interval:
            self._suppressed[cause] += 1
            return
        suppressed = self._suppressed.pop(cause, 0)
        if suppressed:
            message += " suppressed=%d"
            args = (*args, suppressed)
        self._last[cause] = now
        self._logger.log(level, message, *args)

"""Log lines a peer can trigger once per connection, throttled: a flood must not become one."""
from __future__ import annotations

import logging
import math
import time
from typing import Callable

# At most one line per reason this often; the next one says how many were held back.
EVERY = 10.0


class LogThrottle:
    """Per key (a fixed reason, never an address: the table must not grow with a flood), at
    most one line per `every` seconds. Counters for metrics are kept elsewhere, exactly."""

    def __init__(self, logger: logging.Logger, every: float = EVERY,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.every = every
        self.clock = clock
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def log(self, key: str, level: int, msg: str, *args: object, exc_info: object = None) -> bool:
        """Log `msg % args` unless `key` was logged less than `every` seconds ago; True if it
        was logged."""
        now = self.clock()
        if now - self._last.get(key, -math.inf) < self.every:
            self._held[key] = self._held.get(key, 0) + 1
            return False
        self._last[key] = now
        held = self._held.pop(key, 0)
        if held:
            msg += " (%d more like it not logged since the last)"
            args = (*args, held)
        self.logger.log(level, msg, *args, exc_info=exc_info)  # type: ignore[arg-type]
        return True

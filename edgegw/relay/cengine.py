"""The C relay engine (edgegw._relay) behind the asyncio `Relay` protocol.

The engine's threads move the bytes; this side only watches the engine's notify fd with
`loop.add_reader` and turns its reports into `RelayReport`s, in the loop thread.
"""
from __future__ import annotations

import asyncio
import socket

from edgegw import _relay
from edgegw.relay.base import (DEFAULT_COALESCE_US, FinishedCallback, FinishReason, RelayReport,
                               RelayStats, deliver)


class CRelay:
    """`Relay` over the C engine; `backend` is "splice" (Linux) or "select"."""

    def __init__(self, backend: str, *, threads: int = 1, pipe_size: int = 1 << 20,
                 idle_timeout: float = 0.0, fin_timeout: float = 0.0, pool_max: int = 64,
                 buffer_size: int = 64 * 1024, coalesce_us: int = DEFAULT_COALESCE_US,
                 sched_batch: bool = True) -> None:
        self.backend = backend
        self._engine = _relay.Engine(backend, threads=threads, pipe_size=pipe_size,
                                     idle_timeout=idle_timeout, fin_timeout=fin_timeout,
                                     pool_max=pool_max,
                                     buffer_size=buffer_size, coalesce_us=coalesce_us,
                                     sched_batch=sched_batch)
        self._on_finished: FinishedCallback | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fd = -1
        self._closed = False

    def start(self, on_finished: FinishedCallback) -> None:
        if self._loop is not None:
            raise RuntimeError("relay already started")
        self._loop = asyncio.get_running_loop()
        self._on_finished = on_finished
        self._fd = self._engine.notify_fd
        self._loop.add_reader(self._fd, self._deliver)

    def add(self, session_id: int, a: socket.socket, b: socket.socket) -> None:
        if self._closed:
            raise RuntimeError("relay is closed")
        # The engine owns the fds from here on; detach so Python never closes them. A failed
        # add leaves the sockets with the caller.
        self._engine.add(session_id, a.fileno(), b.fileno())
        a.detach()
        b.detach()

    def kill(self, session_id: int) -> bool:
        if self._closed:
            return False
        return self._engine.kill(session_id)

    def stats(self) -> RelayStats:
        st = self._engine.stats()
        return RelayStats(backend=self.backend, **st)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._loop is not None:
            self._loop.remove_reader(self._fd)
            self._deliver()
            # Joining the threads can take a moment with many sessions: not in the loop thread.
            await self._loop.run_in_executor(None, self._engine.close)
        else:
            self._engine.close()
        self._deliver()

    def _deliver(self) -> None:
        while True:
            batch = self._engine.drain()
            if not batch:
                return
            for sid, a_to_b, b_to_a, duration, reason, error in batch:
                deliver(self._on_finished, RelayReport(sid, a_to_b, b_to_a, duration,
                                                       FinishReason(reason), error))

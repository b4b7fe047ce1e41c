"""Accepting connections on a listening socket from the event loop, for both processes.

A reader callback on the listener, rather than a `loop.sock_accept()` loop: that costs a future,
two task steps and taking the listener out of epoll and back for every connection, all on the
critical path of a session's setup. Here one wakeup accepts whatever is queued.
"""
from __future__ import annotations

import asyncio
import logging
import socket
from typing import Callable

log = logging.getLogger("edgegw.accept")

# Connections taken per wakeup, so that a flood on one listener cannot starve the loop.
BATCH = 64
# After an accept error (EMFILE and friends) the listener rests this long instead of spinning.
BACKOFF = 0.1

OnAccept = Callable[[socket.socket, tuple], None]


class Acceptor:
    """Calls `on_accept(sock, addr)` for each connection on `lsock` (non-blocking), with the
    accepted socket already non-blocking. `on_accept` must not block: it starts a task."""

    def __init__(self, name: str, lsock: socket.socket, on_accept: OnAccept) -> None:
        self.name = name
        self.lsock = lsock
        self.on_accept = on_accept
        self._loop: asyncio.AbstractEventLoop | None = None
        self._resume: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.lsock.fileno(), self._ready)

    def close(self) -> None:
        """Stop accepting (the listening socket stays the caller's to close)."""
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        if self._loop is not None and self.lsock.fileno() >= 0:
            self._loop.remove_reader(self.lsock.fileno())
        self._loop = None

    def _ready(self) -> None:
        for _ in range(BATCH):
            try:
                sock, addr = self.lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.error("%s listener: accept failed: %s; pausing %.1fs", self.name, exc,
                          BACKOFF)
                assert self._loop is not None
                self._loop.remove_reader(self.lsock.fileno())
                self._resume = self._loop.call_later(BACKOFF, self._restart)
                return
            sock.setblocking(False)
            try:
                self.on_accept(sock, addr)
            except Exception:   # a bug in one handler closes that connection, not the listener
                log.exception("%s connection from %s: internal error; closed it", self.name,
                              addr[0] if addr else "?")
                sock.close()

    def _restart(self) -> None:
        self._resume = None
        if self._loop is not None and self.lsock.fileno() >= 0:
            self._loop.add_reader(self.lsock.fileno(), self._ready)

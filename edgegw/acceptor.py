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
# The first error of a run is logged, then one line per ERROR_LOG_EVERY seconds while the run
# lasts (resting BACKOFF between tries, a full fd table would otherwise log ten lines a second),
# and one when accepting works again.
ERROR_LOG_EVERY = 10.0

OnAccept = Callable[[socket.socket, tuple], None]


class Acceptor:
    """Calls `on_accept(sock, addr)` for each connection on `lsock` (non-blocking), with the
    accepted socket already non-blocking. `on_accept` must not block: it starts a task.
    pause() and resume() let the owner stop taking connections while it is at capacity: they
    wait in the kernel's backlog meanwhile, instead of being accepted only to be closed."""

    def __init__(self, name: str, lsock: socket.socket, on_accept: OnAccept) -> None:
        self.name = name
        self.lsock = lsock
        self.on_accept = on_accept
        self._loop: asyncio.AbstractEventLoop | None = None
        self._resume: asyncio.TimerHandle | None = None   # resting after an accept error
        self._paused = False                               # by the owner, at capacity
        self._failures = 0                                 # accept errors since a success
        self._logged_at = 0.0

    @property
    def paused(self) -> bool:
        return self._paused

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._watch()

    def close(self) -> None:
        """Stop accepting (the listening socket stays the caller's to close)."""
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        self._unwatch()
        self._loop = None

    def pause(self) -> None:
        """Take no more connections until resume()."""
        if not self._paused:
            self._paused = True
            self._unwatch()

    def resume(self) -> None:
        if self._paused:
            self._paused = False
            if self._resume is None:   # else the rest after an error ends first
                self._watch()

    def _watch(self) -> None:
        if self._loop is not None and self.lsock.fileno() >= 0:
            self._loop.add_reader(self.lsock.fileno(), self._ready)

    def _unwatch(self) -> None:
        if self._loop is not None and self.lsock.fileno() >= 0:
            self._loop.remove_reader(self.lsock.fileno())

    def _ready(self) -> None:
        for _ in range(BATCH):
            if self._paused:   # a handler run from here may have put us at capacity
                return
            try:
                sock, addr = self.lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._failed(exc)
                return
            if self._failures:
                log.info("%s listener: accepting again after %d failed accepts", self.name,
                         self._failures)
                self._failures = 0
            sock.setblocking(False)
            try:
                self.on_accept(sock, addr)
            except Exception:   # a bug in one handler closes that connection, not the listener
                log.exception("%s connection from %s: internal error; closed it", self.name,
                              addr[0] if addr else "?")
                sock.close()

    def _failed(self, exc: OSError) -> None:
        assert self._loop is not None
        self._failures += 1
        now = self._loop.time()
        if self._failures == 1 or now - self._logged_at >= ERROR_LOG_EVERY:
            self._logged_at = now
            log.error("%s listener: accept failed: %s (%d in a row); trying again every %gs",
                      self.name, exc, self._failures, BACKOFF)
        self._unwatch()
        self._resume = self._loop.call_later(BACKOFF, self._restart)

    def _restart(self) -> None:
        self._resume = None
        if not self._paused:
            self._watch()

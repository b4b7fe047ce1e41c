"""Pure-Python relay on asyncio transports: the fallback when the C engine is missing, and the
"naive" line in the benchmarks. Same semantics as the C engine: half-close forwarded once the
data before it is written, resets propagate, idle timeout, kill, byte counters."""
from __future__ import annotations

import asyncio
import socket
from typing import Callable, Optional, cast

from edgegw.relay.base import (FinishedCallback, FinishReason, RelayReport, RelayStats,
                               check_new_id, deliver)

_HIGH_WATER = 256 * 1024  # stop reading a side while its peer has this much unsent


class _Side(asyncio.Protocol):
    """One socket of a session; `index` 0 is a, 1 is b."""

    __slots__ = ("session", "index", "transport", "eof", "lost")

    def __init__(self, session: "_Session", index: int) -> None:
        self.session = session
        self.index = index
        self.transport: Optional[asyncio.Transport] = None
        self.eof = False
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio subclasses
        self.transport = transport
        transport.set_write_buffer_limits(high=_HIGH_WATER)
        peer = self.session.sides[1 - self.index].transport
        if peer is None:
            transport.pause_reading()  # nowhere to forward to yet; the bytes wait in the kernel
        else:
            self.session.flush_early(self.index)
            peer.resume_reading()

    def data_received(self, data: bytes) -> None:
        self.session.forward(self.index, data)

    def eof_received(self) -> bool:
        self.session.on_eof(self.index)
        return True  # keep the transport: the other direction may still be running

    def pause_writing(self) -> None:
        peer = self.session.sides[1 - self.index].transport
        if peer is not None:
            peer.pause_reading()

    def resume_writing(self) -> None:
        peer = self.session.sides[1 - self.index].transport
        if peer is not None and not peer.is_closing():
            peer.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.session.on_lost(self.index, exc)


def _factory(side: _Side) -> Callable[[], _Side]:
    """A protocol factory for connect_accepted_socket() that hands over an existing protocol."""
    return lambda: side


class _Session:
    __slots__ = ("relay", "id", "clock", "sides", "bytes", "start", "last", "reason", "error",
                 "ready", "reported", "early")

    def __init__(self, relay: "PyRelay", session_id: int, clock: Callable[[], float]) -> None:
        self.relay = relay
        self.id = session_id
        self.clock = clock   # the running loop's time()
        now = clock()
        self.sides = (_Side(self, 0), _Side(self, 1))
        self.bytes = [0, 0]
        self.start = now
        self.last = now
        self.reason: FinishReason | None = None
        self.error = ""
        self.ready = False
        self.reported = False
        # Bytes read before the other side's transport exists: uvloop may deliver data before
        # honouring a pause_reading() made in connection_made.
        self.early: list[bytes] = []

    def flush_early(self, index: int) -> None:
        """Side `index` just got its transport: write what the other side read before."""
        early, self.early = self.early, []
        for data in early:
            self.forward(1 - index, data)
        transport = self.sides[index].transport
        if self.sides[1 - index].eof and transport is not None and not transport.is_closing():
            transport.write_eof()  # the other side ended before this one was connected

    def forward(self, index: int, data: bytes) -> None:
        peer = self.sides[1 - index].transport
        if peer is None:
            self.early.append(data)
            return
        if peer.is_closing():
            return
        peer.write(data)  # sends at once when it can: no batching
        self.bytes[index] += len(data)
        self.relay._bytes_total += len(data)
        self.last = self.clock()

    def on_eof(self, index: int) -> None:
        if self.sides[index].eof:
            return  # resume_reading() after EOF reads it again
        self.sides[index].eof = True
        self.last = self.clock()   # the other side's fin timeout starts now
        peer = self.sides[1 - index].transport
        if peer is not None and not peer.is_closing():
            peer.write_eof()  # after the buffered bytes, like shutdown(SHUT_WR) after the pipe
        if self.sides[0].eof and self.sides[1].eof:
            self.end(FinishReason.EOF, graceful=True)

    def on_lost(self, index: int, exc: Exception | None) -> None:
        if exc is not None:
            self.end(FinishReason.RESET, error=_strerror(exc))
        elif not (self.sides[0].eof and self.sides[1].eof):
            self.end(FinishReason.RESET, error="connection closed")
        if all(s.lost for s in self.sides) and not self.reported:
            self.reported = True
            self.relay._finished(self)

    def end(self, reason: FinishReason, *, error: str = "", graceful: bool = False) -> None:
        """Record why the session ends (first reason wins) and close both sockets."""
        if self.reason is None:
            self.reason = reason
            self.error = error
        if not self.ready:
            return  # transports not made yet; _connect() finishes the job
        for side in self.sides:
            t = side.transport
            if t is not None and not t.is_closing():
                t.close() if graceful else t.abort()
            elif t is not None and not graceful:
                t.abort()


def _strerror(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


class PyRelay:
    """`Relay` in pure asyncio: one transport per socket, no task per direction."""

    backend = "python"

    def __init__(self, *, idle_timeout: float = 0.0, fin_timeout: float = 0.0) -> None:
        self._idle_timeout = idle_timeout
        # sessions one side has closed: the shorter of the two (as the C engine does)
        self._closing_timeout = (fin_timeout if fin_timeout and (not idle_timeout or
                                                                 fin_timeout < idle_timeout)
                                 else idle_timeout)
        self._sessions: dict[int, _Session] = {}
        self._on_finished: FinishedCallback | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle_handle: asyncio.TimerHandle | None = None
        self._total = 0
        self._bytes_total = 0
        self._closed = False
        self._drained: asyncio.Event | None = None

    def start(self, on_finished: FinishedCallback) -> None:
        if self._loop is not None:
            raise RuntimeError("relay already started")
        self._loop = asyncio.get_running_loop()
        self._on_finished = on_finished
        if self._closing_timeout > 0:
            self._schedule_idle_check()

    def add(self, session_id: int, a: socket.socket, b: socket.socket) -> None:
        if self._closed:
            raise RuntimeError("relay is closed")
        if self._loop is None:
            raise RuntimeError("relay not started: call start() first")
        check_new_id(session_id, self._sessions)
        # New socket objects own the fds; the caller's objects are detached and inert.
        sa = socket.socket(fileno=a.detach())
        sb = socket.socket(fileno=b.detach())
        for s in (sa, sb):
            s.setblocking(False)
            if s.family in (socket.AF_INET, socket.AF_INET6):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        session = _Session(self, session_id, self._loop.time)
        self._sessions[session_id] = session
        self._total += 1
        self._loop.create_task(self._connect(session, sa, sb))

    async def _connect(self, session: _Session, sa: socket.socket, sb: socket.socket) -> None:
        loop = self._loop
        assert loop is not None
        try:
            for side, sock in zip(session.sides, (sa, sb)):
                await loop.connect_accepted_socket(_factory(side), sock)
        except BaseException as exc:  # pragma: no cover - needs a broken socket
            for i, sock in enumerate((sa, sb)):
                t = session.sides[i].transport
                t.abort() if t is not None else sock.close()
                if t is None:
                    session.sides[i].lost = True
            session.ready = True
            session.end(FinishReason.ERROR, error=_strerror(exc))
            if all(s.lost for s in session.sides) and not session.reported:
                session.reported = True
                self._finished(session)
            if not isinstance(exc, Exception):
                raise
            return
        session.ready = True
        if session.reason is not None:  # killed or shut down while connecting
            session.end(session.reason, error=session.error)

    def kill(self, session_id: int) -> bool:
        session = self._sessions.get(session_id)
        if session is None or session.reason is not None:
            return False
        session.end(FinishReason.KILLED)
        return True

    def stats(self) -> RelayStats:
        return RelayStats(backend=self.backend, active_sessions=len(self._sessions),
                          total_sessions=self._total, bytes_total=self._bytes_total)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._idle_handle is not None:
            self._idle_handle.cancel()
        if not self._sessions:
            return
        self._drained = asyncio.Event()
        for session in list(self._sessions.values()):
            session.end(FinishReason.SHUTDOWN)
        await self._drained.wait()

    def _finished(self, session: _Session) -> None:
        self._sessions.pop(session.id, None)
        assert self._loop is not None
        report = RelayReport(session.id, session.bytes[0], session.bytes[1],
                             self._loop.time() - session.start,
                             session.reason or FinishReason.ERROR, session.error)
        deliver(self._on_finished, report)
        if self._drained is not None and not self._sessions:
            self._drained.set()

    def _schedule_idle_check(self) -> None:
        assert self._loop is not None
        self._idle_handle = self._loop.call_later(min(self._closing_timeout / 4, 1.0),
                                                  self._check_idle)

    def _check_idle(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        for session in list(self._sessions.values()):
            closing = session.sides[0].eof or session.sides[1].eof
            timeout = self._closing_timeout if closing else self._idle_timeout
            if timeout and session.last <= now - timeout and session.reason is None:
                session.end(FinishReason.IDLE)
        if not self._closed:
            self._schedule_idle_check()
